//! Llama decoding with the weights left in ggml's quantised blocks (`Q4_0`, `Q4_1`, `Q8_0`):
//! every projection and the token embedding (also the output projection when tied) are
//! [`QuantMatrix`]es multiplied with [`quant_matmul_many`], the norms are f32. For inference
//! only: no autodiff, no `Module`. Same configuration, rotary tables, key/value cache kernels
//! and `generate_with` as [`Llama`](crate::Llama), which this matches up to the rounding of
//! the activations to 8 bits before each product (as llama.cpp does).
//!
//! Decoding a small model is bound by reading its weights: SmolLM2-135M reads 540 MB per
//! token in f32 and about 100 MB here. Everything between the products works on plain slices
//! (no tensor graph), one token row at a time.
//!
//! ```no_run
//! # fn main() -> Result<(), nerve_io::FormatError> {
//! let (model, tok) =
//!     nerve_models::gguf::load_llama_quantized("SmolLM2-135M-Instruct.Q4_1.gguf")?;
//! let ids: Vec<i64> = tok.encode("The capital of France is", true).unwrap()
//!     .into_iter().map(i64::from).collect();
//! let greedy = |l: &[f32], _: &[i64]| {
//!     (0..l.len()).max_by(|&a, &b| l[a].total_cmp(&l[b])).unwrap() as i64
//! };
//! let new = model.generate_with(&ids, 8, &[], greedy, |_| Ok(())).unwrap();
//! # Ok(()) }
//! ```

use std::collections::HashMap;

use nerve_core::kernels::attention::{cached_attention, KvBuffer};
use nerve_core::kernels::quant::{quant_matmul_many, QuantMatrix};
use nerve_core::{Error, Result, Tensor};

use crate::llama::{LlamaConfig, Rotary};
use crate::lm::decode_with_cache;

/// One decoder layer: quantised projections (transformers' names and shapes, query and key
/// rows in transformers' order) and f32 RMSNorm weights.
pub struct QuantLlamaLayer {
    /// `[heads·head_dim, hidden]`.
    pub q_proj: QuantMatrix,
    /// `[kv_heads·head_dim, hidden]`.
    pub k_proj: QuantMatrix,
    /// `[kv_heads·head_dim, hidden]`.
    pub v_proj: QuantMatrix,
    /// `[hidden, heads·head_dim]`.
    pub o_proj: QuantMatrix,
    /// `[intermediate, hidden]`.
    pub gate_proj: QuantMatrix,
    /// `[intermediate, hidden]`.
    pub up_proj: QuantMatrix,
    /// `[hidden, intermediate]`.
    pub down_proj: QuantMatrix,
    /// RMSNorm before attention, `[hidden]`.
    pub input_layernorm: Vec<f32>,
    /// RMSNorm before the MLP, `[hidden]`.
    pub post_attention_layernorm: Vec<f32>,
}

/// The decoding state of a [`QuantLlama`]: keys and values of every layer for the tokens
/// seen so far.
#[derive(Clone, Debug, Default)]
pub struct QuantLlamaCache {
    layers: Vec<KvBuffer<f32>>,
    batch: usize,
}

impl QuantLlamaCache {
    /// An empty cache for `model`.
    pub fn new(model: &QuantLlama) -> Self {
        Self {
            layers: vec![KvBuffer::default(); model.layers.len()],
            batch: 0,
        }
    }

    /// Tokens cached so far.
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, |l| l.len())
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A Llama causal language model with quantised weights, for decoding.
pub struct QuantLlama {
    /// Token embedding `[vocab, hidden]` (a lookup dequantises one row).
    pub embed_tokens: QuantMatrix,
    /// The layers.
    pub layers: Vec<QuantLlamaLayer>,
    /// Final RMSNorm, `[hidden]`.
    pub norm: Vec<f32>,
    /// The output projection `[vocab, hidden]`; `None` when tied to `embed_tokens`.
    pub lm_head: Option<QuantMatrix>,
    cos: Vec<f32>,
    sin: Vec<f32>,
    config: LlamaConfig,
    reference_products: bool,
}

