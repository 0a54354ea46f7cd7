//! The zoo's `vit` against a PyTorch twin (tools/torch_nn_fixtures.py): logits and the
//! gradient of every parameter, from identical closed-form weights.

use nerve_core::{Result, Tensor};
use nerve_models::{Vit, VitConfig};
use nerve_nn::{loss, Module, ModuleExt};

fn formula(dims: &[usize], seed: f64, scale: f64) -> Tensor {
    let n: usize = dims.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|i| (scale * (0.37 * i as f64 + seed).sin()) as f32)
        .collect();
    Tensor::from_vec(v, dims).unwrap()
}

#[test]
fn vit_matches_pytorch() -> Result<()> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../nerve-nn/tests/fixtures/nn.safetensors"
    );
    let (fx, _) = nerve_nn::checkpoint::load_safetensors(path).expect("fixture");
    let model = Vit::new(VitConfig {
        channels: 2,
        image: 8,
        patch: 4,
        width: 8,
        layers: 2,
        heads: 2,
        classes: 5,
    })?;
    for (k, (_, p)) in model.named_parameters().iter().enumerate() {
        p.copy_(&formula(p.dims(), 120.0 + k as f64, 0.3))?;
    }
    let logits = model.forward(&formula(&[3, 2, 8, 8], 130.0, 1.0))?;
    let close = |what: &str, a: &Tensor, b: &Tensor, tol: f64| {
        assert_eq!(a.dims(), b.dims(), "{what}");
        for (i, (x, y)) in a.to_f64_vec().iter().zip(b.to_f64_vec()).enumerate() {
            assert!(
                (x - y).abs() <= tol * (1.0 + y.abs()),
                "{what} [{i}]: {x} vs {y}"
            );
        }
    };
    close("logits", &logits, &fx["vit.logits"], 1e-5);
    loss::cross_entropy(
        &logits,
        &Tensor::from_vec(vec![0i64, 3, 4], [3])?,
        &Default::default(),
    )?
    .backward()?;
    for (name, p) in model.named_parameters() {
        close(
            &format!("grad {name}"),
            &p.grad().unwrap(),
            &fx[&format!("vit.grad.{name}")],
            1e-4,
        );
    }
    let e = Vit::new(VitConfig {
        image: 30,
        ..Default::default()
    })
    .err()
    .unwrap();
    assert!(
        e.to_string().contains("image") && e.to_string().contains("patch"),
        "{e}"
    );
    Ok(())
}
