//! Random tensors from the global seeded generator or an explicit one, and dropout.

use crate::random::{with_global, Generator};
use crate::shape::Shape;
use crate::{DType, Error, Result, Tensor};

impl Tensor {
    /// Uniform samples in [0, 1), f32, from the global generator.
    pub fn rand(shape: impl Into<Shape>) -> Tensor {
        with_global(|g| Tensor::rand_with(shape, g))
    }
    /// Uniform samples in [0, 1), f32.
    pub fn rand_with(shape: impl Into<Shape>, g: &mut Generator) -> Tensor {
        let shape = shape.into();
        let v: Vec<f32> = (0..shape.numel()).map(|_| g.next_f32()).collect();
        Tensor::from_buf(v, shape.dims())
    }
    /// Standard normal samples, f32, from the global generator.
    pub fn randn(shape: impl Into<Shape>) -> Tensor {
        with_global(|g| Tensor::randn_with(shape, g))
    }
    /// Standard normal samples, f32.
    pub fn randn_with(shape: impl Into<Shape>, g: &mut Generator) -> Tensor {
        let shape = shape.into();
        let mut v = vec![0f64; shape.numel()];
        g.fill_normal(&mut v);
        Tensor::from_buf(
            v.into_iter().map(|x| x as f32).collect::<Vec<f32>>(),
            shape.dims(),
        )
    }
    /// Uniform samples in [lo, hi), f32, from the global generator.
    pub fn uniform(shape: impl Into<Shape>, lo: f64, hi: f64) -> Tensor {
        with_global(|g| Tensor::uniform_with(shape, lo, hi, g))
    }
    /// Uniform samples in [lo, hi), f32.
    pub fn uniform_with(shape: impl Into<Shape>, lo: f64, hi: f64, g: &mut Generator) -> Tensor {
        let shape = shape.into();
        let v: Vec<f32> = (0..shape.numel())
            .map(|_| (lo + (hi - lo) * g.next_f64()) as f32)
            .collect();
        Tensor::from_buf(v, shape.dims())
    }
    /// Random integers in [lo, hi), i64, from the global generator.
    pub fn randint(shape: impl Into<Shape>, lo: i64, hi: i64) -> Result<Tensor> {
        if hi <= lo {
            return Err(Error::invalid("randint", format!("empty range {lo}..{hi}")));
        }
        let shape = shape.into();
        Ok(with_global(|g| {
            let v: Vec<i64> = (0..shape.numel())
                .map(|_| lo + g.below((hi - lo) as u64) as i64)
                .collect();
            Tensor::from_buf(v, shape.dims())
        }))
    }
    /// 1 with probability `self` (element-wise probabilities), else 0; same dtype.
    pub fn bernoulli(&self) -> Result<Tensor> {
        let p = self.to_f64_vec();
        if p.iter().any(|&p| !(0.0..=1.0).contains(&p)) {
            return Err(Error::invalid(
                "bernoulli",
                "probabilities must be in [0, 1]",
            ));
        }
        let v: Vec<f64> = with_global(|g| {
            p.iter()
                .map(|&p| if g.next_f64() < p { 1.0 } else { 0.0 })
                .collect()
        });
        Tensor::from_buf(v, self.dims()).to_dtype(self.dtype())
    }
    /// 1 with probability `p`, else 0, f32.
    pub fn bernoulli_p(shape: impl Into<Shape>, p: f64) -> Result<Tensor> {
        Tensor::full(shape, p).bernoulli()
    }

    /// Dropout: in training, zero each element with probability `p` and scale the rest by
    /// `1/(1-p)`; the identity when not `train`.
    pub fn dropout(&self, p: f64, train: bool) -> Result<Tensor> {
        if !(0.0..=1.0).contains(&p) {
            return Err(Error::invalid(
                "dropout",
                format!("probability {p} not in [0, 1]"),
            ));
        }
        if !train || p == 0.0 {
            return Ok(self.clone());
        }
        if p == 1.0 {
            return self.mul_scalar(0.0);
        }
        let keep = 1.0 - p;
        let mask = with_global(|g| {
            let v: Vec<f64> = (0..self.numel())
                .map(|_| if g.next_f64() < keep { 1.0 / keep } else { 0.0 })
                .collect();
            v
        });
        let mask = Tensor::from_buf(mask, self.dims()).to_dtype(match self.dtype() {
            DType::F64 => DType::F64,
            _ => DType::F32,
        })?;
        self.mul(&mask)
    }
}
