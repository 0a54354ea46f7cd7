//! Optimizers (PyTorch's update rules, in place), gradient clipping, and optimizer state that
//! is saved and restored with checkpoints.
//!
//! Gradient accumulation needs nothing special: call `backward()` on several micro-batches
//! (gradients add up, as in PyTorch), then `step()` and `zero_grad()`.

use std::collections::HashMap;

use nerve_core::{DType, Error, Float, Result, Tensor};

/// One chunk of a parameter, its gradient and its state buffers.
type Part<'a, T> = (&'a mut [T], &'a [T], Vec<&'a mut [T]>);

/// Elements per task of a parallel update (below this, one thread does the whole tensor).
const CHUNK: usize = 1 << 15;

/// Run `f(param, grad, states)` over aligned chunks of a parameter, its gradient and its state
/// tensors (all contiguous, dtype `T`), in place, in parallel for large tensors, with the
/// loops compiled for the machine's SIMD.
fn update<T, F>(p: &Tensor, g: &Tensor, states: &[Tensor], f: F) -> Result<()>
where
    T: Float,
    F: Fn(&mut [T], &[T], &mut [&mut [T]]) + Sync,
{
    let g = g.contiguous()?;
    g.with_data::<T, _>(|gs| {
        p.with_data_mut::<T, _>(|ps| -> Result<()> {
            let mut run = |states: Vec<&mut [T]>| {
                let mut iters: Vec<_> = states.into_iter().map(|s| s.chunks_mut(CHUNK)).collect();
                let parts: Vec<Part<'_, T>> = ps
                    .chunks_mut(CHUNK)
                    .zip(gs.chunks(CHUNK))
                    .map(|(pc, gc)| {
                        (
                            pc,
                            gc,
                            iters.iter_mut().filter_map(Iterator::next).collect(),
                        )
                    })
                    .collect();
                let body = |(pc, gc, mut sc): (&mut [T], &[T], Vec<&mut [T]>)| {
                    nerve_core::kernels::with_simd(|| f(pc, gc, &mut sc))
                };
                if parts.len() > 1 {
                    use rayon::prelude::*;
                    nerve_core::threading::install(|| parts.into_par_iter().for_each(body));
                } else {
                    parts.into_iter().for_each(body);
                }
            };
            match states {
                [] => run(Vec::new()),
                [a] => a.with_data_mut::<T, _>(|a| run(vec![a]))?,
                [a, b] => {
                    a.with_data_mut::<T, _>(|a| b.with_data_mut::<T, _>(|b| run(vec![a, b])))??
                }
                _ => {
                    return Err(Error::invalid(
                        "optimizer",
                        "at most two state buffers per parameter",
                    ))
                }
            }
            Ok(())
        })
    })???;
    Ok(())
}

/// Run `$body` with `$T` bound to the parameter's float type (f32 or f64).
macro_rules! for_float {
    ($p:expr, $T:ident => $body:block) => {
        match $p.dtype() {
            DType::F32 => {
                type $T = f32;
                $body
            }
            DType::F64 => {
                type $T = f64;
                $body
            }
            d => Err(Error::invalid(
                "optimizer",
                format!("parameters must be f32 or f64, got {d:?}"),
            )),
        }
    };
}

/// The [`Optimizer`] methods every optimizer here shares (fields `params`, `lr`, `state`).
macro_rules! common_optimizer_methods {
    () => {
        fn params(&self) -> &[Tensor] {
            &self.params
        }
        fn lr(&self) -> f64 {
            self.lr
        }
        fn set_lr(&mut self, lr: f64) {
            self.lr = lr;
        }
        fn state_dict(&self) -> Vec<(String, Tensor)> {
            self.state.state_dict()
        }
        fn load_state_dict(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
            self.state.load(&self.params, state)
        }
    };
}

