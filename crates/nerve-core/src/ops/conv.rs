//! Convolutions and pooling over NCHW (and NCL) tensors, with PyTorch's semantics: `conv1d`,
//! `conv2d`, `conv_transpose1d`, `conv_transpose2d`, `max_pool2d` (with indices),
//! `avg_pool2d`, `adaptive_avg_pool2d` and nearest-neighbour upsampling.
//!
//! Convolutions lower to GEMM. One "geometry" ([`Geom`]) relates an image side
//! `[N, C, H, W]` to a column side `[N, O, Ho, Wo]` through a kernel `[O, C/groups, kh, kw]`,
//! and three kernels cover every pass of both convolutions:
//!
//! * [`conv_forward`]: image → columns. Per sample and group, im2col into a reusable buffer,
//!   then `out[n, g] = W_g [O/g, C/g·kh·kw] · col [C/g·kh·kw, Ho·Wo]`. 1×1 stride-1 unpadded
//!   kernels multiply the input planes directly.
//! * [`conv_backward`] (data part): columns → image, `col2im(W_gᵀ · y[n, g])`.
//! * [`conv_backward`] (weight part): `dW_g += y[n, g] · col(x[n, g])ᵀ`, the columns recomputed
//!   rather than kept from the forward pass.
//!
//! `conv2d` is forward / (data, weight) backward; `conv_transpose2d` is the same geometry read
//! the other way: its forward is the data backward, its input gradient the forward, its
//! weight gradient the weight backward with the roles of the two sides swapped.
//!
//! Batches with at least one sample per thread run batch-parallel (one column buffer per
//! worker, serial GEMMs, per-worker partial weight gradients summed at the end); smaller
//! batches run sample by sample with parallel GEMMs. Pooling loops are direct and split over
//! the `N·C` planes above a work threshold.

use std::mem::MaybeUninit;
use std::ops::Range;

use rayon::prelude::*;

use super::float_dispatch;
use crate::autograd::no_grad;
use crate::dtype::{DType, Element, Float};
use crate::kernels::gemm::{gemm as gemm_raw, GemmFloat};
use crate::kernels::{assume_init, uninit_buf, with_scratch, with_simd};
use crate::threading::{install, num_threads, par_elemwise_min};
use crate::{Error, Result, Tensor};

// ------------------------------------------------------------------------------------- GEMM

/// The float types the convolution kernels run on, with their GEMM.
trait ConvFloat: GemmFloat {
    /// `C = A·B + beta·C` (alpha 1, `C` row-major with row stride `rsc`).
    ///
    /// # Safety
    /// As [`gemm_raw`]: every element addressed through the pointers and strides for the given
    /// sizes must be in bounds, and `c` must not alias `a` or `b`.
    #[allow(clippy::too_many_arguments)]
    unsafe fn gemm(
        m: usize,
        n: usize,
        k: usize,
        a: *const Self,
        rsa: usize,
        csa: usize,
        b: *const Self,
        rsb: usize,
        csb: usize,
        beta: Self,
        c: *mut Self,
        rsc: usize,
        parallel: bool,
    ) {
        // SAFETY: forwarded contract.
        unsafe {
            gemm_raw::<Self>(
                m,
                n,
                k,
                Self::ONE,
                a,
                rsa as isize,
                csa as isize,
                b,
                rsb as isize,
                csb as isize,
                beta,
                c,
                rsc as isize,
                1,
                parallel,
            )
        }
    }
}
impl ConvFloat for f32 {}
impl ConvFloat for f64 {}

// ------------------------------------------------------------------------------------- helpers

/// Run `f` on the contiguous typed slices of `ts` (all contiguous, all of dtype `T`), taking
/// one read lock per distinct storage (views of one storage must not lock it twice).
fn read_all<T: Element, R>(ts: &[&Tensor], f: impl FnOnce(&[&[T]]) -> R) -> R {
    let mut owners: Vec<usize> = Vec::new();
    let mut guards = Vec::new();
    let mut which = Vec::with_capacity(ts.len());
    for (i, t) in ts.iter().enumerate() {
        match owners.iter().position(|&j| ts[j].shares_storage(t)) {
            Some(p) => which.push(p),
            None => {
                owners.push(i);
                guards.push(t.0.storage.read());
                which.push(guards.len() - 1);
            }
        }
    }
    let slices: Vec<&[T]> = ts
        .iter()
        .zip(&which)
        .map(|(t, &gi)| {
            let s = T::slice(&guards[gi]).expect("dtype checked by the caller");
            &s[t.layout().contiguous_range().expect("contiguous")]
        })
        .collect();
    f(&slices)
}

/// `t` as a contiguous tensor of dtype `dtype`, outside the graph.
fn plain(t: &Tensor, dtype: DType) -> Result<Tensor> {
    no_grad(|| t.to_dtype(dtype)?.contiguous())
}

fn check_rank(op: &'static str, t: &Tensor, rank: usize, what: &str) -> Result<()> {
    if t.rank() != rank {
        return Err(Error::bad_shape(
            op,
            t.dims(),
            format!("expected a {rank}-D {what}, got {}-D", t.rank()),
        ));
    }
    Ok(())
}

fn check_positive(op: &'static str, what: &str, v: (usize, usize)) -> Result<()> {
    if v.0 == 0 || v.1 == 0 {
        return Err(Error::invalid(
            op,
            format!("{what} must be positive, got {v:?}"),
        ));
    }
    Ok(())
}

/// The indices `o` in `0..out` for which `o*s + kd - p` lies in `0..len`: a contiguous range.
fn valid_range(out: usize, len: usize, s: usize, kd: usize, p: usize) -> (usize, usize) {
    let lo = if kd >= p { 0 } else { (p - kd).div_ceil(s) };
    let hi = if len + p <= kd {
        0
    } else {
        (len + p - kd).div_ceil(s)
    }
    .min(out);
    (lo.min(hi), hi)
}

/// Runs a batch is split into when `for_batch` must not depend on the thread count.
const FIXED_RUNS: usize = 8;

/// Split `buf` (the per-sample blocks of `n` samples, possibly empty) into runs of whole
/// samples and call `f(samples, block, parallel_gemm)` on each; the results in run order.
/// With a sample for every thread the runs go to the workers (GEMMs serial); otherwise one
/// run with parallel GEMMs. With `fixed`, the runs are the same whatever the thread count
/// (`n.min(8)` of them), so that sums over the runs' results (the weight gradient) come out
/// the same bits on one thread or many.
fn for_batch<T: Send, R: Send>(
    n: usize,
    buf: &mut [T],
    fixed: bool,
    f: impl Fn(Range<usize>, &mut [T], bool) -> R + Sync,
) -> Vec<R> {
    let threads = num_threads();
    let runs = if fixed {
        n.min(FIXED_RUNS)
    } else if threads <= 1 || n < threads {
        1
    } else {
        threads
    };
    if runs <= 1 {
        return vec![install(|| f(0..n, buf, true))];
    }
    let per = buf.len() / n;
    let size = n.div_ceil(runs);
    let mut parts: Vec<(Range<usize>, &mut [T])> = Vec::with_capacity(runs);
    let mut rest = buf;
    let mut start = 0;
    while start < n {
        let end = (start + size).min(n);
        let (a, b) = rest.split_at_mut((end - start) * per);
        parts.push((start..end, a));
        rest = b;
        start = end;
    }
    let parallel_gemms = threads > parts.len();
    install(|| {
        parts
            .into_par_iter()
            .map(|(r, b)| f(r, b, parallel_gemms))
            .collect()
    })
}

