//! Reductions over contiguous rows and columns, softmax rows.

use rayon::prelude::*;

use std::mem::MaybeUninit;

use super::{assume_init_mut, with_simd};
use crate::dtype::Float;
use crate::threading::{chunk_len, install, num_threads, par_elemwise_min};

const LANES: usize = 16;

/// Pairwise sum of the accumulator lanes.
#[inline(always)]
fn fold_lanes<T: Float>(mut acc: [T; LANES]) -> T {
    let mut w = LANES;
    while w > 1 {
        w /= 2;
        for i in 0..w {
            acc[i] += acc[i + w];
        }
    }
    acc[0]
}

/// Sum of a slice with 16 independent accumulators: vectorises, and its error grows far more
/// slowly than a serial sum's.
#[inline(always)]
pub fn sum<T: Float>(x: &[T]) -> T {
    let mut acc = [T::ZERO; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            acc[i] += c[i];
        }
    }
    let mut s = T::ZERO;
    for &r in rest {
        s += r;
    }
    fold_lanes(acc) + s
}

/// Dot product of two slices (same accumulation scheme as [`sum`]).
#[inline(always)]
pub fn dot<T: Float>(x: &[T], y: &[T]) -> T {
    let mut acc = [T::ZERO; LANES];
    let n = x.len().min(y.len());
    let (x, y) = (&x[..n], &y[..n]);
    let main = n - n % LANES;
    for (cx, cy) in x[..main]
        .chunks_exact(LANES)
        .zip(y[..main].chunks_exact(LANES))
    {
        for i in 0..LANES {
            acc[i] += cx[i] * cy[i];
        }
    }
    let mut s = T::ZERO;
    for i in main..n {
        s += x[i] * y[i];
    }
    fold_lanes(acc) + s
}

/// Sum of deviations from `m`, `Σ (x - m)`: a sum shifted near zero, for an accurate mean.
#[inline(always)]
pub fn dev_sum<T: Float>(x: &[T], m: T) -> T {
    let mut acc = [T::ZERO; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            acc[i] += c[i] - m;
        }
    }
    let mut s = T::ZERO;
    for &r in rest {
        s += r - m;
    }
    fold_lanes(acc) + s
}

/// Sum of squared deviations from `m`, `Σ (x - m)²` (the second pass of a two-pass variance:
/// no cancellation, unlike `Σx² - n m²`).
#[inline(always)]
pub fn sq_dev_sum<T: Float>(x: &[T], m: T) -> T {
    let mut acc = [T::ZERO; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            let d = c[i] - m;
            acc[i] += d * d;
        }
    }
    let mut s = T::ZERO;
    for &r in rest {
        let d = r - m;
        s += d * d;
    }
    fold_lanes(acc) + s
}

/// `(Σ g, Σ g (x - m))` in one pass over two slices of the same length: the per-channel sums
/// of a normalisation's backward pass.
#[inline(always)]
pub fn sum_dot_centered<T: Float>(g: &[T], x: &[T], m: T) -> (T, T) {
    let n = g.len().min(x.len());
    let (g, x) = (&g[..n], &x[..n]);
    let main = n - n % LANES;
    let (mut sg, mut sgx) = ([T::ZERO; LANES], [T::ZERO; LANES]);
    for (cg, cx) in g[..main]
        .chunks_exact(LANES)
        .zip(x[..main].chunks_exact(LANES))
    {
        for i in 0..LANES {
            sg[i] += cg[i];
            sgx[i] += cg[i] * (cx[i] - m);
        }
    }
    let (mut tg, mut tgx) = (T::ZERO, T::ZERO);
    for i in main..n {
        tg += g[i];
        tgx += g[i] * (x[i] - m);
    }
    (fold_lanes(sg) + tg, fold_lanes(sgx) + tgx)
}

/// Largest element (NaN propagates; -inf for an empty slice).
#[inline(always)]
pub fn max<T: Float>(x: &[T]) -> T {
    let mut acc = [T::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            acc[i] = acc[i].max(c[i]);
        }
    }
    let mut m = T::NEG_INFINITY;
    for &r in rest {
        m = m.max(r);
    }
    for a in acc {
        m = m.max(a);
    }
    m
}

