//! A decoder-only Transformer language model (GPT-2's architecture: learned positions,
//! pre-LayerNorm blocks, causal self-attention, GELU (tanh) MLP, tied input/output embedding).

use nerve_core::{Error, Result, Tensor};
use nerve_nn::{BlockOptions, Embedding, KvCache, LayerNorm, Module, TransformerBlock};
use serde::{Deserialize, Serialize};

use crate::lm::{check_prompt, last_logits, pick, LanguageModel};

/// Sizes of a [`Gpt`]. The default is the `gpt` benchmark workload's model.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
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
        let params = crate::parameters_at_least(&[
            &[c.vocab_size, c.width],
            &[c.context, c.width],
            &[c.layers, 12, c.width, c.width],
        ]);
        crate::check_size("GptConfig", params, "vocab_size, context, layers and width")?;
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

    /// Logits `[B, T, vocab]` of new tokens `ids` `[B, T]`, attending to the tokens already in
    /// `caches` (one per block, extended in place): incremental decoding with a key/value
    /// cache. Errors when the context would overflow.
    pub fn forward_cached(&self, ids: &Tensor, caches: &mut [KvCache]) -> Result<Tensor> {
        if caches.len() != self.h.len() {
            return Err(Error::invalid(
                "Gpt",
                format!("{} caches for {} blocks", caches.len(), self.h.len()),
            ));
        }
        let past = caches[0].len();
        let t = ids.dims().get(1).copied().unwrap_or(0);
        if ids.rank() != 2 || past + t > self.config.context {
            return Err(Error::bad_shape(
                "Gpt",
                ids.dims(),
                format!(
                    "{past} cached + new tokens exceed the context ({})",
                    self.config.context
                ),
            ));
        }
        let pos = Tensor::arange_i64(past as i64, (past + t) as i64, 1)?;
        let mut x = self.wte.forward(ids)?.add(&self.wpe.forward(&pos)?)?;
        for (b, cache) in self.h.iter().zip(caches.iter_mut()) {
            x = b.forward_cached(&x, cache)?;
        }
        self.ln_f.forward(&x)?.matmul(&self.wte.weight.t()?)
    }

    /// Continue `prompt` by `n` tokens with the key/value cache (see
    /// [`LanguageModel::generate`]). The model sees at most `context` tokens: when the cache
    /// is full it is rebuilt from the last `context / 2` tokens, as nanoGPT crops its input.
    pub fn generate(
        &self,
        prompt: &[i64],
        n: usize,
        temperature: f64,
        top_k: usize,
    ) -> Result<Vec<i64>> {
        self.generate_with(prompt, n, temperature, top_k, &mut |_| Ok(()))
    }

    /// [`Gpt::generate`], calling `on_token` with each new token.
    pub fn generate_with(
        &self,
        prompt: &[i64],
        n: usize,
        temperature: f64,
        top_k: usize,
        on_token: &mut dyn FnMut(i64) -> Result<()>,
    ) -> Result<Vec<i64>> {
        check_prompt(prompt, self.config.vocab_size)?;
        let ctx = self.config.context;
        nerve_core::no_grad(|| {
            let mut caches = vec![KvCache::default(); self.h.len()];
            let mut out = prompt.to_vec();
            let start = prompt.len().saturating_sub(ctx);
            let mut next_in =
                Tensor::from_vec(prompt[start..].to_vec(), [1, prompt.len() - start])?;
            for _ in 0..n {
                if caches[0].len() + next_in.dims()[1] > ctx {
                    let keep = (ctx / 2).max(1);
                    let tail = out[out.len() - keep..].to_vec();
                    caches = vec![KvCache::default(); self.h.len()];
                    next_in = Tensor::from_vec(tail, [1, keep])?;
                }
                let logits = self.forward_cached(&next_in, &mut caches)?;
                let tok = pick(&last_logits(&logits)?, temperature, top_k);
                out.push(tok);
                on_token(tok)?;
                next_in = Tensor::from_vec(vec![tok], [1, 1])?;
            }
            Ok(out)
        })
    }
}

impl LanguageModel for Gpt {
    fn vocab_size(&self) -> usize {
        self.config.vocab_size
    }
    fn generate_with(
        &self,
        prompt: &[i64],
        n: usize,
        temperature: f64,
        top_k: usize,
        on_token: &mut dyn FnMut(i64) -> Result<()>,
    ) -> Result<Vec<i64>> {
        Gpt::generate_with(self, prompt, n, temperature, top_k, on_token)
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
