//! Scaled dot-product attention as one autodiff node (PyTorch's
//! `F.scaled_dot_product_attention`): the forward pass keeps only the attention probabilities,
//! and the backward pass computes the gradients of `q`, `k` and `v` from them with batched
//! GEMMs, instead of recording a graph node per matmul, scale, mask, softmax and dropout.
//! Without a mask tensor or dropout (the common training and inference case) both passes run
//! in the fused kernel [`nerve_core::kernels::attention`], one (batch, head) item at a time
//! in cache.

use nerve_core::kernels::attention::{attention_backward, attention_forward, AttnDims, AttnLayout};
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
    let same = q.dtype() == k.dtype() && q.dtype() == v.dtype();
    if opts.mask.is_none()
        && opts.dropout_p == 0.0
        && same
        && matches!(q.dtype(), DType::F32 | DType::F64)
    {
        return fused(q, k, v, scale, opts.causal);
    }
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

/// [`scaled_dot_product_attention`] without a mask tensor or dropout, in the fused kernel.
fn fused(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, causal: bool) -> Result<Tensor> {
    let r = q.rank();
    let dims = AttnDims {
        items: q.dims()[..r - 2].iter().product(),
        l: q.dims()[r - 2],
        s: k.dims()[r - 2],
        e: q.dims()[r - 1],
        ev: v.dims()[r - 1],
    };
    let mut out_dims = q.dims().to_vec();
    out_dims[r - 1] = dims.ev;
    let layouts = [
        AttnLayout::contiguous(dims.l, dims.e),
        AttnLayout::contiguous(dims.s, dims.e),
        AttnLayout::contiguous(dims.s, dims.ev),
    ];
    attention_node(dims, [q, k, v], layouts, scale, causal, out_dims, false)
}

/// Causal or full self-attention straight from a packed projection `qkv` `[B, L, 3E]` (the
/// queries, keys and values of `heads` heads side by side, as `x · in_proj_weightᵀ`), returning
/// the heads merged `[B, L, E]`: what splitting into heads, [`scaled_dot_product_attention`]
/// and merging the heads again compute, without the copies (no mask tensor, no dropout).
pub fn packed_self_attention(qkv: &Tensor, heads: usize, causal: bool) -> Result<Tensor> {
    const OP: &str = "packed_self_attention";
    let d = qkv.dims();
    if qkv.rank() != 3 || heads == 0 || !d[2].is_multiple_of(3 * heads) {
        return Err(Error::bad_shape(
            OP,
            d,
            format!("expected [batch, seq, 3·embed] with embed divisible by {heads} heads"),
        ));
    }
    let (b, l, w) = (d[0], d[1], d[2] / 3);
    let hd = w / heads;
    let dims = AttnDims {
        items: b * heads,
        l,
        s: l,
        e: hd,
        ev: hd,
    };
    let third = |i: usize| AttnLayout::heads(i * w, heads, l, hd, 3 * w);
    let scale = 1.0 / (hd as f64).sqrt();
    attention_node(
        dims,
        [qkv, qkv, qkv],
        [third(0), third(1), third(2)],
        scale,
        causal,
        vec![b, l, w],
        true,
    )
}

