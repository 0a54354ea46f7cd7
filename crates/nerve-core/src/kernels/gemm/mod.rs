//! Matrix multiply, BLIS-style: packed panels and a register-tiled micro-kernel.
//!
//! `C = alpha · A·B + beta · C` for strided `A` (m×k), `B` (k×n) and `C` (m×n). The loops:
//!
//! 1. rows of `A` in blocks of `MC` and depth in blocks of `KC`: the `MC × KC` block of `A` is
//!    packed (in parallel) into `MR`-row micro-panels, which live in the shared L3;
//! 2. columns of `B` in blocks of `NC`: the `KC × NC` block is packed into `NR`-column
//!    micro-panels sized for a core's L2;
//! 3. the threads split the micro-panels of `A` between them (or those of `B` when `A` has too
//!    few); each keeps one `A` micro-panel in L1 while it streams the `B` micro-panels from L2
//!    through the micro-kernel.
//!
//! Packing reads any strides, so transposed views cost nothing extra. Micro-kernels
//! ([`micro`]) are chosen at run time: AVX-512 (12×32 f32, 12×16 f64), AVX2+FMA (6×16, 6×8)
//! or portable loops. Measurements are in the README.

pub mod micro;

use rayon::prelude::*;

use self::micro::MicroKernel;
use super::{simd_level, with_scratch, with_simd, SendPtr, SimdLevel};
use crate::dtype::Float;
use crate::threading::{install, num_threads};

/// Cache blocking, in bytes of packed data, so that f32 and f64 get the same footprint.
/// `KC × NC` of B (L2): 384 × 192 f32 = 288 KiB, leaving L2 room for the streamed C tiles and A; `MC × KC`
/// of A (L3): 3072 × 384 f32 = 4.5 MiB. NC 192 measured 10% faster than 480 on the wide conv GEMMs
/// (64×288×6272) and the same on square ones.
const KC_BYTES: usize = 384 * 4;
/// Products with at most this many rows split the columns between threads at the top (see
/// [`gemm`]).
const SMALL_M: usize = 64;
const NC_ELEMS_F32: usize = 192;
const MC_ELEMS_F32: usize = 3072;

/// Products below this many multiply-adds (m·n·k) run on the calling thread. Measured with
/// `cargo run --release -p nerve-bench --example par_threshold`: on 2 cores a 96³ product is
/// slower on two threads than on one (23 vs 20 µs), a 128³ one faster (40 vs 46 µs).
pub const GEMM_PAR_MIN: usize = 1 << 21;

/// Element types with a GEMM.
pub trait GemmFloat: Float {
    /// The micro-kernel for this machine.
    fn kernel() -> MicroKernel<Self>;
    /// The micro-kernel for a product with `m` rows: where the machine has a shorter variant
    /// that pads fewer rows (64 rows: 8 panels of 8 instead of 6 panels of 12), that one.
    fn kernel_for(m: usize) -> MicroKernel<Self> {
        let _ = m;
        Self::kernel()
    }
}

impl GemmFloat for f32 {
    fn kernel_for(m: usize) -> MicroKernel<f32> {
        let k = Self::kernel();
        #[cfg(target_arch = "x86_64")]
        if k.mr == 12 && m <= 512 && m.next_multiple_of(8) - m < m.next_multiple_of(12) - m {
            return MicroKernel {
                mr: 8,
                nr: 32,
                pack_a: pack::<f32, 8>,
                pack_b: pack::<f32, 32>,
                run: micro::sgemm_avx512_8x32,
                name: "avx512-8x32",
            };
        }
        k
    }
    fn kernel() -> MicroKernel<f32> {
        match simd_level() {
            #[cfg(target_arch = "x86_64")]
            SimdLevel::Avx512 => MicroKernel {
                mr: 12,
                nr: 32,
                pack_a: pack::<f32, 12>,
                pack_b: pack::<f32, 32>,
                run: micro::sgemm_avx512_12x32,
                name: "avx512-12x32",
            },
            #[cfg(target_arch = "x86_64")]
            SimdLevel::Avx2 => MicroKernel {
                mr: 6,
                nr: 16,
                pack_a: pack::<f32, 6>,
                pack_b: pack::<f32, 16>,
                run: micro::sgemm_avx2_6x16,
                name: "avx2-6x16",
            },
            _ => MicroKernel {
                mr: 4,
                nr: 16,
                pack_a: pack::<f32, 4>,
                pack_b: pack::<f32, 16>,
                run: micro::sgemm_portable,
                name: "portable-4x16",
            },
        }
    }
}

impl GemmFloat for f64 {
    fn kernel() -> MicroKernel<f64> {
        match simd_level() {
            #[cfg(target_arch = "x86_64")]
            SimdLevel::Avx512 => MicroKernel {
                mr: 12,
                nr: 16,
                pack_a: pack::<f64, 12>,
                pack_b: pack::<f64, 16>,
                run: micro::dgemm_avx512_12x16,
                name: "avx512-12x16",
            },
            #[cfg(target_arch = "x86_64")]
            SimdLevel::Avx2 => MicroKernel {
                mr: 6,
                nr: 8,
                pack_a: pack::<f64, 6>,
                pack_b: pack::<f64, 8>,
                run: micro::dgemm_avx2_6x8,
                name: "avx2-6x8",
            },
            _ => MicroKernel {
                mr: 4,
                nr: 8,
                pack_a: pack::<f64, 4>,
                pack_b: pack::<f64, 8>,
                run: micro::dgemm_portable,
                name: "portable-4x8",
            },
        }
    }
}

