//! Views (reshape, transpose, permute, narrow, slice, expand, squeeze), copies (contiguous,
//! to_dtype) and joins (cat, stack, split, chunk, flip, roll, pad).

use super::any_dispatch;
use crate::dtype::{DType, Element};
use crate::kernels::elementwise::{unary, Cost};
use crate::kernels::strided::Runs;
use crate::layout::Layout;
use crate::shape::{infer_reshape, normalize_dim, normalize_dims};
use crate::storage::CpuStorage;
use crate::{Error, Result, Tensor};

/// Write `src` (shape of `view`) into `out` at the positions of `view`, a layout over
/// `out`'s storage.
fn embed_into(out: &mut CpuStorage, view: &Layout, src: &Tensor) -> Result<()> {
    if out.dtype() != src.dtype() {
        return Err(Error::DTypeMismatch {
            op: "embed",
            lhs: out.dtype(),
            rhs: src.dtype(),
        });
    }
    let runs = Runs::new(
        view.dims(),
        [
            (view.strides(), view.offset()),
            (src.strides(), src.layout().offset()),
        ],
    );
    let [sd, ss] = runs.inner_strides();
    any_dispatch!(out.dtype(), T => {
        let o = T::slice_mut(out).expect("dtype checked");
        src.read::<T, _>(|s, _| {
            runs.for_each(0, runs.numel(), |_, len, [od, os]| {
                if sd == 1 && ss == 1 {
                    o[od..od + len].copy_from_slice(&s[os..os + len]);
                } else {
                    for i in 0..len {
                        o[od + i * sd] = s[os + i * ss];
                    }
                }
            })
        });
    });
    Ok(())
}

/// A fresh contiguous `dims` tensor filled with `value`, with `src` written at `view`.
fn embed(dims: &[usize], value: f64, view: &Layout, src: &Tensor) -> Result<Tensor> {
    let mut data = CpuStorage::full(dims.iter().product(), value, src.dtype());
    embed_into(&mut data, view, src)?;
    Ok(Tensor::from_storage(data, dims))
}

impl Tensor {
    /// Reshape to `dims` (no `-1`), as a view when the strides allow it, else a copy.
    pub(crate) fn reshape_usize(&self, dims: &[usize]) -> Result<Tensor> {
        if dims.iter().product::<usize>() != self.numel() {
            return Err(Error::bad_shape(
                "reshape",
                self.dims(),
                format!("cannot reshape to {dims:?}"),
            ));
        }
        if dims == self.dims() {
            return Ok(self.clone());
        }
        let src = match self.layout().view(dims) {
            Some(_) => self.clone(),
            None => self.contiguous()?,
        };
        let layout = src
            .layout()
            .view(dims)
            .expect("contiguous views always exist");
        let in_dims = self.dims().to_vec();
        Ok(src.view_with_grad(layout, "reshape", move |g| {
            Ok(vec![Some(g.reshape_usize(&in_dims)?)])
        }))
    }

    /// Reshape (one dimension may be `-1`): a view when possible, else a copy.
    pub fn reshape(&self, dims: &[isize]) -> Result<Tensor> {
        let dims = infer_reshape("reshape", self.dims(), dims)?;
        self.reshape_usize(&dims)
    }

    /// Like `reshape` but never copies: errors when the strides do not allow a view.
    pub fn view(&self, dims: &[isize]) -> Result<Tensor> {
        let dims = infer_reshape("view", self.dims(), dims)?;
        if self.layout().view(&dims).is_none() {
            return Err(Error::bad_shape(
                "view",
                self.dims(),
                "view size is not compatible with the input's strides; use reshape",
            ));
        }
        self.reshape_usize(&dims)
    }

