//! The Llama architecture (Llama 2/3, SmolLM, TinyLlama, Mistral without sliding windows):
//! RMSNorm before attention and MLP, rotary position embeddings, grouped-query attention
//! (fewer key/value heads than query heads), a SwiGLU MLP and an optionally tied output
//! embedding. Parameter names are Hugging Face's `LlamaForCausalLM` names
//! (`model.layers.0.self_attn.q_proj.weight`, …), so a transformers `state_dict` maps 1:1;
//! [`LlamaConfig`] uses the field names of its `config.json`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use nerve_core::kernels::attention::{cached_attention, KvBuffer};
use nerve_core::{no_grad, Error, Result, Tensor};
use nerve_nn::{Embedding, Linear, Module, ModuleExt, RmsNorm, SdpaOptions};
use serde::{Deserialize, Serialize};

use crate::lm::decode_with_cache;

/// Sizes of a Llama model, with the names of Hugging Face's `LlamaConfig`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LlamaConfig {
    /// Tokens in the vocabulary.
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// Width of the SwiGLU MLP.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention when fewer than the query heads).
    pub num_key_value_heads: usize,
    /// Epsilon of every RMSNorm.
    pub rms_norm_eps: f64,
    /// Base of the rotary embedding's frequencies.
    pub rope_theta: f64,
    /// Longest sequence the model was trained for.
    pub max_position_embeddings: usize,
    /// Whether the output projection is the token embedding.
    pub tie_word_embeddings: bool,
}

impl Default for LlamaConfig {
    /// SmolLM2-135M's sizes.
    fn default() -> Self {
        Self {
            vocab_size: 49152,
            hidden_size: 576,
            intermediate_size: 1536,
            num_hidden_layers: 30,
            num_attention_heads: 9,
            num_key_value_heads: 3,
            rms_norm_eps: 1e-5,
            rope_theta: 100000.0,
            max_position_embeddings: 8192,
            tie_word_embeddings: true,
        }
    }
}

