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
    let blk = &model.h[0];
    time("block forward (no grad)", &mut || {
        nerve_core::no_grad(|| blk.forward(&h))?;
        Ok(())
    })?;
    time("block fwd + bwd", &mut || {
        blk.forward(&h)?.sum()?.backward()?;
        Ok(())
    })?;
    time("layer norm fwd + bwd", &mut || {
        blk.ln_1.forward(&h)?.sum()?.backward()?;
        Ok(())
    })?;
    time("attention fwd + bwd", &mut || {
        blk.attn.forward(&h)?.sum()?.backward()?;
        Ok(())
    })?;
    let qkv = Tensor::randn([16, 128, 384]).requires_grad_(true);
    time("attention core (packed, causal) fwd", &mut || {
        nerve_nn::packed_self_attention(&qkv, 4, true)?;
        Ok(())
    })?;
    time("attention core (packed, causal) fwd + bwd", &mut || {
        nerve_nn::packed_self_attention(&qkv, 4, true)?
            .sum()?
            .backward()?;
        Ok(())
    })?;
    time("mlp fwd + bwd", &mut || {
        blk.mlp.forward(&h)?.sum()?.backward()?;
        Ok(())
    })?;
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
