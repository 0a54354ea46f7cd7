//! Normalisation kernels over contiguous data viewed as `[N, C, S]` (batch, channels, spatial
//! positions): statistics per group of consecutive channels of one sample (layer, RMS and group
//! norm: LayerNorm is one group of `C` = the normalised size, `S` = 1) or per channel across
//! the batch (batch norm); the normalise-and-affine pass; and the backward pass, which gives
//! the input, weight and bias gradients from two passes over the output gradient and input.
//!
//! Statistics are two-pass with 16 accumulators: the mean (summed relative to the first value,
//! so a mean far from zero costs no precision), then the squared deviations from it (no
//! `E[x²] - E[x]²` cancellation); per-group scalars are finished in f64, and outputs are
//! formed from `x - mean`. f32 results agree with f64 to about 1e-6 relative. Work is split
//! over groups (over samples for batch norm) above a measured size.
#![allow(clippy::too_many_arguments)] // kernels take their slices and shape flat

use std::mem::MaybeUninit;
use std::ops::Range;

use rayon::prelude::*;

use super::reduce::{dev_sum, dot, sq_dev_sum, sum_dot_centered};
use super::{assume_init, uninit_buf, with_simd};
use crate::dtype::Float;
use crate::threading::{install, par_elemwise_min};

/// Contiguous data `[n, c, s]` whose channels are split into `groups` groups of consecutive
/// channels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NormShape {
    /// Samples (LayerNorm: rows).
    pub n: usize,
    /// Channels (LayerNorm: the normalised size).
    pub c: usize,
    /// Positions per channel (LayerNorm: 1).
    pub s: usize,
    /// Channel groups; divides `c`.
    pub groups: usize,
}

impl NormShape {
    fn channels_per_group(&self) -> usize {
        self.c / self.groups
    }
    /// Elements in one group of one sample.
    fn group_len(&self) -> usize {
        self.channels_per_group() * self.s
    }
    /// Groups over all samples.
    fn num_groups(&self) -> usize {
        self.n * self.groups
    }
}

/// Element count from which a normalisation splits across threads: a quarter of an add's
/// threshold, because one thread takes about four times as long per element (2^18 f32
/// elements: add 36 µs, LayerNorm(128) forward 154 µs, forward + backward 348 µs), and the
/// threshold is a work time, the one at which `add` gains from the second core.
fn par_min() -> usize {
    (par_elemwise_min() / 4).max(1)
}

/// Tasks a large normalisation is split into (whatever the thread count).
const TASKS: usize = 8;

/// How many of `items` items of `len` elements each one task takes; `items` itself when the
/// work is too small to split. The split does not depend on the thread count, so the sums
/// over tasks (weight and bias gradients, batch statistics) come out the same bits on one
/// thread or many.
fn items_per_task(items: usize, len: usize) -> usize {
    if items > 1 && items * len >= par_min() {
        items
            .div_ceil(TASKS)
            .max((par_min() / 2 / len.max(1)).max(1))
    } else {
        items.max(1)
    }
}

/// Run `body(first_item, chunk)` over consecutive chunks of `out`, which holds `items` items
/// of `len` (> 0) elements each, in parallel when large, each chunk compiled for the
/// machine's SIMD level; the results in order.
#[inline(always)]
fn for_item_chunks<U: Send, R: Send>(
    out: &mut [U],
    items: usize,
    len: usize,
    body: impl Fn(usize, &mut [U]) -> R + Sync,
) -> Vec<R> {
    let per = items_per_task(items, len);
    if per >= items {
        return vec![with_simd(
            #[inline(always)]
            || body(0, out),
        )];
    }
    install(|| {
        out.par_chunks_mut(per * len)
            .enumerate()
            .map(|(t, o)| {
                with_simd(
                    #[inline(always)]
                    || body(t * per, o),
                )
            })
            .collect()
    })
}

/// `1 / sqrt(m2 / count + eps)`, in f64.
#[inline(always)]
fn rstd_of(m2: f64, count: usize, eps: f64) -> f64 {
    1.0 / (m2 / count as f64 + eps).sqrt()
}

/// Mean of a non-empty slice, summed relative to its first element: when the mean is far
/// from zero compared with the spread, the sum of `x - x[0]` rounds far less than that of `x`.
#[inline(always)]
fn shifted_mean<T: Float>(x: &[T]) -> T {
    let k = x[0];
    k + dev_sum(x, k) / T::from_usize(x.len())
}

