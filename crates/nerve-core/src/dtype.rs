//! Element types: f32 (the default) and f64 for compute, f16/bf16 for storage, i64 indices and
//! bool masks.

use half::{bf16, f16};

use crate::storage::CpuStorage;

/// The element type of a tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    /// 32-bit float, the default.
    F32,
    /// 64-bit float (gradient checks, precise reductions).
    F64,
    /// IEEE half precision (storage and conversion only).
    F16,
    /// bfloat16 (storage and conversion only).
    BF16,
    /// 64-bit signed integer: indices and labels.
    I64,
    /// Boolean mask (one byte per element): the result of comparisons.
    Bool,
}

impl DType {
    /// Size of one element in bytes.
    pub fn size_in_bytes(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F64 | DType::I64 => 8,
            DType::F16 | DType::BF16 => 2,
            DType::Bool => 1,
        }
    }
    /// Whether this is a floating-point type.
    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F64 | DType::F16 | DType::BF16)
    }
    /// PyTorch's name for the dtype, as printed by `Display`.
    pub fn torch_name(self) -> &'static str {
        match self {
            DType::F32 => "torch.float32",
            DType::F64 => "torch.float64",
            DType::F16 => "torch.float16",
            DType::BF16 => "torch.bfloat16",
            DType::I64 => "torch.int64",
            DType::Bool => "torch.bool",
        }
    }
}

/// A Rust type that can be the element of a tensor.
pub trait Element: Copy + Send + Sync + PartialOrd + std::fmt::Debug + 'static {
    /// The matching dtype.
    const DTYPE: DType;
    /// The additive identity.
    const ZERO: Self;
    /// The multiplicative identity.
    const ONE: Self;
    /// Borrow the storage's buffer if it holds this type.
    fn slice(storage: &CpuStorage) -> Option<&[Self]>;
    /// Mutably borrow the storage's buffer if it holds this type.
    fn slice_mut(storage: &mut CpuStorage) -> Option<&mut [Self]>;
    /// Wrap a buffer of this type.
    fn into_storage(v: Vec<Self>) -> CpuStorage;
    /// Lossy conversion to f64.
    fn to_f64(self) -> f64;
    /// Lossy conversion from f64 (rounds to nearest, saturates integers).
    fn from_f64(v: f64) -> Self;
}

macro_rules! element {
    ($t:ty, $dt:ident, $zero:expr, $one:expr, $to:expr, $from:expr) => {
        impl Element for $t {
            const DTYPE: DType = DType::$dt;
            const ZERO: Self = $zero;
            const ONE: Self = $one;
            fn slice(storage: &CpuStorage) -> Option<&[Self]> {
                match storage {
                    CpuStorage::$dt(v) => Some(v),
                    _ => None,
                }
            }
            fn slice_mut(storage: &mut CpuStorage) -> Option<&mut [Self]> {
                match storage {
                    CpuStorage::$dt(v) => Some(v),
                    _ => None,
                }
            }
            fn into_storage(v: Vec<Self>) -> CpuStorage {
                CpuStorage::$dt(v)
            }
            #[inline(always)]
            fn to_f64(self) -> f64 {
                ($to)(self)
            }
            #[inline(always)]
            fn from_f64(v: f64) -> Self {
                ($from)(v)
            }
        }
    };
}

element!(f32, F32, 0.0, 1.0, |x: f32| x as f64, |v: f64| v as f32);
element!(f64, F64, 0.0, 1.0, |x: f64| x, |v: f64| v);
element!(
    f16,
    F16,
    f16::ZERO,
    f16::ONE,
    |x: f16| x.to_f64(),
    f16::from_f64
);
element!(
    bf16,
    BF16,
    bf16::ZERO,
    bf16::ONE,
    |x: bf16| x.to_f64(),
    bf16::from_f64
);
element!(i64, I64, 0, 1, |x: i64| x as f64, |v: f64| v as i64);

/// Boolean elements are stored as one byte, 0 or 1.
impl Element for u8 {
    const DTYPE: DType = DType::Bool;
    const ZERO: Self = 0;
    const ONE: Self = 1;
    fn slice(storage: &CpuStorage) -> Option<&[Self]> {
        match storage {
            CpuStorage::Bool(v) => Some(v),
            _ => None,
        }
    }
    fn slice_mut(storage: &mut CpuStorage) -> Option<&mut [Self]> {
        match storage {
            CpuStorage::Bool(v) => Some(v),
            _ => None,
        }
    }
    fn into_storage(v: Vec<Self>) -> CpuStorage {
        CpuStorage::Bool(v)
    }
    fn to_f64(self) -> f64 {
        self as f64
    }
    fn from_f64(v: f64) -> Self {
        (v != 0.0) as u8
    }
}

/// A floating-point compute type (f32 or f64) with the math the kernels need.
pub trait Float:
    Element
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
    + std::ops::Neg<Output = Self>
    + std::ops::AddAssign
    + std::ops::MulAssign
    + std::iter::Sum
{
    /// Negative infinity.
    const NEG_INFINITY: Self;
    /// Positive infinity.
    const INFINITY: Self;
    /// Convert from a usize count.
    fn from_usize(v: usize) -> Self;
    /// e^x
    fn exp(self) -> Self;
    /// natural logarithm
    fn ln(self) -> Self;
    /// hyperbolic tangent
    fn tanh(self) -> Self;
    /// error function
    fn erf(self) -> Self;
    /// derivative of the GELU (erf form), `Φ(x) + x·φ(x)`
    fn gelu_grad(self) -> Self;
    /// square root
    fn sqrt(self) -> Self;
    /// sine
    fn sin(self) -> Self;
    /// cosine
    fn cos(self) -> Self;
    /// absolute value
    fn abs(self) -> Self;
    /// self^e
    fn powf(self, e: Self) -> Self;
    /// larger of the two (NaN-propagating like PyTorch's maximum)
    fn max(self, o: Self) -> Self;
    /// smaller of the two (NaN-propagating like PyTorch's minimum)
    fn min(self, o: Self) -> Self;
    /// whether the value is NaN
    fn is_nan(self) -> bool;
    /// `self · a + b` with one rounding (one instruction where the kernel is compiled with
    /// FMA; only call it from such kernels, elsewhere it is a slow library call)
    fn mul_add(self, a: Self, b: Self) -> Self;
}

