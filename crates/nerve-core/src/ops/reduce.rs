//! Reductions over any set of dimensions (with keepdim), softmax, log_softmax and cumsum.

use std::mem::MaybeUninit;

use super::float_dispatch;
use crate::dtype::Element;
use crate::kernels::reduce as k;
use crate::kernels::{assume_init, uninit_buf};
use crate::shape::{normalize_dim, normalize_dims};
use crate::{Error, Result, Tensor};

/// A tensor arranged for a row reduction: `rows × row_len`, contiguous.
struct Rows {
    data: Tensor,
    rows: usize,
    row_len: usize,
    /// Output dims without the reduced ones.
    out_dims: Vec<usize>,
    /// Output dims with the reduced ones kept as 1.
    keep_dims: Vec<usize>,
}

impl Tensor {
    /// Resolve reduction dims; an empty list means every dimension.
    fn reduce_dims(&self, op: &'static str, dims: &[isize]) -> Result<Vec<usize>> {
        if dims.is_empty() {
            return Ok((0..self.rank()).collect());
        }
        normalize_dims(op, dims, self.rank())
    }

    /// Move the reduced dims innermost and make the result contiguous (no copy when they
    /// already are innermost in a contiguous tensor).
    fn as_rows(&self, dims: &[usize]) -> Result<Rows> {
        let rank = self.rank();
        let kept: Vec<usize> = (0..rank).filter(|d| !dims.contains(d)).collect();
        let out_dims: Vec<usize> = kept.iter().map(|&d| self.dims()[d]).collect();
        let keep_dims: Vec<usize> = (0..rank)
            .map(|d| if dims.contains(&d) { 1 } else { self.dims()[d] })
            .collect();
        let row_len: usize = dims.iter().map(|&d| self.dims()[d]).product();
        let rows: usize = out_dims.iter().product();
        let mut perm = kept.clone();
        perm.extend_from_slice(dims);
        let data = crate::autograd::no_grad(|| {
            if perm.iter().enumerate().all(|(i, &p)| i == p) {
                self.contiguous()
            } else {
                self.permute_usize(&perm)?.contiguous()
            }
        })?;
        Ok(Rows {
            data,
            rows,
            row_len,
            out_dims,
            keep_dims,
        })
    }

    /// Sum over all elements, giving a rank-0 tensor.
    pub fn sum(&self) -> Result<Tensor> {
        self.sum_dim(&[], false)
    }