/// Mean (0 when not `centered`) and `1/std` of one group.
#[inline(always)]
fn group_stats<T: Float>(x: &[T], eps: f64, centered: bool) -> (T, T) {
    if centered {
        let mean = shifted_mean(x);
        let m2 = sq_dev_sum(x, mean).to_f64();
        (mean, T::from_f64(rstd_of(m2, x.len(), eps)))
    } else {
        (
            T::ZERO,
            T::from_f64(rstd_of(dot(x, x).to_f64(), x.len(), eps)),
        )
    }
}

/// `y = (x - mean) · rstd · w[c] + b[c]` over one group (`s` positions per channel; `w`, `b`
/// the group's channels).
#[inline(always)]
fn normalize_group<T: Float>(
    x: &[T],
    y: &mut [MaybeUninit<T>],
    s: usize,
    mean: T,
    rstd: T,
    w: &[T],
    b: &[T],
) {
    if s == 1 {
        let n = x.len();
        for ((o, &v), (&wc, &bc)) in y.iter_mut().zip(x).zip(w[..n].iter().zip(&b[..n])) {
            o.write((v - mean) * (rstd * wc) + bc);
        }
    } else {
        for ((xc, yc), (&wc, &bc)) in x
            .chunks_exact(s)
            .zip(y.chunks_exact_mut(s))
            .zip(w.iter().zip(b))
        {
            // (x - mean) first: x · scale + (b - mean · scale) would cancel when
            // |mean| ≫ std.
            let scale = wc * rstd;
            for (o, &v) in yc.iter_mut().zip(xc) {
                o.write((v - mean) * scale + bc);
            }
        }
    }
}

/// Normalise every group of `x` (shaped `shape`) to zero mean and unit variance (biased), or
/// with `centered` false to unit mean square (RMS norm), then apply the per-channel affine
/// `w`, `b` (`c` elements each). Returns the output and the `(mean, rstd)` of each group,
/// interleaved (mean 0 when not centered).
pub fn group_norm_forward<T: Float>(
    x: &[T],
    shape: NormShape,
    w: &[T],
    b: &[T],
    eps: f64,
    centered: bool,
) -> (Vec<T>, Vec<T>) {
    let (ng, len, cpg) = (
        shape.num_groups(),
        shape.group_len(),
        shape.channels_per_group(),
    );
    assert_eq!(x.len(), ng * len);
    assert!(w.len() == shape.c && b.len() == shape.c);
    let mut y = uninit_buf::<T>(x.len());
    if len == 0 {
        // SAFETY: the buffer is empty.
        return (unsafe { assume_init(y) }, vec![T::ZERO; 2 * ng]);
    }
    let stats = for_item_chunks(
        &mut y,
        ng,
        len,
        #[inline(always)]
        |q0, ys| {
            let mut st = Vec::with_capacity(2 * ys.len() / len);
            for (i, yg) in ys.chunks_mut(len).enumerate() {
                let q = q0 + i;
                let xg = &x[q * len..(q + 1) * len];
                let (mean, rstd) = group_stats(xg, eps, centered);
                st.extend([mean, rstd]);
                let c0 = (q % shape.groups) * cpg;
                normalize_group(
                    xg,
                    yg,
                    shape.s,
                    mean,
                    rstd,
                    &w[c0..c0 + cpg],
                    &b[c0..c0 + cpg],
                );
            }
            st
        },
    )
    .concat();
    // SAFETY: every group of the output was written in full.
    (unsafe { assume_init(y) }, stats)
}

