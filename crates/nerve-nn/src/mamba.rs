//! Mamba (Gu & Dao, 2023, "Mamba: Linear-Time Sequence Modeling with Selective State
//! Spaces"): the selective scan as one fused autodiff node, its one-step recurrent form for
//! decoding, a causal depthwise convolution, and the `Mamba` mixer block with its pre-norm
//! residual layer. Parameter names are those of the reference `mamba_ssm` package (`in_proj`,
//! `conv1d`, `x_proj`, `dt_proj`, `A_log`, `D`, `out_proj`; `mixer.*` and `norm.weight` in a
//! layer), so its checkpoints (e.g. `state-spaces/mamba-130m`) map 1:1.
//!
//! Everything is batch-first (`[batch, seq, channels]`): the scan and the convolution read the
//! outputs of the projections as they come, with no transposes.
//!
//! # The scan kernel
//! One task per (batch item, block of 16 channels), in parallel above a work size. Inside a
//! task the channel block is the vector: the state is `[d_state][16]`, `Δ`, `u` and `A` are
//! loaded 16 channels at a time and `B_t[n]`, `C_t[n]` are broadcast, so `y_t = Σ_n C_t[n]
//! h_t[n]` is a vertical sum (no horizontal reduction in the forward pass) and `exp(Δ·A)` runs
//! over 16 lanes (nerve's branch-free vectorised `exp` for f32).
//!
//! The forward pass keeps only the state entering every 32-step chunk (when gradients are
//! recorded); the backward pass recomputes each chunk from its saved state, as the reference
//! CUDA kernel does, into a buffer that stays in cache, and runs back through it. So a call
//! saves `B·D·N·L/32` values instead of the `B·L·D·N` states. The gradients of `B` and `C`
//! are sums over channels, so there each step's 16-lane terms of all `d_state` entries are
//! reduced together by a transposing tree (about a fifth faster than one horizontal sum per
//! entry), and the blocks' partial sums are added at the end.
//!
//! Measured on the `mamba` workload's layer (B 8, L 128, D 256, N 16, f32, one AVX-512
//! core; `cargo run --release -p nerve-bench --example mamba_parts`): forward ≈ 2.5 ms,
//! backward ≈ 8–10 ms; the dedicated convolution forward + backward ≈ 0.6 ms against ≈ 8 ms
//! for nerve's grouped `conv1d` with the transposes it needs.

use rayon::prelude::*;

use nerve_core::kernels::with_simd;
use nerve_core::threading::{install, num_threads, par_elemwise_min};
use nerve_core::{no_grad, DType, Element, Error, Float, Result, Tensor};

use crate::init;
use crate::layers::{Conv1d, ConvOptions, Linear, RmsNorm};
use crate::module::Module;

/// Channels per vector block of the scan.
const LANES: usize = 16;
/// Time steps between the states the forward pass saves for the backward pass.
const CHUNK: usize = 32;

// ------------------------------------------------------------------------------ helpers

/// Run `f` on the contiguous data of every tensor in `ts` (strided views are copied, the rest
/// is read in place).
fn with_slices<T: Element, R>(ts: &[&Tensor], f: impl FnOnce(&[&[T]]) -> R) -> Result<R> {
    fn go<T: Element, R>(
        ts: &[&Tensor],
        acc: Vec<&[T]>,
        f: &mut dyn FnMut(&[&[T]]) -> R,
    ) -> Result<R> {
        match ts.split_first() {
            None => Ok(f(&acc)),
            Some((t, rest)) => t.with_data::<T, _>(|s| {
                let mut acc: Vec<&[T]> = acc;
                acc.push(s);
                go(rest, acc, f)
            })?,
        }
    }
    let mut f = Some(f);
    go(ts, Vec::with_capacity(ts.len()), &mut |s| {
        (f.take().expect("called once"))(s)
    })
}

/// A buffer that the tasks of one parallel kernel write at disjoint ranges.
#[derive(Clone, Copy)]
struct Disjoint<T> {
    ptr: *mut T,
    len: usize,
}

// SAFETY: the tasks holding a `Disjoint` write disjoint ranges (see `write`) and the buffer
// outlives the parallel region that uses it.
unsafe impl<T: Send> Send for Disjoint<T> {}
// SAFETY: as above.
unsafe impl<T: Send> Sync for Disjoint<T> {}

impl<T: Copy> Disjoint<T> {
    fn new(buf: &mut [T]) -> Self {
        Self {
            ptr: buf.as_mut_ptr(),
            len: buf.len(),
        }
    }

    /// Copy `src` to `start..start + src.len()` (bounds-checked).
    ///
    /// # Safety
    /// No other task reads or writes that range while the buffer is shared, and the buffer
    /// is alive.
    #[inline(always)]
    unsafe fn write(self, start: usize, src: &[T]) {
        assert!(
            start + src.len() <= self.len,
            "Disjoint::write out of bounds"
        );
        // SAFETY: in bounds (checked above); exclusivity is the caller's contract.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr.add(start), src.len()) }
    }

    /// The first `w` lanes of `v` to `start..start + w`. Taking the lanes by value keeps the
    /// caller's accumulator from being address-taken, so it can stay in registers.
    ///
    /// # Safety
    /// As [`Disjoint::write`].
    #[inline(always)]
    unsafe fn write_lanes(self, start: usize, v: [T; LANES], w: usize) {
        // SAFETY: the caller's contract.
        unsafe { self.write(start, &v[..w]) }
    }
}

/// Run `body(scratch, task)` for `0..tasks`, spread over the thread pool when `parallel`
/// (one scratch per worker), compiled for the machine's SIMD level.
fn run_tasks<S>(
    tasks: usize,
    parallel: bool,
    init: impl Fn() -> S + Sync + Send,
    body: impl Fn(&mut S, usize) + Sync + Send,
) {
    if parallel {
        install(|| {
            (0..tasks).into_par_iter().for_each_init(&init, |sc, i| {
                with_simd(
                    #[inline(always)]
                    || body(sc, i),
                )
            })
        });
    } else {
        let mut sc = init();
        with_simd(
            #[inline(always)]
            || {
                for i in 0..tasks {
                    body(&mut sc, i)
                }
            },
        );
    }
}

/// The first `src.len()` lanes from `src`, the rest zero.
#[inline(always)]
fn lanes<T: Float>(src: &[T]) -> [T; LANES] {
    let mut a = [T::ZERO; LANES];
    a[..src.len()].copy_from_slice(src);
    a
}

/// One level of [`sum_lanes`]: `a` and `b` hold `LANES / S` groups of `S` lanes (each group
/// the partial sums of one vector); the result holds each group of `a` halved (its two
/// halves added), then the same group of `b`: twice the groups, half the lanes.
#[inline(always)]
fn fold_pairs<T: Float, const S: usize>(a: &[T; LANES], b: &[T; LANES]) -> [T; LANES] {
    let h = S / 2;
    let mut r = [T::ZERO; LANES];
    for g in 0..LANES / S {
        for j in 0..h {
            r[2 * g * h + j] = a[g * S + j] + a[g * S + h + j];
            r[(2 * g + 1) * h + j] = b[g * S + j] + b[g * S + h + j];
        }
    }
    r
}

