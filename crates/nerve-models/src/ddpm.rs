//! Denoising diffusion (DDPM, Ho et al. 2020): the noise schedule, the forward process
//! `q(x_t | x_0)`, the noise-prediction training loss, and two samplers: ancestral DDPM and
//! DDIM (Song et al. 2021; `eta = 0` is deterministic). Optional classifier-free guidance
//! (Ho & Salimans 2021): label dropout in training, and a guidance scale in sampling.
//!
//! Images live in [-1, 1]. Schedules are kept in f64; per-step coefficients are rounded to
//! f32 once when applied. Sampling runs without recording gradients.
//!
//! ```
//! use nerve_core::{Generator, Tensor};
//! use nerve_models::ddpm::{ddpm_loss, sample_ddim, DdpmSchedule, SampleOptions};
//! use nerve_models::{UNet, UNetConfig};
//! # fn main() -> nerve_core::Result<()> {
//! let unet = UNet::new(UNetConfig { base_channels: 8, norm_groups: 4, ..Default::default() })?;
//! let schedule = DdpmSchedule::default();
//! let mut g = Generator::new(0);
//! let x0 = Tensor::rand([4, 1, 28, 28]).affine(2.0, -1.0)?;
//! let y = Tensor::from_vec(vec![0i64, 1, 2, 3], [4])?;
//! let loss = ddpm_loss(&unet, &schedule, &x0, Some(&y), 0.1, &mut g)?;
//! loss.backward()?;
//! let samples = sample_ddim(
//!     &unet, &schedule, Some(&y), &[4, 1, 28, 28], 2, 0.0, &SampleOptions::default(), &mut g,
//! )?;
//! assert_eq!(samples.dims(), &[4, 1, 28, 28]);
//! # Ok(())
//! # }
//! ```

use nerve_core::{no_grad, DType, Error, Generator, Result, Tensor};
use nerve_nn::loss::{mse_loss, Reduction};
use serde::{Deserialize, Serialize};

/// A network that predicts the noise `ε` in `x_t = sqrt(ᾱ_t) x_0 + sqrt(1 − ᾱ_t) ε`.
pub trait NoisePredictor {
    /// The predicted noise (shaped like `x_t`) of noisy images `x_t` at timesteps `t` `[B]`
    /// (i64) with class labels `[B]` (i64), or unconditionally (`None`).
    fn predict_noise(&self, x_t: &Tensor, t: &Tensor, labels: Option<&Tensor>) -> Result<Tensor>;

    /// The label meaning "no class", for label dropout in training (classifier-free
    /// guidance); `None` when the model has none.
    fn null_class(&self) -> Option<usize> {
        None
    }
}

/// How the noise variances `β_t` grow with `t`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BetaSchedule {
    /// `β_t` evenly spaced from `beta_start` to `beta_end` (DDPM: 1e-4 to 0.02).
    Linear {
        /// `β_0`.
        beta_start: f64,
        /// `β_{T−1}`.
        beta_end: f64,
    },
    /// The cosine schedule of Nichol & Dhariwal (2021): `ᾱ(τ) = cos²((τ + s)/(1 + s) · π/2)`,
    /// `β_t = min(1 − ᾱ((t+1)/T) / ᾱ(t/T), 0.999)`.
    Cosine {
        /// The small offset `s` (0.008).
        s: f64,
    },
}

/// The noise schedule of a diffusion model with `T` steps, in f64: `betas[t]` = `β_t`, and
/// the quantities derived from it, each indexed by `t` in `0..T`.
#[derive(Clone, Debug, PartialEq)]
pub struct DdpmSchedule {
    /// `β_t`.
    pub betas: Vec<f64>,
    /// `α_t = 1 − β_t`.
    pub alphas: Vec<f64>,
    /// `ᾱ_t = ∏_{s ≤ t} α_s`.
    pub alphas_cumprod: Vec<f64>,
    /// `ᾱ_{t−1}` (1 at `t = 0`).
    pub alphas_cumprod_prev: Vec<f64>,
    /// Variance of the posterior `q(x_{t−1} | x_t, x_0)`:
    /// `β̃_t = β_t (1 − ᾱ_{t−1}) / (1 − ᾱ_t)`.
    pub posterior_variance: Vec<f64>,
}

impl Default for DdpmSchedule {
    /// DDPM's: linear from 1e-4 to 0.02 over 1000 steps.
    fn default() -> Self {
        Self::from_betas(linear_betas(1000, 1e-4, 0.02)).expect("DDPM's schedule is valid")
    }
}

