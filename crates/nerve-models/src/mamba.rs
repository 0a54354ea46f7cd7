//! A Mamba language model (Gu & Dao, 2023): token embedding, a stack of pre-norm residual
//! Mamba layers, a final RMSNorm and an output projection tied to the embedding, with the
//! structure and parameter names of `mamba_ssm`'s `MambaLMHeadModel` (`backbone.embedding`,
//! `backbone.layers.{i}.mixer.*`, `backbone.layers.{i}.norm`, `backbone.norm_f`), so its
//! checkpoints (e.g. `state-spaces/mamba-130m`, with `pad_vocab_size_multiple: 8`) load by
//! name. The checkpoint's `lm_head.weight` is the embedding (tied) and has no name of its
//! own here: drop it or load non-strictly.
//!
//! Decoding is recurrent: each layer keeps a [`MambaCache`] (the convolution's last inputs
//! and the SSM state), so a new token costs O(1) whatever the length so far.

use nerve_core::{no_grad, Error, Result, Tensor};
use nerve_nn::{Embedding, MambaCache, MambaLayer, MambaOptions, Module, RmsNorm};
use serde::{Deserialize, Serialize};

use crate::lm::{check_prompt, last_logits, pick, LanguageModel};

/// Sizes of a [`MambaLm`]. The default is the `mamba` benchmark workload's model. Field
/// names are mamba_ssm's (`n_layer` and Hugging Face's `hidden_size`, `num_hidden_layers`,
/// `state_size`, `conv_kernel`, `time_step_rank`, `layer_norm_epsilon` are accepted as
/// aliases); absent fields take the defaults, and the reference's switches for its fused
/// kernels (`fused_add_norm`, `residual_in_fp32`, …) are ignored, as they do not change the
/// function computed.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct MambaConfig {
    /// Tokens in the vocabulary (65).
    pub vocab_size: usize,
    /// Model width (128).
    #[serde(alias = "hidden_size")]
    pub d_model: usize,
    /// Mamba layers (4).
    #[serde(alias = "n_layer", alias = "num_hidden_layers")]
    pub n_layers: usize,
    /// SSM state size per channel (16).
    #[serde(alias = "state_size")]
    pub d_state: usize,
    /// Inner width as a multiple of `d_model` (2).
    pub expand: usize,
    /// Width of the causal convolution (4).
    #[serde(alias = "conv_kernel")]
    pub d_conv: usize,
    /// Rank of the `Δ` projection; `None`: `ceil(d_model / 16)`.
    #[serde(alias = "time_step_rank")]
    pub dt_rank: Option<usize>,
    /// RMSNorm epsilon (1e-5).
    #[serde(alias = "layer_norm_epsilon")]
    pub norm_epsilon: f64,
    /// The embedding has `vocab_size` rounded up to a multiple of this (1; mamba_ssm's
    /// checkpoints use 8).
    pub pad_vocab_size_multiple: usize,
}

impl Default for MambaConfig {
    fn default() -> Self {
        Self {
            vocab_size: 65,
            d_model: 128,
            n_layers: 4,
            d_state: 16,
            expand: 2,
            d_conv: 4,
            dt_rank: None,
            norm_epsilon: 1e-5,
            pad_vocab_size_multiple: 1,
        }
    }
}

impl MambaConfig {
    /// Rows of the embedding: `vocab_size` rounded up to `pad_vocab_size_multiple`.
    pub fn padded_vocab_size(&self) -> usize {
        self.vocab_size
            .div_ceil(self.pad_vocab_size_multiple.max(1))
            * self.pad_vocab_size_multiple.max(1)
    }

    /// The options of each layer's mixer.
    pub fn block_options(&self) -> MambaOptions {
        MambaOptions::new(self.d_model)
            .with_d_state(self.d_state)
            .with_d_conv(self.d_conv)
            .with_expand(self.expand)
            .with_dt_rank(self.dt_rank)
    }

