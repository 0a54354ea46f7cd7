//! Llama against transformers' `LlamaForCausalLM` (fixtures from `tools/torch_llama_fixtures.py`):
//! a tiny random model with grouped-query attention and a tied embedding, its logits, loss and
//! every gradient; cached decoding equals the full forward pass.

mod common;

use std::collections::HashMap;

use common::close;
use nerve_core::Tensor;
use nerve_models::{Llama, LlamaCache, LlamaConfig};
use nerve_nn::{loss, Module, ModuleExt};

fn fixture() -> HashMap<String, Tensor> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/llama_tiny.safetensors"
    );
    nerve_nn::checkpoint::load_safetensors(path)
        .expect("fixture (run tools/torch_llama_fixtures.py)")
        .0
}

fn tiny_config() -> LlamaConfig {
    LlamaConfig {
        vocab_size: 64,
        hidden_size: 32,
        intermediate_size: 48,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        rms_norm_eps: 1e-5,
        rope_theta: 10000.0,
        max_position_embeddings: 64,
        tie_word_embeddings: true,
    }
}

fn tiny_model(f: &HashMap<String, Tensor>) -> Llama {
    let weights: HashMap<String, Tensor> = f
        .iter()
        .filter(|(k, _)| k.starts_with("model.") || k.starts_with("lm_head"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    Llama::from_tensors(tiny_config(), weights).unwrap()
}

#[test]
fn logits_loss_and_gradients_match_transformers() {
    let f = fixture();
    let model = tiny_model(&f);
    let ids = &f["ids"];
    let logits = model.forward(ids).unwrap();
    close("logits", &logits, &f["logits"], 1e-4);

    // Next-token loss over positions 0..T-1, as the fixture.
    let (b, t, v) = (ids.dims()[0], ids.dims()[1], 64);
    let inputs = logits
        .narrow(1, 0, t - 1)
        .unwrap()
        .reshape(&[-1, v as isize])
        .unwrap();
    let targets = ids
        .narrow(1, 1, t - 1)
        .unwrap()
        .contiguous()
        .unwrap()
        .reshape(&[(b * (t - 1)) as isize])
        .unwrap();
    let l = loss::cross_entropy(&inputs, &targets, &Default::default()).unwrap();
    close("loss", &l.reshape(&[1]).unwrap(), &f["loss"], 1e-5);
    l.backward().unwrap();
    let params = model.named_parameters();
    assert_eq!(params.len(), 1 + 2 * 9 + 1, "parameter count");
    for (name, p) in params {
        let g = p.grad().unwrap_or_else(|| panic!("{name} has no gradient"));
        close(
            &format!("grad {name}"),
            &g,
            &f[&format!("grad.{name}")],
            1e-4,
        );
    }
}

#[test]
fn cached_decoding_equals_full_forward() {
    let f = fixture();
    let model = tiny_model(&f);
    let ids = f["ids"].narrow(0, 0, 1).unwrap().contiguous().unwrap();
    let full = nerve_core::no_grad(|| model.forward(&ids)).unwrap();
    // Prompt of 4 tokens, then 3 one at a time, then the last 3 together (masked chunk).
    let mut cache = LlamaCache::new(&model);
    let mut parts = Vec::new();
    for (start, len) in [(0, 4), (4, 1), (5, 1), (6, 1), (7, 3)] {
        let chunk = ids.narrow(1, start, len).unwrap().contiguous().unwrap();
        parts.push(nerve_core::no_grad(|| model.forward_cached(&chunk, &mut cache)).unwrap());
    }
    assert_eq!(cache.len(), 10);
    let cached = Tensor::cat(&parts.iter().collect::<Vec<_>>(), 1).unwrap();
    close("cached logits", &cached, &full, 1e-5);
}

#[test]
fn config_errors_name_the_fields() {
    let mut c = tiny_config();
    c.num_key_value_heads = 3;
    let e = Llama::new(c).err().expect("refused").to_string();
    assert!(e.contains("num_key_value_heads"), "{e}");
    let mut c = tiny_config();
    c.hidden_size = 30;
    let e = Llama::new(c).err().expect("refused").to_string();
    assert!(
        e.contains("hidden_size") && e.contains("num_attention_heads"),
        "{e}"
    );
    // A checkpoint of the wrong shape is refused, naming the tensor.
    let f = fixture();
    let mut w: HashMap<String, Tensor> = f
        .iter()
        .filter(|(k, _)| k.starts_with("model."))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    w.insert("model.norm.weight".into(), Tensor::ones([31]));
    let e = Llama::from_tensors(tiny_config(), w)
        .err()
        .expect("refused")
        .to_string();
    assert!(e.contains("model.norm.weight"), "{e}");
}

#[test]
fn generation_is_cached_greedy_and_stops() {
    let f = fixture();
    let model = tiny_model(&f);
    let prompt = [1i64, 5, 9];
    let mut streamed = Vec::new();
    let out = model
        .generate_with(
            &prompt,
            6,
            &[],
            |l, _| (0..l.len()).max_by(|&a, &b| l[a].total_cmp(&l[b])).unwrap() as i64,
            |t| {
                streamed.push(t);
                Ok(())
            },
        )
        .unwrap();
    assert_eq!(out, streamed);
    assert_eq!(out.len(), 6);
    // Greedy by the full forward pass, token by token, gives the same continuation.
    let mut seq = prompt.to_vec();
    for _ in 0..6 {
        let ids = Tensor::from_vec(seq.clone(), [1, seq.len()]).unwrap();
        let l = nerve_core::no_grad(|| model.forward(&ids)).unwrap();
        let last: Vec<f32> = l
            .select(1, seq.len() - 1)
            .unwrap()
            .reshape(&[-1])
            .unwrap()
            .to_vec()
            .unwrap();
        seq.push(
            (0..last.len())
                .max_by(|&a, &b| last[a].total_cmp(&last[b]))
                .unwrap() as i64,
        );
    }
    assert_eq!(out, seq[3..]);
    // A stop token ends generation after it.
    let stop = [out[1]];
    let short = model
        .generate_with(
            &prompt,
            6,
            &stop,
            |l, _| (0..l.len()).max_by(|&a, &b| l[a].total_cmp(&l[b])).unwrap() as i64,
            |_| Ok(()),
        )
        .unwrap();
    let first = out.iter().position(|&t| t == stop[0]).unwrap();
    assert_eq!(short, out[..=first]);
    // Bad prompts are refused.
    assert!(model
        .generate_with(&[], 3, &[], |_, _| 0, |_| Ok(()))
        .is_err());
    assert!(model
        .generate_with(&[64], 3, &[], |_, _| 0, |_| Ok(()))
        .is_err());
    assert!(model
        .generate_with(&[1], 64, &[], |_, _| 0, |_| Ok(()))
        .is_err());
}

#[test]
fn cache_growth_past_its_first_capacity() {
    // Random weights, 100 positions: the cache doubles from 64; one token at a time equals
    // the full forward pass at every position.
    nerve_core::manual_seed(5);
    let mut c = tiny_config();
    c.max_position_embeddings = 128;
    let model = Llama::new(c).unwrap();
    let ids: Vec<i64> = (0..100).map(|i| (i * 13 + 7) % 64).collect();
    let full =
        nerve_core::no_grad(|| model.forward(&Tensor::from_vec(ids.clone(), [1, 100]).unwrap()))
            .unwrap();
    let mut cache = LlamaCache::new(&model);
    let mut parts = Vec::new();
    for &id in &ids {
        parts.push(
            model
                .forward_cached(&Tensor::from_vec(vec![id], [1, 1]).unwrap(), &mut cache)
                .unwrap(),
        );
    }
    let cached = Tensor::cat(&parts.iter().collect::<Vec<_>>(), 1).unwrap();
    close("cached logits over 100 positions", &cached, &full, 1e-4);
}
