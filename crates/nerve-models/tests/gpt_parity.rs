//! The zoo's `gpt` against a PyTorch twin (tools/torch_nn_fixtures.py): logits, loss and the
//! gradient of every parameter, from identical closed-form weights.

use nerve_core::{Result, Tensor};
use nerve_models::{Gpt, GptConfig};
use nerve_nn::{loss, Module, ModuleExt};

fn formula(dims: &[usize], seed: f64, scale: f64) -> Tensor {
    let n: usize = dims.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|i| (scale * (0.37 * i as f64 + seed).sin()) as f32)
        .collect();
    Tensor::from_vec(v, dims).unwrap()
}

#[test]
fn gpt_matches_pytorch() -> Result<()> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../nerve-nn/tests/fixtures/nn.safetensors"
    );
    let (fx, _) = nerve_nn::checkpoint::load_safetensors(path).expect("fixture");
    let model = Gpt::new(GptConfig {
        vocab_size: 11,
        context: 8,
        layers: 2,
        heads: 2,
        width: 8,
        dropout: 0.0,
    })?;
    for (k, (_, p)) in model.named_parameters().iter().enumerate() {
        p.copy_(&formula(p.dims(), 100.0 + k as f64, 0.3))?;
    }
    let ids: Vec<i64> = (0..3)
        .flat_map(|j| (0..7).map(move |i| (i * 5 + j) % 11))
        .collect();
    let targets: Vec<i64> = ids.iter().map(|v| (v + 1) % 11).collect();
    let ids = Tensor::from_vec(ids, [3, 7])?;
    let logits = model.forward(&ids)?;
    let close = |what: &str, a: &Tensor, b: &Tensor, tol: f64| {
        assert_eq!(a.dims(), b.dims(), "{what}");
        for (i, (x, y)) in a.to_f64_vec().iter().zip(b.to_f64_vec()).enumerate() {
            assert!(
                (x - y).abs() <= tol * (1.0 + y.abs()),
                "{what} [{i}]: {x} vs {y}"
            );
        }
    };
    close("logits", &logits, &fx["gpt.logits"], 1e-5);
    let l = loss::cross_entropy(
        &logits.reshape(&[-1, 11])?,
        &Tensor::from_vec(targets, [21])?,
        &Default::default(),
    )?;
    close("loss", &l, &fx["gpt.loss"], 1e-6);
    l.backward()?;
    for (name, p) in model.named_parameters() {
        close(
            &format!("grad {name}"),
            &p.grad().unwrap(),
            &fx[&format!("gpt.grad.{name}")],
            1e-4,
        );
    }
    // Inconsistent sizes are refused, naming the fields.
    let e = Gpt::new(GptConfig {
        width: 10,
        heads: 4,
        ..Default::default()
    })
    .err()
    .unwrap();
    assert!(
        e.to_string().contains("width") && e.to_string().contains("heads"),
        "{e}"
    );
    Ok(())
}
