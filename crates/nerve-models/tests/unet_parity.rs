//! The zoo's diffusion `UNet` and DDPM schedules against a PyTorch twin
//! (tools/torch_unet_fixtures.py): the state dict loads by name, and the output and the
//! gradient of every parameter match; schedule numbers match PyTorch's float64 ones.

#[allow(dead_code)]
mod common;

use std::collections::HashMap;

use common::{close, formula};
use nerve_core::{Result, Tensor};
use nerve_models::ddpm::DdpmSchedule;
use nerve_models::{UNet, UNetConfig};
use nerve_nn::ModuleExt;

/// PyTorch's results and the twin's parameter order.
fn unet_fixtures() -> (HashMap<String, Tensor>, HashMap<String, String>) {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/unet.safetensors"
    );
    nerve_nn::checkpoint::load_safetensors(path)
        .expect("fixture (run tools/torch_unet_fixtures.py)")
}

/// The tiny configuration of the fixture script's `CONFIG`.
fn tiny() -> UNetConfig {
    UNetConfig {
        in_channels: 2,
        sample_size: 8,
        base_channels: 8,
        channel_mult: vec![1, 2],
        num_res_blocks: 2,
        norm_groups: 4,
        time_embed_dim: 16,
        attention: true,
        attention_heads: 2,
        num_classes: Some(3),
        dropout: 0.0,
    }
}

/// Element-wise `|a − b| ≤ tol · max(|b|, floor)` over f64 values.
fn close_f64(what: &str, a: &[f64], b: &Tensor, tol: f64, floor: f64) {
    let b = b.to_f64_vec();
    assert_eq!(a.len(), b.len(), "{what}");
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!(
            (x - y).abs() <= tol * y.abs().max(floor),
            "{what} [{i}]: {x} vs {y}"
        );
    }
}

// Tolerance: outputs 1e-4 and gradients 2e-4 of (1 + |value|), f32 through ~40 layers.
#[test]
fn unet_output_and_gradients_match_pytorch() -> Result<()> {
    let (fx, meta) = unet_fixtures();
    let model = UNet::new(tiny())?;
    let names: Vec<String> = model.named_parameters().into_iter().map(|p| p.0).collect();
    assert_eq!(
        names.join(","),
        meta["unet.parameter_order"],
        "parameter names and order differ from PyTorch's"
    );
    let state: HashMap<String, Tensor> = fx
        .iter()
        .filter_map(|(k, v)| Some((k.strip_prefix("unet.state.")?.to_string(), v.clone())))
        .collect();
    model
        .load_state_dict(&state, true)
        .map_err(|e| nerve_core::Error::invalid("load_state_dict", e.to_string()))?;

    let x = formula(&[3, 2, 8, 8], 400.0, 1.0);
    let t = Tensor::from_vec(vec![3i64, 250, 999], [3])?;
    let y = Tensor::from_vec(vec![0i64, 2, 3], [3])?;
    let eps = model.forward(&x, &t, Some(&y))?;
    close("out", &eps, &fx["unet.out"], 1e-4);
    eps.mul(&formula(eps.dims(), 401.0, 1.0))?
        .sum()?
        .backward()?;
    for (name, p) in model.named_parameters() {
        close(
            &format!("grad {name}"),
            &p.grad().expect("every parameter gets a gradient"),
            &fx[&format!("unet.grad.{name}")],
            2e-4,
        );
    }
    // No labels = the null class for every image.
    let uncond = nerve_core::no_grad(|| model.forward(&x, &t, None))?;
    close("out_uncond", &uncond, &fx["unet.out_uncond"], 1e-4);
    Ok(())
}

// Tolerance: 1e-12 relative (both sides compute in f64).
#[test]
fn ddpm_schedules_match_pytorch_float64() -> Result<()> {
    let (fx, _) = unet_fixtures();
    let lin = DdpmSchedule::default();
    assert_eq!(lin.num_timesteps(), 1000);
    close_f64(
        "linear betas",
        &lin.betas,
        &fx["ddpm.linear.betas"],
        1e-12,
        0.0,
    );
    close_f64(
        "linear alphas_cumprod",
        &lin.alphas_cumprod,
        &fx["ddpm.linear.alphas_cumprod"],
        1e-12,
        0.0,
    );
    close_f64(
        "linear posterior_variance",
        &lin.posterior_variance,
        &fx["ddpm.linear.posterior_variance"],
        1e-12,
        1e-12,
    );
    // Spot values at a few t, independent of the fixture (DDPM paper's schedule).
    assert!((lin.alphas_cumprod[0] - (1.0 - 1e-4)).abs() < 1e-15);
    assert!(
        (lin.alphas_cumprod[999] - 4.035e-5).abs() < 1e-7,
        "{}",
        lin.alphas_cumprod[999]
    );

    let cos = DdpmSchedule::cosine(1000)?;
    close_f64(
        "cosine betas",
        &cos.betas,
        &fx["ddpm.cosine.betas"],
        1e-12,
        0.0,
    );
    close_f64(
        "cosine alphas_cumprod",
        &cos.alphas_cumprod,
        &fx["ddpm.cosine.alphas_cumprod"],
        1e-10,
        1e-12,
    );

    let x0 = formula(&[3, 1, 4, 4], 500.0, 1.0);
    let noise = formula(&[3, 1, 4, 4], 501.0, 1.0);
    let t = Tensor::from_vec(vec![0i64, 500, 999], [3])?;
    close(
        "q_sample",
        &lin.q_sample(&x0, &t, &noise)?,
        &fx["ddpm.q_sample"],
        1e-6,
    );
    Ok(())
}
