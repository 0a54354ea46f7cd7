//! Layers with PyTorch's names, parameter names, shapes and default initialisation.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use nerve_core::{no_grad, DType, Error, Result, Tensor};

use crate::init::{self, FanMode, Init};
use crate::module::Module;

/// PyTorch's default for Linear/Conv: weight kaiming-uniform with `a = sqrt(5)` (i.e.
/// `U(±1/sqrt(fan_in))`), bias `U(±1/sqrt(fan_in))`.
fn default_weight_bias(w: &Tensor, b: Option<&Tensor>, init: Init) -> Result<()> {
    init.apply(w, |w| {
        init::kaiming_uniform_(w, 5f64.sqrt(), FanMode::FanIn)
    })?;
    if let Some(b) = b {
        let (fan_in, _) = init::fans(w)?;
        let bound = if fan_in > 0 {
            1.0 / (fan_in as f64).sqrt()
        } else {
            0.0
        };
        init::uniform_(b, -bound, bound)?;
    }
    Ok(())
}

fn param(dims: &[usize]) -> Tensor {
    Tensor::zeros(dims).requires_grad_(true)
}

fn weight_and_bias(w: &Tensor, b: &Option<Tensor>) -> Vec<(String, Tensor)> {
    let mut v = vec![("weight".to_string(), w.clone())];
    if let Some(b) = b {
        v.push(("bias".to_string(), b.clone()));
    }
    v
}

// ------------------------------------------------------------------------------------ Linear

/// `y = x Wᵀ + b` over the last dimension. Weight `[out_features, in_features]`.
///
/// A Linear may carry a LoRA adapter ([`crate::lora`]): then
/// `y = x Wᵀ + b + s · dropout(x) Aᵀ Bᵀ` with `A` `[r, in]`, `B` `[out, r]` and `s` the
/// adapter's scaling, and its parameters include `lora_A.weight` and `lora_B.weight`.
pub struct Linear {
    /// `[out_features, in_features]`.
    pub weight: Tensor,
    /// `[out_features]`, if any.
    pub bias: Option<Tensor>,
    lora: RwLock<Option<Arc<LoraAdapter>>>,
}

impl Linear {
    /// A layer with PyTorch's default initialisation.
    pub fn new(in_features: usize, out_features: usize, bias: bool) -> Result<Self> {
        Self::with_init(in_features, out_features, bias, Init::Default)
    }

    /// A layer whose weight uses `init` (the bias keeps PyTorch's default).
    pub fn with_init(
        in_features: usize,
        out_features: usize,
        bias: bool,
        init: Init,
    ) -> Result<Self> {
        let weight = param(&[out_features, in_features]);
        let bias = bias.then(|| param(&[out_features]));
        default_weight_bias(&weight, bias.as_ref(), init)?;
        Ok(Self::from_parts(weight, bias))
    }

    /// A layer around existing tensors (loaded weights); no adapter.
    pub fn from_parts(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            weight,
            bias,
            lora: RwLock::new(None),
        }
    }

    /// `in_features`.
    pub fn in_features(&self) -> usize {
        self.weight.dims()[1]
    }

    /// `out_features`.
    pub fn out_features(&self) -> usize {
        self.weight.dims()[0]
    }

    /// The LoRA adapter, if one is attached.
    pub fn lora(&self) -> Option<Arc<LoraAdapter>> {
        self.lora.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Attach `adapter` (replacing any other); its shapes must fit this layer.
    pub fn set_lora(&self, adapter: LoraAdapter) -> Result<()> {
        let (a, b) = (adapter.a.dims(), adapter.b.dims());
        if a.len() != 2
            || b.len() != 2
            || a[1] != self.in_features()
            || b[0] != self.out_features()
            || a[0] != b[1]
        {
            return Err(Error::invalid(
                "Linear::set_lora",
                format!(
                    "adapter lora_A {a:?} / lora_B {b:?} does not fit a Linear of weight {:?} \
                     (want [r, {}] and [{}, r])",
                    self.weight.dims(),
                    self.in_features(),
                    self.out_features()
                ),
            ));
        }
        *self.lora.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::new(adapter));
        Ok(())
    }

    /// Detach and return the adapter, leaving the base weights as they are.
    pub fn take_lora(&self) -> Option<Arc<LoraAdapter>> {
        self.lora.write().unwrap_or_else(|e| e.into_inner()).take()
    }

    /// Fold the adapter into the weight (`W += s · B A`) and detach it; returns whether there
    /// was one. The output is unchanged (up to rounding) and costs nothing extra afterwards.
    pub fn merge_lora(&self) -> Result<bool> {
        let Some(adapter) = self.take_lora() else {
            return Ok(false);
        };
        no_grad(|| {
            let delta = adapter
                .b
                .matmul(&adapter.a)?
                .mul_scalar(adapter.scaling)?
                .to_dtype(self.weight.dtype())?;
            self.weight.copy_(&self.weight.add(&delta)?)
        })?;
        Ok(true)
    }
}

