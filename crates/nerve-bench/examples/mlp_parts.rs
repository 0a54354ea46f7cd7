//! Times the parts of the `mlp` workload (784→512→ReLU→512→ReLU→10, batch 128, AdamW, f32):
//! each GEMM of the step on its own, the forward, the backward and the optimizer:
//! `cargo run --release -p nerve-bench --example mlp_parts [NAME]`.

mod common;
use common::Timer;

use nerve_core::{manual_seed, Result, Tensor};
use nerve_nn::{loss, Adam, Module, ModuleExt};

fn main() -> Result<()> {
    manual_seed(0);
    let timer = Timer::from_args();
    let time = |name: &str, f: &mut dyn FnMut() -> Result<()>| timer.time(name, f);
    println!("threads: {}", nerve_core::num_threads());
    let b = 128;
    for (k, n) in [(784, 512), (512, 512), (512, 10)] {
        let x = Tensor::randn([b, k]);
        let w = Tensor::randn([n, k]);
        let g = Tensor::randn([b, n]);
        time(&format!("x·Wᵀ  {b}×{k}·{k}×{n}"), &mut || {
            x.matmul(&w.t()?)?;
            Ok(())
        })?;
        let bias = Tensor::randn([n]);
        time(&format!("linear(x, W, b)  {b}×{k}·{k}×{n}"), &mut || {
            x.linear(&w, Some(&bias))?;
            Ok(())
        })?;
        time(&format!("x·Wᵀ + b  {b}×{k}·{k}×{n}"), &mut || {
            x.matmul(&w.t()?)?.add(&bias)?;
            Ok(())
        })?;
        time(&format!("gᵀ·x  {n}×{b}·{b}×{k}"), &mut || {
            g.t()?.matmul(&x)?;
            Ok(())
        })?;
        time(&format!("g·W   {b}×{n}·{n}×{k}"), &mut || {
            g.matmul(&w)?;
            Ok(())
        })?;
    }
    {
        let x = Tensor::randn([b, 512]).requires_grad_(true);
        let w = Tensor::randn([512, 512]).requires_grad_(true);
        let bias = Tensor::randn([512]).requires_grad_(true);
        let g = Tensor::randn([b, 512]);
        time("linear(x, W, b) fwd + bwd 128×512·512×512", &mut || {
            x.linear(&w, Some(&bias))?.backward_with(&g)?;
            Ok(())
        })?;
        time("x·Wᵀ + b fwd + bwd 128×512·512×512", &mut || {
            x.matmul(&w.t()?)?.add(&bias)?.backward_with(&g)?;
            Ok(())
        })?;
    }
    let model = nerve_models::mlp(784, &[512, 512], 10)?;
    let x = Tensor::randn([b, 784]);
    let targets = Tensor::from_vec((0..b as i64).map(|i| i % 10).collect(), [b])?;
    let mut opt = Adam::adamw(model.parameters(), 1e-3, 0.01);
    let step_loss = || -> Result<Tensor> {
        loss::cross_entropy(&model.forward(&x)?, &targets, &Default::default())
    };
    timer.step_parts(&step_loss, &mut opt)?;
    Ok(())
}
