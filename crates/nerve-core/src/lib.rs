//! # nerve-core
//!
//! Tensors with runtime rank, shared storage and strided views; reverse-mode autodiff over
//! every op; CPU kernels that vectorise for the machine (AVX-512 / AVX2 chosen at run time)
//! and use every core above a measured work size.
//!
//! Names and semantics follow PyTorch, so a PyTorch user feels at home:
//!
//! ```
//! use nerve_core::{Tensor, Result};
//! # fn main() -> Result<()> {
//! let x = Tensor::randn([4, 3]);
//! let w = Tensor::randn([3, 2]).requires_grad_(true);
//! let loss = x.matmul(&w)?.relu()?.sum()?;
//! loss.backward()?;
//! assert_eq!(w.grad().unwrap().dims(), &[3, 2]);
//! # Ok(())
//! # }
//! ```
#![warn(missing_docs)]

pub mod autograd;
mod display;
pub mod dtype;
pub mod error;
pub mod gradcheck;
pub mod kernels;
pub mod layout;
mod operators;
pub mod ops;
pub mod random;
pub mod shape;
pub mod storage;
pub mod tensor;
pub mod threading;

pub use autograd::{checkpoint, is_grad_enabled, no_grad, set_grad_enabled, NoGradGuard};
pub use dtype::{DType, Element, Float};
pub use error::{Error, Result};
pub use layout::Layout;
pub use ops::binary::CmpOp;
pub use random::{manual_seed, rng_state, set_rng_state, Generator};
pub use shape::Shape;
pub use storage::live_storage_bytes;
pub use tensor::{live_tensors, Tensor, TensorId};
pub use threading::{num_threads, set_num_threads};
