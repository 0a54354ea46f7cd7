//! The zoo's `vit` against a PyTorch twin (tools/torch_nn_fixtures.py): logits and the
//! gradient of every parameter, from identical closed-form weights.

mod common;

use common::{close, fixtures, formula};
use nerve_core::{Result, Tensor};
use nerve_models::{Vit, VitConfig};
use nerve_nn::{loss, Module, ModuleExt};

#[test]
fn vit_matches_pytorch() -> Result<()> {
    let fx = fixtures();
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