    /// Refuse zero sizes and a bad epsilon, naming the fields ([`MambaLm::new`] calls it).
    pub fn validate(&self) -> Result<()> {
        let zero: Vec<&str> = [
            ("vocab_size", self.vocab_size),
            ("d_model", self.d_model),
            ("n_layers", self.n_layers),
            ("d_state", self.d_state),
            ("expand", self.expand),
            ("d_conv", self.d_conv),
            ("dt_rank", self.dt_rank.unwrap_or(1)),
            ("pad_vocab_size_multiple", self.pad_vocab_size_multiple),
        ]
        .iter()
        .filter(|(_, v)| *v == 0)
        .map(|(n, _)| *n)
        .collect();
        if !zero.is_empty() {
            return Err(Error::invalid(
                "MambaConfig",
                format!("{} must be at least 1", zero.join(", ")),
            ));
        }
        let m = self.pad_vocab_size_multiple;
        if self.vocab_size.div_ceil(m).checked_mul(m).is_none() {
            return Err(Error::invalid(
                "MambaConfig",
                format!(
                    "vocab_size ({}) rounded up to pad_vocab_size_multiple ({m}) overflows",
                    self.vocab_size
                ),
            ));
        }
        let inner = [self.expand, self.d_model];
        let params = crate::parameters_at_least(&[
            &[self.vocab_size, self.d_model],
            // in_proj (2 × inner), out_proj (inner), A (inner × d_state) per layer.
            &[self.n_layers, 3, self.expand, self.d_model, self.d_model],
            &[self.n_layers, self.d_state, inner[0], inner[1]],
            &[self.n_layers, self.d_conv, inner[0], inner[1]],
        ]);
        crate::check_size(
            "MambaConfig",
            params,
            "vocab_size, d_model, n_layers, expand, d_state and d_conv",
        )?;
        if self.norm_epsilon.is_nan() || self.norm_epsilon < 0.0 {
            return Err(Error::invalid(
                "MambaConfig",
                format!("norm_epsilon ({}) must be >= 0", self.norm_epsilon),
            ));
        }
        Ok(())
    }
}

/// The backbone (mamba_ssm's `MixerModel`): ids `[B, L]` → hidden states `[B, L, d_model]`
/// after the final norm. Parameters `embedding.weight`, `layers.{i}.*`, `norm_f.weight`.
pub struct MixerModel {
    /// Token embedding (also the output projection of [`MambaLm`]).
    pub embedding: Embedding,
    /// The layers.
    pub layers: Vec<MambaLayer>,
    /// Final RMSNorm.
    pub norm_f: RmsNorm,
}

impl Module for MixerModel {
    fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let mut x = self.embedding.forward(ids)?;
        for layer in &self.layers {
            x = layer.forward(&x)?;
        }
        self.norm_f.forward(&x)
    }
    fn children(&self) -> Vec<(String, &dyn Module)> {
        let mut v: Vec<(String, &dyn Module)> = vec![("embedding".into(), &self.embedding)];
        for (i, l) in self.layers.iter().enumerate() {
            v.push((format!("layers.{i}"), l));
        }
        v.push(("norm_f".into(), &self.norm_f));
        v
    }
    fn describe(&self) -> String {
        "MixerModel".into()
    }
}

/// The Mamba language model: [`MixerModel`] under `backbone`, logits by the transposed
/// embedding (tied `lm_head`).
pub struct MambaLm {
    /// Embedding, layers, final norm.
    pub backbone: MixerModel,
    config: MambaConfig,
}

impl MambaLm {
    /// A model with mamba_ssm's initialisation: the embedding `N(0, 0.02²)`, each mixer as
    /// [`nerve_nn::MambaBlock::new`], and each `out_proj.weight` scaled by
    /// `1/sqrt(n_layers)` (its prenorm-residual rescaling). Inconsistent sizes are refused,
    /// naming the fields.
    pub fn new(config: MambaConfig) -> Result<Self> {
        config.validate()?;
        let embedding = Embedding::new(config.padded_vocab_size(), config.d_model)?;
        nerve_nn::init::normal_(&embedding.weight, 0.0, 0.02)?;
        let layers = (0..config.n_layers)
            .map(|_| {
                let l = MambaLayer::new(config.block_options(), config.norm_epsilon)?;
                let w = &l.mixer.out_proj.weight;
                w.copy_(&w.mul_scalar(1.0 / (config.n_layers as f64).sqrt())?)?;
                Ok(l)
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            backbone: MixerModel {
                embedding,
                layers,
                norm_f: RmsNorm::new(&[config.d_model], config.norm_epsilon),
            },
            config,
        })
    }

    /// The configuration.
    pub fn config(&self) -> MambaConfig {
        self.config
    }

    /// Zero decoding states for `batch` sequences, one per layer.
    pub fn new_caches(&self, batch: usize) -> Vec<MambaCache> {
        self.backbone
            .layers
            .iter()
            .map(|l| l.mixer.new_cache(batch))
            .collect()
    }

    /// Hidden states `[M, d_model]` → logits `[M, padded vocab]`.
    fn logits(&self, h: &Tensor) -> Result<Tensor> {
        h.matmul(&self.backbone.embedding.weight.t()?)
    }

