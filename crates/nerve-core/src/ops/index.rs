//! Indexing: index_select, gather, scatter_add, embedding lookup, one_hot.

use super::{any_dispatch, float_dispatch};
use crate::dtype::{DType, Element};
use crate::shape::normalize_dim;
use crate::{Error, Result, Tensor};

/// Check an i64 index tensor and read it as usize values below `size`.
fn read_indices(op: &'static str, index: &Tensor, size: usize) -> Result<Vec<usize>> {
    if index.dtype() != DType::I64 {
        return Err(Error::DTypeMismatch {
            op,
            lhs: index.dtype(),
            rhs: DType::I64,
        });
    }
    index
        .to_vec::<i64>()?
        .into_iter()
        .map(|i| {
            if i < 0 || i as usize >= size {
                Err(Error::IndexOutOfRange { op, index: i, size })
            } else {
                Ok(i as usize)
            }
        })
        .collect()
}

/// (outer, size, inner) of a contiguous tensor around `dim`.
fn split_at(dims: &[usize], d: usize) -> (usize, usize, usize) {
    (
        dims[..d].iter().product(),
        dims[d],
        dims[d + 1..].iter().product(),
    )
}

/// For gather/scatter: the storage offset in a contiguous tensor of `dims` of the element at
/// the multi-index of `pos` in `idx_dims`, with dimension `d` replaced by `i`.
struct GatherMap {
    idx_dims: Vec<usize>,
    strides: Vec<usize>,
    d: usize,
}

impl GatherMap {
    fn new(idx_dims: &[usize], dims: &[usize], d: usize) -> Self {
        GatherMap {
            idx_dims: idx_dims.to_vec(),
            strides: crate::shape::contiguous_strides(dims),
            d,
        }
    }
    /// Offsets for every index position in row-major order, given the index values.
    fn offsets<'a>(&'a self, values: &'a [usize]) -> impl Iterator<Item = usize> + 'a {
        let r = self.idx_dims.len();
        let mut idx = vec![0usize; r];
        values.iter().map(move |&v| {
            let mut off = 0;
            #[allow(clippy::needless_range_loop)]
            for k in 0..r {
                off += if k == self.d { v } else { idx[k] } * self.strides[k];
            }
            for k in (0..r).rev() {
                idx[k] += 1;
                if idx[k] < self.idx_dims[k] {
                    break;
                }
                idx[k] = 0;
            }
            off
        })
    }
}

impl Tensor {
    /// Pick entries `index` (1-D i64) along `dim`.
    pub fn index_select(&self, dim: isize, index: &Tensor) -> Result<Tensor> {
        const OP: &str = "index_select";
        let d = normalize_dim(OP, dim, self.rank())?;
        if index.rank() > 1 {
            return Err(Error::bad_shape(OP, index.dims(), "index must be 1-D"));
        }
        let idx = read_indices(OP, index, self.dims()[d])?;
        let src = crate::autograd::no_grad(|| self.contiguous())?;
        let (outer, size, inner) = split_at(src.dims(), d);
        let mut out_dims = self.dims().to_vec();
        out_dims[d] = idx.len();
        let data = any_dispatch!(self.dtype(), T => {
            let v = src.read::<T, _>(|s, l| {
                let s = &s[l.contiguous_range().expect("contiguous")];
                let mut out = Vec::with_capacity(outer * idx.len() * inner);
                for o in 0..outer {
                    for &i in &idx {
                        let at = (o * size + i) * inner;
                        out.extend_from_slice(&s[at..at + inner]);
                    }
                }
                out
            });
            T::into_storage(v)
        });
        let out = Tensor::from_storage(data, &out_dims);
        let in_dims = self.dims().to_vec();
        Ok(out.with_grad(OP, &[self], move |g| {
            Ok(vec![Some(
                Tensor::zeros_with(in_dims.as_slice(), g.dtype()).index_add(d, &idx, g)?,
            )])
        }))
    }

    /// `self` with `src` rows added at `idx` along `d` (no autodiff; backward of index_select).
    fn index_add(&self, d: usize, idx: &[usize], src: &Tensor) -> Result<Tensor> {
        let base = self.contiguous()?;
        let src = src.contiguous()?;
        let (outer, size, inner) = split_at(base.dims(), d);
        float_dispatch!("index_add", self.dtype(), T => {
            let mut out = base.to_vec::<T>()?;
            src.read::<T, _>(|s, l| {
                let s = &s[l.contiguous_range().expect("contiguous")];
                for o in 0..outer {
                    for (j, &i) in idx.iter().enumerate() {
                        let dst = (o * size + i) * inner;
                        let from = (o * idx.len() + j) * inner;
                        for (a, &b) in out[dst..dst + inner].iter_mut().zip(&s[from..from + inner]) {
                            *a += b;
                        }
                    }
                }
            });
            Ok(Tensor::from_buf(out, base.dims()))
        })
    }

