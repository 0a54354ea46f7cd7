//! BERT against transformers' `BertModel` and sentence-transformers (fixtures from
//! `tools/torch_bert_fixtures.py`): a tiny random model's last hidden state and pooler output
//! on a padded batch, padding invariance, checkpoint-name handling; and all-MiniLM-L6-v2's
//! token ids and sentence embeddings.
//!
//! The 91 MB MiniLM model is not in the repository: its tests run when `NERVE_MINILM_DIR`
//! names its folder (`nerve data get minilm` fetches it) and say so and pass otherwise.

mod common;

use std::collections::HashMap;
use std::sync::OnceLock;

use common::close;
use nerve_core::Tensor;
use nerve_data::Tokenizer;
use nerve_models::bert::{l2_normalize, mean_pool};
use nerve_models::{Bert, BertConfig};
use nerve_nn::{Module, ModuleExt};

fn fixture(name: &str) -> HashMap<String, Tensor> {
    let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
    nerve_nn::checkpoint::load_safetensors(path)
        .expect("fixture (run tools/torch_bert_fixtures.py)")
        .0
}

fn tiny_config() -> BertConfig {
    BertConfig {
        vocab_size: 100,
        hidden_size: 32,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        intermediate_size: 48,
        hidden_act: "gelu".into(),
        max_position_embeddings: 64,
        type_vocab_size: 2,
        layer_norm_eps: 1e-12,
        ..Default::default()
    }
}