/// The lane sums of 16 vectors at once: lane `i` of the result is the sum of the lanes of
/// `v[bit_reverse4(i)]`. A transposing tree of 15 vector adds (and their shuffles) instead of
/// 16 separate horizontal sums.
#[inline(always)]
fn sum_lanes<T: Float>(v: &[[T; LANES]; LANES]) -> [T; LANES] {
    // Named values, not arrays built by closures: they stay in registers.
    let f16 = |p: usize| fold_pairs::<T, 16>(&v[2 * p], &v[2 * p + 1]);
    let (a0, a1, a2, a3) = (f16(0), f16(1), f16(2), f16(3));
    let (a4, a5, a6, a7) = (f16(4), f16(5), f16(6), f16(7));
    let (b0, b1) = (fold_pairs::<T, 8>(&a0, &a1), fold_pairs::<T, 8>(&a2, &a3));
    let (b2, b3) = (fold_pairs::<T, 8>(&a4, &a5), fold_pairs::<T, 8>(&a6, &a7));
    let (c0, c1) = (fold_pairs::<T, 4>(&b0, &b1), fold_pairs::<T, 4>(&b2, &b3));
    fold_pairs::<T, 2>(&c0, &c1)
}

/// The vector whose lane sum [`sum_lanes`] puts in lane `i`.
#[inline(always)]
fn bit_reverse4(i: usize) -> usize {
    ((i & 1) << 3) | ((i & 2) << 1) | ((i & 4) >> 1) | ((i & 8) >> 3)
}

/// `out[k] = Σ_j v[k][j]` for `k < out.len()`; `v` has `out.len()` rounded up to 16 rows,
/// the extra ones zero.
#[inline(always)]
fn sum_rows<T: Float>(v: &[[T; LANES]], out: &mut [T]) {
    for (g, rows) in v.chunks_exact(LANES).enumerate() {
        let rows: &[[T; LANES]; LANES] = rows.try_into().expect("16 rows");
        let sums = sum_lanes(rows);
        for (i, &s) in sums.iter().enumerate() {
            if let Some(o) = out.get_mut(g * LANES + bit_reverse4(i)) {
                *o = s;
            }
        }
    }
}

/// PyTorch's `softplus` (β = 1, threshold 20): `ln(1 + eˣ)`, `x` above 20. Branch-free;
/// `ln(1 + e)` is computed as `ln(u)·e/(u − 1)` with `u = 1 + e` (Goldberg's log1p), exact
/// to a few ulp even where `e` is tiny and `1 + e` rounds.
#[inline(always)]
fn softplus<T: Float>(x: T) -> T {
    let e = x.exp();
    let u = T::ONE + e;
    let log1p = if u == T::ONE {
        e
    } else {
        u.ln() * (e / (u - T::ONE))
    };
    if x > T::from_f64(20.0) {
        x
    } else {
        log1p
    }
}

/// The derivative of [`softplus`]: `sigmoid(x)`, 1 above the threshold.
#[inline(always)]
fn softplus_grad<T: Float>(x: T) -> T {
    let s = T::ONE / (T::ONE + (-x).exp());
    if x > T::from_f64(20.0) {
        T::ONE
    } else {
        s
    }
}

fn check_float(op: &'static str, ts: &[(&str, &Tensor)]) -> Result<DType> {
    let dt = ts[0].1.dtype();
    if dt != DType::F32 && dt != DType::F64 {
        return Err(Error::invalid(op, format!("needs f32 or f64, got {dt:?}")));
    }
    for (name, t) in ts {
        if t.dtype() != dt {
            return Err(Error::invalid(
                op,
                format!("{name} is {:?}, {} is {dt:?}", t.dtype(), ts[0].0),
            ));
        }
    }
    Ok(dt)
}

fn expect_dims(op: &'static str, name: &str, t: &Tensor, want: &[usize]) -> Result<()> {
    if t.dims() != want {
        return Err(Error::bad_shape(
            op,
            t.dims(),
            format!("{name} must be {want:?}"),
        ));
    }
    Ok(())
}

// ------------------------------------------------------------------------- selective scan

#[derive(Clone, Copy, Debug)]
struct ScanDims {
    b: usize,
    l: usize,
    d: usize,
    n: usize,
}

impl ScanDims {
    fn blocks(self) -> usize {
        self.d.div_ceil(LANES)
    }
    fn chunks(self) -> usize {
        self.l.div_ceil(CHUNK)
    }
    fn tasks(self) -> usize {
        self.b * self.blocks()
    }
    /// Parallel above an eighth of the element-wise threshold, as transcendental element-wise
    /// work (every state element costs an `exp`).
    fn parallel(self) -> bool {
        self.tasks() > 1
            && num_threads() > 1
            && self.b * self.l * self.d * self.n >= par_elemwise_min() / 8
    }
}

/// The scan's inputs as contiguous slices.
#[derive(Clone, Copy)]
struct ScanData<'a, T> {
    u: &'a [T],
    delta: &'a [T],
    a: &'a [T],
    b: &'a [T],
    c: &'a [T],
    d: &'a [T],
    bias: Option<&'a [T]>,
    softplus: bool,
}

impl<'a, T: Float> ScanData<'a, T> {
    fn new(s: &[&'a [T]], softplus: bool) -> Self {
        Self {
            u: s[0],
            delta: s[1],
            a: s[2],
            b: s[3],
            c: s[4],
            d: s[5],
            bias: s.get(6).copied(),
            softplus,
        }
    }

    /// `Δ` (after bias and softplus) and its pre-activation for 16 channels of one row.
    #[inline(always)]
    fn dt(&self, row: usize, w: usize, bias: &[T; LANES]) -> ([T; LANES], [T; LANES]) {
        let raw = lanes(&self.delta[row..row + w]);
        let mut pre = [T::ZERO; LANES];
        for j in 0..LANES {
            pre[j] = raw[j] + bias[j];
        }
        let mut dt = pre;
        if self.softplus {
            for j in 0..LANES {
                dt[j] = softplus(pre[j]);
            }
        }
        (dt, pre)
    }
}

/// Per-worker buffers of the scan kernels.
struct Scratch<T> {
    /// `A` of the block, transposed: `at[n][j] = A[c0 + j, n]`.
    at: Vec<[T; LANES]>,
    /// The running state (forward) or its gradient (backward), `[n]`.
    h: Vec<[T; LANES]>,
    /// Gradient of `A` accumulated over time, `[n]`.
    da: Vec<[T; LANES]>,
    /// States of one chunk: `CHUNK + 1` rows of `[n]` (backward).
    hs: Vec<[T; LANES]>,
    /// `exp(Δ·A)` of one chunk: `CHUNK` rows of `[n]` (backward).
    decay: Vec<[T; LANES]>,
    /// `Δ` and its pre-activation of one chunk (backward).
    dts: Vec<[T; LANES]>,
    pres: Vec<[T; LANES]>,
    /// This block's contributions to the gradients of `B` and `C`, `[l, n]` (backward).
    db: Vec<T>,
    dc: Vec<T>,
    /// Their terms at one step before the sum over the block's lanes: `n` rounded up to 16
    /// rows (backward; the extra rows stay zero).
    db_lanes: Vec<[T; LANES]>,
    dc_lanes: Vec<[T; LANES]>,
    /// Staging for one block's rows of the gradient of `A` (backward).
    stage: Vec<T>,
}

impl<T: Float> Scratch<T> {
    fn new(s: ScanDims, backward: bool) -> Self {
        let z = [T::ZERO; LANES];
        let (hs, chunk, ln, n16) = if backward {
            (
                (CHUNK + 1) * s.n,
                CHUNK,
                s.l * s.n,
                s.n.next_multiple_of(LANES),
            )
        } else {
            (0, 0, 0, 0)
        };
        Self {
            at: vec![z; s.n],
            h: vec![z; s.n],
            da: vec![z; if backward { s.n } else { 0 }],
            hs: vec![z; hs],
            decay: vec![z; chunk * s.n],
            dts: vec![z; chunk],
            pres: vec![z; chunk],
            db: vec![T::ZERO; ln],
            dc: vec![T::ZERO; ln],
            db_lanes: vec![z; n16],
            dc_lanes: vec![z; n16],
            stage: vec![T::ZERO; if backward { LANES * s.n } else { 0 }],
        }
    }