impl LlamaConfig {
    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads.max(1)
    }

    /// Refuse inconsistent sizes, naming the fields.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::invalid("LlamaConfig", msg));
        if self.vocab_size == 0
            || self.hidden_size == 0
            || self.intermediate_size == 0
            || self.num_hidden_layers == 0
            || self.max_position_embeddings == 0
        {
            return bad(
                "vocab_size, hidden_size, intermediate_size, num_hidden_layers and \
                        max_position_embeddings must be at least 1"
                    .into(),
            );
        }
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return bad(format!(
                "hidden_size ({}) must be divisible by num_attention_heads ({})",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if self.num_key_value_heads == 0
            || !self
                .num_attention_heads
                .is_multiple_of(self.num_key_value_heads)
        {
            return bad(format!(
                "num_attention_heads ({}) must be divisible by num_key_value_heads ({})",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return bad(format!(
                "the head width hidden_size / num_attention_heads ({}) must be even for the \
                 rotary embedding",
                self.head_dim()
            ));
        }
        Ok(())
    }
}

/// Cosine and sine tables of the rotary embedding (Hugging Face's "rotate half" layout:
/// frequency `i` applies to dims `i` and `i + head_dim/2`), computed once for every position.
pub struct Rotary {
    cos: Tensor,
    sin: Tensor,
    head_dim: usize,
}

impl Rotary {
    /// Tables for positions `0..max_positions`; the angles are computed in f32 as transformers
    /// does (`inv_freq = 1 / base^(2i/d)`, `angle = position · inv_freq`).
    pub fn new(head_dim: usize, max_positions: usize, base: f64) -> Result<Self> {
        let half = head_dim / 2;
        let inv: Vec<f32> = (0..half)
            .map(|i| (1.0 / base.powf((2 * i) as f64 / head_dim as f64)) as f32)
            .collect();
        let mut cos = vec![0f32; max_positions * head_dim];
        let mut sin = vec![0f32; max_positions * head_dim];
        for p in 0..max_positions {
            for (i, f) in inv.iter().enumerate() {
                let a = p as f32 * f;
                for j in [i, i + half] {
                    cos[p * head_dim + j] = a.cos();
                    sin[p * head_dim + j] = a.sin();
                }
            }
        }
        Ok(Self {
            cos: Tensor::from_vec(cos, [max_positions, head_dim])?,
            sin: Tensor::from_vec(sin, [max_positions, head_dim])?,
            head_dim,
        })
    }

    /// The cosine and sine tables `[max_positions, head_dim]`.
    pub(crate) fn tables(&self) -> (&Tensor, &Tensor) {
        (&self.cos, &self.sin)
    }

    /// Positions the tables cover.
    pub fn max_positions(&self) -> usize {
        self.cos.dims()[0]
    }

    /// Rotate `x` `[..., seq, head_dim]` for positions `offset..offset + seq`.
    pub fn apply(&self, x: &Tensor, offset: usize) -> Result<Tensor> {
        let r = x.rank();
        let seq = x.dims()[r - 2];
        if x.dims()[r - 1] != self.head_dim || offset + seq > self.max_positions() {
            return Err(Error::bad_shape(
                "rotary",
                x.dims(),
                format!(
                    "positions {offset}..{} of head width {} (tables cover {})",
                    offset + seq,
                    self.head_dim,
                    self.max_positions()
                ),
            ));
        }
        let cos = self.cos.narrow(0, offset, seq)?;
        let sin = self.sin.narrow(0, offset, seq)?;
        let half = self.head_dim / 2;
        let x1 = x.narrow(-1, 0, half)?;
        let x2 = x.narrow(-1, half, half)?;
        let rot = Tensor::cat(&[&x2.neg()?, &x1], -1)?;
        x.mul(&cos)?.add(&rot.mul(&sin)?)
    }
}

/// Keys and values of one layer for the tokens seen so far (`[batch, kv_heads, seen,
/// head_dim]`, grown in place).
#[derive(Clone, Debug, Default)]
pub struct LayerCache {
    kv: KvBuffer<f32>,
}

/// The decoding state of a [`Llama`]: one [`LayerCache`] per layer.
#[derive(Clone, Debug, Default)]
pub struct LlamaCache {
    layers: Vec<LayerCache>,
}

impl LlamaCache {
    /// An empty cache for `model`.
    pub fn new(model: &Llama) -> Self {
        Self {
            layers: vec![LayerCache::default(); model.model.layers.len()],
        }
    }

    /// Tokens cached so far.
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, |l| l.kv.len())
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Grouped-query self-attention with rotary positions (`q_proj`, `k_proj`, `v_proj`,
/// `o_proj`, no biases).
pub struct LlamaAttention {
    /// `[heads·head_dim, hidden]`.
    pub q_proj: Linear,
    /// `[kv_heads·head_dim, hidden]`.
    pub k_proj: Linear,
    /// `[kv_heads·head_dim, hidden]`.
    pub v_proj: Linear,
    /// `[hidden, heads·head_dim]`.
    pub o_proj: Linear,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl LlamaAttention {
    /// Causal self-attention of `x` `[B, T, hidden]` from position 0 (differentiable).
    fn attend(&self, x: &Tensor, rope: &Rotary) -> Result<Tensor> {
        let (b, t) = (x.dims()[0], x.dims()[1]);
        let (q, k, v) = self.project(x, rope, 0)?;
        let (k, v) = (self.repeat_kv(&k)?, self.repeat_kv(&v)?);
        let opts = SdpaOptions {
            causal: t > 1,
            ..Default::default()
        };
        let o = nerve_nn::scaled_dot_product_attention(&q, &k, &v, &opts)?
            .transpose(1, 2)?
            .reshape(&[b as isize, t as isize, -1])?;
        self.o_proj.forward(&o)
    }

    /// Queries, keys and values `[B, heads or kv_heads, T, hd]` of `x` at positions
    /// `past..past + T`, rotated.
    fn project(&self, x: &Tensor, rope: &Rotary, past: usize) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, t) = (x.dims()[0], x.dims()[1]);
        let hd = self.head_dim as isize;
        let split = |y: Tensor, heads: usize| -> Result<Tensor> {
            y.reshape(&[b as isize, t as isize, heads as isize, hd])?
                .transpose(1, 2)
        };
        let q = rope.apply(&split(self.q_proj.forward(x)?, self.heads)?, past)?;
        let k = rope.apply(&split(self.k_proj.forward(x)?, self.kv_heads)?, past)?;
        let v = split(self.v_proj.forward(x)?, self.kv_heads)?;
        Ok((q, k, v))
    }

    /// Attention of new tokens `x` over the cached ones and themselves, extending `cache`
    /// (decoding: no gradients flow through the cache).
    fn attend_cached(&self, x: &Tensor, rope: &Rotary, cache: &mut LayerCache) -> Result<Tensor> {
        let (b, t) = (x.dims()[0], x.dims()[1]);
        let (q, k, v) = self.project(x, rope, cache.kv.len())?;
        let (k, v): (Vec<f32>, Vec<f32>) = (k.contiguous()?.to_vec()?, v.contiguous()?.to_vec()?);
        if !cache.kv.is_empty() && k.len() / (t * self.kv_heads * self.head_dim) != b {
            return Err(Error::invalid(
                "LlamaAttention",
                "the batch size changed between cached calls",
            ));
        }
        cache.kv.append(&k, &v, b, self.kv_heads, t, self.head_dim);
        let scale = 1.0 / (self.head_dim as f32).sqrt();
        let o = q
            .contiguous()?
            .with_data::<f32, _>(|q| cached_attention(q, &cache.kv, self.heads, t, scale))?;
        let o = Tensor::from_vec(o, [b, t, self.heads * self.head_dim])?;
        self.o_proj.forward(&o)
    }

    /// Each key/value head repeated for the query heads of its group: `[B, kv, S, hd]` →
    /// `[B, heads, S, hd]`.
    fn repeat_kv(&self, x: &Tensor) -> Result<Tensor> {
        let rep = self.heads / self.kv_heads;
        if rep == 1 {
            return Ok(x.clone());
        }
        let d = x.dims().to_vec();
        x.unsqueeze(2)?
            .expand(&[
                d[0] as isize,
                d[1] as isize,
                rep as isize,
                d[2] as isize,
                d[3] as isize,
            ])?
            .reshape(&[
                d[0] as isize,
                self.heads as isize,
                d[2] as isize,
                d[3] as isize,
            ])
    }
}

impl Module for LlamaAttention {
    /// Causal self-attention of `x` `[B, T, hidden]` from position 0 (no cache).
    fn forward(&self, _x: &Tensor) -> Result<Tensor> {
        Err(Error::invalid(
            "LlamaAttention",
            "needs the model's rotary tables: call Llama::forward",
        ))
    }
    fn children(&self) -> Vec<(String, &dyn Module)> {
        vec![
            ("q_proj".into(), &self.q_proj),
            ("k_proj".into(), &self.k_proj),
            ("v_proj".into(), &self.v_proj),
            ("o_proj".into(), &self.o_proj),
        ]
    }
}

/// The SwiGLU MLP: `down_proj(silu(gate_proj(x)) · up_proj(x))`.
pub struct LlamaMlp {
    /// `[intermediate, hidden]`.
    pub gate_proj: Linear,
    /// `[intermediate, hidden]`.
    pub up_proj: Linear,
    /// `[hidden, intermediate]`.
    pub down_proj: Linear,
}

impl Module for LlamaMlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let g = self.gate_proj.forward(x)?.silu()?;
        self.down_proj.forward(&g.mul(&self.up_proj.forward(x)?)?)
    }
    fn children(&self) -> Vec<(String, &dyn Module)> {
        vec![
            ("gate_proj".into(), &self.gate_proj),
            ("up_proj".into(), &self.up_proj),
            ("down_proj".into(), &self.down_proj),
        ]
    }
}

