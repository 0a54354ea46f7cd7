//! Scaled dot-product attention as one autodiff node (PyTorch's
//! `F.scaled_dot_product_attention`): the forward pass keeps only the attention probabilities,
//! and the backward pass computes the gradients of `q`, `k` and `v` from them with batched
//! GEMMs, instead of recording a graph node per matmul, scale, mask, softmax and dropout.

use nerve_core::{no_grad, DType, Error, Result, Tensor};

/// Options of [`scaled_dot_product_attention`] (PyTorch's defaults).
#[derive(Clone, Debug, Default)]
pub struct SdpaOptions {
    /// A mask broadcastable to `[..., L, S]`: bool (`true` = may attend, as PyTorch) or float
    /// (added to the scores).
    pub mask: Option<Tensor>,
    /// Causal masking: query `i` attends to keys `0..=i` (top-left aligned, as PyTorch).
    pub causal: bool,
    /// Dropout on the attention probabilities (only when non-zero).
    pub dropout_p: f64,
    /// Score scale; `1/sqrt(E)` when `None`.
    pub scale: Option<f64>,
}

/// `softmax(q kᵀ · scale + mask) v` for `q` `[..., L, E]`, `k` `[..., S, E]`, `v` `[..., S, Ev]`
/// (equal leading dims), returning `[..., L, Ev]`. Differentiable w.r.t. `q`, `k` and `v`.
pub fn scaled_dot_product_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    opts: &SdpaOptions,
) -> Result<Tensor> {
    const OP: &str = "scaled_dot_product_attention";
    let r = q.rank();
    if r < 2 || k.rank() != r || v.rank() != r {
        return Err(Error::invalid(
            OP,
            format!(
                "q, k and v need the same rank (at least 2), got {:?}, {:?}, {:?}",
                q.dims(),
                k.dims(),
                v.dims()
            ),
        ));
    }
    let (l, e) = (q.dims()[r - 2], q.dims()[r - 1]);
    let s = k.dims()[r - 2];
    if k.dims()[..r - 2] != q.dims()[..r - 2] || k.dims()[r - 1] != e {
        return Err(Error::shape_mismatch(OP, q.dims(), k.dims()));
    }
    if v.dims()[..r - 1] != k.dims()[..r - 1] {
        return Err(Error::shape_mismatch(OP, k.dims(), v.dims()));
    }
    let scale = opts.scale.unwrap_or(1.0 / (e as f64).sqrt());
    let (qd, kd, vd) = (q.detach(), k.detach(), v.detach());
    // Forward, outside the graph: probabilities p (after dropout: pd) and the output.
    let (p, pd, keep) = no_grad(|| -> Result<(Tensor, Tensor, Option<Tensor>)> {
        let mut scores = qd.matmul(&kd.transpose(-2, -1)?)?.mul_scalar(scale)?;
        if opts.causal {
            let i = Tensor::arange_i64(0, l as i64, 1)?.reshape(&[l as isize, 1])?;
            let j = Tensor::arange_i64(0, s as i64, 1)?.reshape(&[1, s as isize])?;
            scores = scores.masked_fill(&j.gt(&i)?, f64::NEG_INFINITY)?;
        }
        match &opts.mask {
            Some(m) if m.dtype() == DType::Bool => {
                let blocked = m.eq(&Tensor::zeros_with(Vec::<usize>::new(), DType::Bool))?;
                scores = scores.masked_fill(&blocked, f64::NEG_INFINITY)?;
            }
            Some(m) => scores = scores.add(&m.to_dtype(scores.dtype())?)?,
            None => {}
        }
        let p = scores.softmax(-1)?;
        if opts.dropout_p > 0.0 {
            let keep = Tensor::ones_like(&p).dropout(opts.dropout_p, true)?;
            Ok((p.clone(), p.mul(&keep)?, Some(keep)))
        } else {
            Ok((p.clone(), p, None))
        }
    })?;
    let out = no_grad(|| pd.matmul(&vd))?;
    Ok(out.attach_backward(OP, &[q, k, v], move |g| {
        no_grad(|| {
            // dv = pdᵀ g; dpd = g vᵀ; dp = dpd ⊙ keep; ds = p ⊙ (dp − Σ dp ⊙ p) · scale.
            let dv = pd.transpose(-2, -1)?.matmul(g)?;
            let mut dp = g.matmul(&vd.transpose(-2, -1)?)?;
            if let Some(keep) = &keep {
                dp = dp.mul(keep)?;
            }
            let row = dp.mul(&p)?.sum_dim(&[-1], true)?;
            let ds = p.mul(&dp.sub(&row)?)?.mul_scalar(scale)?;
            let dq = ds.matmul(&kd)?;
            let dk = ds.transpose(-2, -1)?.matmul(&qd)?;
            Ok(vec![Some(dq), Some(dk), Some(dv)])
        })
    }))
}
