//! BERT encoders (transformers' `BertModel`) and sentence embeddings the sentence-transformers
//! way (all-MiniLM-L6-v2: the encoder, mean pooling over the attention mask, L2
//! normalisation). Parameter names are transformers' `state_dict` names
//! (`embeddings.word_embeddings.weight`, `encoder.layer.0.attention.self.query.weight`, …),
//! so a checkpoint maps 1:1; [`BertConfig`] uses the field names of its `config.json`.
//!
//! ```no_run
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let (bert, tok) = nerve_models::bert::load_sentence_encoder("all-MiniLM-L6-v2")?;
//! let emb = bert.embed(&tok, &["A man is eating food.", "A man eats bread."], 32)?;
//! assert_eq!(emb.dims(), &[2, 384]);
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::path::Path;

use nerve_core::{no_grad, DType, Error, Result, Tensor};
use nerve_data::Tokenizer;
use nerve_io::FormatError;
use nerve_nn::{Embedding, LayerNorm, Linear, Module, SdpaOptions};
use serde::{Deserialize, Serialize};
use tokenizers::{PaddingDirection, PaddingParams, PaddingStrategy, TruncationParams};

/// Sizes of a BERT encoder, with the names of Hugging Face's `BertConfig` (other keys of a
/// `config.json`, such as the dropout rates, are ignored).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct BertConfig {
    /// Tokens in the vocabulary.
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// Encoder layers.
    pub num_hidden_layers: usize,
    /// Attention heads.
    pub num_attention_heads: usize,
    /// Width of the feed-forward block.
    pub intermediate_size: usize,
    /// Activation of the feed-forward block: `gelu` (exact, erf), `gelu_new` or
    /// `gelu_pytorch_tanh` (tanh approximation), `relu`, `silu`/`swish`.
    pub hidden_act: String,
    /// Positions the position embedding covers (the longest input).
    pub max_position_embeddings: usize,
    /// Token types (segments) of the token-type embedding.
    pub type_vocab_size: usize,
    /// Epsilon of every LayerNorm.
    pub layer_norm_eps: f64,
    /// Id of the padding token.
    pub pad_token_id: usize,
    /// Only `absolute` (learned positions) is supported.
    pub position_embedding_type: String,
}

impl Default for BertConfig {
    /// transformers' defaults (bert-base-uncased's sizes).
    fn default() -> Self {
        Self {
            vocab_size: 30522,
            hidden_size: 768,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            intermediate_size: 3072,
            hidden_act: "gelu".into(),
            max_position_embeddings: 512,
            type_vocab_size: 2,
            layer_norm_eps: 1e-12,
            pad_token_id: 0,
            position_embedding_type: "absolute".into(),
        }
    }
}

/// The activations [`BertConfig::hidden_act`] may name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Activation {
    Gelu,
    GeluTanh,
    Relu,
    Silu,
}

impl Activation {
    fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "gelu" => Self::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" => Self::GeluTanh,
            "relu" => Self::Relu,
            "silu" | "swish" => Self::Silu,
            _ => return None,
        })
    }

    fn apply(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Gelu => x.gelu(),
            Self::GeluTanh => x.gelu_tanh(),
            Self::Relu => x.relu(),
            Self::Silu => x.silu(),
        }
    }
}

impl BertConfig {
    /// Parse and [validate](BertConfig::validate) a Hugging Face `config.json` held in
    /// memory; `path` names it in errors.
    ///
    /// ```
    /// use nerve_models::BertConfig;
    /// let c = BertConfig::from_json(br#"{"hidden_size": 384, "num_attention_heads": 12}"#, "config.json")?;
    /// assert_eq!(c.head_dim(), 32);
    /// # Ok::<(), nerve_io::FormatError>(())
    /// ```
    pub fn from_json(
        bytes: &[u8],
        path: impl AsRef<Path>,
    ) -> std::result::Result<BertConfig, FormatError> {
        let path = path.as_ref();
        let config: BertConfig =
            serde_json::from_slice(bytes).map_err(|e| FormatError::invalid(path, e.to_string()))?;
        config
            .validate()
            .map_err(|e| FormatError::invalid(path, e.to_string()))?;
        Ok(config)
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads.max(1)
    }