/// The f32 micro-kernel this machine uses (for the benchmark's header line).
pub fn sgemm_kernel_name() -> &'static str {
    f32::kernel().name
}

/// Single-precision GEMM: `C = alpha · A·B + beta · C`.
///
/// Element `(i, p)` of A is at `a + i·rsa + p·csa`, and likewise for B and C. With
/// `beta == 0` C is only written. `parallel` allows the thread pool to be used (callers that
/// already run one product per thread pass `false`).
///
/// # Safety
/// Every element addressed through the pointers and strides for the given sizes must be
/// valid (C for writes, A and B for reads), and C must not overlap A or B.
#[allow(clippy::too_many_arguments)]
pub unsafe fn sgemm(
    m: usize,
    n: usize,
    k: usize,
    alpha: f32,
    a: *const f32,
    rsa: isize,
    csa: isize,
    b: *const f32,
    rsb: isize,
    csb: isize,
    beta: f32,
    c: *mut f32,
    rsc: isize,
    csc: isize,
    parallel: bool,
) {
    // SAFETY: forwarded contract.
    unsafe {
        gemm(
            m, n, k, alpha, a, rsa, csa, b, rsb, csb, beta, c, rsc, csc, parallel,
        )
    }
}

/// Double-precision GEMM; see [`sgemm`].
///
/// # Safety
/// As [`sgemm`].
#[allow(clippy::too_many_arguments)]
pub unsafe fn dgemm(
    m: usize,
    n: usize,
    k: usize,
    alpha: f64,
    a: *const f64,
    rsa: isize,
    csa: isize,
    b: *const f64,
    rsb: isize,
    csb: isize,
    beta: f64,
    c: *mut f64,
    rsc: isize,
    csc: isize,
    parallel: bool,
) {
    // SAFETY: forwarded contract.
    unsafe {
        gemm(
            m, n, k, alpha, a, rsa, csa, b, rsb, csb, beta, c, rsc, csc, parallel,
        )
    }
}

/// `C = alpha · A·B + beta · C` for any [`GemmFloat`]; see [`sgemm`].
///
/// # Safety
/// As [`sgemm`].
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm<T: GemmFloat>(
    m: usize,
    n: usize,
    k: usize,
    alpha: T,
    a: *const T,
    rsa: isize,
    csa: isize,
    b: *const T,
    rsb: isize,
    csb: isize,
    beta: T,
    c: *mut T,
    rsc: isize,
    csc: isize,
    parallel: bool,
) {
    // SAFETY: forwarded contract.
    unsafe {
        gemm_impl(
            m, n, k, alpha, a, rsa, csa, b, rsb, csb, beta, c, rsc, csc, parallel, None,
        )
    }
}

/// `C = A·B + bias`, the bias (`n` values, one per column of C) added to each tile of C as
/// the tile's last product is stored, while it is in cache: a `Linear` layer's forward in
/// one pass over its output.
///
/// # Safety
/// As [`sgemm`]; `bias` must point to `n` readable elements.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_bias<T: GemmFloat>(
    m: usize,
    n: usize,
    k: usize,
    a: *const T,
    rsa: isize,
    csa: isize,
    b: *const T,
    rsb: isize,
    csb: isize,
    c: *mut T,
    rsc: isize,
    csc: isize,
    bias: *const T,
    parallel: bool,
) {
    // SAFETY: forwarded contract.
    unsafe {
        gemm_impl(
            m,
            n,
            k,
            T::ONE,
            a,
            rsa,
            csa,
            b,
            rsb,
            csb,
            T::ZERO,
            c,
            rsc,
            csc,
            parallel,
            Some(SendPtr(bias as *mut T)),
        )
    }
}

/// Add `bias[j]` to column `j` of the `rows × cols` block of C at `c`.
///
/// # Safety
/// The block must be inside C and `bias` must hold `cols` elements.
unsafe fn add_bias<T: Float>(
    c: *mut T,
    rows: usize,
    cols: usize,
    rsc: isize,
    csc: isize,
    bias: *const T,
) {
    // SAFETY: the caller guarantees `cols` bias values.
    let bias = unsafe { std::slice::from_raw_parts(bias, cols) };
    with_simd(
        #[inline(always)]
        || {
            for i in 0..rows {
                if csc == 1 {
                    // SAFETY: row i's `cols` contiguous values are inside C.
                    let row =
                        unsafe { std::slice::from_raw_parts_mut(c.offset(i as isize * rsc), cols) };
                    for (x, &b) in row.iter_mut().zip(bias) {
                        *x += b;
                    }
                } else {
                    for (j, &b) in bias.iter().enumerate() {
                        // SAFETY: inside C by the caller's contract.
                        unsafe { *c.offset(i as isize * rsc + j as isize * csc) += b };
                    }
                }
            }
        },
    )
}

