//! Normalisation ops with PyTorch's names and semantics (`torch.nn.functional.layer_norm`,
//! `rms_norm`, `group_norm`, `batch_norm`). Each is one fused kernel forward, which saves the
//! per-group mean and `1/std`, and one fused kernel backward, which gives the input, weight
//! and bias gradients together: the composite formula costs ten element-wise passes and ten
//! backward rules.

use super::float_dispatch;
use crate::dtype::{Element, Float};
use crate::kernels::norm::{self as k, NormShape};
use crate::{no_grad, Error, Result, Tensor};

/// The values of an optional affine parameter as `T`s (`fill` where it is absent), after
/// checking its dtype against `x` and its dims against `dims`.
fn param_values<T: Float>(
    op: &'static str,
    x: &Tensor,
    p: Option<&Tensor>,
    dims: &[usize],
    fill: f64,
) -> Result<Vec<T>> {
    match p {
        None => Ok(vec![T::from_f64(fill); dims.iter().product()]),
        Some(p) => {
            x.check_same_dtype(p, op)?;
            if p.dims() != dims {
                return Err(Error::shape_mismatch(op, p.dims(), dims));
            }
            p.to_vec::<T>()
        }
    }
}

/// `x`'s contiguous elements (the caller made it contiguous).
fn contiguous_slice<'a, T>(s: &'a [T], l: &crate::Layout) -> &'a [T] {
    &s[l.contiguous_range().expect("made contiguous by the caller")]
}

/// The output gradient as a contiguous tensor of `T`.
fn contiguous_grad<T: Float>(g: &Tensor) -> Result<Tensor> {
    if g.dtype() == T::DTYPE {
        g.contiguous()
    } else {
        g.to_dtype(T::DTYPE)?.contiguous()
    }
}

/// Per-channel `[N, C, S]` view of a tensor `[N, C, *]`.
fn channel_shape(op: &'static str, x: &Tensor, groups: usize) -> Result<NormShape> {
    if x.rank() < 2 {
        return Err(Error::bad_shape(op, x.dims(), "expected [N, C, *]"));
    }
    let d = x.dims();
    Ok(NormShape {
        n: d[0],
        c: d[1],
        s: d[2..].iter().product(),
        groups,
    })
}

impl Tensor {
    /// Layer normalisation over the trailing dims `normalized_shape`:
    /// `(x - mean) / sqrt(var + eps) * weight + bias`, with the biased variance, and `weight`,
    /// `bias` (optional) shaped `normalized_shape` (`F.layer_norm`).
    ///
    /// ```
    /// use nerve_core::Tensor;
    /// let x = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0], [2, 2]).unwrap();
    /// let y = x.layer_norm(&[2], None, None, 1e-5).unwrap();
    /// let v = y.to_vec::<f32>().unwrap();
    /// assert!((v[0] + 1.0).abs() < 1e-3 && (v[3] - 1.0).abs() < 1e-3);
    /// ```
    pub fn layer_norm(
        &self,
        normalized_shape: &[usize],
        weight: Option<&Tensor>,
        bias: Option<&Tensor>,
        eps: f64,
    ) -> Result<Tensor> {
        let shape = self.trailing_shape("layer_norm", normalized_shape)?;
        self.grouped_norm(
            "layer_norm",
            shape,
            normalized_shape,
            weight,
            bias,
            eps,
            true,
        )
    }

    /// Root-mean-square normalisation over the trailing dims `normalized_shape`:
    /// `x / sqrt(mean(x²) + eps) * weight`, `weight` (optional) shaped `normalized_shape`
    /// (`F.rms_norm`; PyTorch's default eps is the dtype's machine epsilon).
    pub fn rms_norm(
        &self,
        normalized_shape: &[usize],
        weight: Option<&Tensor>,
        eps: f64,
    ) -> Result<Tensor> {
        let shape = self.trailing_shape("rms_norm", normalized_shape)?;
        self.grouped_norm(
            "rms_norm",
            shape,
            normalized_shape,
            weight,
            None,
            eps,
            false,
        )
    }

