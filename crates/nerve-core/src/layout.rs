//! Layout: shape, strides (in elements) and offset of a view into a storage.

use crate::shape::contiguous_strides;
use crate::{Error, Result};

/// How a tensor's elements sit in its storage.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    shape: Vec<usize>,
    strides: Vec<usize>,
    offset: usize,
}

impl Layout {
    /// A row-major layout starting at offset 0.
    pub fn contiguous(shape: &[usize]) -> Self {
        Layout {
            strides: contiguous_strides(shape),
            shape: shape.to_vec(),
            offset: 0,
        }
    }
    /// A layout from its parts.
    pub fn new(shape: Vec<usize>, strides: Vec<usize>, offset: usize) -> Self {
        debug_assert_eq!(shape.len(), strides.len());
        Layout {
            shape,
            strides,
            offset,
        }
    }
    /// Dimension sizes.
    pub fn dims(&self) -> &[usize] {
        &self.shape
    }
    /// Strides in elements.
    pub fn strides(&self) -> &[usize] {
        &self.strides
    }
    /// Offset of the first element in the storage.
    pub fn offset(&self) -> usize {
        self.offset
    }
    /// Rank.
    pub fn rank(&self) -> usize {
        self.shape.len()
    }
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
    /// Whether the elements are in row-major order without gaps (size-1 dims ignored).
    pub fn is_contiguous(&self) -> bool {
        let mut expected = 1;
        for (&d, &s) in self.shape.iter().zip(&self.strides).rev() {
            if d != 1 {
                if s != expected {
                    return false;
                }
                expected *= d;
            }
        }
        true
    }
    /// The range of storage indices covered when contiguous.
    pub fn contiguous_range(&self) -> Option<std::ops::Range<usize>> {
        self.is_contiguous()
            .then(|| self.offset..self.offset + self.numel())
    }
    /// Swap two dimensions.
    pub fn transpose(&self, d0: usize, d1: usize) -> Layout {
        let mut l = self.clone();
        l.shape.swap(d0, d1);
        l.strides.swap(d0, d1);
        l
    }
    /// Reorder dimensions; `perm` must be a permutation of 0..rank (checked by the caller).
    pub fn permute(&self, perm: &[usize]) -> Layout {
        Layout {
            shape: perm.iter().map(|&p| self.shape[p]).collect(),
            strides: perm.iter().map(|&p| self.strides[p]).collect(),
            offset: self.offset,
        }
    }
    /// Keep `len` elements of `dim` starting at `start` (checked by the caller).
    pub fn narrow(&self, dim: usize, start: usize, len: usize) -> Layout {
        let mut l = self.clone();
        if len > 0 {
            l.offset += start * self.strides[dim];
        }
        l.shape[dim] = len;
        l
    }
    /// Take every `step`-th element of `dim` (a strided slice).
    pub fn step(&self, dim: usize, step: usize) -> Layout {
        let mut l = self.clone();
        l.shape[dim] = self.shape[dim].div_ceil(step);
        l.strides[dim] *= step;
        l
    }
    /// Broadcast to `shape` with zero strides on the expanded dimensions.
    pub fn broadcast_as(&self, op: &'static str, shape: &[usize]) -> Result<Layout> {
        if shape.len() < self.rank() {
            return Err(Error::shape_mismatch(op, &self.shape, shape));
        }
        let extra = shape.len() - self.rank();
        let mut strides = vec![0; shape.len()];
        for i in 0..self.rank() {
            let (d, s) = (self.shape[i], self.strides[i]);
            if d == shape[i + extra] {
                strides[i + extra] = s;
            } else if d == 1 {
                strides[i + extra] = 0;
            } else {
                return Err(Error::shape_mismatch(op, &self.shape, shape));
            }
        }
        Ok(Layout {
            shape: shape.to_vec(),
            strides,
            offset: self.offset,
        })
    }
    /// Insert a size-1 dimension at `dim`.
    pub fn unsqueeze(&self, dim: usize) -> Layout {
        let mut l = self.clone();
        let stride = if dim < self.rank() {
            self.strides[dim] * self.shape[dim]
        } else {
            1
        };
        l.shape.insert(dim, 1);
        l.strides.insert(dim, stride);
        l
    }
    /// Remove dimension `dim` (must have size 1).
    pub fn squeeze(&self, dim: usize) -> Layout {
        let mut l = self.clone();
        l.shape.remove(dim);
        l.strides.remove(dim);
        l
    }
    /// A view with a new shape over the same elements, if the strides allow it without a copy
    /// (PyTorch's `view` rule: each group of merged/split dims must be contiguous within itself).
    pub fn view(&self, new_shape: &[usize]) -> Option<Layout> {
        if self.is_contiguous() {
            return Some(Layout {
                strides: contiguous_strides(new_shape),
                shape: new_shape.to_vec(),
                offset: self.offset,
            });
        }
        // Non-contiguous: match chunks of old dims to chunks of new dims with equal products.
        let old: Vec<(usize, usize)> = self
            .shape
            .iter()
            .zip(&self.strides)
            .filter(|(&d, _)| d != 1)
            .map(|(&d, &s)| (d, s))
            .collect();
        let mut new_strides = vec![0; new_shape.len()];
        let mut oi = 0;
        let mut ni = 0;
        while ni < new_shape.len() || oi < old.len() {
            // Size-1 new dims take any stride.
            if ni < new_shape.len() && new_shape[ni] == 1 {
                new_strides[ni] = 1;
                ni += 1;
                continue;
            }
            if oi >= old.len() || ni >= new_shape.len() {
                return None;
            }
            // Collect a chunk of old dims that is contiguous within itself.
            let (mut old_prod, mut new_prod) = (old[oi].0, new_shape[ni]);
            let chunk_start_o = oi;
            let chunk_start_n = ni;
            while old_prod != new_prod {
                if old_prod < new_prod {
                    oi += 1;
                    if oi >= old.len() || old[oi - 1].1 != old[oi].1 * old[oi].0 {
                        return None;
                    }
                    old_prod *= old[oi].0;
                } else {
                    ni += 1;
                    if ni >= new_shape.len() {
                        return None;
                    }
                    new_prod *= new_shape[ni];
                }
            }
            let _ = chunk_start_o;
            // Innermost stride of the chunk is the stride of its last old dim.
            let mut s = old[oi].1;
            for j in (chunk_start_n..=ni).rev() {
                new_strides[j] = s;
                s *= new_shape[j];
            }
            oi += 1;
            ni += 1;
        }
        Some(Layout {
            shape: new_shape.to_vec(),
            strides: new_strides,
            offset: self.offset,
        })
    }
    /// Storage offsets of every element in row-major order.
    pub fn offsets(&self) -> StridedOffsets {
        StridedOffsets::new(self)
    }
}

/// Iterator over the storage offsets of a layout in row-major order.
pub struct StridedOffsets {
    dims: Vec<usize>,
    strides: Vec<usize>,
    index: Vec<usize>,
    next: usize,
    remaining: usize,
}

impl StridedOffsets {
    fn new(l: &Layout) -> Self {
        StridedOffsets {
            dims: l.shape.clone(),
            strides: l.strides.clone(),
            index: vec![0; l.rank()],
            next: l.offset,
            remaining: l.numel(),
        }
    }
}

impl Iterator for StridedOffsets {
    type Item = usize;
    #[inline]
    fn next(&mut self) -> Option<usize> {
        if self.remaining == 0 {
            return None;
        }
        self.remaining -= 1;
        let cur = self.next;
        for d in (0..self.dims.len()).rev() {
            self.index[d] += 1;
            if self.index[d] < self.dims[d] {
                self.next += self.strides[d];
                break;
            }
            self.next -= (self.dims[d] - 1) * self.strides[d];
            self.index[d] = 0;
        }
        Some(cur)
    }
    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.remaining, Some(self.remaining))
    }
}

impl ExactSizeIterator for StridedOffsets {}