/// A low-rank adapter of a [`Linear`] (Hu et al. 2021; PEFT's `LoraLayer`): `A` `[r, in]`,
/// `B` `[out, r]`, output `scaling · B A dropout(x)` added to the layer's.
pub struct LoraAdapter {
    /// `lora_A.weight`, `[r, in_features]`.
    pub a: Tensor,
    /// `lora_B.weight`, `[out_features, r]`.
    pub b: Tensor,
    /// `alpha / r` (or `alpha / sqrt(r)` with rsLoRA).
    pub scaling: f64,
    /// Dropout on the adapter's input.
    pub dropout: Dropout,
}

impl LoraAdapter {
    /// The rank `r`.
    pub fn rank(&self) -> usize {
        self.a.dims()[0]
    }

    /// The adapter's contribution for input `x`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = if self.dropout.p > 0.0 {
            self.dropout.forward(x)?
        } else {
            x.clone()
        };
        x.matmul(&self.a.t()?)?
            .mul_scalar(self.scaling)?
            .matmul(&self.b.t()?)
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = x.linear(&self.weight, self.bias.as_ref())?;
        match self.lora() {
            Some(adapter) => y.add(&adapter.forward(x)?),
            None => Ok(y),
        }
    }
    fn own_parameters(&self) -> Vec<(String, Tensor)> {
        let mut v = weight_and_bias(&self.weight, &self.bias);
        if let Some(adapter) = self.lora() {
            v.push(("lora_A.weight".into(), adapter.a.clone()));
            v.push(("lora_B.weight".into(), adapter.b.clone()));
        }
        v
    }
    fn set_training(&self, training: bool) {
        if let Some(adapter) = self.lora() {
            adapter.dropout.set_training(training);
        }
    }
    fn as_linear(&self) -> Option<&Linear> {
        Some(self)
    }
    fn describe(&self) -> String {
        let d = self.weight.dims();
        let lora = match self.lora() {
            Some(a) => format!(
                ", lora(r={}, scaling={}, dropout={})",
                a.rank(),
                a.scaling,
                a.dropout.p
            ),
            None => String::new(),
        };
        format!(
            "Linear(in_features={}, out_features={}, bias={}{lora})",
            d[1],
            d[0],
            self.bias.is_some()
        )
    }
}

// -------------------------------------------------------------------------------------- Conv

/// Options of a convolution beyond its channels and kernel (PyTorch's defaults: stride 1,
/// no padding, dilation 1, one group, with bias).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ConvOptions {
    /// Step between windows.
    pub stride: usize,
    /// Zero padding on each side.
    pub padding: usize,
    /// Spacing of kernel taps.
    pub dilation: usize,
    /// Channel groups.
    pub groups: usize,
    /// Whether there is a bias.
    pub bias: bool,
    /// Extra size on one side of a transposed convolution's output.
    pub output_padding: usize,
    /// Weight initialisation.
    pub init: Init,
}

impl Default for ConvOptions {
    fn default() -> Self {
        Self {
            stride: 1,
            padding: 0,
            dilation: 1,
            groups: 1,
            bias: true,
            output_padding: 0,
            init: Init::Default,
        }
    }
}

impl ConvOptions {
    /// With this stride.
    pub fn stride(mut self, s: usize) -> Self {
        self.stride = s;
        self
    }
    /// With this padding.
    pub fn padding(mut self, p: usize) -> Self {
        self.padding = p;
        self
    }
    /// With this dilation.
    pub fn dilation(mut self, d: usize) -> Self {
        self.dilation = d;
        self
    }
    /// With this many groups.
    pub fn groups(mut self, g: usize) -> Self {
        self.groups = g;
        self
    }
    /// With or without bias.
    pub fn bias(mut self, b: bool) -> Self {
        self.bias = b;
        self
    }
    /// With this output padding (transposed convolutions).
    pub fn output_padding(mut self, p: usize) -> Self {
        self.output_padding = p;
        self
    }
    /// With this weight initialisation.
    pub fn init(mut self, i: Init) -> Self {
        self.init = i;
        self
    }
}