/// [`gemm`] with an optional column bias (see [`gemm_bias`]).
///
/// # Safety
/// As [`gemm_bias`].
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_impl<T: GemmFloat>(
    m: usize,
    n: usize,
    k: usize,
    alpha: T,
    a: *const T,
    rsa: isize,
    csa: isize,
    b: *const T,
    rsb: isize,
    csb: isize,
    beta: T,
    c: *mut T,
    rsc: isize,
    csc: isize,
    parallel: bool,
    bias: Option<SendPtr<T>>,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 || alpha == T::ZERO {
        for i in 0..m {
            for j in 0..n {
                // SAFETY: inside C by the caller's contract.
                unsafe {
                    let cp = c.offset(i as isize * rsc + j as isize * csc);
                    *cp = if beta == T::ZERO { T::ZERO } else { beta * *cp };
                }
            }
        }
        if let Some(bias) = bias {
            // SAFETY: forwarded contract.
            unsafe { add_bias(c, m, n, rsc, csc, bias.get()) };
        }
        return;
    }
    if m <= GEMV_MAX_M && rsb == 1 && csb != 1 {
        // SAFETY: forwarded contract.
        unsafe {
            gemv_rows(
                m, n, k, alpha, a, rsa, csa, b, csb, beta, c, rsc, csc, parallel,
            );
            if let Some(bias) = bias {
                add_bias(c, m, n, rsc, csc, bias.get());
            }
        }
        return;
    }
    let kern = T::kernel_for(m);
    let (mr, nr) = (kern.mr, kern.nr);
    let size = std::mem::size_of::<T>();
    let kc_max = KC_BYTES / size;
    let nc_max = NC_ELEMS_F32 * 4 / size;
    let mc_max = MC_ELEMS_F32 * 4 / size;
    debug_assert!(nc_max.is_multiple_of(nr) && mc_max.is_multiple_of(mr));
    let threads = if parallel && m * n * k >= GEMM_PAR_MIN {
        num_threads()
    } else {
        1
    };

    if threads > 1 && rayon::current_thread_index().is_none() {
        // One hop into the pool for the whole product, not one per block.
        let (a, b, c) = (SendPtr(a as *mut T), SendPtr(b as *mut T), SendPtr(c));
        // SAFETY: forwarded contract; `install` returns only when the product is done.
        return install(|| unsafe {
            gemm_impl(
                m,
                n,
                k,
                alpha,
                a.get(),
                rsa,
                csa,
                b.get(),
                rsb,
                csb,
                beta,
                c.get(),
                rsc,
                csc,
                parallel,
                bias,
            )
        });
    }
    if threads > 1 && m <= SMALL_M && n >= 2 * threads * nr {
        // Few rows (a recurrent step, a decoding step): each thread takes a range of whole
        // columns and runs the product serially, packing the small A itself. One fork-join
        // instead of two per `NC` block of B.
        let per = n.div_ceil(nr).div_ceil(threads) * nr;
        let (a, b, c) = (SendPtr(a as *mut T), SendPtr(b as *mut T), SendPtr(c));
        (0..threads).into_par_iter().for_each(|p| {
            let j0 = p * per;
            if j0 < n {
                // SAFETY: columns j0..j0+len of B and C are inside them by the caller's
                // contract; the threads write disjoint columns of C.
                unsafe {
                    gemm_impl(
                        m,
                        per.min(n - j0),
                        k,
                        alpha,
                        a.get(),
                        rsa,
                        csa,
                        b.get().offset(j0 as isize * csb),
                        rsb,
                        csb,
                        beta,
                        c.get().offset(j0 as isize * csc),
                        rsc,
                        csc,
                        false,
                        bias.map(|p| SendPtr(p.get().add(j0))),
                    )
                }
            }
        });
        return;
    }
    // Packing buffers from the thread's scratch pool (kept across calls; a nested GEMM run
    // by work stealing gets buffers of its own).
    let a_len = mc_max.min(m.next_multiple_of(mr)) * kc_max;
    let b_len = nc_max.min(n.next_multiple_of(nr)) * kc_max;
    with_scratch::<T, _>(a_len, |abuf| {
        with_scratch::<T, _>(b_len, |bbuf| {
            let (a_pack, b_pack) = (SendPtr(abuf.as_mut_ptr()), SendPtr(bbuf.as_mut_ptr()));
            let (a, b, c) = (SendPtr(a as *mut T), SendPtr(b as *mut T), SendPtr(c));
            // SAFETY: forwarded contract; the packed buffers hold a_len and b_len elements.
            unsafe {
                blocked(
                    &kern,
                    (m, n, k),
                    alpha,
                    (a, rsa, csa),
                    (b, rsb, csb),
                    beta,
                    (c, rsc, csc),
                    threads,
                    (a_pack, b_pack),
                    bias,
                )
            }
        })
    });
}

