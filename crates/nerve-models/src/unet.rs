//! A small class-conditional U-Net that predicts the noise of a diffusion model (the DDPM
//! U-Net of Ho et al. 2020, shaped like diffusers' `UNet2DModel`), sized for 28×28 images
//! (MNIST, Fashion-MNIST).
//!
//! The timestep goes through a sinusoidal embedding (the frequencies and sin/cos layout of
//! [`sinusoidal_encoding`]) and an MLP; a class embedding is added to it. Residual blocks
//! take it as a per-channel shift. The resolution halves at each level (28 → 14 → 7) by a
//! stride-2 convolution and doubles back by nearest-neighbour upsampling and a convolution;
//! the up path concatenates the down path's activations (skip connections) along channels.
//! Self-attention runs at the lowest resolution.
//!
//! ```
//! use nerve_core::Tensor;
//! use nerve_models::{UNet, UNetConfig};
//! # fn main() -> nerve_core::Result<()> {
//! let unet = UNet::new(UNetConfig::default())?;
//! let x = Tensor::randn([2, 1, 28, 28]);
//! let t = Tensor::from_vec(vec![10i64, 500], [2])?;
//! let y = Tensor::from_vec(vec![3i64, 7], [2])?;
//! let eps = unet.forward(&x, &t, Some(&y))?;
//! assert_eq!(eps.dims(), &[2, 1, 28, 28]);
//! # Ok(())
//! # }
//! ```
//!
//! [`sinusoidal_encoding`]: nerve_nn::sinusoidal_encoding

use nerve_core::{DType, Error, Result, Tensor};
use nerve_nn::{
    Conv2d, ConvOptions, Dropout, Embedding, GroupNorm, Linear, Module, MultiheadAttention,
};
use serde::{Deserialize, Serialize};

use crate::ddpm::NoisePredictor;

/// Sizes of a [`UNet`]. The default is the MNIST model: 1 channel, 28×28, 32 base channels,
/// levels of 32, 64, 64 channels at 28×28, 14×14, 7×7, one residual block per level,
/// GroupNorm with 8 groups, a 128-wide time embedding, 4-head attention at 7×7, 10 classes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UNetConfig {
    /// Image channels (in and out).
    pub in_channels: usize,
    /// Image height and width (square); divisible by 2^(levels − 1).
    pub sample_size: usize,
    /// Channels of the first level, and width of the sinusoidal timestep embedding.
    pub base_channels: usize,
    /// Channels of each level as multiples of `base_channels`; one level per entry, each
    /// after the first at half the resolution of the one before.
    pub channel_mult: Vec<usize>,
    /// Residual blocks per level on the way down (the way up has one more per level).
    pub num_res_blocks: usize,
    /// GroupNorm groups; divides every level's channels.
    pub norm_groups: usize,
    /// Width of the time (and class) embedding.
    pub time_embed_dim: usize,
    /// Self-attention at the lowest resolution (after each residual block of the lowest
    /// level, down and up, and in the middle block).
    pub attention: bool,
    /// Attention heads; divides the lowest level's channels.
    pub attention_heads: usize,
    /// Classes of the class conditioning (`None`: unconditional). The embedding has one more
    /// row, the "null" class `num_classes`, used when no label is given (classifier-free
    /// guidance).
    pub num_classes: Option<usize>,
    /// Dropout inside the residual blocks (in training).
    pub dropout: f64,
}

impl Default for UNetConfig {
    fn default() -> Self {
        Self {
            in_channels: 1,
            sample_size: 28,
            base_channels: 32,
            channel_mult: vec![1, 2, 2],
            num_res_blocks: 1,
            norm_groups: 8,
            time_embed_dim: 128,
            attention: true,
            attention_heads: 4,
            num_classes: Some(10),
            dropout: 0.0,
        }
    }
}