    /// Load the block's `A` (transposed) and return its `D` and bias lanes.
    #[inline(always)]
    fn load_block(
        &mut self,
        s: ScanDims,
        x: &ScanData<T>,
        c0: usize,
        w: usize,
    ) -> ([T; LANES], [T; LANES]) {
        for (k, row) in self.at.iter_mut().enumerate() {
            *row = [T::ZERO; LANES];
            for (j, v) in row[..w].iter_mut().enumerate() {
                *v = x.a[(c0 + j) * s.n + k];
            }
        }
        let dskip = lanes(&x.d[c0..c0 + w]);
        let bias = match x.bias {
            Some(b) => lanes(&b[c0..c0 + w]),
            None => [T::ZERO; LANES],
        };
        (dskip, bias)
    }
}

/// Forward pass of one task: batch item `task / blocks`, channels of block `task % blocks`.
/// Writes `y` and, when given, the state entering every chunk (`[b, chunks, n, d]`).
#[inline(always)]
fn scan_forward_block<T: Float>(
    s: ScanDims,
    x: &ScanData<T>,
    task: usize,
    sc: &mut Scratch<T>,
    y_out: Disjoint<T>,
    ckpt: Option<Disjoint<T>>,
) {
    let (bi, c0) = (task / s.blocks(), (task % s.blocks()) * LANES);
    let (w, n) = (LANES.min(s.d - c0), s.n);
    let (dskip, bias) = sc.load_block(s, x, c0, w);
    let (at, h) = (&sc.at[..n], &mut sc.h[..n]);
    h.fill([T::ZERO; LANES]);
    for t in 0..s.l {
        if let (Some(ck), 0) = (ckpt, t % CHUNK) {
            for (k, hk) in h.iter().enumerate() {
                let at_ = ((bi * s.chunks() + t / CHUNK) * n + k) * s.d + c0;
                // SAFETY: this task alone writes channels c0..c0+w of batch item bi.
                unsafe { ck.write(at_, &hk[..w]) };
            }
        }
        let row = (bi * s.l + t) * s.d + c0;
        let u = lanes(&x.u[row..row + w]);
        let (dt, _) = x.dt(row, w, &bias);
        let mut du = [T::ZERO; LANES];
        let mut y = [T::ZERO; LANES];
        for j in 0..LANES {
            du[j] = dt[j] * u[j];
            y[j] = dskip[j] * u[j];
        }
        let bc = (bi * s.l + t) * n;
        let (bt, ct) = (&x.b[bc..bc + n], &x.c[bc..bc + n]);
        for k in 0..n {
            // Lanes as values, not references into the buffers: no possible aliasing, so
            // the loop compiles to straight vector code with the accumulator in a register.
            let (bk, ck, ak, mut hk) = (bt[k], ct[k], at[k], h[k]);
            for j in 0..LANES {
                let v = (dt[j] * ak[j]).exp() * hk[j] + du[j] * bk;
                hk[j] = v;
                y[j] += ck * v;
            }
            h[k] = hk;
        }
        // SAFETY: as above; row `row` of y, channels c0..c0+w.
        unsafe { y_out.write_lanes(row, y, w) };
    }
}

/// Gradient buffers of the scan, written by the tasks at disjoint ranges.
#[derive(Clone, Copy)]
struct ScanGradOut<T> {
    du: Disjoint<T>,
    ddelta: Disjoint<T>,
    /// Per batch item: `[b, d, n]`, `[b, d]`, `[b, d]`.
    da: Disjoint<T>,
    dd: Disjoint<T>,
    dbias: Disjoint<T>,
    /// Per (batch item, channel block): `[b, blocks, l, n]`.
    db: Disjoint<T>,
    dc: Disjoint<T>,
}

/// Backward pass of one task (see [`scan_forward_block`]): recompute each chunk's states
/// from the saved one, then run back through the chunk.
#[inline(always)]
fn scan_backward_block<T: Float>(
    s: ScanDims,
    x: &ScanData<T>,
    dy: &[T],
    ckpt: &[T],
    task: usize,
    sc: &mut Scratch<T>,
    out: ScanGradOut<T>,
) {
    let (bi, blk) = (task / s.blocks(), task % s.blocks());
    let c0 = blk * LANES;
    let (w, n) = (LANES.min(s.d - c0), s.n);
    let (dskip, bias) = sc.load_block(s, x, c0, w);
    let z = [T::ZERO; LANES];
    let Scratch {
        at,
        h: dh,
        da: da_acc,
        hs,
        decay,
        dts,
        pres,
        db,
        dc,
        db_lanes,
        dc_lanes,
        stage,
    } = sc;
    dh.fill(z);
    da_acc.fill(z);
    let mut dd_acc = z;
    let mut dbias_acc = z;
    for ci in (0..s.chunks()).rev() {
        let (t0, t1) = (ci * CHUNK, ((ci + 1) * CHUNK).min(s.l));
        // The state entering the chunk, then the chunk's states and decays again.
        for (k, h) in hs[..n].iter_mut().enumerate() {
            let at_ = ((bi * s.chunks() + ci) * n + k) * s.d + c0;
            *h = lanes(&ckpt[at_..at_ + w]);
        }
        for t in t0..t1 {
            let i = t - t0;
            let row = (bi * s.l + t) * s.d + c0;
            let u = lanes(&x.u[row..row + w]);
            let (dt, pre) = x.dt(row, w, &bias);
            dts[i] = dt;
            pres[i] = pre;
            let mut du = z;
            for j in 0..LANES {
                du[j] = dt[j] * u[j];
            }
            let bt = &x.b[(bi * s.l + t) * n..][..n];
            for k in 0..n {
                let (bk, ak, prev) = (bt[k], at[k], hs[i * n + k]);
                let (mut e, mut next) = (z, z);
                for j in 0..LANES {
                    e[j] = (dt[j] * ak[j]).exp();
                    next[j] = e[j] * prev[j] + du[j] * bk;
                }
                decay[i * n + k] = e;
                hs[(i + 1) * n + k] = next;
            }
        }
        for t in (t0..t1).rev() {
            let i = t - t0;
            let row = (bi * s.l + t) * s.d + c0;
            let u = lanes(&x.u[row..row + w]);
            let g = lanes(&dy[row..row + w]);
            let dt = dts[i];
            let (mut du_t, mut ddt, mut dtu) = (z, z, z);
            for j in 0..LANES {
                du_t[j] = g[j] * dskip[j];
                dd_acc[j] += g[j] * u[j];
                dtu[j] = dt[j] * u[j];
            }
            let bc = (bi * s.l + t) * n;
            let (bt, ct) = (&x.b[bc..bc + n], &x.c[bc..bc + n]);
            for k in 0..n {
                let (bk, ck) = (bt[k], ct[k]);
                let (prev, cur, e) = (hs[i * n + k], hs[(i + 1) * n + k], decay[i * n + k]);
                let (ak, mut dhk, mut dak) = (at[k], dh[k], da_acc[k]);
                let (mut pc, mut pb) = (z, z);
                for j in 0..LANES {
                    // dh_t = ∂y_t/∂h_t + (the carry from t + 1, already times its decay)
                    let dhv = dhk[j] + g[j] * ck;
                    pc[j] = g[j] * cur[j];
                    pb[j] = dhv * dtu[j];
                    du_t[j] += dhv * dt[j] * bk;
                    let q = dhv * e[j] * prev[j];
                    ddt[j] += q * ak[j] + dhv * bk * u[j];
                    dak[j] += q * dt[j];
                    dhk[j] = dhv * e[j];
                }
                dh[k] = dhk;
                da_acc[k] = dak;
                dc_lanes[k] = pc;
                db_lanes[k] = pb;
            }
            sum_rows(dc_lanes, &mut dc[t * n..(t + 1) * n]);
            sum_rows(db_lanes, &mut db[t * n..(t + 1) * n]);
            if x.softplus {
                for j in 0..LANES {
                    ddt[j] *= softplus_grad(pres[i][j]);
                }
            }
            for j in 0..LANES {
                dbias_acc[j] += ddt[j];
            }
            // SAFETY: this task alone writes channels c0..c0+w of batch item bi.
            unsafe {
                out.du.write_lanes(row, du_t, w);
                out.ddelta.write_lanes(row, ddt, w);
            }
        }
    }
    for j in 0..w {
        for k in 0..n {
            stage[j * n + k] = da_acc[k][j];
        }
    }
    let part = bi * s.d + c0;
    let lb = (bi * s.blocks() + blk) * s.l * n;
    // SAFETY: as above: rows c0..c0+w of batch item bi's partial sums, and this (batch item,
    // block)'s own [l, n] slab of the B and C partial sums.
    unsafe {
        out.da.write(part * n, &stage[..w * n]);
        out.dd.write_lanes(part, dd_acc, w);
        out.dbias.write_lanes(part, dbias_acc, w);
        out.db.write(lb, &db[..s.l * n]);
        out.dc.write(lb, &dc[..s.l * n]);
    }
}

/// The scan's output and, when `save`, the states entering every chunk.
fn scan_forward<T: Float>(s: ScanDims, x: &ScanData<T>, save: bool) -> (Vec<T>, Vec<T>) {
    let mut y = vec![T::ZERO; s.b * s.l * s.d];
    let mut ckpt = vec![
        T::ZERO;
        if save {
            s.b * s.chunks() * s.n * s.d
        } else {
            0
        }
    ];
    let (yo, co) = (
        Disjoint::new(&mut y),
        save.then(|| Disjoint::new(&mut ckpt)),
    );
    run_tasks(
        s.tasks(),
        s.parallel(),
        || Scratch::new(s, false),
        #[inline(always)]
        |sc, task| scan_forward_block(s, x, task, sc, yo, co),
    );
    (y, ckpt)
}

/// Sum `parts` consecutive slabs of `len` values each.
fn sum_slabs<T: Float>(v: &[T], parts: usize, len: usize) -> Vec<T> {
    let mut out = v[..len].to_vec();
    for p in 1..parts {
        for (o, x) in out.iter_mut().zip(&v[p * len..(p + 1) * len]) {
            *o += *x;
        }
    }
    out
}

/// Gradients of u, delta, A, B, C, D, bias.
fn scan_backward<T: Float>(s: ScanDims, x: &ScanData<T>, dy: &[T], ckpt: &[T]) -> [Vec<T>; 7] {
    let (b, l, d, n, blocks) = (s.b, s.l, s.d, s.n, s.blocks());
    let mut du = vec![T::ZERO; b * l * d];
    let mut ddelta = vec![T::ZERO; b * l * d];
    let mut da = vec![T::ZERO; b * d * n];
    let mut dd = vec![T::ZERO; b * d];
    let mut dbias = vec![T::ZERO; b * d];
    let mut db = vec![T::ZERO; b * blocks * l * n];
    let mut dc = vec![T::ZERO; b * blocks * l * n];
    let out = ScanGradOut {
        du: Disjoint::new(&mut du),
        ddelta: Disjoint::new(&mut ddelta),
        da: Disjoint::new(&mut da),
        dd: Disjoint::new(&mut dd),
        dbias: Disjoint::new(&mut dbias),
        db: Disjoint::new(&mut db),
        dc: Disjoint::new(&mut dc),
    };
    run_tasks(
        s.tasks(),
        s.parallel(),
        || Scratch::new(s, true),
        #[inline(always)]
        |sc, task| scan_backward_block(s, x, dy, ckpt, task, sc, out),
    );
    // B and C are shared by all channels: add the blocks' contributions.
    let per_batch = |v: &[T]| -> Vec<T> {
        (0..b)
            .flat_map(|bi| {
                sum_slabs(
                    &v[bi * blocks * l * n..(bi + 1) * blocks * l * n],
                    blocks,
                    l * n,
                )
            })
            .collect()
    };
    [
        du,
        ddelta,
        sum_slabs(&da, b, d * n),
        per_batch(&db),
        per_batch(&dc),
        sum_slabs(&dd, b, d),
        sum_slabs(&dbias, b, d),
    ]
}

fn scan_dims(
    u: &Tensor,
    delta: &Tensor,
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
    d: &Tensor,
    bias: Option<&Tensor>,
) -> Result<ScanDims> {
    const OP: &str = "selective_scan";
    if u.rank() != 3 {
        return Err(Error::bad_shape(
            OP,
            u.dims(),
            "u must be [batch, seq, channels]",
        ));
    }
    let (bs, l, dd) = (u.dims()[0], u.dims()[1], u.dims()[2]);
    expect_dims(OP, "delta (like u)", delta, u.dims())?;
    if a.rank() != 2 || a.dims()[0] != dd {
        return Err(Error::bad_shape(
            OP,
            a.dims(),
            format!("A must be [channels = {dd}, d_state]"),
        ));
    }
    let n = a.dims()[1];
    expect_dims(OP, "B [batch, seq, d_state]", b, &[bs, l, n])?;
    expect_dims(OP, "C [batch, seq, d_state]", c, &[bs, l, n])?;
    expect_dims(OP, "D [channels]", d, &[dd])?;
    let mut ts = vec![
        ("u", u),
        ("delta", delta),
        ("A", a),
        ("B", b),
        ("C", c),
        ("D", d),
    ];
    if let Some(bias) = bias {
        expect_dims(OP, "delta_bias [channels]", bias, &[dd])?;
        ts.push(("delta_bias", bias));
    }
    check_float(OP, &ts)?;
    Ok(ScanDims { b: bs, l, d: dd, n })
}

/// The selective scan of Mamba (S6), one autodiff node with a hand-written backward pass.
///
/// Shapes (batch-first): `u`, `delta` `[B, L, D]`; `a` `[D, N]` (the caller computes
/// `A = −exp(A_log)`); `b`, `c` `[B, L, N]` (input-dependent, shared by all channels); `d`
/// `[D]`; `delta_bias` `[D]`. Per batch item and channel, with `h_0 = 0`:
///
/// ```text
/// Δ_t = softplus(delta_t + delta_bias)     (or delta_t + delta_bias without softplus)
/// h_t[n] = exp(Δ_t · A[d, n]) · h_{t−1}[n] + Δ_t · B_t[n] · u_t
/// y_t = Σ_n C_t[n] · h_t[n] + D[d] · u_t
/// ```
///
/// Returns `y` `[B, L, D]`. Differentiable w.r.t. every input; f32 or f64. Like
/// `mamba_ssm.ops.selective_scan_interface.selective_scan_fn` without `z`, in batch-first
/// layout.
///
/// ```
/// use nerve_core::{Result, Tensor};
/// use nerve_nn::mamba::selective_scan;
/// # fn main() -> Result<()> {
/// let (b, l, d, n) = (2, 5, 3, 4);
/// let a = Tensor::rand([d, n]).neg()?;
/// let y = selective_scan(
///     &Tensor::randn([b, l, d]), &Tensor::randn([b, l, d]), &a,
///     &Tensor::randn([b, l, n]), &Tensor::randn([b, l, n]), &Tensor::ones([d]),
///     None, true,
/// )?;
/// assert_eq!(y.dims(), &[b, l, d]);
/// # Ok(())
/// # }
/// ```
#[allow(clippy::too_many_arguments)]
pub fn selective_scan(
    u: &Tensor,
    delta: &Tensor,
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
    d: &Tensor,
    delta_bias: Option<&Tensor>,
    delta_softplus: bool,
) -> Result<Tensor> {
    let s = scan_dims(u, delta, a, b, c, d, delta_bias)?;
    let inputs: Vec<&Tensor> = [u, delta, a, b, c, d]
        .into_iter()
        .chain(delta_bias)
        .collect();
    match u.dtype() {
        DType::F32 => scan_typed::<f32>(s, &inputs, delta_softplus),
        _ => scan_typed::<f64>(s, &inputs, delta_softplus),
    }
}

fn scan_typed<T: Float>(s: ScanDims, inputs: &[&Tensor], softplus: bool) -> Result<Tensor> {
    const OP: &str = "selective_scan";
    let record = nerve_core::is_grad_enabled() && inputs.iter().any(|t| t.requires_grad());
    let (y, ckpt) = with_slices::<T, _>(inputs, |sl| {
        scan_forward(s, &ScanData::new(sl, softplus), record)
    })?;
    let y = Tensor::from_vec(y, [s.b, s.l, s.d])?;
    if !record {
        return Ok(y);
    }
    let saved: Vec<Tensor> = inputs.iter().map(|t| t.detach()).collect();
    let wants: Vec<bool> = inputs.iter().map(|t| t.requires_grad()).collect();
    let shapes: Vec<Vec<usize>> = inputs.iter().map(|t| t.dims().to_vec()).collect();
    Ok(y.attach_backward(OP, inputs, move |g| {
        let mut all: Vec<&Tensor> = vec![g];
        all.extend(saved.iter());
        let grads = with_slices::<T, _>(&all, |sl| {
            scan_backward(s, &ScanData::new(&sl[1..], softplus), sl[0], &ckpt)
        })?;
        grads
            .into_iter()
            .zip(&wants)
            .zip(&shapes)
            .map(|((gv, &want), dims)| {
                want.then(|| Tensor::from_vec(gv, dims.as_slice()))
                    .transpose()
            })
            .collect()
    }))
}

/// One step of the selective scan's recurrence, for decoding: from the state `state`
/// `[B, D, N]` and one time step's `x`, `dt` `[B, D]`, `b`, `c` `[B, N]` (with `a` `[D, N]`,
/// `d` `[D]`, `dt_bias` `[D]` as in [`selective_scan`]) to `(y [B, D], new state [B, D, N])`.
/// Running it over a sequence from a zero state gives [`selective_scan`]'s outputs. Not
/// differentiable (inference only; mamba_ssm's `selective_state_update`, not in place).
#[allow(clippy::too_many_arguments)]
pub fn selective_state_update(
    state: &Tensor,
    x: &Tensor,
    dt: &Tensor,
    a: &Tensor,
    b: &Tensor,
    c: &Tensor,
    d: &Tensor,
    dt_bias: Option<&Tensor>,
    dt_softplus: bool,
) -> Result<(Tensor, Tensor)> {
    const OP: &str = "selective_state_update";
    if state.rank() != 3 {
        return Err(Error::bad_shape(
            OP,
            state.dims(),
            "state must be [batch, channels, d_state]",
        ));
    }
    let (bs, dd, n) = (state.dims()[0], state.dims()[1], state.dims()[2]);
    expect_dims(OP, "x [batch, channels]", x, &[bs, dd])?;
    expect_dims(OP, "dt [batch, channels]", dt, &[bs, dd])?;
    expect_dims(OP, "A [channels, d_state]", a, &[dd, n])?;
    expect_dims(OP, "B [batch, d_state]", b, &[bs, n])?;
    expect_dims(OP, "C [batch, d_state]", c, &[bs, n])?;
    expect_dims(OP, "D [channels]", d, &[dd])?;
    let mut ts = vec![
        ("state", state),
        ("x", x),
        ("dt", dt),
        ("A", a),
        ("B", b),
        ("C", c),
        ("D", d),
    ];
    if let Some(bias) = dt_bias {
        expect_dims(OP, "dt_bias [channels]", bias, &[dd])?;
        ts.push(("dt_bias", bias));
    }
    let dtype = check_float(OP, &ts)?;
    let inputs: Vec<&Tensor> = ts.iter().map(|(_, t)| *t).collect();
    fn typed<T: Float>(
        inputs: &[&Tensor],
        (bs, dd, n): (usize, usize, usize),
        apply_softplus: bool,
    ) -> Result<(Tensor, Tensor)> {
        let (h, y) = with_slices::<T, _>(inputs, |s| {
            let (x, dt, a, b, c, d) = (s[1], s[2], s[3], s[4], s[5], s[6]);
            let mut h = s[0].to_vec();
            let mut y = vec![T::ZERO; bs * dd];
            with_simd(
                #[inline(always)]
                || {
                    for bi in 0..bs {
                        for ch in 0..dd {
                            let i = bi * dd + ch;
                            // Same arithmetic, in the same order, as the scan kernel.
                            let pre = dt[i] + s.get(7).map_or(T::ZERO, |bias| bias[ch]);
                            let dtv = if apply_softplus { softplus(pre) } else { pre };
                            let du = dtv * x[i];
                            let mut acc = d[ch] * x[i];
                            let hrow = &mut h[i * n..(i + 1) * n];
                            for k in 0..n {
                                let v = (dtv * a[ch * n + k]).exp() * hrow[k] + du * b[bi * n + k];
                                hrow[k] = v;
                                acc += c[bi * n + k] * v;
                            }
                            y[i] = acc;
                        }
                    }
                },
            );
            (h, y)
        })?;
        Ok((
            Tensor::from_vec(y, [bs, dd])?,
            Tensor::from_vec(h, [bs, dd, n])?,
        ))
    }
    match dtype {
        DType::F32 => typed::<f32>(&inputs, (bs, dd, n), dt_softplus),
        _ => typed::<f64>(&inputs, (bs, dd, n), dt_softplus),
    }
}

// ------------------------------------------------------------------ causal depthwise conv

fn conv_dims(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
) -> Result<(usize, usize, usize, usize)> {
    const OP: &str = "causal_conv1d";
    if x.rank() != 3 {
        return Err(Error::bad_shape(
            OP,
            x.dims(),
            "x must be [batch, seq, channels]",
        ));
    }
    let (b, l, d) = (x.dims()[0], x.dims()[1], x.dims()[2]);
    if weight.rank() != 2 || weight.dims()[0] != d || weight.dims()[1] == 0 {
        return Err(Error::bad_shape(
            OP,
            weight.dims(),
            format!("weight must be [channels = {d}, kernel ≥ 1]"),
        ));
    }
    let mut ts = vec![("x", x), ("weight", weight)];
    if let Some(bias) = bias {
        expect_dims(OP, "bias [channels]", bias, &[d])?;
        ts.push(("bias", bias));
    }
    check_float(OP, &ts)?;
    Ok((b, l, d, weight.dims()[1]))
}

/// Transpose `[d, k]` to `[k, d]`.
fn transpose<T: Float>(w: &[T], d: usize, k: usize) -> Vec<T> {
    let mut t = vec![T::ZERO; d * k];
    for c in 0..d {
        for j in 0..k {
            t[j * d + c] = w[c * k + j];
        }
    }
    t
}

/// Causal depthwise 1-D convolution over `x` `[B, L, D]` (channels last) with `weight`
/// `[D, K]` and an optional `bias` `[D]`: `y[b, t, d] = bias[d] + Σ_k weight[d, k] ·
/// x[b, t + k − (K − 1), d]`, zero before the start. The same as PyTorch's depthwise
/// `conv1d(x.transpose(1, 2), weight.unsqueeze(1), bias, padding=K−1, groups=D)[..., :L]`
/// transposed back, without the transposes or the wasted `K − 1` outputs. Differentiable
/// w.r.t. all three.
pub fn causal_conv1d(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let dims = conv_dims(x, weight, bias)?;
    let inputs: Vec<&Tensor> = [x, weight].into_iter().chain(bias).collect();
    match x.dtype() {
        DType::F32 => conv_typed::<f32>(dims, &inputs),
        _ => conv_typed::<f64>(dims, &inputs),
    }
}

fn conv_typed<T: Float>(
    (b, l, d, k): (usize, usize, usize, usize),
    inputs: &[&Tensor],
) -> Result<Tensor> {
    const OP: &str = "causal_conv1d";
    let parallel = b > 1 && num_threads() > 1 && b * l * d * k >= par_elemwise_min();
    let y = with_slices::<T, _>(inputs, |s| {
        let (x, wt) = (s[0], transpose(s[1], d, k));
        let bias = s.get(2).copied();
        let mut y = vec![T::ZERO; b * l * d];
        per_batch(
            parallel,
            &mut y,
            l * d,
            #[inline(always)]
            |bi: usize, yb: &mut [T]| {
                let xb = &x[bi * l * d..(bi + 1) * l * d];
                for t in 0..l {
                    let yr = &mut yb[t * d..(t + 1) * d];
                    if let Some(bias) = bias {
                        yr.copy_from_slice(bias);
                    }
                    for j in k.saturating_sub(t + 1)..k {
                        let xr = &xb[(t + j + 1 - k) * d..][..d];
                        let wr = &wt[j * d..(j + 1) * d];
                        for c in 0..d {
                            yr[c] += wr[c] * xr[c];
                        }
                    }
                }
            },
        );
        y
    })?;
    let y = Tensor::from_vec(y, [b, l, d])?;
    let saved: Vec<Tensor> = inputs.iter().map(|t| t.detach()).collect();
    let has_bias = inputs.len() == 3;
    Ok(y.attach_backward(OP, inputs, move |g| {
        let all = [g, &saved[0], &saved[1]];
        let (dx, dw, db) = with_slices::<T, _>(&all, |s| {
            let (g, x, wt) = (s[0], s[1], transpose(s[2], d, k));
            let mut dx = vec![T::ZERO; b * l * d];
            // Per batch item: the weight gradient [k, d] then the bias gradient [d].
            let mut parts = vec![T::ZERO; b * (k + 1) * d];
            per_batch_pair(
                parallel,
                &mut dx,
                l * d,
                &mut parts,
                (k + 1) * d,
                #[inline(always)]
                |bi: usize, (dxb, part): (&mut [T], &mut [T])| {
                    let (gb, xb) = (
                        &g[bi * l * d..(bi + 1) * l * d],
                        &x[bi * l * d..(bi + 1) * l * d],
                    );
                    let (dwb, dbb) = part.split_at_mut(k * d);
                    for t in 0..l {
                        let gr = &gb[t * d..(t + 1) * d];
                        for c in 0..d {
                            dbb[c] += gr[c];
                        }
                        for j in k.saturating_sub(t + 1)..k {
                            let src = (t + j + 1 - k) * d;
                            let (xr, wr) = (&xb[src..src + d], &wt[j * d..(j + 1) * d]);
                            let dxr = &mut dxb[src..src + d];
                            let dwr = &mut dwb[j * d..(j + 1) * d];
                            for c in 0..d {
                                dxr[c] += wr[c] * gr[c];
                                dwr[c] += gr[c] * xr[c];
                            }
                        }
                    }
                },
            );
            let sums = sum_slabs(&parts, b, (k + 1) * d);
            let dw = transpose(&sums[..k * d], k, d);
            (dx, dw, sums[k * d..].to_vec())
        })?;
        let mut out = vec![
            Some(Tensor::from_vec(dx, [b, l, d])?),
            Some(Tensor::from_vec(dw, [d, k])?),
        ];
        if has_bias {
            out.push(Some(Tensor::from_vec(db, [d])?));
        }
        Ok(out)
    }))
}

/// `f(batch item, its slab of out)` over slabs of `len`, in parallel when asked.
fn per_batch<T: Float>(
    parallel: bool,
    out: &mut [T],
    len: usize,
    f: impl Fn(usize, &mut [T]) + Sync + Send,
) {
    if parallel {
        install(|| {
            out.par_chunks_mut(len).enumerate().for_each(|(i, o)| {
                with_simd(
                    #[inline(always)]
                    || f(i, o),
                )
            })
        });
    } else {
        with_simd(
            #[inline(always)]
            || {
                for (i, o) in out.chunks_mut(len).enumerate() {
                    f(i, o)
                }
            },
        );
    }
}

/// [`per_batch`] over two buffers sliced alike.
fn per_batch_pair<T: Float>(
    parallel: bool,
    a: &mut [T],
    a_len: usize,
    b: &mut [T],
    b_len: usize,
    f: impl Fn(usize, (&mut [T], &mut [T])) + Sync + Send,
) {
    if parallel {
        install(|| {
            a.par_chunks_mut(a_len)
                .zip(b.par_chunks_mut(b_len))
                .enumerate()
                .for_each(|(i, p)| {
                    with_simd(
                        #[inline(always)]
                        || f(i, p),
                    )
                })
        });
    } else {
        with_simd(
            #[inline(always)]
            || {
                for (i, p) in a.chunks_mut(a_len).zip(b.chunks_mut(b_len)).enumerate() {
                    f(i, p)
                }
            },
        );
    }
}

/// One step of [`causal_conv1d`] for decoding: from `state` `[B, K − 1, D]` (the last
/// `K − 1` inputs, oldest first) and the new input `x` `[B, D]` to `(y [B, D], new state)`.
/// Running it over a sequence from a zero state gives `causal_conv1d`'s outputs. Not
/// differentiable.
pub fn causal_conv1d_update(
    state: &Tensor,
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
) -> Result<(Tensor, Tensor)> {
    const OP: &str = "causal_conv1d_update";
    if x.rank() != 2 || weight.rank() != 2 || weight.dims()[0] != x.dims()[1] {
        return Err(Error::shape_mismatch(OP, x.dims(), weight.dims()));
    }
    let (b, d, k) = (x.dims()[0], x.dims()[1], weight.dims()[1]);
    if k == 0 {
        return Err(Error::bad_shape(OP, weight.dims(), "the kernel is empty"));
    }
    expect_dims(
        OP,
        "state [batch, kernel - 1, channels]",
        state,
        &[b, k - 1, d],
    )?;
    // The window [B, K, D] is the state then x: the full convolution's last output.
    let window = no_grad(|| Tensor::cat(&[state, &x.unsqueeze(1)?], 1))?;
    let y = no_grad(|| causal_conv1d(&window, weight, bias))?.select(1, k - 1)?;
    let next = window.narrow(1, 1, k - 1)?.contiguous()?;
    Ok((y, next))
}

// ------------------------------------------------------------------------------- modules

/// Sizes and initialisation of a [`MambaBlock`], with `mamba_ssm`'s `Mamba` defaults.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MambaOptions {
    /// Model width (input and output features).
    pub d_model: usize,
    /// State size N per channel (16).
    pub d_state: usize,
    /// Width of the causal depthwise convolution (4).
    pub d_conv: usize,
    /// Inner width as a multiple of `d_model` (2).
    pub expand: usize,
    /// Rank of the `Δ` projection; `None`: `ceil(d_model / 16)`.
    pub dt_rank: Option<usize>,
    /// Range of the initial `Δ` (log-uniform): 0.001 ..
    pub dt_min: f64,
    /// .. 0.1.
    pub dt_max: f64,
    /// Floor of the initial `Δ` (1e-4).
    pub dt_init_floor: f64,
    /// Scale of `dt_proj`'s initial weight, `U(±dt_scale / sqrt(dt_rank))` (1).
    pub dt_scale: f64,
    /// Bias of the convolution (true).
    pub conv_bias: bool,
    /// Biases of `in_proj` and `out_proj` (false).
    pub bias: bool,
}

