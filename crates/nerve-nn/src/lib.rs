//! # nerve-nn
//!
//! Layers, losses, optimizers, learning-rate schedules and checkpoints on top of nerve-core.
#![warn(missing_docs)]