fn check_groups(op: &'static str, cin: usize, cout: usize, groups: usize) -> Result<()> {
    if groups == 0 || !cin.is_multiple_of(groups) || !cout.is_multiple_of(groups) {
        return Err(Error::invalid(
            op,
            format!(
                "in_channels {cin} and out_channels {cout} must be divisible by groups {groups}"
            ),
        ));
    }
    Ok(())
}

/// Weight shaped `weight_dims`, optional bias `[bias_len]`, PyTorch's default initialisation
/// (or `options.init`), after checking the groups divide both channel counts.
fn conv_params(
    op: &'static str,
    (cin, cout): (usize, usize),
    weight_dims: &[usize],
    bias_len: usize,
    options: &ConvOptions,
) -> Result<(Tensor, Option<Tensor>)> {
    check_groups(op, cin, cout, options.groups)?;
    let weight = param(weight_dims);
    let bias = options.bias.then(|| param(&[bias_len]));
    default_weight_bias(&weight, bias.as_ref(), options.init)?;
    Ok((weight, bias))
}

/// 2-D convolution over `[N, C, H, W]`. Weight `[out, in/groups, kh, kw]`.
pub struct Conv2d {
    /// `[out_channels, in_channels / groups, kh, kw]`.
    pub weight: Tensor,
    /// `[out_channels]`, if any.
    pub bias: Option<Tensor>,
    /// Stride, padding, dilation, groups.
    pub options: ConvOptions,
}

impl Conv2d {
    /// A square-kernel convolution with PyTorch's default initialisation.
    pub fn new(
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        options: ConvOptions,
    ) -> Result<Self> {
        let (weight, bias) = conv_params(
            "Conv2d",
            (in_channels, out_channels),
            &[out_channels, in_channels / options.groups, kernel, kernel],
            out_channels,
            &options,
        )?;
        Ok(Self {
            weight,
            bias,
            options,
        })
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let o = &self.options;
        x.conv2d(
            &self.weight,
            self.bias.as_ref(),
            (o.stride, o.stride),
            (o.padding, o.padding),
            (o.dilation, o.dilation),
            o.groups,
        )
    }
    fn own_parameters(&self) -> Vec<(String, Tensor)> {
        weight_and_bias(&self.weight, &self.bias)
    }
    fn describe(&self) -> String {
        let d = self.weight.dims();
        let o = &self.options;
        format!(
            "Conv2d({}, {}, kernel_size=({}, {}), stride=({s}, {s}), padding=({p}, {p}))",
            d[1] * o.groups,
            d[0],
            d[2],
            d[3],
            s = o.stride,
            p = o.padding
        )
    }
}

/// 1-D convolution over `[N, C, L]`. Weight `[out, in/groups, k]`.
pub struct Conv1d {
    /// `[out_channels, in_channels / groups, k]`.
    pub weight: Tensor,
    /// `[out_channels]`, if any.
    pub bias: Option<Tensor>,
    /// Stride, padding, dilation, groups.
    pub options: ConvOptions,
}

impl Conv1d {
    /// A convolution with PyTorch's default initialisation.
    pub fn new(
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        options: ConvOptions,
    ) -> Result<Self> {
        let (weight, bias) = conv_params(
            "Conv1d",
            (in_channels, out_channels),
            &[out_channels, in_channels / options.groups, kernel],
            out_channels,
            &options,
        )?;
        Ok(Self {
            weight,
            bias,
            options,
        })
    }
}

impl Module for Conv1d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let o = &self.options;
        x.conv1d(
            &self.weight,
            self.bias.as_ref(),
            o.stride,
            o.padding,
            o.dilation,
            o.groups,
        )
    }
    fn own_parameters(&self) -> Vec<(String, Tensor)> {
        weight_and_bias(&self.weight, &self.bias)
    }
    fn describe(&self) -> String {
        let d = self.weight.dims();
        format!(
            "Conv1d({}, {}, kernel_size=({},))",
            d[1] * self.options.groups,
            d[0],
            d[2]
        )
    }
}

