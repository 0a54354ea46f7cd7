//! The zoo's Mamba LM against its plain PyTorch twin (tools/torch_mamba_fixtures.py: the
//! paper's recurrence as a Python loop, computed in f64): logits, loss and the gradient of
//! every parameter from the same state_dict; recurrent decoding against the full forward
//! pass; configuration checks.

use std::collections::HashMap;

use nerve_core::{manual_seed, Result, Tensor};
use nerve_models::{LanguageModel, MambaConfig, MambaLm};
use nerve_nn::{loss, Module, ModuleExt};

fn fixtures() -> HashMap<String, Tensor> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../nerve-nn/tests/fixtures/mamba.safetensors"
    );
    nerve_nn::checkpoint::load_safetensors(path)
        .expect("fixture (run tools/torch_mamba_fixtures.py)")
        .0
}

/// Element-wise `|a − b| ≤ tol · (1 + |b|)`, same shapes.
fn close(what: &str, a: &Tensor, b: &Tensor, tol: f64) {
    assert_eq!(a.dims(), b.dims(), "{what}");
    for (i, (x, y)) in a.to_f64_vec().iter().zip(b.to_f64_vec()).enumerate() {
        assert!(
            (x - y).abs() <= tol * (1.0 + y.abs()),
            "{what} [{i}]: {x} vs {y}"
        );
    }
}

fn small() -> MambaConfig {
    MambaConfig {
        vocab_size: 11,
        d_model: 8,
        n_layers: 2,
        d_state: 4,
        expand: 2,
        d_conv: 4,
        ..Default::default()
    }
}

/// Logits and loss to 1e-5, parameter gradients to 1e-4 (relative; f32 against f64).
#[test]
fn mamba_lm_matches_pytorch() -> Result<()> {
    let fx = fixtures();
    let model = MambaLm::new(small())?;
    let state: HashMap<String, Tensor> = fx
        .iter()
        .filter_map(|(k, v)| {
            k.strip_prefix("lm.state.")
                .map(|n| (n.to_string(), v.clone()))
        })
        .collect();
    model
        .load_state_dict(&state, true)
        .map_err(|e| nerve_core::Error::invalid("load", e.to_string()))?;
    let ids: Vec<i64> = (0..2)
        .flat_map(|j| (0..9).map(move |i| (i * 5 + j) % 11))
        .collect();
    let targets: Vec<i64> = ids.iter().map(|v| (v + 1) % 11).collect();
    let logits = model.forward(&Tensor::from_vec(ids, [2, 9])?)?;
    close("logits", &logits, &fx["lm.logits"], 1e-5);
    let l = loss::cross_entropy(
        &logits.reshape(&[-1, 11])?,
        &Tensor::from_vec(targets, [18])?,
        &Default::default(),
    )?;
    close("loss", &l, &fx["lm.loss"], 1e-5);
    l.backward()?;
    let named = model.named_parameters();
    assert_eq!(named.len(), state.len());
    for (name, p) in named {
        close(
            &format!("grad {name}"),
            &p.grad().unwrap(),
            &fx[&format!("lm.grad.{name}")],
            1e-4,
        );
    }
    Ok(())
}