/// An optimizer over a fixed list of parameters.
pub trait Optimizer {
    /// Update every parameter that has a gradient.
    fn step(&mut self) -> Result<()>;
    /// The parameters.
    fn params(&self) -> &[Tensor];
    /// Clear every parameter's gradient.
    fn zero_grad(&self) {
        for p in self.params() {
            p.zero_grad();
        }
    }
    /// Current learning rate.
    fn lr(&self) -> f64;
    /// Set the learning rate (for schedules).
    fn set_lr(&mut self, lr: f64);
    /// State tensors by name (`state.<param index>.<buffer>` and `state.<param index>.step`,
    /// as in PyTorch's optimizer `state_dict`), for checkpoints.
    fn state_dict(&self) -> Vec<(String, Tensor)>;
    /// Restore state saved by [`Optimizer::state_dict`]; shapes are checked before anything
    /// is changed.
    fn load_state_dict(&mut self, state: &HashMap<String, Tensor>) -> Result<()>;
}

/// Per-parameter state buffers and step counts (created lazily, per parameter, like
/// PyTorch's: a parameter that first gets a gradient late starts at step 1).
struct State {
    names: &'static [&'static str],
    bufs: Vec<Option<Vec<Tensor>>>,
    steps: Vec<u64>,
}

impl State {
    fn new(n: usize, names: &'static [&'static str]) -> Self {
        Self {
            names,
            bufs: vec![None; n],
            steps: vec![0; n],
        }
    }

    /// Count one more step of parameter `i` and return its step number (from 1).
    fn tick(&mut self, i: usize) -> u64 {
        self.steps[i] += 1;
        self.steps[i]
    }

    fn get(&mut self, i: usize, p: &Tensor) -> Vec<Tensor> {
        self.bufs[i]
            .get_or_insert_with(|| {
                self.names
                    .iter()
                    .map(|_| Tensor::zeros_like(&p.detach()))
                    .collect()
            })
            .clone()
    }

    fn state_dict(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for (i, b) in self.bufs.iter().enumerate() {
            if self.steps[i] > 0 {
                out.push((
                    format!("state.{i}.step"),
                    Tensor::scalar(self.steps[i] as i64),
                ));
            }
            if let Some(b) = b {
                for (n, t) in self.names.iter().zip(b) {
                    out.push((format!("state.{i}.{n}"), t.clone()));
                }
            }
        }
        out
    }

    fn load(&mut self, params: &[Tensor], state: &HashMap<String, Tensor>) -> Result<()> {
        const OP: &str = "optimizer state";
        // Every key must be ours: state from another optimizer is an error, not half a load.
        for k in state.keys() {
            let ok = k
                .strip_prefix("state.")
                .and_then(|r| r.split_once('.'))
                .is_some_and(|(i, n)| {
                    i.parse::<usize>().is_ok_and(|i| i < params.len())
                        && (n == "step" || self.names.contains(&n))
                });
            if !ok {
                return Err(Error::invalid(
                    OP,
                    format!("unexpected entry `{k}` (state of another optimizer or model?)"),
                ));
            }
        }
        let mut bufs = vec![None; params.len()];
        let mut steps = vec![0; params.len()];
        for (i, p) in params.iter().enumerate() {
            let mut found = Vec::new();
            for n in self.names {
                if let Some(t) = state.get(&format!("state.{i}.{n}")) {
                    if t.dims() != p.dims() {
                        return Err(Error::shape_mismatch(OP, p.dims(), t.dims()));
                    }
                    found.push(t.to_dtype(p.dtype())?.copy()?);
                }
            }
            if found.len() == self.names.len() {
                bufs[i] = Some(found);
            } else if !found.is_empty() {
                return Err(Error::invalid(
                    OP,
                    format!("parameter {i} has only part of its state"),
                ));
            }
            if let Some(s) = state.get(&format!("state.{i}.step")) {
                steps[i] = s.to_f64_vec().first().copied().unwrap_or(0.0) as u64;
            }
        }
        self.bufs = bufs;
        self.steps = steps;
        Ok(())
    }
}

