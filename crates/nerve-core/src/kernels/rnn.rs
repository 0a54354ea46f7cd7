//! Fused LSTM time loops, forward and backward.
//!
//! With enough batch rows every thread owns a range of rows and runs the whole sequence for
//! them alone (the rows of an LSTM are independent): one fork-join per loop. With fewer rows
//! each time step is one fork-join in which every thread owns a range of hidden units: it
//! multiplies the previous `h` by its columns of the recurrent weight (packed once per
//! sequence, see [`PackedB`], so the weight stays in the thread's cache from step to step)
//! and applies the cell to its units right away; the next step starts when every thread has
//! written its part of `h`. Either way the step's GEMM and its gate math need no barrier
//! between them.
//!
//! Layouts (row-major): pre-activations and gates `[T, B, 4H]` with the gates i, f, g, o in
//! contiguous blocks of `H` (PyTorch's order), states `[T, B, H]` or `[B, H]`, the recurrent
//! weight `W_hh` `[4H, H]` as PyTorch stores it.

use std::ops::Range;

use rayon::prelude::*;

use super::gemm::{GemmFloat, PackedB, GEMM_PAR_MIN};
use super::{assume_init, uninit_buf, with_simd, SendPtr};
use crate::dtype::Float;
use crate::threading::{install, num_threads};

/// Sizes of one LSTM layer-direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LstmDims {
    /// Time steps `T`.
    pub steps: usize,
    /// Batch rows `B`.
    pub batch: usize,
    /// Hidden units `H`.
    pub hidden: usize,
}

/// What [`lstm_forward`] keeps for [`lstm_backward`].
pub struct LstmTape<T> {
    /// The gates after their activations, `[T, B, 4H]`.
    pub gates: Vec<T>,
    /// tanh of each step's new cell, `[T, B, H]`.
    pub tanh_c: Vec<T>,
    /// The cell before each step, `[T, B, H]`.
    pub c_prev: Vec<T>,
}

#[inline(always)]
fn sigmoid<T: Float>(x: T) -> T {
    T::ONE / (T::ONE + (-x).exp())
}

/// The time index of the `step`-th step processed.
fn time(dims: LstmDims, reverse: bool, step: usize) -> usize {
    if reverse {
        dims.steps - 1 - step
    } else {
        step
    }
}

/// Hidden-unit ranges, one per thread, starting at multiples of `nr`.
fn unit_parts(dims: LstmDims, nr: usize) -> Vec<Range<usize>> {
    let hs = dims.hidden;
    let chunks = hs.div_ceil(nr).max(1);
    let parts = if dims.batch * 4 * hs * hs >= GEMM_PAR_MIN {
        num_threads().min(chunks)
    } else {
        1
    };
    (0..parts)
        .map(|p| (p * chunks / parts * nr).min(hs)..((p + 1) * chunks / parts * nr).min(hs))
        .collect()
}

/// How the time loops share the work between threads.
enum Split {
    /// Each thread owns a range of batch rows and runs the whole sequence for them, with no
    /// synchronisation between steps (the rows of an LSTM are independent); every thread
    /// reads all of `W_hh` at every step (from its L2/L3 cache).
    Rows(Vec<Range<usize>>),
    /// Each thread owns a range of hidden units (its columns of `W_hh`, which stay in its
    /// cache); the threads meet after every step, whose `h` they all read.
    Units(Vec<Range<usize>>),
}

/// Fewest batch rows per thread for [`Split::Rows`]: one micro-panel of the GEMM (fewer
/// would multiply padded rows).
const ROWS_PER_THREAD_MIN: usize = 8;

/// The split for `dims` on this pool, with GEMM column panels of width `nr`.
///
/// Rows when every thread gets at least [`ROWS_PER_THREAD_MIN`] rows: on the `lstm`
/// workload (batch 32, hidden 256, 2 threads; `lstm_parts` example) this took the forward
/// loop from 3.75 to 3.39 ms and the backward from 3.56 to 3.19 ms against units, whose
/// meeting after every step and exchange of `h` between cores cost more than reading all of
/// `W_hh` (1 MiB packed) from cache at every step.
fn split(dims: LstmDims, nr: usize) -> Split {
    let threads = num_threads();
    if threads > 1
        && dims.batch * 4 * dims.hidden * dims.hidden >= GEMM_PAR_MIN
        && dims.batch >= threads * ROWS_PER_THREAD_MIN
    {
        let b = dims.batch;
        return Split::Rows(
            (0..threads)
                .map(|p| p * b / threads..(p + 1) * b / threads)
                .collect(),
        );
    }
    Split::Units(unit_parts(dims, nr))
}

