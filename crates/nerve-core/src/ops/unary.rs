//! Unary element-wise ops and activations, each with its derivative in one place.

use super::float_dispatch;
use crate::dtype::{Element, Float};
use crate::kernels::elementwise::{unary, Cost};
use crate::{Error, Result, Tensor};

/// What the derivative of a unary function reads, and so what its backward pass keeps alive
/// and streams through: the gradient alone, or with the input, the output, or both.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Reads {
    /// Neither (`df` is a constant).
    Nothing,
    /// The input only (`df` ignores `y`).
    Input,
    /// The output only (`df` ignores `x`).
    Output,
    /// Both.
    Both,
}

/// A unary float function and its derivative, generic over the compute type.
pub(crate) trait UnaryFn: Copy + Send + Sync + 'static {
    const NAME: &'static str;
    const COST: Cost = Cost::Cheap;
    /// Which of `x`, `y` `df` reads; the other is passed as 0.
    const READS: Reads;
    fn f<T: Float>(self, x: T) -> T;
    /// dy/dx given the input `x` and the output `y`.
    fn df<T: Float>(self, x: T, y: T) -> T;
}

macro_rules! unary_fn {
    ($name:ident { $($field:ident),* }, $s:expr, $cost:expr, $reads:ident,
     |$self_:ident, $x:ident| $f:expr, |$sx:ident, $dx:ident, $dy:ident| $df:expr) => {
        #[derive(Clone, Copy)]
        pub(crate) struct $name { $(pub(crate) $field: f64),* }
        impl UnaryFn for $name {
            const NAME: &'static str = $s;
            const COST: Cost = $cost;
            const READS: Reads = Reads::$reads;
            #[inline(always)]
            #[allow(unused_variables)]
            fn f<T: Float>($self_, $x: T) -> T { $f }
            #[inline(always)]
            #[allow(unused_variables)]
            fn df<T: Float>($sx, $dx: T, $dy: T) -> T { $df }
        }
    };
}

const SQRT_2_OVER_PI: f64 = 0.797_884_560_802_865_4;
const FRAC_1_SQRT_2: f64 = std::f64::consts::FRAC_1_SQRT_2;

#[inline(always)]
fn sigmoid<T: Float>(x: T) -> T {
    T::ONE / (T::ONE + (-x).exp())
}