    /// Logits `[B, padded vocab]` of one new token per sequence, `ids` `[B]` (i64), advancing
    /// `caches` (one per layer, from [`MambaLm::new_caches`]): recurrent decoding, O(1) per
    /// token. Not differentiable.
    pub fn step(&self, ids: &Tensor, caches: &mut [MambaCache]) -> Result<Tensor> {
        if caches.len() != self.backbone.layers.len() {
            return Err(Error::invalid(
                "MambaLm",
                format!(
                    "{} caches for {} layers",
                    caches.len(),
                    self.backbone.layers.len()
                ),
            ));
        }
        if ids.rank() != 1 {
            return Err(Error::bad_shape(
                "MambaLm",
                ids.dims(),
                "step expects ids [batch]",
            ));
        }
        no_grad(|| {
            let mut x = self.backbone.embedding.forward(ids)?;
            for (layer, cache) in self.backbone.layers.iter().zip(caches.iter_mut()) {
                x = layer.step(&x, cache)?;
            }
            self.logits(&self.backbone.norm_f.forward(&x)?)
        })
    }

    /// Continue `prompt` by `n` tokens with the recurrent state (see
    /// [`LanguageModel::generate`]): the prompt is fed token by token, then each new token
    /// costs one step, whatever the length so far. Tokens are drawn from the real
    /// vocabulary, never the padding rows.
    pub fn generate(
        &self,
        prompt: &[i64],
        n: usize,
        temperature: f64,
        top_k: usize,
    ) -> Result<Vec<i64>> {
        self.generate_with(prompt, n, temperature, top_k, &mut |_| Ok(()))
    }

    /// [`MambaLm::generate`], calling `on_token` with each new token.
    pub fn generate_with(
        &self,
        prompt: &[i64],
        n: usize,
        temperature: f64,
        top_k: usize,
        on_token: &mut dyn FnMut(i64) -> Result<()>,
    ) -> Result<Vec<i64>> {
        check_prompt(prompt, self.config.vocab_size)?;
        no_grad(|| {
            let mut caches = self.new_caches(1);
            let mut logits = None;
            for &t in prompt {
                logits = Some(self.step(&Tensor::from_vec(vec![t], [1])?, &mut caches)?);
            }
            let mut out = prompt.to_vec();
            for i in 0..n {
                let row = last_logits(logits.as_ref().expect("the prompt is not empty"))?;
                let tok = pick(&row[..self.config.vocab_size], temperature, top_k);
                out.push(tok);
                on_token(tok)?;
                if i + 1 < n {
                    logits = Some(self.step(&Tensor::from_vec(vec![tok], [1])?, &mut caches)?);
                }
            }
            Ok(out)
        })
    }
}

impl Module for MambaLm {
    /// Token ids `[batch, seq]` (i64) → logits `[batch, seq, padded vocab]`.
    fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        if ids.rank() != 2 {
            return Err(Error::bad_shape(
                "MambaLm",
                ids.dims(),
                "expected token ids [batch, seq]",
            ));
        }
        let (b, l) = (ids.dims()[0] as isize, ids.dims()[1] as isize);
        let h = self.backbone.forward(ids)?;
        self.logits(&h.reshape(&[b * l, self.config.d_model as isize])?)?
            .reshape(&[b, l, -1])
    }
    fn children(&self) -> Vec<(String, &dyn Module)> {
        vec![("backbone".into(), &self.backbone)]
    }
    fn describe(&self) -> String {
        format!("MambaLm({:?})", self.config)
    }
}

impl LanguageModel for MambaLm {
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
        MambaLm::generate_with(self, prompt, n, temperature, top_k, on_token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Found by the audit (the input crashed the config_json fuzz target):
    // `padded_vocab_size` of a config read from a file overflowed (a panic) after `validate`
    // had accepted it.
    #[test]
    fn a_vocabulary_whose_padding_overflows_is_refused() {
        let c = MambaConfig {
            vocab_size: usize::MAX,
            pad_vocab_size_multiple: 8,
            ..MambaConfig::default()
        };
        let e = c.validate().unwrap_err().to_string();
        assert!(
            e.contains("vocab_size") && e.contains("pad_vocab_size_multiple"),
            "{e}"
        );
        let ok = MambaConfig {
            vocab_size: 65,
            pad_vocab_size_multiple: 8,
            ..MambaConfig::default()
        };
        ok.validate().unwrap();
        assert_eq!(ok.padded_vocab_size(), 72);
    }
}