impl MambaOptions {
    /// The defaults of `mamba_ssm.Mamba(d_model)`: d_state 16, d_conv 4, expand 2.
    pub fn new(d_model: usize) -> Self {
        Self {
            d_model,
            d_state: 16,
            d_conv: 4,
            expand: 2,
            dt_rank: None,
            dt_min: 0.001,
            dt_max: 0.1,
            dt_init_floor: 1e-4,
            dt_scale: 1.0,
            conv_bias: true,
            bias: false,
        }
    }
    /// With state size `n`.
    pub fn with_d_state(mut self, n: usize) -> Self {
        self.d_state = n;
        self
    }
    /// With convolution width `k`.
    pub fn with_d_conv(mut self, k: usize) -> Self {
        self.d_conv = k;
        self
    }
    /// With expansion factor `e`.
    pub fn with_expand(mut self, e: usize) -> Self {
        self.expand = e;
        self
    }
    /// With `Δ` projection rank `r` (`None`: automatic).
    pub fn with_dt_rank(mut self, r: Option<usize>) -> Self {
        self.dt_rank = r;
        self
    }
    /// Inner width `expand · d_model`.
    pub fn d_inner(&self) -> usize {
        self.expand * self.d_model
    }
    /// The `Δ` projection rank in use.
    pub fn dt_rank(&self) -> usize {
        self.dt_rank.unwrap_or(self.d_model.div_ceil(16))
    }