    /// Sum over `dims` (empty: all), keeping them as size 1 when `keepdim`.
    pub fn sum_dim(&self, dims: &[isize], keepdim: bool) -> Result<Tensor> {
        const OP: &str = "sum";
        let dims = self.reduce_dims(OP, dims)?;
        let in_dims = self.dims().to_vec();
        let keep_dims: Vec<usize> = (0..self.rank())
            .map(|d| if dims.contains(&d) { 1 } else { in_dims[d] })
            .collect();
        let out_dims: Vec<usize> = (0..self.rank())
            .filter(|d| !dims.contains(d))
            .map(|d| in_dims[d])
            .collect();
        // Leading dims of a contiguous tensor: column sums, no transpose.
        let leading = self.is_contiguous() && dims.iter().enumerate().all(|(i, &d)| i == d);
        let out = float_dispatch!(OP, self.dtype(), T => {
            if leading && !dims.is_empty() && dims.len() < self.rank() {
                let outer: usize = dims.iter().map(|&d| in_dims[d]).product();
                let inner = self.numel() / outer.max(1);
                let v = self.read::<T, _>(|s, l| {
                    let r = l.contiguous_range().expect("contiguous");
                    k::sum_cols(&s[r], outer, inner)
                });
                Tensor::from_buf(v, &out_dims)
            } else {
                let r = self.as_rows(&dims)?;
                let v = r.data.read::<T, _>(|s, l| {
                    let s = &s[l.contiguous_range().expect("contiguous")];
                    k::rows(s, r.rows, r.row_len, #[inline(always)] |x: &[T]| k::sum::<T>(x))
                });
                Tensor::from_buf(v, &r.out_dims)
            }
        });
        let out = if keepdim {
            out.reshape_usize(&keep_dims)?
        } else {
            out
        };
        Ok(out.with_grad(OP, &[self], move |g| {
            Ok(vec![Some(
                g.reshape_usize(&keep_dims)?.broadcast_to(&in_dims)?,
            )])
        }))
    }

    /// Mean of all elements.
    pub fn mean(&self) -> Result<Tensor> {
        self.mean_dim(&[], false)
    }

    /// Mean over `dims` (empty: all).
    pub fn mean_dim(&self, dims: &[isize], keepdim: bool) -> Result<Tensor> {
        let ds = self.reduce_dims("mean", dims)?;
        let n: usize = ds.iter().map(|&d| self.dims()[d]).product();
        self.sum_dim(dims, keepdim)?.mul_scalar(1.0 / n as f64)
    }

    /// Sum `self` down to `shape`, the reverse of broadcasting (used by backward rules).
    pub fn sum_to(&self, shape: &[usize]) -> Result<Tensor> {
        if self.dims() == shape {
            return Ok(self.clone());
        }
        let rank = self.rank();
        if shape.len() > rank {
            return Err(Error::shape_mismatch("sum_to", self.dims(), shape));
        }
        let extra = rank - shape.len();
        let mut dims: Vec<isize> = (0..extra as isize).collect();
        for (i, &s) in shape.iter().enumerate() {
            let d = self.dims()[i + extra];
            if s == 1 && d != 1 {
                dims.push((i + extra) as isize);
            } else if s != d {
                return Err(Error::shape_mismatch("sum_to", self.dims(), shape));
            }
        }
        let summed = if dims.is_empty() {
            self.clone()
        } else {
            self.sum_dim(&dims, true)?
        };
        summed.reshape_usize(shape)
    }

    /// Largest values over `dim` and their indices (like `torch.max(x, dim)`).
    pub fn max_dim(&self, dim: isize, keepdim: bool) -> Result<(Tensor, Tensor)> {
        self.extreme_dim(dim, keepdim, true)
    }

    /// Smallest values over `dim` and their indices (like `torch.min(x, dim)`).
    pub fn min_dim(&self, dim: isize, keepdim: bool) -> Result<(Tensor, Tensor)> {
        self.extreme_dim(dim, keepdim, false)
    }

    fn extreme_dim(&self, dim: isize, keepdim: bool, is_max: bool) -> Result<(Tensor, Tensor)> {
        let op = if is_max { "max" } else { "min" };
        let d = normalize_dim(op, dim, self.rank())?;
        if self.rank() > 0 && self.dims()[d] == 0 {
            return Err(Error::bad_shape(
                op,
                self.dims(),
                "cannot reduce an empty dimension",
            ));
        }
        let dims = if self.rank() == 0 { vec![] } else { vec![d] };
        let r = self.as_rows(&dims)?;
        let (vals, idx) = float_dispatch!(op, self.dtype(), T => {
            let pairs: Vec<(T, i64)> = r.data.read::<T, _>(|s, l| {
                let s = &s[l.contiguous_range().expect("contiguous")];
                k::rows(s, r.rows, r.row_len, #[inline(always)] |row: &[T]| {
                    let mut best = row[0];
                    let mut bi = 0usize;
                    for (i, &v) in row.iter().enumerate().skip(1) {
                        if best.is_nan() {
                            break;
                        }
                        let better = if is_max { v > best } else { v < best };
                        if better || v.is_nan() {
                            best = v;
                            bi = i;
                        }
                    }
                    (best, bi as i64)
                })
            });
            let (v, i): (Vec<T>, Vec<i64>) = pairs.into_iter().unzip();
            (Tensor::from_buf(v, &r.out_dims), Tensor::from_buf(i, &r.out_dims))
        });
        let (vals, idx) = if keepdim && self.rank() > 0 {
            (
                vals.reshape_usize(&r.keep_dims)?,
                idx.reshape_usize(&r.keep_dims)?,
            )
        } else {
            (vals, idx)
        };
        let in_dims = self.dims().to_vec();
        let keep = r.keep_dims.clone();
        let idx_keep = idx.reshape_usize(&keep)?;
        let vals = vals.with_grad(op, &[self], move |g| {
            let zeros = Tensor::zeros_with(in_dims.as_slice(), g.dtype());
            let g = g.reshape_usize(&keep)?;
            Ok(vec![Some(zeros.scatter_add(d as isize, &idx_keep, &g)?)])
        });
        Ok((vals, idx))
    }