/// Call `f(plane, block)` on the `per`-sized blocks of `out`, in parallel when `work` (a rough
/// count of inner-loop steps) is large enough to pay for it.
fn for_planes<U: Send>(out: &mut [U], per: usize, work: usize, f: impl Fn(usize, &mut [U]) + Sync) {
    if per == 0 {
        return;
    }
    if work >= par_elemwise_min() && num_threads() > 1 {
        install(|| {
            out.par_chunks_mut(per)
                .enumerate()
                .for_each(|(p, o)| f(p, o))
        });
    } else {
        for (p, o) in out.chunks_mut(per).enumerate() {
            f(p, o);
        }
    }
}

// ------------------------------------------------------------------------------ conv geometry

/// A convolution between an image side `[n, c, h, w]` and a column side `[n, o, ho, wo]`
/// through a kernel `[o, c/groups, kh, kw]`. For a transposed convolution the image side is
/// its output and the column side its input.
#[derive(Clone, Copy, Debug)]
struct Geom {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    o: usize,
    ho: usize,
    wo: usize,
    kh: usize,
    kw: usize,
    sh: usize,
    sw: usize,
    ph: usize,
    pw: usize,
    dh: usize,
    dw: usize,
    groups: usize,
}

impl Geom {
    fn cg(&self) -> usize {
        self.c / self.groups
    }
    fn og(&self) -> usize {
        self.o / self.groups
    }
    /// Rows of a group's column matrix: `c/groups · kh · kw`.
    fn kdim(&self) -> usize {
        self.cg() * self.kh * self.kw
    }
    fn hw(&self) -> usize {
        self.h * self.w
    }
    fn sp(&self) -> usize {
        self.ho * self.wo
    }
}

/// Output length of a convolution along one axis.
fn conv_len(
    op: &'static str,
    shown: &[usize],
    len: usize,
    k: usize,
    s: usize,
    p: usize,
    d: usize,
) -> Result<usize> {
    let eff = d * (k - 1) + 1;
    if len + 2 * p < eff {
        return Err(Error::bad_shape(
            op,
            shown,
            format!(
                "kernel size {k} (dilation {d}) is larger than the padded input size {}",
                len + 2 * p
            ),
        ));
    }
    Ok((len + 2 * p - eff) / s + 1)
}

/// Output length of a transposed convolution along one axis.
#[allow(clippy::too_many_arguments)]
fn conv_transpose_len(
    op: &'static str,
    shown: &[usize],
    len: usize,
    k: usize,
    s: usize,
    p: usize,
    d: usize,
    out_pad: usize,
) -> Result<usize> {
    let full = if len == 0 {
        0
    } else {
        (len - 1) * s + d * (k - 1) + out_pad + 1
    };
    if full <= 2 * p {
        return Err(Error::bad_shape(
            op,
            shown,
            format!("output size would be non-positive ({full} - 2*{p})"),
        ));
    }
    Ok(full - 2 * p)
}

/// Check a convolution's arguments and work out its geometry. `x` and `w` are the shapes as
/// the user gave them (rank 3 for 1-D convolutions, whose height is 1); `output_padding` is
/// `Some` for transposed convolutions.
#[allow(clippy::too_many_arguments)]
fn conv_geom(
    op: &'static str,
    x: &[usize],
    w: &[usize],
    bias: Option<&[usize]>,
    stride: (usize, usize),
    padding: (usize, usize),
    dilation: (usize, usize),
    groups: usize,
    output_padding: Option<(usize, usize)>,
) -> Result<Geom> {
    if groups == 0 {
        return Err(Error::invalid(op, "groups must be positive"));
    }
    check_positive(op, "stride", stride)?;
    check_positive(op, "dilation", dilation)?;
    if w.contains(&0) {
        return Err(Error::bad_shape(
            op,
            w,
            "weight must not have zero-sized dimensions",
        ));
    }
    let two = |d: &[usize]| {
        if d.len() == 3 {
            (1, d[2])
        } else {
            (d[2], d[3])
        }
    };
    let (n, c) = (x[0], x[1]);
    let ((h, wd), (kh, kw)) = (two(x), two(w));
    let out_channels = match output_padding {
        None => w[0],
        Some(_) => w[1] * groups,
    };
    let channels_ok = match output_padding {
        None => w[1] * groups == c && w[0].is_multiple_of(groups),
        Some(_) => w[0] == c && c % groups == 0,
    };
    if !channels_ok {
        return Err(Error::shape_mismatch(op, x, w));
    }
    if let Some(b) = bias {
        if b != [out_channels] {
            return Err(Error::shape_mismatch(op, w, b));
        }
    }
    let geom = |c, h, w, o, ho, wo| Geom {
        n,
        c,
        h,
        w,
        o,
        ho,
        wo,
        kh,
        kw,
        sh: stride.0,
        sw: stride.1,
        ph: padding.0,
        pw: padding.1,
        dh: dilation.0,
        dw: dilation.1,
        groups,
    };
    match output_padding {
        None => {
            let ho = conv_len(op, x, h, kh, stride.0, padding.0, dilation.0)?;
            let wo = conv_len(op, x, wd, kw, stride.1, padding.1, dilation.1)?;
            Ok(geom(c, h, wd, w[0], ho, wo))
        }
        Some(opad) => {
            let ok = |o: usize, s: usize, d: usize| o < s || o < d;
            if !ok(opad.0, stride.0, dilation.0) || !ok(opad.1, stride.1, dilation.1) {
                return Err(Error::invalid(
                    op,
                    format!(
                        "output_padding {opad:?} must be smaller than either stride {stride:?} \
                         or dilation {dilation:?}"
                    ),
                ));
            }
            let ho = conv_transpose_len(op, x, h, kh, stride.0, padding.0, dilation.0, opad.0)?;
            let wo = conv_transpose_len(op, x, wd, kw, stride.1, padding.1, dilation.1, opad.1)?;
            // The image side is the output, the column side the input.
            Ok(geom(out_channels, ho, wo, c, h, wd))
        }
    }
}

// ---------------------------------------------------------------------------- conv kernels

