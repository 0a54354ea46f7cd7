//! A decoder-only Transformer language model (GPT-2's architecture: learned positions,
//! pre-LayerNorm blocks, causal self-attention, GELU (tanh) MLP, tied input/output embedding).

use nerve_core::{Error, Result, Tensor};
use nerve_nn::{BlockOptions, Embedding, KvCache, LayerNorm, Module, TransformerBlock};

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

    /// Continue `prompt` (token ids) by `n` tokens with the cache: greedy when `temperature`
    /// is 0, else sampling from the `top_k` most likely tokens (all when 0) at that temperature,
    /// from nerve's seeded global generator.
    pub fn generate(
        &self,
        prompt: &[i64],
        n: usize,
        temperature: f64,
        top_k: usize,
    ) -> Result<Vec<i64>> {
        if prompt.is_empty() {
            return Err(Error::invalid("generate", "the prompt is empty"));
        }
        if let Some(&bad) = prompt
            .iter()
            .find(|&&t| t < 0 || t as usize >= self.config.vocab_size)
        {
            return Err(Error::invalid(
                "generate",
                format!(
                    "token {bad} outside the vocabulary of {}",
                    self.config.vocab_size
                ),
            ));
        }
        nerve_core::no_grad(|| {
            let mut caches = vec![KvCache::default(); self.h.len()];
            let mut out = prompt.to_vec();
            let mut next_in = Tensor::from_vec(prompt.to_vec(), [1, prompt.len()])?;
            for _ in 0..n {
                let logits = self.forward_cached(&next_in, &mut caches)?;
                let last = logits
                    .select(1, logits.dims()[1] - 1)?
                    .reshape(&[-1])?
                    .to_f64_vec();
                let tok = pick(&last, temperature, top_k);
                out.push(tok);
                next_in = Tensor::from_vec(vec![tok], [1, 1])?;
            }
            Ok(out)
        })
    }
}

/// Greedy or top-k temperature sampling from one row of logits.
fn pick(logits: &[f64], temperature: f64, top_k: usize) -> i64 {
    let mut idx: Vec<usize> = (0..logits.len()).collect();
    idx.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    if temperature <= 0.0 {
        return idx[0] as i64;
    }
    let k = if top_k == 0 {
        idx.len()
    } else {
        top_k.min(idx.len())
    };
    let m = logits[idx[0]];
    let w: Vec<f64> = idx[..k]
        .iter()
        .map(|&i| ((logits[i] - m) / temperature).exp())
        .collect();
    let total: f64 = w.iter().sum();
    let mut u = nerve_core::random::with_global(|g| g.next_f64()) * total;
    for (j, wj) in w.iter().enumerate() {
        u -= wj;
        if u <= 0.0 {
            return idx[j] as i64;
        }
    }
    idx[k - 1] as i64
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