fn linear_betas(t: usize, start: f64, end: f64) -> Vec<f64> {
    if t == 1 {
        return vec![start];
    }
    (0..t)
        .map(|i| start + (end - start) * i as f64 / (t - 1) as f64)
        .collect()
}

impl DdpmSchedule {
    /// A schedule of `num_timesteps` steps of the given kind; refuses `num_timesteps = 0` and
    /// betas outside (0, 1), naming the field.
    pub fn new(num_timesteps: usize, kind: BetaSchedule) -> Result<Self> {
        if num_timesteps == 0 {
            return Err(Error::invalid(
                "DdpmSchedule",
                "num_timesteps must be at least 1",
            ));
        }
        let betas = match kind {
            BetaSchedule::Linear {
                beta_start,
                beta_end,
            } => {
                for (name, b) in [("beta_start", beta_start), ("beta_end", beta_end)] {
                    if !(b > 0.0 && b < 1.0) {
                        return Err(Error::invalid(
                            "DdpmSchedule",
                            format!("{name} ({b}) must be in (0, 1)"),
                        ));
                    }
                }
                linear_betas(num_timesteps, beta_start, beta_end)
            }
            BetaSchedule::Cosine { s } => {
                if !(s >= 0.0 && s.is_finite()) {
                    return Err(Error::invalid(
                        "DdpmSchedule",
                        format!("the cosine offset s ({s}) must be finite and ≥ 0"),
                    ));
                }
                let abar = |tau: f64| {
                    ((tau + s) / (1.0 + s) * std::f64::consts::FRAC_PI_2)
                        .cos()
                        .powi(2)
                };
                let n = num_timesteps as f64;
                (0..num_timesteps)
                    .map(|i| (1.0 - abar((i + 1) as f64 / n) / abar(i as f64 / n)).min(0.999))
                    .collect()
            }
        };
        Self::from_betas(betas)
    }

    /// DDPM's linear schedule from `beta_start` to `beta_end` over `num_timesteps` steps.
    pub fn linear(num_timesteps: usize, beta_start: f64, beta_end: f64) -> Result<Self> {
        Self::new(
            num_timesteps,
            BetaSchedule::Linear {
                beta_start,
                beta_end,
            },
        )
    }

    /// The cosine schedule (offset `s = 0.008`) over `num_timesteps` steps.
    pub fn cosine(num_timesteps: usize) -> Result<Self> {
        Self::new(num_timesteps, BetaSchedule::Cosine { s: 0.008 })
    }

    /// A schedule from explicit `β_t`, each in (0, 1).
    pub fn from_betas(betas: Vec<f64>) -> Result<Self> {
        if betas.is_empty() {
            return Err(Error::invalid("DdpmSchedule", "no betas"));
        }
        if let Some((t, b)) = betas
            .iter()
            .enumerate()
            .find(|(_, &b)| !(b > 0.0 && b < 1.0))
        {
            return Err(Error::invalid(
                "DdpmSchedule",
                format!("beta at t = {t} ({b}) must be in (0, 1)"),
            ));
        }
        let alphas: Vec<f64> = betas.iter().map(|b| 1.0 - b).collect();
        let alphas_cumprod: Vec<f64> = alphas
            .iter()
            .scan(1.0, |acc, a| {
                *acc *= a;
                Some(*acc)
            })
            .collect();
        let alphas_cumprod_prev: Vec<f64> = std::iter::once(1.0)
            .chain(alphas_cumprod[..alphas_cumprod.len() - 1].iter().copied())
            .collect();
        let posterior_variance = (0..betas.len())
            .map(|t| betas[t] * (1.0 - alphas_cumprod_prev[t]) / (1.0 - alphas_cumprod[t]))
            .collect();
        Ok(Self {
            betas,
            alphas,
            alphas_cumprod,
            alphas_cumprod_prev,
            posterior_variance,
        })
    }

    /// The number of diffusion steps `T`.
    pub fn num_timesteps(&self) -> usize {
        self.betas.len()
    }

    /// Timesteps `t` `[B]` (any dtype) as indices, each checked to be in `0..T`.
    fn timesteps(&self, op: &'static str, t: &Tensor, b: usize) -> Result<Vec<usize>> {
        if t.dims() != [b] {
            return Err(Error::bad_shape(
                op,
                t.dims(),
                format!("expected timesteps [{b}]"),
            ));
        }
        let n = self.num_timesteps();
        t.to_f64_vec()
            .into_iter()
            .map(|v| {
                if v >= 0.0 && v < n as f64 && v.fract() == 0.0 {
                    Ok(v as usize)
                } else {
                    Err(Error::invalid(op, format!("timestep {v} outside 0..{n}")))
                }
            })
            .collect()
    }

