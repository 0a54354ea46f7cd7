//! Fused scaled dot-product attention, forward and backward, one (batch, head) item at a time.
//!
//! Each item's scores `[L, S]` are produced by a GEMM, masked, soft-maxed and multiplied by
//! `V` while they are still in the core's cache; the backward pass likewise turns `dP` into
//! `dS` in place between its GEMMs. Items run in parallel, each on one thread (the products
//! are small), or one after another with threaded GEMMs when there are fewer items than
//! threads. Compared with a graph of tensor ops this saves some ten passes over `[B, H, L, S]`
//! tensors in memory.
//!
//! Layouts (row-major, contiguous): `q` `[N, L, E]`, `k` `[N, S, E]`, `v` `[N, S, Ev]`, the
//! probabilities `p` `[N, L, S]`, the output `[N, L, Ev]`, for `N` items.

use rayon::prelude::*;

use super::gemm::{gemm, GemmFloat, GEMM_PAR_MIN};
use super::{assume_init, reduce, uninit_buf, with_scratch, with_simd, SendPtr};
use crate::threading::{install, num_threads};

/// Sizes of one attention call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttnDims {
    /// Items (batch × heads).
    pub items: usize,
    /// Queries per item `L`.
    pub l: usize,
    /// Keys per item `S`.
    pub s: usize,
    /// Query/key width `E`.
    pub e: usize,
    /// Value width `Ev`.
    pub ev: usize,
}

/// Run `f(item, parallel_gemm)` for every item: items in parallel when there are enough of
/// them for every thread and each is small, else one after another with threaded GEMMs.
fn for_items(dims: AttnDims, f: impl Fn(usize, bool) + Sync) {
    let threads = num_threads();
    let per_item = dims.l * dims.s * dims.e.max(dims.ev);
    if threads > 1 && dims.items >= threads && per_item < GEMM_PAR_MIN {
        install(|| (0..dims.items).into_par_iter().for_each(|i| f(i, false)));
    } else {
        (0..dims.items).for_each(|i| f(i, true));
    }
}

/// `C (m×n, row stride ldc) = alpha · A·B` with A, B given by pointer and strides.
///
/// # Safety
/// As [`gemm`].
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn mm<T: GemmFloat>(
    (m, n, k): (usize, usize, usize),
    alpha: T,
    (a, rsa, csa): (*const T, usize, usize),
    (b, rsb, csb): (*const T, usize, usize),
    (c, ldc): (*mut T, usize),
    parallel: bool,
) {
    // SAFETY: forwarded contract.
    unsafe {
        gemm::<T>(
            m,
            n,
            k,
            alpha,
            a,
            rsa as isize,
            csa as isize,
            b,
            rsb as isize,
            csb as isize,
            T::ZERO,
            c,
            ldc as isize,
            1,
            parallel,
        )
    }
}

/// Row `i` of the scores, in place: keys after `i` blocked when `causal`, then softmax.
#[inline(always)]
fn softmax_row<T: GemmFloat>(row: &mut [T], i: usize, causal: bool) {
    let n = if causal {
        (i + 1).min(row.len())
    } else {
        row.len()
    };
    let (live, blocked) = row.split_at_mut(n);
    blocked.fill(T::ZERO);
    let m = reduce::max(live);
    let mut sum = T::ZERO;
    for v in live.iter_mut() {
        *v = (*v - m).exp();
    }
    for &v in live.iter() {
        sum += v;
    }
    let inv = T::ONE / sum;
    for v in live.iter_mut() {
        *v *= inv;
    }
}

/// Forward: returns the probabilities `p` (`softmax(q kᵀ · scale)`, keys after the query's
/// index blocked when `causal`, i.e. PyTorch's `is_causal`) and the output `p v`.
///
/// # Panics
/// If a slice's length does not match `dims`.
pub fn attention_forward<T: GemmFloat>(
    dims: AttnDims,
    q: &[T],
    k: &[T],
    v: &[T],
    scale: T,
    causal: bool,
) -> (Vec<T>, Vec<T>) {
    let AttnDims { items, l, s, e, ev } = dims;
    assert!(
        q.len() == items * l * e && k.len() == items * s * e,
        "attention: sizes"
    );
    assert!(v.len() == items * s * ev, "attention: sizes");
    // Written in full below: every item's GEMMs (beta = 0) and row pass.
    let (mut p, mut out) = (
        uninit_buf::<T>(items * l * s),
        uninit_buf::<T>(items * l * ev),
    );
    let (pp, po) = (
        SendPtr(p.as_mut_ptr().cast::<T>()),
        SendPtr(out.as_mut_ptr().cast::<T>()),
    );
    for_items(dims, |i, par| {
        let (qi, ki, vi) = (&q[i * l * e..], &k[i * s * e..], &v[i * s * ev..]);
        // SAFETY: item i's blocks of p and out are written by this task only; the inputs
        // are read inside their slices (q_i: l×e, k_iᵀ: e×s, p_i: l×s, v_i: s×ev).
        unsafe {
            let pi = pp.get().add(i * l * s);
            mm(
                (l, s, e),
                scale,
                (qi.as_ptr(), e, 1),
                (ki.as_ptr(), 1, e),
                (pi, s),
                par,
            );
            let rows = std::slice::from_raw_parts_mut(pi, l * s);
            with_simd(
                #[inline(always)]
                || {
                    for (r, row) in rows.chunks_exact_mut(s).enumerate() {
                        softmax_row(row, r, causal);
                    }
                },
            );
            let oi = po.get().add(i * l * ev);
            mm(
                (l, ev, s),
                T::ONE,
                (pi, s, 1),
                (vi.as_ptr(), ev, 1),
                (oi, ev),
                par,
            );
        }
    });
    // SAFETY: every item wrote its whole blocks of p and out.
    unsafe { (assume_init(p), assume_init(out)) }
}