/// Unfold one group of one sample (`cg` planes of `h×w`) into `col`: `kdim` rows of `ho·wo`
/// values, row `r` starting at `r·ld` (so several samples can sit side by side in one
/// matrix), zeros where the kernel reads padding.
fn im2col<T: Element>(g: &Geom, x: &[T], col: &mut [T], ld: usize) {
    let (sp, wo, w) = (g.sp(), g.wo, g.w);
    let mut r = 0;
    for plane in x.chunks_exact(g.hw()).take(g.cg()) {
        for i in 0..g.kh {
            let (ylo, yhi) = valid_range(g.ho, g.h, g.sh, i * g.dh, g.ph);
            for j in 0..g.kw {
                let (xlo, xhi) = valid_range(g.wo, g.w, g.sw, j * g.dw, g.pw);
                let dst = &mut col[r * ld..r * ld + sp];
                r += 1;
                dst[..ylo * wo].fill(T::ZERO);
                dst[yhi * wo..].fill(T::ZERO);
                if g.sh == 1 && g.sw == 1 && wo == w && ylo < yhi && xlo < xhi {
                    // Output rows as long as input rows (a "same" convolution at stride 1):
                    // the taps of one kernel offset are the input shifted by a constant, so
                    // all valid rows are one copy, and the columns the shift wrapped into are
                    // zeroed after it (one copy per offset instead of one per output row; the
                    // short copies' calls took 6% of the `cnn` step).
                    let off = (i * g.dh) as isize - g.ph as isize;
                    let off = off * w as isize + (j * g.dw) as isize - g.pw as isize;
                    let (a, b) = (ylo * wo + xlo, (yhi - 1) * wo + xhi);
                    let src = (a as isize + off) as usize;
                    dst[a..b].copy_from_slice(&plane[src..src + (b - a)]);
                    for oy in ylo..yhi {
                        let (head, rest) = dst[oy * wo..(oy + 1) * wo].split_at_mut(xlo);
                        let tail = &mut rest[xhi - xlo..];
                        for v in head.iter_mut().chain(tail) {
                            *v = T::ZERO;
                        }
                    }
                    continue;
                }
                for oy in ylo..yhi {
                    let iy = oy * g.sh + i * g.dh - g.ph;
                    let src = &plane[iy * w..(iy + 1) * w];
                    let seg = &mut dst[oy * wo..(oy + 1) * wo];
                    seg[..xlo].fill(T::ZERO);
                    seg[xhi..].fill(T::ZERO);
                    if xlo == xhi {
                        continue;
                    }
                    let x0 = xlo * g.sw + j * g.dw - g.pw;
                    if g.sw == 1 {
                        seg[xlo..xhi].copy_from_slice(&src[x0..x0 + xhi - xlo]);
                    } else {
                        for (k, d) in seg[xlo..xhi].iter_mut().enumerate() {
                            *d = src[x0 + k * g.sw];
                        }
                    }
                }
            }
        }
    }
}

/// Fold `col` (laid out as [`im2col`] writes it, row stride `ld`) back onto one group of one
/// sample, summing overlaps: the adjoint of [`im2col`]. Adds to `x`.
fn col2im<T: Float>(g: &Geom, col: &[T], ld: usize, x: &mut [T]) {
    let (sp, wo, w) = (g.sp(), g.wo, g.w);
    let mut r = 0;
    for plane in x.chunks_exact_mut(g.hw()).take(g.cg()) {
        for i in 0..g.kh {
            let (ylo, yhi) = valid_range(g.ho, g.h, g.sh, i * g.dh, g.ph);
            for j in 0..g.kw {
                let (xlo, xhi) = valid_range(g.wo, g.w, g.sw, j * g.dw, g.pw);
                let src = &col[r * ld..r * ld + sp];
                r += 1;
                if xlo == xhi {
                    continue;
                }
                let x0 = xlo * g.sw + j * g.dw - g.pw;
                for oy in ylo..yhi {
                    let iy = oy * g.sh + i * g.dh - g.ph;
                    let dst = &mut plane[iy * w..(iy + 1) * w];
                    let seg = &src[oy * wo + xlo..oy * wo + xhi];
                    if g.sw == 1 {
                        for (d, &v) in dst[x0..x0 + seg.len()].iter_mut().zip(seg) {
                            *d += v;
                        }
                    } else {
                        for (k, &v) in seg.iter().enumerate() {
                            dst[x0 + k * g.sw] += v;
                        }
                    }
                }
            }
        }
    }
}

/// How many samples one GEMM covers: their column matrices side by side make one wide
/// product (far faster than one small GEMM per sample), capped near 4 MiB of f32 so the
/// columns stay in cache between im2col and packing (measured: 16 MiB took 9.1 ms for the
/// `cnn` workload's second convolution on one thread, 4 MiB 6.8 ms, 1 MiB 7.0 ms).
fn samples_per_gemm(g: &Geom, available: usize) -> usize {
    ((1 << 20) / (g.kdim() * g.sp()).max(1)).clamp(1, available.max(1))
}

/// Image side → column side: `x` `[n, c, h, w]`, `w` `[o, c/groups, kh, kw]`, optional bias
/// `[o]`; returns `[n, o, ho, wo]`. The columns of several samples sit side by side so that
/// each group is one wide GEMM `[og × kdim] · [kdim × samples·sp]`.
fn conv_forward<T: ConvFloat>(g: &Geom, x: &[T], w: &[T], bias: Option<&[T]>) -> Vec<T> {
    let (cg, og, kdim, hw, sp) = (g.cg(), g.og(), g.kdim(), g.hw(), g.sp());
    let (xlen, ylen) = (g.c * hw, g.o * sp);
    let mut out = vec![T::ZERO; g.n * ylen];
    for_batch(g.n, &mut out, false, |samples, block, parallel| {
        let per = samples_per_gemm(g, samples.len());
        with_scratch::<T, _>(kdim * per * sp, |col| {
            with_scratch::<T, _>(og * per * sp, |prod| {
                for first in samples.clone().step_by(per) {
                    let count = per.min(samples.end - first);
                    let ld = count * sp;
                    for gi in 0..g.groups {
                        for s in 0..count {
                            let n = first + s;
                            let xg = &x[n * xlen + gi * cg * hw..n * xlen + (gi + 1) * cg * hw];
                            im2col(g, xg, &mut col[s * sp..], ld);
                        }
                        let wg = &w[gi * og * kdim..(gi + 1) * og * kdim];
                        // SAFETY: A = wg (og×kdim, row-major), B = col (kdim×ld, row stride ld),
                        // C = prod (og×ld, row-major); the buffers hold at least those lengths and
                        // prod is distinct from both inputs.
                        unsafe {
                            T::gemm(
                                og,
                                ld,
                                kdim,
                                wg.as_ptr(),
                                kdim,
                                1,
                                col.as_ptr(),
                                ld,
                                1,
                                T::ZERO,
                                prod.as_mut_ptr(),
                                ld,
                                parallel,
                            )
                        }
                        // Scatter each sample's block (plus bias) into the output.
                        for s in 0..count {
                            let y = &mut block[(first + s - samples.start) * ylen..][..ylen];
                            for o in 0..og {
                                let row = &prod[o * ld + s * sp..o * ld + (s + 1) * sp];
                                let dst = &mut y[(gi * og + o) * sp..(gi * og + o + 1) * sp];
                                match bias {
                                    Some(b) => {
                                        let bv = b[gi * og + o];
                                        for (d, &v) in dst.iter_mut().zip(row) {
                                            *d = v + bv;
                                        }
                                    }
                                    None => dst.copy_from_slice(row),
                                }
                            }
                        }
                    }
                }
            })
        })
    });
    out
}