    /// Refuse inconsistent sizes and unsupported options, naming the fields.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::invalid("BertConfig", msg));
        if self.vocab_size == 0
            || self.hidden_size == 0
            || self.num_hidden_layers == 0
            || self.intermediate_size == 0
            || self.max_position_embeddings == 0
            || self.type_vocab_size == 0
        {
            return bad(
                "vocab_size, hidden_size, num_hidden_layers, intermediate_size, \
                 max_position_embeddings and type_vocab_size must be at least 1"
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
        if Activation::parse(&self.hidden_act).is_none() {
            return bad(format!(
                "hidden_act {:?} is not supported (known: gelu, gelu_new, gelu_pytorch_tanh, \
                 relu, silu, swish)",
                self.hidden_act
            ));
        }
        if self.position_embedding_type != "absolute" {
            return bad(format!(
                "position_embedding_type {:?} is not supported (only \"absolute\")",
                self.position_embedding_type
            ));
        }
        if self.pad_token_id >= self.vocab_size {
            return bad(format!(
                "pad_token_id ({}) must be below vocab_size ({})",
                self.pad_token_id, self.vocab_size
            ));
        }
        Ok(())
    }
}

/// Word, position and token-type embeddings, summed and normalised.
pub struct BertEmbeddings {
    /// `[vocab, hidden]`.
    pub word_embeddings: Embedding,
    /// `[max_positions, hidden]`.
    pub position_embeddings: Embedding,
    /// `[type_vocab, hidden]`.
    pub token_type_embeddings: Embedding,
    /// `LayerNorm` in transformers' names.
    pub layer_norm: LayerNorm,
}

impl BertEmbeddings {
    /// `LayerNorm(word + token_type + position)` of ids `[B, T]` at positions `0..T`; token
    /// types default to 0.
    fn embed(&self, ids: &Tensor, token_type_ids: Option<&Tensor>) -> Result<Tensor> {
        let t = ids.dims()[1];
        let words = self.word_embeddings.forward(ids)?;
        let positions = self.position_embeddings.weight.narrow(0, 0, t)?;
        let x = match token_type_ids {
            Some(tt) => words
                .add(&self.token_type_embeddings.forward(tt)?)?
                .add(&positions)?,
            // Type 0 everywhere: one row, broadcast.
            None => {
                words.add(&positions.add(&self.token_type_embeddings.weight.narrow(0, 0, 1)?)?)?
            }
        };
        self.layer_norm.forward(&x)
    }
}

impl Module for BertEmbeddings {
    /// Ids `[B, T]` (token type 0) → `[B, T, hidden]`.
    fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        self.embed(ids, None)
    }
    fn children(&self) -> Vec<(String, &dyn Module)> {
        vec![
            ("word_embeddings".into(), &self.word_embeddings),
            ("position_embeddings".into(), &self.position_embeddings),
            ("token_type_embeddings".into(), &self.token_type_embeddings),
            ("LayerNorm".into(), &self.layer_norm),
        ]
    }
}

/// One post-LayerNorm encoder layer: `x = LN(x + attn(x))`, then `x = LN(x + ffn(x))`. The
/// fields are flattened; [`Module::children`] gives transformers' nested names
/// (`attention.self.query`, `attention.output.dense`, `intermediate.dense`, …).
pub struct BertLayer {
    /// `attention.self.query`.
    pub query: Linear,
    /// `attention.self.key`.
    pub key: Linear,
    /// `attention.self.value`.
    pub value: Linear,
    /// `attention.output.dense`.
    pub attention_output: Linear,
    /// `attention.output.LayerNorm`.
    pub attention_norm: LayerNorm,
    /// `intermediate.dense` (`[intermediate, hidden]`).
    pub intermediate: Linear,
    /// `output.dense` (`[hidden, intermediate]`).
    pub output: Linear,
    /// `output.LayerNorm`.
    pub output_norm: LayerNorm,
    heads: usize,
    act: Activation,
}

impl BertLayer {
    /// The layer over `x` `[B, T, hidden]`; `mask` is added to the attention scores
    /// (`[B, 1, 1, T]`, 0 or a large negative number), `None` when every token is real.
    fn forward_with(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let (b, t, d) = (x.dims()[0], x.dims()[1], x.dims()[2]);
        let plain = [&self.query, &self.key, &self.value]
            .iter()
            .all(|l| l.lora().is_none() && l.bias.is_some());
        if mask.is_none() && plain {
            // No padding and no adapters: one GEMM against the three projections stacked
            // (`[3·hidden, hidden]`, stacked per call, so it always follows the weights) and
            // attention straight from the packed result, without splitting or merging heads.
            let (lq, lk, lv) = (&self.query, &self.key, &self.value);
            let w = Tensor::cat(&[&lq.weight, &lk.weight, &lv.weight], 0)?;
            let biases: Vec<&Tensor> = [lq, lk, lv]
                .iter()
                .filter_map(|l| l.bias.as_ref())
                .collect();
            let bias = Tensor::cat(&biases, 0)?;
            let qkv = x.linear(&w, Some(&bias))?;
            let a = nerve_nn::packed_self_attention(&qkv, self.heads, false)?;
            return self.finish(x, &a);
        }
        let split = |y: Tensor| -> Result<Tensor> {
            y.reshape(&[b as isize, t as isize, self.heads as isize, -1])?
                .transpose(1, 2)
        };
        let q = split(self.query.forward(x)?)?;
        let k = split(self.key.forward(x)?)?;
        let v = split(self.value.forward(x)?)?;
        // Without a mask this is the fused attention kernel.
        let opts = SdpaOptions {
            mask: mask.cloned(),
            ..Default::default()
        };
        let a = nerve_nn::scaled_dot_product_attention(&q, &k, &v, &opts)?
            .transpose(1, 2)?
            .reshape(&[b as isize, t as isize, d as isize])?;
        self.finish(x, &a)
    }