/// 2-D transposed convolution. Weight `[in, out/groups, kh, kw]`.
pub struct ConvTranspose2d {
    /// `[in_channels, out_channels / groups, kh, kw]`.
    pub weight: Tensor,
    /// `[out_channels]`, if any.
    pub bias: Option<Tensor>,
    /// Stride, padding, output padding, dilation, groups.
    pub options: ConvOptions,
}

impl ConvTranspose2d {
    /// A transposed convolution with PyTorch's default initialisation.
    pub fn new(
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        options: ConvOptions,
    ) -> Result<Self> {
        let (weight, bias) = conv_params(
            "ConvTranspose2d",
            (in_channels, out_channels),
            &[in_channels, out_channels / options.groups, kernel, kernel],
            out_channels,
            &options,
        )?;
        Ok(Self {
            weight,
            bias,
            options,
        })
    }
}

impl Module for ConvTranspose2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let o = &self.options;
        x.conv_transpose2d(
            &self.weight,
            self.bias.as_ref(),
            (o.stride, o.stride),
            (o.padding, o.padding),
            (o.output_padding, o.output_padding),
            (o.dilation, o.dilation),
            o.groups,
        )
    }
    fn own_parameters(&self) -> Vec<(String, Tensor)> {
        weight_and_bias(&self.weight, &self.bias)
    }
    fn describe(&self) -> String {
        let d = self.weight.dims();
        format!(
            "ConvTranspose2d({}, {}, kernel_size=({}, {}))",
            d[0],
            d[1] * self.options.groups,
            d[2],
            d[3]
        )
    }
}

// --------------------------------------------------------------------------------- Pooling

/// 2-D max pooling (square window; stride defaults to the window, as in PyTorch).
pub struct MaxPool2d {
    /// Window size.
    pub kernel: usize,
    /// Step.
    pub stride: usize,
    /// Implicit −inf padding.
    pub padding: usize,
}

impl MaxPool2d {
    /// `MaxPool2d(kernel)` with stride = kernel, no padding.
    pub fn new(kernel: usize) -> Self {
        Self {
            kernel,
            stride: kernel,
            padding: 0,
        }
    }
}

impl Module for MaxPool2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (k, s, p) = (self.kernel, self.stride, self.padding);
        x.max_pool2d((k, k), (s, s), (p, p), (1, 1), false)
    }
    fn describe(&self) -> String {
        format!(
            "MaxPool2d(kernel_size={}, stride={}, padding={})",
            self.kernel, self.stride, self.padding
        )
    }
}

/// 2-D average pooling (square window; stride defaults to the window).
pub struct AvgPool2d {
    /// Window size.
    pub kernel: usize,
    /// Step.
    pub stride: usize,
    /// Zero padding.
    pub padding: usize,
}

impl AvgPool2d {
    /// `AvgPool2d(kernel)` with stride = kernel, no padding.
    pub fn new(kernel: usize) -> Self {
        Self {
            kernel,
            stride: kernel,
            padding: 0,
        }
    }
}

impl Module for AvgPool2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (k, s, p) = (self.kernel, self.stride, self.padding);
        x.avg_pool2d((k, k), (s, s), (p, p), false, true)
    }
    fn describe(&self) -> String {
        format!(
            "AvgPool2d(kernel_size={}, stride={}, padding={})",
            self.kernel, self.stride, self.padding
        )
    }
}

/// Average pooling to a fixed output size.
pub struct AdaptiveAvgPool2d {
    /// Output (height, width).
    pub output_size: (usize, usize),
}

impl Module for AdaptiveAvgPool2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.adaptive_avg_pool2d(self.output_size)
    }
    fn describe(&self) -> String {
        format!("AdaptiveAvgPool2d(output_size={:?})", self.output_size)
    }
}

// ------------------------------------------------------------------------------ Normalisation