/// The blocked loops of [`gemm`] over packed buffers `a_pack` (`MC × KC`) and `b_pack`
/// (`KC × NC`).
///
/// # Safety
/// As [`gemm`]; the packed buffers must hold those sizes.
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
unsafe fn blocked<T: GemmFloat>(
    kern: &MicroKernel<T>,
    (m, n, k): (usize, usize, usize),
    alpha: T,
    (a, rsa, csa): (SendPtr<T>, isize, isize),
    (b, rsb, csb): (SendPtr<T>, isize, isize),
    beta: T,
    (c, rsc, csc): (SendPtr<T>, isize, isize),
    threads: usize,
    (a_pack, b_pack): (SendPtr<T>, SendPtr<T>),
    bias: Option<SendPtr<T>>,
) {
    let (mr, nr) = (kern.mr, kern.nr);
    let size = std::mem::size_of::<T>();
    let kc_max = KC_BYTES / size;
    let nc_max = NC_ELEMS_F32 * 4 / size;
    let mc_max = MC_ELEMS_F32 * 4 / size;
    for ic in (0..m).step_by(mc_max) {
        let mc = mc_max.min(m - ic);
        let a_panels = mc.div_ceil(mr);
        for pc in (0..k).step_by(kc_max) {
            let kc = kc_max.min(k - pc);
            let beta_p = if pc == 0 { beta } else { T::ONE };
            // Pack the A block into MR-row micro-panels.
            let pack_a = |p: usize| {
                let rows = mr.min(mc - p * mr);
                // SAFETY: panel p of the buffer holds mr*kc elements; the source rows
                // ic+p*mr.. and columns pc.. are inside A.
                unsafe {
                    (kern.pack_a)(
                        a_pack.get().add(p * mr * kc),
                        rows,
                        kc,
                        a.get()
                            .offset((ic + p * mr) as isize * rsa + pc as isize * csa),
                        rsa,
                        csa,
                    )
                }
            };
            run_parts(threads, a_panels, pack_a);
            for jc in (0..n).step_by(nc_max) {
                let nc = nc_max.min(n - jc);
                let b_panels = nc.div_ceil(nr);
                // Pack the B block into NR-column micro-panels (B's columns are the
                // panels' rows, hence the swapped strides).
                let pack_b = |q: usize| {
                    let cols = nr.min(nc - q * nr);
                    // SAFETY: as for A.
                    unsafe {
                        (kern.pack_b)(
                            b_pack.get().add(q * nr * kc),
                            cols,
                            kc,
                            b.get()
                                .offset(pc as isize * rsb + (jc + q * nr) as isize * csb),
                            csb,
                            rsb,
                        )
                    }
                };
                run_parts(threads, b_panels, pack_b);
                // Tiles: split A's micro-panels between threads, or B's when A has too few.
                let split_a = a_panels >= threads || a_panels >= b_panels;
                let parts = threads.min(if split_a { a_panels } else { b_panels });
                let tile = |p: usize, q: usize| {
                    let rows = mr.min(mc - p * mr);
                    let cols = nr.min(nc - q * nr);
                    // SAFETY: the packed panels hold kc*mr and kc*nr elements; the tile's
                    // rows and columns are inside C.
                    unsafe {
                        tile_update(
                            kern,
                            kc,
                            a_pack.get().add(p * mr * kc),
                            b_pack.get().add(q * nr * kc),
                            c.get().offset(
                                (ic + p * mr) as isize * rsc + (jc + q * nr) as isize * csc,
                            ),
                            rows,
                            cols,
                            rsc,
                            csc,
                            alpha,
                            beta_p,
                        );
                        // The tile is final after the last KC block: add the bias while it is
                        // in cache.
                        if let Some(bias) = bias.filter(|_| pc + kc == k) {
                            let j = jc + q * nr;
                            add_bias(
                                c.get()
                                    .offset((ic + p * mr) as isize * rsc + j as isize * csc),
                                rows,
                                cols,
                                rsc,
                                csc,
                                bias.get().add(j),
                            );
                        }
                    }
                };
                let work = |part: usize| {
                    let (total, other) = if split_a {
                        (a_panels, b_panels)
                    } else {
                        (b_panels, a_panels)
                    };
                    let (lo, hi) = (part * total / parts, (part + 1) * total / parts);
                    if split_a {
                        for p in lo..hi {
                            for q in 0..other {
                                tile(p, q);
                            }
                        }
                    } else {
                        for p in 0..other {
                            for q in lo..hi {
                                tile(p, q);
                            }
                        }
                    }
                };
                if parts > 1 {
                    install(|| (0..parts).into_par_iter().for_each(work));
                } else {
                    work(0);
                }
            }
        }
    }
}

/// A right-hand matrix packed once into the micro-kernel's column panels, for products that
/// reuse it: an RNN multiplies its recurrent weight by a new `h` at every time step, and
/// packing that weight once per sequence instead of once per step also keeps it in each
/// thread's cache across steps.
pub struct PackedB<T: GemmFloat> {
    kern: MicroKernel<T>,
    k: usize,
    n: usize,
    /// `KC`-deep blocks, each holding every `NR`-column panel of those rows.
    data: Vec<T>,
}