/// Largest element for a softmax shift: `-inf` for an empty slice; with a NaN in `x` the
/// result is unspecified (a value of `x` or NaN), which a softmax does not mind: `e^(NaN − m)`
/// makes its row NaN either way. A plain `>` select per lane, which compiles to one vector
/// max instruction, where [`max`]'s NaN propagation costs three.
#[inline(always)]
pub fn max_shift<T: Float>(x: &[T]) -> T {
    let mut acc = [T::NEG_INFINITY; LANES];
    let chunks = x.chunks_exact(LANES);
    let rest = chunks.remainder();
    for c in chunks {
        for i in 0..LANES {
            acc[i] = if c[i] > acc[i] { c[i] } else { acc[i] };
        }
    }
    let mut m = T::NEG_INFINITY;
    for &r in rest.iter().chain(&acc) {
        m = if r > m { r } else { m };
    }
    m
}

/// Rows per parallel chunk of `rows` rows of `row_len` elements: as in the element-wise maps,
/// at most four chunks per thread of at least half the parallel threshold each, so that work
/// just above the threshold is split between two threads (chunks of the whole threshold left
/// 2^18-element tensors in one chunk, on one thread).
fn par_rows(rows: usize, row_len: usize) -> usize {
    chunk_len(rows, (par_elemwise_min() / 2 / row_len.max(1)).max(1))
}

/// Apply `f` to each of `rows` contiguous rows of length `row_len`, in parallel when large.
#[inline(always)]
pub fn rows<T: Sync, U: Send>(
    src: &[T],
    rows: usize,
    row_len: usize,
    f: impl Fn(&[T]) -> U + Sync,
) -> Vec<U> {
    if rows * row_len >= par_elemwise_min() && rows > 1 && num_threads() > 1 {
        install(|| {
            (0..rows)
                .into_par_iter()
                .with_min_len(par_rows(rows, row_len))
                .map(|r| {
                    with_simd(
                        #[inline(always)]
                        || f(&src[r * row_len..(r + 1) * row_len]),
                    )
                })
                .collect()
        })
    } else {
        with_simd(
            #[inline(always)]
            || {
                (0..rows)
                    .map(|r| f(&src[r * row_len..(r + 1) * row_len]))
                    .collect()
            },
        )
    }
}

/// Transform each contiguous row of `src` into the matching row of `out` (which `f` must
/// write in full), in parallel when large.
#[inline(always)]
pub fn rows_into<T: Sync, U: Send>(
    src: &[T],
    out: &mut [MaybeUninit<U>],
    row_len: usize,
    f: impl Fn(&[T], &mut [MaybeUninit<U>]) + Sync,
) {
    if row_len == 0 {
        return;
    }
    let n = src.len();
    if n >= par_elemwise_min() && n > row_len && num_threads() > 1 {
        let rows_per = par_rows(n / row_len, row_len);
        install(|| {
            out.par_chunks_mut(rows_per * row_len)
                .zip(src.par_chunks(rows_per * row_len))
                .for_each(|(o, s)| {
                    with_simd(
                        #[inline(always)]
                        || {
                            for (orow, srow) in o.chunks_mut(row_len).zip(s.chunks(row_len)) {
                                f(srow, orow)
                            }
                        },
                    )
                })
        });
    } else {
        with_simd(
            #[inline(always)]
            || {
                for (orow, srow) in out.chunks_mut(row_len).zip(src.chunks(row_len)) {
                    f(srow, orow)
                }
            },
        )
    }
}

