//! Learning-rate schedules, as pure functions of the step (or epoch) count, with PyTorch's
//! formulas: call [`LrSchedule::lr`] and pass the result to `Optimizer::set_lr`.

use std::f64::consts::PI;

/// A learning rate as a function of the step count.
#[derive(Clone, Debug, PartialEq)]
pub enum LrSchedule {
    /// The base rate throughout.
    Constant,
    /// Multiply by `gamma` every `step_size` steps (StepLR).
    Step {
        /// Steps between decays.
        step_size: usize,
        /// Decay factor.
        gamma: f64,
    },
    /// Multiply by `gamma` at each milestone (MultiStepLR).
    MultiStep {
        /// Steps at which to decay, ascending.
        milestones: Vec<usize>,
        /// Decay factor.
        gamma: f64,
    },
    /// Multiply by `gamma` every step (ExponentialLR).
    Exponential {
        /// Decay factor.
        gamma: f64,
    },
    /// Cosine from the base rate to `eta_min` over `t_max` steps (CosineAnnealingLR).
    Cosine {
        /// Length of the half period.
        t_max: usize,
        /// Final rate.
        eta_min: f64,
    },
    /// Linear warm-up from 0 over `warmup` steps, then cosine to `eta_min` at `total`.
    WarmupCosine {
        /// Warm-up steps.
        warmup: usize,
        /// Total steps.
        total: usize,
        /// Final rate.
        eta_min: f64,
    },
    /// One-cycle (OneCycleLR, cosine, two phases): from `base/div_factor` up to the base
    /// (the maximum) over `pct_start` of `total`, then down to `base/(div_factor·final_div_factor)`.
    OneCycle {
        /// Total steps.
        total: usize,
        /// Fraction of steps spent rising (PyTorch: 0.3).
        pct_start: f64,
        /// Initial rate = max / div_factor (PyTorch: 25).
        div_factor: f64,
        /// Final rate = initial / final_div_factor (PyTorch: 1e4).
        final_div_factor: f64,
    },
}

fn cos_interp(from: f64, to: f64, frac: f64) -> f64 {
    to + (from - to) * (1.0 + (PI * frac.clamp(0.0, 1.0)).cos()) / 2.0
}

impl LrSchedule {
    /// The rate at `step` (0-based) for base rate `base`.
    pub fn lr(&self, base: f64, step: usize) -> f64 {
        match self {
            LrSchedule::Constant => base,
            LrSchedule::Step { step_size, gamma } => {
                base * gamma.powi((step / (*step_size).max(1)) as i32)
            }
            LrSchedule::MultiStep { milestones, gamma } => {
                base * gamma.powi(milestones.iter().filter(|&&m| m <= step).count() as i32)
            }
            LrSchedule::Exponential { gamma } => base * gamma.powi(step as i32),
            LrSchedule::Cosine { t_max, eta_min } => {
                cos_interp(base, *eta_min, step as f64 / (*t_max).max(1) as f64)
            }
            LrSchedule::WarmupCosine {
                warmup,
                total,
                eta_min,
            } => {
                if step < *warmup {
                    base * (step + 1) as f64 / *warmup as f64
                } else {
                    let span = total.saturating_sub(*warmup).max(1);
                    cos_interp(base, *eta_min, (step - warmup) as f64 / span as f64)
                }
            }
            LrSchedule::OneCycle {
                total,
                pct_start,
                div_factor,
                final_div_factor,
            } => {
                let initial = base / div_factor;
                let min = initial / final_div_factor;
                let up = (pct_start * *total as f64 - 1.0).max(1.0);
                let s = step as f64;
                if s <= up {
                    cos_interp(initial, base, s / up)
                } else {
                    let down = (*total as f64 - 1.0 - up).max(1.0);
                    cos_interp(base, min, (s - up) / down)
                }
            }
        }
    }
}
