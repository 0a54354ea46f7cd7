//! # nerve-nn
//!
//! Layers, losses, optimizers, learning-rate schedules and checkpoints on top of nerve-core,
//! with PyTorch's names: a model's parameters are named like its PyTorch twin's `state_dict`
//! (`features.0.weight`), so checkpoints move between the two as safetensors files.
//!
//! ```
//! use nerve_core::{Result, Tensor};
//! use nerve_nn::{loss, Linear, Module, ModuleExt, Optimizer, ReLU, Sequential};
//! # fn main() -> Result<()> {
//! let model = Sequential::new()
//!     .add(Linear::new(4, 16, true)?)
//!     .add(ReLU)
//!     .add(Linear::new(16, 3, true)?);
//! let mut opt = nerve_nn::Adam::adamw(model.parameters(), 1e-2, 0.01);
//! let x = Tensor::randn([8, 4]);
//! let y = Tensor::from_vec(vec![0i64, 1, 2, 0, 1, 2, 0, 1], [8])?;
//! for _ in 0..5 {
//!     let l = loss::cross_entropy(&model.forward(&x)?, &y, &Default::default())?;
//!     opt.zero_grad();
//!     l.backward()?;
//!     opt.step()?;
//! }
//! assert_eq!(model.named_parameters()[0].0, "0.weight");
//! # Ok(())
//! # }
//! ```
#![warn(missing_docs)]

pub mod attention;
pub mod checkpoint;
pub mod init;
pub mod layers;
pub mod lora;
pub mod loss;
pub mod lr;
pub mod mamba;
pub mod module;
pub mod optim;
pub mod rnn;
pub mod transformer;

pub use attention::{
    packed_self_attention, scaled_dot_product_attention, KvCache, MhaMasks, MultiheadAttention,
    SdpaOptions,
};
pub use checkpoint::{load_model, load_optimizer, save_model, save_optimizer, CheckpointError};
pub use init::Init;
pub use layers::{
    batch_norm1d, batch_norm2d, AdaptiveAvgPool2d, AvgPool2d, BatchNorm, Conv1d, Conv2d,
    ConvOptions, ConvTranspose2d, Dropout, Embedding, Flatten, GroupNorm, LayerNorm, LeakyReLU,
    Linear, LoraAdapter, MaxPool2d, ReLU, RmsNorm, SiLU, Sigmoid, Softmax, Tanh, GELU,
};
pub use lora::{LoraConfig, LoraError, TargetModules};
pub use lr::LrSchedule;
pub use mamba::{
    causal_conv1d, selective_scan, selective_state_update, MambaBlock, MambaCache, MambaLayer,
    MambaOptions,
};
pub use module::{glob_match, Module, ModuleExt, Sequential, StateDictError};
pub use optim::{
    clip_grad_norm, clip_grad_value, first_nonfinite, grad_norm, Adagrad, Adam, NonFinite,
    Optimizer, RmsProp, Sgd,
};
pub use rnn::{gru, lstm, Rnn, RnnKind, RnnOptions, RnnState};
pub use transformer::{apply_rotary, sinusoidal_encoding, BlockOptions, TransformerBlock};