    /// Merge dims `start..=end` into one.
    pub fn flatten(&self, start: isize, end: isize) -> Result<Tensor> {
        if self.rank() == 0 {
            return self.reshape_usize(&[1]);
        }
        let s = normalize_dim("flatten", start, self.rank())?;
        let e = normalize_dim("flatten", end, self.rank())?;
        if s > e {
            return Err(Error::invalid("flatten", "start dim after end dim"));
        }
        let d = self.dims();
        let mut dims = d[..s].to_vec();
        dims.push(d[s..=e].iter().product());
        dims.extend_from_slice(&d[e + 1..]);
        self.reshape_usize(&dims)
    }

    pub(crate) fn transpose_usize(&self, d0: usize, d1: usize) -> Tensor {
        if d0 == d1 {
            return self.clone();
        }
        self.view_with_grad(self.layout().transpose(d0, d1), "transpose", move |g| {
            Ok(vec![Some(g.transpose_usize(d0, d1))])
        })
    }

    /// Swap two dimensions (a view).
    pub fn transpose(&self, d0: isize, d1: isize) -> Result<Tensor> {
        let a = normalize_dim("transpose", d0, self.rank())?;
        let b = normalize_dim("transpose", d1, self.rank())?;
        Ok(self.transpose_usize(a, b))
    }

    /// Transpose a matrix (rank ≤ 2), like `x.t()`.
    pub fn t(&self) -> Result<Tensor> {
        match self.rank() {
            0 | 1 => Ok(self.clone()),
            2 => Ok(self.transpose_usize(0, 1)),
            _ => Err(Error::bad_shape(
                "t",
                self.dims(),
                "expects a tensor of rank <= 2",
            )),
        }
    }

    pub(crate) fn permute_usize(&self, perm: &[usize]) -> Result<Tensor> {
        let mut seen = vec![false; self.rank()];
        if perm.len() != self.rank()
            || perm
                .iter()
                .any(|&p| p >= self.rank() || std::mem::replace(&mut seen[p], true))
        {
            return Err(Error::invalid(
                "permute",
                format!("{perm:?} is not a permutation of the {} dims", self.rank()),
            ));
        }
        let mut inverse = vec![0; perm.len()];
        for (i, &p) in perm.iter().enumerate() {
            inverse[p] = i;
        }
        Ok(
            self.view_with_grad(self.layout().permute(perm), "permute", move |g| {
                Ok(vec![Some(g.permute_usize(&inverse)?)])
            }),
        )
    }

    /// Reorder the dimensions (a view).
    pub fn permute(&self, dims: &[isize]) -> Result<Tensor> {
        let perm = dims
            .iter()
            .map(|&d| normalize_dim("permute", d, self.rank()))
            .collect::<Result<Vec<_>>>()?;
        self.permute_usize(&perm)
    }

    /// `len` elements of `dim` starting at `start` (a view).
    pub fn narrow(&self, dim: isize, start: usize, len: usize) -> Result<Tensor> {
        self.slice(dim, start, start + len, 1)
    }

    /// Elements `start..end` of `dim` taking every `step`-th (like `x[:, start:end:step]`;
    /// a view).
    pub fn slice(&self, dim: isize, start: usize, end: usize, step: usize) -> Result<Tensor> {
        const OP: &str = "slice";
        let d = normalize_dim(OP, dim, self.rank())?;
        let size = self.dims()[d];
        if start > end || end > size || step == 0 {
            return Err(Error::bad_shape(
                OP,
                self.dims(),
                format!("range {start}..{end} step {step} invalid for dim {d} of size {size}"),
            ));
        }
        let mut layout = self.layout().narrow(d, start, end - start);
        if step > 1 {
            layout = layout.step(d, step);
        }
        if layout == *self.layout() {
            return Ok(self.clone());
        }
        let in_dims = self.dims().to_vec();
        let rel = Layout::contiguous(&in_dims)
            .narrow(d, start, end - start)
            .step(d, step);
        Ok(self.view_with_grad(layout, OP, move |g| {
            Ok(vec![Some(embed(&in_dims, 0.0, &rel, g)?)])
        }))
    }

    /// Index `index` of `dim`, removing that dimension (like `x[:, i]`; a view).
    pub fn select(&self, dim: isize, index: usize) -> Result<Tensor> {
        let d = normalize_dim("select", dim, self.rank())?;
        self.narrow(d as isize, index, 1)?.squeeze(d as isize)
    }