    /// Index of the largest value over `dim`.
    pub fn argmax(&self, dim: isize, keepdim: bool) -> Result<Tensor> {
        Ok(crate::autograd::no_grad(|| self.max_dim(dim, keepdim))?.1)
    }

    /// Index of the smallest value over `dim`.
    pub fn argmin(&self, dim: isize, keepdim: bool) -> Result<Tensor> {
        Ok(crate::autograd::no_grad(|| self.min_dim(dim, keepdim))?.1)
    }

    /// Largest value over `dims` (empty: all). The gradient is shared evenly among ties.
    pub fn amax(&self, dims: &[isize], keepdim: bool) -> Result<Tensor> {
        self.extreme_dims(dims, keepdim, true)
    }

    /// Smallest value over `dims` (empty: all). The gradient is shared evenly among ties.
    pub fn amin(&self, dims: &[isize], keepdim: bool) -> Result<Tensor> {
        self.extreme_dims(dims, keepdim, false)
    }

    /// Largest element (rank-0).
    pub fn max(&self) -> Result<Tensor> {
        self.amax(&[], false)
    }

    /// Smallest element (rank-0).
    pub fn min(&self) -> Result<Tensor> {
        self.amin(&[], false)
    }

    fn extreme_dims(&self, dims: &[isize], keepdim: bool, is_max: bool) -> Result<Tensor> {
        let op = if is_max { "amax" } else { "amin" };
        let ds = self.reduce_dims(op, dims)?;
        if self.numel() == 0 {
            return Err(Error::bad_shape(
                op,
                self.dims(),
                "cannot reduce an empty tensor",
            ));
        }
        let r = self.as_rows(&ds)?;
        let out = float_dispatch!(op, self.dtype(), T => {
            let v: Vec<T> = r.data.read::<T, _>(|s, l| {
                let s = &s[l.contiguous_range().expect("contiguous")];
                if is_max {
                    k::rows(s, r.rows, r.row_len, #[inline(always)] |x: &[T]| k::max::<T>(x))
                } else {
                    k::rows(s, r.rows, r.row_len, #[inline(always)] |row: &[T]| {
                        row.iter().fold(T::INFINITY, |m, &v| m.min(v))
                    })
                }
            });
            Tensor::from_buf(v, &r.out_dims)
        });
        let keep = r.keep_dims.clone();
        let out = if keepdim {
            out.reshape_usize(&keep)?
        } else {
            out
        };
        let x = self.detach();
        let o = out.detach();
        Ok(out.with_grad(op, &[self], move |g| {
            let o = o.reshape_usize(&keep)?;
            let g = g.reshape_usize(&keep)?;
            let mask = x.eq(&o)?.to_dtype(x.dtype())?;
            let count = mask.sum_dim(&ds.iter().map(|&d| d as isize).collect::<Vec<_>>(), true)?;
            Ok(vec![Some(mask.mul(&g.div(&count)?)?)])
        }))
    }

    /// Variance over `dims` (empty: all) with Bessel's `correction` (PyTorch default 1).
    pub fn var_dim(&self, dims: &[isize], correction: usize, keepdim: bool) -> Result<Tensor> {
        let ds = self.reduce_dims("var", dims)?;
        let n: usize = ds.iter().map(|&d| self.dims()[d]).product();
        let mean = self.mean_dim(dims, true)?;
        let dev = self.sub(&mean)?;
        let denom = (n as f64 - correction as f64).max(0.0);
        dev.square()?.sum_dim(dims, keepdim)?.div_scalar(denom)
    }