/// Column side → image side, and the weight gradient. With `need_dx`, returns
/// `col2im(Wᵀ · y)` `[n, c, h, w]` (needs `w`); with `x` (image side) given, also
/// `Σₙ y[n] · col(x[n])ᵀ` in the weight's layout `[o, c/groups, kh, kw]`. As in the forward
/// pass, several samples share each GEMM.
fn conv_backward<T: ConvFloat>(
    g: &Geom,
    x: Option<&[T]>,
    w: &[T],
    y: &[T],
    need_dx: bool,
) -> (Vec<T>, Option<Vec<T>>) {
    let (cg, og, kdim, hw, sp) = (g.cg(), g.og(), g.kdim(), g.hw(), g.sp());
    let (xlen, ylen) = (g.c * hw, g.o * sp);
    let mut dx = vec![T::ZERO; if need_dx { g.n * xlen } else { 0 }];
    let partials = for_batch(g.n, &mut dx, x.is_some(), |samples, block, parallel| {
        let per = samples_per_gemm(g, samples.len());
        let mut dw = x.map(|_| vec![T::ZERO; g.o * kdim]);
        with_scratch::<T, _>(kdim * per * sp, |col| {
            with_scratch::<T, _>(og * per * sp, |ys| {
                for first in samples.clone().step_by(per) {
                    let count = per.min(samples.end - first);
                    let ld = count * sp;
                    for gi in 0..g.groups {
                        // The samples' output gradients side by side: og × ld.
                        for s in 0..count {
                            let n = first + s;
                            for o in 0..og {
                                let src = &y[n * ylen + (gi * og + o) * sp..][..sp];
                                ys[o * ld + s * sp..o * ld + (s + 1) * sp].copy_from_slice(src);
                            }
                        }
                        if let (Some(x), Some(dw)) = (x, dw.as_mut()) {
                            for s in 0..count {
                                let n = first + s;
                                let xg = &x[n * xlen + gi * cg * hw..n * xlen + (gi + 1) * cg * hw];
                                im2col(g, xg, &mut col[s * sp..], ld);
                            }
                            let dwg = &mut dw[gi * og * kdim..(gi + 1) * og * kdim];
                            // SAFETY: A = ys (og×ld, row-major), B = colᵀ (ld×kdim: col is kdim×ld
                            // with row stride ld, read with row stride 1 and column stride ld),
                            // C = dwg (og×kdim, row-major); the buffers hold those lengths and dwg
                            // is a per-worker buffer distinct from both inputs.
                            unsafe {
                                T::gemm(
                                    og,
                                    kdim,
                                    ld,
                                    ys.as_ptr(),
                                    ld,
                                    1,
                                    col.as_ptr(),
                                    1,
                                    ld,
                                    T::ONE,
                                    dwg.as_mut_ptr(),
                                    kdim,
                                    parallel,
                                )
                            }
                        }
                        if need_dx {
                            let wg = &w[gi * og * kdim..(gi + 1) * og * kdim];
                            // SAFETY: A = wgᵀ (kdim×og: wg is og×kdim row-major, read with row stride
                            // 1 and column stride kdim), B = ys (og×ld, row-major), C = col (kdim×ld,
                            // row stride ld); lengths match and col is distinct from both inputs.
                            unsafe {
                                T::gemm(
                                    kdim,
                                    ld,
                                    og,
                                    wg.as_ptr(),
                                    1,
                                    kdim,
                                    ys.as_ptr(),
                                    ld,
                                    1,
                                    T::ZERO,
                                    col.as_mut_ptr(),
                                    ld,
                                    parallel,
                                )
                            }
                            for s in 0..count {
                                let k = first + s - samples.start;
                                let dxg = &mut block
                                    [k * xlen + gi * cg * hw..k * xlen + (gi + 1) * cg * hw];
                                col2im(g, &col[s * sp..], ld, dxg);
                            }
                        }
                    }
                }
            })
        });
        dw
    });
    let dw = partials.into_iter().reduce(|a, b| match (a, b) {
        (Some(mut a), Some(b)) => {
            for (s, v) in a.iter_mut().zip(b) {
                *s += v;
            }
            Some(a)
        }
        (a, _) => a,
    });
    (dx, dw.flatten())
}

/// Sum of `y` `[n, ch, plane]` over `n` and `plane`: the bias gradient.
fn bias_grad<T: Float>(y: &[T], ch: usize, plane: usize) -> Vec<T> {
    let mut db = vec![T::ZERO; ch];
    if plane == 0 {
        return db;
    }
    for (i, p) in y.chunks_exact(plane).enumerate() {
        db[i % ch] += crate::kernels::reduce::sum(p);
    }
    db
}

/// Add `b[c]` to every plane of channel `c` of `y` `[n, ch, plane]`.
fn add_bias<T: Float>(y: &mut [T], ch: usize, plane: usize, b: &[T]) {
    if plane == 0 {
        return;
    }
    for (i, p) in y.chunks_exact_mut(plane).enumerate() {
        let bv = b[i % ch];
        for v in p {
            *v += bv;
        }
    }
}

/// Run a convolution (`transposed`: read the geometry the other way) on 4-D `x` and `w`,
/// and record its backward.
fn conv_run(
    op: &'static str,
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    g: Geom,
    transposed: bool,
) -> Result<Tensor> {
    x.check_same_dtype(w, op)?;
    if let Some(b) = bias {
        x.check_same_dtype(b, op)?;
    }
    let dtype = x.dtype();
    let (xc, wc) = (plain(x, dtype)?, plain(w, dtype)?);
    let bc = bias.map(|b| plain(b, dtype)).transpose()?;
    let out_dims = if transposed {
        [g.n, g.c, g.h, g.w]
    } else {
        [g.n, g.o, g.ho, g.wo]
    };
    let out = float_dispatch!(op, dtype, T => {
        let mut ts = vec![&xc, &wc];
        ts.extend(bc.as_ref());
        let v = read_all::<T, _>(&ts, |s| {
            let b = s.get(2).copied();
            if transposed {
                let mut y = conv_backward(&g, None, s[1], s[0], true).0;
                if let Some(b) = b {
                    add_bias(&mut y, g.c, g.hw(), b);
                }
                y
            } else {
                conv_forward(&g, s[0], s[1], b)
            }
        });
        Tensor::from_buf(v, &out_dims)
    });
    let need_x = x.requires_grad();
    let need_w = w.requires_grad();
    let need_b = bias.is_some_and(|b| b.requires_grad());
    let x_saved = need_w.then(|| xc.detach());
    let w_saved = need_x.then(|| wc.detach());
    let mut inputs = vec![x, w];
    inputs.extend(bias);
    let (x_dims, w_dims) = (x.dims().to_vec(), w.dims().to_vec());
    let out_channels = out_dims[1];
    let has_bias = bias.is_some();
    Ok(out.with_grad(op, &inputs, move |gy| {
        let gy = plain(gy, dtype)?;
        float_dispatch!(op, dtype, T => {
            let mut ts = vec![&gy];
            ts.extend(x_saved.as_ref());
            ts.extend(w_saved.as_ref());
            let (dx, dw, db) = read_all::<T, _>(&ts, |s| {
                let gy = s[0];
                let xs = x_saved.as_ref().map(|_| s[1]);
                let ws = w_saved.as_ref().map(|_| s[s.len() - 1]).unwrap_or(&[]);
                let (dx, dw) = if transposed {
                    // The input is the column side; the output gradient the image side.
                    let dx = need_x.then(|| conv_forward(&g, gy, ws, None));
                    let dw = xs.and_then(|xs| conv_backward(&g, Some(gy), &[], xs, false).1);
                    (dx, dw)
                } else {
                    let (dx, dw) = conv_backward(&g, xs, ws, gy, need_x);
                    (need_x.then_some(dx), dw)
                };
                let plane = if transposed { g.hw() } else { g.sp() };
                let db = need_b.then(|| bias_grad(gy, out_channels, plane));
                (dx, dw, db)
            });
            let mut grads = vec![
                dx.map(|v| Tensor::from_buf(v, &x_dims)),
                dw.map(|v| Tensor::from_buf(v, &w_dims)),
            ];
            if has_bias {
                grads.push(db.map(|v| Tensor::from_buf(v, &[out_channels])));
            }
            Ok(grads)
        })
    }))
}

