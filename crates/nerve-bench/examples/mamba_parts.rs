//! Times the parts of the `mamba` workload's layer (batch 8, sequence 128, width 128,
//! d_inner 256, d_state 16, f32): the selective scan forward and forward + backward, the
//! causal depthwise convolution against nerve's grouped `conv1d` with the transposes it
//! needs, and a whole Mamba block:
//! `cargo run --release -p nerve-bench --example mamba_parts`.

mod common;
use common::Timer;

use nerve_core::{Generator, Result, Tensor};
use nerve_nn::{causal_conv1d, selective_scan, MambaBlock, MambaOptions, Module};

fn main() -> Result<()> {
    let (b, l, d, n, k) = (8, 128, 256, 16, 4);
    let mut g = Generator::new(7);
    let leaf = |dims: &[usize], g: &mut Generator| Tensor::randn_with(dims, g).requires_grad_(true);
    let u = leaf(&[b, l, d], &mut g);
    let delta = leaf(&[b, l, d], &mut g);
    let a = Tensor::rand_with([d, n], &mut g)
        .neg()?
        .requires_grad_(true);
    let bm = leaf(&[b, l, n], &mut g);
    let cm = leaf(&[b, l, n], &mut g);
    let dskip = leaf(&[d], &mut g);
    let bias = leaf(&[d], &mut g);
    let w = leaf(&[d, k], &mut g);
    let cb = leaf(&[d], &mut g);
    let block = MambaBlock::new(MambaOptions::new(128))?;
    let x = leaf(&[b, l, 128], &mut g);
    let timer = Timer::from_args();
    let time = |name: &str, f: &mut dyn FnMut() -> Result<()>| timer.time(name, f);
    println!("threads: {}", nerve_core::num_threads());
    let scan = || selective_scan(&u, &delta, &a, &bm, &cm, &dskip, Some(&bias), true);
    time("selective_scan forward (no grad)", &mut || {
        nerve_core::no_grad(scan)?;
        Ok(())
    })?;
    time("selective_scan forward + backward", &mut || {
        scan()?.sum()?.backward()
    })?;
    let y = scan()?;
    let ones = Tensor::ones([b, l, d]);
    time("selective_scan backward alone", &mut || {
        y.backward_with_opts(&ones, true)
    })?;
    time("causal_conv1d forward + backward", &mut || {
        causal_conv1d(&u, &w, Some(&cb))?.sum()?.backward()
    })?;
    time(
        "grouped conv1d (+ transposes) forward + backward",
        &mut || {
            u.transpose(1, 2)?
                .conv1d(&w.unsqueeze(1)?, Some(&cb), 1, k - 1, 1, d)?
                .narrow(2, 0, l)?
                .transpose(1, 2)?
                .contiguous()?
                .sum()?
                .backward()
        },
    )?;
    time("MambaBlock forward (no grad)", &mut || {
        nerve_core::no_grad(|| block.forward(&x))?;
        Ok(())
    })?;
    time("MambaBlock forward + backward", &mut || {
        block.forward(&x)?.sum()?.backward()
    })?;
    Ok(())
}
