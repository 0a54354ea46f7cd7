//! SmolLM2-135M-Instruct from its GGUF file against transformers (fixtures from
//! `tools/torch_llama_fixtures.py --smollm2`): the tokenizer's ids and chat template, the
//! last-position logits of "The capital of France is" within 1e-3, and greedy decoding's
//! " Paris.".
//!
//! The 98 MB model is not in the repository: these tests run when `NERVE_SMOLLM2_GGUF` names
//! the file (`nerve data get smollm2` fetches it; `.ci/run` sets the variable) and say so and
//! pass otherwise.

mod common;

use std::sync::OnceLock;

use nerve_core::Tensor;
use nerve_data::{ChatMessage, Tokenizer};
use nerve_models::Llama;
use nerve_nn::Module;

fn model() -> Option<&'static (Llama, Tokenizer)> {
    static MODEL: OnceLock<Option<(Llama, Tokenizer)>> = OnceLock::new();
    MODEL
        .get_or_init(|| {
            let Ok(path) = std::env::var("NERVE_SMOLLM2_GGUF") else {
                eprintln!("NERVE_SMOLLM2_GGUF is not set: SmolLM2 tests skipped");
                return None;
            };
            Some(nerve_models::gguf::load_llama(&path).expect("load SmolLM2"))
        })
        .as_ref()
}

fn fixture_dir() -> &'static str {
    concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures")
}

#[test]
fn tokenizer_matches_transformers() {
    let Some((_, tok)) = model() else { return };
    let text =
        std::fs::read_to_string(format!("{}/smollm2_tokenizer.json", fixture_dir())).unwrap();
    let cases: serde_json::Value = serde_json::from_str(&text).unwrap();
    for case in cases["encode"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let ids = tok.encode(text, true).unwrap();
        assert_eq!(ids, want, "ids of {text:?}");
        assert_eq!(
            tok.decode(&ids, false).unwrap(),
            text,
            "round trip of {text:?}"
        );
    }
    let chat = &cases["chat"];
    let messages: Vec<ChatMessage> = chat["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| ChatMessage::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
        .collect();
    assert_eq!(
        tok.apply_chat_template(&messages, true).unwrap(),
        chat["rendered"].as_str().unwrap()
    );
    // Streaming decoding gives the same text, a multi-byte character at a time.
    let ids = tok.encode("café 東京 🎉!", false).unwrap();
    let mut stream = tok.stream(false);
    let mut pieces = String::new();
    for &id in &ids {
        let piece = stream.push(id).unwrap();
        assert!(
            !piece.contains('\u{FFFD}'),
            "a split character leaked: {piece:?}"
        );
        pieces.push_str(&piece);
    }
    assert_eq!(pieces, "café 東京 🎉!");
}

#[test]
fn last_logits_match_transformers_and_greedy_says_paris() {
    let Some((model, tok)) = model() else { return };
    let path = format!("{}/smollm2_logits.safetensors", fixture_dir());
    let f = nerve_nn::checkpoint::load_safetensors(path).unwrap().0;
    let ids = tok.encode("The capital of France is", true).unwrap();
    let want_ids: Vec<i64> = f["ids"].to_vec().unwrap();
    assert_eq!(ids.iter().map(|&i| i as i64).collect::<Vec<_>>(), want_ids);
    let input = Tensor::from_vec(want_ids.clone(), [1, want_ids.len()]).unwrap();
    let logits = nerve_core::no_grad(|| model.forward(&input)).unwrap();
    let last = logits
        .select(1, want_ids.len() - 1)
        .unwrap()
        .reshape(&[-1])
        .unwrap();
    let (a, b) = (last.to_f64_vec(), f["last_logits"].to_f64_vec());
    let worst = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max);
    eprintln!("SmolLM2 last-position logits: max |nerve - transformers| = {worst:.2e}");
    assert!(worst <= 1e-3, "max logit difference {worst}");

    let greedy: Vec<i64> = f["greedy"].to_vec().unwrap();
    let out = model
        .generate_with(
            &want_ids,
            greedy.len(),
            &[],
            |l, _| (0..l.len()).max_by(|&x, &y| l[x].total_cmp(&l[y])).unwrap() as i64,
            |_| Ok(()),
        )
        .unwrap();
    assert_eq!(out, greedy);
    let text = tok
        .decode(&out.iter().map(|&i| i as u32).collect::<Vec<_>>(), true)
        .unwrap();
    assert!(text.starts_with(" Paris."), "{text:?}");
}