impl QuantLlama {
    /// The model `config` describes from its weights under transformers' names: the 2-D ones
    /// (`model.embed_tokens.weight`, `model.layers.<i>.self_attn.q_proj.weight`, …,
    /// `lm_head.weight` unless tied) in `blocks`, the norms in `norms`. A missing, unexpected
    /// or mis-shaped weight is an error naming it; a tied model ignores an `lm_head.weight`.
    pub fn from_weights(
        config: LlamaConfig,
        mut blocks: HashMap<String, QuantMatrix>,
        mut norms: HashMap<String, Vec<f32>>,
    ) -> Result<Self> {
        config.validate()?;
        let c = &config;
        if c.tie_word_embeddings {
            blocks.remove("lm_head.weight");
        }
        let (d, hd, ff) = (c.hidden_size, c.head_dim(), c.intermediate_size);
        let (qd, kvd) = (c.num_attention_heads * hd, c.num_key_value_heads * hd);
        let mut mat = |name: String, rows: usize, cols: usize| -> Result<QuantMatrix> {
            let w = blocks.remove(&name).ok_or_else(|| {
                Error::invalid("QuantLlama", format!("the checkpoint has no tensor {name}"))
            })?;
            if (w.rows(), w.cols()) != (rows, cols) {
                return Err(Error::invalid(
                    "QuantLlama",
                    format!(
                        "tensor {name} has shape [{}, {}], the model needs [{rows}, {cols}]",
                        w.rows(),
                        w.cols()
                    ),
                ));
            }
            Ok(w)
        };
        let mut norm = |name: String| -> Result<Vec<f32>> {
            let w = norms.remove(&name).ok_or_else(|| {
                Error::invalid("QuantLlama", format!("the checkpoint has no tensor {name}"))
            })?;
            if w.len() != d {
                return Err(Error::invalid(
                    "QuantLlama",
                    format!("tensor {name} has {} values, the model needs {d}", w.len()),
                ));
            }
            Ok(w)
        };
        let embed_tokens = mat("model.embed_tokens.weight".into(), c.vocab_size, d)?;
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let p = format!("model.layers.{i}");
            layers.push(QuantLlamaLayer {
                q_proj: mat(format!("{p}.self_attn.q_proj.weight"), qd, d)?,
                k_proj: mat(format!("{p}.self_attn.k_proj.weight"), kvd, d)?,
                v_proj: mat(format!("{p}.self_attn.v_proj.weight"), kvd, d)?,
                o_proj: mat(format!("{p}.self_attn.o_proj.weight"), d, qd)?,
                gate_proj: mat(format!("{p}.mlp.gate_proj.weight"), ff, d)?,
                up_proj: mat(format!("{p}.mlp.up_proj.weight"), ff, d)?,
                down_proj: mat(format!("{p}.mlp.down_proj.weight"), d, ff)?,
                input_layernorm: norm(format!("{p}.input_layernorm.weight"))?,
                post_attention_layernorm: norm(format!("{p}.post_attention_layernorm.weight"))?,
            });
        }
        let final_norm = norm("model.norm.weight".into())?;
        let lm_head = if c.tie_word_embeddings {
            None
        } else {
            Some(mat("lm_head.weight".into(), c.vocab_size, d)?)
        };
        let mut left: Vec<String> = blocks.into_keys().chain(norms.into_keys()).collect();
        if !left.is_empty() {
            left.sort();
            return Err(Error::invalid(
                "QuantLlama",
                format!("unexpected tensors in the checkpoint: {}", left.join(", ")),
            ));
        }
        // The same tables as the f32 model.
        let rope = Rotary::new(hd, c.max_position_embeddings, c.rope_theta)?;
        let (cos, sin) = rope.tables();
        Ok(Self {
            embed_tokens,
            layers,
            norm: final_norm,
            lm_head,
            cos: cos.to_vec()?,
            sin: sin.to_vec()?,
            config,
            reference_products: false,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// With `on`, multiply by the dequantised weights with unrounded activations
    /// ([`QuantMatrix::matmul_reference`]) instead of the quantised kernels: many times
    /// slower, for checking the rest of the model against [`Llama`](crate::Llama) apart from
    /// the activations' 8-bit rounding.
    pub fn set_reference_products(&mut self, on: bool) {
        self.reference_products = on;
    }

    /// `x [rows, cols] · wᵀ` for each `w` (one quantisation of `x`, one parallel region).
    fn products(&self, ws: &[&QuantMatrix], x: &[f32], rows: usize) -> Result<Vec<Vec<f32>>> {
        if self.reference_products {
            ws.iter().map(|w| w.matmul_reference(x, rows)).collect()
        } else {
            quant_matmul_many(ws, x, rows)
        }
    }

    /// Bytes of weight data (blocks and norms): what a token's decoding reads.
    pub fn weight_bytes(&self) -> usize {
        let mats = self.layers.iter().flat_map(|l| {
            [
                &l.q_proj,
                &l.k_proj,
                &l.v_proj,
                &l.o_proj,
                &l.gate_proj,
                &l.up_proj,
                &l.down_proj,
            ]
        });
        let blocks: usize = mats
            .chain(std::iter::once(&self.embed_tokens))
            .chain(self.lm_head.as_ref())
            .map(|m| m.as_bytes().len())
            .sum();
        let norms = (2 * self.layers.len() + 1) * self.config.hidden_size * 4;
        blocks + norms
    }

    /// Logits `[B, T, vocab]` of new tokens `ids` `[B, T]`, attending to the tokens already in
    /// `cache` (extended in place). Errors when the positions would pass
    /// `max_position_embeddings`, on ids outside the vocabulary, or when the batch size
    /// changes between calls.
    pub fn forward_cached(&self, ids: &Tensor, cache: &mut QuantLlamaCache) -> Result<Tensor> {
        if ids.rank() != 2 {
            return Err(Error::bad_shape(
                "QuantLlama",
                ids.dims(),
                "expected token ids [batch, seq]",
            ));
        }
        let (b, t) = (ids.dims()[0], ids.dims()[1]);
        let flat: Vec<i64> = ids.contiguous()?.to_vec()?;
        let h = self.hidden(&flat, b, t, cache)?;
        let logits = self.logits(&h, b * t)?;
        Tensor::from_vec(logits, [b, t, self.config.vocab_size])
    }

    /// Continue `prompt` by up to `n` tokens with the cache, calling `on_token` with each new
    /// token as soon as it is chosen; `choose` picks the next token from the last position's
    /// logits and the tokens so far. Stops early after a token in `stop`. Returns the new
    /// tokens. (As [`Llama::generate_with`](crate::Llama::generate_with).)
    pub fn generate_with(
        &self,
        prompt: &[i64],
        n: usize,
        stop: &[i64],
        choose: impl FnMut(&[f32], &[i64]) -> i64,
        on_token: impl FnMut(i64) -> Result<()>,
    ) -> Result<Vec<i64>> {
        let mut cache = QuantLlamaCache::new(self);
        let d = self.config.hidden_size;
        let step = |ids: &[i64]| -> Result<Vec<f32>> {
            let t = ids.len();
            let h = self.hidden(ids, 1, t, &mut cache)?;
            // Only the last position's logits are needed.
            self.logits(&h[(t - 1) * d..], 1)
        };
        let limits = (self.config.vocab_size, self.config.max_position_embeddings);
        decode_with_cache(prompt, n, stop, limits, step, choose, on_token)
    }

    /// Hidden states `[B·T, hidden]` after the final norm of `ids` (`[B, T]`, flat).
    fn hidden(
        &self,
        ids: &[i64],
        b: usize,
        t: usize,
        cache: &mut QuantLlamaCache,
    ) -> Result<Vec<f32>> {
        let c = &self.config;
        if cache.layers.len() != self.layers.len() {
            *cache = QuantLlamaCache::new(self);
        }
        let past = cache.len();
        if b == 0 || t == 0 || past + t > c.max_position_embeddings {
            return Err(Error::bad_shape(
                "QuantLlama",
                &[b, t],
                format!(
                    "expected token ids [batch, seq] (both at least 1) with {past} cached + seq \
                     <= max_position_embeddings ({})",
                    c.max_position_embeddings
                ),
            ));
        }
        if !cache.is_empty() && cache.batch != b {
            return Err(Error::invalid(
                "QuantLlama",
                "the batch size changed between cached calls",
            ));
        }
        cache.batch = b;
        let d = c.hidden_size;
        let mut x = vec![0f32; b * t * d];
        for (&id, row) in ids.iter().zip(x.chunks_exact_mut(d)) {
            if id < 0 || id as usize >= c.vocab_size {
                return Err(Error::invalid(
                    "QuantLlama",
                    format!("token {id} outside the vocabulary of {}", c.vocab_size),
                ));
            }
            self.embed_tokens.dequantize_row(id as usize, row);
        }
        for (layer, kv) in self.layers.iter().zip(cache.layers.iter_mut()) {
            self.layer_forward(layer, &mut x, b, t, past, kv)?;
        }
        let mut h = vec![0f32; x.len()];
        rms_norm(&x, &self.norm, c.rms_norm_eps, &mut h);
        Ok(h)
    }

    /// Logits `[rows, vocab]` of final hidden states `[rows, hidden]`.
    fn logits(&self, h: &[f32], rows: usize) -> Result<Vec<f32>> {
        let head = self.lm_head.as_ref().unwrap_or(&self.embed_tokens);
        Ok(self.products(&[head], h, rows)?.swap_remove(0))
    }

    /// `x + attn(norm(x))`, then `x + mlp(norm(x))`, in place on `x` `[B·T, hidden]`.
    fn layer_forward(
        &self,
        l: &QuantLlamaLayer,
        x: &mut [f32],
        b: usize,
        t: usize,
        past: usize,
        kv: &mut KvBuffer<f32>,
    ) -> Result<()> {
        let c = &self.config;
        let (hd, heads, kv_heads) = (c.head_dim(), c.num_attention_heads, c.num_key_value_heads);
        let rows = b * t;
        let mut h = vec![0f32; x.len()];
        rms_norm(x, &l.input_layernorm, c.rms_norm_eps, &mut h);
        let mut qkv = self.products(&[&l.q_proj, &l.k_proj, &l.v_proj], &h, rows)?;
        let v = qkv.pop().expect("three outputs");
        let mut k = qkv.pop().expect("three outputs");
        let mut q = qkv.pop().expect("three outputs");
        for r in 0..rows {
            let pos = past + r % t;
            self.rotate(&mut q[r * heads * hd..(r + 1) * heads * hd], pos);
            self.rotate(&mut k[r * kv_heads * hd..(r + 1) * kv_heads * hd], pos);
        }
        let (k, v) = (
            to_heads(&k, b, t, kv_heads, hd),
            to_heads(&v, b, t, kv_heads, hd),
        );
        kv.append(&k, &v, b, kv_heads, t, hd);
        let scale = 1.0 / (hd as f32).sqrt();
        let o = cached_attention(&to_heads(&q, b, t, heads, hd), kv, heads, t, scale);
        let o = self.products(&[&l.o_proj], &o, rows)?.swap_remove(0);
        for (x, o) in x.iter_mut().zip(&o) {
            *x += o;
        }
        rms_norm(x, &l.post_attention_layernorm, c.rms_norm_eps, &mut h);
        let mut gu = self.products(&[&l.gate_proj, &l.up_proj], &h, rows)?;
        let up = gu.pop().expect("two outputs");
        let mut a = gu.pop().expect("two outputs");
        for (g, u) in a.iter_mut().zip(&up) {
            *g = *g / (1.0 + (-*g).exp()) * u;
        }
        let y = self.products(&[&l.down_proj], &a, rows)?.swap_remove(0);
        for (x, y) in x.iter_mut().zip(&y) {
            *x += y;
        }
        Ok(())
    }

    /// Rotate every head of one token's row `[heads·head_dim]` for position `pos` (the
    /// "rotate half" layout of [`Rotary`], in the same f32 operations).
    fn rotate(&self, row: &mut [f32], pos: usize) {
        let hd = self.config.head_dim();
        let half = hd / 2;
        let cos = &self.cos[pos * hd..(pos + 1) * hd];
        let sin = &self.sin[pos * hd..(pos + 1) * hd];
        for head in row.chunks_exact_mut(hd) {
            for i in 0..half {
                let (x1, x2) = (head[i], head[i + half]);
                head[i] = x1 * cos[i] + -x2 * sin[i];
                head[i + half] = x2 * cos[i + half] + x1 * sin[i + half];
            }
        }
    }
}

/// `[B·T, heads·hd]` (token rows) → `[B, heads, T, hd]` (what the cache kernels take).
fn to_heads(x: &[f32], b: usize, t: usize, heads: usize, hd: usize) -> Vec<f32> {
    if t == 1 {
        return x.to_vec();
    }
    let mut out = vec![0f32; x.len()];
    for bi in 0..b {
        for ti in 0..t {
            for h in 0..heads {
                let src = ((bi * t + ti) * heads + h) * hd;
                let dst = ((bi * heads + h) * t + ti) * hd;
                out[dst..dst + hd].copy_from_slice(&x[src..src + hd]);
            }
        }
    }
    out
}

/// `y = x / sqrt(mean(x²) + eps) · w` per row of `w.len()` values.
fn rms_norm(x: &[f32], w: &[f32], eps: f64, y: &mut [f32]) {
    let d = w.len();
    for (xr, yr) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)) {
        let ss: f64 = xr.iter().map(|&v| (v as f64) * (v as f64)).sum();
        let r = (1.0 / (ss / d as f64 + eps).sqrt()) as f32;
        for ((y, &x), &w) in yr.iter_mut().zip(xr).zip(w) {
            *y = x * r * w;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Llama;
    use nerve_core::kernels::quant::QuantFormat;
    use nerve_core::Generator;
    use nerve_nn::Module;

    /// A tiny random Llama (grouped-query attention, untied output) as blocks, and the f32
    /// model holding exactly the dequantised weights.
    fn tiny(tie: bool) -> (QuantLlama, Llama) {
        let c = LlamaConfig {
            vocab_size: 96,
            hidden_size: 64,
            intermediate_size: 96,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            max_position_embeddings: 32,
            tie_word_embeddings: tie,
            ..Default::default()
        };
        let (d, ff, kvd) = (64, 96, 32);
        let mut g = Generator::new(11);
        let mut shapes = vec![("model.embed_tokens.weight".to_string(), 96, d)];
        if !tie {
            shapes.push(("lm_head.weight".into(), 96, d));
        }
        for i in 0..2 {
            let p = format!("model.layers.{i}");
            for (n, r, k) in [
                ("self_attn.q_proj", d, d),
                ("self_attn.k_proj", kvd, d),
                ("self_attn.v_proj", kvd, d),
                ("self_attn.o_proj", d, d),
                ("mlp.gate_proj", ff, d),
                ("mlp.up_proj", ff, d),
                ("mlp.down_proj", d, ff),
            ] {
                shapes.push((format!("{p}.{n}.weight"), r, k));
            }
        }
        let (mut blocks, mut norms, mut f32s) = (HashMap::new(), HashMap::new(), HashMap::new());
        for (i, (name, rows, cols)) in shapes.into_iter().enumerate() {
            let mut v = vec![0f64; rows * cols];
            g.fill_normal(&mut v);
            let v: Vec<f32> = v.iter().map(|&x| (x * 0.15) as f32).collect();
            let format = [QuantFormat::Q4_1, QuantFormat::Q8_0, QuantFormat::Q4_0][i % 3];
            let q = QuantMatrix::quantize(format, rows, cols, &v).unwrap();
            f32s.insert(
                name.clone(),
                Tensor::from_vec(q.dequantize(), [rows, cols]).unwrap(),
            );
            blocks.insert(name, q);
        }
        let mut norm_names = vec!["model.norm.weight".to_string()];
        for i in 0..2 {
            norm_names.push(format!("model.layers.{i}.input_layernorm.weight"));
            norm_names.push(format!("model.layers.{i}.post_attention_layernorm.weight"));
        }
        for name in norm_names {
            let w: Vec<f32> = (0..d).map(|_| 0.5 + g.next_f32()).collect();
            f32s.insert(name.clone(), Tensor::from_vec(w.clone(), [d]).unwrap());
            norms.insert(name, w);
        }
        let q = QuantLlama::from_weights(c.clone(), blocks, norms).unwrap();
        let f = Llama::from_tensors(c, f32s).unwrap();
        (q, f)
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    const IDS: [i64; 7] = [3, 17, 95, 0, 42, 42, 8];

    /// The logits of [`IDS`] from the quantised model and from the f32 one.
    fn logits_of_ids(q: &QuantLlama, f: &Llama) -> (Vec<f32>, Vec<f32>) {
        let ids = Tensor::from_vec(IDS.to_vec(), [1, IDS.len()]).unwrap();
        let want = nerve_core::no_grad(|| f.forward(&ids))
            .unwrap()
            .to_vec()
            .unwrap();
        let got = q
            .forward_cached(&ids, &mut QuantLlamaCache::new(q))
            .unwrap()
            .to_vec()
            .unwrap();
        (got, want)
    }

    #[test]
    fn reference_products_match_the_f32_model() {
        // Dequantised weights, unrounded activations: only f32-vs-f64 summation apart, so the
        // rotary tables, attention, norms, MLP and output projection all agree with Llama.
        for tie in [false, true] {
            let (mut q, f) = tiny(tie);
            q.set_reference_products(true);
            let (got, want) = logits_of_ids(&q, &f);
            let diff = max_diff(&got, &want);
            assert!(diff <= 1e-4, "tie {tie}: max diff {diff}");
        }
    }

    #[test]
    fn quantised_products_stay_close_to_the_f32_model() {
        let (q, f) = tiny(false);
        let (got, want) = logits_of_ids(&q, &f);
        let span = want.iter().fold(0f32, |a, &b| a.max(b.abs()));
        let diff = max_diff(&got, &want);
        // 8-bit activations: about 1% of the logits' scale here; a layout or order mistake
        // gives errors of the order of the logits themselves.
        assert!(
            diff <= 0.03 * span,
            "max diff {diff} with logits up to {span}"
        );
    }

    #[test]
    fn token_by_token_and_batches_equal_the_whole_prompt() {
        for reference in [false, true] {
            let (mut q, _) = tiny(true);
            q.set_reference_products(reference);
            let n = IDS.len();
            let whole: Vec<f32> = q
                .forward_cached(
                    &Tensor::from_vec(IDS.to_vec(), [1, n]).unwrap(),
                    &mut QuantLlamaCache::new(&q),
                )
                .unwrap()
                .to_vec()
                .unwrap();
            let mut cache = QuantLlamaCache::new(&q);
            let mut steps = Vec::new();
            for &id in &IDS {
                let l: Vec<f32> = q
                    .forward_cached(&Tensor::from_vec(vec![id], [1, 1]).unwrap(), &mut cache)
                    .unwrap()
                    .to_vec()
                    .unwrap();
                steps.extend(l);
            }
            // Each row is computed with the same additions in the same order whatever else
            // is in the product, so the logits are the same bits.
            assert_eq!(steps, whole, "reference {reference}: token by token");
            let mut two = IDS.to_vec();
            two.extend(IDS);
            let batch: Vec<f32> = q
                .forward_cached(
                    &Tensor::from_vec(two, [2, n]).unwrap(),
                    &mut QuantLlamaCache::new(&q),
                )
                .unwrap()
                .to_vec()
                .unwrap();
            for half in batch.chunks_exact(whole.len()) {
                assert_eq!(half, &whole[..], "reference {reference}: batch entry");
            }
        }
    }

    #[test]
    fn generate_with_continues_like_forward() {
        let (q, _) = tiny(true);
        let greedy = |l: &[f32], _: &[i64]| {
            (0..l.len()).max_by(|&a, &b| l[a].total_cmp(&l[b])).unwrap() as i64
        };
        let out = q
            .generate_with(&IDS[..3], 4, &[], greedy, |_| Ok(()))
            .unwrap();
        assert_eq!(out.len(), 4);
        let mut seq = IDS[..3].to_vec();
        for &tok in &out {
            let l: Vec<f32> = q
                .forward_cached(
                    &Tensor::from_vec(seq.clone(), [1, seq.len()]).unwrap(),
                    &mut QuantLlamaCache::new(&q),
                )
                .unwrap()
                .to_vec()
                .unwrap();
            let last = &l[(seq.len() - 1) * 96..];
            assert_eq!(greedy(last, &seq), tok);
            seq.push(tok);
        }
        // Out of room, bad ids and an empty prompt are errors.
        assert!(q.generate_with(&IDS, 30, &[], greedy, |_| Ok(())).is_err());
        assert!(q.generate_with(&[96], 1, &[], greedy, |_| Ok(())).is_err());
        assert!(q.generate_with(&[], 1, &[], greedy, |_| Ok(())).is_err());
    }

    #[test]
    fn missing_and_misshaped_weights_are_named() {
        let c = LlamaConfig {
            vocab_size: 8,
            hidden_size: 32,
            intermediate_size: 32,
            num_hidden_layers: 1,
            num_attention_heads: 2,
            num_key_value_heads: 1,
            max_position_embeddings: 8,
            ..Default::default()
        };
        let blk = |r: usize, k: usize| {
            QuantMatrix::quantize(QuantFormat::Q8_0, r, k, &vec![0.5; r * k]).unwrap()
        };
        let mut blocks = HashMap::new();
        blocks.insert("model.embed_tokens.weight".to_string(), blk(8, 32));
        let err = QuantLlama::from_weights(c.clone(), blocks.clone(), HashMap::new())
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("model.layers.0.self_attn.q_proj.weight"),
            "{err}"
        );
        blocks.insert("model.embed_tokens.weight".to_string(), blk(8, 64));
        let err = QuantLlama::from_weights(c, blocks, HashMap::new())
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("model.embed_tokens.weight") && err.contains("[8, 64]"),
            "{err}"
        );
    }
}