/// Recurrent decoding, one token at a time, gives the full forward pass's logits (to 1e-5);
/// greedy generation follows the argmax and is deterministic; bad prompts are refused.
#[test]
fn recurrent_decoding_matches_full_forward() -> Result<()> {
    manual_seed(3);
    let model = MambaLm::new(MambaConfig {
        vocab_size: 13,
        pad_vocab_size_multiple: 8,
        d_model: 24,
        ..small()
    })?;
    assert_eq!(model.backbone.embedding.weight.dims(), &[16, 24]);
    let ids: Vec<i64> = vec![3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5];
    let full = model.forward(&Tensor::from_vec(ids.clone(), [1, ids.len()])?)?;
    assert_eq!(full.dims(), &[1, ids.len(), 16]);
    let mut caches = model.new_caches(1);
    for (t, &id) in ids.iter().enumerate() {
        let step = model.step(&Tensor::from_vec(vec![id], [1])?, &mut caches)?;
        close(&format!("step {t}"), &step, &full.select(1, t)?, 1e-5);
    }
    // Two sequences at once decode independently.
    let two = Tensor::from_vec(
        [ids.clone(), ids.iter().rev().copied().collect()].concat(),
        [2, ids.len()],
    )?;
    let full2 = model.forward(&two)?;
    let mut caches = model.new_caches(2);
    for t in 0..ids.len() {
        let step = model.step(&two.select(1, t)?, &mut caches)?;
        close(
            &format!("batch step {t}"),
            &step,
            &full2.select(1, t)?,
            1e-5,
        );
    }

    let g1 = model.generate(&ids[..3], 6, 0.0, 0)?;
    assert_eq!(g1, model.generate(&ids[..3], 6, 0.0, 0)?);
    assert_eq!(g1.len(), 9);
    let row = full.select(1, 2)?.reshape(&[-1])?.to_f64_vec();
    let argmax = (0..13).max_by(|&a, &b| row[a].total_cmp(&row[b])).unwrap() as i64;
    assert_eq!(g1[3], argmax);
    let sampled = LanguageModel::generate(&model, &ids[..3], 20, 0.9, 4)?;
    assert!(sampled[3..].iter().all(|&t| (0..13).contains(&t)));
    assert!(model.generate(&[], 3, 0.0, 0).is_err());
    assert!(model
        .generate(&[13], 3, 0.0, 0)
        .unwrap_err()
        .to_string()
        .contains("vocabulary"));
    assert!(model
        .step(&Tensor::from_vec(vec![1i64], [1])?, &mut caches[..1])
        .is_err());
    Ok(())
}

/// The default is the `mamba` workload; zero sizes are refused naming the fields;
/// mamba_ssm's and Hugging Face's config.json keys deserialize.
#[test]
fn config_defaults_checks_and_json() -> Result<()> {
    let c = MambaConfig::default();
    assert_eq!(
        (
            c.vocab_size,
            c.d_model,
            c.n_layers,
            c.d_state,
            c.expand,
            c.d_conv
        ),
        (65, 128, 4, 16, 2, 4)
    );
    let model = MambaLm::new(c)?;
    let names: Vec<String> = model
        .named_parameters()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(names[0], "backbone.embedding.weight");
    assert!(names.contains(&"backbone.layers.3.mixer.dt_proj.bias".to_string()));
    assert!(names.contains(&"backbone.layers.0.norm.weight".to_string()));
    assert_eq!(names.last().unwrap(), "backbone.norm_f.weight");
    assert_eq!(
        model.backbone.layers[0].mixer.x_proj.weight.dims(),
        &[8 + 32, 256]
    );

    let e = MambaLm::new(MambaConfig {
        d_state: 0,
        n_layers: 0,
        ..Default::default()
    })
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("n_layers") && e.contains("d_state"), "{e}");
    let e = MambaLm::new(MambaConfig {
        dt_rank: Some(0),
        ..Default::default()
    })
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("dt_rank"), "{e}");

    // state-spaces/mamba-130m's config.json (mamba_ssm) and the -hf one's names.
    let ssm: MambaConfig = serde_json::from_str(
        r#"{"d_model": 768, "n_layer": 24, "vocab_size": 50277, "ssm_cfg": {},
            "rms_norm": true, "residual_in_fp32": true, "fused_add_norm": true,
            "pad_vocab_size_multiple": 8}"#,
    )
    .map_err(|e| nerve_core::Error::invalid("json", e.to_string()))?;
    assert_eq!((ssm.d_model, ssm.n_layers, ssm.d_state), (768, 24, 16));
    assert_eq!(ssm.padded_vocab_size(), 50280);
    let hf: MambaConfig = serde_json::from_str(
        r#"{"hidden_size": 768, "num_hidden_layers": 24, "state_size": 16, "expand": 2,
            "conv_kernel": 4, "time_step_rank": 48, "layer_norm_epsilon": 1e-5,
            "vocab_size": 50280}"#,
    )
    .map_err(|e| nerve_core::Error::invalid("json", e.to_string()))?;
    assert_eq!((hf.d_model, hf.dt_rank, hf.d_conv), (768, Some(48), 4));
    let back: MambaConfig = serde_json::from_str(
        &serde_json::to_string(&c)
            .map_err(|e| nerve_core::Error::invalid("json", e.to_string()))?,
    )
    .map_err(|e| nerve_core::Error::invalid("json", e.to_string()))?;
    assert_eq!(back, c);
    Ok(())
}