/// The tiny model's weights (everything but the inputs and outputs).
fn tiny_weights(f: &HashMap<String, Tensor>) -> HashMap<String, Tensor> {
    f.iter()
        .filter(|(k, _)| k.contains('.'))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// Rows `[b, ..len]` of a `[B, T, D]` tensor.
fn real_positions(x: &Tensor, b: usize, len: usize) -> Tensor {
    x.select(0, b).unwrap().narrow(0, 0, len).unwrap()
}

fn lengths(mask: &Tensor) -> Vec<usize> {
    let (b, t) = (mask.dims()[0], mask.dims()[1]);
    let m = mask.to_vec::<i64>().unwrap();
    (0..b)
        .map(|i| m[i * t..(i + 1) * t].iter().filter(|&&v| v != 0).count())
        .collect()
}

#[test]
fn tiny_hidden_states_match_transformers() {
    let f = fixture("bert_tiny.safetensors");
    let model = Bert::from_tensors(tiny_config(), tiny_weights(&f)).unwrap();
    assert_eq!(model.named_parameters().len(), 5 + 2 * 16 + 2);
    let hidden = model
        .forward_masked(&f["ids"], &f["attention_mask"], Some(&f["token_type_ids"]))
        .unwrap();
    // Every position, padding included: transformers' padding queries attend to the real keys
    // like any other query (eager attention), and so do ours. Tolerance 1e-4 relative.
    close("last_hidden_state", &hidden, &f["last_hidden_state"], 1e-4);
    let worst = hidden
        .to_f64_vec()
        .iter()
        .zip(f["last_hidden_state"].to_f64_vec())
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    eprintln!("tiny BERT: largest |difference| from transformers {worst:.1e}");
    let pooled = model.pooled_output(&hidden).unwrap();
    close("pooler_output", &pooled, &f["pooler_output"], 1e-4);
}

#[test]
fn checkpoint_names_with_bert_prefix_and_buffers_load() {
    let f = fixture("bert_tiny.safetensors");
    let mut w: HashMap<String, Tensor> = tiny_weights(&f)
        .into_iter()
        .map(|(k, v)| (format!("bert.{k}"), v))
        .collect();
    w.insert(
        "bert.embeddings.position_ids".into(),
        Tensor::arange_i64(0, 64, 1)
            .unwrap()
            .reshape(&[1, 64])
            .unwrap(),
    );
    let prefixed = Bert::from_tensors(tiny_config(), w).unwrap();
    let plain = Bert::from_tensors(tiny_config(), tiny_weights(&f)).unwrap();
    let w = &plain.encoder.layer[1].intermediate.weight;
    assert!(
        w.shares_storage(&f["encoder.layer.1.intermediate.dense.weight"]),
        "f32 tensors move in without a copy"
    );
    let a = prefixed.forward(&f["ids"]).unwrap();
    let b = plain.forward(&f["ids"]).unwrap();
    assert_eq!(a.to_f64_vec(), b.to_f64_vec());

    // Without the pooler: loads, no pooler parameters.
    let mut w = tiny_weights(&f);
    w.retain(|k, _| !k.starts_with("pooler."));
    let no_pooler = Bert::from_tensors(tiny_config(), w).unwrap();
    assert!(no_pooler.pooler.is_none());
    assert_eq!(no_pooler.named_parameters().len(), 5 + 2 * 16);
    assert!(no_pooler.pooled_output(&b).is_err());
}

#[test]
fn checkpoint_errors_name_the_tensor() {
    let f = fixture("bert_tiny.safetensors");
    let err = |w: HashMap<String, Tensor>| {
        Bert::from_tensors(tiny_config(), w)
            .err()
            .expect("should fail")
            .to_string()
    };
    let mut w = tiny_weights(&f);
    w.remove("encoder.layer.1.intermediate.dense.bias");
    let e = err(w);
    assert!(e.contains("encoder.layer.1.intermediate.dense.bias"), "{e}");

    let mut w = tiny_weights(&f);
    w.insert(
        "encoder.layer.0.attention.self.key.weight".into(),
        Tensor::zeros([32, 31]),
    );
    let e = err(w);
    assert!(
        e.contains("encoder.layer.0.attention.self.key.weight") && e.contains("[32, 31]"),
        "{e}"
    );

    let mut w = tiny_weights(&f);
    w.insert("cls.predictions.bias".into(), Tensor::zeros([100]));
    let e = err(w);
    assert!(
        e.contains("unexpected") && e.contains("cls.predictions.bias"),
        "{e}"
    );

    let e = Bert::from_tensors(
        BertConfig {
            hidden_size: 30,
            ..tiny_config()
        },
        tiny_weights(&f),
    )
    .err()
    .expect("should fail")
    .to_string();
    assert!(
        e.contains("hidden_size (30)") && e.contains("num_attention_heads (4)"),
        "{e}"
    );
}

#[test]
fn padding_does_not_change_a_sentence() {
    let f = fixture("bert_tiny.safetensors");
    let model = Bert::from_tensors(tiny_config(), tiny_weights(&f)).unwrap();
    let (ids, mask, types) = (&f["ids"], &f["attention_mask"], &f["token_type_ids"]);
    let batch = model.forward_masked(ids, mask, Some(types)).unwrap();
    let pooled = l2_normalize(&mean_pool(&batch, mask).unwrap()).unwrap();
    for (b, len) in lengths(mask).into_iter().enumerate() {
        let one = |t: &Tensor| t.narrow(0, b, 1).unwrap().narrow(1, 0, len).unwrap();
        let (ids1, mask1, types1) = (one(ids), one(mask), one(types));
        // Alone: no padding, so no mask tensor (the fused attention path).
        let alone = model.forward_masked(&ids1, &mask1, Some(&types1)).unwrap();
        close(
            &format!("sentence {b} alone vs padded"),
            &alone.select(0, 0).unwrap(),
            &real_positions(&batch, b, len),
            1e-5,
        );
        let e = l2_normalize(&mean_pool(&alone, &mask1).unwrap()).unwrap();
        close(
            &format!("embedding {b}"),
            &e,
            &pooled.narrow(0, b, 1).unwrap(),
            1e-5,
        );
    }
}

#[test]
fn a_sequence_of_only_padding_stays_finite() {
    let f = fixture("bert_tiny.safetensors");
    let model = Bert::from_tensors(tiny_config(), tiny_weights(&f)).unwrap();
    let ids = Tensor::from_vec(vec![2i64, 17, 45, 0, 0, 0], [2, 3]).unwrap();
    let mask = Tensor::from_vec(vec![1i64, 1, 1, 0, 0, 0], [2, 3]).unwrap();
    let hidden = model.forward_masked(&ids, &mask, None).unwrap();
    assert!(hidden.to_f64_vec().iter().all(|v| v.is_finite()));
    let e = mean_pool(&hidden, &mask).unwrap().to_f64_vec();
    assert!(e[..32].iter().any(|&v| v != 0.0));
    assert!(e[32..].iter().all(|&v| v == 0.0), "no real token: zeros");
}

#[test]
fn bad_inputs_are_refused() {
    let f = fixture("bert_tiny.safetensors");
    let model = Bert::from_tensors(tiny_config(), tiny_weights(&f)).unwrap();
    let ids = Tensor::from_vec(vec![1i64; 6], [2, 3]).unwrap();
    assert!(model
        .forward_masked(&ids, &Tensor::ones([3, 2]), None)
        .is_err());
    let long = Tensor::from_vec(vec![1i64; 65], [1, 65]).unwrap();
    let e = model.forward(&long).unwrap_err().to_string();
    assert!(e.contains("max_position_embeddings (64)"), "{e}");
    assert!(model.forward(&Tensor::ones([2, 3])).is_err(), "f32 ids");
}

// ------------------------------------------------------------------------ all-MiniLM-L6-v2

fn minilm() -> Option<&'static (Bert, Tokenizer)> {
    static MODEL: OnceLock<Option<(Bert, Tokenizer)>> = OnceLock::new();
    MODEL
        .get_or_init(|| {
            let Ok(dir) = std::env::var("NERVE_MINILM_DIR") else {
                eprintln!("NERVE_MINILM_DIR is not set: all-MiniLM-L6-v2 tests skipped");
                return None;
            };
            Some(nerve_models::load_sentence_encoder(&dir).expect("load all-MiniLM-L6-v2"))
        })
        .as_ref()
}