impl<T: GemmFloat> PackedB<T> {
    /// Pack the `k × n` matrix whose element `(p, j)` is `f(p, j)`, for products with `m`
    /// rows (which picks the micro-kernel).
    pub fn from_fn(m: usize, k: usize, n: usize, f: impl Fn(usize, usize) -> T) -> Self {
        let kern = T::kernel_for(m);
        let nr = kern.nr;
        let kc_max = KC_BYTES / std::mem::size_of::<T>();
        let panels = n.div_ceil(nr);
        let mut data = vec![T::ZERO; panels * nr * k];
        for pc in (0..k).step_by(kc_max) {
            let kc = kc_max.min(k - pc);
            let block = &mut data[pc * panels * nr..(pc + kc) * panels * nr];
            for (q, panel) in block.chunks_exact_mut(nr * kc).enumerate() {
                for (p, row) in panel.chunks_exact_mut(nr).enumerate() {
                    for (i, v) in row.iter_mut().enumerate().take(n.saturating_sub(q * nr)) {
                        *v = f(pc + p, q * nr + i);
                    }
                }
            }
        }
        PackedB { kern, k, n, data }
    }

    /// A packed `k × n` matrix of zeros, for products with `m` rows, to be filled with
    /// [`PackedB::fill`].
    pub fn zeroed(m: usize, k: usize, n: usize) -> Self {
        let kern = T::kernel_for(m);
        let data = vec![T::ZERO; n.div_ceil(kern.nr) * kern.nr * k];
        PackedB { kern, k, n, data }
    }

    /// Set columns `col0..col0 + cols` to those of the strided `k × cols` matrix `src`, whose
    /// element `(p, j)` is `src[p·rs + j·cs]`. Whole panels are written (zeros past `cols` in
    /// the last one), with the GEMM's own packing (vector transposes where `rs` is 1), on
    /// every thread when the block is large: a per-element [`PackedB::from_fn`] of an LSTM's
    /// `W_hhᵀ` read one strided element at a time and took 0.5 ms of a 14 ms `lstm` step.
    ///
    /// # Panics
    /// If `col0` is not a multiple of [`PackedB::nr`], the columns run past `n`, or `src` is
    /// too short for the strides.
    pub fn fill(&mut self, col0: usize, cols: usize, src: &[T], rs: usize, cs: usize) {
        let (k, nr) = (self.k, self.kern.nr);
        assert!(
            col0.is_multiple_of(nr) && col0 + cols <= self.n,
            "PackedB::fill: columns {col0}..{} of {}",
            col0 + cols,
            self.n
        );
        if k == 0 || cols == 0 {
            return;
        }
        assert!(
            (k - 1) * rs + (cols - 1) * cs < src.len(),
            "PackedB::fill: source of {} elements",
            src.len()
        );
        let kc_max = KC_BYTES / std::mem::size_of::<T>();
        let (panels, own) = (self.n.div_ceil(nr), cols.div_ceil(nr));
        let blocks = k.div_ceil(kc_max);
        let (dst, pack_b) = (SendPtr(self.data.as_mut_ptr()), self.kern.pack_b);
        let src_p = SendPtr(src.as_ptr() as *mut T);
        let threads = if k * cols >= 1 << 16 {
            num_threads()
        } else {
            1
        };
        run_parts(threads, blocks * own, |i| {
            let (pc, q) = ((i / own) * kc_max, i % own);
            let kc = kc_max.min(k - pc);
            let panel = col0 / nr + q;
            // SAFETY: panel `panel` of the KC block at `pc` holds nr·kc elements inside `data`,
            // written by this part alone; the source elements (pc.., q·nr..) with the live
            // columns (at most cols − q·nr) are inside `src` by the assertion above.
            unsafe {
                pack_b(
                    dst.get().add(pc * panels * nr + panel * nr * kc),
                    nr.min(cols - q * nr),
                    kc,
                    src_p.get().add(pc * rs + q * nr * cs),
                    cs as isize,
                    rs as isize,
                )
            }
        });
    }

    /// Columns per panel: column ranges given to [`PackedB::mul`] start at a multiple of it.
    pub fn nr(&self) -> usize {
        self.kern.nr
    }