impl UNetConfig {
    /// Refuse inconsistent sizes, naming the fields.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| Err(Error::invalid("UNetConfig", msg));
        if self.in_channels == 0 || self.sample_size == 0 || self.base_channels == 0 {
            return bad("in_channels, sample_size and base_channels must be at least 1".into());
        }
        if self.channel_mult.is_empty() || self.channel_mult.contains(&0) {
            return bad(format!(
                "channel_mult ({:?}) needs at least one level and no zero entry",
                self.channel_mult
            ));
        }
        if self.num_res_blocks == 0 || self.time_embed_dim == 0 {
            return bad("num_res_blocks and time_embed_dim must be at least 1".into());
        }
        // Each level halves the image: more levels than a usize has bits cannot divide it.
        let scale = u32::try_from(self.channel_mult.len() - 1)
            .ok()
            .and_then(|levels| 1usize.checked_shl(levels));
        if !scale.is_some_and(|scale| self.sample_size.is_multiple_of(scale)) {
            let scale = match scale {
                Some(s) => s.to_string(),
                None => "more than usize::MAX".into(),
            };
            return bad(format!(
                "sample_size ({}) must be divisible by 2^(levels - 1) = {scale} for the {} \
                 levels of channel_mult",
                self.sample_size,
                self.channel_mult.len()
            ));
        }
        for &m in &self.channel_mult {
            let Some(c) = self.base_channels.checked_mul(m) else {
                return bad(format!(
                    "base_channels ({}) × channel_mult entry {m} overflows",
                    self.base_channels
                ));
            };
            if self.norm_groups == 0 || !c.is_multiple_of(self.norm_groups) {
                return bad(format!(
                    "norm_groups ({}) must divide every level's channels: base_channels ({}) \
                     × channel_mult entry {m} = {c}",
                    self.norm_groups, self.base_channels
                ));
            }
        }
        // Two 3×3 convolutions in each residual block of each level (down path only).
        let mut terms: Vec<Vec<usize>> = self
            .channel_mult
            .iter()
            .map(|&m| {
                vec![
                    self.num_res_blocks,
                    18,
                    self.base_channels * m,
                    self.base_channels * m,
                ]
            })
            .collect();
        terms.push(vec![self.time_embed_dim, self.time_embed_dim]);
        let terms: Vec<&[usize]> = terms.iter().map(Vec::as_slice).collect();
        crate::check_size(
            "UNetConfig",
            crate::parameters_at_least(&terms),
            "base_channels, channel_mult, num_res_blocks and time_embed_dim",
        )?;
        let low = self.level_channels(self.channel_mult.len() - 1);
        if self.attention
            && (self.attention_heads == 0 || !low.is_multiple_of(self.attention_heads))
        {
            return bad(format!(
                "attention_heads ({}) must divide the lowest level's {low} channels",
                self.attention_heads
            ));
        }
        if self.num_classes == Some(0) {
            return bad("num_classes must be at least 1 (or None)".into());
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return bad(format!("dropout ({}) must be in [0, 1)", self.dropout));
        }
        Ok(())
    }

    /// Channels of level `i`.
    fn level_channels(&self, i: usize) -> usize {
        self.base_channels * self.channel_mult[i]
    }
}

/// A 3×3 convolution, stride `stride`, padding 1: keeps the size (stride 1) or halves it,
/// rounding up (stride 2).
fn conv3x3(cin: usize, cout: usize, stride: usize) -> Result<Conv2d> {
    Conv2d::new(
        cin,
        cout,
        3,
        ConvOptions::default().stride(stride).padding(1),
    )
}

/// The sinusoidal embedding `[B, dim]` (f32) of timesteps `t` `[B]` (any dtype): the
/// frequencies and interleaved sin/cos columns of [`nerve_nn::sinusoidal_encoding`], so
/// integer `t` gives that table's row `t`. Not differentiable (timesteps are data).
pub fn timestep_embedding(t: &Tensor, dim: usize) -> Result<Tensor> {
    if t.rank() != 1 {
        return Err(Error::bad_shape(
            "timestep_embedding",
            t.dims(),
            "expected timesteps [B]",
        ));
    }
    let ts = t.to_f64_vec();
    let freqs: Vec<f64> = (0..dim)
        .map(|i| 10000f64.powf(-((i / 2 * 2) as f64) / dim as f64))
        .collect();
    let mut v = Vec::with_capacity(ts.len() * dim);
    for &tb in &ts {
        for (i, f) in freqs.iter().enumerate() {
            let a = tb * f;
            v.push(if i % 2 == 0 { a.sin() } else { a.cos() } as f32);
        }
    }
    Tensor::from_vec(v, [ts.len(), dim])
}