/// One decoder layer: `x + attn(norm(x))`, then `x + mlp(norm(x))`.
pub struct LlamaLayer {
    /// Attention.
    pub self_attn: LlamaAttention,
    /// MLP.
    pub mlp: LlamaMlp,
    /// RMSNorm before attention.
    pub input_layernorm: RmsNorm,
    /// RMSNorm before the MLP.
    pub post_attention_layernorm: RmsNorm,
}

impl LlamaLayer {
    fn forward_with(
        &self,
        x: &Tensor,
        rope: &Rotary,
        cache: Option<&mut LayerCache>,
    ) -> Result<Tensor> {
        let h = self.input_layernorm.forward(x)?;
        let a = match cache {
            Some(c) => self.self_attn.attend_cached(&h, rope, c)?,
            None => self.self_attn.attend(&h, rope)?,
        };
        let x = x.add(&a)?;
        x.add(
            &self
                .mlp
                .forward(&self.post_attention_layernorm.forward(&x)?)?,
        )
    }
}

impl Module for LlamaLayer {
    fn forward(&self, _x: &Tensor) -> Result<Tensor> {
        Err(Error::invalid(
            "LlamaLayer",
            "needs the model's rotary tables: call Llama::forward",
        ))
    }
    fn children(&self) -> Vec<(String, &dyn Module)> {
        vec![
            ("self_attn".into(), &self.self_attn),
            ("mlp".into(), &self.mlp),
            ("input_layernorm".into(), &self.input_layernorm),
            (
                "post_attention_layernorm".into(),
                &self.post_attention_layernorm,
            ),
        ]
    }
}