    /// Everything after attention: output projection, residual and norm, then the MLP with
    /// its residual and norm.
    fn finish(&self, x: &Tensor, a: &Tensor) -> Result<Tensor> {
        let x = self
            .attention_norm
            .forward(&self.attention_output.forward(a)?.add(x)?)?;
        let h = self.act.apply(&self.intermediate.forward(&x)?)?;
        self.output_norm.forward(&self.output.forward(&h)?.add(&x)?)
    }
}

impl Module for BertLayer {
    /// The layer without padding.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_with(x, None)
    }
    fn children(&self) -> Vec<(String, &dyn Module)> {
        vec![
            ("attention.self.query".into(), &self.query),
            ("attention.self.key".into(), &self.key),
            ("attention.self.value".into(), &self.value),
            ("attention.output.dense".into(), &self.attention_output),
            ("attention.output.LayerNorm".into(), &self.attention_norm),
            ("intermediate.dense".into(), &self.intermediate),
            ("output.dense".into(), &self.output),
            ("output.LayerNorm".into(), &self.output_norm),
        ]
    }
}

/// The layers (`encoder.` in transformers' names).
pub struct BertEncoder {
    /// `layer.<i>`.
    pub layer: Vec<BertLayer>,
}

impl Module for BertEncoder {
    /// The layers without padding.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = x.clone();
        for l in &self.layer {
            x = l.forward_with(&x, None)?;
        }
        Ok(x)
    }
    fn children(&self) -> Vec<(String, &dyn Module)> {
        self.layer
            .iter()
            .enumerate()
            .map(|(i, l)| (format!("layer.{i}"), l as &dyn Module))
            .collect()
    }
}

/// transformers' pooler: `tanh(dense(hidden[:, 0]))` (the `[CLS]` position).
pub struct BertPooler {
    /// `[hidden, hidden]`.
    pub dense: Linear,
}

impl Module for BertPooler {
    /// Last hidden state `[B, T, hidden]` → `[B, hidden]`.
    fn forward(&self, hidden: &Tensor) -> Result<Tensor> {
        self.dense.forward(&hidden.select(1, 0)?)?.tanh()
    }
    fn children(&self) -> Vec<(String, &dyn Module)> {
        vec![("dense".into(), &self.dense)]
    }
}

/// A BERT encoder (transformers' `BertModel`): token ids `[B, T]` → last hidden state
/// `[B, T, hidden]`. Parameters `embeddings.…`, `encoder.layer.<i>.…` and, when the checkpoint
/// has it, `pooler.dense.…`.
pub struct Bert {
    /// Embeddings.
    pub embeddings: BertEmbeddings,
    /// The layers.
    pub encoder: BertEncoder,
    /// The pooler, when the checkpoint has one (sentence embeddings do not use it).
    pub pooler: Option<BertPooler>,
    config: BertConfig,
    max_seq_length: usize,
}

/// Checkpoint entries that are buffers of transformers' `BertEmbeddings`, not weights.
const BUFFERS: [&str; 2] = ["embeddings.position_ids", "embeddings.token_type_ids"];

impl Bert {
    /// A randomly initialised model with transformers' initialisation (every Linear and
    /// embedding `N(0, 0.02²)`, biases 0, LayerNorms 1 and 0), with a pooler. Inconsistent
    /// sizes are refused, naming the fields.
    pub fn new(config: BertConfig) -> Result<Self> {
        no_grad(|| {
            Self::build(config, true, |name, shape| {
                if name.ends_with("LayerNorm.weight") {
                    Ok(Tensor::ones(shape))
                } else if name.ends_with(".bias") {
                    Ok(Tensor::zeros(shape))
                } else {
                    let t = Tensor::zeros(shape);
                    nerve_nn::init::normal_(&t, 0.0, 0.02)?;
                    Ok(t)
                }
            })
        })
    }

    /// The model `config` describes, holding the tensors of `tensors` (transformers' names,
    /// with or without the `bert.` prefix of the task models) as its parameters without
    /// copying f32 tensors. The pooler is loaded when the checkpoint has `pooler.dense.*`; the
    /// `embeddings.position_ids` / `token_type_ids` buffers are skipped. A missing,
    /// unexpected or mis-shaped tensor is an error naming it.
    pub fn from_tensors(config: BertConfig, tensors: HashMap<String, Tensor>) -> Result<Self> {
        let mut plain = HashMap::with_capacity(tensors.len());
        for (name, t) in tensors {
            let key = name.strip_prefix("bert.").unwrap_or(&name).to_string();
            if BUFFERS.contains(&key.as_str()) {
                continue;
            }
            if plain.insert(key.clone(), t).is_some() {
                return Err(Error::invalid(
                    "Bert",
                    format!("the checkpoint has {key} both with and without the bert. prefix"),
                ));
            }
        }
        let pooler = plain.keys().any(|k| k.starts_with("pooler."));
        let m = Self::build(config, pooler, |name, shape| {
            let t = plain.remove(name).ok_or_else(|| {
                Error::invalid("Bert", format!("the checkpoint has no tensor {name}"))
            })?;
            if t.dims() != shape {
                return Err(Error::invalid(
                    "Bert",
                    format!(
                        "tensor {name} has shape {:?}, the model needs {shape:?}",
                        t.dims()
                    ),
                ));
            }
            Ok(t.to_dtype(DType::F32)?.contiguous()?.detach())
        })?;
        if !plain.is_empty() {
            let mut names: Vec<_> = plain.into_keys().collect();
            names.sort();
            return Err(Error::invalid(
                "Bert",
                format!("unexpected tensors in the checkpoint: {}", names.join(", ")),
            ));
        }
        Ok(m)
    }