unary_fn!(
    Neg {},
    "neg",
    Cost::Cheap,
    Nothing,
    |self, x| -x,
    |self, x, y| -T::ONE
);
unary_fn!(
    Abs {},
    "abs",
    Cost::Cheap,
    Input,
    |self, x| x.abs(),
    |self, x, y| {
        if x > T::ZERO {
            T::ONE
        } else if x < T::ZERO {
            -T::ONE
        } else {
            T::ZERO
        }
    }
);
unary_fn!(
    Exp {},
    "exp",
    Cost::Transcendental,
    Output,
    |self, x| x.exp(),
    |self, x, y| y
);
unary_fn!(
    Log {},
    "log",
    Cost::Transcendental,
    Input,
    |self, x| x.ln(),
    |self, x, y| T::ONE / x
);
unary_fn!(
    Sqrt {},
    "sqrt",
    Cost::Cheap,
    Output,
    |self, x| x.sqrt(),
    |self, x, y| T::from_f64(0.5) / y
);
unary_fn!(
    Rsqrt {},
    "rsqrt",
    Cost::Cheap,
    Output,
    |self, x| T::ONE / x.sqrt(),
    |self, x, y| T::from_f64(-0.5) * y * y * y
);
unary_fn!(
    Recip {},
    "reciprocal",
    Cost::Cheap,
    Output,
    |self, x| T::ONE / x,
    |self, x, y| -y * y
);
unary_fn!(
    Sin {},
    "sin",
    Cost::Transcendental,
    Input,
    |self, x| x.sin(),
    |self, x, y| x.cos()
);
unary_fn!(
    Cos {},
    "cos",
    Cost::Transcendental,
    Input,
    |self, x| x.cos(),
    |self, x, y| -x.sin()
);
unary_fn!(
    Tanh {},
    "tanh",
    Cost::Transcendental,
    Output,
    |self, x| x.tanh(),
    |self, x, y| T::ONE - y * y
);
unary_fn!(
    Sigmoid {},
    "sigmoid",
    Cost::Transcendental,
    Output,
    |self, x| sigmoid(x),
    |self, x, y| y * (T::ONE - y)
);
unary_fn!(
    Relu {},
    "relu",
    Cost::Cheap,
    Input,
    |self, x| if x > T::ZERO { x } else { T::ZERO },
    |self, x, y| if x > T::ZERO { T::ONE } else { T::ZERO }
);
unary_fn!(
    LeakyRelu { slope },
    "leaky_relu",
    Cost::Cheap,
    Input,
    |self, x| if x > T::ZERO {
        x
    } else {
        x * T::from_f64(self.slope)
    },
    |self, x, y| if x > T::ZERO {
        T::ONE
    } else {
        T::from_f64(self.slope)
    }
);
unary_fn!(
    Elu { alpha },
    "elu",
    Cost::Transcendental,
    Both,
    |self, x| if x > T::ZERO {
        x
    } else {
        T::from_f64(self.alpha) * (x.exp() - T::ONE)
    },
    |self, x, y| if x > T::ZERO {
        T::ONE
    } else {
        y + T::from_f64(self.alpha)
    }
);
unary_fn!(
    GeluErf {},
    "gelu",
    Cost::Transcendental,
    Input,
    |self, x| T::from_f64(0.5) * x * (T::ONE + (x * T::from_f64(FRAC_1_SQRT_2)).erf()),
    |self, x, y| x.gelu_grad()
);
unary_fn!(
    GeluTanh {},
    "gelu_tanh",
    Cost::Transcendental,
    Input,
    |self, x| {
        let u = T::from_f64(SQRT_2_OVER_PI) * (x + T::from_f64(0.044715) * x * x * x);
        T::from_f64(0.5) * x * (T::ONE + u.tanh())
    },
    |self, x, y| {
        let u = T::from_f64(SQRT_2_OVER_PI) * (x + T::from_f64(0.044715) * x * x * x);
        let t = u.tanh();
        let du = T::from_f64(SQRT_2_OVER_PI) * (T::ONE + T::from_f64(3.0 * 0.044715) * x * x);
        T::from_f64(0.5) * (T::ONE + t) + T::from_f64(0.5) * x * (T::ONE - t * t) * du
    }
);
unary_fn!(
    Silu {},
    "silu",
    Cost::Transcendental,
    Input,
    |self, x| x * sigmoid(x),
    |self, x, y| {
        let s = sigmoid(x);
        s * (T::ONE + x * (T::ONE - s))
    }
);
unary_fn!(
    Softplus { beta, threshold },
    "softplus",
    Cost::Transcendental,
    Input,
    |self, x| {
        let b = T::from_f64(self.beta);
        if x * b > T::from_f64(self.threshold) {
            x
        } else {
            (T::ONE + (x * b).exp()).ln() / b
        }
    },
    |self, x, y| {
        let b = T::from_f64(self.beta);
        if x * b > T::from_f64(self.threshold) {
            T::ONE
        } else {
            sigmoid(x * b)
        }
    }
);
unary_fn!(
    Affine { mul, add },
    "affine",
    Cost::Cheap,
    Nothing,
    |self, x| x * T::from_f64(self.mul) + T::from_f64(self.add),
    |self, x, y| T::from_f64(self.mul)
);
unary_fn!(
    Powf { e },
    "pow",
    Cost::Transcendental,
    Input,
    |self, x| {
        let e = T::from_f64(self.e);
        if self.e == 2.0 {
            x * x
        } else if self.e == 1.0 {
            x
        } else {
            x.powf(e)
        }
    },
    |self, x, y| {
        let e = T::from_f64(self.e);
        if self.e == 0.0 {
            T::ZERO
        } else if self.e == 2.0 {
            T::from_f64(2.0) * x
        } else {
            e * x.powf(e - T::ONE)
        }
    }
);
unary_fn!(
    Clamp { lo, hi },
    "clamp",
    Cost::Cheap,
    Input,
    |self, x| {
        let (lo, hi) = (T::from_f64(self.lo), T::from_f64(self.hi));
        if x.is_nan() {
            x
        } else if x < lo {
            lo
        } else if x > hi {
            hi
        } else {
            x
        }
    },
    |self, x, y| {
        let (lo, hi) = (T::from_f64(self.lo), T::from_f64(self.hi));
        if x >= lo && x <= hi {
            T::ONE
        } else {
            T::ZERO
        }
    }
);

