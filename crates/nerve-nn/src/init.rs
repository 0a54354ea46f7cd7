//! Parameter initialisation, with PyTorch's names (`torch.nn.init`). Each function fills an
//! existing tensor in place from nerve's global seeded generator (`nerve_core::manual_seed`).

use nerve_core::{no_grad, Error, Result, Tensor};

/// `(fan_in, fan_out)` of a weight: dims 1 and 0 times the receptive field (dims 2..), as
/// PyTorch's `_calculate_fan_in_and_fan_out`.
pub fn fans(t: &Tensor) -> Result<(usize, usize)> {
    let d = t.dims();
    if d.len() < 2 {
        return Err(Error::bad_shape(
            "init",
            d,
            "fan in and fan out need at least 2 dimensions",
        ));
    }
    let rf: usize = d[2..].iter().product();
    Ok((d[1] * rf, d[0] * rf))
}

fn fill_from(t: &Tensor, src: Tensor) -> Result<()> {
    no_grad(|| t.copy_(&src))
}

/// Fill with `U(lo, hi)`.
pub fn uniform_(t: &Tensor, lo: f64, hi: f64) -> Result<()> {
    fill_from(t, Tensor::uniform(t.dims(), lo, hi))
}

/// Fill with `N(mean, std²)`.
pub fn normal_(t: &Tensor, mean: f64, std: f64) -> Result<()> {
    fill_from(t, Tensor::randn(t.dims()).affine(std, mean)?)
}

/// Fill with a constant.
pub fn constant_(t: &Tensor, v: f64) -> Result<()> {
    fill_from(t, Tensor::full(t.dims(), v))
}

/// Fill with zeros.
pub fn zeros_(t: &Tensor) -> Result<()> {
    constant_(t, 0.0)
}

/// Fill with ones.
pub fn ones_(t: &Tensor) -> Result<()> {
    constant_(t, 1.0)
}

/// Glorot/Xavier uniform: `U(-b, b)`, `b = gain·sqrt(6 / (fan_in + fan_out))`.
pub fn xavier_uniform_(t: &Tensor, gain: f64) -> Result<()> {
    let (fi, fo) = fans(t)?;
    let b = gain * (6.0 / (fi + fo) as f64).sqrt();
    uniform_(t, -b, b)
}

/// Glorot/Xavier normal: `N(0, gain²·2 / (fan_in + fan_out))`.
pub fn xavier_normal_(t: &Tensor, gain: f64) -> Result<()> {
    let (fi, fo) = fans(t)?;
    normal_(t, 0.0, gain * (2.0 / (fi + fo) as f64).sqrt())
}

/// Which fan Kaiming initialisation preserves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FanMode {
    /// Preserve the forward pass's variance (PyTorch's default).
    FanIn,
    /// Preserve the backward pass's variance.
    FanOut,
}

/// Gain of leaky ReLU with negative slope `a` (`a = 0` for ReLU): `sqrt(2 / (1 + a²))`.
pub fn leaky_relu_gain(a: f64) -> f64 {
    (2.0 / (1.0 + a * a)).sqrt()
}

fn fan(t: &Tensor, mode: FanMode) -> Result<usize> {
    let (fi, fo) = fans(t)?;
    Ok(match mode {
        FanMode::FanIn => fi,
        FanMode::FanOut => fo,
    })
}

/// He/Kaiming uniform for a leaky-ReLU slope `a`: `U(-b, b)`, `b = gain·sqrt(3 / fan)`.
/// PyTorch's default for Linear and Conv weights is `a = sqrt(5)`, fan in.
pub fn kaiming_uniform_(t: &Tensor, a: f64, mode: FanMode) -> Result<()> {
    let b = leaky_relu_gain(a) * (3.0 / fan(t, mode)? as f64).sqrt();
    uniform_(t, -b, b)
}

/// He/Kaiming normal: `N(0, gain² / fan)`.
pub fn kaiming_normal_(t: &Tensor, a: f64, mode: FanMode) -> Result<()> {
    normal_(t, 0.0, leaky_relu_gain(a) / (fan(t, mode)? as f64).sqrt())
}

/// Initialisation of a layer's weight, when PyTorch's default is not wanted.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    /// PyTorch's default for the layer.
    Default,
    /// [`xavier_uniform_`] with gain 1.
    XavierUniform,
    /// [`xavier_normal_`] with gain 1.
    XavierNormal,
    /// [`kaiming_uniform_`] for ReLU, fan in.
    KaimingUniform,
    /// [`kaiming_normal_`] for ReLU, fan in.
    KaimingNormal,
    /// `N(0, std²)`.
    Normal(f64),
    /// Zeros.
    Zeros,
}

impl Init {
    /// Apply to `t`; `Default` applies `default`.
    pub fn apply(self, t: &Tensor, default: impl FnOnce(&Tensor) -> Result<()>) -> Result<()> {
        match self {
            Init::Default => default(t),
            Init::XavierUniform => xavier_uniform_(t, 1.0),
            Init::XavierNormal => xavier_normal_(t, 1.0),
            Init::KaimingUniform => kaiming_uniform_(t, 0.0, FanMode::FanIn),
            Init::KaimingNormal => kaiming_normal_(t, 0.0, FanMode::FanIn),
            Init::Normal(std) => normal_(t, 0.0, std),
            Init::Zeros => zeros_(t),
        }
    }
}