    /// `x_t = sqrt(ᾱ_t) x_0 + sqrt(1 − ᾱ_t) ε`: images `x0` `[B, ...]` noised to timesteps
    /// `t` `[B]` with `noise` (shaped like `x0`). Differentiable w.r.t. `x0` and `noise`.
    pub fn q_sample(&self, x0: &Tensor, t: &Tensor, noise: &Tensor) -> Result<Tensor> {
        const OP: &str = "q_sample";
        if x0.rank() == 0 {
            return Err(Error::bad_shape(OP, x0.dims(), "expected images [B, ...]"));
        }
        if noise.dims() != x0.dims() {
            return Err(Error::shape_mismatch(OP, x0.dims(), noise.dims()));
        }
        let ts = self.timesteps(OP, t, x0.dims()[0])?;
        let a = per_sample(&ts, |t| self.alphas_cumprod[t].sqrt(), x0.rank())?;
        let s = per_sample(&ts, |t| (1.0 - self.alphas_cumprod[t]).sqrt(), x0.rank())?;
        x0.mul(&a)?.add(&noise.mul(&s)?)
    }
}

/// `f(t_b)` per sample as f32 `[B, 1, …]` of rank `rank`, to broadcast over images.
fn per_sample(ts: &[usize], f: impl Fn(usize) -> f64, rank: usize) -> Result<Tensor> {
    let mut dims = vec![1usize; rank];
    dims[0] = ts.len();
    Tensor::from_vec(ts.iter().map(|&t| f(t) as f32).collect::<Vec<_>>(), dims)
}

/// The DDPM training loss: per image a timestep `t ~ U{0..T−1}` and noise `ε ~ N(0, 1)` from
/// `g`, then the mean squared error between the model's prediction on `q_sample(x0, t, ε)`
/// and `ε`. With `labels`, each is replaced by the model's null class with probability
/// `label_dropout` (classifier-free guidance training; needs
/// [`NoisePredictor::null_class`]).
pub fn ddpm_loss<M: NoisePredictor + ?Sized>(
    model: &M,
    schedule: &DdpmSchedule,
    x0: &Tensor,
    labels: Option<&Tensor>,
    label_dropout: f64,
    g: &mut Generator,
) -> Result<Tensor> {
    const OP: &str = "ddpm_loss";
    if x0.rank() < 2 {
        return Err(Error::bad_shape(OP, x0.dims(), "expected images [B, ...]"));
    }
    if !(0.0..=1.0).contains(&label_dropout) {
        return Err(Error::invalid(
            OP,
            format!("label_dropout ({label_dropout}) must be in [0, 1]"),
        ));
    }
    let b = x0.dims()[0];
    let n = schedule.num_timesteps() as u64;
    let t: Vec<i64> = (0..b).map(|_| g.below(n) as i64).collect();
    let t = Tensor::from_vec(t, [b])?;
    let noise = Tensor::randn_with(x0.dims(), g).to_dtype(x0.dtype())?;
    let x_t = no_grad(|| schedule.q_sample(&x0.detach(), &t, &noise))?;
    let labels = match labels {
        Some(y) if label_dropout > 0.0 => {
            let null = model.null_class().ok_or_else(|| {
                Error::invalid(OP, "label_dropout needs a model with a null class")
            })?;
            let dropped: Vec<i64> = y
                .to_f64_vec()
                .into_iter()
                .map(|v| {
                    if g.next_f64() < label_dropout {
                        null as i64
                    } else {
                        v as i64
                    }
                })
                .collect();
            Some(Tensor::from_vec(dropped, y.dims())?)
        }
        Some(y) => Some(y.clone()),
        None => None,
    };
    let eps = model.predict_noise(&x_t, &t, labels.as_ref())?;
    mse_loss(&eps, &noise, Reduction::Mean)
}

/// Which variance the ancestral DDPM sampler adds at each step (diffusers' names).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DdpmVariance {
    /// The posterior variance `β̃_t` (the lower bound of the reverse-process variance).
    #[default]
    FixedSmall,
    /// `β_t` (the upper bound).
    FixedLarge,
}

/// Options shared by the samplers.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SampleOptions {
    /// Classifier-free guidance: `ε = ε_uncond + scale · (ε_cond − ε_uncond)`. 1 (the
    /// default) uses the conditional prediction alone (one model call per step); ignored
    /// without labels.
    pub guidance_scale: f64,
    /// Clip each step's estimate of `x_0` to [-1, 1] (DDPM's `clip_denoised`).
    pub clip_denoised: bool,
    /// The ancestral sampler's added variance (DDPM only).
    pub variance: DdpmVariance,
}