/// The autodiff node of the fused attention kernel over `inputs` (`q`, `k`, `v`, or the same
/// packed tensor three times when `packed`), read through `layouts`.
fn attention_node(
    dims: AttnDims,
    inputs: [&Tensor; 3],
    layouts: [AttnLayout; 3],
    scale: f64,
    causal: bool,
    out_dims: Vec<usize>,
    packed: bool,
) -> Result<Tensor> {
    const OP: &str = "scaled_dot_product_attention";
    let [lq, lk, lv] = layouts;
    // The packed projection is made contiguous once and read three times.
    let qc = inputs[0].detach().contiguous()?;
    let (kc, vc) = if packed {
        (qc.clone(), qc.clone())
    } else {
        (
            inputs[1].detach().contiguous()?,
            inputs[2].detach().contiguous()?,
        )
    };
    let parents: Vec<&Tensor> = if packed {
        vec![inputs[0]]
    } else {
        inputs.to_vec()
    };
    let dims_of = inputs.map(|t| t.dims().to_vec());
    macro_rules! run {
        ($T:ty) => {{
            let scale = scale as $T;
            let (p, out) = qc.with_data::<$T, _>(|qv| {
                kc.with_data::<$T, _>(|kv| {
                    vc.with_data::<$T, _>(|vv| {
                        attention_forward(dims, (qv, lq), (kv, lk), (vv, lv), scale, causal)
                    })
                })
            })???;
            let out = Tensor::from_vec(out, out_dims)?;
            Ok(out.attach_backward(OP, &parents, move |g| {
                let g = g.contiguous()?;
                let mut grads = g.with_data::<$T, _>(|gv| {
                    qc.with_data::<$T, _>(|qv| {
                        kc.with_data::<$T, _>(|kv| {
                            vc.with_data::<$T, _>(|vv| {
                                attention_backward(
                                    dims,
                                    (qv, lq),
                                    (kv, lk),
                                    (vv, lv),
                                    &p,
                                    gv,
                                    scale,
                                    causal,
                                    packed,
                                )
                            })
                        })
                    })
                })????;
                if packed {
                    return Ok(vec![Some(Tensor::from_vec(grads, dims_of[0].clone())?)]);
                }
                let (nq, nk) = (qc.numel(), kc.numel());
                let dv = grads.split_off(nq + nk);
                let dk = grads.split_off(nq);
                Ok(vec![
                    Some(Tensor::from_vec(grads, dims_of[0].clone())?),
                    Some(Tensor::from_vec(dk, dims_of[1].clone())?),
                    Some(Tensor::from_vec(dv, dims_of[2].clone())?),
                ])
            }))
        }};
    }
    match qc.dtype() {
        DType::F32 => run!(f32),
        DType::F64 => run!(f64),
        d => Err(Error::invalid(OP, format!("needs f32 or f64, got {d:?}"))),
    }
}

/// Multi-head attention with PyTorch's parameter layout: `in_proj_weight` `[3E, E]`,
/// `in_proj_bias` `[3E]`, `out_proj.weight` `[E, E]`, `out_proj.bias` `[E]`.
pub struct MultiheadAttention {
    /// Packed query, key and value projections `[3E, E]`.
    pub in_proj_weight: Tensor,
    /// Packed projection biases `[3E]`.
    pub in_proj_bias: Option<Tensor>,
    /// Output projection.
    pub out_proj: crate::layers::Linear,
    /// Number of heads.
    pub num_heads: usize,
    /// Inputs are `[batch, seq, embed]` instead of `[seq, batch, embed]`.
    pub batch_first: bool,
    /// Dropout on the attention probabilities (in training).
    pub dropout: f64,
    training: std::sync::atomic::AtomicBool,
}

/// Masks of [`MultiheadAttention::attend`], with PyTorch's meaning: `true` = *not* attended.
#[derive(Clone, Debug, Default)]
pub struct MhaMasks {
    /// `[batch, S]` bool: keys to ignore (padding).
    pub key_padding_mask: Option<Tensor>,
    /// `[L, S]` bool (`true` = blocked) or float (added to the scores).
    pub attn_mask: Option<Tensor>,
    /// Causal masking.
    pub is_causal: bool,
}

impl MultiheadAttention {
    /// `nn.MultiheadAttention(embed_dim, num_heads, bias=bias, batch_first=batch_first)` with
    /// PyTorch's initialisation (xavier-uniform in-projection, zero biases).
    pub fn new(embed_dim: usize, num_heads: usize, bias: bool, batch_first: bool) -> Result<Self> {
        if num_heads == 0 || !embed_dim.is_multiple_of(num_heads) {
            return Err(Error::invalid(
                "MultiheadAttention",
                format!("embed_dim {embed_dim} must be divisible by num_heads {num_heads}"),
            ));
        }
        let in_proj_weight = Tensor::zeros([3 * embed_dim, embed_dim]).requires_grad_(true);
        crate::init::xavier_uniform_(&in_proj_weight, 1.0)?;
        let in_proj_bias = bias.then(|| Tensor::zeros([3 * embed_dim]).requires_grad_(true));
        let out_proj = crate::layers::Linear::new(embed_dim, embed_dim, bias)?;
        if let Some(b) = &out_proj.bias {
            crate::init::zeros_(b)?;
        }
        Ok(Self {
            in_proj_weight,
            in_proj_bias,
            out_proj,
            num_heads,
            batch_first,
            dropout: 0.0,
            training: std::sync::atomic::AtomicBool::new(true),
        })
    }

