//! Readers for the checkpoint formats people actually have, in one place for the models and
//! the `nerve` command: GGUF (llama.cpp; metadata, tensor directory and dequantisation),
//! safetensors (Hugging Face names) and PyTorch `.pt`/`.pth` files (zip or legacy, read by a
//! restricted unpickler that rebuilds tensors and ordered dicts only and never runs code).
//!
//! Every reader checks the sizes a file declares against the file itself before allocating,
//! and reports a damaged or hostile file as a typed [`FormatError`] naming the file and what
//! is wrong.

pub mod error;
pub mod gguf;
pub mod pickle;
pub mod safetensors;
mod shape;
pub mod torch;

pub use error::FormatError;
