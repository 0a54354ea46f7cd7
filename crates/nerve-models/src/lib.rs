//! # nerve-models
//!
//! The model zoo, one file per architecture, each built from nerve-nn layers with the same
//! structure (and so the same `state_dict` names) as its PyTorch twin.
#![warn(missing_docs)]

pub mod cnn;
pub mod gpt;
pub mod mlp;
pub mod vit;

pub use cnn::cnn;
pub use gpt::{Gpt, GptConfig};
pub use mlp::mlp;
pub use vit::{Vit, VitConfig};