    /// Attention of `query` over `key`/`value` (each `[L or S, batch, E]`, or batch first).
    pub fn attend(
        &self,
        query: &Tensor,
        key: &Tensor,
        value: &Tensor,
        masks: &MhaMasks,
    ) -> Result<Tensor> {
        const OP: &str = "MultiheadAttention";
        let e = self.in_proj_weight.dims()[1];
        let to_bf = |t: &Tensor| -> Result<Tensor> {
            if t.rank() != 3 || t.dims()[2] != e {
                return Err(Error::bad_shape(
                    OP,
                    t.dims(),
                    format!("expected 3-d inputs with embed_dim {e}"),
                ));
            }
            if self.batch_first {
                Ok(t.clone())
            } else {
                t.transpose(0, 1)
            }
        };
        let (q, k, v) = (to_bf(query)?, to_bf(key)?, to_bf(value)?);
        let training = self.training.load(std::sync::atomic::Ordering::Relaxed);
        let dropout = if training { self.dropout } else { 0.0 };
        let self_attention = query.id() == key.id() && key.id() == value.id();
        if self_attention
            && dropout == 0.0
            && masks.key_padding_mask.is_none()
            && masks.attn_mask.is_none()
            && matches!(q.dtype(), DType::F32 | DType::F64)
        {
            // One projection GEMM for q, k and v, and attention read straight from it.
            let qkv = q.linear(&self.in_proj_weight, self.in_proj_bias.as_ref())?;
            let o = packed_self_attention(&qkv, self.num_heads, masks.is_causal)?;
            let y = crate::module::Module::forward(&self.out_proj, &o)?;
            return if self.batch_first {
                Ok(y)
            } else {
                y.transpose(0, 1)
            };
        }
        let (b, l, s) = (q.dims()[0], q.dims()[1], k.dims()[1]);
        let (h, hd) = (self.num_heads as isize, (e / self.num_heads) as isize);
        let project = |x: &Tensor, i: usize| -> Result<Tensor> {
            let w = self.in_proj_weight.narrow(0, i * e, e)?;
            let bias = self
                .in_proj_bias
                .as_ref()
                .map(|b| b.narrow(0, i * e, e))
                .transpose()?;
            let y = x.linear(&w, bias.as_ref())?;
            // [B, T, E] -> [B, heads, T, hd]
            y.reshape(&[b as isize, -1, h, hd])?.transpose(1, 2)
        };
        let (qh, kh, vh) = (project(&q, 0)?, project(&k, 1)?, project(&v, 2)?);
        // Combine the masks into SDPA's form (true = may attend / float added).
        let mut mask: Option<Tensor> = None;
        if let Some(kpm) = &masks.key_padding_mask {
            if kpm.dims() != [b, s] {
                return Err(Error::shape_mismatch(OP, &[b, s], kpm.dims()));
            }
            let allowed = kpm.eq(&Tensor::zeros_with(Vec::<usize>::new(), DType::Bool))?;
            mask = Some(allowed.reshape(&[b as isize, 1, 1, s as isize])?);
        }
        let mut float_mask = None;
        if let Some(am) = &masks.attn_mask {
            if am.dtype() == DType::Bool {
                let allowed = am.eq(&Tensor::zeros_with(Vec::<usize>::new(), DType::Bool))?;
                mask = Some(match mask {
                    Some(m) => m
                        .to_dtype(DType::F32)?
                        .mul(&allowed.to_dtype(DType::F32)?)?
                        .gt(&Tensor::zeros(()))?,
                    None => allowed,
                });
            } else {
                float_mask = Some(am.clone());
            }
        }
        let mask = match (mask, float_mask) {
            (Some(m), Some(f)) => Some(m.where_cond(
                &f,
                &Tensor::full((), f64::NEG_INFINITY).to_dtype(f.dtype())?,
            )?),
            (Some(m), None) => Some(m),
            (None, f) => f,
        };
        let opts = SdpaOptions {
            mask,
            causal: masks.is_causal,
            dropout_p: dropout,
            scale: None,
        };
        let o = scaled_dot_product_attention(&qh, &kh, &vh, &opts)?;
        let o = o
            .transpose(1, 2)?
            .reshape(&[b as isize, l as isize, e as isize])?;
        let y = crate::module::Module::forward(&self.out_proj, &o)?;
        if self.batch_first {
            Ok(y)
        } else {
            y.transpose(0, 1)
        }
    }
}

