//! Shapes, dimension arguments and broadcasting rules.

use crate::{Error, Result};

/// The dimensions of a tensor (runtime rank).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Default)]
pub struct Shape(pub Vec<usize>);

impl Shape {
    /// The sizes of each dimension.
    pub fn dims(&self) -> &[usize] {
        &self.0
    }
    /// Number of dimensions.
    pub fn rank(&self) -> usize {
        self.0.len()
    }
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.0.iter().product()
    }
}

impl From<&[usize]> for Shape {
    fn from(d: &[usize]) -> Self {
        Shape(d.to_vec())
    }
}
impl From<Vec<usize>> for Shape {
    fn from(d: Vec<usize>) -> Self {
        Shape(d)
    }
}
impl From<&Vec<usize>> for Shape {
    fn from(d: &Vec<usize>) -> Self {
        Shape(d.clone())
    }
}
impl<const N: usize> From<[usize; N]> for Shape {
    fn from(d: [usize; N]) -> Self {
        Shape(d.to_vec())
    }
}
impl<const N: usize> From<&[usize; N]> for Shape {
    fn from(d: &[usize; N]) -> Self {
        Shape(d.to_vec())
    }
}
impl From<()> for Shape {
    fn from(_: ()) -> Self {
        Shape(vec![])
    }
}
impl From<usize> for Shape {
    fn from(d: usize) -> Self {
        Shape(vec![d])
    }
}
impl From<&Shape> for Shape {
    fn from(s: &Shape) -> Self {
        s.clone()
    }
}

/// Resolve a possibly negative dimension index (PyTorch style: -1 is the last).
pub fn normalize_dim(op: &'static str, dim: isize, rank: usize) -> Result<usize> {
    let r = rank as isize;
    let d = if dim < 0 { dim + r } else { dim };
    if d < 0 || d >= r.max(1) || (rank == 0 && d != 0) {
        return Err(Error::DimOutOfRange { op, dim, rank });
    }
    Ok(d as usize)
}

/// Resolve a list of dimensions; duplicates are an error. The result is sorted.
pub fn normalize_dims(op: &'static str, dims: &[isize], rank: usize) -> Result<Vec<usize>> {
    let mut out = Vec::with_capacity(dims.len());
    for &d in dims {
        let d = normalize_dim(op, d, rank)?;
        if out.contains(&d) {
            return Err(Error::invalid(
                op,
                format!("dimension {d} repeated in {dims:?}"),
            ));
        }
        out.push(d);
    }
    out.sort_unstable();
    Ok(out)
}

/// The broadcast shape of two shapes (numpy/PyTorch rules), or a shape mismatch naming `op`.
pub fn broadcast_shapes(op: &'static str, a: &[usize], b: &[usize]) -> Result<Vec<usize>> {
    let rank = a.len().max(b.len());
    let mut out = vec![0; rank];
    for i in 0..rank {
        let da = if i + a.len() >= rank {
            a[i + a.len() - rank]
        } else {
            1
        };
        let db = if i + b.len() >= rank {
            b[i + b.len() - rank]
        } else {
            1
        };
        out[i] = if da == db || db == 1 {
            da
        } else if da == 1 {
            db
        } else {
            return Err(Error::shape_mismatch(op, a, b));
        };
    }
    Ok(out)
}

/// Row-major (C order) strides for `dims`.
pub fn contiguous_strides(dims: &[usize]) -> Vec<usize> {
    let mut strides = vec![0; dims.len()];
    let mut s = 1;
    for i in (0..dims.len()).rev() {
        strides[i] = s;
        s *= dims[i];
    }
    strides
}

/// Resolve a reshape target that may contain one `-1`.
pub fn infer_reshape(op: &'static str, from: &[usize], to: &[isize]) -> Result<Vec<usize>> {
    let numel: usize = from.iter().product();
    let mut unknown = None;
    let mut known = 1usize;
    let mut out = Vec::with_capacity(to.len());
    for (i, &d) in to.iter().enumerate() {
        if d == -1 {
            if unknown.is_some() {
                return Err(Error::invalid(op, "only one dimension can be -1"));
            }
            unknown = Some(i);
            out.push(0);
        } else if d < 0 {
            return Err(Error::invalid(op, format!("invalid size {d}")));
        } else {
            known *= d as usize;
            out.push(d as usize);
        }
    }
    if let Some(i) = unknown {
        if known == 0 || !numel.is_multiple_of(known) {
            return Err(Error::bad_shape(
                op,
                from,
                format!("cannot reshape to {to:?}"),
            ));
        }
        out[i] = numel / known;
    } else if known != numel {
        return Err(Error::bad_shape(
            op,
            from,
            format!("cannot reshape to {to:?}"),
        ));
    }
    Ok(out)
}