impl Default for SampleOptions {
    fn default() -> Self {
        Self {
            guidance_scale: 1.0,
            clip_denoised: true,
            variance: DdpmVariance::FixedSmall,
        }
    }
}

/// The (guided) noise prediction at timestep `t` for every image of `x`.
fn guided_noise<M: NoisePredictor + ?Sized>(
    model: &M,
    x: &Tensor,
    t: usize,
    labels: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    let b = x.dims()[0];
    let t = Tensor::full_with([b], t as f64, DType::I64);
    match labels {
        Some(y) if scale != 1.0 => {
            let cond = model.predict_noise(x, &t, Some(y))?;
            let uncond = model.predict_noise(x, &t, None)?;
            uncond.add(&cond.sub(&uncond)?.mul_scalar(scale)?)
        }
        labels => model.predict_noise(x, &t, labels),
    }
}

/// The estimate of `x_0` from `x_t` and a noise prediction:
/// `(x_t − sqrt(1 − ᾱ_t) ε) / sqrt(ᾱ_t)`, optionally clipped to [-1, 1].
fn predict_x0(x: &Tensor, eps: &Tensor, abar: f64, clip: bool) -> Result<Tensor> {
    let x0 = x
        .mul_scalar(1.0 / abar.sqrt())?
        .sub(&eps.mul_scalar((1.0 / abar - 1.0).sqrt())?)?;
    if clip {
        x0.clamp(Some(-1.0), Some(1.0))
    } else {
        Ok(x0)
    }
}

fn check_sampling(
    op: &'static str,
    x: &Tensor,
    labels: Option<&Tensor>,
    opts: &SampleOptions,
) -> Result<()> {
    if x.rank() < 2 || x.dims()[0] == 0 {
        return Err(Error::bad_shape(
            op,
            x.dims(),
            "expected a shape [B, ...], B ≥ 1",
        ));
    }
    if let Some(y) = labels {
        if y.dims() != [x.dims()[0]] {
            return Err(Error::bad_shape(
                op,
                y.dims(),
                format!("expected labels [{}]", x.dims()[0]),
            ));
        }
    }
    if !opts.guidance_scale.is_finite() {
        return Err(Error::invalid(op, "guidance_scale must be finite"));
    }
    Ok(())
}

/// Ancestral DDPM sampling: from `x_T ~ N(0, 1)` shaped `shape` (drawn from `g`) through all
/// `T` steps, `x_{t−1} = μ̃_t(x_t, x̂_0) + σ_t z` with `σ_t² = β̃_t` or `β_t`
/// (`opts.variance`) and no noise at the last step. Labels `[B]` condition every image (see
/// [`SampleOptions::guidance_scale`]). Returns `x_0`; no gradients are recorded.
pub fn sample_ddpm<M: NoisePredictor + ?Sized>(
    model: &M,
    schedule: &DdpmSchedule,
    labels: Option<&Tensor>,
    shape: &[usize],
    opts: &SampleOptions,
    g: &mut Generator,
) -> Result<Tensor> {
    let x_t = Tensor::randn_with(shape, g);
    ddpm_sample_from(model, schedule, &x_t, labels, opts, g)
}

/// [`sample_ddpm`] from a given `x_T` (at timestep `T − 1`).
pub fn ddpm_sample_from<M: NoisePredictor + ?Sized>(
    model: &M,
    schedule: &DdpmSchedule,
    x_t: &Tensor,
    labels: Option<&Tensor>,
    opts: &SampleOptions,
    g: &mut Generator,
) -> Result<Tensor> {
    check_sampling("sample_ddpm", x_t, labels, opts)?;
    let s = schedule;
    no_grad(|| {
        let mut x = x_t.detach();
        for t in (0..s.num_timesteps()).rev() {
            let eps = guided_noise(model, &x, t, labels, opts.guidance_scale)?;
            let abar = s.alphas_cumprod[t];
            let x0 = predict_x0(&x, &eps, abar, opts.clip_denoised)?;
            // Posterior mean μ̃_t = c0 x̂_0 + c1 x_t.
            let c0 = s.betas[t] * s.alphas_cumprod_prev[t].sqrt() / (1.0 - abar);
            let c1 = (1.0 - s.alphas_cumprod_prev[t]) * s.alphas[t].sqrt() / (1.0 - abar);
            let mean = x0.mul_scalar(c0)?.add(&x.mul_scalar(c1)?)?;
            x = if t > 0 {
                let var = match opts.variance {
                    DdpmVariance::FixedSmall => s.posterior_variance[t],
                    DdpmVariance::FixedLarge => s.betas[t],
                };
                let z = Tensor::randn_with(x.dims(), g);
                mean.add(&z.mul_scalar(var.sqrt())?)?
            } else {
                mean
            };
        }
        Ok(x)
    })
}

