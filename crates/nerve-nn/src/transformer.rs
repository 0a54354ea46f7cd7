//! Transformer building blocks: the pre- or post-LayerNorm block (self-attention and MLP with
//! residual connections) and positional encodings.

use nerve_core::{Error, Result, Tensor};

use crate::attention::{MhaMasks, MultiheadAttention};
use crate::layers::{Dropout, LayerNorm, Linear, GELU};
use crate::module::Module;

/// Options of a [`TransformerBlock`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BlockOptions {
    /// Model width.
    pub width: usize,
    /// Attention heads (must divide the width).
    pub heads: usize,
    /// MLP hidden width as a multiple of the width (GPT: 4).
    pub mlp_ratio: usize,
    /// LayerNorm before each sub-layer (GPT-2, ViT) instead of after (the original Transformer).
    pub pre_norm: bool,
    /// Causal self-attention (decoders).
    pub causal: bool,
    /// GELU with the tanh approximation (GPT-2) instead of erf.
    pub gelu_tanh: bool,
    /// Dropout on attention probabilities and residual branches.
    pub dropout: f64,
}

impl BlockOptions {
    /// A GPT-style block: pre-LayerNorm, causal, MLP 4×, GELU (tanh), no dropout.
    pub fn gpt(width: usize, heads: usize) -> Self {
        Self {
            width,
            heads,
            mlp_ratio: 4,
            pre_norm: true,
            causal: true,
            gelu_tanh: true,
            dropout: 0.0,
        }
    }
}

/// One Transformer block over `[batch, seq, width]`. Parameter names: `ln_1.*`, `attn.*`
/// (PyTorch `MultiheadAttention` layout), `ln_2.*`, `mlp.fc.*`, `mlp.proj.*`.
pub struct TransformerBlock {
    /// LayerNorm of the attention branch.
    pub ln_1: LayerNorm,
    /// Self-attention.
    pub attn: MultiheadAttention,
    /// LayerNorm of the MLP branch.
    pub ln_2: LayerNorm,
    /// The MLP.
    pub mlp: Mlp,
    drop: Dropout,
    opts: BlockOptions,
}

/// The block's MLP: `fc` (width → ratio·width), GELU, `proj` (back to width).
pub struct Mlp {
    /// Expansion.
    pub fc: Linear,
    /// Projection back.
    pub proj: Linear,
    act: GELU,
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.proj.forward(&self.act.forward(&self.fc.forward(x)?)?)
    }
    fn children(&self) -> Vec<(String, &dyn Module)> {
        vec![("fc".into(), &self.fc), ("proj".into(), &self.proj)]
    }
    fn describe(&self) -> String {
        "Mlp".into()
    }
}

impl TransformerBlock {
    /// A block with PyTorch's default initialisation of each layer.
    pub fn new(o: BlockOptions) -> Result<Self> {
        if o.heads == 0 || !o.width.is_multiple_of(o.heads) {
            return Err(Error::invalid(
                "TransformerBlock",
                format!("width {} must be divisible by heads {}", o.width, o.heads),
            ));
        }
        let mut attn = MultiheadAttention::new(o.width, o.heads, true, true)?;
        attn.dropout = o.dropout;
        Ok(Self {
            ln_1: LayerNorm::new(&[o.width]),
            attn,
            ln_2: LayerNorm::new(&[o.width]),
            mlp: Mlp {
                fc: Linear::new(o.width, o.mlp_ratio * o.width, true)?,
                proj: Linear::new(o.mlp_ratio * o.width, o.width, true)?,
                act: GELU { tanh: o.gelu_tanh },
            },
            drop: Dropout::new(o.dropout),
            opts: o,
        })
    }

    fn attend(&self, x: &Tensor) -> Result<Tensor> {
        let masks = MhaMasks {
            is_causal: self.opts.causal,
            ..Default::default()
        };
        self.drop.forward(&self.attn.attend(x, x, x, &masks)?)
    }
}