/// Rows per GEMM of a step under `split` (for the micro-kernel choice).
fn rows_per_part(split: &Split, batch: usize) -> usize {
    match split {
        Split::Rows(parts) => parts.iter().map(|r| r.len()).max().unwrap_or(batch),
        Split::Units(_) => batch,
    }
}

/// Run `f` on every part, in parallel when there are several (inside the kernel pool).
fn for_parts(parts: &[Range<usize>], f: impl Fn(Range<usize>) + Sync) {
    if parts.len() > 1 {
        parts.par_iter().for_each(|r| f(r.clone()));
    } else {
        f(parts[0].clone());
    }
}

/// Ask the caches for the `n` elements at `p` (a hint: any address is allowed). The time
/// loops fetch the next step's operands this way while the current step computes: each
/// thread reads its units of every row, runs of a few hundred bytes that the hardware
/// prefetchers do not pick up.
#[inline(always)]
fn prefetch<T>(p: *const T, n: usize) {
    #[cfg(target_arch = "x86_64")]
    for off in (0..n * std::mem::size_of::<T>()).step_by(64) {
        // SAFETY: a prefetch never faults and reads nothing; the address is computed with
        // wrapping arithmetic, so it need not be inside an allocation.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T1 }>(
                p.cast::<i8>().wrapping_add(off),
            )
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (p, n);
}

/// `n` elements at `p`, as a shared slice.
///
/// # Safety
/// The elements must be initialised and not written by anyone while the slice lives.
#[inline(always)]
unsafe fn view<'a, T>(p: *const T, n: usize) -> &'a [T] {
    // SAFETY: forwarded contract.
    unsafe { std::slice::from_raw_parts(p, n) }
}

/// `n` elements at `p`, as an exclusive slice.
///
/// # Safety
/// The elements must be initialised and touched by no one else while the slice lives.
#[inline(always)]
unsafe fn view_mut<'a, T>(p: *mut T, n: usize) -> &'a mut [T] {
    // SAFETY: forwarded contract.
    unsafe { std::slice::from_raw_parts_mut(p, n) }
}

/// One row's units of a forward step: gates from the pre-activations `x + hp`, the cell `c`
/// updated in place (its old value saved in `c_prev`), `h` written.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn cell_forward<T: Float>(
    x: [&[T]; 4],
    hp: [&[T]; 4],
    bias: [&[T]; 4],
    c: &mut [T],
    c_prev: &mut [T],
    gates: [&mut [T]; 4],
    tanh_c: &mut [T],
    h: &mut [T],
) {
    let n = c.len();
    let (xi, xf, xg, xo) = (&x[0][..n], &x[1][..n], &x[2][..n], &x[3][..n]);
    let (pi, pf, pg, po) = (&hp[0][..n], &hp[1][..n], &hp[2][..n], &hp[3][..n]);
    let (bi, bf, bg, bo) = (&bias[0][..n], &bias[1][..n], &bias[2][..n], &bias[3][..n]);
    let [gi, gf, gg, go] = gates;
    let (gi, gf, gg, go) = (&mut gi[..n], &mut gf[..n], &mut gg[..n], &mut go[..n]);
    let (c_prev, tanh_c, h) = (&mut c_prev[..n], &mut tanh_c[..n], &mut h[..n]);
    for j in 0..n {
        let i = sigmoid(xi[j] + pi[j] + bi[j]);
        let f = sigmoid(xf[j] + pf[j] + bf[j]);
        let g = (xg[j] + pg[j] + bg[j]).tanh();
        let o = sigmoid(xo[j] + po[j] + bo[j]);
        let cp = c[j];
        let cn = f * cp + i * g;
        let t = cn.tanh();
        (gi[j], gf[j], gg[j], go[j]) = (i, f, g, o);
        c_prev[j] = cp;
        c[j] = cn;
        tanh_c[j] = t;
        h[j] = o * t;
    }
}

