//! Walking N strided operands together in row-major order, in runs along the innermost
//! dimension, after merging dimensions that are contiguous in every operand.
#![allow(clippy::needless_range_loop)] // operand-indexed loops over fixed-size arrays

/// The collapsed iteration space of N operands over one shape.
#[derive(Clone, Debug)]
pub struct Runs<const N: usize> {
    dims: Vec<usize>,
    strides: [Vec<usize>; N],
    offsets: [usize; N],
    numel: usize,
}

impl<const N: usize> Runs<N> {
    /// Operands are given as (strides, offset) over the common `shape`.
    pub fn new(shape: &[usize], ops: [(&[usize], usize); N]) -> Self {
        let numel = shape.iter().product();
        let mut dims: Vec<usize> = Vec::with_capacity(shape.len());
        let mut strides: [Vec<usize>; N] = std::array::from_fn(|_| Vec::new());
        // Walk from the innermost dimension outwards, merging when possible.
        for d in (0..shape.len()).rev() {
            if shape[d] == 1 {
                continue;
            }
            let mergeable = !dims.is_empty()
                && (0..N).all(|k| {
                    let last = strides[k].len() - 1;
                    ops[k].0[d] == strides[k][last] * dims[dims.len() - 1]
                });
            if mergeable {
                let last = dims.len() - 1;
                dims[last] *= shape[d];
            } else {
                dims.push(shape[d]);
                for k in 0..N {
                    strides[k].push(ops[k].0[d]);
                }
            }
        }
        if dims.is_empty() {
            dims.push(1);
            for s in strides.iter_mut() {
                s.push(1);
            }
        }
        dims.reverse();
        for s in strides.iter_mut() {
            s.reverse();
        }
        Runs {
            dims,
            strides,
            offsets: std::array::from_fn(|k| ops[k].1),
            numel,
        }
    }

    /// Total number of elements.
    pub fn numel(&self) -> usize {
        self.numel
    }

    /// Length of the innermost (merged) dimension: the longest run.
    pub fn inner_len(&self) -> usize {
        self.dims[self.dims.len() - 1]
    }

    /// Strides of the innermost dimension, per operand.
    pub fn inner_strides(&self) -> [usize; N] {
        std::array::from_fn(|k| self.strides[k][self.dims.len() - 1])
    }

    /// Call `f(pos, len, offsets)` for each run covering the linear positions `start..end`:
    /// elements `pos..pos+len` are at `offsets[k] + i * inner_strides[k]` in operand k.
    #[inline(always)]
    pub fn for_each(&self, start: usize, end: usize, mut f: impl FnMut(usize, usize, [usize; N])) {
        if start >= end {
            return;
        }
        let r = self.dims.len();
        let inner = self.dims[r - 1];
        let inner_strides = self.inner_strides();
        // Multi-index of the outer dims for `start`.
        let mut outer = start / inner;
        let mut inner_pos = start % inner;
        let mut idx = vec![0usize; r - 1];
        let mut offs = self.offsets;
        for d in (0..r - 1).rev() {
            idx[d] = outer % self.dims[d];
            outer /= self.dims[d];
            for k in 0..N {
                offs[k] += idx[d] * self.strides[k][d];
            }
        }
        let mut pos = start;
        while pos < end {
            let len = (inner - inner_pos).min(end - pos);
            let o: [usize; N] = std::array::from_fn(|k| offs[k] + inner_pos * inner_strides[k]);
            f(pos, len, o);
            pos += len;
            inner_pos = 0;
            // Advance the outer multi-index.
            for d in (0..r - 1).rev() {
                idx[d] += 1;
                if idx[d] < self.dims[d] {
                    for k in 0..N {
                        offs[k] += self.strides[k][d];
                    }
                    break;
                }
                for k in 0..N {
                    offs[k] -= (self.dims[d] - 1) * self.strides[k][d];
                }
                idx[d] = 0;
            }
        }
    }
}