    /// Group normalisation of `[N, C, *]`: the channels split into `num_groups` groups of
    /// consecutive channels, each normalised over its channels and positions (biased
    /// variance), then the per-channel affine `weight`, `bias` (optional, `[C]`)
    /// (`F.group_norm`).
    pub fn group_norm(
        &self,
        num_groups: usize,
        weight: Option<&Tensor>,
        bias: Option<&Tensor>,
        eps: f64,
    ) -> Result<Tensor> {
        const OP: &str = "group_norm";
        let shape = channel_shape(OP, self, num_groups)?;
        if num_groups == 0 || !shape.c.is_multiple_of(num_groups) {
            return Err(Error::invalid(
                OP,
                format!(
                    "{} channels not divisible into {num_groups} groups",
                    shape.c
                ),
            ));
        }
        self.grouped_norm(OP, shape, &[shape.c], weight, bias, eps, true)
    }

    /// Batch normalisation of `[N, C, *]` per channel (`F.batch_norm`). With `training`, the
    /// batch's statistics normalise (biased variance) and, when given, `running_mean` and
    /// `running_var` (`[C]`) are updated in place: `r = (1 - momentum) r + momentum · stat`,
    /// with the unbiased variance. Otherwise the running statistics normalise (they must be
    /// given). Then the per-channel affine `weight`, `bias` (optional, `[C]`). The running
    /// statistics get no gradient.
    #[allow(clippy::too_many_arguments)] // PyTorch's signature
    pub fn batch_norm(
        &self,
        running_mean: Option<&Tensor>,
        running_var: Option<&Tensor>,
        weight: Option<&Tensor>,
        bias: Option<&Tensor>,
        training: bool,
        momentum: f64,
        eps: f64,
    ) -> Result<Tensor> {
        const OP: &str = "batch_norm";
        let shape = channel_shape(OP, self, 1)?;
        let c = shape.c;
        for r in [running_mean, running_var].into_iter().flatten() {
            if r.dims() != [c] {
                return Err(Error::shape_mismatch(OP, r.dims(), &[c]));
            }
        }
        if running_mean.is_some() != running_var.is_some() {
            return Err(Error::invalid(
                OP,
                "give both running_mean and running_var, or neither",
            ));
        }
        let count = shape.n * shape.s;
        if training && count < 2 {
            return Err(Error::bad_shape(
                OP,
                self.dims(),
                "expected more than 1 value per channel when training",
            ));
        }
        float_dispatch!(OP, self.dtype(), T => {
            let w = param_values::<T>(OP, self, weight, &[c], 1.0)?;
            let b = param_values::<T>(OP, self, bias, &[c], 0.0)?;
            let x = no_grad(|| self.contiguous())?.detach();
            // Per-channel mean and 1/std, finished in f64.
            let (mean, rstd): (Vec<T>, Vec<f64>) = if training {
                let (mean, m2) = x.read::<T, _>(|s, l| k::channel_mean_m2(contiguous_slice(s, l), shape));
                let rstd = m2.iter().map(|v| 1.0 / (v.to_f64() / count as f64 + eps).sqrt()).collect();
                if let (Some(rm), Some(rv)) = (running_mean, running_var) {
                    let m = momentum;
                    let new_mean: Vec<f64> = rm.to_f64_vec().iter().zip(&mean)
                        .map(|(r, v)| (1.0 - m) * r + m * v.to_f64())
                        .collect();
                    let new_var: Vec<f64> = rv.to_f64_vec().iter().zip(&m2)
                        .map(|(r, v)| (1.0 - m) * r + m * v.to_f64() / (count - 1) as f64)
                        .collect();
                    rm.copy_(&Tensor::from_vec(new_mean, [c])?)?;
                    rv.copy_(&Tensor::from_vec(new_var, [c])?)?;
                }
                (mean, rstd)
            } else {
                let (Some(rm), Some(rv)) = (running_mean, running_var) else {
                    return Err(Error::invalid(
                        OP,
                        "running_mean and running_var must be given in evaluation mode",
                    ));
                };
                let mean = rm.to_f64_vec().into_iter().map(T::from_f64).collect();
                let rstd = rv.to_f64_vec().iter().map(|v| 1.0 / (v + eps).sqrt()).collect();
                (mean, rstd)
            };
            // y = (x - mean) · scale + bias per channel, scale = rstd · w.
            let scale: Vec<f64> = rstd.iter().zip(&w).map(|(r, w)| r * w.to_f64()).collect();
            let scale_t: Vec<T> = scale.iter().map(|&v| T::from_f64(v)).collect();
            let y = x.read::<T, _>(|s, l| {
                k::channel_apply(None, contiguous_slice(s, l), shape, &mean, &scale_t, &scale_t, &b)
            });
            let out = Tensor::from_buf(y, self.dims());
            let mut inputs = vec![self];
            inputs.extend(weight);
            inputs.extend(bias);
            let (has_w, has_b) = (weight.is_some(), bias.is_some());
            Ok(out.with_grad(OP, &inputs, move |g| {
                let g = contiguous_grad::<T>(g)?;
                let (dx, sg, sgx) = g.read2::<T, T, _>(&x, |gs, gl, xs, xl| {
                    let (gs, xs) = (contiguous_slice(gs, gl), contiguous_slice(xs, xl));
                    let (sg, sgx) = k::channel_grad_sums(gs, xs, &mean, shape);
                    // dx = rstd w (g - mean(g) - xhat mean(g xhat)) in training, as
                    // g k1 + (x - mean) k2 + k3; with fixed statistics only g k1.
                    let n = count as f64;
                    let mut k2 = vec![T::ZERO; c];
                    let mut k3 = vec![T::ZERO; c];
                    if training {
                        for i in 0..c {
                            let a = sg[i].to_f64() / n;
                            let b = rstd[i] * sgx[i].to_f64() / n;
                            k2[i] = T::from_f64(-scale[i] * rstd[i] * b);
                            k3[i] = T::from_f64(-scale[i] * a);
                        }
                    }
                    let dx = k::channel_apply(Some(gs), xs, shape, &mean, &scale_t, &k2, &k3);
                    (dx, sg, sgx)
                });
                let mut grads = vec![Some(Tensor::from_buf(dx, x.dims()))];
                if has_w {
                    let dw: Vec<T> = sgx.iter().zip(&rstd).map(|(v, r)| T::from_f64(v.to_f64() * r)).collect();
                    grads.push(Some(Tensor::from_buf(dw, &[c])));
                }
                if has_b {
                    grads.push(Some(Tensor::from_buf(sg, &[c])));
                }
                Ok(grads)
            }))
        })
    }

