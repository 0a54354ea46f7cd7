//! Times the parts of the `gpt` workload (batch 16 × 128 tokens, vocab 65, width 128, 4 layers,
//! 4 heads, f32): one Transformer block and its pieces, forward and forward + backward, the
//! head and loss, and the whole training step:
//! `cargo run --release -p nerve-bench --example gpt_parts [NAME]`.

mod common;
use common::Timer;

use nerve_core::{manual_seed, Result, Tensor};
use nerve_models::{Gpt, GptConfig};
use nerve_nn::{loss, Adam, Module, ModuleExt};

fn main() -> Result<()> {
    manual_seed(0);
    let timer = Timer::from_args();
    let time = |name: &str, f: &mut dyn FnMut() -> Result<()>| timer.time(name, f);
    println!("threads: {}", nerve_core::num_threads());
    let model = Gpt::new(GptConfig::default())?;
    let ids: Vec<i64> = (0..16 * 128).map(|i| (i * 7 + i / 13) % 65).collect();
    let targets: Vec<i64> = ids.iter().map(|v| (v + 1) % 65).collect();
    let ids = Tensor::from_vec(ids, [16, 128])?;
    let targets = Tensor::from_vec(targets, [16 * 128])?;
    let h = Tensor::randn([16, 128, 128]).requires_grad_(true);
    timer.block_parts(&model.h[0], &h, 4, true)?;
    let u = Tensor::randn([16, 128, 512]).requires_grad_(true);
    time("gelu [16, 128, 512] fwd (no grad)", &mut || {
        nerve_core::no_grad(|| u.gelu_tanh())?;
        Ok(())
    })?;
    time("gelu [16, 128, 512] fwd + bwd", &mut || {
        u.gelu_tanh()?.sum()?.backward()?;
        Ok(())
    })?;
    time("sum + backward alone [16, 128, 512]", &mut || {
        u.sum()?.backward()?;
        Ok(())
    })?;
    let x = Tensor::randn([16, 128, 128]).requires_grad_(true);
    time("head (ln_f, tied projection) + loss fwd + bwd", &mut || {
        let logits = model
            .ln_f
            .forward(&x)?
            .matmul(&model.wte.weight.t()?)?
            .reshape(&[-1, 65])?;
        loss::cross_entropy(&logits, &targets, &Default::default())?.backward()
    })?;
    let mut opt = Adam::adamw(model.parameters(), 3e-4, 0.01);
    timer.step_parts(
        &|| {
            let logits = model.forward(&ids)?.reshape(&[-1, 65])?;
            loss::cross_entropy(&logits, &targets, &Default::default())
        },
        &mut opt,
    )
}
