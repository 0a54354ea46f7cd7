//! LoRA training against transformers + PEFT (fixtures from `tools/peft_lora_fixtures.py`):
//! adapters on q_proj and v_proj, every lora_A set by the same formula, lora_B zero, AdamW for
//! 10 steps on the fixture's batches. The loss of every step and the trained adapters agree.
//!
//! - tiny Llama (llama_tiny.safetensors): always runs.
//! - SmolLM2-135M-Instruct, batch 4 × 64 tokens of Shakespeare: runs when `NERVE_SMOLLM2_GGUF`
//!   names the GGUF file (`.ci/run` sets it), and says it is skipped otherwise.

mod common;

use std::collections::HashMap;

use common::close;
use nerve_core::Tensor;
use nerve_models::{causal_lm_loss, Llama, LlamaConfig};
use nerve_nn::lora::{self, LoraConfig};
use nerve_nn::{Adam, Module, ModuleExt, Optimizer};

fn fixtures_dir() -> &'static str {
    concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures")
}

fn load(name: &str) -> (HashMap<String, Tensor>, HashMap<String, String>) {
    let path = format!("{}/{name}", fixtures_dir());
    let (t, m) = nerve_nn::checkpoint::load_safetensors(&path)
        .unwrap_or_else(|e| panic!("{e} (run tools/peft_lora_fixtures.py)"));
    (t, m)
}

/// `lora_A` of the k-th adapted module, as `formula_a` in the fixture script.
fn formula_a(k: usize, r: usize, n_in: usize) -> Tensor {
    let mut v = Vec::with_capacity(r * n_in);
    for i in 0..r {
        for j in 0..n_in {
            let x = ((i * 131 + j * 71 + k * 29) % 97) as f64 / 97.0 - 0.5;
            v.push((x * (2.0 / (n_in as f64).sqrt())) as f32);
        }
    }
    Tensor::from_vec(v, [r, n_in]).unwrap()
}

/// Train like the fixture; returns each step's loss.
fn train_like_peft(
    model: &Llama,
    meta: &HashMap<String, String>,
    f: &HashMap<String, Tensor>,
) -> Vec<f64> {
    let num = |k: &str| meta[k].parse::<f64>().unwrap();
    let config = LoraConfig::new(num("r") as usize, num("lora_alpha"), &["q_proj", "v_proj"]);
    let names = lora::apply(model, &config).unwrap();
    assert_eq!(names.len(), 2 * model.config().num_hidden_layers);
    let adapters: Vec<_> = model
        .named_modules()
        .into_iter()
        .filter_map(|(_, m)| m.as_linear().and_then(|l| l.lora()))
        .collect();
    for (k, a) in adapters.iter().enumerate() {
        let d = a.a.dims();
        a.a.copy_(&formula_a(k, d[0], d[1])).unwrap();
    }
    let mut opt = Adam::adamw(model.trainable_parameters(), num("lr"), 0.01);
    model.train();
    (0..num("steps") as usize)
        .map(|s| {
            let ids = &f[&format!("batch.{s}")];
            let loss = causal_lm_loss(&model.forward(ids).unwrap(), ids).unwrap();
            opt.zero_grad();
            loss.backward().unwrap();
            opt.step().unwrap();
            loss.item::<f32>().unwrap() as f64
        })
        .collect()
}

fn compare_losses(label: &str, got: &[f64], want: &Tensor, tol: f64) {
    let want = want.to_f64_vec();
    assert_eq!(got.len(), want.len());
    let worst = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    eprintln!("{label}: step losses nerve {got:.6?}\n{label}: PEFT {want:.6?}\n{label}: max |diff| {worst:.2e}");
    assert!(
        worst <= tol,
        "{label}: step loss differs by {worst} > {tol}"
    );
}

#[test]
fn tiny_llama_lora_matches_peft() {
    tiny_llama_lora(false);
}

/// Gradient checkpointing recomputes each layer in backward: the same training run.
#[test]
fn tiny_llama_lora_with_checkpointing_matches_peft() {
    tiny_llama_lora(true);
}

fn tiny_llama_lora(checkpointing: bool) {
    let (base, _) = load("llama_tiny.safetensors");
    let weights: HashMap<String, Tensor> = base
        .into_iter()
        .filter(|(k, _)| k.starts_with("model."))
        .collect();
    let config = LlamaConfig {
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
    };
    let model = Llama::from_tensors(config, weights).unwrap();
    model.set_gradient_checkpointing(checkpointing);
    let (f, meta) = load("lora_tiny.safetensors");
    let losses = train_like_peft(&model, &meta, &f);
    compare_losses("tiny", &losses, &f["losses"], 1e-5);
    // Every trained adapter tensor, under PEFT's saved names.
    let ours = lora::adapter_state_dict(&model);
    assert_eq!(ours.len(), 8);
    for (name, t) in ours {
        close(&name, &t, &f[&name], 1e-4);
    }
}

#[test]
fn smollm2_lora_matches_peft() {
    let Ok(path) = std::env::var("NERVE_SMOLLM2_GGUF") else {
        eprintln!("NERVE_SMOLLM2_GGUF is not set: SmolLM2 LoRA parity skipped");
        return;
    };
    let (model, _) = nerve_models::gguf::load_llama(&path).unwrap();
    let (f, meta) = load("lora_smollm2.safetensors");
    let losses = train_like_peft(&model, &meta, &f);
    compare_losses("smollm2", &losses, &f["losses"], 1e-3);
    let ours: HashMap<String, Tensor> = lora::adapter_state_dict(&model).into_iter().collect();
    for name in [
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight",
        "base_model.model.model.layers.29.self_attn.v_proj.lora_A.weight",
    ] {
        close(name, &ours[name], &f[name], 1e-3);
    }
}