impl TransformerBlock {
    /// The block over new tokens `x` `[B, T, W]` with causal attention over `cache` (which
    /// then holds these tokens too): incremental decoding. Pre-LayerNorm blocks only.
    pub fn forward_cached(
        &self,
        x: &Tensor,
        cache: &mut crate::attention::KvCache,
    ) -> Result<Tensor> {
        if !self.opts.pre_norm || !self.opts.causal {
            return Err(Error::invalid(
                "TransformerBlock",
                "cached decoding needs a causal pre-LayerNorm block",
            ));
        }
        let x = x.add(&self.attn.attend_cached(&self.ln_1.forward(x)?, cache)?)?;
        x.add(&self.mlp.forward(&self.ln_2.forward(&x)?)?)
    }
}

impl Module for TransformerBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.opts.pre_norm {
            let x = x.add(&self.attend(&self.ln_1.forward(x)?)?)?;
            x.add(
                &self
                    .drop
                    .forward(&self.mlp.forward(&self.ln_2.forward(&x)?)?)?,
            )
        } else {
            let x = self.ln_1.forward(&x.add(&self.attend(x)?)?)?;
            self.ln_2
                .forward(&x.add(&self.drop.forward(&self.mlp.forward(&x)?)?)?)
        }
    }
    fn children(&self) -> Vec<(String, &dyn Module)> {
        vec![
            ("ln_1".into(), &self.ln_1),
            ("attn".into(), &self.attn),
            ("ln_2".into(), &self.ln_2),
            ("mlp".into(), &self.mlp),
            ("drop".into(), &self.drop),
        ]
    }
    fn describe(&self) -> String {
        format!(
            "TransformerBlock(width={}, heads={}, pre_norm={}, causal={})",
            self.opts.width, self.opts.heads, self.opts.pre_norm, self.opts.causal
        )
    }
}

/// The sinusoidal positional encoding of "Attention Is All You Need": `[len, dim]`, with
/// `sin` in even and `cos` in odd columns.
pub fn sinusoidal_encoding(len: usize, dim: usize) -> Result<Tensor> {
    let mut v = vec![0f32; len * dim];
    for p in 0..len {
        for i in 0..dim {
            let freq = (10000f64).powf(-((i / 2 * 2) as f64) / dim as f64);
            let a = p as f64 * freq;
            v[p * dim + i] = if i % 2 == 0 { a.sin() } else { a.cos() } as f32;
        }
    }
    Tensor::from_vec(v, [len, dim])
}

/// Rotary position embedding (RoPE, GPT-NeoX/Llama "rotate half" layout) of `x`
/// `[..., seq, head_dim]` for positions `offset..offset+seq`. Differentiable.
pub fn apply_rotary(x: &Tensor, offset: usize, base: f64) -> Result<Tensor> {
    let r = x.rank();
    if r < 2 || !x.dims()[r - 1].is_multiple_of(2) {
        return Err(Error::bad_shape(
            "apply_rotary",
            x.dims(),
            "needs [..., seq, even head_dim]",
        ));
    }
    let (seq, d) = (x.dims()[r - 2], x.dims()[r - 1]);
    let half = d / 2;
    // Tables in f64, rounded once to x's dtype.
    let mut cos = vec![0f64; seq * d];
    let mut sin = vec![0f64; seq * d];
    for p in 0..seq {
        for i in 0..half {
            let a = (offset + p) as f64 * base.powf(-2.0 * i as f64 / d as f64);
            for j in [i, i + half] {
                cos[p * d + j] = a.cos();
                sin[p * d + j] = a.sin();
            }
        }
    }
    let cos = Tensor::from_vec(cos, [seq, d])?.to_dtype(x.dtype())?;
    let sin = Tensor::from_vec(sin, [seq, d])?.to_dtype(x.dtype())?;
    // rotate_half(x) = cat(-x2, x1)
    let x1 = x.narrow(-1, 0, half)?;
    let x2 = x.narrow(-1, half, half)?;
    let rot = Tensor::cat(&[&x2.neg()?, &x1], -1)?;
    x.mul(&cos)?.add(&rot.mul(&sin)?)
}