    fn validate(&self) -> Result<()> {
        let zero: Vec<&str> = [
            ("d_model", self.d_model),
            ("d_state", self.d_state),
            ("d_conv", self.d_conv),
            ("expand", self.expand),
            ("dt_rank", self.dt_rank()),
        ]
        .iter()
        .filter(|(_, v)| *v == 0)
        .map(|(n, _)| *n)
        .collect();
        if !zero.is_empty() {
            return Err(Error::invalid(
                "Mamba",
                format!("{} must be at least 1", zero.join(", ")),
            ));
        }
        if !(0.0 < self.dt_min && self.dt_min <= self.dt_max) {
            return Err(Error::invalid(
                "Mamba",
                format!(
                    "dt_min ({}) and dt_max ({}) must satisfy 0 < dt_min <= dt_max",
                    self.dt_min, self.dt_max
                ),
            ));
        }
        Ok(())
    }
}

/// The decoding state of one [`MambaBlock`]: the convolution's last `d_conv − 1` inputs
/// `[B, d_conv − 1, d_inner]` (oldest first; mamba_ssm keeps `[B, d_inner, d_conv]`) and the
/// SSM state `[B, d_inner, d_state]`.
#[derive(Clone, Debug)]
pub struct MambaCache {
    /// Last inputs of the convolution, `[B, d_conv − 1, d_inner]`.
    pub conv_state: Tensor,
    /// State of the selective scan, `[B, d_inner, d_state]`.
    pub ssm_state: Tensor,
}