// ------------------------------------------------------------------------- building blocks

/// The time-embedding MLP: `linear_1` (sinusoid width → embedding width), SiLU, `linear_2`.
pub struct TimestepEmbedding {
    /// First projection.
    pub linear_1: Linear,
    /// Second projection.
    pub linear_2: Linear,
}

impl Module for TimestepEmbedding {
    /// Sinusoidal features `[B, in]` → embedding `[B, out]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.linear_2.forward(&self.linear_1.forward(x)?.silu()?)
    }
    fn children(&self) -> Vec<(String, &dyn Module)> {
        vec![
            ("linear_1".into(), &self.linear_1),
            ("linear_2".into(), &self.linear_2),
        ]
    }
    fn describe(&self) -> String {
        "TimestepEmbedding".into()
    }
}

/// A residual block with a time-embedding shift: `norm1` → SiLU → `conv1` → + `time_emb_proj`
/// (SiLU(emb)) per channel → `norm2` → SiLU → `dropout` → `conv2`, plus the input (through
/// the 1×1 `conv_shortcut` when the channels change).
pub struct ResBlock {
    /// GroupNorm of the input.
    pub norm1: GroupNorm,
    /// First 3×3 convolution (in → out channels).
    pub conv1: Conv2d,
    /// Projection of the (SiLU-activated) time embedding to one shift per channel.
    pub time_emb_proj: Linear,
    /// GroupNorm before the second convolution.
    pub norm2: GroupNorm,
    /// Dropout before the second convolution.
    pub dropout: Dropout,
    /// Second 3×3 convolution (out → out channels).
    pub conv2: Conv2d,
    /// 1×1 convolution of the skip path when in ≠ out channels.
    pub conv_shortcut: Option<Conv2d>,
}

impl ResBlock {
    /// A block from `cin` to `cout` channels taking a `temb`-wide embedding.
    pub fn new(cin: usize, cout: usize, temb: usize, groups: usize, dropout: f64) -> Result<Self> {
        Ok(Self {
            norm1: GroupNorm::new(groups, cin)?,
            conv1: conv3x3(cin, cout, 1)?,
            time_emb_proj: Linear::new(temb, cout, true)?,
            norm2: GroupNorm::new(groups, cout)?,
            dropout: Dropout::new(dropout),
            conv2: conv3x3(cout, cout, 1)?,
            conv_shortcut: (cin != cout)
                .then(|| Conv2d::new(cin, cout, 1, ConvOptions::default()))
                .transpose()?,
        })
    }

    /// The block on `x` `[B, in, H, W]` with `emb_act` = SiLU(time embedding) `[B, temb]`.
    pub fn forward_emb(&self, x: &Tensor, emb_act: &Tensor) -> Result<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward(x)?.silu()?)?;
        let (b, c) = (h.dims()[0] as isize, h.dims()[1] as isize);
        let shift = self
            .time_emb_proj
            .forward(emb_act)?
            .reshape(&[b, c, 1, 1])?;
        let h = self.norm2.forward(&h.add(&shift)?)?.silu()?;
        let h = self.conv2.forward(&self.dropout.forward(&h)?)?;
        let skip = match &self.conv_shortcut {
            Some(conv) => conv.forward(x)?,
            None => x.clone(),
        };
        skip.add(&h)
    }
}

impl Module for ResBlock {
    /// Refused: a residual block needs the time embedding ([`ResBlock::forward_emb`]).
    fn forward(&self, _x: &Tensor) -> Result<Tensor> {
        Err(Error::invalid(
            "ResBlock",
            "needs the time embedding: call ResBlock::forward_emb",
        ))
    }
    fn children(&self) -> Vec<(String, &dyn Module)> {
        let mut v: Vec<(String, &dyn Module)> = vec![
            ("norm1".into(), &self.norm1),
            ("conv1".into(), &self.conv1),
            ("time_emb_proj".into(), &self.time_emb_proj),
            ("norm2".into(), &self.norm2),
            ("dropout".into(), &self.dropout),
            ("conv2".into(), &self.conv2),
        ];
        if let Some(c) = &self.conv_shortcut {
            v.push(("conv_shortcut".into(), c));
        }
        v
    }
    fn describe(&self) -> String {
        let w = self.conv1.weight.dims();
        format!("ResBlock({}, {})", w[1], w[0])
    }
}