/// Stochastic gradient descent with momentum, dampening, Nesterov and (L2) weight decay.
pub struct Sgd {
    params: Vec<Tensor>,
    /// Learning rate.
    pub lr: f64,
    /// Momentum factor (0: none).
    pub momentum: f64,
    /// Dampening of the momentum.
    pub dampening: f64,
    /// Nesterov momentum.
    pub nesterov: bool,
    /// L2 penalty added to the gradient.
    pub weight_decay: f64,
    state: State,
}

impl Sgd {
    /// `SGD(params, lr)` with no momentum or decay.
    pub fn new(params: Vec<Tensor>, lr: f64) -> Self {
        let n = params.len();
        Self {
            params,
            lr,
            momentum: 0.0,
            dampening: 0.0,
            nesterov: false,
            weight_decay: 0.0,
            state: State::new(n, &["momentum_buffer"]),
        }
    }
}

impl Optimizer for Sgd {
    fn step(&mut self) -> Result<()> {
        for (i, p) in self.params.iter().enumerate() {
            let Some(g) = p.grad() else { continue };
            let first = self.state.tick(i) == 1;
            let bufs = if self.momentum != 0.0 {
                self.state.get(i, p)
            } else {
                Vec::new()
            };
            let (lr, mom, damp, nest, wd) = (
                self.lr,
                self.momentum,
                self.dampening,
                self.nesterov,
                self.weight_decay,
            );
            for_float!(p, T => {
                let (lr, mom, damp, wd) = (lr as T, mom as T, damp as T, wd as T);
                update::<T, _>(p, &g, &bufs, |p, g, s| {
                    for k in 0..p.len() {
                        let mut d = g[k] + wd * p[k];
                        if let Some(b) = s.first_mut() {
                            let nb = if first { d } else { mom * b[k] + (1.0 - damp) * d };
                            b[k] = nb;
                            d = if nest { d + mom * nb } else { nb };
                        }
                        p[k] -= lr * d;
                    }
                })
            })?;
        }
        Ok(())
    }
    common_optimizer_methods!();
}

/// Adam, and AdamW (decoupled weight decay) with `decoupled = true`.
pub struct Adam {
    params: Vec<Tensor>,
    /// Learning rate.
    pub lr: f64,
    /// `(beta1, beta2)`.
    pub betas: (f64, f64),
    /// Added to the denominator.
    pub eps: f64,
    /// Weight decay: L2 in the gradient for Adam, decoupled for AdamW.
    pub weight_decay: f64,
    /// AdamW's decoupled decay.
    pub decoupled: bool,
    state: State,
}

impl Adam {
    /// `Adam(params, lr)`: betas (0.9, 0.999), eps 1e-8, no decay.
    pub fn new(params: Vec<Tensor>, lr: f64) -> Self {
        let n = params.len();
        Self {
            params,
            lr,
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 0.0,
            decoupled: false,
            state: State::new(n, &["exp_avg", "exp_avg_sq"]),
        }
    }

    /// `AdamW(params, lr, weight_decay)` (PyTorch's default decay is 0.01).
    pub fn adamw(params: Vec<Tensor>, lr: f64, weight_decay: f64) -> Self {
        Self {
            weight_decay,
            decoupled: true,
            ..Self::new(params, lr)
        }
    }
}