    /// Build the modules, asking `param` for every weight by its full name and shape.
    fn build(
        config: BertConfig,
        with_pooler: bool,
        mut param: impl FnMut(&str, &[usize]) -> Result<Tensor>,
    ) -> Result<Self> {
        config.validate()?;
        let c = &config;
        let act = Activation::parse(&c.hidden_act).expect("validated above");
        let (d, ff) = (c.hidden_size, c.intermediate_size);
        let mut get = |name: String, shape: &[usize]| -> Result<Tensor> {
            Ok(param(&name, shape)?.requires_grad_(true))
        };
        let embeddings = BertEmbeddings {
            word_embeddings: Embedding {
                weight: get(
                    "embeddings.word_embeddings.weight".into(),
                    &[c.vocab_size, d],
                )?,
            },
            position_embeddings: Embedding {
                weight: get(
                    "embeddings.position_embeddings.weight".into(),
                    &[c.max_position_embeddings, d],
                )?,
            },
            token_type_embeddings: Embedding {
                weight: get(
                    "embeddings.token_type_embeddings.weight".into(),
                    &[c.type_vocab_size, d],
                )?,
            },
            layer_norm: layer_norm(&mut get, "embeddings.LayerNorm", d, c.layer_norm_eps)?,
        };
        let mut layer = Vec::with_capacity(c.num_hidden_layers);
        for i in 0..c.num_hidden_layers {
            let p = format!("encoder.layer.{i}");
            let eps = c.layer_norm_eps;
            layer.push(BertLayer {
                query: linear(&mut get, &format!("{p}.attention.self.query"), d, d)?,
                key: linear(&mut get, &format!("{p}.attention.self.key"), d, d)?,
                value: linear(&mut get, &format!("{p}.attention.self.value"), d, d)?,
                attention_output: linear(&mut get, &format!("{p}.attention.output.dense"), d, d)?,
                attention_norm: layer_norm(
                    &mut get,
                    &format!("{p}.attention.output.LayerNorm"),
                    d,
                    eps,
                )?,
                intermediate: linear(&mut get, &format!("{p}.intermediate.dense"), ff, d)?,
                output: linear(&mut get, &format!("{p}.output.dense"), d, ff)?,
                output_norm: layer_norm(&mut get, &format!("{p}.output.LayerNorm"), d, eps)?,
                heads: c.num_attention_heads,
                act,
            });
        }
        let pooler = if with_pooler {
            Some(BertPooler {
                dense: linear(&mut get, "pooler.dense", d, d)?,
            })
        } else {
            None
        };
        Ok(Self {
            embeddings,
            encoder: BertEncoder { layer },
            pooler,
            max_seq_length: config.max_position_embeddings,
            config,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &BertConfig {
        &self.config
    }

    /// Longest tokenized input [`Bert::embed`] keeps (longer ones are truncated, the special
    /// tokens kept): `max_position_embeddings` unless set (the loader sets sentence-transformers'
    /// `max_seq_length`).
    pub fn max_seq_length(&self) -> usize {
        self.max_seq_length
    }

    /// Set [`Bert::max_seq_length`]; it must lie in `1..=max_position_embeddings`.
    pub fn set_max_seq_length(&mut self, n: usize) -> Result<()> {
        if n == 0 || n > self.config.max_position_embeddings {
            return Err(Error::invalid(
                "Bert",
                format!(
                    "max_seq_length {n} must lie in 1..=max_position_embeddings ({})",
                    self.config.max_position_embeddings
                ),
            ));
        }
        self.max_seq_length = n;
        Ok(())
    }

    /// Last hidden state `[B, T, hidden]` of token ids `[B, T]` (i64). `attention_mask`
    /// `[B, T]` (any dtype; non-zero = a real token, 0 = padding) keeps padding out of every
    /// token's attention; when it has no zeros, attention runs unmasked (the fused kernel).
    /// Masked scores get the lowest f32 rather than −∞, as transformers does, so a sequence
    /// with no real token gives finite (uniform) attention instead of NaN. `token_type_ids`
    /// `[B, T]` default to 0. Hidden states at padding positions are computed like the others
    /// (they attend to the real tokens) and are normally ignored.
    pub fn forward_masked(
        &self,
        ids: &Tensor,
        attention_mask: &Tensor,
        token_type_ids: Option<&Tensor>,
    ) -> Result<Tensor> {
        let c = &self.config;
        if ids.rank() != 2
            || ids.dtype() != DType::I64
            || ids.dims()[1] == 0
            || ids.dims()[1] > c.max_position_embeddings
        {
            return Err(Error::bad_shape(
                "Bert",
                ids.dims(),
                format!(
                    "expected i64 token ids [batch, seq] with 1 <= seq <= \
                     max_position_embeddings ({}), got {:?}",
                    c.max_position_embeddings,
                    ids.dtype()
                ),
            ));
        }
        for (what, t) in [
            ("attention_mask", Some(attention_mask)),
            ("token_type_ids", token_type_ids),
        ] {
            if let Some(t) = t.filter(|t| t.dims() != ids.dims()) {
                return Err(Error::bad_shape(
                    "Bert",
                    t.dims(),
                    format!("{what} must be shaped like the ids {:?}", ids.dims()),
                ));
            }
        }
        let mask = additive_mask(attention_mask)?;
        let mut x = self.embeddings.embed(ids, token_type_ids)?;
        for l in &self.encoder.layer {
            x = l.forward_with(&x, mask.as_ref())?;
        }
        Ok(x)
    }

    /// transformers' `pooler_output` of a last hidden state: `tanh(dense(hidden[:, 0]))`,
    /// `[B, hidden]`. Errors when the checkpoint had no pooler.
    pub fn pooled_output(&self, hidden: &Tensor) -> Result<Tensor> {
        match &self.pooler {
            Some(p) => p.forward(hidden),
            None => Err(Error::invalid(
                "Bert",
                "this model has no pooler (the checkpoint has no pooler.dense.*)",
            )),
        }
    }

    /// Sentence embeddings `[N, hidden]` of `sentences` as sentence-transformers computes
    /// them: tokenized with `tok` in batches of `batch_size` (longest sentences first, each
    /// batch padded to its longest, truncated to [`Bert::max_seq_length`] tokens), the last
    /// hidden state averaged over the real tokens ([`mean_pool`]), then scaled to unit length
    /// ([`l2_normalize`]). Rows follow the order of `sentences`.
    pub fn embed(&self, tok: &Tokenizer, sentences: &[&str], batch_size: usize) -> Result<Tensor> {
        let d = self.config.hidden_size;
        if batch_size == 0 {
            return Err(Error::invalid(
                "Bert::embed",
                "batch_size must be at least 1",
            ));
        }
        if sentences.is_empty() {
            return Ok(Tensor::zeros([0, d]));
        }
        let prepared = self.batch_tokenizer(tok)?;
        // Longest first (by characters, as sentence-transformers): batches of similar lengths
        // carry little padding.
        let mut order: Vec<usize> = (0..sentences.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(sentences[i].chars().count()));
        let mut out = vec![0f32; sentences.len() * d];
        no_grad(|| -> Result<()> {
            for chunk in order.chunks(batch_size) {
                let batch: Vec<&str> = chunk.iter().map(|&i| sentences[i]).collect();
                let inputs = encode_batch(&prepared, &batch)?;
                let types = inputs.token_type_ids.to_vec::<i64>()?;
                let types = types
                    .iter()
                    .any(|&t| t != 0)
                    .then_some(&inputs.token_type_ids);
                let hidden =
                    self.forward_masked(&inputs.input_ids, &inputs.attention_mask, types)?;
                let e = l2_normalize(&mean_pool(&hidden, &inputs.attention_mask)?)?;
                let v = e.to_vec::<f32>()?;
                for (row, &i) in chunk.iter().enumerate() {
                    out[i * d..(i + 1) * d].copy_from_slice(&v[row * d..(row + 1) * d]);
                }
            }
            Ok(())
        })?;
        Tensor::from_vec(out, [sentences.len(), d])
    }

    /// The model inputs of `sentences` as [`Bert::embed`] builds them (special tokens added,
    /// truncated to [`Bert::max_seq_length`], padded to the longest).
    pub fn tokenize(&self, tok: &Tokenizer, sentences: &[&str]) -> Result<BertInputs> {
        encode_batch(&self.batch_tokenizer(tok)?, sentences)
    }

    /// A copy of `tok`'s tokenizer that truncates to `max_seq_length` and pads a batch to its
    /// longest sequence, whatever `tokenizer.json` says (all-MiniLM-L6-v2's pads and
    /// truncates to a fixed 128; sentence-transformers overrides both the same way).
    fn batch_tokenizer(&self, tok: &Tokenizer) -> Result<tokenizers::Tokenizer> {
        let mut t = tok.inner().clone();
        let pad_id = self.config.pad_token_id as u32;
        let padding = t.get_padding().cloned().unwrap_or_else(|| PaddingParams {
            pad_id,
            pad_token: tok.id_to_token(pad_id).unwrap_or_else(|| "[PAD]".into()),
            ..Default::default()
        });
        t.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::BatchLongest,
            direction: PaddingDirection::Right,
            pad_to_multiple_of: None,
            ..padding
        }));
        t.with_truncation(Some(TruncationParams {
            max_length: self.max_seq_length,
            ..Default::default()
        }))
        .map_err(|e| {
            Error::invalid(
                "Bert::embed",
                format!("cannot truncate to {} tokens: {e}", self.max_seq_length),
            )
        })?;
        Ok(t)
    }
}