/// The decoder stack without the output projection (`model.` in transformers' names).
pub struct LlamaModel {
    /// Token embedding `[vocab, hidden]`.
    pub embed_tokens: Embedding,
    /// The layers (shared, so a checkpointed layer's recomputation can hold one).
    pub layers: Vec<Arc<LlamaLayer>>,
    /// Final RMSNorm.
    pub norm: RmsNorm,
}

impl Module for LlamaModel {
    fn forward(&self, _x: &Tensor) -> Result<Tensor> {
        Err(Error::invalid(
            "LlamaModel",
            "needs the model's rotary tables: call Llama::forward",
        ))
    }
    fn children(&self) -> Vec<(String, &dyn Module)> {
        let mut v: Vec<(String, &dyn Module)> = vec![("embed_tokens".into(), &self.embed_tokens)];
        for (i, l) in self.layers.iter().enumerate() {
            v.push((format!("layers.{i}"), l.as_ref()));
        }
        v.push(("norm".into(), &self.norm));
        v
    }
}

/// A Llama causal language model (transformers' `LlamaForCausalLM`): ids `[B, T]` → logits
/// `[B, T, vocab]`. Parameters `model.embed_tokens.weight`, `model.layers.<i>.…`,
/// `model.norm.weight` and, unless the embedding is tied, `lm_head.weight`.
pub struct Llama {
    /// The decoder stack.
    pub model: LlamaModel,
    /// The output projection; `None` when tied to `model.embed_tokens`.
    pub lm_head: Option<Linear>,
    rope: Arc<Rotary>,
    config: LlamaConfig,
    gradient_checkpointing: AtomicBool,
}

impl Llama {
    /// A randomly initialised model with transformers' initialisation (every Linear and the
    /// embedding `N(0, 0.02²)`, norms 1). Inconsistent sizes are refused, naming the fields.
    pub fn new(config: LlamaConfig) -> Result<Self> {
        no_grad(|| {
            Self::build(config, |name, shape| {
                let t = if name.ends_with("norm.weight") {
                    Tensor::ones(shape)
                } else {
                    let t = Tensor::zeros(shape);
                    nerve_nn::init::normal_(&t, 0.0, 0.02)?;
                    t
                };
                Ok(t)
            })
        })
    }