/// One row's units of a backward step: from the saved gates, tanh(c) and previous cell, the
/// output gradient `gh` plus the recurrent `dh`, and the carried `dc` (updated in place to the
/// previous step's), the pre-activation gradients `da`.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn cell_backward<T: Float>(
    gates: [&[T]; 4],
    tanh_c: &[T],
    c_prev: &[T],
    gh: &[T],
    dh: &[T],
    dc: &mut [T],
    da: [&mut [T]; 4],
    db: [&mut [T]; 4],
) {
    let n = dc.len();
    let (gi, gf, gg, go) = (
        &gates[0][..n],
        &gates[1][..n],
        &gates[2][..n],
        &gates[3][..n],
    );
    let (tanh_c, c_prev, gh, dh) = (&tanh_c[..n], &c_prev[..n], &gh[..n], &dh[..n]);
    let [di, df, dg, dout] = da;
    let (di, df, dg, dout) = (&mut di[..n], &mut df[..n], &mut dg[..n], &mut dout[..n]);
    let [bi, bf, bg, bo] = db;
    let (bi, bf, bg, bo) = (&mut bi[..n], &mut bf[..n], &mut bg[..n], &mut bo[..n]);
    for j in 0..n {
        let (i, f, g, o, t) = (gi[j], gf[j], gg[j], go[j], tanh_c[j]);
        let d_h = gh[j] + dh[j];
        let dct = dc[j] + d_h * o * (T::ONE - t * t);
        let (a_i, a_f) = (
            dct * g * i * (T::ONE - i),
            dct * c_prev[j] * f * (T::ONE - f),
        );
        let (a_g, a_o) = (dct * i * (T::ONE - g * g), d_h * t * o * (T::ONE - o));
        (di[j], df[j], dg[j], dout[j]) = (a_i, a_f, a_g, a_o);
        bi[j] += a_i;
        bf[j] += a_f;
        bg[j] += a_g;
        bo[j] += a_o;
        dc[j] = dct * f;
    }
}