/// Combine the matching contiguous rows of `a` and `b` into the row of `out` (which `f` must
/// write in full), in parallel when large: the row-wise backward passes (softmax).
#[inline(always)]
pub fn rows2_into<T: Sync, U: Send>(
    a: &[T],
    b: &[T],
    out: &mut [MaybeUninit<U>],
    row_len: usize,
    f: impl Fn(&[T], &[T], &mut [MaybeUninit<U>]) + Sync,
) {
    if row_len == 0 {
        return;
    }
    let n = out.len();
    let run = |a: &[T], b: &[T], o: &mut [MaybeUninit<U>]| {
        with_simd(
            #[inline(always)]
            || {
                for ((orow, arow), brow) in o
                    .chunks_mut(row_len)
                    .zip(a.chunks(row_len))
                    .zip(b.chunks(row_len))
                {
                    f(arow, brow, orow)
                }
            },
        )
    };
    if n >= par_elemwise_min() && n > row_len && num_threads() > 1 {
        let step = par_rows(n / row_len, row_len) * row_len;
        install(|| {
            out.par_chunks_mut(step)
                .zip(a.par_chunks(step))
                .zip(b.par_chunks(step))
                .for_each(|((o, a), b)| run(a, b, o))
        });
    } else {
        run(a, b, out);
    }
}

/// Sum over the leading dimension of a contiguous `outer × inner` block: `out[j] = Σ_i x[i, j]`.
pub fn sum_cols<T: Float>(src: &[T], outer: usize, inner: usize) -> Vec<T> {
    let work = |cols: std::ops::Range<usize>| -> Vec<T> {
        with_simd(
            #[inline(always)]
            || {
                let mut acc = vec![T::ZERO; cols.len()];
                for i in 0..outer {
                    let row = &src[i * inner + cols.start..i * inner + cols.end];
                    for (a, &v) in acc.iter_mut().zip(row) {
                        *a += v;
                    }
                }
                acc
            },
        )
    };
    if outer * inner >= par_elemwise_min() && inner >= 64 && num_threads() > 1 {
        let parts = num_threads().min(inner / 32).max(1);
        let step = inner.div_ceil(parts);
        install(|| {
            (0..parts)
                .into_par_iter()
                .map(|p| work(p * step..((p + 1) * step).min(inner)))
                .flatten_iter()
                .collect()
        })
    } else {
        work(0..inner)
    }
}

/// `out[i] = e^(x[i] - m)`, returning the sum of `out` (one pass, 16 accumulators).
#[inline(always)]
pub fn exp_sub_sum<T: Float>(x: &[T], m: T, out: &mut [MaybeUninit<T>]) -> T {
    let n = x.len().min(out.len());
    let (x, out) = (&x[..n], &mut out[..n]);
    let main = n - n % LANES;
    let mut acc = [T::ZERO; LANES];
    for (cx, co) in x[..main]
        .chunks_exact(LANES)
        .zip(out[..main].chunks_exact_mut(LANES))
    {
        for i in 0..LANES {
            let e = (cx[i] - m).exp();
            co[i].write(e);
            acc[i] += e;
        }
    }
    let mut s = T::ZERO;
    for i in main..n {
        let e = (x[i] - m).exp();
        out[i].write(e);
        s += e;
    }
    fold_lanes(acc) + s
}

/// Numerically stable softmax of one row (`out` as long as `x`).
#[inline(always)]
pub fn softmax_row<T: Float>(x: &[T], out: &mut [MaybeUninit<T>]) {
    assert_eq!(x.len(), out.len());
    let m = max_shift(x);
    let inv = T::ONE / exp_sub_sum(x, m, out);
    // SAFETY: exp_sub_sum wrote every element.
    let out = unsafe { assume_init_mut(out) };
    for o in out.iter_mut() {
        *o *= inv;
    }
}

