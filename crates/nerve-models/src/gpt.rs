//! A decoder-only Transformer language model (GPT-2's architecture: learned positions,
//! pre-LayerNorm blocks, causal self-attention, GELU (tanh) MLP, tied input/output embedding).

use nerve_core::{Error, Result, Tensor};
use nerve_nn::{BlockOptions, Embedding, LayerNorm, Module, TransformerBlock};

/// Sizes of a [`Gpt`]. The default is the `gpt` benchmark workload's model.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GptConfig {
    /// Tokens in the vocabulary.
    pub vocab_size: usize,
    /// Longest sequence (learned positions).
    pub context: usize,
    /// Transformer blocks.
    pub layers: usize,
    /// Attention heads per block.
    pub heads: usize,
    /// Model width.
    pub width: usize,
    /// Dropout in the blocks.
    pub dropout: f64,
}

impl Default for GptConfig {
    fn default() -> Self {
        Self {
            vocab_size: 65,
            context: 128,
            layers: 4,
            heads: 4,
            width: 128,
            dropout: 0.0,
        }
    }
}

/// The model. Parameters: `wte.weight`, `wpe.weight`, `h.<i>.…` (see
/// [`TransformerBlock`]), `ln_f.*`; the output projection is `wte.weight` (tied).
pub struct Gpt {
    /// Token embedding (also the output projection).
    pub wte: Embedding,
    /// Learned positional embedding.
    pub wpe: Embedding,
    /// The blocks.
    pub h: Vec<TransformerBlock>,
    /// Final LayerNorm.
    pub ln_f: LayerNorm,
    config: GptConfig,
}

impl Gpt {
    /// A model with GPT-2's initialisation of the embeddings (`N(0, 0.02²)`) and PyTorch's
    /// defaults elsewhere. Inconsistent sizes are refused, naming the fields.
    pub fn new(c: GptConfig) -> Result<Self> {
        if c.heads == 0 || !c.width.is_multiple_of(c.heads) {
            return Err(Error::invalid(
                "GptConfig",
                format!(
                    "width ({}) must be divisible by heads ({})",
                    c.width, c.heads
                ),
            ));
        }
        if c.vocab_size == 0 || c.context == 0 || c.layers == 0 {
            return Err(Error::invalid(
                "GptConfig",
                "vocab_size, context and layers must be at least 1",
            ));
        }
        let wte = Embedding::new(c.vocab_size, c.width)?;
        let wpe = Embedding::new(c.context, c.width)?;
        nerve_nn::init::normal_(&wte.weight, 0.0, 0.02)?;
        nerve_nn::init::normal_(&wpe.weight, 0.0, 0.02)?;
        let mut o = BlockOptions::gpt(c.width, c.heads);
        o.dropout = c.dropout;
        let h = (0..c.layers)
            .map(|_| TransformerBlock::new(o))
            .collect::<Result<_>>()?;
        Ok(Self {
            wte,
            wpe,
            h,
            ln_f: LayerNorm::new(&[c.width]),
            config: c,
        })
    }

    /// The configuration.
    pub fn config(&self) -> GptConfig {
        self.config
    }
}

impl Module for Gpt {
    /// Token ids `[batch, seq]` (i64) → logits `[batch, seq, vocab]`.
    fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        if ids.rank() != 2 || ids.dims()[1] > self.config.context {
            return Err(Error::bad_shape(
                "Gpt",
                ids.dims(),
                format!(
                    "expected token ids [batch, seq] with seq <= context ({})",
                    self.config.context
                ),
            ));
        }
        let t = ids.dims()[1];
        let pos = Tensor::arange_i64(0, t as i64, 1)?;
        let mut x = self.wte.forward(ids)?.add(&self.wpe.forward(&pos)?)?;
        for b in &self.h {
            x = b.forward(&x)?;
        }
        self.ln_f.forward(&x)?.matmul(&self.wte.weight.t()?)
    }
    fn children(&self) -> Vec<(String, &dyn Module)> {
        let mut v: Vec<(String, &dyn Module)> =
            vec![("wte".into(), &self.wte), ("wpe".into(), &self.wpe)];
        for (i, b) in self.h.iter().enumerate() {
            v.push((format!("h.{i}"), b));
        }
        v.push(("ln_f".into(), &self.ln_f));
        v
    }
    fn describe(&self) -> String {
        format!("Gpt({:?})", self.config)
    }
}