/// Backward of one group with one position per channel (LayerNorm rows): accumulates
/// `dw += g · xhat`, `db += g` and writes `dx`.
#[inline(always)]
fn row_backward<T: Float>(
    g: &[T],
    x: &[T],
    dx: &mut [MaybeUninit<T>],
    (mean, rstd): (T, T),
    w: &[T],
    dw: &mut [T],
    db: &mut [T],
    centered: bool,
) {
    const L: usize = 16;
    let n = x.len();
    let (g, w, dw, db, dx) = (&g[..n], &w[..n], &mut dw[..n], &mut db[..n], &mut dx[..n]);
    // Σ g w and Σ g w xhat, with 16 accumulators each.
    let (mut sa, mut sb) = ([T::ZERO; L], [T::ZERO; L]);
    let main = n - n % L;
    for ((((cg, cx), cw), cdw), cdb) in g[..main]
        .chunks_exact(L)
        .zip(x[..main].chunks_exact(L))
        .zip(w[..main].chunks_exact(L))
        .zip(dw[..main].chunks_exact_mut(L))
        .zip(db[..main].chunks_exact_mut(L))
    {
        for i in 0..L {
            let xh = (cx[i] - mean) * rstd;
            let gw = cg[i] * cw[i];
            sa[i] += gw;
            sb[i] += gw * xh;
            cdw[i] += cg[i] * xh;
            cdb[i] += cg[i];
        }
    }
    for i in main..n {
        let xh = (x[i] - mean) * rstd;
        let gw = g[i] * w[i];
        sa[i - main] += gw;
        sb[i - main] += gw * xh;
        dw[i] += g[i] * xh;
        db[i] += g[i];
    }
    let (a, bsum) = (fold(sa).to_f64(), fold(sb).to_f64());
    let (k2, k3) = dx_coefficients(a, bsum, n, rstd.to_f64(), centered);
    let (k2, k3) = (T::from_f64(k2), T::from_f64(k3));
    for (((o, &gi), &xi), &wi) in dx.iter_mut().zip(g).zip(x).zip(w) {
        o.write(gi * (wi * rstd) + (xi - mean) * k2 + k3);
    }
}

/// Pairwise sum of 16 accumulators.
#[inline(always)]
fn fold<T: Float>(mut acc: [T; 16]) -> T {
    let mut w = 16;
    while w > 1 {
        w /= 2;
        for i in 0..w {
            acc[i] += acc[i + w];
        }
    }
    acc[0]
}

/// `dx = rstd (g w - A - xhat B)` with `A = Σ g w / n` (0 when not centered) and
/// `B = Σ g w xhat / n`, written as `g (w rstd) + (x - mean) k2 + k3`; returns `(k2, k3)`.
#[inline(always)]
fn dx_coefficients(
    sum_gw: f64,
    sum_gw_xhat: f64,
    n: usize,
    rstd: f64,
    centered: bool,
) -> (f64, f64) {
    let a = if centered { sum_gw / n as f64 } else { 0.0 };
    let b = sum_gw_xhat / n as f64;
    (-rstd * rstd * b, -rstd * a)
}

/// Backward of one group with several positions per channel (GroupNorm): per-channel sums
/// first, then `dx`.
#[inline(always)]
fn group_backward<T: Float>(
    g: &[T],
    x: &[T],
    dx: &mut [MaybeUninit<T>],
    s: usize,
    (mean, rstd): (T, T),
    w: &[T],
    dw: &mut [T],
    db: &mut [T],
    centered: bool,
) {
    let (mut a, mut bsum) = (0.0f64, 0.0f64);
    for (j, (gc, xc)) in g.chunks_exact(s).zip(x.chunks_exact(s)).enumerate() {
        let (sg, sgx) = sum_dot_centered(gc, xc, mean);
        let (sg64, sgx64) = (sg.to_f64(), sgx.to_f64());
        let wc = w[j].to_f64();
        a += wc * sg64;
        bsum += wc * sgx64;
        dw[j] += T::from_f64(sgx64 * rstd.to_f64());
        db[j] += sg;
    }
    let r64 = rstd.to_f64();
    let (k2, k3) = dx_coefficients(a, bsum * r64, x.len(), r64, centered);
    let (k2, k3) = (T::from_f64(k2), T::from_f64(k3));
    for (((gc, xc), dc), &wc) in g
        .chunks_exact(s)
        .zip(x.chunks_exact(s))
        .zip(dx.chunks_exact_mut(s))
        .zip(w)
    {
        let k1 = wc * rstd;
        for ((o, &gi), &xi) in dc.iter_mut().zip(gc).zip(xc) {
            o.write(gi * k1 + (xi - mean) * k2 + k3);
        }
    }
}