/// Numerically stable log-softmax of one row (`out` as long as `x`).
#[inline(always)]
pub fn log_softmax_row<T: Float>(x: &[T], out: &mut [MaybeUninit<T>]) {
    assert_eq!(x.len(), out.len());
    let m = max_shift(x);
    let lse = exp_sub_sum(x, m, out).ln() + m;
    for (o, &v) in out.iter_mut().zip(x) {
        o.write(v - lse);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Above the parallel threshold (2049 rows of 129: chunks that do not divide the rows)
    /// the row maps give the same bits as one serial pass, every row written once.
    #[test]
    fn parallel_row_maps_match_serial() {
        let (rows_n, len) = (2049usize, 129usize);
        assert!(rows_n * len >= par_elemwise_min());
        let x: Vec<f32> = super::super::test_data(rows_n * len, 3)
            .iter()
            .map(|&v| v as f32 * 4.0)
            .collect();
        let g: Vec<f32> = super::super::test_data(rows_n * len, 4)
            .iter()
            .map(|&v| v as f32)
            .collect();
        let mut want = vec![MaybeUninit::<f32>::uninit(); x.len()];
        for (o, r) in want.chunks_mut(len).zip(x.chunks(len)) {
            softmax_row(r, o);
        }
        // SAFETY: every row was written.
        let want = unsafe { assume_init_mut(&mut want) }.to_vec();
        let mut got = vec![MaybeUninit::<f32>::uninit(); x.len()];
        rows_into(&x, &mut got, len, softmax_row);
        // SAFETY: rows_into's f writes each row in full.
        assert_eq!(unsafe { assume_init_mut(&mut got) }, &want[..]);
        let combine = |g: &[f32], y: &[f32], o: &mut [MaybeUninit<f32>]| {
            let d = dot(g, y);
            for ((o, &gi), &yi) in o.iter_mut().zip(g).zip(y) {
                o.write(yi * (gi - d));
            }
        };
        let mut got2 = vec![MaybeUninit::<f32>::uninit(); x.len()];
        rows2_into(&g, &want, &mut got2, len, combine);
        let mut want2 = vec![MaybeUninit::<f32>::uninit(); x.len()];
        for ((o, gr), yr) in want2
            .chunks_mut(len)
            .zip(g.chunks(len))
            .zip(want.chunks(len))
        {
            combine(gr, yr, o);
        }
        // SAFETY: both wrote every row in full.
        unsafe { assert_eq!(assume_init_mut(&mut got2), assume_init_mut(&mut want2)) };
        let sums = rows(&x, rows_n, len, sum);
        let serial: Vec<f32> = x.chunks(len).map(sum).collect();
        assert_eq!(sums, serial);
    }

    /// `max_shift` agrees with `max` without NaNs, and a NaN anywhere in a row (in the vector
    /// part or the remainder) makes the whole softmax / log-softmax row NaN, as PyTorch's.
    #[test]
    fn softmax_shift_and_nan_rows() {
        for n in [1usize, 5, 16, 37, 64] {
            let x: Vec<f32> = (0..n)
                .map(|i| ((i * 7919) % 23) as f32 * 0.5 - 3.0)
                .collect();
            assert_eq!(max_shift(&x), max(&x), "n = {n}");
            let mut out = vec![MaybeUninit::<f32>::uninit(); n];
            softmax_row(&x, &mut out);
            // SAFETY: softmax_row wrote every element.
            let p = unsafe { assume_init_mut(&mut out) };
            let total: f32 = p.iter().sum();
            assert!((total - 1.0).abs() < 1e-5, "n = {n}: sum {total}");
            for at in [0, n / 2, n - 1] {
                let mut y = x.clone();
                y[at] = f32::NAN;
                let mut out = vec![MaybeUninit::<f32>::uninit(); n];
                softmax_row(&y, &mut out);
                // SAFETY: as above.
                let p = unsafe { assume_init_mut(&mut out) };
                assert!(p.iter().all(|v| v.is_nan()), "softmax n = {n}, NaN at {at}");
                let mut out = vec![MaybeUninit::<f32>::uninit(); n];
                log_softmax_row(&y, &mut out);
                // SAFETY: as above.
                let p = unsafe { assume_init_mut(&mut out) };
                assert!(
                    p.iter().all(|v| v.is_nan()),
                    "log_softmax n = {n}, NaN at {at}"
                );
            }
        }
        assert_eq!(max_shift::<f64>(&[]), f64::NEG_INFINITY);
    }
}
