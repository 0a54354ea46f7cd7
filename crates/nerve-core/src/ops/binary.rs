//! Binary element-wise ops with implicit broadcasting: arithmetic, maximum/minimum,
//! comparisons, `where` and `masked_fill`.

use super::{any_dispatch, float_dispatch};
use crate::dtype::{DType, Element, Float};
use crate::kernels::elementwise::{binary, ternary, Cost};
use crate::shape::broadcast_shapes;
use crate::{Error, Result, Tensor};

/// A binary float function, generic over the compute type.
pub(crate) trait BinaryFn: Copy + Send + Sync + 'static {
    const NAME: &'static str;
    fn f<T: Float>(self, a: T, b: T) -> T;
}

macro_rules! binary_fn {
    ($name:ident, $s:expr, |$a:ident, $b:ident| $e:expr) => {
        #[derive(Clone, Copy)]
        pub(crate) struct $name;
        impl BinaryFn for $name {
            const NAME: &'static str = $s;
            #[inline(always)]
            fn f<T: Float>(self, $a: T, $b: T) -> T {
                $e
            }
        }
    };
}

binary_fn!(AddFn, "add", |a, b| a + b);
binary_fn!(SubFn, "sub", |a, b| a - b);
binary_fn!(MulFn, "mul", |a, b| a * b);
binary_fn!(DivFn, "div", |a, b| a / b);
binary_fn!(PowFn, "pow", |a, b| a.powf(b));
binary_fn!(MaxFn, "maximum", |a, b| a.max(b));
binary_fn!(MinFn, "minimum", |a, b| a.min(b));

/// Comparison kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CmpOp {
    /// ==
    Eq,
    /// !=
    Ne,
    /// <
    Lt,
    /// <=
    Le,
    /// >
    Gt,
    /// >=
    Ge,
}

impl Tensor {
    /// Broadcast two tensors' layouts to their common shape.
    pub(crate) fn broadcast_pair(
        &self,
        rhs: &Tensor,
        op: &'static str,
    ) -> Result<(Vec<usize>, crate::Layout, crate::Layout)> {
        let shape = broadcast_shapes(op, self.dims(), rhs.dims())?;
        let la = self.layout().broadcast_as(op, &shape)?;
        let lb = rhs.layout().broadcast_as(op, &shape)?;
        Ok((shape, la, lb))
    }

    pub(crate) fn check_same_dtype(&self, rhs: &Tensor, op: &'static str) -> Result<()> {
        if self.dtype() != rhs.dtype() {
            return Err(Error::DTypeMismatch {
                op,
                lhs: self.dtype(),
                rhs: rhs.dtype(),
            });
        }
        Ok(())
    }