// ------------------------------------------------------------------------------------ pooling

/// A 2-D pooling window walk over `planes` planes of `h×w`.
#[derive(Clone, Copy, Debug)]
struct Pool {
    planes: usize,
    h: usize,
    w: usize,
    ho: usize,
    wo: usize,
    kh: usize,
    kw: usize,
    sh: usize,
    sw: usize,
    ph: usize,
    pw: usize,
    dh: usize,
    dw: usize,
}

/// Output length of a pooling along one axis (PyTorch's `pooling_output_shape`).
#[allow(clippy::too_many_arguments)]
fn pool_len(
    op: &'static str,
    shown: &[usize],
    len: usize,
    k: usize,
    s: usize,
    p: usize,
    d: usize,
    ceil_mode: bool,
) -> Result<usize> {
    let eff = d * (k - 1) + 1;
    if len + 2 * p < eff {
        return Err(Error::bad_shape(
            op,
            shown,
            format!(
                "kernel size {k} (dilation {d}) is larger than the padded input size {}",
                len + 2 * p
            ),
        ));
    }
    let extra = if ceil_mode { s - 1 } else { 0 };
    let mut out = (len + 2 * p - eff + extra) / s + 1;
    // The last window must start inside the input or its left padding.
    if ceil_mode && (out - 1) * s >= len + p {
        out -= 1;
    }
    Ok(out)
}

/// Check a 2-D pooling's arguments on a 4-D input and work out its geometry.
fn pool_geom(
    op: &'static str,
    x: &Tensor,
    kernel: (usize, usize),
    stride: (usize, usize),
    padding: (usize, usize),
    dilation: (usize, usize),
    ceil_mode: bool,
) -> Result<Pool> {
    check_rank(op, x, 4, "input [N, C, H, W]")?;
    check_positive(op, "kernel size", kernel)?;
    check_positive(op, "stride", stride)?;
    check_positive(op, "dilation", dilation)?;
    if padding.0 > kernel.0 / 2 || padding.1 > kernel.1 / 2 {
        return Err(Error::invalid(
            op,
            format!("padding {padding:?} must be at most half of the kernel size {kernel:?}"),
        ));
    }
    let d = x.dims();
    let ho = pool_len(
        op, d, d[2], kernel.0, stride.0, padding.0, dilation.0, ceil_mode,
    )?;
    let wo = pool_len(
        op, d, d[3], kernel.1, stride.1, padding.1, dilation.1, ceil_mode,
    )?;
    Ok(Pool {
        planes: d[0] * d[1],
        h: d[2],
        w: d[3],
        ho,
        wo,
        kh: kernel.0,
        kw: kernel.1,
        sh: stride.0,
        sw: stride.1,
        ph: padding.0,
        pw: padding.1,
        dh: dilation.0,
        dw: dilation.1,
    })
}

impl Pool {
    /// The common 2×2, stride-2 window with no padding or dilation, every window inside:
    /// windows that do not overlap, each input element in at most one.
    fn two_by_two(&self) -> bool {
        (
            self.kh, self.kw, self.sh, self.sw, self.ph, self.pw, self.dh, self.dw,
        ) == (2, 2, 2, 2, 0, 0, 1, 1)
            && 2 * self.ho <= self.h
            && 2 * self.wo <= self.w
    }
}

/// Max pooling: values and flat (per-plane `h·w`) argmax indices. Padding never wins; NaN
/// does, as in PyTorch.
fn max_pool_fwd<T: Float>(p: &Pool, x: &[T]) -> (Vec<T>, Vec<i64>) {
    let (po, hw) = (p.ho * p.wo, p.h * p.w);
    // Valid kernel offsets of each output row and column.
    let ys: Vec<(usize, usize)> = (0..p.ho)
        .map(|oy| valid_range(p.kh, p.h, p.dh, oy * p.sh, p.ph))
        .collect();
    let xs: Vec<(usize, usize)> = (0..p.wo)
        .map(|ox| valid_range(p.kw, p.w, p.dw, ox * p.sw, p.pw))
        .collect();
    // Written in full below: every output of every plane.
    let mut out = uninit_buf::<T>(p.planes * po);
    let mut idx = uninit_buf::<i64>(p.planes * po);
    let two_by_two = p.two_by_two();
    let body = |pl: usize, out: &mut [MaybeUninit<T>], idx: &mut [MaybeUninit<i64>]| {
        let xp = &x[pl * hw..(pl + 1) * hw];
        if two_by_two {
            let w = p.w as i64;
            with_simd(
                #[inline(always)]
                || {
                    for oy in 0..p.ho {
                        let (r0, r1) = (2 * oy * p.w, (2 * oy + 1) * p.w);
                        max_pool_2x2_row(
                            &xp[r0..r0 + 2 * p.wo],
                            &xp[r1..r1 + 2 * p.wo],
                            r0 as i64,
                            w,
                            &mut out[oy * p.wo..(oy + 1) * p.wo],
                            &mut idx[oy * p.wo..(oy + 1) * p.wo],
                        )
                    }
                },
            );
            return;
        }
        for (oy, &(ylo, yhi)) in ys.iter().enumerate() {
            for (ox, &(xlo, xhi)) in xs.iter().enumerate() {
                let (y0, x0) = (oy * p.sh, ox * p.sw);
                let mut best = T::NEG_INFINITY;
                let mut at = (y0 + ylo * p.dh - p.ph.min(y0 + ylo * p.dh)) * p.w
                    + (x0 + xlo * p.dw - p.pw.min(x0 + xlo * p.dw));
                for ky in ylo..yhi {
                    let iy = y0 + ky * p.dh - p.ph;
                    let row = &xp[iy * p.w..(iy + 1) * p.w];
                    for kx in xlo..xhi {
                        let ix = x0 + kx * p.dw - p.pw;
                        let v = row[ix];
                        // Selects, not branches: on real data the winner is unpredictable and
                        // mispredicted branches cost more than the whole comparison.
                        let take = (v > best) | v.is_nan();
                        best = if take { v } else { best };
                        at = if take { iy * p.w + ix } else { at };
                    }
                }
                out[oy * p.wo + ox].write(best);
                idx[oy * p.wo + ox].write(at as i64);
            }
        }
    };
    let work = p.planes * po * p.kh * p.kw;
    if work >= par_elemwise_min() && num_threads() > 1 && po > 0 {
        install(|| {
            out.par_chunks_mut(po)
                .zip(idx.par_chunks_mut(po))
                .enumerate()
                .for_each(|(pl, (o, i))| body(pl, o, i))
        });
    } else if po > 0 {
        for (pl, (o, i)) in out.chunks_mut(po).zip(idx.chunks_mut(po)).enumerate() {
            body(pl, o, i);
        }
    }
    // SAFETY: every plane's outputs and indices were written above (none when po == 0).
    unsafe { (assume_init(out), assume_init(idx)) }
}

