//! Times the parts of the `lstm` workload (batch 32, sequence 64, embedding 64, hidden 256,
//! vocab 65, f32): the fused time loop forward and backward on their own, the layer, and the
//! whole training step split into forward, backward and optimizer:
//! `cargo run --release -p nerve-bench --example lstm_parts [NAME]`.

mod common;
use common::Timer;

use nerve_core::kernels::rnn::{lstm_backward, lstm_forward, LstmDims};
use nerve_core::{manual_seed, Result, Tensor};
use nerve_nn::{loss, Adam, Embedding, Linear, Module, ModuleExt, RnnOptions};

fn main() -> Result<()> {
    let (b, t, e, hs, v) = (32, 64, 64, 256, 65);
    manual_seed(0);
    let timer = Timer::from_args();
    let time = |name: &str, f: &mut dyn FnMut() -> Result<()>| timer.time(name, f);
    println!("threads: {}", nerve_core::num_threads());
    let dims = LstmDims {
        steps: t,
        batch: b,
        hidden: hs,
    };
    let xp: Vec<f32> = Tensor::randn([t * b * 4 * hs]).to_vec()?;
    let w: Vec<f32> = Tensor::randn([4 * hs * hs]).mul_scalar(0.05)?.to_vec()?;
    let h0 = vec![0f32; b * hs];
    let bias = vec![0.1f32; 4 * hs];
    let forward = || {
        let mut c = vec![0f32; b * hs];
        lstm_forward(dims, false, &xp, &bias, &w, &h0, &mut c)
    };
    time("kernel lstm_forward", &mut || {
        forward();
        Ok(())
    })?;
    let (_, tape) = forward();
    let gout: Vec<f32> = Tensor::randn([t * b * hs]).to_vec()?;
    time("kernel lstm_backward", &mut || {
        let (mut dh, mut dc) = (vec![0f32; b * hs], vec![0f32; b * hs]);
        let _ = lstm_backward(dims, false, &tape, &w, &gout, &mut dh, &mut dc);
        Ok(())
    })?;

    // The layer's GEMMs outside the time loop.
    let da = Tensor::randn([t * b, 4 * hs]);
    let h_prev = Tensor::randn([t * b, hs]);
    let xs = Tensor::randn([t * b, e]);
    let w_ih = Tensor::randn([4 * hs, e]);
    time("GEMM x·W_ihᵀ (input projection)", &mut || {
        xs.matmul(&w_ih.t()?)?;
        Ok(())
    })?;
    time("GEMM daᵀ·h_prev (dW_hh)", &mut || {
        da.t()?.matmul(&h_prev)?;
        Ok(())
    })?;
    time("GEMM daᵀ·x (dW_ih)", &mut || {
        da.t()?.matmul(&xs)?;
        Ok(())
    })?;
    let xh = Tensor::randn([t * b, e + hs]);
    time(
        "GEMM daᵀ·[x | h_prev] (both dW, as the layer)",
        &mut || {
            da.t()?.matmul(&xh)?;
            Ok(())
        },
    )?;
    time("GEMM da·W_ih (dx)", &mut || {
        da.matmul(&w_ih)?;
        Ok(())
    })?;

    let emb = Embedding::new(v, e)?;
    let opts = RnnOptions {
        batch_first: true,
        ..Default::default()
    };
    let rnn = nerve_nn::lstm(e, hs, opts)?;
    let head = Linear::new(hs, v, true)?;
    let ids: Vec<i64> = (0..(b * t) as i64)
        .map(|i| (i * 7 + i / 13) % v as i64)
        .collect();
    let targets: Vec<i64> = ids.iter().map(|x| (x + 1) % v as i64).collect();
    let ids = Tensor::from_vec(ids, [b, t])?;
    let targets = Tensor::from_vec(targets, [b * t])?;
    let mut params = emb.parameters();
    params.extend(rnn.parameters());
    params.extend(head.parameters());
    let mut opt = Adam::adamw(params, 1e-3, 0.01);
    let x = emb.forward(&ids)?.detach().requires_grad_(true);
    time("layer forward (no grad)", &mut || {
        nerve_core::no_grad(|| rnn.forward(&x))?;
        Ok(())
    })?;
    time("layer forward + backward", &mut || {
        rnn.forward(&x)?.sum()?.backward()?;
        Ok(())
    })?;
    let hd = rnn.forward(&x)?.detach().requires_grad_(true);
    time("head + loss forward + backward", &mut || {
        let logits = head.forward(&hd)?.reshape(&[-1, v as isize])?;
        loss::cross_entropy(&logits, &targets, &Default::default())?.backward()?;
        Ok(())
    })?;
    let hc = hd.contiguous()?.detach().requires_grad_(true);
    time("head + loss fwd + bwd, contiguous input", &mut || {
        let logits = head.forward(&hc)?.reshape(&[-1, v as isize])?;
        loss::cross_entropy(&logits, &targets, &Default::default())?.backward()?;
        Ok(())
    })?;
    time("embedding forward + backward", &mut || {
        emb.forward(&ids)?.sum()?.backward()?;
        Ok(())
    })?;
    let step_loss = || -> Result<Tensor> {
        let h = rnn.forward(&emb.forward(&ids)?)?;
        let logits = head.forward(&h)?.reshape(&[-1, v as isize])?;
        loss::cross_entropy(&logits, &targets, &Default::default())
    };
    timer.step_parts(&step_loss, &mut opt)?;
    Ok(())
}