    fn check_gather_shapes(&self, op: &'static str, d: usize, index: &Tensor) -> Result<()> {
        if index.rank() != self.rank()
            || index
                .dims()
                .iter()
                .zip(self.dims())
                .enumerate()
                .any(|(k, (&i, &s))| k != d && i > s)
        {
            return Err(Error::shape_mismatch(op, self.dims(), index.dims()));
        }
        Ok(())
    }

    /// `out[i][j] = self[index[i][j]][j]` for dim 0 (and likewise for other dims).
    pub fn gather(&self, dim: isize, index: &Tensor) -> Result<Tensor> {
        const OP: &str = "gather";
        let d = normalize_dim(OP, dim, self.rank())?;
        self.check_gather_shapes(OP, d, index)?;
        let idx = read_indices(OP, index, self.dims()[d])?;
        let src = crate::autograd::no_grad(|| self.contiguous())?;
        let map = GatherMap::new(index.dims(), src.dims(), d);
        let data = any_dispatch!(self.dtype(), T => {
            let v: Vec<T> = src.read::<T, _>(|s, l| {
                let s = &s[l.contiguous_range().expect("contiguous")];
                map.offsets(&idx).map(|o| s[o]).collect()
            });
            T::into_storage(v)
        });
        let out = Tensor::from_storage(data, index.dims());
        let in_dims = self.dims().to_vec();
        let index = index.clone();
        Ok(out.with_grad(OP, &[self], move |g| {
            let z = Tensor::zeros_with(in_dims.as_slice(), g.dtype());
            Ok(vec![Some(z.scatter_add(d as isize, &index, g)?)])
        }))
    }

    /// `self` plus `src` added at `index` along `dim`: for dim 0,
    /// `out[index[i][j]][j] += src[i][j]`.
    pub fn scatter_add(&self, dim: isize, index: &Tensor, src: &Tensor) -> Result<Tensor> {
        const OP: &str = "scatter_add";
        let d = normalize_dim(OP, dim, self.rank())?;
        self.check_gather_shapes(OP, d, index)?;
        self.check_same_dtype(src, OP)?;
        if src.rank() != index.rank() || index.dims().iter().zip(src.dims()).any(|(i, s)| i > s) {
            return Err(Error::shape_mismatch(OP, index.dims(), src.dims()));
        }
        let idx = read_indices(OP, index, self.dims()[d])?;
        let base = crate::autograd::no_grad(|| self.contiguous())?;
        // Only the part of src that index covers takes part.
        let mut part = src.clone();
        for (k, &n) in index.dims().iter().enumerate() {
            if src.dims()[k] != n {
                part = crate::autograd::no_grad(|| part.narrow(k as isize, 0, n))?;
            }
        }
        let part = crate::autograd::no_grad(|| part.contiguous())?;
        let map = GatherMap::new(index.dims(), base.dims(), d);
        let out = float_dispatch!(OP, self.dtype(), T => {
            let mut out = base.to_vec::<T>()?;
            part.read::<T, _>(|s, l| {
                let s = &s[l.contiguous_range().expect("contiguous")];
                for (o, &v) in map.offsets(&idx).zip(s) {
                    out[o] += v;
                }
            });
            Tensor::from_buf(out, base.dims())
        });
        let index = index.clone();
        let src_dims = src.dims().to_vec();
        Ok(out.with_grad(OP, &[self, src], move |g| {
            let gs = g.gather(d as isize, &index)?;
            let gs = if gs.dims() == src_dims.as_slice() {
                gs
            } else {
                let pads: Vec<(usize, usize)> = src_dims
                    .iter()
                    .zip(gs.dims())
                    .rev()
                    .map(|(&s, &n)| (0, s - n))
                    .collect();
                gs.pad(&pads, 0.0)?
            };
            Ok(vec![Some(g.clone()), Some(gs)])
        }))
    }

    /// Embedding lookup: rows of this `[num_embeddings, dim]` weight picked by i64 `indices`
    /// of any shape, giving `indices.shape + [dim]` (like `F.embedding(indices, weight)`).
    pub fn embedding(&self, indices: &Tensor) -> Result<Tensor> {
        if self.rank() != 2 {
            return Err(Error::bad_shape(
                "embedding",
                self.dims(),
                "weight must be 2-D",
            ));
        }
        let flat = indices.reshape_usize(&[indices.numel()])?;
        let rows = self.index_select(0, &flat)?;
        let mut dims = indices.dims().to_vec();
        dims.push(self.dims()[1]);
        rows.reshape_usize(&dims)
    }

    /// One-hot encoding of an i64 tensor: shape + `[num_classes]`, i64 (like `F.one_hot`).
    pub fn one_hot(&self, num_classes: usize) -> Result<Tensor> {
        let idx = read_indices("one_hot", self, num_classes)?;
        let mut v = vec![0i64; idx.len() * num_classes];
        for (r, &i) in idx.iter().enumerate() {
            v[r * num_classes + i] = 1;
        }
        let mut dims = self.dims().to_vec();
        dims.push(num_classes);
        Ok(Tensor::from_buf(v, &dims))
    }
}