    /// `C[:, r] = A · B[:, r]` for each column range `r` in `cols`, on the calling thread, for
    /// the `m × k` matrix `A` (any strides; `m` as given to [`PackedB::from_fn`] or fewer) and
    /// `C` with row stride `rsc` and unit column stride. `A` is packed once for all ranges.
    ///
    /// # Safety
    /// Every element of `A` must be readable and every element of `C` in the given rows and
    /// columns writable, and no other thread may write `A` or those elements of `C` meanwhile.
    /// Each range must start at a multiple of [`PackedB::nr`] and end at most at `n`.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn mul(
        &self,
        m: usize,
        a: *const T,
        rsa: isize,
        csa: isize,
        c: *mut T,
        rsc: isize,
        cols: &[std::ops::Range<usize>],
    ) {
        let (kern, k) = (&self.kern, self.k);
        let (mr, nr) = (kern.mr, kern.nr);
        let kc_max = KC_BYTES / std::mem::size_of::<T>();
        let panels = self.n.div_ceil(nr);
        let a_panels = m.div_ceil(mr);
        with_scratch::<T, _>(a_panels * mr * kc_max.min(k), |abuf| {
            for pc in (0..k).step_by(kc_max) {
                let kc = kc_max.min(k - pc);
                for p in 0..a_panels {
                    // SAFETY: panel p of the buffer holds mr*kc elements; rows p*mr.. and
                    // columns pc.. of A are readable by the caller's contract.
                    unsafe {
                        (kern.pack_a)(
                            abuf.as_mut_ptr().add(p * mr * kc),
                            mr.min(m - p * mr),
                            kc,
                            a.offset((p * mr) as isize * rsa + pc as isize * csa),
                            rsa,
                            csa,
                        )
                    }
                }
                let block = &self.data[pc * panels * nr..(pc + kc) * panels * nr];
                let beta = if pc == 0 { T::ZERO } else { T::ONE };
                for r in cols {
                    debug_assert!(r.start.is_multiple_of(nr) && r.end <= self.n);
                    for q in r.start / nr..r.end.div_ceil(nr) {
                        let width = nr.min(r.end - q * nr);
                        for p in 0..a_panels {
                            // SAFETY: the packed panels hold kc*mr and kc*nr elements; the
                            // tile's rows and columns are writable by the caller's contract.
                            unsafe {
                                tile_update(
                                    kern,
                                    kc,
                                    abuf.as_ptr().add(p * mr * kc),
                                    block.as_ptr().add(q * nr * kc),
                                    c.offset((p * mr) as isize * rsc + (q * nr) as isize),
                                    mr.min(m - p * mr),
                                    width,
                                    rsc,
                                    1,
                                    T::ONE,
                                    beta,
                                )
                            }
                        }
                    }
                }
            }
        })
    }
}

/// Run `f(i)` for `i in 0..n`, spread over `threads` threads when more than one.
fn run_parts(threads: usize, n: usize, f: impl Fn(usize) + Sync) {
    if threads > 1 && n > 1 {
        install(|| (0..n).into_par_iter().for_each(&f));
    } else {
        (0..n).for_each(f);
    }
}

/// Pack `len` lines of a matrix into one micro-panel of width `W`: for each of `kc` steps,
/// `W` consecutive values (line `i`'s value at `src + i·line_stride + p·step_stride`), zero
/// beyond `len`.
///
/// # Safety
/// `dst` must hold `W * kc` elements and every addressed source element must be valid.
pub(crate) unsafe fn pack<T: Float, const W: usize>(
    dst: *mut T,
    len: usize,
    kc: usize,
    src: *const T,
    line_stride: isize,
    step_stride: isize,
) {
    if step_stride == 1 && line_stride != 1 && len == W {
        // SAFETY: forwarded contract.
        return with_simd(
            #[inline(always)]
            || unsafe { pack_transposed::<T, W>(dst, kc, src, line_stride) },
        );
    }
    // SAFETY: the caller guarantees the destination length.
    let dst = unsafe { std::slice::from_raw_parts_mut(dst, W * kc) };
    for (p, out) in dst.chunks_exact_mut(W).enumerate() {
        // SAFETY: step p of the source is inside by the caller's contract.
        let base = unsafe { src.offset(p as isize * step_stride) };
        if line_stride == 1 && len == W {
            // SAFETY: values 0..W of this step are contiguous and inside.
            let line: &[T; W] = unsafe { &*base.cast() };
            out.copy_from_slice(line);
        } else {
            for (i, o) in out[..len].iter_mut().enumerate() {
                // SAFETY: as above.
                *o = unsafe { *base.offset(i as isize * line_stride) };
            }
            out[len..].fill(T::ZERO);
        }
    }
}

/// [`pack`] of `W` full lines whose steps are contiguous (a row-major A, or a transposed B such
/// as a `Linear`'s `Wᵀ`): 8 steps of every line are read as one contiguous run each and
/// written out transposed, which the compiler turns into vector loads and shuffles instead of
/// one scalar load and store per element (the plain loop took 15% of the `gpt` step).
///
/// # Safety
/// As [`pack`] with `len == W` and a step stride of 1.
#[inline(always)]
unsafe fn pack_transposed<T: Float, const W: usize>(
    dst: *mut T,
    kc: usize,
    src: *const T,
    line_stride: isize,
) {
    const S: usize = 8;
    // SAFETY: the caller guarantees the destination length.
    let dst = unsafe { std::slice::from_raw_parts_mut(dst, W * kc) };
    let full = kc - kc % S;
    for p0 in (0..full).step_by(S) {
        let mut block = [[T::ZERO; S]; W];
        for (i, line) in block.iter_mut().enumerate() {
            // SAFETY: steps p0..p0+S of line i are contiguous and inside the source.
            *line = unsafe {
                std::ptr::read_unaligned(
                    src.offset(i as isize * line_stride + p0 as isize)
                        .cast::<[T; S]>(),
                )
            };
        }
        let out = &mut dst[p0 * W..(p0 + S) * W];
        for p in 0..S {
            for i in 0..W {
                out[p * W + i] = block[i][p];
            }
        }
    }
    for p in full..kc {
        for i in 0..W {
            // SAFETY: step p of line i is inside the source.
            dst[p * W + i] = unsafe { *src.offset(i as isize * line_stride + p as isize) };
        }
    }
}