/// Self-attention over the `H·W` positions of a feature map: `group_norm`, then
/// multi-head attention (`attn`, PyTorch's `nn.MultiheadAttention` layout, batch first) over
/// the positions as tokens, added to the input.
pub struct AttentionBlock {
    /// GroupNorm of the input.
    pub group_norm: GroupNorm,
    /// The attention.
    pub attn: MultiheadAttention,
}

impl AttentionBlock {
    /// A block over `channels` channels with `heads` heads.
    pub fn new(channels: usize, heads: usize, groups: usize) -> Result<Self> {
        Ok(Self {
            group_norm: GroupNorm::new(groups, channels)?,
            attn: MultiheadAttention::new(channels, heads, true, true)?,
        })
    }
}

impl Module for AttentionBlock {
    /// `[B, C, H, W]` → `[B, C, H, W]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let d = x.dims();
        if x.rank() != 4 {
            return Err(Error::bad_shape(
                "AttentionBlock",
                d,
                "expected [B, C, H, W]",
            ));
        }
        let dims: Vec<isize> = d.iter().map(|&v| v as isize).collect();
        let tokens = self
            .group_norm
            .forward(x)?
            .flatten(2, -1)?
            .transpose(1, 2)?;
        let h = self
            .attn
            .forward(&tokens)?
            .transpose(1, 2)?
            .reshape(&dims)?;
        x.add(&h)
    }
    fn children(&self) -> Vec<(String, &dyn Module)> {
        vec![
            ("group_norm".into(), &self.group_norm),
            ("attn".into(), &self.attn),
        ]
    }
    fn describe(&self) -> String {
        format!(
            "AttentionBlock({}, heads={})",
            self.group_norm.weight.numel(),
            self.attn.num_heads
        )
    }
}

/// Halves the resolution (rounding up): a 3×3 convolution `conv` with stride 2, padding 1.
pub struct Downsample {
    /// The strided convolution.
    pub conv: Conv2d,
}

impl Module for Downsample {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.conv.forward(x)
    }
    fn children(&self) -> Vec<(String, &dyn Module)> {
        vec![("conv".into(), &self.conv)]
    }
    fn describe(&self) -> String {
        "Downsample".into()
    }
}

/// Doubles the resolution: nearest-neighbour upsampling, then a 3×3 convolution `conv`.
pub struct Upsample {
    /// The convolution after upsampling.
    pub conv: Conv2d,
}

impl Module for Upsample {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if x.rank() != 4 {
            return Err(Error::bad_shape(
                "Upsample",
                x.dims(),
                "expected [B, C, H, W]",
            ));
        }
        let (h, w) = (x.dims()[2], x.dims()[3]);
        self.conv.forward(&x.upsample_nearest2d((2 * h, 2 * w))?)
    }
    fn children(&self) -> Vec<(String, &dyn Module)> {
        vec![("conv".into(), &self.conv)]
    }
    fn describe(&self) -> String {
        "Upsample".into()
    }
}

/// One level of a U-Net path: residual blocks (`resnets`), each followed by an attention
/// block when `attentions` is not empty, then an optional resampling (`downsample` on the
/// way down, `upsample` on the way up).
pub struct UNetLevel {
    /// Residual blocks.
    pub resnets: Vec<ResBlock>,
    /// Attention after each residual block (empty: none).
    pub attentions: Vec<AttentionBlock>,
    /// Resolution halving at the end of a down level (all but the lowest).
    pub downsample: Option<Downsample>,
    /// Resolution doubling at the end of an up level (all but the highest).
    pub upsample: Option<Upsample>,
}

impl UNetLevel {
    /// Residual block `j` (then its attention, if any) on `x`.
    fn block(&self, j: usize, x: &Tensor, emb_act: &Tensor) -> Result<Tensor> {
        let h = self.resnets[j].forward_emb(x, emb_act)?;
        match self.attentions.get(j) {
            Some(a) => a.forward(&h),
            None => Ok(h),
        }
    }
}