impl Optimizer for Adam {
    fn step(&mut self) -> Result<()> {
        let (b1, b2) = self.betas;
        let (lr, eps, wd, decoupled) = (self.lr, self.eps, self.weight_decay, self.decoupled);
        for (i, p) in self.params.iter().enumerate() {
            let Some(g) = p.grad() else { continue };
            let t = self.state.tick(i) as i32;
            // PyTorch's form: p -= (lr / bc1) · m / (sqrt(v) / sqrt(bc2) + eps).
            let step_size = lr / (1.0 - b1.powi(t));
            let bc2_sqrt = (1.0 - b2.powi(t)).sqrt();
            let bufs = self.state.get(i, p);
            for_float!(p, T => {
                let (b1, b2, eps, step_size, bc2_sqrt) = (b1 as T, b2 as T, eps as T, step_size as T, bc2_sqrt as T);
                let (decay, l2) = if decoupled { (1.0 - (lr * wd) as T, 0.0) } else { (1.0, wd as T) };
                update::<T, _>(p, &g, &bufs, |p, g, s| {
                    let (m, v) = s.split_at_mut(1);
                    let (m, v) = (&mut *m[0], &mut *v[0]);
                    // The operation order of PyTorch's single-tensor Adam(W), so f32 results
                    // round the same way.
                    for k in 0..p.len() {
                        let pk = p[k] * decay;
                        let gk = g[k] + l2 * p[k];
                        let mk = m[k] + (1.0 - b1) * (gk - m[k]);
                        let vk = v[k] * b2 + (1.0 - b2) * (gk * gk);
                        m[k] = mk;
                        v[k] = vk;
                        p[k] = pk + -step_size * (mk / (vk.sqrt() / bc2_sqrt + eps));
                    }
                })
            })?;
        }
        Ok(())
    }
    common_optimizer_methods!();
}

/// RMSprop (non-centred), with optional momentum and L2 weight decay.
pub struct RmsProp {
    params: Vec<Tensor>,
    /// Learning rate.
    pub lr: f64,
    /// Smoothing constant of the squared-gradient average.
    pub alpha: f64,
    /// Added to the denominator.
    pub eps: f64,
    /// Momentum factor.
    pub momentum: f64,
    /// L2 penalty.
    pub weight_decay: f64,
    state: State,
}

impl RmsProp {
    /// `RMSprop(params, lr)`: alpha 0.99, eps 1e-8.
    pub fn new(params: Vec<Tensor>, lr: f64) -> Self {
        let n = params.len();
        Self {
            params,
            lr,
            alpha: 0.99,
            eps: 1e-8,
            momentum: 0.0,
            weight_decay: 0.0,
            state: State::new(n, &["square_avg", "momentum_buffer"]),
        }
    }
}

impl Optimizer for RmsProp {
    fn step(&mut self) -> Result<()> {
        let (lr, alpha, eps, mom, wd) = (
            self.lr,
            self.alpha,
            self.eps,
            self.momentum,
            self.weight_decay,
        );
        for (i, p) in self.params.iter().enumerate() {
            let Some(g) = p.grad() else { continue };
            self.state.tick(i);
            let bufs = self.state.get(i, p);
            for_float!(p, T => {
                let (lr, alpha, eps, mom, wd) = (lr as T, alpha as T, eps as T, mom as T, wd as T);
                update::<T, _>(p, &g, &bufs, |p, g, s| {
                    let (sq, buf) = s.split_at_mut(1);
                    let (sq, buf) = (&mut *sq[0], &mut *buf[0]);
                    for k in 0..p.len() {
                        let gk = g[k] + wd * p[k];
                        let a = alpha * sq[k] + (1.0 - alpha) * gk * gk;
                        sq[k] = a;
                        let upd = gk / (a.sqrt() + eps);
                        let d = if mom > 0.0 {
                            buf[k] = mom * buf[k] + upd;
                            buf[k]
                        } else {
                            upd
                        };
                        p[k] -= lr * d;
                    }
                })
            })?;
        }
        Ok(())
    }
    common_optimizer_methods!();
}

/// Adagrad with learning-rate decay and L2 weight decay.
pub struct Adagrad {
    params: Vec<Tensor>,
    /// Learning rate.
    pub lr: f64,
    /// Learning-rate decay per step.
    pub lr_decay: f64,
    /// L2 penalty.
    pub weight_decay: f64,
    /// Added to the denominator (PyTorch: 1e-10).
    pub eps: f64,
    state: State,
}