impl Module for Bert {
    /// Token ids `[batch, seq]` (i64, no padding, token type 0) → last hidden state
    /// `[batch, seq, hidden]`.
    fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let ones = Tensor::ones_like(ids);
        self.forward_masked(ids, &ones, None)
    }
    fn children(&self) -> Vec<(String, &dyn Module)> {
        let mut v: Vec<(String, &dyn Module)> = vec![
            ("embeddings".into(), &self.embeddings),
            ("encoder".into(), &self.encoder),
        ];
        if let Some(p) = &self.pooler {
            v.push(("pooler".into(), p));
        }
        v
    }
}

/// `get(<p>.weight)` `[out, inp]` and `get(<p>.bias)` `[out]`.
fn linear(
    get: &mut dyn FnMut(String, &[usize]) -> Result<Tensor>,
    p: &str,
    out: usize,
    inp: usize,
) -> Result<Linear> {
    Ok(Linear::from_parts(
        get(format!("{p}.weight"), &[out, inp])?,
        Some(get(format!("{p}.bias"), &[out])?),
    ))
}

/// A LayerNorm over the last `d` features from `get(<p>.weight)` and `get(<p>.bias)`.
fn layer_norm(
    get: &mut dyn FnMut(String, &[usize]) -> Result<Tensor>,
    p: &str,
    d: usize,
    eps: f64,
) -> Result<LayerNorm> {
    Ok(LayerNorm {
        weight: Some(get(format!("{p}.weight"), &[d])?),
        bias: Some(get(format!("{p}.bias"), &[d])?),
        normalized_shape: vec![d],
        eps,
    })
}