/// Batch normalisation over `[N, C]` or `[N, C, L]` (BatchNorm1d) and `[N, C, H, W]`
/// (BatchNorm2d): batch statistics and running-statistics updates in training, running
/// statistics in evaluation.
pub struct BatchNorm {
    /// Per-channel scale `[C]`.
    pub weight: Tensor,
    /// Per-channel shift `[C]`.
    pub bias: Tensor,
    /// Running mean `[C]` (buffer).
    pub running_mean: Tensor,
    /// Running (unbiased) variance `[C]` (buffer).
    pub running_var: Tensor,
    /// Batches seen in training (buffer, i64 scalar).
    pub num_batches_tracked: Tensor,
    /// Added to the variance.
    pub eps: f64,
    /// Weight of the new batch in the running statistics.
    pub momentum: f64,
    rank: usize,
    training: AtomicBool,
}

/// `BatchNorm1d`: inputs `[N, C]` or `[N, C, L]`.
pub fn batch_norm1d(channels: usize) -> BatchNorm {
    BatchNorm::new(channels, 1)
}

/// `BatchNorm2d`: inputs `[N, C, H, W]`.
pub fn batch_norm2d(channels: usize) -> BatchNorm {
    BatchNorm::new(channels, 2)
}

impl BatchNorm {
    fn new(channels: usize, rank: usize) -> Self {
        Self {
            weight: Tensor::ones([channels]).requires_grad_(true),
            bias: Tensor::zeros([channels]).requires_grad_(true),
            running_mean: Tensor::zeros([channels]),
            running_var: Tensor::ones([channels]),
            num_batches_tracked: Tensor::zeros_with(Vec::<usize>::new(), DType::I64),
            eps: 1e-5,
            momentum: 0.1,
            rank,
            training: AtomicBool::new(true),
        }
    }
}

impl Module for BatchNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let c = self.weight.numel();
        let ok = x.rank() >= 2
            && x.dims()[1] == c
            && (if self.rank == 2 {
                x.rank() == 4
            } else {
                x.rank() <= 3
            });
        if !ok {
            return Err(Error::bad_shape(
                if self.rank == 2 {
                    "BatchNorm2d"
                } else {
                    "BatchNorm1d"
                },
                x.dims(),
                format!(
                    "expected [N, {c}{}]",
                    if self.rank == 2 { ", H, W" } else { "(, L)" }
                ),
            ));
        }
        let training = self.training.load(Ordering::Relaxed);
        if training && x.numel() / c.max(1) < 2 {
            return Err(Error::bad_shape(
                "BatchNorm",
                x.dims(),
                "expected more than 1 value per channel when training",
            ));
        }
        // One fused op: batch statistics (and the running-statistics update) in training,
        // running statistics in evaluation.
        let y = x.batch_norm(
            Some(&self.running_mean),
            Some(&self.running_var),
            Some(&self.weight),
            Some(&self.bias),
            training,
            self.momentum,
            self.eps,
        )?;
        if training {
            no_grad(|| {
                self.num_batches_tracked.copy_(
                    &self
                        .num_batches_tracked
                        .to_dtype(DType::F64)?
                        .add_scalar(1.0)?,
                )
            })?;
        }
        Ok(y)
    }
    fn own_parameters(&self) -> Vec<(String, Tensor)> {
        vec![
            ("weight".into(), self.weight.clone()),
            ("bias".into(), self.bias.clone()),
        ]
    }
    fn own_buffers(&self) -> Vec<(String, Tensor)> {
        vec![
            ("running_mean".into(), self.running_mean.clone()),
            ("running_var".into(), self.running_var.clone()),
            (
                "num_batches_tracked".into(),
                self.num_batches_tracked.clone(),
            ),
        ]
    }
    fn set_training(&self, training: bool) {
        self.training.store(training, Ordering::Relaxed);
    }
    fn describe(&self) -> String {
        format!(
            "BatchNorm{}d({}, eps={}, momentum={})",
            self.rank,
            self.weight.numel(),
            self.eps,
            self.momentum
        )
    }
}

/// Layer normalisation over the trailing `normalized_shape` dims.
pub struct LayerNorm {
    /// Scale, shaped like the normalised dims.
    pub weight: Option<Tensor>,
    /// Shift, shaped like the normalised dims.
    pub bias: Option<Tensor>,
    /// Normalised trailing dims.
    pub normalized_shape: Vec<usize>,
    /// Added to the variance.
    pub eps: f64,
}

