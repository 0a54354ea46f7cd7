//! # nerve-data
//!
//! Data sets and loaders.
#![warn(missing_docs)]