impl Adagrad {
    /// `Adagrad(params, lr)`.
    pub fn new(params: Vec<Tensor>, lr: f64) -> Self {
        let n = params.len();
        Self {
            params,
            lr,
            lr_decay: 0.0,
            weight_decay: 0.0,
            eps: 1e-10,
            state: State::new(n, &["sum"]),
        }
    }
}

impl Optimizer for Adagrad {
    fn step(&mut self) -> Result<()> {
        let (eps, wd) = (self.eps, self.weight_decay);
        for (i, p) in self.params.iter().enumerate() {
            let Some(g) = p.grad() else { continue };
            let clr = self.lr / (1.0 + (self.state.tick(i) - 1) as f64 * self.lr_decay);
            let bufs = self.state.get(i, p);
            for_float!(p, T => {
                let (clr, eps, wd) = (clr as T, eps as T, wd as T);
                update::<T, _>(p, &g, &bufs, |p, g, s| {
                    let sum = &mut *s[0];
                    for k in 0..p.len() {
                        let gk = g[k] + wd * p[k];
                        sum[k] += gk * gk;
                        p[k] -= clr * gk / (sum[k].sqrt() + eps);
                    }
                })
            })?;
        }
        Ok(())
    }
    common_optimizer_methods!();
}

/// The global L2 norm of the gradients of `params` (those that have one), summed in f64;
/// NaN or infinite if any gradient element is.
pub fn grad_norm(params: &[Tensor]) -> Result<f64> {
    let total: f64 = params
        .iter()
        .filter_map(Tensor::grad)
        .map(|g| g.to_f64_vec().iter().map(|v| v * v).sum::<f64>())
        .sum();
    Ok(total.sqrt())
}

/// Scale all gradients so that their global L2 norm is at most `max_norm`; returns the norm
/// before clipping (PyTorch's `clip_grad_norm_`). A non-finite norm leaves the gradients as
/// they are.
pub fn clip_grad_norm(params: &[Tensor], max_norm: f64) -> Result<f64> {
    let norm = grad_norm(params)?;
    let coef = max_norm / (norm + 1e-6);
    if coef < 1.0 {
        for p in params {
            if let Some(g) = p.grad() {
                p.set_grad(Some(g.mul_scalar(coef)?));
            }
        }
    }
    Ok(norm)
}

/// A non-finite number found in a parameter or its gradient by [`first_nonfinite`].
#[derive(Clone, Debug, PartialEq)]
pub struct NonFinite {
    /// The parameter's name.
    pub name: String,
    /// Whether the number is in the gradient (else in the parameter's value).
    pub in_grad: bool,
    /// The flat index of the first such element.
    pub index: usize,
    /// The value there (NaN or ±inf).
    pub value: f64,
}

impl std::fmt::Display for NonFinite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = if self.in_grad { "the gradient of" } else { "" };
        write!(
            f,
            "{what}{}`{}` holds {} (element {})",
            if self.in_grad { " " } else { "" },
            self.name,
            self.value,
            self.index
        )
    }
}

/// The first parameter (in `named` order) whose value holds a NaN or infinity, or failing
/// that the first whose gradient does: where a diverging step shows itself first.
pub fn first_nonfinite(named: &[(String, Tensor)]) -> Option<NonFinite> {
    let find = |t: &Tensor| t.to_f64_vec().iter().position(|v| !v.is_finite());
    for in_grad in [false, true] {
        for (name, p) in named {
            let t = if in_grad {
                match p.grad() {
                    Some(g) => g,
                    None => continue,
                }
            } else {
                p.clone()
            };
            if let Some(index) = find(&t) {
                return Some(NonFinite {
                    name: name.clone(),
                    in_grad,
                    index,
                    value: t.to_f64_vec()[index],
                });
            }
        }
    }
    None
}

/// Clamp every gradient element to `[-clip, clip]`.
pub fn clip_grad_value(params: &[Tensor], clip: f64) -> Result<()> {
    for p in params {
        if let Some(g) = p.grad() {
            p.set_grad(Some(g.clamp(Some(-clip), Some(clip))?));
        }
    }
    Ok(())
}
