//! The zoo's `gpt` against a PyTorch twin (tools/torch_nn_fixtures.py): logits, loss and the
//! gradient of every parameter, from identical closed-form weights.

mod common;

use common::{close, fixtures, formula};
use nerve_core::{Result, Tensor};
use nerve_models::{Gpt, GptConfig};
use nerve_nn::{loss, Module, ModuleExt};

#[test]
fn gpt_matches_pytorch() -> Result<()> {
    let fx = fixtures();
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

/// Decoding with the key/value cache gives the logits of a full forward pass, token by token.
#[test]
fn cached_decoding_matches_full_forward() -> Result<()> {
    nerve_core::manual_seed(3);
    let model = Gpt::new(GptConfig {
        vocab_size: 13,
        context: 12,
        layers: 2,
        heads: 2,
        width: 8,
        dropout: 0.0,
    })?;
    let ids: Vec<i64> = vec![3, 1, 4, 1, 5, 9, 2, 6];
    let full = model
        .forward(&Tensor::from_vec(ids.clone(), [1, 8])?)?
        .to_f64_vec();
    let mut caches = vec![nerve_nn::KvCache::default(); 2];
    // A 3-token prompt, then one token at a time.
    let mut got = model
        .forward_cached(&Tensor::from_vec(ids[..3].to_vec(), [1, 3])?, &mut caches)?
        .to_f64_vec();
    for &t in &ids[3..] {
        got.extend(
            model
                .forward_cached(&Tensor::from_vec(vec![t], [1, 1])?, &mut caches)?
                .to_f64_vec(),
        );
    }
    assert_eq!(got.len(), full.len());
    for (i, (a, b)) in got.iter().zip(&full).enumerate() {
        assert!((a - b).abs() < 1e-5, "[{i}] {a} vs {b}");
    }
    // Greedy generation is deterministic and follows the argmax; bad prompts are refused.
    let g1 = model.generate(&ids[..3], 5, 0.0, 0)?;
    let g2 = model.generate(&ids[..3], 5, 0.0, 0)?;
    assert_eq!(g1, g2);
    assert_eq!(g1.len(), 8);
    let first = model.forward(&Tensor::from_vec(ids[..3].to_vec(), [1, 3])?)?;
    let row = first.select(1, 2)?.reshape(&[-1])?.to_f64_vec();
    let argmax = (0..13).max_by(|&a, &b| row[a].total_cmp(&row[b])).unwrap() as i64;
    assert_eq!(g1[3], argmax);
    let sampled = model.generate(&ids[..3], 4, 0.8, 5)?;
    assert!(sampled[3..].iter().all(|&t| (0..13).contains(&t)));
    assert!(model.generate(&[], 3, 0.0, 0).is_err());
    assert!(model
        .generate(&[13], 3, 0.0, 0)
        .unwrap_err()
        .to_string()
        .contains("vocabulary"));
    // Past the context (12) the cache is rebuilt from the last 6 tokens, as nanoGPT crops
    // its input: the first tokens are those of a short generation, and the run goes on.
    let long = model.generate(&ids[..3], 20, 0.0, 0)?;
    assert_eq!(long.len(), 23);
    assert_eq!(&long[..8], &g1[..]);
    Ok(())
}

/// Causality at the workload's size (128 tokens, 4 heads of 32): changing a token changes no
/// earlier position's logits.
#[test]
fn no_position_sees_the_future() -> Result<()> {
    nerve_core::manual_seed(5);
    let model = Gpt::new(GptConfig::default())?;
    let ids: Vec<i64> = (0..2 * 128).map(|i| (i * 7 + i / 13) % 65).collect();
    let a = model
        .forward(&Tensor::from_vec(ids.clone(), [2, 128])?)?
        .to_f64_vec();
    for cut in [1usize, 31, 64, 100, 127] {
        let mut changed = ids.clone();
        changed[cut] = (changed[cut] + 1) % 65;
        changed[128 + cut] = (changed[128 + cut] + 3) % 65;
        let b = model
            .forward(&Tensor::from_vec(changed, [2, 128])?)?
            .to_f64_vec();
        for row in 0..2 {
            for t in 0..128 {
                let o = (row * 128 + t) * 65;
                let diff = (0..65)
                    .map(|v| (a[o + v] - b[o + v]).abs())
                    .fold(0.0, f64::max);
                if t < cut {
                    assert!(
                        diff == 0.0,
                        "position {t} changed by {diff} when token {cut} changed"
                    );
                } else if t == cut {
                    assert!(diff > 0.0);
                }
            }
        }
    }
    Ok(())
}