/// Backward of [`attention_forward`]: from the probabilities `p` and the output gradient
/// `g` `[N, L, Ev]`, returns `dq`, `dk` and `dv`.
///
/// # Panics
/// If a slice's length does not match `dims`.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward<T: GemmFloat>(
    dims: AttnDims,
    q: &[T],
    k: &[T],
    v: &[T],
    p: &[T],
    g: &[T],
    scale: T,
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let AttnDims { items, l, s, e, ev } = dims;
    assert!(
        q.len() == items * l * e && k.len() == items * s * e,
        "attention: sizes"
    );
    assert!(
        v.len() == items * s * ev && p.len() == items * l * s,
        "attention: sizes"
    );
    assert!(g.len() == items * l * ev, "attention: sizes");
    // Written in full by each item's GEMMs (beta = 0).
    let (mut dq, mut dk, mut dv) = (
        uninit_buf::<T>(q.len()),
        uninit_buf::<T>(k.len()),
        uninit_buf::<T>(v.len()),
    );
    let (pq, pk, pv) = (
        SendPtr(dq.as_mut_ptr().cast::<T>()),
        SendPtr(dk.as_mut_ptr().cast::<T>()),
        SendPtr(dv.as_mut_ptr().cast::<T>()),
    );
    for_items(dims, |i, par| {
        let (qi, ki, vi) = (&q[i * l * e..], &k[i * s * e..], &v[i * s * ev..]);
        let (pi, gi) = (&p[i * l * s..(i + 1) * l * s], &g[i * l * ev..]);
        with_scratch::<T, _>(l * s, |ds| {
            // SAFETY: item i's blocks of dq, dk and dv are written by this task only; the
            // inputs are read inside their slices; ds is l×s.
            unsafe {
                // dv = pᵀ g
                let dvi = pv.get().add(i * s * ev);
                mm(
                    (s, ev, l),
                    T::ONE,
                    (pi.as_ptr(), 1, s),
                    (gi.as_ptr(), ev, 1),
                    (dvi, ev),
                    par,
                );
                // dp = g vᵀ, then ds = p ⊙ (dp − Σ_j dp ⊙ p) · scale in place.
                let dsp = ds.as_mut_ptr();
                mm(
                    (l, s, ev),
                    T::ONE,
                    (gi.as_ptr(), ev, 1),
                    (vi.as_ptr(), 1, ev),
                    (dsp, s),
                    par,
                );
                with_simd(
                    #[inline(always)]
                    || {
                        for (d, pr) in ds.chunks_exact_mut(s).zip(pi.chunks_exact(s)) {
                            let mut dot = T::ZERO;
                            for (&a, &b) in d.iter().zip(pr) {
                                dot += a * b;
                            }
                            for (a, &b) in d.iter_mut().zip(pr) {
                                *a = b * (*a - dot) * scale;
                            }
                        }
                    },
                );
                // dq = ds k, dk = dsᵀ q
                let dqi = pq.get().add(i * l * e);
                mm(
                    (l, e, s),
                    T::ONE,
                    (dsp, s, 1),
                    (ki.as_ptr(), e, 1),
                    (dqi, e),
                    par,
                );
                let dki = pk.get().add(i * s * e);
                mm(
                    (s, e, l),
                    T::ONE,
                    (dsp, 1, s),
                    (qi.as_ptr(), e, 1),
                    (dki, e),
                    par,
                );
            }
        });
    });
    // SAFETY: every item wrote its whole blocks of dq, dk and dv.
    unsafe { (assume_init(dq), assume_init(dk), assume_init(dv)) }
}