/// The forward time loop: from the input projections `xp` `[T, B, 4H]`, the bias `[4H]`
/// (PyTorch's `b_ih + b_hh`, added here rather than in a pass over `xp`), `W_hh` `[4H, H]`,
/// `h0` `[B, H]` and the cell `c` `[B, H]` (the initial cell in, the final cell out), returns
/// every step's `h` `[T, B, H]` (in time order; with `reverse` the steps run from the last time
/// index to the first; the vector has room for two more `[B, H]` blocks, the final `h` and `c`
/// the caller may append) and the tape.
///
/// # Panics
/// If a slice's length does not match `dims`.
#[allow(clippy::too_many_arguments)]
pub fn lstm_forward<T: GemmFloat>(
    dims: LstmDims,
    reverse: bool,
    xp: &[T],
    bias: &[T],
    w_hh: &[T],
    h0: &[T],
    c: &mut [T],
) -> (Vec<T>, LstmTape<T>) {
    let LstmDims {
        steps,
        batch: b,
        hidden: hs,
    } = dims;
    let (h4, bh) = (4 * hs, b * hs);
    assert!(
        xp.len() == steps * b * h4 && w_hh.len() == h4 * hs,
        "lstm_forward: sizes"
    );
    assert!(bias.len() == h4, "lstm_forward: sizes");
    assert!(h0.len() == bh && c.len() == bh, "lstm_forward: sizes");
    // Written in full by the steps below, like the tape.
    let mut out = uninit_buf::<T>(steps * bh);
    out.reserve_exact(2 * bh);
    if steps == 0 || bh == 0 {
        let tape = LstmTape {
            gates: Vec::new(),
            tanh_c: Vec::new(),
            c_prev: Vec::new(),
        };
        // SAFETY: no elements.
        return (unsafe { assume_init(out) }, tape);
    }
    // Written in full by the steps below (every row and unit of every time index).
    let (mut gates, mut tanh_c, mut c_prev) = (
        uninit_buf::<T>(steps * b * h4),
        uninit_buf::<T>(steps * bh),
        uninit_buf::<T>(steps * bh),
    );
    // hWᵀ's columns with each gate's block padded to whole panels, so that every thread's
    // units start a panel in all four blocks.
    let split = split(dims, T::kernel_for(b).nr);
    let m_part = rows_per_part(&split, b);
    let nr = T::kernel_for(m_part).nr;
    let hsp = hs.next_multiple_of(nr);
    let mut packed = PackedB::zeroed(m_part, hs, 4 * hsp);
    for (g, w_g) in w_hh.chunks_exact(hs * hs).enumerate() {
        // Column j of gate g is row g·H + j of W_hh.
        packed.fill(g * hsp, hs, w_g, 1, hs);
    }
    let mut hp = vec![T::ZERO; b * 4 * hsp];
    let hp_p = SendPtr(hp.as_mut_ptr());
    let out_p = SendPtr(out.as_mut_ptr().cast::<T>());
    let c_p = SendPtr(c.as_mut_ptr());
    let g_p = SendPtr(gates.as_mut_ptr().cast::<T>());
    let tc_p = SendPtr(tanh_c.as_mut_ptr().cast::<T>());
    let cp_p = SendPtr(c_prev.as_mut_ptr().cast::<T>());
    let h0_p = SendPtr(h0.as_ptr() as *mut T);
    // One step for batch rows `rows` and hidden units `units`: the rows' `h·W_hhᵀ` for the
    // units' columns of every gate, then the cell.
    let step_fn = |step: usize, rows: &Range<usize>, units: &Range<usize>| {
        let t = time(dims, reverse, step);
        let h_in = if step == 0 {
            h0_p
        } else {
            // SAFETY: the previous step's outputs lie inside `out`.
            SendPtr(unsafe { out_p.get().add(time(dims, reverse, step - 1) * bh) })
        };
        let (lo, n) = (units.start, units.len());
        if step + 1 < steps {
            let tn = time(dims, reverse, step + 1);
            for r in rows.clone() {
                for g in 0..4 {
                    prefetch(&xp[(tn * b + r) * h4 + g * hs + lo], n);
                }
            }
        }
        let cols: [Range<usize>; 4] = std::array::from_fn(|g| g * hsp + lo..g * hsp + units.end);
        // SAFETY: the rows of `h_in` (b×hs) were completed by this thread or by the previous
        // fork-join and are only read now; this thread writes only its own rows and columns
        // of `hp`.
        unsafe {
            packed.mul(
                rows.len(),
                h_in.get().add(rows.start * hs),
                hs as isize,
                1,
                hp_p.get().add(rows.start * 4 * hsp),
                (4 * hsp) as isize,
                &cols,
            )
        };
        with_simd(
            #[inline(always)]
            || {
                for r in rows.clone() {
                    let xrow = &xp[(t * b + r) * h4..(t * b + r + 1) * h4];
                    let (row, grow) = ((t * b + r) * hs + lo, (t * b + r) * h4 + lo);
                    // SAFETY: every slice is this thread's units of one of its rows (disjoint
                    // from the other threads'), inside its buffer; `hp`'s were written by this
                    // thread just above.
                    unsafe {
                        cell_forward(
                            [0, 1, 2, 3].map(|g| &xrow[g * hs + lo..g * hs + lo + n]),
                            [0, 1, 2, 3]
                                .map(|g| view(hp_p.get().add(r * 4 * hsp + g * hsp + lo), n)),
                            [0, 1, 2, 3].map(|g| &bias[g * hs + lo..g * hs + lo + n]),
                            view_mut(c_p.get().add(r * hs + lo), n),
                            view_mut(cp_p.get().add(row), n),
                            [0, 1, 2, 3].map(|g| view_mut(g_p.get().add(grow + g * hs), n)),
                            view_mut(tc_p.get().add(row), n),
                            view_mut(out_p.get().add(row), n),
                        )
                    }
                }
            },
        );
    };
    install(|| match &split {
        Split::Rows(parts) => parts.par_iter().for_each(|rows| {
            for step in 0..steps {
                step_fn(step, rows, &(0..hs));
            }
        }),
        Split::Units(parts) => {
            for step in 0..steps {
                for_parts(parts, |units| step_fn(step, &(0..b), &units));
            }
        }
    });
    // SAFETY: every step wrote its time index's output, gates, tanh(c) and previous cell for
    // all rows and units (the parts cover 0..hs).
    unsafe {
        let tape = LstmTape {
            gates: assume_init(gates),
            tanh_c: assume_init(tanh_c),
            c_prev: assume_init(c_prev),
        };
        (assume_init(out), tape)
    }
}