impl Tensor {
    /// Apply a unary function, no autodiff.
    pub(crate) fn map1<F: UnaryFn>(&self, f: F) -> Result<Tensor> {
        float_dispatch!(F::NAME, self.dtype(), T => {
            let v = self.read::<T, _>(|s, l| unary(s, l, F::COST, #[inline(always)] move |x: T| f.f(x)));
            Ok(Tensor::from_buf(v, self.dims()))
        })
    }

    /// Apply a unary function with its derivative recorded. The backward pass is one
    /// element-wise pass over the gradient and only what `df` reads (`F::READS`), which is
    /// all the node keeps alive.
    pub(crate) fn unary_op<F: UnaryFn>(&self, f: F) -> Result<Tensor> {
        let out = self.map1(f)?;
        if !crate::autograd::is_grad_enabled() || !self.requires_grad() {
            return Ok(out);
        }
        let (x, y) = match F::READS {
            Reads::Nothing => (None, None),
            Reads::Input => (Some(self.detach()), None),
            Reads::Output => (None, Some(out.detach())),
            Reads::Both => (Some(self.detach()), Some(out.detach())),
        };
        Ok(out.with_grad(F::NAME, &[self], move |g| {
            float_dispatch!(F::NAME, g.dtype(), T => {
                let zero = T::ZERO;
                let gi = match (&x, &y) {
                    (Some(x), Some(y)) => g.map3::<T>(x, y, F::NAME, #[inline(always)] move |g, x, y| g * f.df(x, y))?,
                    (Some(x), None) => g.zip_map::<T>(x, F::NAME, F::COST, #[inline(always)] move |g, x| g * f.df(x, zero))?,
                    (None, Some(y)) => g.zip_map::<T>(y, F::NAME, F::COST, #[inline(always)] move |g, y| g * f.df(zero, y))?,
                    (None, None) => {
                        let d = f.df(zero, zero);
                        let v = g.read::<T, _>(|s, l| unary(s, l, Cost::Cheap, #[inline(always)] move |g: T| g * d));
                        Tensor::from_buf(v, g.dims())
                    }
                };
                Ok(vec![Some(gi)])
            })
        }))
    }

    /// `-self`.
    pub fn neg(&self) -> Result<Tensor> {
        self.unary_op(Neg {})
    }
    /// `|self|`.
    pub fn abs(&self) -> Result<Tensor> {
        self.unary_op(Abs {})
    }
    /// `e^self`.
    pub fn exp(&self) -> Result<Tensor> {
        self.unary_op(Exp {})
    }
    /// Natural logarithm.
    pub fn log(&self) -> Result<Tensor> {
        self.unary_op(Log {})
    }
    /// Square root.
    pub fn sqrt(&self) -> Result<Tensor> {
        self.unary_op(Sqrt {})
    }
    /// `1 / sqrt(self)`.
    pub fn rsqrt(&self) -> Result<Tensor> {
        self.unary_op(Rsqrt {})
    }
    /// `1 / self`.
    pub fn reciprocal(&self) -> Result<Tensor> {
        self.unary_op(Recip {})
    }
    /// Sine.
    pub fn sin(&self) -> Result<Tensor> {
        self.unary_op(Sin {})
    }
    /// Cosine.
    pub fn cos(&self) -> Result<Tensor> {
        self.unary_op(Cos {})
    }
    /// Hyperbolic tangent.
    pub fn tanh(&self) -> Result<Tensor> {
        self.unary_op(Tanh {})
    }
    /// Logistic sigmoid.
    pub fn sigmoid(&self) -> Result<Tensor> {
        self.unary_op(Sigmoid {})
    }
    /// `max(self, 0)`.
    pub fn relu(&self) -> Result<Tensor> {
        self.unary_op(Relu {})
    }
    /// `x` where positive, `slope * x` elsewhere (PyTorch's default slope is 0.01).
    pub fn leaky_relu(&self, slope: f64) -> Result<Tensor> {
        self.unary_op(LeakyRelu { slope })
    }
    /// `x` where positive, `alpha * (e^x - 1)` elsewhere.
    pub fn elu(&self, alpha: f64) -> Result<Tensor> {
        self.unary_op(Elu { alpha })
    }
    /// GELU, exact (erf) form: `x * Φ(x)`.
    pub fn gelu(&self) -> Result<Tensor> {
        self.unary_op(GeluErf {})
    }
    /// GELU, tanh approximation (PyTorch's `approximate='tanh'`).
    pub fn gelu_tanh(&self) -> Result<Tensor> {
        self.unary_op(GeluTanh {})
    }
    /// SiLU / swish: `x * sigmoid(x)`.
    pub fn silu(&self) -> Result<Tensor> {
        self.unary_op(Silu {})
    }
    /// `log(1 + e^(beta x)) / beta`, linear above `threshold` (PyTorch: beta 1, threshold 20).
    pub fn softplus(&self, beta: f64, threshold: f64) -> Result<Tensor> {
        self.unary_op(Softplus { beta, threshold })
    }
    /// `self * mul + add` in one pass.
    pub fn affine(&self, mul: f64, add: f64) -> Result<Tensor> {
        self.unary_op(Affine { mul, add })
    }
    /// `self + v`.
    pub fn add_scalar(&self, v: f64) -> Result<Tensor> {
        self.affine(1.0, v)
    }
    /// `self - v`.
    pub fn sub_scalar(&self, v: f64) -> Result<Tensor> {
        self.affine(1.0, -v)
    }
    /// `self * v`.
    pub fn mul_scalar(&self, v: f64) -> Result<Tensor> {
        self.affine(v, 0.0)
    }
    /// `self / v`.
    pub fn div_scalar(&self, v: f64) -> Result<Tensor> {
        self.affine(1.0 / v, 0.0)
    }
    /// `self ** e` for a scalar exponent.
    pub fn powf(&self, e: f64) -> Result<Tensor> {
        self.unary_op(Powf { e })
    }
    /// `self * self`.
    pub fn square(&self) -> Result<Tensor> {
        self.powf(2.0)
    }
    /// Clamp into `[min, max]`; either bound may be absent. The gradient passes where
    /// `min <= x <= max`.
    pub fn clamp(&self, min: Option<f64>, max: Option<f64>) -> Result<Tensor> {
        let (lo, hi) = (
            min.unwrap_or(f64::NEG_INFINITY),
            max.unwrap_or(f64::INFINITY),
        );
        if lo > hi {
            return Err(Error::invalid("clamp", format!("min {lo} > max {hi}")));
        }
        self.unary_op(Clamp { lo, hi })
    }
}