impl Module for UNetLevel {
    /// Refused: the blocks need the time embedding; [`UNet::forward`] runs the levels.
    fn forward(&self, _x: &Tensor) -> Result<Tensor> {
        Err(Error::invalid(
            "UNetLevel",
            "needs the time embedding and skip connections: call UNet::forward",
        ))
    }
    fn children(&self) -> Vec<(String, &dyn Module)> {
        let mut v: Vec<(String, &dyn Module)> = Vec::new();
        for (j, r) in self.resnets.iter().enumerate() {
            v.push((format!("resnets.{j}"), r));
        }
        for (j, a) in self.attentions.iter().enumerate() {
            v.push((format!("attentions.{j}"), a));
        }
        if let Some(d) = &self.downsample {
            v.push(("downsample".into(), d));
        }
        if let Some(u) = &self.upsample {
            v.push(("upsample".into(), u));
        }
        v
    }
    fn describe(&self) -> String {
        "UNetLevel".into()
    }
}

// ------------------------------------------------------------------------------- the model

/// The noise-prediction U-Net. Parameters (diffusers-like names): `time_embedding.linear_1.*`,
/// `time_embedding.linear_2.*`, `class_embedding.weight` (`[num_classes + 1, temb]`; the last
/// row is the null class), `conv_in.*`, `down_blocks.<i>.{resnets,attentions}.<j>.*`,
/// `down_blocks.<i>.downsample.conv.*`, `mid_block.{resnets.0,resnets.1,attentions.0}.*`,
/// `up_blocks.<i>.…` (`up_blocks.0` at the lowest resolution), `up_blocks.<i>.upsample.conv.*`,
/// `conv_norm_out.*`, `conv_out.*`. A residual block has `norm1`, `conv1`, `time_emb_proj`,
/// `norm2`, `conv2` and maybe `conv_shortcut`; an attention block `group_norm` and `attn`
/// (`in_proj_weight`, `in_proj_bias`, `out_proj.*`).
pub struct UNet {
    /// Timestep MLP.
    pub time_embedding: TimestepEmbedding,
    /// Class embedding (with the null class), if class-conditional.
    pub class_embedding: Option<Embedding>,
    /// Input convolution (image channels → base channels).
    pub conv_in: Conv2d,
    /// Down path, highest resolution first.
    pub down_blocks: Vec<UNetLevel>,
    /// Middle: residual block, attention (if enabled), residual block.
    pub mid_block: UNetLevel,
    /// Up path, lowest resolution first.
    pub up_blocks: Vec<UNetLevel>,
    /// Output GroupNorm.
    pub conv_norm_out: GroupNorm,
    /// Output convolution (base channels → image channels).
    pub conv_out: Conv2d,
    config: UNetConfig,
}