/// The gradients of [`group_norm_forward`] given the output gradient `g`, the input `x`, the
/// saved per-group statistics and the weight (ones when the op had none): `dx`, `dweight`
/// (`Σ g · xhat` per channel) and `dbias` (`Σ g` per channel).
pub fn group_norm_backward<T: Float>(
    g: &[T],
    x: &[T],
    stats: &[T],
    shape: NormShape,
    w: &[T],
    centered: bool,
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let (ng, len, cpg, c) = (
        shape.num_groups(),
        shape.group_len(),
        shape.channels_per_group(),
        shape.c,
    );
    assert!(g.len() == ng * len && x.len() == ng * len && stats.len() == 2 * ng);
    let mut dx = uninit_buf::<T>(x.len());
    if len == 0 {
        // SAFETY: the buffer is empty.
        return (
            unsafe { assume_init(dx) },
            vec![T::ZERO; c],
            vec![T::ZERO; c],
        );
    }
    // Each task sums its own dweight/dbias; the partial sums are added at the end.
    let partials = for_item_chunks(
        &mut dx,
        ng,
        len,
        #[inline(always)]
        |q0, dxs| {
            let (mut dw, mut db) = (vec![T::ZERO; c], vec![T::ZERO; c]);
            for (i, dxg) in dxs.chunks_mut(len).enumerate() {
                let q = q0 + i;
                let (gg, xg) = (&g[q * len..(q + 1) * len], &x[q * len..(q + 1) * len]);
                let st = (stats[2 * q], stats[2 * q + 1]);
                let ch = (q % shape.groups) * cpg..(q % shape.groups + 1) * cpg;
                let (wg, dwg, dbg) = (&w[ch.clone()], &mut dw[ch.clone()], &mut db[ch]);
                if shape.s == 1 {
                    row_backward(gg, xg, dxg, st, wg, dwg, dbg, centered);
                } else {
                    group_backward(gg, xg, dxg, shape.s, st, wg, dwg, dbg, centered);
                }
            }
            (dw, db)
        },
    );
    let (dw, db) = add_partials(partials, c);
    // SAFETY: every group of dx was written in full.
    (unsafe { assume_init(dx) }, dw, db)
}

/// Element-wise sum of the tasks' partial (dweight, dbias).
fn add_partials<T: Float>(partials: Vec<(Vec<T>, Vec<T>)>, c: usize) -> (Vec<T>, Vec<T>) {
    let mut it = partials.into_iter();
    let (mut dw, mut db) = it
        .next()
        .unwrap_or_else(|| (vec![T::ZERO; c], vec![T::ZERO; c]));
    for (pw, pb) in it {
        for (a, v) in dw.iter_mut().zip(pw) {
            *a += v;
        }
        for (a, v) in db.iter_mut().zip(pb) {
            *a += v;
        }
    }
    (dw, db)
}

// ------------------------------------------------------------------------------ batch norm

/// Per-channel accumulators (`width` per channel, channel-major) summed over the samples:
/// `body(samples, acc)` adds the contribution of a range of samples to `acc`. Samples are
/// split across threads when large, each task with its own accumulators.
fn per_channel_sums<T: Float>(
    shape: NormShape,
    width: usize,
    body: impl Fn(Range<usize>, &mut [T]) + Sync,
) -> Vec<T> {
    let n = shape.n;
    if n * shape.c * shape.s == 0 {
        return vec![T::ZERO; width * shape.c];
    }
    let per = items_per_task(n, shape.c * shape.s);
    let run = |r: Range<usize>| {
        let mut acc = vec![T::ZERO; width * shape.c];
        with_simd(
            #[inline(always)]
            || body(r, &mut acc),
        );
        acc
    };
    if per >= n {
        return run(0..n);
    }
    let tasks = n.div_ceil(per);
    let partials: Vec<Vec<T>> = install(|| {
        (0..tasks)
            .into_par_iter()
            .map(|t| run(t * per..((t + 1) * per).min(n)))
            .collect()
    });
    let mut it = partials.into_iter();
    let mut acc = it.next().unwrap_or_else(|| vec![T::ZERO; width * shape.c]);
    for p in it {
        for (a, v) in acc.iter_mut().zip(p) {
            *a += v;
        }
    }
    acc
}