/// The timesteps DDIM visits in `steps` steps out of `num_timesteps`, from the noisiest
/// down: evenly spaced and ending on the last one ("trailing" spacing: `T − 1` first, so the
/// start is pure noise). `steps = T` visits every timestep.
pub fn ddim_timesteps(num_timesteps: usize, steps: usize) -> Vec<usize> {
    (0..steps)
        .map(|i| {
            let v = num_timesteps as f64 * (steps - i) as f64 / steps as f64;
            (v.round() as usize).saturating_sub(1)
        })
        .collect()
}

/// DDIM sampling in `steps` steps (see [`ddim_timesteps`]) from `x_T ~ N(0, 1)` shaped
/// `shape` (drawn from `g`): `x_{t'} = sqrt(ᾱ_{t'}) x̂_0 + sqrt(1 − ᾱ_{t'} − σ²) ε̂ + σ z`
/// with `σ = eta · sqrt((1 − ᾱ_{t'})/(1 − ᾱ_t) · (1 − ᾱ_t/ᾱ_{t'}))`; `eta = 0` is
/// deterministic, `eta = 1` is DDPM-like. The last step goes to `ᾱ = 1`. Returns `x_0`; no
/// gradients are recorded.
#[allow(clippy::too_many_arguments)]
pub fn sample_ddim<M: NoisePredictor + ?Sized>(
    model: &M,
    schedule: &DdpmSchedule,
    labels: Option<&Tensor>,
    shape: &[usize],
    steps: usize,
    eta: f64,
    opts: &SampleOptions,
    g: &mut Generator,
) -> Result<Tensor> {
    let x_t = Tensor::randn_with(shape, g);
    ddim_sample_from(model, schedule, &x_t, labels, steps, eta, opts, g)
}

/// [`sample_ddim`] from a given `x_T` (at the first of [`ddim_timesteps`], `T − 1`).
#[allow(clippy::too_many_arguments)]
pub fn ddim_sample_from<M: NoisePredictor + ?Sized>(
    model: &M,
    schedule: &DdpmSchedule,
    x_t: &Tensor,
    labels: Option<&Tensor>,
    steps: usize,
    eta: f64,
    opts: &SampleOptions,
    g: &mut Generator,
) -> Result<Tensor> {
    const OP: &str = "sample_ddim";
    check_sampling(OP, x_t, labels, opts)?;
    let n = schedule.num_timesteps();
    if steps == 0 || steps > n {
        return Err(Error::invalid(
            OP,
            format!("steps ({steps}) must be in 1..={n} (the schedule's timesteps)"),
        ));
    }
    if !(eta >= 0.0 && eta.is_finite()) {
        return Err(Error::invalid(OP, format!("eta ({eta}) must be ≥ 0")));
    }
    let ts = ddim_timesteps(n, steps);
    no_grad(|| {
        let mut x = x_t.detach();
        for (i, &t) in ts.iter().enumerate() {
            let abar = schedule.alphas_cumprod[t];
            let abar_next = ts.get(i + 1).map_or(1.0, |&tn| schedule.alphas_cumprod[tn]);
            let mut eps = guided_noise(model, &x, t, labels, opts.guidance_scale)?;
            let x0 = predict_x0(&x, &eps, abar, opts.clip_denoised)?;
            if opts.clip_denoised {
                // The noise that the clipped x̂_0 implies.
                eps = x
                    .sub(&x0.mul_scalar(abar.sqrt())?)?
                    .mul_scalar(1.0 / (1.0 - abar).sqrt())?;
            }
            let sigma = eta
                * ((1.0 - abar_next) / (1.0 - abar) * (1.0 - abar / abar_next))
                    .max(0.0)
                    .sqrt();
            let dir = (1.0 - abar_next - sigma * sigma).max(0.0).sqrt();
            x = x0
                .mul_scalar(abar_next.sqrt())?
                .add(&eps.mul_scalar(dir)?)?;
            if sigma > 0.0 {
                x = x.add(&Tensor::randn_with(x.dims(), g).mul_scalar(sigma)?)?;
            }
        }
        Ok(x)
    })
}
