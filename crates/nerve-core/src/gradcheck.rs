//! Finite-difference gradient checks: the analytic gradient of every differentiable op is
//! compared with central differences computed in f64.

use crate::random::Generator;
use crate::{no_grad, DType, Error, Result, Tensor};

/// Tolerances and step of a gradient check.
#[derive(Clone, Copy, Debug)]
pub struct GradCheck {
    /// Finite-difference step.
    pub eps: f64,
    /// Absolute tolerance.
    pub atol: f64,
    /// Relative tolerance.
    pub rtol: f64,
}

impl Default for GradCheck {
    /// PyTorch's `gradcheck` defaults: eps 1e-6, atol 1e-5, rtol 1e-3.
    fn default() -> Self {
        GradCheck {
            eps: 1e-6,
            atol: 1e-5,
            rtol: 1e-3,
        }
    }
}

/// Check the gradients of `f` at `inputs` with the default tolerances. Only f64 inputs are
/// differentiated (others, e.g. i64 indices, are passed through).
pub fn gradcheck(f: impl Fn(&[Tensor]) -> Result<Tensor>, inputs: &[Tensor]) -> Result<()> {
    GradCheck::default().check(f, inputs)
}

impl GradCheck {
    /// Compare the analytic gradient of `sum(f(inputs) * w)` (w random, fixed) with central
    /// differences, input by input, element by element. The error describes the first
    /// element that disagrees.
    pub fn check(&self, f: impl Fn(&[Tensor]) -> Result<Tensor>, inputs: &[Tensor]) -> Result<()> {
        let leaves: Vec<Tensor> = inputs
            .iter()
            .map(|x| {
                let x = x.detach().contiguous().unwrap_or_else(|_| x.detach());
                let differentiable = x.dtype() == DType::F64;
                x.detach().requires_grad_(differentiable)
            })
            .collect();
        let out = f(&leaves)?;
        if out.dtype() != DType::F64 {
            return Err(Error::invalid("gradcheck", "f must return an f64 tensor"));
        }
        let mut gen = Generator::new(1234);
        let w = Tensor::uniform_with(out.dims(), 0.5, 1.5, &mut gen).to_dtype(DType::F64)?;
        let loss = |xs: &[Tensor]| -> Result<f64> {
            let o = no_grad(|| f(xs))?;
            Ok(o.to_f64_vec()
                .iter()
                .zip(w.to_f64_vec())
                .map(|(a, b)| a * b)
                .sum())
        };
        if out.requires_grad() {
            out.mul(&w)?.sum()?.backward()?;
        }
        for (i, leaf) in leaves.iter().enumerate() {
            if leaf.dtype() != DType::F64 {
                continue;
            }
            let analytic = match leaf.grad() {
                Some(g) => g.to_f64_vec(),
                None => vec![0.0; leaf.numel()],
            };
            let base = leaf.to_vec::<f64>()?;
            for j in 0..base.len() {
                let mut xs: Vec<Tensor> = leaves.iter().map(|t| t.detach()).collect();
                let mut plus = base.clone();
                plus[j] += self.eps;
                xs[i] = Tensor::from_vec(plus, leaf.dims())?;
                let lp = loss(&xs)?;
                let mut minus = base.clone();
                minus[j] -= self.eps;
                xs[i] = Tensor::from_vec(minus, leaf.dims())?;
                let lm = loss(&xs)?;
                let numeric = (lp - lm) / (2.0 * self.eps);
                let a = analytic[j];
                let close = (a - numeric).abs() <= self.atol + self.rtol * numeric.abs();
                if !close {
                    return Err(Error::invalid(
                        "gradcheck",
                        format!(
                            "input {i} (shape {:?}) element {j}: analytic {a:.8e} vs numeric \
                             {numeric:.8e}",
                            leaf.dims()
                        ),
                    ));
                }
            }
        }
        Ok(())
    }
}