/// One output row of a 2×2, stride-2 max pool: the windows over input rows `top` and
/// `bottom` (`2·o.len()` values each; `top` starts at flat index `r0` of its plane, rows `w`
/// apart). Row-major order within the window, the first maximum wins and a NaN wins (as
/// PyTorch); selects rather than branches over whole pairs of columns, so that under
/// [`with_simd`] the loop vectorises (the scalar loop took 8% of the `cnn` step).
#[inline(always)]
fn max_pool_2x2_row<T: Float>(
    top: &[T],
    bottom: &[T],
    r0: i64,
    w: i64,
    o: &mut [MaybeUninit<T>],
    ix: &mut [MaybeUninit<i64>],
) {
    let n = o.len();
    let (top, bottom, ix) = (&top[..2 * n], &bottom[..2 * n], &mut ix[..n]);
    for j in 0..n {
        let (a, b, c, d) = (top[2 * j], top[2 * j + 1], bottom[2 * j], bottom[2 * j + 1]);
        let (mut best, mut at) = (a, 0i64);
        for (v, off) in [(b, 1), (c, w), (d, w + 1)] {
            let take = (v > best) | v.is_nan();
            best = if take { v } else { best };
            at = if take { off } else { at };
        }
        o[j].write(best);
        ix[j].write(r0 + 2 * j as i64 + at);
    }
}

/// Max pooling backward: each output gradient goes to its argmax.
fn max_pool_bwd<T: Float>(p: &Pool, g: &[T], idx: &[i64]) -> Vec<T> {
    let (po, hw) = (p.ho * p.wo, p.h * p.w);
    let mut dx = vec![T::ZERO; p.planes * hw];
    for_planes(&mut dx, hw, p.planes * po, |pl, d| {
        let range = pl * po..(pl + 1) * po;
        for (&gv, &i) in g[range.clone()].iter().zip(&idx[range]) {
            d[i as usize] += gv;
        }
    });
    dx
}

/// One averaging window along an axis: input positions `lo..hi` and the window's size with
/// its padding counted.
type Win = (usize, usize, usize);

/// Windows of `avg_pool2d` along one axis.
fn avg_windows(out: usize, len: usize, k: usize, s: usize, p: usize) -> Vec<Win> {
    (0..out)
        .map(|o| {
            let start = (o * s) as isize - p as isize;
            let end = (start + k as isize).min((len + p) as isize);
            let lo = start.max(0) as usize;
            let hi = (end.min(len as isize) as usize).max(lo);
            (lo, hi, (end - start) as usize)
        })
        .collect()
}

/// Windows of `adaptive_avg_pool2d` along one axis: `floor(i·len/out) .. ceil((i+1)·len/out)`.
fn adaptive_windows(out: usize, len: usize) -> Vec<Win> {
    (0..out)
        .map(|i| {
            let lo = i * len / out;
            let hi = ((i + 1) * len).div_ceil(out);
            (lo, hi, hi - lo)
        })
        .collect()
}

/// An averaging pool: windows along each axis over `planes` planes of `h×w`.
#[derive(Clone, Debug)]
struct AvgPlan {
    planes: usize,
    h: usize,
    w: usize,
    ys: Vec<Win>,
    xs: Vec<Win>,
    include_pad: bool,
}

impl AvgPlan {
    fn divisor(&self, y: &Win, x: &Win) -> usize {
        let d = if self.include_pad {
            y.2 * x.2
        } else {
            (y.1 - y.0) * (x.1 - x.0)
        };
        d.max(1)
    }
    fn work(&self) -> usize {
        self.planes * (self.h * self.w).max(self.ys.len() * self.xs.len())
    }
}

fn avg_pool_fwd<T: Float>(a: &AvgPlan, x: &[T]) -> Vec<T> {
    let (hw, wo) = (a.h * a.w, a.xs.len());
    let po = a.ys.len() * wo;
    let mut out = vec![T::ZERO; a.planes * po];
    for_planes(&mut out, po, a.work(), |pl, o| {
        let xp = &x[pl * hw..(pl + 1) * hw];
        for (oy, y) in a.ys.iter().enumerate() {
            for (ox, xw) in a.xs.iter().enumerate() {
                let mut s = T::ZERO;
                for iy in y.0..y.1 {
                    for &v in &xp[iy * a.w + xw.0..iy * a.w + xw.1] {
                        s += v;
                    }
                }
                o[oy * wo + ox] = s / T::from_usize(a.divisor(y, xw));
            }
        }
    });
    out
}

fn avg_pool_bwd<T: Float>(a: &AvgPlan, g: &[T]) -> Vec<T> {
    let (hw, wo) = (a.h * a.w, a.xs.len());
    let po = a.ys.len() * wo;
    let mut dx = vec![T::ZERO; a.planes * hw];
    for_planes(&mut dx, hw, a.work(), |pl, d| {
        let gp = &g[pl * po..(pl + 1) * po];
        for (oy, y) in a.ys.iter().enumerate() {
            for (ox, xw) in a.xs.iter().enumerate() {
                let v = gp[oy * wo + ox] / T::from_usize(a.divisor(y, xw));
                for iy in y.0..y.1 {
                    for e in &mut d[iy * a.w + xw.0..iy * a.w + xw.1] {
                        *e += v;
                    }
                }
            }
        }
    });
    dx
}

/// Source index of each output position for nearest-neighbour resizing, as PyTorch's
/// `nearest_idx` computes it (in f32, `scale` = input/output size).
fn nearest_index(out: usize, len: usize, scale: f32) -> Vec<usize> {
    (0..out)
        .map(|d| {
            if out == len {
                d
            } else if out == 2 * len {
                d >> 1
            } else {
                ((d as f32 * scale).floor() as usize).min(len - 1)
            }
        })
        .collect()
}

// ------------------------------------------------------------------------------- public API