impl LayerNorm {
    /// `LayerNorm(normalized_shape)` with affine weight 1 and bias 0, eps 1e-5.
    pub fn new(normalized_shape: &[usize]) -> Self {
        Self {
            weight: Some(Tensor::ones(normalized_shape).requires_grad_(true)),
            bias: Some(Tensor::zeros(normalized_shape).requires_grad_(true)),
            normalized_shape: normalized_shape.to_vec(),
            eps: 1e-5,
        }
    }
}

/// Check that `shape` is the trailing part of `x`'s dims.
fn check_trailing(op: &'static str, x: &Tensor, shape: &[usize]) -> Result<()> {
    let r = x.rank();
    if shape.len() > r || x.dims()[r - shape.len()..] != *shape {
        return Err(Error::shape_mismatch(op, x.dims(), shape));
    }
    Ok(())
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        check_trailing("LayerNorm", x, &self.normalized_shape)?;
        x.layer_norm(
            &self.normalized_shape,
            self.weight.as_ref(),
            self.bias.as_ref(),
            self.eps,
        )
    }
    fn own_parameters(&self) -> Vec<(String, Tensor)> {
        let mut v = Vec::new();
        if let Some(w) = &self.weight {
            v.push(("weight".into(), w.clone()));
        }
        if let Some(b) = &self.bias {
            v.push(("bias".into(), b.clone()));
        }
        v
    }
    fn describe(&self) -> String {
        format!("LayerNorm({:?}, eps={})", self.normalized_shape, self.eps)
    }
}

/// Root-mean-square normalisation over the trailing dims: `x / sqrt(mean(x²) + eps) · w`.
pub struct RmsNorm {
    /// Scale, shaped like the normalised dims.
    pub weight: Tensor,
    /// Normalised trailing dims.
    pub normalized_shape: Vec<usize>,
    /// Added to the mean square (PyTorch's default `None` means f32 machine epsilon).
    pub eps: f64,
}

impl RmsNorm {
    /// `RMSNorm(normalized_shape, eps)`.
    pub fn new(normalized_shape: &[usize], eps: f64) -> Self {
        Self {
            weight: Tensor::ones(normalized_shape).requires_grad_(true),
            normalized_shape: normalized_shape.to_vec(),
            eps,
        }
    }
}

impl Module for RmsNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        check_trailing("RMSNorm", x, &self.normalized_shape)?;
        x.rms_norm(&self.normalized_shape, Some(&self.weight), self.eps)
    }
    fn own_parameters(&self) -> Vec<(String, Tensor)> {
        vec![("weight".into(), self.weight.clone())]
    }
    fn describe(&self) -> String {
        format!("RMSNorm({:?}, eps={})", self.normalized_shape, self.eps)
    }
}

/// Group normalisation over `[N, C, *]`: channels split into groups, each normalised over its
/// channels and spatial positions, then a per-channel affine.
pub struct GroupNorm {
    /// Number of groups.
    pub groups: usize,
    /// Per-channel scale.
    pub weight: Tensor,
    /// Per-channel shift.
    pub bias: Tensor,
    /// Added to the variance.
    pub eps: f64,
}

impl GroupNorm {
    /// `GroupNorm(num_groups, num_channels)`.
    pub fn new(groups: usize, channels: usize) -> Result<Self> {
        if groups == 0 || !channels.is_multiple_of(groups) {
            return Err(Error::invalid(
                "GroupNorm",
                format!("{channels} channels not divisible into {groups} groups"),
            ));
        }
        Ok(Self {
            groups,
            weight: Tensor::ones([channels]).requires_grad_(true),
            bias: Tensor::zeros([channels]).requires_grad_(true),
            eps: 1e-5,
        })
    }
}

impl Module for GroupNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let c = self.weight.numel();
        if x.rank() < 2 || x.dims()[1] != c {
            return Err(Error::bad_shape(
                "GroupNorm",
                x.dims(),
                format!("expected [N, {c}, *]"),
            ));
        }
        x.group_norm(self.groups, Some(&self.weight), Some(&self.bias), self.eps)
    }
    fn own_parameters(&self) -> Vec<(String, Tensor)> {
        vec![
            ("weight".into(), self.weight.clone()),
            ("bias".into(), self.bias.clone()),
        ]
    }
    fn describe(&self) -> String {
        format!(
            "GroupNorm({}, {}, eps={})",
            self.groups,
            self.weight.numel(),
            self.eps
        )
    }
}

// ----------------------------------------------------------------------------- Other layers