/// Update one `rows × cols` tile of C from packed panels; partial tiles and C with a column
/// stride go through a scratch tile.
///
/// # Safety
/// As the micro-kernel's contract, for the valid part of the tile.
#[allow(clippy::too_many_arguments)]
unsafe fn tile_update<T: GemmFloat>(
    kern: &MicroKernel<T>,
    kc: usize,
    a: *const T,
    b: *const T,
    c: *mut T,
    rows: usize,
    cols: usize,
    rsc: isize,
    csc: isize,
    alpha: T,
    beta: T,
) {
    if rows == kern.mr && cols == kern.nr && csc == 1 && rsc >= 0 {
        // SAFETY: a full tile with unit column stride.
        unsafe { (kern.run)(kc, a, b, c, rsc as usize, alpha, beta) };
        return;
    }
    let mut scratch = [T::ZERO; 12 * 32];
    debug_assert!(kern.mr * kern.nr <= scratch.len());
    // SAFETY: the scratch tile is mr x nr with row stride nr.
    unsafe { (kern.run)(kc, a, b, scratch.as_mut_ptr(), kern.nr, T::ONE, T::ZERO) };
    for i in 0..rows {
        for j in 0..cols {
            // SAFETY: inside the valid part of the tile.
            unsafe {
                let cp = c.offset(i as isize * rsc + j as isize * csc);
                let v = alpha * scratch[i * kern.nr + j];
                *cp = if beta == T::ZERO { v } else { v + beta * *cp };
            }
        }
    }
}

/// Products with at most this many rows whose B is a transposed row-major matrix run as dot
/// products ([`gemv_rows`]).
const GEMV_MAX_M: usize = 4;
/// Columns of one parallel task of [`gemv_rows`].
const GEMV_COLS: usize = 64;

/// `C = alpha · A·B + beta · C` for a few rows of A and `B = Wᵀ` with `W` row-major (`rsb` =
/// 1): every element of C is a dot product of a row of A with a row of W. This streams W once
/// without packing it — what decoding (one token's activations times every weight matrix)
/// and other few-row products need, being bound by reading the weights.
///
/// # Safety
/// As [`sgemm`], with `rsb == 1`.
#[allow(clippy::too_many_arguments)]
unsafe fn gemv_rows<T: GemmFloat>(
    m: usize,
    n: usize,
    k: usize,
    alpha: T,
    a: *const T,
    rsa: isize,
    csa: isize,
    b: *const T,
    csb: isize,
    beta: T,
    c: *mut T,
    rsc: isize,
    csc: isize,
    parallel: bool,
) {
    // The rows of A, contiguous (a copy only when A is strided).
    let mut rows = Vec::with_capacity(m * k);
    for i in 0..m {
        for l in 0..k {
            // SAFETY: inside A by the caller's contract.
            rows.push(unsafe { *a.offset(i as isize * rsa + l as isize * csa) });
        }
    }
    let rows = &rows;
    let (b, c) = (SendPtr(b as *mut T), SendPtr(c));
    let block = |j0: usize, j1: usize| {
        super::with_simd(|| {
            for j in j0..j1 {
                // SAFETY: row j of W (column j of B) holds k elements from b + j·csb.
                let w = unsafe { std::slice::from_raw_parts(b.get().offset(j as isize * csb), k) };
                for i in 0..m {
                    let d = dot(&rows[i * k..(i + 1) * k], w);
                    // SAFETY: inside C by the caller's contract; tasks write disjoint columns.
                    unsafe {
                        let cp = c.get().offset(i as isize * rsc + j as isize * csc);
                        *cp = if beta == T::ZERO {
                            alpha * d
                        } else {
                            alpha * d + beta * *cp
                        };
                    }
                }
            }
        })
    };
    let tasks = n.div_ceil(GEMV_COLS);
    if parallel && tasks > 1 && m * n * k >= GEMV_PAR_MIN && num_threads() > 1 {
        install(|| {
            (0..tasks)
                .into_par_iter()
                .for_each(|t| block(t * GEMV_COLS, ((t + 1) * GEMV_COLS).min(n)))
        });
    } else {
        block(0, n);
    }
}

/// Multiply-adds above which [`gemv_rows`] splits its columns between threads (one weight
/// matrix of a small model's decoding step is ~3·10⁵).
const GEMV_PAR_MIN: usize = 1 << 15;

