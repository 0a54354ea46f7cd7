//! Micro-kernels: `C[MR×NR] = alpha · Σ_p a[p] ⊗ b[p] + beta · C` over packed panels.
//!
//! `a` holds `kc` columns of `MR` values (one per row of the tile), `b` holds `kc` rows of `NR`
//! values; both are packed contiguously by the caller. `c` is a full tile with row stride
//! `rsc` and column stride 1. With `beta == 0` the old `C` is never read (so NaN or garbage in
//! the output buffer does not leak through, as in BLAS and PyTorch).

/// Packs one micro-panel: `(dst, len, kc, src, line_stride, step_stride)`.
pub type PackFn<T> = unsafe fn(*mut T, usize, usize, *const T, isize, isize);

/// A micro-kernel, its tile shape and the packers for its panels.
#[derive(Clone, Copy)]
pub struct MicroKernel<T> {
    /// Rows of the tile.
    pub mr: usize,
    /// Columns of the tile.
    pub nr: usize,
    /// Packs `MR` rows of A (see `gemm::pack`).
    pub pack_a: PackFn<T>,
    /// Packs `NR` columns of B.
    pub pack_b: PackFn<T>,
    /// The kernel (see the module docs for its contract).
    pub run:
        unsafe fn(kc: usize, a: *const T, b: *const T, c: *mut T, rsc: usize, alpha: T, beta: T),
    /// Name printed by the benchmark.
    pub name: &'static str,
}

/// Portable kernel: plain loops over a register tile that LLVM vectorises for the baseline ISA.
macro_rules! portable_kernel {
    ($name:ident, $t:ty, $mr:expr, $nr:expr) => {
        /// # Safety
        /// `a` must hold `kc * MR` values, `b` `kc * NR` values, and `c` a full `MR × NR` tile
        /// with row stride `rsc`.
        pub unsafe fn $name(
            kc: usize,
            a: *const $t,
            b: *const $t,
            c: *mut $t,
            rsc: usize,
            alpha: $t,
            beta: $t,
        ) {
            const MR: usize = $mr;
            const NR: usize = $nr;
            // SAFETY: the caller guarantees the panel lengths.
            let (a, b) = unsafe {
                (
                    std::slice::from_raw_parts(a, kc * MR),
                    std::slice::from_raw_parts(b, kc * NR),
                )
            };
            let mut acc = [[0.0 as $t; NR]; MR];
            for (ap, bp) in a.chunks_exact(MR).zip(b.chunks_exact(NR)) {
                for r in 0..MR {
                    for j in 0..NR {
                        acc[r][j] += ap[r] * bp[j];
                    }
                }
            }
            for (r, row) in acc.iter().enumerate() {
                for (j, &v) in row.iter().enumerate() {
                    // SAFETY: inside the tile the caller guarantees.
                    let cp = unsafe { c.add(r * rsc + j) };
                    // SAFETY: as above.
                    unsafe {
                        *cp = if beta == 0.0 {
                            alpha * v
                        } else {
                            alpha * v + beta * *cp
                        }
                    };
                }
            }
        }
    };
}

portable_kernel!(sgemm_portable, f32, 4, 16);
portable_kernel!(dgemm_portable, f64, 4, 8);

/// An x86 SIMD kernel: `MR` rows by `NV` vectors of `LANES` columns, accumulators kept in
/// registers, the A value broadcast (folded into the FMA as an embedded broadcast on AVX-512).
#[cfg(target_arch = "x86_64")]
macro_rules! simd_kernel {
    ($name:ident, $t:ty, $feat:literal, $v:ty, $lanes:expr, $mr:expr, $nv:expr,
     $zero:ident, $set1:ident, $load:ident, $store:ident, $fma:ident, $mul:ident) => {
        /// # Safety
        /// The CPU must support the kernel's target features; `a` must hold `kc * MR` values,
        /// `b` `kc * NR` values, and `c` a full `MR × NR` tile with row stride `rsc`.
        #[target_feature(enable = $feat)]
        pub unsafe fn $name(
            kc: usize,
            a: *const $t,
            b: *const $t,
            c: *mut $t,
            rsc: usize,
            alpha: $t,
            beta: $t,
        ) {
            use std::arch::x86_64::*;
            const MR: usize = $mr;
            const NV: usize = $nv;
            const NR: usize = NV * $lanes;
            let mut acc: [[$v; NV]; MR] = [[$zero(); NV]; MR];
            let (mut a, mut b) = (a, b);
            for _ in 0..kc {
                // SAFETY: p < kc, so these reads stay inside the packed panels.
                unsafe {
                    let bv: [$v; NV] = std::array::from_fn(|v| $load(b.add(v * $lanes)));
                    for r in 0..MR {
                        let av = $set1(*a.add(r));
                        for v in 0..NV {
                            acc[r][v] = $fma(av, bv[v], acc[r][v]);
                        }
                    }
                    a = a.add(MR);
                    b = b.add(NR);
                }
            }
            let va = $set1(alpha);
            let vb = $set1(beta);
            for r in 0..MR {
                for v in 0..NV {
                    // SAFETY: inside the full tile the caller guarantees.
                    unsafe {
                        let cp = c.add(r * rsc + v * $lanes);
                        let x = $mul(acc[r][v], va);
                        let y = if beta == 0.0 {
                            x
                        } else {
                            $fma(vb, $load(cp), x)
                        };
                        $store(cp, y);
                    }
                }
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
simd_kernel!(
    sgemm_avx512_12x32,
    f32,
    "avx512f",
    __m512,
    16,
    12,
    2,
    _mm512_setzero_ps,
    _mm512_set1_ps,
    _mm512_loadu_ps,
    _mm512_storeu_ps,
    _mm512_fmadd_ps,
    _mm512_mul_ps
);
#[cfg(target_arch = "x86_64")]
simd_kernel!(
    sgemm_avx512_8x32,
    f32,
    "avx512f",
    __m512,
    16,
    8,
    2,
    _mm512_setzero_ps,
    _mm512_set1_ps,
    _mm512_loadu_ps,
    _mm512_storeu_ps,
    _mm512_fmadd_ps,
    _mm512_mul_ps
);
#[cfg(target_arch = "x86_64")]
simd_kernel!(
    sgemm_avx2_6x16,
    f32,
    "avx2,fma",
    __m256,
    8,
    6,
    2,
    _mm256_setzero_ps,
    _mm256_set1_ps,
    _mm256_loadu_ps,
    _mm256_storeu_ps,
    _mm256_fmadd_ps,
    _mm256_mul_ps
);
#[cfg(target_arch = "x86_64")]
simd_kernel!(
    dgemm_avx512_12x16,
    f64,
    "avx512f",
    __m512d,
    8,
    12,
    2,
    _mm512_setzero_pd,
    _mm512_set1_pd,
    _mm512_loadu_pd,
    _mm512_storeu_pd,
    _mm512_fmadd_pd,
    _mm512_mul_pd
);
#[cfg(target_arch = "x86_64")]
simd_kernel!(
    dgemm_avx2_6x8,
    f64,
    "avx2,fma",
    __m256d,
    4,
    6,
    2,
    _mm256_setzero_pd,
    _mm256_set1_pd,
    _mm256_loadu_pd,
    _mm256_storeu_pd,
    _mm256_fmadd_pd,
    _mm256_mul_pd
);