/// The Mamba mixer over `[B, L, d_model]` (`mamba_ssm.modules.mamba_simple.Mamba`):
/// `in_proj` to `x` and `z` (`2·d_inner`), a causal depthwise `conv1d` and SiLU on `x`,
/// `x_proj` to `Δ` (rank `dt_rank`), `B`, `C`; `dt_proj` up to `d_inner` (its bias is the scan's
/// `delta_bias`, with softplus); the selective scan with `A = −exp(A_log)` and skip `D`; gating
/// by `SiLU(z)`; `out_proj`. Parameters: `A_log`, `D`, `in_proj.weight`, `conv1d.weight`,
/// `conv1d.bias`, `x_proj.weight`, `dt_proj.weight`, `dt_proj.bias`, `out_proj.weight`.
pub struct MambaBlock {
    /// `d_model → 2·d_inner` (`x` then `z`).
    pub in_proj: Linear,
    /// Depthwise, `[d_inner, 1, d_conv]`, causal (padding `d_conv − 1`).
    pub conv1d: Conv1d,
    /// `d_inner → dt_rank + 2·d_state` (`Δ`, `B`, `C`).
    pub x_proj: Linear,
    /// `dt_rank → d_inner`, with bias.
    pub dt_proj: Linear,
    /// `[d_inner, d_state]`, `A = −exp(A_log)`.
    pub a_log: Tensor,
    /// The skip connection `[d_inner]`.
    pub d: Tensor,
    /// `d_inner → d_model`.
    pub out_proj: Linear,
    opts: MambaOptions,
}