impl Tensor {
    /// 2-D convolution (PyTorch's `conv2d`, really cross-correlation) of an input
    /// `[N, C, H, W]` with `weight` `[O, C/groups, kh, kw]` and an optional `bias` `[O]`,
    /// giving `[N, O, Ho, Wo]` with `Ho = (H + 2·pad - dil·(kh-1) - 1) / stride + 1`.
    /// Differentiable w.r.t. input, weight and bias.
    ///
    /// ```
    /// use nerve_core::Tensor;
    /// let x = Tensor::ones([1, 1, 3, 3]);
    /// let w = Tensor::ones([1, 1, 2, 2]);
    /// let y = x.conv2d(&w, None, (1, 1), (0, 0), (1, 1), 1).unwrap();
    /// assert_eq!(y.to_vec::<f32>().unwrap(), vec![4.0; 4]);
    /// ```
    pub fn conv2d(
        &self,
        weight: &Tensor,
        bias: Option<&Tensor>,
        stride: (usize, usize),
        padding: (usize, usize),
        dilation: (usize, usize),
        groups: usize,
    ) -> Result<Tensor> {
        const OP: &str = "conv2d";
        check_rank(OP, self, 4, "input [N, C, H, W]")?;
        check_rank(OP, weight, 4, "weight [O, C/groups, kh, kw]")?;
        let bdims = bias.map(|b| b.dims());
        let g = conv_geom(
            OP,
            self.dims(),
            weight.dims(),
            bdims,
            stride,
            padding,
            dilation,
            groups,
            None,
        )?;
        conv_run(OP, self, weight, bias, g, false)
    }

    /// 1-D convolution (PyTorch's `conv1d`) of an input `[N, C, L]` with `weight`
    /// `[O, C/groups, k]` and an optional `bias` `[O]`, giving `[N, O, Lo]`. Differentiable
    /// w.r.t. input, weight and bias.
    pub fn conv1d(
        &self,
        weight: &Tensor,
        bias: Option<&Tensor>,
        stride: usize,
        padding: usize,
        dilation: usize,
        groups: usize,
    ) -> Result<Tensor> {
        const OP: &str = "conv1d";
        check_rank(OP, self, 3, "input [N, C, L]")?;
        check_rank(OP, weight, 3, "weight [O, C/groups, k]")?;
        let g = conv_geom(
            OP,
            self.dims(),
            weight.dims(),
            bias.map(|b| b.dims()),
            (1, stride),
            (0, padding),
            (1, dilation),
            groups,
            None,
        )?;
        conv_run(
            OP,
            &self.unsqueeze(2)?,
            &weight.unsqueeze(2)?,
            bias,
            g,
            false,
        )?
        .squeeze(2)
    }

    /// 2-D transposed convolution (PyTorch's `conv_transpose2d`, the gradient of `conv2d`
    /// w.r.t. its input) of an input `[N, C_in, H, W]` with `weight`
    /// `[C_in, C_out/groups, kh, kw]` and an optional `bias` `[C_out]`, giving
    /// `[N, C_out, Ho, Wo]` with `Ho = (H-1)·stride - 2·pad + dil·(kh-1) + output_padding + 1`.
    /// `output_padding` must be smaller than the stride or the dilation. Differentiable
    /// w.r.t. input, weight and bias.
    #[allow(clippy::too_many_arguments)]
    pub fn conv_transpose2d(
        &self,
        weight: &Tensor,
        bias: Option<&Tensor>,
        stride: (usize, usize),
        padding: (usize, usize),
        output_padding: (usize, usize),
        dilation: (usize, usize),
        groups: usize,
    ) -> Result<Tensor> {
        const OP: &str = "conv_transpose2d";
        check_rank(OP, self, 4, "input [N, C_in, H, W]")?;
        check_rank(OP, weight, 4, "weight [C_in, C_out/groups, kh, kw]")?;
        let g = conv_geom(
            OP,
            self.dims(),
            weight.dims(),
            bias.map(|b| b.dims()),
            stride,
            padding,
            dilation,
            groups,
            Some(output_padding),
        )?;
        conv_run(OP, self, weight, bias, g, true)
    }

    /// 1-D transposed convolution (PyTorch's `conv_transpose1d`) of an input `[N, C_in, L]`
    /// with `weight` `[C_in, C_out/groups, k]` and an optional `bias` `[C_out]`.
    #[allow(clippy::too_many_arguments)]
    pub fn conv_transpose1d(
        &self,
        weight: &Tensor,
        bias: Option<&Tensor>,
        stride: usize,
        padding: usize,
        output_padding: usize,
        dilation: usize,
        groups: usize,
    ) -> Result<Tensor> {
        const OP: &str = "conv_transpose1d";
        check_rank(OP, self, 3, "input [N, C_in, L]")?;
        check_rank(OP, weight, 3, "weight [C_in, C_out/groups, k]")?;
        let g = conv_geom(
            OP,
            self.dims(),
            weight.dims(),
            bias.map(|b| b.dims()),
            (1, stride),
            (0, padding),
            (1, dilation),
            groups,
            Some((0, output_padding)),
        )?;
        conv_run(
            OP,
            &self.unsqueeze(2)?,
            &weight.unsqueeze(2)?,
            bias,
            g,
            true,
        )?
        .squeeze(2)
    }

    /// 2-D max pooling (PyTorch's `max_pool2d`) of an input `[N, C, H, W]`; padding counts as
    /// -inf and must be at most half the kernel; `ceil_mode` rounds the output size up (the
    /// last window must still start inside the input or its left padding). Differentiable
    /// w.r.t. the input: the gradient goes to each window's argmax.
    pub fn max_pool2d(
        &self,
        kernel: (usize, usize),
        stride: (usize, usize),
        padding: (usize, usize),
        dilation: (usize, usize),
        ceil_mode: bool,
    ) -> Result<Tensor> {
        Ok(self
            .max_pool2d_with_indices(kernel, stride, padding, dilation, ceil_mode)?
            .0)
    }

    /// [`max_pool2d`](Tensor::max_pool2d) that also returns the argmax of every window as
    /// i64 indices flattened over `H·W` of its plane (PyTorch's `return_indices=True`).
    pub fn max_pool2d_with_indices(
        &self,
        kernel: (usize, usize),
        stride: (usize, usize),
        padding: (usize, usize),
        dilation: (usize, usize),
        ceil_mode: bool,
    ) -> Result<(Tensor, Tensor)> {
        const OP: &str = "max_pool2d";
        let p = pool_geom(OP, self, kernel, stride, padding, dilation, ceil_mode)?;
        let dtype = self.dtype();
        let in_dims = self.dims().to_vec();
        let out_dims = [in_dims[0], in_dims[1], p.ho, p.wo];
        let (vals, idx) = float_dispatch!(OP, dtype, T => {
            let x = plain(self, dtype)?;
            let (v, i) = read_all::<T, _>(&[&x], |s| max_pool_fwd(&p, s[0]));
            (Tensor::from_buf(v, &out_dims), Tensor::from_buf(i, &out_dims))
        });
        let saved = idx.clone();
        let vals = vals.with_grad(OP, &[self], move |g| {
            let g = plain(g, dtype)?;
            float_dispatch!(OP, dtype, T => {
                let dx = g.read2::<T, i64, _>(&saved, |gs, gl, is, il| {
                    let gs = &gs[gl.contiguous_range().expect("contiguous")];
                    let is = &is[il.contiguous_range().expect("contiguous")];
                    max_pool_bwd(&p, gs, is)
                });
                Ok(vec![Some(Tensor::from_buf(dx, &in_dims))])
            })
        });
        Ok((vals, idx))
    }