/// The additive attention mask `[B, 1, 1, T]` of an attention mask `[B, T]` (0 for real
/// tokens, the lowest f32 for padding), or `None` when there is no padding.
fn additive_mask(attention_mask: &Tensor) -> Result<Option<Tensor>> {
    let (b, t) = (attention_mask.dims()[0], attention_mask.dims()[1]);
    let keep = attention_mask.to_dtype(DType::F32)?.to_vec::<f32>()?;
    if keep.iter().all(|&m| m != 0.0) {
        return Ok(None);
    }
    let add: Vec<f32> = keep
        .iter()
        .map(|&m| if m != 0.0 { 0.0 } else { f32::MIN })
        .collect();
    Ok(Some(Tensor::from_vec(add, [b, 1, 1, t])?))
}

/// Token ids, attention mask and token types of a batch, `[B, T]` i64 each, padded on the
/// right to the longest sequence.
#[derive(Clone, Debug)]
pub struct BertInputs {
    /// Token ids.
    pub input_ids: Tensor,
    /// 1 for real tokens, 0 for padding.
    pub attention_mask: Tensor,
    /// Token types (segments).
    pub token_type_ids: Tensor,
}

/// Encode `sentences` with a tokenizer prepared by [`Bert::batch_tokenizer`].
fn encode_batch(tok: &tokenizers::Tokenizer, sentences: &[&str]) -> Result<BertInputs> {
    let encodings = tok
        .encode_batch(sentences.to_vec(), true)
        .map_err(|e| Error::invalid("Bert::embed", format!("tokenizing: {e}")))?;
    let b = encodings.len();
    let t = encodings.first().map_or(0, |e| e.len());
    let mut ids = Vec::with_capacity(b * t);
    let mut mask = Vec::with_capacity(b * t);
    let mut types = Vec::with_capacity(b * t);
    for e in &encodings {
        if e.len() != t {
            return Err(Error::invalid(
                "Bert::embed",
                "the tokenizer did not pad the batch to one length",
            ));
        }
        ids.extend(e.get_ids().iter().map(|&v| v as i64));
        mask.extend(e.get_attention_mask().iter().map(|&v| v as i64));
        types.extend(e.get_type_ids().iter().map(|&v| v as i64));
    }
    Ok(BertInputs {
        input_ids: Tensor::from_vec(ids, [b, t])?,
        attention_mask: Tensor::from_vec(mask, [b, t])?,
        token_type_ids: Tensor::from_vec(types, [b, t])?,
    })
}