impl MambaBlock {
    /// A block with mamba_ssm's initialisation: PyTorch's defaults for the projections and
    /// the convolution; `dt_proj.weight` `U(±dt_scale/sqrt(dt_rank))`; `dt_proj.bias` the
    /// inverse softplus of `Δ` drawn log-uniform in `[dt_min, dt_max]` (floored at
    /// `dt_init_floor`); `A_log[d, n] = ln(n + 1)`; `D = 1`. Zero sizes are refused.
    pub fn new(opts: MambaOptions) -> Result<Self> {
        opts.validate()?;
        let (dm, di, n, k, r) = (
            opts.d_model,
            opts.d_inner(),
            opts.d_state,
            opts.d_conv,
            opts.dt_rank(),
        );
        let in_proj = Linear::new(dm, 2 * di, opts.bias)?;
        let conv1d = Conv1d::new(
            di,
            di,
            k,
            ConvOptions::default()
                .groups(di)
                .padding(k - 1)
                .bias(opts.conv_bias),
        )?;
        let x_proj = Linear::new(di, r + 2 * n, false)?;
        let dt_proj = Linear::new(r, di, true)?;
        let std = opts.dt_scale / (r as f64).sqrt();
        init::uniform_(&dt_proj.weight, -std, std)?;
        let (lo, hi) = (opts.dt_min.ln(), opts.dt_max.ln());
        let inv_dt: Vec<f64> = Tensor::rand([di])
            .to_f64_vec()
            .into_iter()
            .map(|r| {
                let dt = (r * (hi - lo) + lo).exp().max(opts.dt_init_floor);
                // softplus⁻¹(dt) = dt + ln(1 − e^(−dt))
                dt + (-(-dt).exp_m1()).ln()
            })
            .collect();
        if let Some(b) = &dt_proj.bias {
            b.copy_(&Tensor::from_vec(inv_dt, [di])?)?;
        }
        let a_log: Vec<f32> = (0..di)
            .flat_map(|_| (1..=n).map(|v| (v as f32).ln()))
            .collect();
        let out_proj = Linear::new(di, dm, opts.bias)?;
        Ok(Self {
            in_proj,
            conv1d,
            x_proj,
            dt_proj,
            a_log: Tensor::from_vec(a_log, [di, n])?.requires_grad_(true),
            d: Tensor::ones([di]).requires_grad_(true),
            out_proj,
            opts,
        })
    }

    /// The options.
    pub fn options(&self) -> MambaOptions {
        self.opts
    }