    /// Standard deviation over `dims` (empty: all) with Bessel's `correction`.
    pub fn std_dim(&self, dims: &[isize], correction: usize, keepdim: bool) -> Result<Tensor> {
        self.var_dim(dims, correction, keepdim)?.sqrt()
    }

    /// `log(sum(exp(x)))` over `dims`, computed stably.
    pub fn logsumexp(&self, dims: &[isize], keepdim: bool) -> Result<Tensor> {
        let ds = self.reduce_dims("logsumexp", dims)?;
        let m = crate::autograd::no_grad(|| self.amax(dims, true)?.clamp(Some(-1e30), Some(1e30)))?;
        let s = self.sub(&m)?.exp()?.sum_dim(dims, true)?.log()?.add(&m)?;
        if keepdim {
            Ok(s)
        } else {
            let keep: Vec<usize> = (0..self.rank()).filter(|d| !ds.contains(d)).collect();
            let out: Vec<usize> = keep.iter().map(|&d| self.dims()[d]).collect();
            s.reshape_usize(&out)
        }
    }

    /// The p-norm over `dims` (empty: all elements). p = 2 is the Frobenius/Euclidean norm.
    pub fn norm_dim(&self, p: f64, dims: &[isize], keepdim: bool) -> Result<Tensor> {
        if p == f64::INFINITY {
            return self.abs()?.amax(dims, keepdim);
        }
        if p == 2.0 {
            return self.square()?.sum_dim(dims, keepdim)?.sqrt();
        }
        if p == 1.0 {
            return self.abs()?.sum_dim(dims, keepdim);
        }
        self.abs()?.powf(p)?.sum_dim(dims, keepdim)?.powf(1.0 / p)
    }

    /// Euclidean norm of all elements.
    pub fn norm(&self) -> Result<Tensor> {
        self.norm_dim(2.0, &[], false)
    }

    /// Softmax over `dim`.
    pub fn softmax(&self, dim: isize) -> Result<Tensor> {
        self.softmax_impl(dim, false)
    }

    /// Log-softmax over `dim`.
    pub fn log_softmax(&self, dim: isize) -> Result<Tensor> {
        self.softmax_impl(dim, true)
    }

