//! The zoo's `cnn` against PyTorch: from identical initial weights and batches (closed-form, as
//! in `tools/torch_nn_fixtures.py`), 20 AdamW steps give the same losses within 1e-4.

mod common;

use common::{fixtures, formula};
use nerve_core::{Result, Tensor};
use nerve_nn::{loss, Adam, Module, ModuleExt, Optimizer};

#[test]
fn cnn_twenty_adamw_steps_match_pytorch() -> Result<()> {
    let fx = fixtures();
    let model = nerve_models::cnn(&[1, 28, 28], 10)?;
    for (k, (_, p)) in model.named_parameters().iter().enumerate() {
        let d = p.dims();
        let fan_in = if d.len() > 1 {
            d[1..].iter().product::<usize>()
        } else {
            32
        };
        p.copy_(&formula(d, 40.0 + k as f64, 1.0 / (fan_in as f64).sqrt()))?;
    }
    let mut opt = Adam::adamw(model.parameters(), 1e-3, 0.01);
    let want = fx["cnn.adamw.losses"].to_f64_vec();
    for (step, w) in want.iter().enumerate() {
        let x = formula(&[8, 1, 28, 28], 100.0 + (step % 2) as f64, 1.0);
        let y = Tensor::from_vec(
            (0..8i64)
                .map(|i| (i * 7 + (step % 2) as i64) % 10)
                .collect::<Vec<_>>(),
            [8],
        )?;
        let l = loss::cross_entropy(&model.forward(&x)?, &y, &Default::default())?;
        opt.zero_grad();
        l.backward()?;
        opt.step()?;
        let got = l.item::<f32>()? as f64;
        assert!(
            (got - w).abs() < 1e-4,
            "step {step}: loss {got} vs PyTorch {w}"
        );
    }
    Ok(())
}