/// Token embedding: integer ids → rows of a `[num_embeddings, dim]` table (init `N(0, 1)`).
pub struct Embedding {
    /// `[num_embeddings, embedding_dim]`.
    pub weight: Tensor,
}

impl Embedding {
    /// `Embedding(num_embeddings, embedding_dim)`.
    pub fn new(num_embeddings: usize, embedding_dim: usize) -> Result<Self> {
        let weight = param(&[num_embeddings, embedding_dim]);
        init::normal_(&weight, 0.0, 1.0)?;
        Ok(Self { weight })
    }
}

impl Module for Embedding {
    fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        self.weight.embedding(ids)
    }
    fn own_parameters(&self) -> Vec<(String, Tensor)> {
        vec![("weight".into(), self.weight.clone())]
    }
    fn describe(&self) -> String {
        let d = self.weight.dims();
        format!("Embedding({}, {})", d[0], d[1])
    }
}

/// Dropout with probability `p` in training mode; the identity in evaluation mode.
pub struct Dropout {
    /// Probability of zeroing an element.
    pub p: f64,
    training: AtomicBool,
}

impl Dropout {
    /// `Dropout(p)`.
    pub fn new(p: f64) -> Self {
        Self {
            p,
            training: AtomicBool::new(true),
        }
    }
}

impl Module for Dropout {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.dropout(self.p, self.training.load(Ordering::Relaxed))
    }
    fn set_training(&self, training: bool) {
        self.training.store(training, Ordering::Relaxed);
    }
    fn describe(&self) -> String {
        format!("Dropout(p={})", self.p)
    }
}

/// Flatten dims `start..=end` into one (PyTorch's `nn.Flatten`, default 1 to -1).
pub struct Flatten {
    /// First flattened dim.
    pub start: isize,
    /// Last flattened dim.
    pub end: isize,
}

impl Default for Flatten {
    fn default() -> Self {
        Self { start: 1, end: -1 }
    }
}

impl Module for Flatten {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.flatten(self.start, self.end)
    }
    fn describe(&self) -> String {
        format!("Flatten(start_dim={}, end_dim={})", self.start, self.end)
    }
}

macro_rules! activation {
    ($(#[$doc:meta])* $name:ident, $repr:literal, |$x:ident| $body:expr) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, Default)]
        pub struct $name;
        impl Module for $name {
            fn forward(&self, $x: &Tensor) -> Result<Tensor> {
                $body
            }
            fn describe(&self) -> String {
                $repr.into()
            }
        }
    };
}

activation!(
    /// `max(x, 0)`.
    ReLU, "ReLU()", |x| x.relu()
);
activation!(
    /// `x · sigmoid(x)`.
    SiLU, "SiLU()", |x| x.silu()
);
activation!(
    /// Hyperbolic tangent.
    Tanh, "Tanh()", |x| x.tanh()
);
activation!(
    /// Logistic sigmoid.
    Sigmoid, "Sigmoid()", |x| x.sigmoid()
);

/// GELU, exact (erf) or with the tanh approximation.
#[derive(Clone, Copy, Debug, Default)]
pub struct GELU {
    /// Use PyTorch's `approximate='tanh'`.
    pub tanh: bool,
}

impl Module for GELU {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.tanh {
            x.gelu_tanh()
        } else {
            x.gelu()
        }
    }
    fn describe(&self) -> String {
        format!(
            "GELU(approximate='{}')",
            if self.tanh { "tanh" } else { "none" }
        )
    }
}

/// Leaky ReLU with the given negative slope (PyTorch's default 0.01).
#[derive(Clone, Copy, Debug)]
pub struct LeakyReLU {
    /// Slope for negative inputs.
    pub slope: f64,
}

impl Default for LeakyReLU {
    fn default() -> Self {
        Self { slope: 0.01 }
    }
}

impl Module for LeakyReLU {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.leaky_relu(self.slope)
    }
    fn describe(&self) -> String {
        format!("LeakyReLU(negative_slope={})", self.slope)
    }
}

/// Softmax over `dim`.
#[derive(Clone, Copy, Debug)]
pub struct Softmax {
    /// The normalised dim.
    pub dim: isize,
}

impl Module for Softmax {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.softmax(self.dim)
    }
    fn describe(&self) -> String {
        format!("Softmax(dim={})", self.dim)
    }
}