/// `Σ x_l·y_l` with 16 independent partial sums (vectorised under [`super::with_simd`]).
#[inline(always)]
fn dot<T: Float>(x: &[T], y: &[T]) -> T {
    const L: usize = 16;
    let n = x.len().min(y.len());
    let (x, y) = (&x[..n], &y[..n]);
    let mut acc = [T::ZERO; L];
    let mut xc = x.chunks_exact(L);
    let mut yc = y.chunks_exact(L);
    for (xs, ys) in (&mut xc).zip(&mut yc) {
        for l in 0..L {
            acc[l] += xs[l] * ys[l];
        }
    }
    let mut tail = T::ZERO;
    for (&p, &q) in xc.remainder().iter().zip(yc.remainder()) {
        tail += p * q;
    }
    // Pairwise sum of the lanes.
    let mut w = L;
    while w > 1 {
        w /= 2;
        for l in 0..w {
            acc[l] += acc[l + w];
        }
    }
    acc[0] + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reference product in f64.
    #[allow(clippy::too_many_arguments)]
    fn reference(
        m: usize,
        n: usize,
        k: usize,
        a: &[f64],
        (rsa, csa): (usize, usize),
        b: &[f64],
        (rsb, csb): (usize, usize),
    ) -> Vec<f64> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k)
                    .map(|p| a[i * rsa + p * csa] * b[p * rsb + j * csb])
                    .sum();
            }
        }
        c
    }

    use crate::kernels::test_data as data;

    /// Every shape class (edges in m, n and k, several k blocks, A/B transposed, alpha/beta)
    /// for both element types and every kernel this machine has.
    #[test]
    fn matches_reference() {
        let shapes = [
            (1, 1, 1),
            (3, 5, 7),
            (12, 32, 16),
            (13, 33, 17),
            (25, 70, 400),
            (100, 3, 50),
            (2, 500, 30),
            (61, 97, 800),
            (40, 1000, 300),
            // Few rows times a transposed B: the dot-product path, serial and parallel.
            (4, 700, 576),
            (1, 1000, 100),
            (5, 130, 70),
        ];
        for level in ["plain", "avx2", ""] {
            super::super::set_simd_cap_for_tests(level);
            for &(m, n, k) in &shapes {
                for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                    let a = data(m * k, (m * 7 + k) as u64);
                    let b = data(k * n, (n * 3 + k) as u64);
                    let sa = if ta { (1, m) } else { (k, 1) };
                    let sb = if tb { (1, k) } else { (n, 1) };
                    let want = reference(m, n, k, &a, sa, &b, sb);
                    let c0 = data(m * n, 99);
                    for (alpha, beta) in [(1.0, 0.0), (0.5, 2.0)] {
                        // f64
                        let mut c = c0.clone();
                        // SAFETY: all buffers match the sizes and strides.
                        unsafe {
                            dgemm(
                                m,
                                n,
                                k,
                                alpha,
                                a.as_ptr(),
                                sa.0 as isize,
                                sa.1 as isize,
                                b.as_ptr(),
                                sb.0 as isize,
                                sb.1 as isize,
                                beta,
                                c.as_mut_ptr(),
                                n as isize,
                                1,
                                true,
                            )
                        };
                        for i in 0..m * n {
                            let w = alpha * want[i] + beta * c0[i];
                            assert!(
                                (c[i] - w).abs() < 1e-9 * (1.0 + w.abs()),
                                "f64 {level} {m}x{n}x{k}"
                            );
                        }
                        // f32
                        let (a32, b32): (Vec<f32>, Vec<f32>) = (
                            a.iter().map(|&x| x as f32).collect(),
                            b.iter().map(|&x| x as f32).collect(),
                        );
                        let mut c32: Vec<f32> = c0.iter().map(|&x| x as f32).collect();
                        // SAFETY: as above.
                        unsafe {
                            sgemm(
                                m,
                                n,
                                k,
                                alpha as f32,
                                a32.as_ptr(),
                                sa.0 as isize,
                                sa.1 as isize,
                                b32.as_ptr(),
                                sb.0 as isize,
                                sb.1 as isize,
                                beta as f32,
                                c32.as_mut_ptr(),
                                n as isize,
                                1,
                                true,
                            )
                        };
                        for i in 0..m * n {
                            let w = alpha * want[i] + beta * c0[i];
                            let tol = 1e-5 * (k as f64).sqrt() * (1.0 + w.abs());
                            assert!(
                                (c32[i] as f64 - w).abs() < tol,
                                "f32 {level} {m}x{n}x{k}: {} vs {w}",
                                c32[i]
                            );
                        }
                    }
                }
            }
        }
        super::super::set_simd_cap_for_tests("");
    }

    #[test]
    fn beta_zero_ignores_nan_and_strided_c() {
        let (m, n, k) = (7, 9, 5);
        let a = vec![1.0f32; m * k];
        let b = vec![2.0f32; k * n];
        // C column-major (csc = m), pre-filled with NaN.
        let mut c = vec![f32::NAN; m * n];
        // SAFETY: sizes and strides match the buffers.
        unsafe {
            sgemm(
                m,
                n,
                k,
                1.0,
                a.as_ptr(),
                k as isize,
                1,
                b.as_ptr(),
                n as isize,
                1,
                0.0,
                c.as_mut_ptr(),
                1,
                m as isize,
                false,
            )
        };
        assert!(c.iter().all(|&v| v == 10.0));
    }
}
