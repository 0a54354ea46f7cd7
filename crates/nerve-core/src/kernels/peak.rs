//! The machine's f32 multiply-add peak, measured: the ceiling every GEMM-bound figure is read
//! against (a GEMM at 450 GFLOP/s is 85% of a 530 GFLOP/s machine, and a workload whose
//! step needs `F` FLOP cannot run faster than `F / peak`).

use std::hint::black_box;
use std::time::Instant;

use rayon::prelude::*;

use super::with_simd;
use crate::threading::install;

/// Independent accumulator rows: 12 vectors of 16 lanes, more than the FMA latency times the
/// FMA pipes (4 × 2 on current x86 cores) so the pipes never wait on a result.
const CHAINS: usize = 12;
/// Lanes per accumulator row (one AVX-512 register; two AVX2 ones).
const LANES: usize = 16;
/// Multiply-adds per call of [`chains`] between timer reads.
const ITERS: usize = 1 << 16;

/// `ITERS` rounds of `x = x·a + b` over `CHAINS × LANES` independent values, compiled for the
/// best SIMD level (one fused multiply-add instruction per register per round).
#[inline(always)]
fn chains(acc: &mut [f32; CHAINS * LANES], a: f32, b: f32) {
    // A local copy, so the values live in registers across the rounds.
    let mut v = *acc;
    for _ in 0..ITERS {
        for x in v.iter_mut() {
            *x = x.mul_add(a, b);
        }
    }
    *acc = v;
}

/// FLOP/s of one thread running fused multiply-adds for about `secs` seconds.
fn one_thread(secs: f64) -> f64 {
    let mut acc = [1.0f32; CHAINS * LANES];
    // x → 0.999·x + 0.001 stays near 1: no overflow, no subnormals.
    let (a, b) = (black_box(0.999f32), black_box(0.001f32));
    let start = Instant::now();
    let mut rounds = 0usize;
    while rounds == 0 || start.elapsed().as_secs_f64() < secs {
        with_simd(
            #[inline(always)]
            || chains(&mut acc, a, b),
        );
        black_box(&mut acc);
        rounds += 1;
    }
    let flop = (rounds * ITERS * CHAINS * LANES * 2) as f64;
    flop / start.elapsed().as_secs_f64()
}

/// The f32 fused multiply-add rate, in GFLOP/s, of `threads` threads of the kernel pool
/// running at once for about `secs` seconds (the sum over the threads).
pub fn fma_gflops(threads: usize, secs: f64) -> f64 {
    let threads = threads.max(1);
    let rates: Vec<f64> = install(|| {
        (0..threads)
            .into_par_iter()
            .map(|_| one_thread(secs))
            .collect()
    });
    rates.iter().sum::<f64>() / 1e9
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chains_compute_the_recurrence() {
        let mut acc = [1.0f32; CHAINS * LANES];
        acc[53] = 3.0;
        chains(&mut acc, 0.5, 1.0);
        // x → x/2 + 1 converges to 2 from any start.
        assert!(acc.iter().all(|&x| (x - 2.0).abs() < 1e-6));
        assert!(fma_gflops(1, 0.01) > 0.0);
    }
}