/// The backward time loop of [`lstm_forward`]: from the tape, `W_hh`, the gradient of every
/// step's output `gout` `[T, B, H]`, and the gradients of the final `h` and `c` (`dh`, `dc`
/// `[B, H]`, replaced by those of `h0` and `c0`), returns the gradient of the
/// pre-activations `[T, B, 4H]` (that of the input projection; against the previous `h`s it
/// gives `W_hh`'s) and of the bias `[4H]` (its sum over steps and rows, formed on the way).
///
/// # Panics
/// If a slice's length does not match `dims`.
#[allow(clippy::too_many_arguments)]
pub fn lstm_backward<T: GemmFloat>(
    dims: LstmDims,
    reverse: bool,
    tape: &LstmTape<T>,
    w_hh: &[T],
    gout: &[T],
    dh: &mut [T],
    dc: &mut [T],
) -> (Vec<T>, Vec<T>) {
    let LstmDims {
        steps,
        batch: b,
        hidden: hs,
    } = dims;
    let (h4, bh) = (4 * hs, b * hs);
    assert!(
        w_hh.len() == h4 * hs && gout.len() == steps * bh,
        "lstm_backward: sizes"
    );
    assert!(dh.len() == bh && dc.len() == bh, "lstm_backward: sizes");
    assert!(tape.gates.len() == steps * b * h4, "lstm_backward: tape");
    let mut db = vec![T::ZERO; h4];
    if steps == 0 || bh == 0 {
        return (vec![T::ZERO; steps * b * h4], db);
    }
    // Written in full: every step writes its time index's rows and units.
    let mut da = uninit_buf::<T>(steps * b * h4);
    let split = split(dims, T::kernel_for(b).nr);
    let mut packed = PackedB::zeroed(rows_per_part(&split, b), h4, hs);
    packed.fill(0, hs, w_hh, hs, 1);
    // With a row split every thread sums the bias gradient of all units over its rows into
    // a block of its own (then added up); with a unit split they write disjoint units of one.
    let parts_db = match &split {
        Split::Rows(parts) => parts.len(),
        Split::Units(_) => 1,
    };
    let mut db_parts = vec![T::ZERO; parts_db * h4];
    let dbs_p = SendPtr(db_parts.as_mut_ptr());
    let da_p = SendPtr(da.as_mut_ptr().cast::<T>());
    let dh_p = SendPtr(dh.as_mut_ptr());
    let dc_p = SendPtr(dc.as_mut_ptr());
    // dh[rows, units] = da[t][rows] · W_hh[:, units]
    let recur = |t: usize, rows: &Range<usize>, units: &Range<usize>| {
        // SAFETY: da[t] was completed by this thread or an earlier fork-join and is only read
        // now; this thread writes only its own rows and columns of dh.
        unsafe {
            packed.mul(
                rows.len(),
                da_p.get().add((t * b + rows.start) * h4),
                h4 as isize,
                1,
                dh_p.get().add(rows.start * hs),
                hs as isize,
                std::slice::from_ref(units),
            )
        }
    };
    // Step `i` of the reverse loop for `rows` and `units`, summing the bias gradient into
    // `db_p`; step `steps` forms the gradient of h0.
    let step_fn = |i: usize, rows: &Range<usize>, units: &Range<usize>, db_p: SendPtr<T>| {
        if i == steps {
            recur(time(dims, reverse, 0), rows, units);
            return;
        }
        let step = steps - 1 - i;
        let t = time(dims, reverse, step);
        let (lo, n) = (units.start, units.len());
        if step > 0 {
            let tn = time(dims, reverse, step - 1);
            for r in rows.clone() {
                let (row, grow) = ((tn * b + r) * hs + lo, (tn * b + r) * h4 + lo);
                for g in 0..4 {
                    prefetch(&tape.gates[grow + g * hs], n);
                }
                prefetch(&tape.tanh_c[row], n);
                prefetch(&tape.c_prev[row], n);
                prefetch(&gout[row], n);
            }
        }
        if step + 1 < steps {
            recur(time(dims, reverse, step + 1), rows, units);
        }
        with_simd(
            #[inline(always)]
            || {
                for r in rows.clone() {
                    let (row, grow) = ((t * b + r) * hs + lo, (t * b + r) * h4 + lo);
                    let gates = &tape.gates[grow - lo..grow - lo + h4];
                    // SAFETY: dh, dc, da[t] and db slices are this thread's (its units of one of
                    // its rows, and its own db block or units), disjoint from the other
                    // threads'; dh's were written by this thread.
                    unsafe {
                        cell_backward(
                            [0, 1, 2, 3].map(|g| &gates[g * hs + lo..g * hs + lo + n]),
                            &tape.tanh_c[row..row + n],
                            &tape.c_prev[row..row + n],
                            &gout[row..row + n],
                            view(dh_p.get().add(r * hs + lo), n),
                            view_mut(dc_p.get().add(r * hs + lo), n),
                            [0, 1, 2, 3].map(|g| view_mut(da_p.get().add(grow + g * hs), n)),
                            [0, 1, 2, 3].map(|g| view_mut(db_p.get().add(g * hs + lo), n)),
                        )
                    }
                }
            },
        );
    };
    install(|| match &split {
        Split::Rows(parts) => parts.par_iter().enumerate().for_each(|(p, rows)| {
            // SAFETY: block p of db_parts (h4 elements) is this thread's.
            let db_p = SendPtr(unsafe { dbs_p.get().add(p * h4) });
            for i in 0..=steps {
                step_fn(i, rows, &(0..hs), db_p);
            }
        }),
        Split::Units(parts) => {
            for i in 0..=steps {
                for_parts(parts, |units| step_fn(i, &(0..b), &units, dbs_p));
            }
        }
    });
    for part in db_parts.chunks_exact(h4) {
        for (d, &x) in db.iter_mut().zip(part) {
            *d += x;
        }
    }
    // SAFETY: every step wrote da at its time index for all rows and units.
    (unsafe { assume_init(da) }, db)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The textbook recurrence, step by step in f64.
    fn reference(
        dims: LstmDims,
        reverse: bool,
        xp: &[f64],
        bias: &[f64],
        w: &[f64],
        h0: &[f64],
        c0: &[f64],
    ) -> (Vec<f64>, Vec<f64>) {
        let LstmDims {
            steps,
            batch: b,
            hidden: hs,
        } = dims;
        let (mut h, mut c) = (h0.to_vec(), c0.to_vec());
        let mut out = vec![0.0; steps * b * hs];
        let sig = |x: f64| 1.0 / (1.0 + (-x).exp());
        for step in 0..steps {
            let t = time(dims, reverse, step);
            let mut hn = vec![0.0; b * hs];
            for r in 0..b {
                let a: Vec<f64> = (0..4 * hs)
                    .map(|q| {
                        xp[(t * b + r) * 4 * hs + q]
                            + bias[q]
                            + (0..hs).map(|p| h[r * hs + p] * w[q * hs + p]).sum::<f64>()
                    })
                    .collect();
                for j in 0..hs {
                    let (i, f, g, o) = (
                        sig(a[j]),
                        sig(a[hs + j]),
                        a[2 * hs + j].tanh(),
                        sig(a[3 * hs + j]),
                    );
                    c[r * hs + j] = f * c[r * hs + j] + i * g;
                    hn[r * hs + j] = o * c[r * hs + j].tanh();
                }
            }
            h = hn;
            out[t * b * hs..(t + 1) * b * hs].copy_from_slice(&h);
        }
        (out, c)
    }

    fn values(n: usize, seed: u64, scale: f64) -> Vec<f64> {
        let mut g = crate::Generator::new(seed);
        (0..n).map(|_| (g.next_f64() * 2.0 - 1.0) * scale).collect()
    }

    #[test]
    fn forward_matches_the_recurrence_serial_and_parallel() {
        // 130 units: not a multiple of any panel width; 40 × 4·130 × 130 multiply-adds per
        // step: above the threshold for threads, and rows enough to split them between
        // threads; 12 rows of 220 units: split by units.
        for (dims, reverse) in [
            (
                LstmDims {
                    steps: 3,
                    batch: 12,
                    hidden: 220,
                },
                false,
            ),
            (
                LstmDims {
                    steps: 5,
                    batch: 3,
                    hidden: 7,
                },
                false,
            ),
            (
                LstmDims {
                    steps: 4,
                    batch: 40,
                    hidden: 130,
                },
                true,
            ),
            (
                LstmDims {
                    steps: 3,
                    batch: 40,
                    hidden: 130,
                },
                false,
            ),
            // Whole panels of every width (no padding between the gates' columns).
            (
                LstmDims {
                    steps: 3,
                    batch: 40,
                    hidden: 128,
                },
                false,
            ),
        ] {
            let LstmDims {
                steps,
                batch: b,
                hidden: hs,
            } = dims;
            let xp = values(steps * b * 4 * hs, 1, 1.0);
            let bias = values(4 * hs, 11, 0.5);
            let w = values(4 * hs * hs, 2, 0.3);
            let (h0, c0) = (values(b * hs, 3, 0.5), values(b * hs, 4, 0.5));
            let (want, want_c) = reference(dims, reverse, &xp, &bias, &w, &h0, &c0);
            let mut c = c0.clone();
            let (out, _) = lstm_forward(dims, reverse, &xp, &bias, &w, &h0, &mut c);
            for (x, y) in out.iter().zip(&want).chain(c.iter().zip(&want_c)) {
                assert!((x - y).abs() < 1e-12, "{x} vs {y}");
            }
        }
    }

    #[test]
    fn backward_matches_finite_differences() {
        // Threads split the rows (34 of them), or the units (12 rows).
        for (dims, reverse) in [
            (34, 130, false),
            (34, 130, true),
            (12, 220, false),
            (34, 128, false),
        ]
        .map(|(batch, hidden, reverse)| {
            let dims = LstmDims {
                steps: 3,
                batch,
                hidden,
            };
            (dims, reverse)
        }) {
            let LstmDims {
                steps,
                batch: b,
                hidden: hs,
            } = dims;
            let xp = values(steps * b * 4 * hs, 5, 1.0);
            let bias = values(4 * hs, 12, 0.5);
            let w = values(4 * hs * hs, 6, 0.2);
            let (h0, c0) = (values(b * hs, 7, 0.5), values(b * hs, 8, 0.5));
            // Loss: Σ out·u + Σ c_T·v + Σ h_T·s (h_T also appears in out: both paths).
            let (u, v) = (values(steps * b * hs, 9, 1.0), values(b * hs, 10, 1.0));
            let loss = |xp: &[f64], bias: &[f64], h0: &[f64], c0: &[f64]| {
                let (out, c) = reference(dims, reverse, xp, bias, &w, h0, c0);
                let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
                dot(&out, &u) + dot(&c, &v)
            };
            let mut c = c0.clone();
            let (_, tape) = lstm_forward(dims, reverse, &xp, &bias, &w, &h0, &mut c);
            let (mut dh, mut dc) = (vec![0.0; b * hs], v.clone());
            let (da, db) = lstm_backward(dims, reverse, &tape, &w, &u, &mut dh, &mut dc);
            let eps = 1e-6;
            let fd = |f: &dyn Fn(f64) -> f64| (f(eps) - f(-eps)) / (2.0 * eps);
            for &i in &[0, 77, 1000, xp.len() - 1] {
                let num = fd(&|e| {
                    let mut x = xp.clone();
                    x[i] += e;
                    loss(&x, &bias, &h0, &c0)
                });
                assert!((num - da[i]).abs() < 1e-6, "da[{i}]: {} vs {num}", da[i]);
            }
            for &i in &[0, 131, 4 * hs - 1] {
                let num = fd(&|e| {
                    let mut bb = bias.clone();
                    bb[i] += e;
                    loss(&xp, &bb, &h0, &c0)
                });
                assert!((num - db[i]).abs() < 1e-5, "db[{i}]: {} vs {num}", db[i]);
            }
            for &i in &[0, 500, b * hs - 1] {
                let num = fd(&|e| {
                    let mut h = h0.clone();
                    h[i] += e;
                    loss(&xp, &bias, &h, &c0)
                });
                assert!((num - dh[i]).abs() < 1e-6, "dh0[{i}]: {} vs {num}", dh[i]);
                let num = fd(&|e| {
                    let mut c = c0.clone();
                    c[i] += e;
                    loss(&xp, &bias, &h0, &c)
                });
                assert!((num - dc[i]).abs() < 1e-6, "dc0[{i}]: {} vs {num}", dc[i]);
            }
        }
    }
}
