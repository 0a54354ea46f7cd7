//! Element-wise maps over strided, broadcast operands into a fresh contiguous buffer.

use rayon::prelude::*;

use super::strided::Runs;
use std::mem::MaybeUninit;

use super::{assume_init, uninit_buf, with_simd};
use crate::dtype::Element;
use crate::layout::Layout;
use crate::threading::{chunk_len, install, num_threads, par_elemwise_min};

/// Relative cost of an element-wise function, which lowers the parallel threshold.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cost {
    /// A few arithmetic instructions (add, mul, compare, copy).
    Cheap,
    /// A polynomial (exp, tanh, erf, ...).
    Transcendental,
}

impl Cost {
    fn min_parallel(self) -> usize {
        match self {
            Cost::Cheap => par_elemwise_min(),
            Cost::Transcendental => par_elemwise_min() / 8,
        }
    }
}

/// Fill `out` by calling `body(chunk, start)` on disjoint chunks, in parallel when large.
#[inline(always)]
pub fn fill<U: Send>(
    out: &mut [MaybeUninit<U>],
    cost: Cost,
    body: impl Fn(&mut [MaybeUninit<U>], usize) + Sync,
) {
    let n = out.len();
    if n >= cost.min_parallel() && num_threads() > 1 {
        let chunk = chunk_len(n, cost.min_parallel() / 2);
        install(|| {
            out.par_chunks_mut(chunk).enumerate().for_each(|(i, c)| {
                with_simd(
                    #[inline(always)]
                    || body(c, i * chunk),
                )
            })
        });
    } else {
        with_simd(
            #[inline(always)]
            || body(out, 0),
        );
    }
}

/// `f` applied to every element of a strided view, into a contiguous buffer.
#[inline(always)]
pub fn unary<T: Element, U: Element>(
    src: &[T],
    l: &Layout,
    cost: Cost,
    f: impl Fn(T) -> U + Sync + Copy,
) -> Vec<U> {
    let mut out = uninit_buf::<U>(l.numel());
    let runs = Runs::new(l.dims(), [(l.strides(), l.offset())]);
    let [s] = runs.inner_strides();
    fill(
        &mut out,
        cost,
        #[inline(always)]
        |chunk, start| {
            runs.for_each(
                start,
                start + chunk.len(),
                #[inline(always)]
                |pos, len, [o]| {
                    let dst = &mut chunk[pos - start..pos - start + len];
                    if s == 1 {
                        for (d, &x) in dst.iter_mut().zip(&src[o..o + len]) {
                            d.write(f(x));
                        }
                    } else {
                        for (i, d) in dst.iter_mut().enumerate() {
                            d.write(f(src[o + i * s]));
                        }
                    }
                },
            )
        },
    );
    // SAFETY: the runs cover every position of the output exactly once.
    unsafe { assume_init(out) }
}

/// `f` applied element-wise to two views of the same shape (broadcast beforehand, so strides
/// may be 0), into a contiguous buffer.
#[inline(always)]
pub fn binary<T: Element, V: Element, U: Element>(
    a: &[T],
    la: &Layout,
    b: &[V],
    lb: &Layout,
    cost: Cost,
    f: impl Fn(T, V) -> U + Sync + Copy,
) -> Vec<U> {
    debug_assert_eq!(la.dims(), lb.dims());
    let mut out = uninit_buf::<U>(la.numel());
    let runs = Runs::new(
        la.dims(),
        [(la.strides(), la.offset()), (lb.strides(), lb.offset())],
    );
    let [sa, sb] = runs.inner_strides();
    fill(
        &mut out,
        cost,
        #[inline(always)]
        |chunk, start| {
            runs.for_each(
                start,
                start + chunk.len(),
                #[inline(always)]
                |pos, len, [oa, ob]| {
                    let dst = &mut chunk[pos - start..pos - start + len];
                    match (sa, sb) {
                        (1, 1) => {
                            for ((d, &x), &y) in
                                dst.iter_mut().zip(&a[oa..oa + len]).zip(&b[ob..ob + len])
                            {
                                d.write(f(x, y));
                            }
                        }
                        (1, 0) => {
                            let y = b[ob];
                            for (d, &x) in dst.iter_mut().zip(&a[oa..oa + len]) {
                                d.write(f(x, y));
                            }
                        }
                        (0, 1) => {
                            let x = a[oa];
                            for (d, &y) in dst.iter_mut().zip(&b[ob..ob + len]) {
                                d.write(f(x, y));
                            }
                        }
                        _ => {
                            for (i, d) in dst.iter_mut().enumerate() {
                                d.write(f(a[oa + i * sa], b[ob + i * sb]));
                            }
                        }
                    }
                },
            )
        },
    );
    // SAFETY: the runs cover every position of the output exactly once.
    unsafe { assume_init(out) }
}

/// `f` applied element-wise to three views of the same shape (e.g. `where`).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn ternary<A: Element, B: Element, C: Element, U: Element>(
    a: &[A],
    la: &Layout,
    b: &[B],
    lb: &Layout,
    c: &[C],
    lc: &Layout,
    f: impl Fn(A, B, C) -> U + Sync + Copy,
) -> Vec<U> {
    let mut out = uninit_buf::<U>(la.numel());
    let runs = Runs::new(
        la.dims(),
        [
            (la.strides(), la.offset()),
            (lb.strides(), lb.offset()),
            (lc.strides(), lc.offset()),
        ],
    );
    let [sa, sb, sc] = runs.inner_strides();
    fill(
        &mut out,
        Cost::Transcendental,
        #[inline(always)]
        |chunk, start| {
            runs.for_each(
                start,
                start + chunk.len(),
                #[inline(always)]
                |pos, len, [oa, ob, oc]| {
                    let dst = &mut chunk[pos - start..pos - start + len];
                    if (sa, sb, sc) == (1, 1, 1) {
                        let (a, b, c) = (&a[oa..oa + len], &b[ob..ob + len], &c[oc..oc + len]);
                        for i in 0..len {
                            dst[i].write(f(a[i], b[i], c[i]));
                        }
                    } else {
                        for (i, d) in dst.iter_mut().enumerate() {
                            d.write(f(a[oa + i * sa], b[ob + i * sb], c[oc + i * sc]));
                        }
                    }
                },
            )
        },
    );
    // SAFETY: the runs cover every position of the output exactly once.
    unsafe { assume_init(out) }
}