impl UNet {
    /// A model with PyTorch's default initialisation of each layer. Inconsistent sizes are
    /// refused, naming the fields (see [`UNetConfig::validate`]).
    pub fn new(config: UNetConfig) -> Result<Self> {
        config.validate()?;
        let c = &config;
        let (temb, groups, levels) = (c.time_embed_dim, c.norm_groups, c.channel_mult.len());
        let attn = |ch: usize, n: usize| -> Result<Vec<AttentionBlock>> {
            if !c.attention {
                return Ok(Vec::new());
            }
            (0..n)
                .map(|_| AttentionBlock::new(ch, c.attention_heads, groups))
                .collect()
        };
        let res = |cin, cout| ResBlock::new(cin, cout, temb, groups, c.dropout);

        let mut skips = vec![c.base_channels];
        let mut ch = c.base_channels;
        let mut down_blocks = Vec::with_capacity(levels);
        for i in 0..levels {
            let out = c.level_channels(i);
            let mut resnets = Vec::with_capacity(c.num_res_blocks);
            for _ in 0..c.num_res_blocks {
                resnets.push(res(ch, out)?);
                ch = out;
                skips.push(ch);
            }
            let last = i + 1 == levels;
            let downsample = if last {
                None
            } else {
                skips.push(ch);
                Some(Downsample {
                    conv: conv3x3(ch, ch, 2)?,
                })
            };
            down_blocks.push(UNetLevel {
                resnets,
                attentions: if last {
                    attn(ch, c.num_res_blocks)?
                } else {
                    Vec::new()
                },
                downsample,
                upsample: None,
            });
        }
        let mid_block = UNetLevel {
            resnets: vec![res(ch, ch)?, res(ch, ch)?],
            attentions: attn(ch, 1)?,
            downsample: None,
            upsample: None,
        };
        let mut up_blocks = Vec::with_capacity(levels);
        for i in (0..levels).rev() {
            let out = c.level_channels(i);
            let mut resnets = Vec::with_capacity(c.num_res_blocks + 1);
            for _ in 0..=c.num_res_blocks {
                let skip = skips.pop().expect("one skip per up-path block");
                resnets.push(res(ch + skip, out)?);
                ch = out;
            }
            up_blocks.push(UNetLevel {
                resnets,
                attentions: if i + 1 == levels {
                    attn(ch, c.num_res_blocks + 1)?
                } else {
                    Vec::new()
                },
                downsample: None,
                upsample: (i > 0)
                    .then(|| conv3x3(ch, ch, 1).map(|conv| Upsample { conv }))
                    .transpose()?,
            });
        }
        Ok(Self {
            time_embedding: TimestepEmbedding {
                linear_1: Linear::new(c.base_channels, temb, true)?,
                linear_2: Linear::new(temb, temb, true)?,
            },
            class_embedding: c
                .num_classes
                .map(|n| Embedding::new(n + 1, temb))
                .transpose()?,
            conv_in: conv3x3(c.in_channels, c.base_channels, 1)?,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out: GroupNorm::new(groups, ch)?,
            conv_out: conv3x3(ch, c.in_channels, 1)?,
            config,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &UNetConfig {
        &self.config
    }

    /// The class index meaning "no class" (`num_classes`), if class-conditional.
    pub fn null_class(&self) -> Option<usize> {
        self.config.num_classes
    }

    /// The predicted noise `[B, C, H, W]` of noisy images `x` `[B, C, H, W]` (H = W =
    /// `sample_size`) at timesteps `t` `[B]` (any dtype) with class labels `y` `[B]` (i64,
    /// `0..num_classes`, or `num_classes` for "no class"; `None` means no class for every
    /// image). Labels given to an unconditional model are refused.
    pub fn forward(&self, x: &Tensor, t: &Tensor, y: Option<&Tensor>) -> Result<Tensor> {
        const OP: &str = "UNet";
        let c = &self.config;
        let s = c.sample_size;
        if x.rank() != 4 || x.dims()[1..] != [c.in_channels, s, s] {
            return Err(Error::bad_shape(
                OP,
                x.dims(),
                format!("expected images [B, {}, {s}, {s}]", c.in_channels),
            ));
        }
        let b = x.dims()[0];
        if t.dims() != [b] {
            return Err(Error::bad_shape(
                OP,
                t.dims(),
                format!("expected timesteps [{b}] (one per image)"),
            ));
        }
        let mut emb = self
            .time_embedding
            .forward(&timestep_embedding(t, c.base_channels)?)?;
        match (&self.class_embedding, y) {
            (Some(table), y) => {
                let null = c.num_classes.unwrap_or(0);
                let labels = match y {
                    Some(y) => check_labels(y, b, null)?,
                    None => Tensor::full_with([b], null as f64, DType::I64),
                };
                emb = emb.add(&table.forward(&labels)?)?;
            }
            (None, Some(_)) => {
                return Err(Error::invalid(
                    OP,
                    "labels given to an unconditional model (num_classes is None)",
                ))
            }
            (None, None) => {}
        }
        let emb_act = emb.silu()?;

        let mut h = self.conv_in.forward(x)?;
        let mut skips = vec![h.clone()];
        for level in &self.down_blocks {
            for j in 0..level.resnets.len() {
                h = level.block(j, &h, &emb_act)?;
                skips.push(h.clone());
            }
            if let Some(d) = &level.downsample {
                h = d.forward(&h)?;
                skips.push(h.clone());
            }
        }
        h = self.mid_block.resnets[0].forward_emb(&h, &emb_act)?;
        if let Some(a) = self.mid_block.attentions.first() {
            h = a.forward(&h)?;
        }
        h = self.mid_block.resnets[1].forward_emb(&h, &emb_act)?;
        for level in &self.up_blocks {
            for j in 0..level.resnets.len() {
                let skip = skips.pop().expect("one skip per up-path block");
                h = level.block(j, &Tensor::cat(&[&h, &skip], 1)?, &emb_act)?;
            }
            if let Some(u) = &level.upsample {
                h = u.forward(&h)?;
            }
        }
        self.conv_out
            .forward(&self.conv_norm_out.forward(&h)?.silu()?)
    }
}

/// `y` as i64 labels `[b]` in `0..=null`, or an error naming the bad label.
fn check_labels(y: &Tensor, b: usize, null: usize) -> Result<Tensor> {
    if y.dims() != [b] {
        return Err(Error::bad_shape(
            "UNet",
            y.dims(),
            format!("expected labels [{b}] (one per image)"),
        ));
    }
    if let Some(bad) = y
        .to_f64_vec()
        .into_iter()
        .find(|&v| !(v >= 0.0 && v <= null as f64 && v.fract() == 0.0))
    {
        return Err(Error::invalid(
            "UNet",
            format!("label {bad} outside 0..={null} ({null} = no class)"),
        ));
    }
    y.to_dtype(DType::I64)
}

impl NoisePredictor for UNet {
    fn predict_noise(&self, x: &Tensor, t: &Tensor, labels: Option<&Tensor>) -> Result<Tensor> {
        self.forward(x, t, labels)
    }
    fn null_class(&self) -> Option<usize> {
        self.config.num_classes
    }
}

impl Module for UNet {
    /// Refused: the U-Net needs timesteps (and maybe labels); call [`UNet::forward`].
    fn forward(&self, _x: &Tensor) -> Result<Tensor> {
        Err(Error::invalid(
            "UNet",
            "needs timesteps and labels: call UNet::forward(x, t, y)",
        ))
    }
    fn children(&self) -> Vec<(String, &dyn Module)> {
        let mut v: Vec<(String, &dyn Module)> =
            vec![("time_embedding".into(), &self.time_embedding)];
        if let Some(e) = &self.class_embedding {
            v.push(("class_embedding".into(), e));
        }
        v.push(("conv_in".into(), &self.conv_in));
        for (i, l) in self.down_blocks.iter().enumerate() {
            v.push((format!("down_blocks.{i}"), l));
        }
        v.push(("mid_block".into(), &self.mid_block));
        for (i, l) in self.up_blocks.iter().enumerate() {
            v.push((format!("up_blocks.{i}"), l));
        }
        v.push(("conv_norm_out".into(), &self.conv_norm_out));
        v.push(("conv_out".into(), &self.conv_out));
        v
    }
    fn describe(&self) -> String {
        format!("UNet({:?})", self.config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nerve_nn::ModuleExt;

    #[test]
    fn timestep_embedding_equals_the_sinusoidal_table_rows() -> Result<()> {
        let table = nerve_nn::sinusoidal_encoding(50, 12)?;
        let t = Tensor::from_vec(vec![0i64, 7, 49], [3])?;
        let e = timestep_embedding(&t, 12)?;
        for (row, &ti) in [0usize, 7, 49].iter().enumerate() {
            let want = table.select(0, ti)?.to_f64_vec();
            let got = e.select(0, row)?.to_f64_vec();
            for (a, b) in got.iter().zip(&want) {
                assert!((a - b).abs() < 1e-6, "t={ti}: {a} vs {b}");
            }
        }
        Ok(())
    }

    // Found by the audit (the input crashed the config_json fuzz target): a config from a
    // file (`--config`, a checkpoint's `nerve.config`) with sizes whose products overflow
    // panicked in `validate`.
    #[test]
    fn sizes_that_overflow_are_refused_not_a_panic() {
        let too_many_levels = UNetConfig {
            channel_mult: vec![1; 70],
            ..Default::default()
        };
        let e = too_many_levels.validate().unwrap_err().to_string();
        assert!(e.contains("sample_size") && e.contains("70"), "{e}");
        let too_wide = UNetConfig {
            base_channels: usize::MAX,
            channel_mult: vec![1, 2],
            norm_groups: 1,
            ..Default::default()
        };
        let e = too_wide.validate().unwrap_err().to_string();
        assert!(
            e.contains("base_channels") && e.contains("overflows"),
            "{e}"
        );
    }

    #[test]
    fn inconsistent_configs_are_refused_naming_the_field() {
        let cases: Vec<(UNetConfig, &str)> = vec![
            (
                UNetConfig {
                    norm_groups: 5,
                    ..Default::default()
                },
                "norm_groups",
            ),
            (
                UNetConfig {
                    attention_heads: 3,
                    ..Default::default()
                },
                "attention_heads",
            ),
            (
                UNetConfig {
                    channel_mult: vec![1, 2, 2, 2],
                    ..Default::default()
                },
                "sample_size",
            ),
            (
                UNetConfig {
                    channel_mult: vec![],
                    ..Default::default()
                },
                "channel_mult",
            ),
            (
                UNetConfig {
                    num_classes: Some(0),
                    ..Default::default()
                },
                "num_classes",
            ),
            (
                UNetConfig {
                    dropout: 1.0,
                    ..Default::default()
                },
                "dropout",
            ),
        ];
        for (cfg, field) in cases {
            let e = UNet::new(cfg.clone()).err().expect("refused");
            assert!(e.to_string().contains(field), "{cfg:?}: {e}");
        }
        // Heads that do not divide the channels are fine when attention is off.
        let ok = UNetConfig {
            attention: false,
            attention_heads: 3,
            ..Default::default()
        };
        assert!(UNet::new(ok).is_ok());
    }

    #[test]
    fn config_round_trips_through_json_with_defaults_for_missing_fields() {
        let c = UNetConfig::default();
        let json = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<UNetConfig>(&json).unwrap(), c);
        let small: UNetConfig =
            serde_json::from_str(r#"{"base_channels": 16, "num_classes": null}"#).unwrap();
        assert_eq!(small.base_channels, 16);
        assert_eq!(small.num_classes, None);
        assert_eq!(small.channel_mult, vec![1, 2, 2]);
        let e = serde_json::from_str::<UNetConfig>(r#"{"base_channel": 16}"#).unwrap_err();
        assert!(e.to_string().contains("base_channel"), "{e}");
    }

    #[test]
    fn the_default_model_maps_28x28_images_to_28x28_noise() -> Result<()> {
        let unet = UNet::new(UNetConfig::default())?;
        let x = Tensor::randn([2, 1, 28, 28]);
        let t = Tensor::from_vec(vec![0i64, 999], [2])?;
        let y = Tensor::from_vec(vec![3i64, 10], [2])?;
        assert_eq!(unet.forward(&x, &t, Some(&y))?.dims(), &[2, 1, 28, 28]);
        assert_eq!(unet.forward(&x, &t, None)?.dims(), &[2, 1, 28, 28]);
        let bad = Tensor::from_vec(vec![3i64, 11], [2])?;
        let e = unet.forward(&x, &t, Some(&bad)).unwrap_err();
        assert!(e.to_string().contains("label 11"), "{e}");
        let e = unet
            .forward(&Tensor::randn([2, 1, 27, 27]), &t, None)
            .unwrap_err();
        assert!(e.to_string().contains("28"), "{e}");
        let names: Vec<String> = unet.named_parameters().into_iter().map(|p| p.0).collect();
        for want in [
            "time_embedding.linear_1.weight",
            "class_embedding.weight",
            "down_blocks.0.resnets.0.conv1.weight",
            "down_blocks.0.downsample.conv.weight",
            "down_blocks.2.attentions.0.attn.in_proj_weight",
            "mid_block.attentions.0.group_norm.weight",
            "up_blocks.0.resnets.1.conv_shortcut.weight",
            "up_blocks.1.upsample.conv.bias",
            "conv_out.weight",
        ] {
            assert!(names.iter().any(|n| n == want), "{want} missing");
        }
        Ok(())
    }
}