fn sentences() -> Vec<String> {
    let path = format!(
        "{}/tests/fixtures/minilm_sentences.json",
        env!("CARGO_MANIFEST_DIR")
    );
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn minilm_example_sentence() {
    let Some((bert, tok)) = minilm() else { return };
    assert_eq!(bert.max_seq_length(), 256, "from sentence_bert_config.json");
    let s = "This is an example sentence";
    assert_eq!(
        tok.encode(s, true).unwrap()[..7],
        [101, 2023, 2003, 2019, 2742, 6251, 102]
    );
    let inputs = bert.tokenize(tok, &[s]).unwrap();
    assert_eq!(
        inputs.input_ids.to_vec::<i64>().unwrap(),
        [101, 2023, 2003, 2019, 2742, 6251, 102],
        "no fixed padding to 128"
    );
    let e = bert.embed(tok, &[s], 32).unwrap();
    assert_eq!(e.dims(), &[1, 384]);
    let v = e.to_vec::<f32>().unwrap();
    for (got, want) in v.iter().zip([0.0677f32, 0.0635, 0.0487, 0.0793]) {
        assert!((got - want).abs() < 1e-4, "{:?}", &v[..4]);
    }
}

#[test]
fn minilm_matches_sentence_transformers() {
    let Some((bert, tok)) = minilm() else { return };
    let f = fixture("minilm_embeddings.safetensors");
    let owned = sentences();
    let s: Vec<&str> = owned.iter().map(String::as_str).collect();

    // Token ids: all sentences in one batch, padded to the longest (256 after truncation).
    let inputs = bert.tokenize(tok, &s).unwrap();
    assert_eq!(inputs.input_ids.dims(), f["input_ids"].dims());
    assert_eq!(
        inputs.input_ids.to_vec::<i64>().unwrap(),
        f["input_ids"].to_vec::<i64>().unwrap(),
        "token ids"
    );
    assert_eq!(
        inputs.attention_mask.to_vec::<i64>().unwrap(),
        f["attention_mask"].to_vec::<i64>().unwrap(),
        "attention mask"
    );

    let want = &f["embeddings"];
    let d = want.dims()[1];
    let want = want.to_vec::<f32>().unwrap();
    for batch_size in [4, 1] {
        let got = bert.embed(tok, &s, batch_size).unwrap();
        assert_eq!(got.dims(), &[s.len(), d]);
        let got = got.to_vec::<f32>().unwrap();
        let mut min = f64::INFINITY;
        for i in 0..s.len() {
            let (a, b) = (&got[i * d..(i + 1) * d], &want[i * d..(i + 1) * d]);
            let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
            let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
            let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
            let cos = dot / (na * nb);
            assert!(cos >= 0.99999, "sentence {i} {:?}: cosine {cos}", s[i]);
            min = min.min(cos);
        }
        eprintln!(
            "batch size {batch_size}: minimum cosine similarity {min:.9} (1 - min = {:.1e})",
            1.0 - min
        );
    }
}
