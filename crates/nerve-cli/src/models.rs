//! The networks `nerve train` builds, named like their PyTorch `nn.Sequential` twins.

use anyhow::{bail, Result};
use clap::ValueEnum;
use nerve_nn::Sequential;

/// Which network to train.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ModelKind {
    /// Flatten → 512 → ReLU → 512 → ReLU → classes.
    Mlp,
    /// The `cnn` workload: conv 32 3×3, ReLU, pool 2; conv 64 3×3, ReLU, pool 2; 128, ReLU,
    /// classes (images only).
    Cnn,
}

impl ModelKind {
    /// The name stored in checkpoints.
    pub fn name(self) -> &'static str {
        match self {
            ModelKind::Mlp => "mlp",
            ModelKind::Cnn => "cnn",
        }
    }

    /// Parse a name stored in a checkpoint.
    pub fn from_name(s: &str) -> Option<Self> {
        match s {
            "mlp" => Some(ModelKind::Mlp),
            "cnn" => Some(ModelKind::Cnn),
            _ => None,
        }
    }
}

/// Build `kind` for samples shaped `sample_dims` and `classes` outputs.
pub fn build(kind: ModelKind, sample_dims: &[usize], classes: usize) -> Result<Sequential> {
    Ok(match kind {
        ModelKind::Mlp => nerve_models::mlp(sample_dims.iter().product(), &[512, 512], classes)?,
        ModelKind::Cnn => {
            if sample_dims.len() != 3 {
                bail!(
                    "--model cnn needs image samples [channels, height, width]; this data set has samples shaped {sample_dims:?} (use --model mlp)"
                );
            }
            nerve_models::cnn(sample_dims, classes)
                .map_err(|e| anyhow::anyhow!("--model cnn: {e}"))?
        }
    })
}
