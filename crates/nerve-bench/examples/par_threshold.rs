//! Measures where element-wise work starts to gain from a second thread: times `add` (cheap)
//! and `gelu` (transcendental) on one thread and on all threads, with the parallel threshold
//! forced to 1, for sizes from 1 Ki to 1 Mi elements. The crossover sets
//! `nerve_core::threading::PAR_ELEMWISE_MIN`. Then square matmuls on one and all threads (the
//! GEMM goes parallel from `nerve_core::kernels::gemm::GEMM_PAR_MIN` multiply-adds). Then square matmuls on one and all threads (the
//! GEMM goes parallel from `nerve_core::kernels::gemm::GEMM_PAR_MIN` multiply-adds).
//!
//! `cargo run --release -p nerve-bench --example par_threshold`

use std::time::Instant;

use nerve_core::threading::{set_num_threads, set_par_elemwise_min};
use nerve_core::{manual_seed, Result, Tensor};

/// Median time of `f` in microseconds.
fn time_us(mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    for _ in 0..20 {
        f()?;
    }
    let mut t = Vec::new();
    let start = Instant::now();
    while t.len() < 50 || start.elapsed().as_secs_f64() < 0.2 {
        let s = Instant::now();
        f()?;
        t.push(s.elapsed().as_secs_f64() * 1e6);
    }
    t.sort_by(f64::total_cmp);
    Ok(t[t.len() / 2])
}

fn main() -> Result<()> {
    manual_seed(0);
    let all = std::thread::available_parallelism().map_or(1, |n| n.get());
    set_par_elemwise_min(1);
    println!(
        "{:>9} {:>12} {:>12} {:>12} {:>12}",
        "elements", "add 1t us", "add Nt us", "gelu 1t us", "gelu Nt us"
    );
    for shift in 10..=20 {
        let n = 1usize << shift;
        let a = Tensor::randn([n]);
        let b = Tensor::randn([n]);
        let mut row = Vec::new();
        for threads in [1, all] {
            set_num_threads(threads);
            row.push(time_us(|| a.add(&b).map(drop))?);
        }
        for threads in [1, all] {
            set_num_threads(threads);
            row.push(time_us(|| a.gelu().map(drop))?);
        }
        println!(
            "{n:>9} {:>12.1} {:>12.1} {:>12.1} {:>12.1}",
            row[0], row[1], row[2], row[3]
        );
    }
    println!(
        "\n{:>9} {:>12} {:>12} {:>12}",
        "matmul n", "1t us", "Nt us", "Nt GFLOP/s"
    );
    for n in [16, 32, 48, 64, 96, 128, 192, 256, 512] {
        let a = Tensor::randn([n, n]);
        let b = Tensor::randn([n, n]);
        let mut row = Vec::new();
        for threads in [1, all] {
            set_num_threads(threads);
            row.push(time_us(|| a.matmul(&b).map(drop))?);
        }
        let gflops = 2.0 * (n * n * n) as f64 / row[1] / 1e3;
        println!("{n:>9} {:>12.1} {:>12.1} {gflops:>12.1}", row[0], row[1]);
    }
    Ok(())
}