    /// `[rows, D, 1]` view for a norm over the trailing dims `normalized_shape`.
    fn trailing_shape(&self, op: &'static str, normalized_shape: &[usize]) -> Result<NormShape> {
        let r = self.rank();
        if normalized_shape.is_empty()
            || normalized_shape.len() > r
            || self.dims()[r - normalized_shape.len()..] != *normalized_shape
        {
            return Err(Error::shape_mismatch(op, self.dims(), normalized_shape));
        }
        let d: usize = normalized_shape.iter().product();
        Ok(NormShape {
            n: self.dims()[..r - normalized_shape.len()].iter().product(),
            c: d,
            s: 1,
            groups: 1,
        })
    }

    /// Normalise each group of `shape` (centered, or by the root mean square), then the
    /// per-channel affine; one node whose backward gives every gradient in one kernel.
    #[allow(clippy::too_many_arguments)]
    fn grouped_norm(
        &self,
        op: &'static str,
        shape: NormShape,
        param_dims: &[usize],
        weight: Option<&Tensor>,
        bias: Option<&Tensor>,
        eps: f64,
        centered: bool,
    ) -> Result<Tensor> {
        float_dispatch!(op, self.dtype(), T => {
            let w = param_values::<T>(op, self, weight, param_dims, 1.0)?;
            let b = param_values::<T>(op, self, bias, param_dims, 0.0)?;
            let x = no_grad(|| self.contiguous())?.detach();
            let (y, stats) = x.read::<T, _>(|s, l| {
                k::group_norm_forward(contiguous_slice(s, l), shape, &w, &b, eps, centered)
            });
            let out = Tensor::from_buf(y, self.dims());
            let mut inputs = vec![self];
            inputs.extend(weight);
            inputs.extend(bias);
            let (has_w, has_b) = (weight.is_some(), bias.is_some());
            let param_dims = param_dims.to_vec();
            Ok(out.with_grad(op, &inputs, move |g| {
                let g = contiguous_grad::<T>(g)?;
                let (dx, dw, db) = g.read2::<T, T, _>(&x, |gs, gl, xs, xl| {
                    k::group_norm_backward(
                        contiguous_slice(gs, gl),
                        contiguous_slice(xs, xl),
                        &stats,
                        shape,
                        &w,
                        centered,
                    )
                });
                let mut grads = vec![Some(Tensor::from_buf(dx, x.dims()))];
                if has_w {
                    grads.push(Some(Tensor::from_buf(dw, &param_dims)));
                }
                if has_b {
                    grads.push(Some(Tensor::from_buf(db, &param_dims)));
                }
                Ok(grads)
            }))
        })
    }
}