    /// 2-D average pooling (PyTorch's `avg_pool2d`) of an input `[N, C, H, W]`. Padding
    /// (at most half the kernel) adds zeros; `count_include_pad` divides by the window size
    /// with its padding, else by the number of input elements in it; `ceil_mode` rounds the
    /// output size up. Differentiable w.r.t. the input.
    pub fn avg_pool2d(
        &self,
        kernel: (usize, usize),
        stride: (usize, usize),
        padding: (usize, usize),
        ceil_mode: bool,
        count_include_pad: bool,
    ) -> Result<Tensor> {
        const OP: &str = "avg_pool2d";
        let p = pool_geom(OP, self, kernel, stride, padding, (1, 1), ceil_mode)?;
        let plan = AvgPlan {
            planes: p.planes,
            h: p.h,
            w: p.w,
            ys: avg_windows(p.ho, p.h, p.kh, p.sh, p.ph),
            xs: avg_windows(p.wo, p.w, p.kw, p.sw, p.pw),
            include_pad: count_include_pad,
        };
        self.avg_pool_run(OP, plan)
    }

    /// Adaptive 2-D average pooling (PyTorch's `adaptive_avg_pool2d`) of an input
    /// `[N, C, H, W]` to `[N, C, oh, ow]`: output row `i` averages input rows
    /// `floor(i·H/oh) .. ceil((i+1)·H/oh)`, and likewise for columns. Differentiable w.r.t.
    /// the input.
    pub fn adaptive_avg_pool2d(&self, output_size: (usize, usize)) -> Result<Tensor> {
        const OP: &str = "adaptive_avg_pool2d";
        check_rank(OP, self, 4, "input [N, C, H, W]")?;
        check_positive(OP, "output size", output_size)?;
        let d = self.dims();
        if d[2] == 0 || d[3] == 0 {
            return Err(Error::bad_shape(
                OP,
                d,
                "input height and width must be positive",
            ));
        }
        let plan = AvgPlan {
            planes: d[0] * d[1],
            h: d[2],
            w: d[3],
            ys: adaptive_windows(output_size.0, d[2]),
            xs: adaptive_windows(output_size.1, d[3]),
            include_pad: true,
        };
        self.avg_pool_run(OP, plan)
    }

    fn avg_pool_run(&self, op: &'static str, plan: AvgPlan) -> Result<Tensor> {
        let dtype = self.dtype();
        let in_dims = self.dims().to_vec();
        let out_dims = [in_dims[0], in_dims[1], plan.ys.len(), plan.xs.len()];
        let out = float_dispatch!(op, dtype, T => {
            let x = plain(self, dtype)?;
            let v = read_all::<T, _>(&[&x], |s| avg_pool_fwd(&plan, s[0]));
            Tensor::from_buf(v, &out_dims)
        });
        Ok(out.with_grad(op, &[self], move |g| {
            let g = plain(g, dtype)?;
            float_dispatch!(op, dtype, T => {
                let dx = read_all::<T, _>(&[&g], |s| avg_pool_bwd(&plan, s[0]));
                Ok(vec![Some(Tensor::from_buf(dx, &in_dims))])
            })
        }))
    }

    /// Nearest-neighbour resize (PyTorch's `interpolate(mode='nearest', size=...)`) of an
    /// input `[N, C, H, W]` to `[N, C, oh, ow]`: output row `i` copies input row
    /// `min(floor(i·H/oh), H-1)` (computed in f32 as PyTorch does), and likewise for columns.
    /// Differentiable w.r.t. the input.
    pub fn upsample_nearest2d(&self, output_size: (usize, usize)) -> Result<Tensor> {
        const OP: &str = "upsample_nearest2d";
        check_rank(OP, self, 4, "input [N, C, H, W]")?;
        let d = self.dims();
        let scales = (
            d[2] as f32 / output_size.0.max(1) as f32,
            d[3] as f32 / output_size.1.max(1) as f32,
        );
        self.nearest_run(OP, output_size, scales)
    }

    /// Nearest-neighbour resize by `scale_factor` (PyTorch's
    /// `interpolate(mode='nearest', scale_factor=...)`): the output size is
    /// `floor(H·scale)`, and output row `i` copies input row `floor(i / scale)`.
    pub fn interpolate_nearest(&self, scale_factor: (f64, f64)) -> Result<Tensor> {
        const OP: &str = "interpolate_nearest";
        check_rank(OP, self, 4, "input [N, C, H, W]")?;
        if !(scale_factor.0 > 0.0 && scale_factor.1 > 0.0) {
            return Err(Error::invalid(
                OP,
                format!("scale_factor must be positive, got {scale_factor:?}"),
            ));
        }
        let d = self.dims();
        let size = (
            (d[2] as f64 * scale_factor.0).floor() as usize,
            (d[3] as f64 * scale_factor.1).floor() as usize,
        );
        let scales = ((1.0 / scale_factor.0) as f32, (1.0 / scale_factor.1) as f32);
        self.nearest_run(OP, size, scales)
    }

    fn nearest_run(
        &self,
        op: &'static str,
        size: (usize, usize),
        scales: (f32, f32),
    ) -> Result<Tensor> {
        let d = self.dims().to_vec();
        if size.0 == 0 || size.1 == 0 || d[2] == 0 || d[3] == 0 {
            return Err(Error::bad_shape(
                op,
                &d,
                format!("input and output sizes must be positive, output {size:?}"),
            ));
        }
        let (h, w) = (d[2], d[3]);
        let sy = nearest_index(size.0, h, scales.0);
        let sx = nearest_index(size.1, w, scales.1);
        let (po, hw, planes) = (size.0 * size.1, h * w, d[0] * d[1]);
        let dtype = self.dtype();
        let out_dims = [d[0], d[1], size.0, size.1];
        let out = float_dispatch!(op, dtype, T => {
            let x = plain(self, dtype)?;
            let v = read_all::<T, _>(&[&x], |s| {
                let mut out = vec![T::ZERO; planes * po];
                for_planes(&mut out, po, planes * po, |pl, o| {
                    let xp = &s[0][pl * hw..(pl + 1) * hw];
                    for (row, &y) in o.chunks_exact_mut(size.1).zip(&sy) {
                        for (e, &x) in row.iter_mut().zip(&sx) {
                            *e = xp[y * w + x];
                        }
                    }
                });
                out
            });
            Tensor::from_buf(v, &out_dims)
        });
        Ok(out.with_grad(op, &[self], move |g| {
            let g = plain(g, dtype)?;
            float_dispatch!(op, dtype, T => {
                let dx = read_all::<T, _>(&[&g], |s| {
                    let mut dx = vec![T::ZERO; planes * hw];
                    for_planes(&mut dx, hw, planes * po, |pl, dp| {
                        let gp = &s[0][pl * po..(pl + 1) * po];
                        for (row, &y) in gp.chunks_exact(size.1).zip(&sy) {
                            for (&v, &x) in row.iter().zip(&sx) {
                                dp[y * w + x] += v;
                            }
                        }
                    });
                    dx
                });
                Ok(vec![Some(Tensor::from_buf(dx, &d))])
            })
        }))
    }
}