    /// The model `config` describes, holding the tensors of `tensors` (transformers' names,
    /// f32) as its parameters without copying them: a missing, unexpected or mis-shaped
    /// tensor is an error naming it. A tied model ignores an `lm_head.weight`.
    pub fn from_tensors(config: LlamaConfig, mut tensors: HashMap<String, Tensor>) -> Result<Self> {
        if config.tie_word_embeddings {
            tensors.remove("lm_head.weight");
        }
        let m = Self::build(config, |name, shape| {
            let t = tensors.remove(name).ok_or_else(|| {
                Error::invalid("Llama", format!("the checkpoint has no tensor {name}"))
            })?;
            if t.dims() != shape {
                return Err(Error::invalid(
                    "Llama",
                    format!(
                        "tensor {name} has shape {:?}, the model needs {shape:?}",
                        t.dims()
                    ),
                ));
            }
            Ok(t.to_dtype(nerve_core::DType::F32)?.contiguous()?.detach())
        })?;
        if !tensors.is_empty() {
            let mut names: Vec<_> = tensors.into_keys().collect();
            names.sort();
            return Err(Error::invalid(
                "Llama",
                format!("unexpected tensors in the checkpoint: {}", names.join(", ")),
            ));
        }
        Ok(m)
    }

    /// Build the modules, asking `param` for every weight by its full name and shape.
    fn build(
        config: LlamaConfig,
        mut param: impl FnMut(&str, &[usize]) -> Result<Tensor>,
    ) -> Result<Self> {
        config.validate()?;
        let c = &config;
        let (d, hd, ff) = (c.hidden_size, c.head_dim(), c.intermediate_size);
        let (qd, kvd) = (c.num_attention_heads * hd, c.num_key_value_heads * hd);
        let mut get = |name: String, shape: &[usize]| -> Result<Tensor> {
            Ok(param(&name, shape)?.requires_grad_(true))
        };
        let lin = |weight: Tensor| Linear::from_parts(weight, None);
        let norm = |weight: Tensor| RmsNorm {
            weight,
            normalized_shape: vec![d],
            eps: c.rms_norm_eps,
        };
        let embed_tokens = Embedding {
            weight: get("model.embed_tokens.weight".into(), &[c.vocab_size, d])?,
        };
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let self_attn = LlamaAttention {
                q_proj: lin(get(format!("{p}.self_attn.q_proj.weight"), &[qd, d])?),
                k_proj: lin(get(format!("{p}.self_attn.k_proj.weight"), &[kvd, d])?),
                v_proj: lin(get(format!("{p}.self_attn.v_proj.weight"), &[kvd, d])?),
                o_proj: lin(get(format!("{p}.self_attn.o_proj.weight"), &[d, qd])?),
                heads: c.num_attention_heads,
                kv_heads: c.num_key_value_heads,
                head_dim: hd,
            };
            let mlp = LlamaMlp {
                gate_proj: lin(get(format!("{p}.mlp.gate_proj.weight"), &[ff, d])?),
                up_proj: lin(get(format!("{p}.mlp.up_proj.weight"), &[ff, d])?),
                down_proj: lin(get(format!("{p}.mlp.down_proj.weight"), &[d, ff])?),
            };
            layers.push(Arc::new(LlamaLayer {
                self_attn,
                mlp,
                input_layernorm: norm(get(format!("{p}.input_layernorm.weight"), &[d])?),
                post_attention_layernorm: norm(get(
                    format!("{p}.post_attention_layernorm.weight"),
                    &[d],
                )?),
            }));
        }
        let model = LlamaModel {
            embed_tokens,
            layers,
            norm: norm(get("model.norm.weight".into(), &[d])?),
        };
        let lm_head = if c.tie_word_embeddings {
            None
        } else {
            Some(lin(get("lm_head.weight".into(), &[c.vocab_size, d])?))
        };
        Ok(Self {
            model,
            lm_head,
            rope: Arc::new(Rotary::new(hd, c.max_position_embeddings, c.rope_theta)?),
            config,
            gradient_checkpointing: AtomicBool::new(false),
        })
    }

    /// Gradient checkpointing (transformers' `gradient_checkpointing_enable()`): when on,
    /// training forwards keep only each layer's input and recompute the layer during
    /// backward ([`nerve_core::checkpoint`]): far less memory for about one more forward pass.
    pub fn set_gradient_checkpointing(&self, on: bool) {
        self.gradient_checkpointing.store(on, Ordering::Relaxed);
    }

    /// The configuration.
    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// Logits `[B, T, vocab]` of new tokens `ids` `[B, T]`, attending to the tokens already in
    /// `cache` (extended in place): incremental decoding, without gradients. Errors when the
    /// positions would pass `max_position_embeddings`.
    pub fn forward_cached(&self, ids: &Tensor, cache: &mut LlamaCache) -> Result<Tensor> {
        if cache.layers.len() != self.model.layers.len() {
            *cache = LlamaCache::new(self);
        }
        no_grad(|| self.run(ids, Some(cache)))
    }

    /// Hidden states after the final norm, `[B, T, hidden]`.
    fn run(&self, ids: &Tensor, mut cache: Option<&mut LlamaCache>) -> Result<Tensor> {
        let past = cache.as_ref().map_or(0, |c| c.len());
        if ids.rank() != 2 || past + ids.dims()[1] > self.config.max_position_embeddings {
            return Err(Error::bad_shape(
                "Llama",
                ids.dims(),
                format!(
                    "expected token ids [batch, seq] with {past} cached + seq <= \
                     max_position_embeddings ({})",
                    self.config.max_position_embeddings
                ),
            ));
        }
        let mut x = self.model.embed_tokens.forward(ids)?;
        let recompute = cache.is_none()
            && nerve_core::is_grad_enabled()
            && self.gradient_checkpointing.load(Ordering::Relaxed);
        for (i, layer) in self.model.layers.iter().enumerate() {
            if recompute {
                let (l, rope) = (layer.clone(), self.rope.clone());
                let params = layer.trainable_parameters();
                x = nerve_core::checkpoint(move |x| l.forward_with(x, &rope, None), &x, &params)?;
                continue;
            }
            let lc = cache.as_mut().map(|c| &mut c.layers[i]);
            x = layer.forward_with(&x, &self.rope, lc)?;
        }
        let x = self.model.norm.forward(&x)?;
        match &self.lm_head {
            Some(head) => head.forward(&x),
            None => x.matmul(&self.model.embed_tokens.weight.t()?),
        }
    }

    /// Continue `prompt` by up to `n` tokens with the cache, calling `on_token` with each new
    /// token as soon as it is chosen (for streaming); `choose` picks the next token from the
    /// last position's logits and the tokens so far. Stops early after a token in `stop`.
    /// Returns the new tokens.
    pub fn generate_with(
        &self,
        prompt: &[i64],
        n: usize,
        stop: &[i64],
        choose: impl FnMut(&[f32], &[i64]) -> i64,
        on_token: impl FnMut(i64) -> Result<()>,
    ) -> Result<Vec<i64>> {
        no_grad(|| {
            let mut cache = LlamaCache::new(self);
            let step = |ids: &[i64]| -> Result<Vec<f32>> {
                let logits = self
                    .forward_cached(&Tensor::from_vec(ids.to_vec(), [1, ids.len()])?, &mut cache)?;
                let t = logits.dims()[1];
                logits.select(1, t - 1)?.reshape(&[-1])?.to_vec()
            };
            let limits = (self.config.vocab_size, self.config.max_position_embeddings);
            decode_with_cache(prompt, n, stop, limits, step, choose, on_token)
        })
    }
}

impl Module for Llama {
    /// Token ids `[batch, seq]` (i64) → logits `[batch, seq, vocab]`.
    fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        self.run(ids, None)
    }
    fn children(&self) -> Vec<(String, &dyn Module)> {
        let mut v: Vec<(String, &dyn Module)> = vec![("model".into(), &self.model)];
        if let Some(h) = &self.lm_head {
            v.push(("lm_head".into(), h));
        }
        v
    }
}
