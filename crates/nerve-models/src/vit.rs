//! Vision Transformer classifier (ViT): non-overlapping patches embedded by a strided
//! convolution, a class token, learned positions, pre-LayerNorm blocks, a linear head on the
//! class token.

use nerve_core::{Error, Result, Tensor};
use nerve_nn::{BlockOptions, Conv2d, ConvOptions, LayerNorm, Linear, Module, TransformerBlock};
use serde::{Deserialize, Serialize};

/// Sizes of a [`Vit`]. The default is the `vit` benchmark workload's model.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VitConfig {
    /// Input channels.
    pub channels: usize,
    /// Input height and width (square).
    pub image: usize,
    /// Patch side.
    pub patch: usize,
    /// Model width.
    pub width: usize,
    /// Transformer blocks.
    pub layers: usize,
    /// Attention heads.
    pub heads: usize,
    /// Classes.
    pub classes: usize,
}

impl Default for VitConfig {
    fn default() -> Self {
        Self {
            channels: 3,
            image: 32,
            patch: 4,
            width: 128,
            layers: 4,
            heads: 4,
            classes: 10,
        }
    }
}

/// Patch embedding: `proj` is a `patch × patch` convolution with stride `patch`.
pub struct PatchEmbed {
    /// The projection.
    pub proj: Conv2d,
}

impl Module for PatchEmbed {
    /// `[B, C, H, W]` → `[B, patches, width]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.proj.forward(x)?.flatten(2, -1)?.transpose(1, 2)
    }
    fn children(&self) -> Vec<(String, &dyn Module)> {
        vec![("proj".into(), &self.proj)]
    }
    fn describe(&self) -> String {
        "PatchEmbed".into()
    }
}

/// The model. Parameters: `cls_token` `[1, 1, W]`, `pos_embed` `[1, patches + 1, W]`,
/// `patch_embed.proj.*`, `blocks.<i>.…`, `norm.*`, `head.*`.
pub struct Vit {
    /// Class token.
    pub cls_token: Tensor,
    /// Learned positions (class token first).
    pub pos_embed: Tensor,
    /// Patch embedding.
    pub patch_embed: PatchEmbed,
    /// The blocks.
    pub blocks: Vec<TransformerBlock>,
    /// Final LayerNorm.
    pub norm: LayerNorm,
    /// Classifier.
    pub head: Linear,
    config: VitConfig,
}

impl Vit {
    /// A model; `cls_token` and `pos_embed` start at `N(0, 0.02²)`. Inconsistent sizes are
    /// refused, naming the fields.
    pub fn new(c: VitConfig) -> Result<Self> {
        if c.patch == 0 || !c.image.is_multiple_of(c.patch) {
            return Err(Error::invalid(
                "VitConfig",
                format!(
                    "image ({}) must be divisible by patch ({})",
                    c.image, c.patch
                ),
            ));
        }
        if c.heads == 0 || !c.width.is_multiple_of(c.heads) {
            return Err(Error::invalid(
                "VitConfig",
                format!(
                    "width ({}) must be divisible by heads ({})",
                    c.width, c.heads
                ),
            ));
        }
        if c.channels == 0 || c.image == 0 || c.layers == 0 || c.classes == 0 {
            return Err(Error::invalid(
                "VitConfig",
                "channels, image, layers and classes must be at least 1",
            ));
        }
        let side = c.image / c.patch;
        let params = crate::parameters_at_least(&[
            &[c.channels, c.patch, c.patch, c.width],
            &[side, side, c.width],
            &[c.layers, 12, c.width, c.width],
            &[c.width, c.classes],
        ]);
        crate::check_size(
            "VitConfig",
            params,
            "channels, image, patch, layers, width and classes",
        )?;
        let n = side * side;
        let cls_token = Tensor::zeros([1, 1, c.width]).requires_grad_(true);
        let pos_embed = Tensor::zeros([1, n + 1, c.width]).requires_grad_(true);
        nerve_nn::init::normal_(&cls_token, 0.0, 0.02)?;
        nerve_nn::init::normal_(&pos_embed, 0.0, 0.02)?;
        let o = BlockOptions {
            causal: false,
            gelu_tanh: false,
            ..BlockOptions::gpt(c.width, c.heads)
        };
        Ok(Self {
            cls_token,
            pos_embed,
            patch_embed: PatchEmbed {
                proj: Conv2d::new(
                    c.channels,
                    c.width,
                    c.patch,
                    ConvOptions::default().stride(c.patch),
                )?,
            },
            blocks: (0..c.layers)
                .map(|_| TransformerBlock::new(o))
                .collect::<Result<_>>()?,
            norm: LayerNorm::new(&[c.width]),
            head: Linear::new(c.width, c.classes, true)?,
            config: c,
        })
    }
}

impl Module for Vit {
    /// Images `[B, C, H, W]` → logits `[B, classes]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let c = &self.config;
        if x.rank() != 4 || x.dims()[1..] != [c.channels, c.image, c.image] {
            return Err(Error::bad_shape(
                "Vit",
                x.dims(),
                format!("expected [B, {}, {}, {}]", c.channels, c.image, c.image),
            ));
        }
        let b = x.dims()[0];
        let p = self.patch_embed.forward(x)?;
        let cls = self.cls_token.broadcast_to(&[b, 1, c.width])?;
        let mut h = Tensor::cat(&[&cls, &p], 1)?.add(&self.pos_embed)?;
        for blk in &self.blocks {
            h = blk.forward(&h)?;
        }
        self.head.forward(&self.norm.forward(&h.select(1, 0)?)?)
    }
    fn own_parameters(&self) -> Vec<(String, Tensor)> {
        vec![
            ("cls_token".into(), self.cls_token.clone()),
            ("pos_embed".into(), self.pos_embed.clone()),
        ]
    }
    fn children(&self) -> Vec<(String, &dyn Module)> {
        let mut v: Vec<(String, &dyn Module)> = vec![("patch_embed".into(), &self.patch_embed)];
        for (i, b) in self.blocks.iter().enumerate() {
            v.push((format!("blocks.{i}"), b));
        }
        v.push(("norm".into(), &self.norm));
        v.push(("head".into(), &self.head));
        v
    }
    fn describe(&self) -> String {
        format!("Vit({:?})", self.config)
    }
}