    /// Broadcast to `dims` with zero strides (a view; like `expand`).
    pub fn broadcast_to(&self, dims: &[usize]) -> Result<Tensor> {
        if dims == self.dims() {
            return Ok(self.clone());
        }
        let layout = self.layout().broadcast_as("broadcast_to", dims)?;
        let in_dims = self.dims().to_vec();
        Ok(self.view_with_grad(layout, "expand", move |g| {
            Ok(vec![Some(g.sum_to(&in_dims)?)])
        }))
    }

    /// PyTorch's `expand`: like `broadcast_to`, `-1` keeps a dimension's size.
    pub fn expand(&self, dims: &[isize]) -> Result<Tensor> {
        let extra = dims.len().saturating_sub(self.rank());
        let target: Vec<usize> = dims
            .iter()
            .enumerate()
            .map(|(i, &d)| {
                if d == -1 && i >= extra {
                    self.dims()[i - extra]
                } else {
                    d.max(0) as usize
                }
            })
            .collect();
        self.broadcast_to(&target)
    }

    /// Remove dimension `dim` if its size is 1 (otherwise unchanged, like PyTorch).
    pub fn squeeze(&self, dim: isize) -> Result<Tensor> {
        if self.rank() == 0 {
            return Ok(self.clone());
        }
        let d = normalize_dim("squeeze", dim, self.rank())?;
        if self.dims()[d] != 1 {
            return Ok(self.clone());
        }
        let in_dims = self.dims().to_vec();
        Ok(
            self.view_with_grad(self.layout().squeeze(d), "squeeze", move |g| {
                Ok(vec![Some(g.reshape_usize(&in_dims)?)])
            }),
        )
    }

    /// Remove every size-1 dimension.
    pub fn squeeze_all(&self) -> Result<Tensor> {
        let dims: Vec<usize> = self.dims().iter().copied().filter(|&d| d != 1).collect();
        self.reshape_usize(&dims)
    }

    /// Insert a size-1 dimension at `dim` (`-1` appends).
    pub fn unsqueeze(&self, dim: isize) -> Result<Tensor> {
        let d = normalize_dim("unsqueeze", dim, self.rank() + 1)?;
        let in_dims = self.dims().to_vec();
        Ok(
            self.view_with_grad(self.layout().unsqueeze(d), "unsqueeze", move |g| {
                Ok(vec![Some(g.reshape_usize(&in_dims)?)])
            }),
        )
    }