/// Keys and values of the tokens seen so far, per layer, for incremental decoding:
/// `[batch, heads, seen, head_dim]` each.
#[derive(Clone, Debug, Default)]
pub struct KvCache {
    /// Cached keys.
    pub k: Option<Tensor>,
    /// Cached values.
    pub v: Option<Tensor>,
}

impl KvCache {
    /// Tokens cached so far.
    pub fn len(&self) -> usize {
        self.k.as_ref().map_or(0, |k| k.dims()[2])
    }
    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl MultiheadAttention {
    /// Causal self-attention of new tokens `x` `[batch, new, E]` (batch first) over the cached
    /// tokens and themselves; appends their keys and values to `cache`. Without gradients in
    /// mind (decoding), but differentiable all the same.
    pub fn attend_cached(&self, x: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        const OP: &str = "MultiheadAttention";
        let e = self.in_proj_weight.dims()[1];
        if x.rank() != 3 || x.dims()[2] != e || !self.batch_first {
            return Err(Error::bad_shape(
                OP,
                x.dims(),
                format!("cached attention needs batch-first [B, T, {e}]"),
            ));
        }
        let (b, t) = (x.dims()[0], x.dims()[1]);
        let (h, hd) = (self.num_heads as isize, (e / self.num_heads) as isize);
        let project = |i: usize| -> Result<Tensor> {
            let bias = self
                .in_proj_bias
                .as_ref()
                .map(|b| b.narrow(0, i * e, e))
                .transpose()?;
            let y = x.linear(&self.in_proj_weight.narrow(0, i * e, e)?, bias.as_ref())?;
            y.reshape(&[b as isize, -1, h, hd])?.transpose(1, 2)
        };
        let (q, k_new, v_new) = (project(0)?, project(1)?, project(2)?);
        let past = cache.len();
        let k = match &cache.k {
            Some(k) => Tensor::cat(&[k, &k_new], 2)?,
            None => k_new,
        };
        let v = match &cache.v {
            Some(v) => Tensor::cat(&[v, &v_new], 2)?,
            None => v_new,
        };
        // New query i sits at position past + i and sees keys 0..=past + i.
        let s = past + t;
        let i = Tensor::arange_i64(past as i64, s as i64, 1)?.reshape(&[t as isize, 1])?;
        let j = Tensor::arange_i64(0, s as i64, 1)?.reshape(&[1, s as isize])?;
        let opts = SdpaOptions {
            mask: Some(j.le(&i)?),
            ..Default::default()
        };
        let o = scaled_dot_product_attention(&q, &k, &v, &opts)?;
        cache.k = Some(k);
        cache.v = Some(v);
        let o = o
            .transpose(1, 2)?
            .reshape(&[b as isize, t as isize, e as isize])?;
        crate::module::Module::forward(&self.out_proj, &o)
    }
}

impl crate::module::Module for MultiheadAttention {
    /// Self-attention of `x`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.attend(x, x, x, &MhaMasks::default())
    }
    fn own_parameters(&self) -> Vec<(String, Tensor)> {
        let mut v = vec![("in_proj_weight".to_string(), self.in_proj_weight.clone())];
        if let Some(b) = &self.in_proj_bias {
            v.push(("in_proj_bias".to_string(), b.clone()));
        }
        v
    }
    fn children(&self) -> Vec<(String, &dyn crate::module::Module)> {
        vec![("out_proj".to_string(), &self.out_proj)]
    }
    fn set_training(&self, training: bool) {
        self.training
            .store(training, std::sync::atomic::Ordering::Relaxed);
    }
    fn describe(&self) -> String {
        format!(
            "MultiheadAttention(embed_dim={}, num_heads={})",
            self.in_proj_weight.dims()[1],
            self.num_heads
        )
    }
}