/// Per-channel mean and sum of squared deviations over samples and positions (two passes).
pub fn channel_mean_m2<T: Float>(x: &[T], shape: NormShape) -> (Vec<T>, Vec<T>) {
    let (c, s) = (shape.c, shape.s);
    assert_eq!(x.len(), shape.n * c * s);
    let count = T::from_usize(shape.n * s);
    if x.is_empty() {
        return (vec![T::ZERO; c], vec![T::ZERO; c]);
    }
    // Sums relative to each channel's first value (see `shifted_mean`).
    let shift: Vec<T> = (0..c).map(|j| x[j * s]).collect();
    let sums = per_channel_sums(
        shape,
        1,
        #[inline(always)]
        |r: Range<usize>, acc: &mut [T]| {
            for xs in x[r.start * c * s..r.end * c * s].chunks_exact(c * s) {
                if s == 1 {
                    for ((a, &v), &k) in acc.iter_mut().zip(xs).zip(&shift) {
                        *a += v - k;
                    }
                } else {
                    for ((a, xc), &k) in acc.iter_mut().zip(xs.chunks_exact(s)).zip(&shift) {
                        *a += dev_sum(xc, k);
                    }
                }
            }
        },
    );
    let mean: Vec<T> = sums
        .into_iter()
        .zip(&shift)
        .map(|(v, &k)| k + v / count)
        .collect();
    let m2 = per_channel_sums(
        shape,
        1,
        #[inline(always)]
        |r: Range<usize>, acc: &mut [T]| {
            for xs in x[r.start * c * s..r.end * c * s].chunks_exact(c * s) {
                if s == 1 {
                    for ((a, &v), &m) in acc.iter_mut().zip(xs).zip(&mean) {
                        let d = v - m;
                        *a += d * d;
                    }
                } else {
                    for ((a, xc), &m) in acc.iter_mut().zip(xs.chunks_exact(s)).zip(&mean) {
                        *a += sq_dev_sum(xc, m);
                    }
                }
            }
        },
    );
    (mean, m2)
}

/// Per-channel `(Σ g, Σ g (x - mean[c]))` over samples and positions, as two vectors.
pub fn channel_grad_sums<T: Float>(
    g: &[T],
    x: &[T],
    mean: &[T],
    shape: NormShape,
) -> (Vec<T>, Vec<T>) {
    let (c, s) = (shape.c, shape.s);
    assert!(g.len() == shape.n * c * s && x.len() == g.len() && mean.len() == c);
    let acc = per_channel_sums(
        shape,
        2,
        #[inline(always)]
        |r: Range<usize>, acc: &mut [T]| {
            let (sg, sgx) = acc.split_at_mut(c);
            let span = r.start * c * s..r.end * c * s;
            for (gs, xs) in g[span.clone()]
                .chunks_exact(c * s)
                .zip(x[span].chunks_exact(c * s))
            {
                if s == 1 {
                    for ((((a, b), &gi), &xi), &m) in
                        sg.iter_mut().zip(sgx.iter_mut()).zip(gs).zip(xs).zip(mean)
                    {
                        *a += gi;
                        *b += gi * (xi - m);
                    }
                } else {
                    for ((((a, b), gc), xc), &m) in sg
                        .iter_mut()
                        .zip(sgx.iter_mut())
                        .zip(gs.chunks_exact(s))
                        .zip(xs.chunks_exact(s))
                        .zip(mean)
                    {
                        let (u, v) = sum_dot_centered(gc, xc, m);
                        *a += u;
                        *b += v;
                    }
                }
            }
        },
    );
    let (sg, sgx) = acc.split_at(c);
    (sg.to_vec(), sgx.to_vec())
}