    /// An all-zero decoding state for `batch` sequences.
    pub fn new_cache(&self, batch: usize) -> MambaCache {
        let o = &self.opts;
        let dt = self.d.dtype();
        MambaCache {
            conv_state: Tensor::zeros_with([batch, o.d_conv - 1, o.d_inner()], dt),
            ssm_state: Tensor::zeros_with([batch, o.d_inner(), o.d_state], dt),
        }
    }

    /// `x Wᵀ (+ b)` for rows `rows` of a Linear's output, without slicing the output (whose
    /// backward would build full-size zero gradients).
    fn project(lin: &Linear, x: &Tensor, start: usize, len: usize) -> Result<Tensor> {
        let y = x.matmul(&lin.weight.narrow(0, start, len)?.t()?)?;
        match &lin.bias {
            Some(b) => y.add(&b.narrow(0, start, len)?),
            None => Ok(y),
        }
    }

    fn conv_weight(&self) -> Result<Tensor> {
        self.conv1d
            .weight
            .reshape(&[self.opts.d_inner() as isize, self.opts.d_conv as isize])
    }

    /// From the convolution's output `xc` `[M, d_inner]` (after SiLU) to the scan's `Δ`
    /// `[M, d_inner]`, `B` and `C` `[M, d_state]`.
    fn ssm_inputs(&self, xc: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let (r, n) = (self.opts.dt_rank(), self.opts.d_state);
        let x_dbl = xc.matmul(&self.x_proj.weight.t()?)?;
        let delta = x_dbl.narrow(1, 0, r)?.matmul(&self.dt_proj.weight.t()?)?;
        Ok((delta, x_dbl.narrow(1, r, n)?, x_dbl.narrow(1, r + n, n)?))
    }

    /// One token per sequence, `x` `[B, d_model]` → `[B, d_model]`, advancing `cache`:
    /// recurrent decoding in O(1) per token. Not differentiable.
    pub fn step(&self, x: &Tensor, cache: &mut MambaCache) -> Result<Tensor> {
        let o = self.opts;
        let di = o.d_inner();
        if x.rank() != 2 || x.dims()[1] != o.d_model {
            return Err(Error::bad_shape(
                "Mamba",
                x.dims(),
                format!("step expects [batch, d_model = {}]", o.d_model),
            ));
        }
        no_grad(|| {
            let xs = Self::project(&self.in_proj, x, 0, di)?;
            let z = Self::project(&self.in_proj, x, di, di)?;
            let (xc, conv_state) = causal_conv1d_update(
                &cache.conv_state,
                &xs,
                &self.conv_weight()?,
                self.conv1d.bias.as_ref(),
            )?;
            let xc = xc.silu()?;
            let (delta, b, c) = self.ssm_inputs(&xc)?;
            let a = self.a_log.exp()?.neg()?;
            let (y, ssm_state) = selective_state_update(
                &cache.ssm_state,
                &xc,
                &delta,
                &a,
                &b,
                &c,
                &self.d,
                self.dt_proj.bias.as_ref(),
                true,
            )?;
            *cache = MambaCache {
                conv_state,
                ssm_state,
            };
            self.out_proj.forward(&y.mul(&z.silu()?)?)
        })
    }
}

impl Module for MambaBlock {
    /// `[B, L, d_model]` → `[B, L, d_model]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let o = self.opts;
        if x.rank() != 3 || x.dims()[2] != o.d_model {
            return Err(Error::bad_shape(
                "Mamba",
                x.dims(),
                format!("expected [batch, seq, d_model = {}]", o.d_model),
            ));
        }
        let (b, l) = (x.dims()[0] as isize, x.dims()[1] as isize);
        let (di, n) = (o.d_inner() as isize, o.d_state as isize);
        // The projections run on [B·L, features]: one GEMM each.
        let x2 = x.reshape(&[b * l, o.d_model as isize])?;
        let xs = Self::project(&self.in_proj, &x2, 0, di as usize)?;
        let z = Self::project(&self.in_proj, &x2, di as usize, di as usize)?;
        let xc = causal_conv1d(
            &xs.reshape(&[b, l, di])?,
            &self.conv_weight()?,
            self.conv1d.bias.as_ref(),
        )?
        .silu()?;
        let (delta, bm, cm) = self.ssm_inputs(&xc.reshape(&[b * l, di])?)?;
        let a = self.a_log.exp()?.neg()?;
        let y = selective_scan(
            &xc,
            &delta.reshape(&[b, l, di])?,
            &a,
            &bm.reshape(&[b, l, n])?,
            &cm.reshape(&[b, l, n])?,
            &self.d,
            self.dt_proj.bias.as_ref(),
            true,
        )?;
        let y = y.reshape(&[b * l, di])?.mul(&z.silu()?)?;
        self.out_proj
            .forward(&y)?
            .reshape(&[b, l, o.d_model as isize])
    }
    fn own_parameters(&self) -> Vec<(String, Tensor)> {
        vec![
            ("A_log".into(), self.a_log.clone()),
            ("D".into(), self.d.clone()),
        ]
    }
    fn children(&self) -> Vec<(String, &dyn Module)> {
        vec![
            ("in_proj".into(), &self.in_proj),
            ("conv1d".into(), &self.conv1d),
            ("x_proj".into(), &self.x_proj),
            ("dt_proj".into(), &self.dt_proj),
            ("out_proj".into(), &self.out_proj),
        ]
    }
    fn describe(&self) -> String {
        let o = &self.opts;
        format!(
            "Mamba(d_model={}, d_state={}, d_conv={}, expand={}, dt_rank={})",
            o.d_model,
            o.d_state,
            o.d_conv,
            o.expand,
            o.dt_rank()
        )
    }
}

/// A pre-norm residual Mamba layer (`mamba_ssm`'s `Block`): `x + mixer(norm(x))`, with
/// RMSNorm. Parameters `mixer.*` (see [`MambaBlock`]) and `norm.weight`.
pub struct MambaLayer {
    /// The Mamba block.
    pub mixer: MambaBlock,
    /// RMSNorm before the mixer.
    pub norm: RmsNorm,
}

impl MambaLayer {
    /// A layer of a fresh [`MambaBlock`] and an RMSNorm with `eps` (mamba_ssm: 1e-5).
    pub fn new(opts: MambaOptions, eps: f64) -> Result<Self> {
        Ok(Self {
            mixer: MambaBlock::new(opts)?,
            norm: RmsNorm::new(&[opts.d_model], eps),
        })
    }

    /// One token per sequence, `x` `[B, d_model]`, advancing `cache` (see
    /// [`MambaBlock::step`]).
    pub fn step(&self, x: &Tensor, cache: &mut MambaCache) -> Result<Tensor> {
        no_grad(|| x.add(&self.mixer.step(&self.norm.forward(x)?, cache)?))
    }
}

impl Module for MambaLayer {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.add(&self.mixer.forward(&self.norm.forward(x)?)?)
    }
    fn children(&self) -> Vec<(String, &dyn Module)> {
        vec![("mixer".into(), &self.mixer), ("norm".into(), &self.norm)]
    }
    fn describe(&self) -> String {
        "Block".into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sum_rows_adds_each_row() {
        for n in [1usize, 3, 16, 19, 32] {
            let mut v = vec![[0f64; LANES]; n.next_multiple_of(LANES)];
            for (k, row) in v.iter_mut().take(n).enumerate() {
                for (j, x) in row.iter_mut().enumerate() {
                    *x = (k * 100 + j) as f64;
                }
            }
            let mut out = vec![0.0; n];
            sum_rows(&v, &mut out);
            for (k, o) in out.iter().enumerate() {
                assert_eq!(*o, (0..LANES).map(|j| (k * 100 + j) as f64).sum::<f64>());
            }
        }
    }
}