    /// Element-wise `f` with broadcasting, no autodiff.
    pub(crate) fn map2<F: BinaryFn>(&self, rhs: &Tensor, f: F) -> Result<Tensor> {
        self.check_same_dtype(rhs, F::NAME)?;
        let (shape, la, lb) = self.broadcast_pair(rhs, F::NAME)?;
        float_dispatch!(F::NAME, self.dtype(), T => {
            let v = self.read2::<T, T, _>(rhs, |a, _, b, _| {
                binary(a, &la, b, &lb, Cost::Cheap, #[inline(always)] move |x, y| f.f(x, y))
            });
            Ok(Tensor::from_buf(v, &shape))
        })
    }

    /// Element-wise `f(self, rhs, out)` over three same-dtype tensors broadcast together, no
    /// autodiff: the workhorse of fused backward rules.
    pub(crate) fn map3<T: Float>(
        &self,
        b: &Tensor,
        c: &Tensor,
        op: &'static str,
        f: impl Fn(T, T, T) -> T + Sync + Copy,
    ) -> Result<Tensor> {
        let shape = broadcast_shapes(op, self.dims(), b.dims())?;
        let shape = broadcast_shapes(op, &shape, c.dims())?;
        let la = self.layout().broadcast_as(op, &shape)?;
        let lb = b.layout().broadcast_as(op, &shape)?;
        let lc = c.layout().broadcast_as(op, &shape)?;
        let ga = self.0.storage.read();
        let gb = (!self.shares_storage(b)).then(|| b.0.storage.read());
        let gc = (!self.shares_storage(c) && !b.shares_storage(c)).then(|| c.0.storage.read());
        let sa = T::slice(&ga).expect("dtype");
        let sb = match &gb {
            Some(g) => T::slice(g).expect("dtype"),
            None => sa,
        };
        let sc = match &gc {
            Some(g) => T::slice(g).expect("dtype"),
            None if c.shares_storage(b) => sb,
            None => sa,
        };
        let v = ternary(sa, &la, sb, &lb, sc, &lc, f);
        Ok(Tensor::from_buf(v, &shape))
    }

    /// Element-wise `f(self, b)` over two same-dtype tensors broadcast together, no autodiff:
    /// the one-pass backward of unary ops.
    pub(crate) fn zip_map<T: Float>(
        &self,
        b: &Tensor,
        op: &'static str,
        cost: Cost,
        f: impl Fn(T, T) -> T + Sync + Copy,
    ) -> Result<Tensor> {
        self.check_same_dtype(b, op)?;
        let (shape, la, lb) = self.broadcast_pair(b, op)?;
        let v = self.read2::<T, T, _>(b, |a, _, b, _| binary(a, &la, b, &lb, cost, f));
        Ok(Tensor::from_buf(v, &shape))
    }

    /// `self + rhs` with broadcasting.
    pub fn add(&self, rhs: &Tensor) -> Result<Tensor> {
        let out = self.map2(rhs, AddFn)?;
        let (da, db) = (self.dims().to_vec(), rhs.dims().to_vec());
        Ok(out.with_grad("add", &[self, rhs], move |g| {
            Ok(vec![Some(g.sum_to(&da)?), Some(g.sum_to(&db)?)])
        }))
    }

    /// `self - rhs` with broadcasting.
    pub fn sub(&self, rhs: &Tensor) -> Result<Tensor> {
        let out = self.map2(rhs, SubFn)?;
        let (da, db) = (self.dims().to_vec(), rhs.dims().to_vec());
        Ok(out.with_grad("sub", &[self, rhs], move |g| {
            Ok(vec![Some(g.sum_to(&da)?), Some(g.neg()?.sum_to(&db)?)])
        }))
    }

    /// `self * rhs` with broadcasting.
    pub fn mul(&self, rhs: &Tensor) -> Result<Tensor> {
        let out = self.map2(rhs, MulFn)?;
        let (a, b) = (self.detach(), rhs.detach());
        let (ra, rb) = (self.requires_grad(), rhs.requires_grad());
        Ok(out.with_grad("mul", &[self, rhs], move |g| {
            Ok(vec![
                ra.then(|| g.mul(&b)?.sum_to(a.dims())).transpose()?,
                rb.then(|| g.mul(&a)?.sum_to(b.dims())).transpose()?,
            ])
        }))
    }

    /// `self / rhs` with broadcasting.
    pub fn div(&self, rhs: &Tensor) -> Result<Tensor> {
        let out = self.map2(rhs, DivFn)?;
        let (a, b) = (self.detach(), rhs.detach());
        let (ra, rb) = (self.requires_grad(), rhs.requires_grad());
        Ok(out.with_grad("div", &[self, rhs], move |g| {
            let ga = ra.then(|| g.div(&b)?.sum_to(a.dims())).transpose()?;
            let gb = rb
                .then(|| {
                    float_dispatch!("div_backward", g.dtype(), T => g
                        .map3::<T>(&a, &b, "div_backward", #[inline(always)] |g, a, b| -g * a / (b * b))?
                        .sum_to(b.dims()))
                })
                .transpose()?;
            Ok(vec![ga, gb])
        }))
    }

    /// `self ** rhs` element-wise with broadcasting.
    pub fn pow(&self, rhs: &Tensor) -> Result<Tensor> {
        let out = self.map2(rhs, PowFn)?;
        let (a, b) = (self.detach(), rhs.detach());
        let (ra, rb) = (self.requires_grad(), rhs.requires_grad());
        Ok(out.with_grad("pow", &[self, rhs], move |g| {
            float_dispatch!("pow_backward", g.dtype(), T => {
                let ga = ra
                    .then(|| {
                        g.map3::<T>(&a, &b, "pow_backward", #[inline(always)] |g, a, b| {
                            if b == T::ZERO { T::ZERO } else { g * b * a.powf(b - T::ONE) }
                        })?
                        .sum_to(a.dims())
                    })
                    .transpose()?;
                let gb = rb
                    .then(|| {
                        // PyTorch: d/db a^b = a^b ln a, taken as 0 where a == 0 and b >= 0.
                        g.map3::<T>(&a, &b, "pow_backward", #[inline(always)] |g, a, b| {
                            if a == T::ZERO && b >= T::ZERO { T::ZERO } else { g * a.powf(b) * a.ln() }
                        })?
                        .sum_to(b.dims())
                    })
                    .transpose()?;
                Ok(vec![ga, gb])
            })
        }))
    }