impl Float for f32 {
    const NEG_INFINITY: Self = f32::NEG_INFINITY;
    const INFINITY: Self = f32::INFINITY;
    #[inline(always)]
    fn from_usize(v: usize) -> Self {
        v as f32
    }
    #[inline(always)]
    fn exp(self) -> Self {
        crate::kernels::vmath::exp(self)
    }
    #[inline(always)]
    fn ln(self) -> Self {
        crate::kernels::vmath::ln(self)
    }
    #[inline(always)]
    fn tanh(self) -> Self {
        crate::kernels::vmath::tanh(self)
    }
    #[inline(always)]
    fn erf(self) -> Self {
        crate::kernels::vmath::erf(self)
    }
    #[inline(always)]
    fn gelu_grad(self) -> Self {
        crate::kernels::vmath::gelu_grad(self)
    }
    #[inline(always)]
    fn sqrt(self) -> Self {
        f32::sqrt(self)
    }
    #[inline(always)]
    fn sin(self) -> Self {
        f32::sin(self)
    }
    #[inline(always)]
    fn cos(self) -> Self {
        f32::cos(self)
    }
    #[inline(always)]
    fn abs(self) -> Self {
        f32::abs(self)
    }
    #[inline(always)]
    fn powf(self, e: Self) -> Self {
        f32::powf(self, e)
    }
    #[inline(always)]
    fn max(self, o: Self) -> Self {
        if self.is_nan() || self > o {
            self
        } else {
            o
        }
    }
    #[inline(always)]
    fn min(self, o: Self) -> Self {
        if self.is_nan() || self < o {
            self
        } else {
            o
        }
    }
    #[inline(always)]
    fn is_nan(self) -> bool {
        f32::is_nan(self)
    }
    #[inline(always)]
    fn mul_add(self, a: Self, b: Self) -> Self {
        f32::mul_add(self, a, b)
    }
}

impl Float for f64 {
    const NEG_INFINITY: Self = f64::NEG_INFINITY;
    const INFINITY: Self = f64::INFINITY;
    #[inline(always)]
    fn from_usize(v: usize) -> Self {
        v as f64
    }
    #[inline(always)]
    fn exp(self) -> Self {
        f64::exp(self)
    }
    #[inline(always)]
    fn ln(self) -> Self {
        f64::ln(self)
    }
    #[inline(always)]
    fn tanh(self) -> Self {
        f64::tanh(self)
    }
    #[inline(always)]
    fn erf(self) -> Self {
        erf_f64(self)
    }
    #[inline(always)]
    fn gelu_grad(self) -> Self {
        let cdf = 0.5 * (1.0 + erf_f64(self * std::f64::consts::FRAC_1_SQRT_2));
        // 1/√(2π)
        cdf + self * 0.398_942_280_401_432_7 * (-0.5 * self * self).exp()
    }
    #[inline(always)]
    fn sqrt(self) -> Self {
        f64::sqrt(self)
    }
    #[inline(always)]
    fn sin(self) -> Self {
        f64::sin(self)
    }
    #[inline(always)]
    fn cos(self) -> Self {
        f64::cos(self)
    }
    #[inline(always)]
    fn abs(self) -> Self {
        f64::abs(self)
    }
    #[inline(always)]
    fn powf(self, e: Self) -> Self {
        f64::powf(self, e)
    }
    #[inline(always)]
    fn max(self, o: Self) -> Self {
        if self.is_nan() || self > o {
            self
        } else {
            o
        }
    }
    #[inline(always)]
    fn min(self, o: Self) -> Self {
        if self.is_nan() || self < o {
            self
        } else {
            o
        }
    }
    #[inline(always)]
    fn is_nan(self) -> bool {
        f64::is_nan(self)
    }
    #[inline(always)]
    fn mul_add(self, a: Self, b: Self) -> Self {
        f64::mul_add(self, a, b)
    }
}

/// erf in f64 to about 1e-15: Taylor series near 0, continued fraction of erfc beyond.
pub fn erf_f64(x: f64) -> f64 {
    if x.is_nan() {
        return x;
    }
    let ax = x.abs();
    if ax < 2.5 {
        // erf(x) = 2/sqrt(pi) * sum_n (-1)^n x^(2n+1) / (n! (2n+1))
        let x2 = x * x;
        let mut term = x;
        let mut sum = x;
        let mut n = 0.0;
        while term.abs() > 1e-17 * sum.abs() {
            n += 1.0;
            term *= -x2 / n;
            sum += term / (2.0 * n + 1.0);
        }
        sum * std::f64::consts::FRAC_2_SQRT_PI
    } else if ax > 6.0 {
        x.signum()
    } else {
        // erfc(x) = exp(-x^2)/sqrt(pi) * 1/(x + 1/2/(x + 1/(x + 3/2/(x + ...)))) (Lentz)
        let mut f = ax;
        for k in (1..60).rev() {
            f = ax + (k as f64 / 2.0) / f;
        }
        let erfc = (-ax * ax).exp() / (std::f64::consts::PI.sqrt() * f);
        x.signum() * (1.0 - erfc)
    }
}
