//! The `nerve` command.

fn main() {}