    /// Element-wise maximum (NaN propagates). At ties the gradient is split evenly.
    pub fn maximum(&self, rhs: &Tensor) -> Result<Tensor> {
        self.extremum(rhs, true)
    }

    /// Element-wise minimum (NaN propagates). At ties the gradient is split evenly.
    pub fn minimum(&self, rhs: &Tensor) -> Result<Tensor> {
        self.extremum(rhs, false)
    }

    fn extremum(&self, rhs: &Tensor, is_max: bool) -> Result<Tensor> {
        let out = if is_max {
            self.map2(rhs, MaxFn)?
        } else {
            self.map2(rhs, MinFn)?
        };
        let (a, b) = (self.detach(), rhs.detach());
        let op = if is_max { "maximum" } else { "minimum" };
        Ok(out.with_grad(op, &[self, rhs], move |g| {
            float_dispatch!("extremum_backward", g.dtype(), T => {
                let wins = move |x: T, y: T| if is_max { x > y } else { x < y };
                let half = T::from_f64(0.5);
                let ga = g.map3::<T>(&a, &b, op, #[inline(always)] move |g, x, y| {
                    if wins(x, y) { g } else if x == y { g * half } else { T::ZERO }
                })?;
                let gb = g.map3::<T>(&a, &b, op, #[inline(always)] move |g, x, y| {
                    if wins(y, x) { g } else if x == y { g * half } else { T::ZERO }
                })?;
                Ok(vec![Some(ga.sum_to(a.dims())?), Some(gb.sum_to(b.dims())?)])
            })
        }))
    }

    /// Element-wise comparison with broadcasting, giving a bool tensor.
    pub fn cmp(&self, rhs: &Tensor, op: CmpOp) -> Result<Tensor> {
        const NAME: &str = "compare";
        self.check_same_dtype(rhs, NAME)?;
        let (shape, la, lb) = self.broadcast_pair(rhs, NAME)?;
        macro_rules! go {
            ($T:ty, $f:expr) => {
                self.read2::<$T, $T, _>(rhs, |a, _, b, _| {
                    binary(
                        a,
                        &la,
                        b,
                        &lb,
                        Cost::Cheap,
                        #[inline(always)]
                        |x: $T, y: $T| $f(x, y) as u8,
                    )
                })
            };
        }
        let v = any_dispatch!(self.dtype(), T => match op {
            CmpOp::Eq => go!(T, |x, y| x == y),
            CmpOp::Ne => go!(T, |x, y| x != y),
            CmpOp::Lt => go!(T, |x, y| x < y),
            CmpOp::Le => go!(T, |x, y| x <= y),
            CmpOp::Gt => go!(T, |x, y| x > y),
            CmpOp::Ge => go!(T, |x, y| x >= y),
        });
        Ok(Tensor::from_buf(v, &shape))
    }

    /// `self == rhs` element-wise (bool).
    pub fn eq(&self, rhs: &Tensor) -> Result<Tensor> {
        self.cmp(rhs, CmpOp::Eq)
    }
    /// `self != rhs` element-wise (bool).
    pub fn ne(&self, rhs: &Tensor) -> Result<Tensor> {
        self.cmp(rhs, CmpOp::Ne)
    }
    /// `self < rhs` element-wise (bool).
    pub fn lt(&self, rhs: &Tensor) -> Result<Tensor> {
        self.cmp(rhs, CmpOp::Lt)
    }
    /// `self <= rhs` element-wise (bool).
    pub fn le(&self, rhs: &Tensor) -> Result<Tensor> {
        self.cmp(rhs, CmpOp::Le)
    }
    /// `self > rhs` element-wise (bool).
    pub fn gt(&self, rhs: &Tensor) -> Result<Tensor> {
        self.cmp(rhs, CmpOp::Gt)
    }
    /// `self >= rhs` element-wise (bool).
    pub fn ge(&self, rhs: &Tensor) -> Result<Tensor> {
        self.cmp(rhs, CmpOp::Ge)
    }
    /// Compare with a scalar (converted to this tensor's dtype).
    pub fn cmp_scalar(&self, value: f64, op: CmpOp) -> Result<Tensor> {
        self.cmp(&Tensor::full_with((), value, self.dtype()), op)
    }

    /// Select `on_true` where this bool mask is true and `on_false` elsewhere, broadcasting
    /// all three (`torch.where(mask, on_true, on_false)`).
    pub fn where_cond(&self, on_true: &Tensor, on_false: &Tensor) -> Result<Tensor> {
        const NAME: &str = "where";
        if self.dtype() != DType::Bool {
            return Err(Error::DTypeMismatch {
                op: NAME,
                lhs: self.dtype(),
                rhs: DType::Bool,
            });
        }
        on_true.check_same_dtype(on_false, NAME)?;
        let shape = broadcast_shapes(NAME, self.dims(), on_true.dims())?;
        let shape = broadcast_shapes(NAME, &shape, on_false.dims())?;
        let lm = self.layout().broadcast_as(NAME, &shape)?;
        let la = on_true.layout().broadcast_as(NAME, &shape)?;
        let lb = on_false.layout().broadcast_as(NAME, &shape)?;
        let v = any_dispatch!(on_true.dtype(), T => {
            let gm = self.0.storage.read();
            let m = u8::slice(&gm).expect("bool");
            let v = on_true.read2::<T, T, _>(on_false, |a, _, b, _| {
                ternary(m, &lm, a, &la, b, &lb, #[inline(always)] |m: u8, x: T, y: T| if m != 0 { x } else { y })
            });
            T::into_storage(v)
        });
        let out = Tensor::from_storage(v, &shape);
        let mask = self.clone();
        let (da, db) = (on_true.dims().to_vec(), on_false.dims().to_vec());
        Ok(out.with_grad(NAME, &[on_true, on_false], move |g| {
            let z = g.zeros_like();
            Ok(vec![
                Some(mask.where_cond(g, &z)?.sum_to(&da)?),
                Some(mask.where_cond(&z, g)?.sum_to(&db)?),
            ])
        }))
    }

    /// Replace elements where `mask` is true by `value` (mask broadcasts to this shape).
    pub fn masked_fill(&self, mask: &Tensor, value: f64) -> Result<Tensor> {
        let fill = Tensor::full_with((), value, self.dtype());
        let out = mask.where_cond(&fill, self)?;
        if out.dims() != self.dims() {
            return Err(Error::shape_mismatch(
                "masked_fill",
                self.dims(),
                mask.dims(),
            ));
        }
        Ok(out)
    }
}
