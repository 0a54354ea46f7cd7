//! Times the parts of the `vit` workload (batch 32, 3×32×32, patch 4, width 128, 4 layers,
//! 4 heads, f32): the patch embedding, one Transformer block and its pieces, forward and
//! forward + backward, and the whole training step:
//! `cargo run --release -p nerve-bench --example vit_parts [NAME]`.

mod common;
use common::Timer;

use nerve_core::{manual_seed, Result, Tensor};
use nerve_models::{Vit, VitConfig};
use nerve_nn::{loss, Adam, Module, ModuleExt, Optimizer};

fn main() -> Result<()> {
    manual_seed(0);
    let timer = Timer::from_args();
    let time = |name: &str, f: &mut dyn FnMut() -> Result<()>| timer.time(name, f);
    println!("threads: {}", nerve_core::num_threads());
    let model = Vit::new(VitConfig::default())?;
    let x = Tensor::randn([32, 3, 32, 32]);
    let y = Tensor::from_vec((0..32i64).map(|i| (i * 7) % 10).collect::<Vec<_>>(), [32])?;
    let h = Tensor::randn([32, 65, 128]).requires_grad_(true);
    let blk = &model.blocks[0];
    time("patch embedding fwd + bwd", &mut || {
        model.patch_embed.forward(&x)?.sum()?.backward()?;
        Ok(())
    })?;
    timer.block_parts(blk, &h, 4, false)?;
    time("fc1 (linear 128→512) fwd + bwd", &mut || {
        blk.mlp.fc.forward(&h)?.sum()?.backward()?;
        Ok(())
    })?;
    let u = Tensor::randn([32, 65, 512]).requires_grad_(true);
    let bias = Tensor::randn([512]).requires_grad_(true);
    let g2 = Tensor::randn([32 * 65, 512]);
    time("bias gradient: sum over rows [2080, 512]", &mut || {
        g2.sum_dim(&[0], false)?;
        Ok(())
    })?;
    time("bias add [32, 65, 512] fwd + bwd", &mut || {
        u.add(&bias)?.sum()?.backward()?;
        Ok(())
    })?;
    time("gelu [32, 65, 512] fwd + bwd", &mut || {
        u.gelu_tanh()?.sum()?.backward()?;
        Ok(())
    })?;
    time("fc2 (linear 512→128) fwd + bwd", &mut || {
        blk.mlp.proj.forward(&u)?.sum()?.backward()?;
        Ok(())
    })?;
    time("sum + backward alone", &mut || {
        h.sum()?.backward()?;
        Ok(())
    })?;
    let mut opt = Adam::adamw(model.parameters(), 1e-3, 0.01);
    time("whole step", &mut || {
        loss::cross_entropy(&model.forward(&x)?, &y, &Default::default())?.backward()?;
        opt.step()?;
        opt.zero_grad();
        Ok(())
    })?;
    time("whole step without optimizer", &mut || {
        loss::cross_entropy(&model.forward(&x)?, &y, &Default::default())?.backward()?;
        opt.zero_grad();
        Ok(())
    })?;
    Ok(())
}