    /// A contiguous tensor with the same values (this tensor itself when already contiguous).
    pub fn contiguous(&self) -> Result<Tensor> {
        if self.is_contiguous() {
            return Ok(self.clone());
        }
        let data = any_dispatch!(self.dtype(), T => T::into_storage(
            self.read::<T, _>(|s, l| unary(s, l, Cost::Cheap, #[inline(always)] |x: T| x))
        ));
        Ok(Tensor::from_storage(data, self.dims())
            .with_grad("contiguous", &[self], |g| Ok(vec![Some(g.clone())])))
    }

    /// A copy with its own contiguous storage (PyTorch's `clone()`; Rust's `clone()` of a
    /// `Tensor` shares the data). Differentiable.
    pub fn copy(&self) -> Result<Tensor> {
        let data = any_dispatch!(self.dtype(), T => T::into_storage(
            self.read::<T, _>(|s, l| match l.contiguous_range() {
                Some(r) => s[r].to_vec(),
                None => unary(s, l, Cost::Cheap, #[inline(always)] |x: T| x),
            })
        ));
        Ok(Tensor::from_storage(data, self.dims())
            .with_grad("copy", &[self], |g| Ok(vec![Some(g.clone())])))
    }

    /// Whether this tensor is contiguous, covers its whole storage and no other tensor
    /// object shares that storage.
    pub(crate) fn owns_storage_alone(&self) -> bool {
        self.is_contiguous()
            && self.0.layout.offset() == 0
            && std::sync::Arc::strong_count(&self.0.storage) == 1
            && self.0.storage.read().len() == self.numel()
    }

    /// Convert to another dtype (differentiable between float types).
    pub fn to_dtype(&self, dtype: DType) -> Result<Tensor> {
        if dtype == self.dtype() {
            return Ok(self.clone());
        }
        fn conv<S: Element, D: Element>(t: &Tensor) -> Vec<D> {
            t.read::<S, _>(|s, l| {
                unary(
                    s,
                    l,
                    Cost::Cheap,
                    #[inline(always)]
                    |x: S| D::from_f64(x.to_f64()),
                )
            })
        }
        let data = any_dispatch!(self.dtype(), S => any_dispatch!(dtype, D => D::into_storage(conv::<S, D>(self))));
        let out = Tensor::from_storage(data, self.dims());
        if !(dtype.is_float() && self.dtype().is_float()) {
            return Ok(out);
        }
        let src = self.dtype();
        Ok(out.with_grad("to_dtype", &[self], move |g| {
            Ok(vec![Some(g.to_dtype(src)?)])
        }))
    }

    /// Concatenate along `dim`; all other dims must agree.
    pub fn cat(tensors: &[&Tensor], dim: isize) -> Result<Tensor> {
        const OP: &str = "cat";
        let first = tensors
            .first()
            .ok_or_else(|| Error::invalid(OP, "expected a non-empty list of tensors"))?;
        let d = normalize_dim(OP, dim, first.rank())?;
        let mut dims = first.dims().to_vec();
        dims[d] = 0;
        for t in tensors {
            first.check_same_dtype(t, OP)?;
            if t.rank() != first.rank()
                || t.dims()
                    .iter()
                    .enumerate()
                    .any(|(i, &s)| i != d && s != first.dims()[i])
            {
                return Err(Error::shape_mismatch(OP, first.dims(), t.dims()));
            }
            dims[d] += t.dims()[d];
        }
        let mut data = CpuStorage::full(dims.iter().product(), 0.0, first.dtype());
        let base = Layout::contiguous(&dims);
        let mut at = 0;
        let mut sizes = Vec::with_capacity(tensors.len());
        for t in tensors {
            let n = t.dims()[d];
            embed_into(&mut data, &base.narrow(d, at, n), t)?;
            sizes.push(n);
            at += n;
        }
        let out = Tensor::from_storage(data, &dims);
        Ok(out.with_grad(OP, tensors, move |g| {
            let mut at = 0;
            sizes
                .iter()
                .map(|&n| {
                    let part = g.narrow(d as isize, at, n)?;
                    at += n;
                    Ok(Some(part))
                })
                .collect()
        }))
    }

    /// Stack along a new dimension `dim`; all shapes must agree.
    pub fn stack(tensors: &[&Tensor], dim: isize) -> Result<Tensor> {
        let first = tensors
            .first()
            .ok_or_else(|| Error::invalid("stack", "expected a non-empty list of tensors"))?;
        let d = normalize_dim("stack", dim, first.rank() + 1)? as isize;
        let parts = tensors
            .iter()
            .map(|t| {
                if t.dims() != first.dims() {
                    return Err(Error::shape_mismatch("stack", first.dims(), t.dims()));
                }
                t.unsqueeze(d)
            })
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&parts.iter().collect::<Vec<_>>(), d)
    }

    /// Split into pieces of `size` along `dim` (the last may be smaller); views.
    pub fn split(&self, size: usize, dim: isize) -> Result<Vec<Tensor>> {
        let d = normalize_dim("split", dim, self.rank())?;
        if size == 0 {
            return Err(Error::invalid("split", "split size must be positive"));
        }
        let n = self.dims()[d];
        (0..n.div_ceil(size))
            .map(|i| self.narrow(d as isize, i * size, size.min(n - i * size)))
            .collect()
    }

    /// Split into `chunks` nearly equal pieces along `dim` (like `torch.chunk`); views.
    pub fn chunk(&self, chunks: usize, dim: isize) -> Result<Vec<Tensor>> {
        let d = normalize_dim("chunk", dim, self.rank())?;
        if chunks == 0 {
            return Err(Error::invalid("chunk", "number of chunks must be positive"));
        }
        self.split(self.dims()[d].div_ceil(chunks).max(1), dim)
    }

    /// Reverse the order of elements along `dims` (a copy).
    pub fn flip(&self, dims: &[isize]) -> Result<Tensor> {
        let ds = normalize_dims("flip", dims, self.rank())?;
        let l = self.layout();
        let mut offset = l.offset() as isize;
        let mut strides: Vec<isize> = l.strides().iter().map(|&s| s as isize).collect();
        for &d in &ds {
            if l.dims()[d] > 0 {
                offset += (l.dims()[d] as isize - 1) * strides[d];
            }
            strides[d] = -strides[d];
        }
        let dims_v = l.dims().to_vec();
        let data = any_dispatch!(self.dtype(), T => T::into_storage(self.read::<T, _>(|s, _| {
            let n = l.numel();
            let mut out = Vec::with_capacity(n);
            let mut idx = vec![0usize; dims_v.len()];
            let mut off = offset;
            for _ in 0..n {
                out.push(s[off as usize]);
                for k in (0..dims_v.len()).rev() {
                    idx[k] += 1;
                    off += strides[k];
                    if idx[k] < dims_v[k] {
                        break;
                    }
                    off -= strides[k] * dims_v[k] as isize;
                    idx[k] = 0;
                }
            }
            out
        })));
        let out = Tensor::from_storage(data, self.dims());
        let dims = dims.to_vec();
        Ok(out.with_grad("flip", &[self], move |g| Ok(vec![Some(g.flip(&dims)?)])))
    }

    /// Rotate elements along `dims` by `shifts` (like `torch.roll` with dims given).
    pub fn roll(&self, shifts: &[isize], dims: &[isize]) -> Result<Tensor> {
        if shifts.len() != dims.len() {
            return Err(Error::invalid(
                "roll",
                "shifts and dims must have the same length",
            ));
        }
        let mut out = self.clone();
        for (&s, &dim) in shifts.iter().zip(dims) {
            let d = normalize_dim("roll", dim, self.rank())?;
            let n = self.dims()[d] as isize;
            if n == 0 {
                continue;
            }
            let s = s.rem_euclid(n) as usize;
            if s == 0 {
                continue;
            }
            let n = n as usize;
            let tail = out.narrow(d as isize, n - s, s)?;
            let head = out.narrow(d as isize, 0, n - s)?;
            out = Tensor::cat(&[&tail, &head], d as isize)?;
        }
        Ok(out)
    }

    /// Constant padding, PyTorch's `F.pad` order: `pads` holds (before, after) pairs starting
    /// from the LAST dimension.
    pub fn pad(&self, pads: &[(usize, usize)], value: f64) -> Result<Tensor> {
        if pads.len() > self.rank() {
            return Err(Error::bad_shape(
                "pad",
                self.dims(),
                format!(
                    "{} padding pairs for a tensor of rank {}",
                    pads.len(),
                    self.rank()
                ),
            ));
        }
        let rank = self.rank();
        let mut dims = self.dims().to_vec();
        let mut region = Vec::new();
        for (i, &(b, a)) in pads.iter().enumerate() {
            let d = rank - 1 - i;
            dims[d] += b + a;
            region.push((d, b, self.dims()[d]));
        }
        let mut view = Layout::contiguous(&dims);
        for &(d, b, n) in &region {
            view = view.narrow(d, b, n);
        }
        let out = embed(&dims, value, &view, self)?;
        Ok(out.with_grad("pad", &[self], move |g| {
            let mut gi = g.clone();
            for &(d, b, n) in &region {
                gi = gi.narrow(d as isize, b, n)?;
            }
            Ok(vec![Some(gi)])
        }))
    }
}