    fn softmax_impl(&self, dim: isize, log: bool) -> Result<Tensor> {
        let op = if log { "log_softmax" } else { "softmax" };
        let d = normalize_dim(op, dim, self.rank())?;
        if self.rank() == 0 {
            let out = if log {
                self.zeros_like()
            } else {
                self.ones_like()
            };
            return Ok(out.with_grad(op, &[self], |g| Ok(vec![Some(g.zeros_like())])));
        }
        let last = self.rank() - 1;
        // Move `dim` last, run rows, move it back.
        let moved = if d == last {
            self.detach()
        } else {
            self.detach().transpose_usize(d, last)
        };
        let r = moved.as_rows(&[last])?;
        let out = float_dispatch!(op, self.dtype(), T => {
            let mut v = uninit_buf::<T>(r.data.numel());
            r.data.read::<T, _>(|s, l| {
                let s = &s[l.contiguous_range().expect("contiguous")];
                if log {
                    k::rows_into(s, &mut v, r.row_len, #[inline(always)] |x: &[T], o: &mut [MaybeUninit<T>]| {
                        k::log_softmax_row::<T>(x, o)
                    });
                } else {
                    k::rows_into(s, &mut v, r.row_len, #[inline(always)] |x: &[T], o: &mut [MaybeUninit<T>]| {
                        k::softmax_row::<T>(x, o)
                    });
                }
            });
            // SAFETY: every row was written in full.
            Tensor::from_buf(unsafe { assume_init(v) }, moved.dims())
        });
        let out = if d == last {
            out
        } else {
            out.transpose_usize(d, last).contiguous()?
        };
        let y = out.detach();
        Ok(out.with_grad(op, &[self], move |g| {
            let dim = d as isize;
            if d == last && g.dtype() == y.dtype() {
                return Ok(vec![Some(softmax_backward_rows(g, &y, log)?)]);
            }
            let gi = if log {
                // g - softmax * sum(g)
                g.sub(&y.exp()?.mul(&g.sum_dim(&[dim], true)?)?)?
            } else {
                // y * (g - sum(g * y))
                y.mul(&g.sub(&g.mul(&y)?.sum_dim(&[dim], true)?)?)?
            };
            Ok(vec![Some(gi)])
        }))
    }

    /// Cumulative sum along `dim`.
    pub fn cumsum(&self, dim: isize) -> Result<Tensor> {
        const OP: &str = "cumsum";
        if self.rank() == 0 {
            return Ok(self.clone());
        }
        let d = normalize_dim(OP, dim, self.rank())?;
        let last = self.rank() - 1;
        let moved = if d == last {
            self.detach()
        } else {
            self.detach().transpose_usize(d, last)
        };
        let r = moved.as_rows(&[last])?;
        let out = float_dispatch!(OP, self.dtype(), T => {
            let mut v = uninit_buf::<T>(r.data.numel());
            r.data.read::<T, _>(|s, l| {
                let s = &s[l.contiguous_range().expect("contiguous")];
                k::rows_into(s, &mut v, r.row_len, #[inline(always)] |row: &[T], o: &mut [MaybeUninit<T>]| {
                    let mut acc = T::ZERO;
                    for (o, &x) in o.iter_mut().zip(row) {
                        acc += x;
                        o.write(acc);
                    }
                });
            });
            // SAFETY: every row was written in full.
            Tensor::from_buf(unsafe { assume_init(v) }, moved.dims())
        });
        let out = if d == last {
            out
        } else {
            out.transpose_usize(d, last).contiguous()?
        };
        Ok(out.with_grad(OP, &[self], move |g| {
            // Reverse cumulative sum.
            let dim = d as isize;
            Ok(vec![Some(g.flip(&[dim])?.cumsum(dim)?.flip(&[dim])?)])
        }))
    }
}

/// The gradient of softmax (`y (g - Σ g y)`) or log-softmax (`g - e^y Σ g`) over the last
/// dim, from the output `y`: one pass over each row pair, no temporaries.
fn softmax_backward_rows(g: &Tensor, y: &Tensor, log: bool) -> Result<Tensor> {
    let row_len = *y.dims().last().expect("rank > 0");
    let g = g.contiguous()?;
    let y = y.contiguous()?;
    float_dispatch!("softmax_backward", y.dtype(), T => {
        let mut v = uninit_buf::<T>(y.numel());
        g.read2::<T, T, _>(&y, |gs, gl, ys, yl| {
            let gs = &gs[gl.contiguous_range().expect("contiguous")];
            let ys = &ys[yl.contiguous_range().expect("contiguous")];
            if log {
                k::rows2_into(gs, ys, &mut v, row_len, #[inline(always)] |g: &[T], y: &[T], o: &mut [MaybeUninit<T>]| {
                    let s = k::sum(g);
                    for ((o, &g), &y) in o.iter_mut().zip(g).zip(y) {
                        o.write(g - y.exp() * s);
                    }
                });
            } else {
                k::rows2_into(gs, ys, &mut v, row_len, #[inline(always)] |g: &[T], y: &[T], o: &mut [MaybeUninit<T>]| {
                    let s = k::dot(g, y);
                    for ((o, &g), &y) in o.iter_mut().zip(g).zip(y) {
                        o.write(y * (g - s));
                    }
                });
            }
        });
        // SAFETY: every row was written in full.
        Ok(Tensor::from_buf(unsafe { assume_init(v) }, y.dims()))
    })
}