/// `out[n, c, s] = g[n, c, s] · k1[c] + (x[n, c, s] - mean[c]) · k2[c] + k3[c]`, split over
/// samples when large; with `g` absent, `(x - mean[c]) · k2[c] + k3[c]`. Batch norm's
/// normalise pass (no `g`: `k2` the scale, `k3` the bias) and its `dx` pass.
pub fn channel_apply<T: Float>(
    g: Option<&[T]>,
    x: &[T],
    shape: NormShape,
    mean: &[T],
    k1: &[T],
    k2: &[T],
    k3: &[T],
) -> Vec<T> {
    let (c, s) = (shape.c, shape.s);
    let row = c * s;
    assert!(x.len() == shape.n * row && g.is_none_or(|g| g.len() == x.len()));
    assert!(mean.len() == c && k1.len() == c && k2.len() == c && k3.len() == c);
    let mut out = uninit_buf::<T>(x.len());
    if row == 0 {
        // SAFETY: the buffer is empty.
        return unsafe { assume_init(out) };
    }
    for_item_chunks(
        &mut out,
        shape.n,
        row,
        #[inline(always)]
        |n0, os| {
            for (i, orow) in os.chunks_exact_mut(row).enumerate() {
                let span = (n0 + i) * row..(n0 + i + 1) * row;
                let xrow = &x[span.clone()];
                match g {
                    Some(g) => {
                        let grow = &g[span];
                        if s == 1 {
                            for ((((o, &gi), &xi), (&m, &p)), (&q, &r)) in orow
                                .iter_mut()
                                .zip(grow)
                                .zip(xrow)
                                .zip(mean.iter().zip(k1))
                                .zip(k2.iter().zip(k3))
                            {
                                o.write(gi * p + (xi - m) * q + r);
                            }
                        } else {
                            for ((((oc, gc), xc), (&m, &p)), (&q, &r)) in orow
                                .chunks_exact_mut(s)
                                .zip(grow.chunks_exact(s))
                                .zip(xrow.chunks_exact(s))
                                .zip(mean.iter().zip(k1))
                                .zip(k2.iter().zip(k3))
                            {
                                for ((o, &gi), &xi) in oc.iter_mut().zip(gc).zip(xc) {
                                    o.write(gi * p + (xi - m) * q + r);
                                }
                            }
                        }
                    }
                    None => {
                        if s == 1 {
                            for (((o, &xi), &m), (&q, &r)) in
                                orow.iter_mut().zip(xrow).zip(mean).zip(k2.iter().zip(k3))
                            {
                                o.write((xi - m) * q + r);
                            }
                        } else {
                            for (((oc, xc), &m), (&q, &r)) in orow
                                .chunks_exact_mut(s)
                                .zip(xrow.chunks_exact(s))
                                .zip(mean)
                                .zip(k2.iter().zip(k3))
                            {
                                for (o, &xi) in oc.iter_mut().zip(xc) {
                                    o.write((xi - m) * q + r);
                                }
                            }
                        }
                    }
                }
            }
        },
    );
    // SAFETY: every row of the output was written in full.
    unsafe { assume_init(out) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// f64 reference: normalise each group, then the affine.
    fn reference(x: &[f64], sh: NormShape, w: &[f64], b: &[f64], eps: f64) -> Vec<f64> {
        let len = sh.group_len();
        let mut y = vec![0.0; x.len()];
        for q in 0..sh.num_groups() {
            let xg = &x[q * len..(q + 1) * len];
            let mean = xg.iter().sum::<f64>() / len as f64;
            let var = xg.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / len as f64;
            for (i, &v) in xg.iter().enumerate() {
                let c = (q % sh.groups) * sh.channels_per_group() + i / sh.s;
                y[q * len + i] = (v - mean) / (var + eps).sqrt() * w[c] + b[c];
            }
        }
        y
    }

    #[test]
    fn group_norm_forward_matches_reference_serial_and_parallel() {
        // Small (serial) and large (split across tasks) problems, odd sizes, S = 1 and S > 1.
        for sh in [
            NormShape {
                n: 3,
                c: 6,
                s: 5,
                groups: 3,
            },
            NormShape {
                n: 5,
                c: 7,
                s: 1,
                groups: 1,
            },
            NormShape {
                n: 37,
                c: 12,
                s: 301,
                groups: 4,
            },
            NormShape {
                n: 1100,
                c: 129,
                s: 1,
                groups: 1,
            },
        ] {
            let len = sh.n * sh.c * sh.s;
            let x: Vec<f64> = (0..len)
                .map(|i| (i as f64 * 0.37).sin() * 3.0 + 1.5)
                .collect();
            let w: Vec<f64> = (0..sh.c).map(|i| 1.0 + 0.1 * i as f64).collect();
            let b: Vec<f64> = (0..sh.c).map(|i| 0.2 * i as f64 - 0.5).collect();
            let (y, _) = group_norm_forward(&x, sh, &w, &b, 1e-5, true);
            let want = reference(&x, sh, &w, &b, 1e-5);
            for (a, e) in y.iter().zip(&want) {
                assert!((a - e).abs() < 1e-12, "{sh:?}: {a} vs {e}");
            }
        }
    }
}