/// Mean of `hidden` `[B, T, D]` over the positions where `attention_mask` `[B, T]` is
/// non-zero, `[B, D]` (sentence-transformers' mean pooling: the count is clamped at 1e-9, so
/// an all-padding row gives zeros).
pub fn mean_pool(hidden: &Tensor, attention_mask: &Tensor) -> Result<Tensor> {
    if hidden.rank() != 3 || attention_mask.dims() != &hidden.dims()[..2] {
        return Err(Error::shape_mismatch(
            "mean_pool",
            hidden.dims(),
            attention_mask.dims(),
        ));
    }
    let m = attention_mask
        .ne(&Tensor::zeros_with(
            Vec::<usize>::new(),
            attention_mask.dtype(),
        ))?
        .to_dtype(hidden.dtype())?
        .unsqueeze(-1)?;
    let sum = hidden.mul(&m)?.sum_dim(&[1], false)?;
    let count = m.sum_dim(&[1], false)?.clamp(Some(1e-9), None)?;
    sum.div(&count)
}

/// Each row of `x` (along the last dim) divided by its Euclidean norm, clamped at 1e-12
/// (PyTorch's `F.normalize(x, p=2, dim=-1)`).
pub fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let norm = x
        .square()?
        .sum_dim(&[-1], true)?
        .sqrt()?
        .clamp(Some(1e-12), None)?;
    x.div(&norm)
}

/// What sentence-transformers' pooling config (`1_Pooling/config.json`) says.
#[derive(Deserialize)]
#[serde(default)]
struct PoolingConfig {
    pooling_mode_cls_token: bool,
    pooling_mode_mean_tokens: bool,
    pooling_mode_max_tokens: bool,
    pooling_mode_mean_sqrt_len_tokens: bool,
}

impl Default for PoolingConfig {
    fn default() -> Self {
        Self {
            pooling_mode_cls_token: false,
            pooling_mode_mean_tokens: true,
            pooling_mode_max_tokens: false,
            pooling_mode_mean_sqrt_len_tokens: false,
        }
    }
}

