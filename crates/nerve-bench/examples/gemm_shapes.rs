//! GFLOP/s of the matrix products of the `lstm` and `vit` workloads' training steps, with the operand
//! layouts the autograd produces (`ᵀ` = a transposed view):
//! `cargo run --release -p nerve-bench --example gemm_shapes`.

use nerve_core::{Result, Tensor};

fn main() -> Result<()> {
    println!("threads: {}", nerve_core::num_threads());
    // (name, m, k, n, transpose A, transpose B)
    let shapes = [
        ("head: h·Wᵀ", 2048, 256, 65, false, true),
        ("head dW: dyᵀ·h", 65, 2048, 256, true, false),
        ("head dx: dy·W", 2048, 65, 256, false, false),
        ("input proj: x·W_ihᵀ", 2048, 64, 1024, false, true),
        ("input dW: daᵀ·x", 1024, 2048, 64, true, false),
        ("input dx: da·W_ih", 2048, 1024, 64, false, false),
        ("recurrent dW: daᵀ·h_prev", 1024, 2048, 256, true, false),
        ("vit qkv: x·Wᵀ", 2080, 128, 384, false, true),
        ("vit qkv dW: gᵀ·x", 384, 2080, 128, true, false),
        ("vit qkv dx: g·W", 2080, 384, 128, false, false),
        ("vit proj: x·Wᵀ", 2080, 128, 128, false, true),
        ("vit proj dW: gᵀ·x", 128, 2080, 128, true, false),
        ("vit fc1: x·Wᵀ", 2080, 128, 512, false, true),
        ("vit fc1 dW: gᵀ·x", 512, 2080, 128, true, false),
        ("vit fc2: x·Wᵀ", 2080, 512, 128, false, true),
        ("vit fc2 dW: gᵀ·x", 128, 2080, 512, true, false),
        ("vit fc1 dx: g·W", 2080, 512, 128, false, false),
        ("vit fc2 dx: g·W", 2080, 128, 512, false, false),
        ("square 1024", 1024, 1024, 1024, false, false),
    ];
    for (name, m, k, n, ta, tb) in shapes {
        let a = if ta {
            Tensor::randn([k, m]).t()?
        } else {
            Tensor::randn([m, k])
        };
        let b = if tb {
            Tensor::randn([n, k]).t()?
        } else {
            Tensor::randn([k, n])
        };
        a.matmul(&b)?;
        let mut ms: Vec<f64> = (0..31)
            .map(|_| {
                let t = std::time::Instant::now();
                a.matmul(&b).map(|_| t.elapsed().as_secs_f64() * 1e3)
            })
            .collect::<Result<_>>()?;
        ms.sort_by(f64::total_cmp);
        let gflops = 2.0 * (m * k * n) as f64 / ms[0] / 1e6;
        println!(
            "{name:<28} {m:>5}x{k:<5}x{n:<5} {:8.3} ms min {gflops:7.1} GFLOP/s",
            ms[0]
        );
    }
    Ok(())
}