/// Read and parse a JSON file, errors naming it.
fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> std::result::Result<T, FormatError> {
    let bytes = std::fs::read(path).map_err(|source| FormatError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_slice(&bytes).map_err(|e| FormatError::invalid(path, e.to_string()))
}

/// A sentence-transformers BERT model and its tokenizer from a folder such as
/// all-MiniLM-L6-v2's: `config.json` ([`BertConfig`]), `model.safetensors` (transformers'
/// names, with or without `bert.`; the pooler is loaded when present, unused by
/// [`Bert::embed`]), `tokenizer.json`, and, when present, `sentence_bert_config.json`
/// (`max_seq_length` becomes [`Bert::max_seq_length`]; without it the truncation length of
/// `tokenizer.json`, else `max_position_embeddings`) and `1_Pooling/config.json` (only mean
/// pooling is supported). Errors name the file.
pub fn load_sentence_encoder(
    dir: impl AsRef<Path>,
) -> std::result::Result<(Bert, Tokenizer), FormatError> {
    let dir = dir.as_ref();
    let config_path = dir.join("config.json");
    let bytes = std::fs::read(&config_path).map_err(|source| FormatError::Io {
        path: config_path.clone(),
        source,
    })?;
    let config = BertConfig::from_json(&bytes, &config_path)?;

    let pooling_path = dir.join("1_Pooling").join("config.json");
    if pooling_path.exists() {
        let p: PoolingConfig = read_json(&pooling_path)?;
        if !p.pooling_mode_mean_tokens
            || p.pooling_mode_cls_token
            || p.pooling_mode_max_tokens
            || p.pooling_mode_mean_sqrt_len_tokens
        {
            return Err(FormatError::invalid(
                &pooling_path,
                "only mean pooling (pooling_mode_mean_tokens alone) is supported",
            ));
        }
    }

    let tok_path = dir.join("tokenizer.json");
    let tok = Tokenizer::from_file(&tok_path)
        .map_err(|e| FormatError::invalid(&tok_path, e.to_string()))?;

    let weights_path = dir.join("model.safetensors");
    let (tensors, _) =
        nerve_nn::checkpoint::load_safetensors(&weights_path).map_err(|e| match e {
            nerve_nn::CheckpointError::Io { path, source } => FormatError::Io { path, source },
            e => FormatError::invalid(&weights_path, e.to_string()),
        })?;
    let mut bert = Bert::from_tensors(config, tensors)
        .map_err(|e| FormatError::invalid(&weights_path, e.to_string()))?;

    let st_path = dir.join("sentence_bert_config.json");
    let max_len = if st_path.exists() {
        #[derive(Deserialize)]
        struct StConfig {
            max_seq_length: Option<usize>,
        }
        let st: StConfig = read_json(&st_path)?;
        st.max_seq_length.map(|n| (n, st_path))
    } else {
        tok.inner()
            .get_truncation()
            .map(|t| (t.max_length, tok_path))
    };
    if let Some((n, path)) = max_len {
        let n = n.min(bert.config.max_position_embeddings);
        bert.set_max_seq_length(n)
            .map_err(|e| FormatError::invalid(path, e.to_string()))?;
    }
    Ok((bert, tok))
}

/// A sentence classifier: a BERT encoder, mean pooling over the attention mask (the
/// sentence-transformers embedding, before normalisation), dropout and a Linear head.
/// Parameters are named like transformers' `BertForSequenceClassification`
/// (`bert.encoder.layer.0.attention.self.query.weight`, `classifier.weight`), so PEFT's
/// target names (`query`, `value`) apply.
pub struct BertClassifier {
    /// The encoder.
    pub bert: Bert,
    /// Dropout before the head.
    pub dropout: nerve_nn::Dropout,
    /// `[num_labels, hidden]` head.
    pub classifier: Linear,
}

impl BertClassifier {
    /// `bert` with a fresh head of `num_labels` outputs (PyTorch's default Linear
    /// initialisation) and dropout `p` before it.
    pub fn new(bert: Bert, num_labels: usize, p: f64) -> Result<Self> {
        let classifier = Linear::new(bert.config().hidden_size, num_labels, true)?;
        Ok(Self {
            bert,
            dropout: nerve_nn::Dropout::new(p),
            classifier,
        })
    }

    /// Class logits `[B, num_labels]` of tokenized sentences.
    pub fn forward_inputs(&self, inputs: &BertInputs) -> Result<Tensor> {
        let hidden = self
            .bert
            .forward_masked(&inputs.input_ids, &inputs.attention_mask, None)?;
        let pooled = mean_pool(&hidden, &inputs.attention_mask)?;
        self.classifier.forward(&self.dropout.forward(&pooled)?)
    }
}

impl Module for BertClassifier {
    /// Logits of token ids `[B, T]` without padding (use [`BertClassifier::forward_inputs`]
    /// for padded batches).
    fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let inputs = BertInputs {
            input_ids: ids.clone(),
            attention_mask: ids.ones_like(),
            token_type_ids: ids.zeros_like(),
        };
        self.forward_inputs(&inputs)
    }
    fn children(&self) -> Vec<(String, &dyn Module)> {
        vec![
            ("bert".into(), &self.bert as &dyn Module),
            ("dropout".into(), &self.dropout),
            ("classifier".into(), &self.classifier),
        ]
    }
    fn describe(&self) -> String {
        "BertClassifier".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nerve_nn::ModuleExt;

    fn tiny() -> BertConfig {
        BertConfig {
            vocab_size: 50,
            hidden_size: 16,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            intermediate_size: 24,
            max_position_embeddings: 12,
            ..Default::default()
        }
    }

    #[test]
    fn parameter_names_are_transformers() {
        let m = Bert::new(tiny()).unwrap();
        let names: Vec<String> = m.named_parameters().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names.len(), 5 + 2 * 16 + 2);
        for want in [
            "embeddings.word_embeddings.weight",
            "embeddings.LayerNorm.bias",
            "encoder.layer.0.attention.self.query.weight",
            "encoder.layer.1.attention.output.LayerNorm.weight",
            "encoder.layer.1.intermediate.dense.bias",
            "encoder.layer.1.output.dense.weight",
            "pooler.dense.weight",
        ] {
            assert!(names.iter().any(|n| n == want), "{want} missing: {names:?}");
        }
    }

    #[test]
    fn config_errors_name_the_fields() {
        let c = BertConfig {
            hidden_size: 30,
            ..tiny()
        };
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("hidden_size (30)") && e.contains("num_attention_heads (4)"),
            "{e}"
        );
        let c = BertConfig {
            hidden_act: "mish".into(),
            ..tiny()
        };
        assert!(c.validate().unwrap_err().to_string().contains("hidden_act"));
        assert!(Bert::new(BertConfig {
            num_attention_heads: 0,
            ..tiny()
        })
        .is_err());
    }

    #[test]
    fn config_json_ignores_unknown_keys() {
        let c: BertConfig = serde_json::from_str(
            r#"{"hidden_size": 384, "num_attention_heads": 12, "hidden_dropout_prob": 0.1,
                "architectures": ["BertModel"], "num_hidden_layers": 6}"#,
        )
        .unwrap();
        assert_eq!(
            (c.hidden_size, c.num_hidden_layers, c.vocab_size),
            (384, 6, 30522)
        );
        assert_eq!(c.hidden_act, "gelu");
    }

    #[test]
    fn mean_pool_and_normalize() {
        let h = Tensor::from_vec(vec![1f32, 2., 3., 4., 100., 100.], [1, 3, 2]).unwrap();
        let m = Tensor::from_vec(vec![1i64, 1, 0], [1, 3]).unwrap();
        let p = mean_pool(&h, &m).unwrap();
        assert_eq!(p.to_vec::<f32>().unwrap(), vec![2., 3.]);
        let n = l2_normalize(&Tensor::from_vec(vec![3f32, 4., 0., 0.], [2, 2]).unwrap()).unwrap();
        assert_eq!(n.to_vec::<f32>().unwrap(), vec![0.6, 0.8, 0., 0.]);
    }
}
