//! Tokenizers: the first byte picks what the rest is.
//! - `0`: a Hugging Face `tokenizer.json`;
//! - `1`: a chat template (Jinja) rendered with a tiny byte-level BPE vocabulary;
//! - `2`: a GGUF-style BPE vocabulary, one token per line, an empty line, then the merges
//!   (the pre-tokenizer and token types chosen by the first byte's high bits);
//! - `3`: a character vocabulary (`CharTokenizer`).
//!
//! Every tokenizer built encodes and decodes a fixed text, and decodes as a stream.
#![no_main]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Once;

use libfuzzer_sys::fuzz_target;
use nerve_data::tokenizer::token_type;
use nerve_data::{BpeVocab, CharTokenizer, ChatMessage, Tokenizer};

const TEXT: &str = "Hello, World! It's 2024: naïve café 123456 <|im_start|>user\n\t  x";

fn exercise(tok: &Tokenizer) {
    for special in [false, true] {
        let Ok(ids) = tok.encode(TEXT, special) else {
            continue;
        };
        let _ = tok.decode(&ids, special);
        let mut stream = tok.stream(special);
        for &id in ids.iter().take(64) {
            let _ = stream.push(id);
            let _ = tok.id_to_token(id);
        }
    }
    let _ = (tok.vocab_size(), tok.bos_id(), tok.eos_id());
    let _ = tok.decode(&[0, 1, u32::MAX], true);
}

fn byte_vocab() -> Vec<String> {
    // GPT-2's byte-level alphabet is enough to encode any text.
    (0u8..=255)
        .map(|b| {
            let c = match b {
                b'!'..=b'~' | 0xa1..=0xac | 0xae..=0xff => char::from(b),
                _ => char::from_u32(256 + u32::from(b)).expect("valid char"),
            };
            c.to_string()
        })
        .collect()
}

/// libFuzzer's panic hook aborts at once, before `catch_unwind` can see the panic; but
/// `Tokenizer::from_bytes` deliberately catches the panics of the `tokenizers` crate (on
/// some malformed files) and turns them into errors. So the hook is replaced by one that
/// only reports: a panic that nerve catches is not a failure, and one that reaches the
/// harness still aborts the run (libfuzzer-sys aborts on any panic it catches).
fn report_panics_without_aborting() {
    static ONCE: Once = Once::new();
    static SHOWN: AtomicUsize = AtomicUsize::new(0);
    ONCE.call_once(|| {
        std::panic::set_hook(Box::new(|info| {
            if SHOWN.fetch_add(1, Ordering::Relaxed) < 3 {
                eprintln!("panic (an error if nerve caught it, a crash if not): {info}");
            }
        }))
    });
}

fuzz_target!(|data: &[u8]| {
    report_panics_without_aborting();
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    match sel & 3 {
        0 => {
            if let Ok(tok) = Tokenizer::from_bytes(rest, "fuzz.json") {
                exercise(&tok);
            }
        }
        1 => {
            let v = BpeVocab {
                tokens: byte_vocab(),
                bos: Some(0),
                eos: Some(1),
                chat_template: Some(String::from_utf8_lossy(rest).into_owned()),
                ..BpeVocab::default()
            };
            let tok = Tokenizer::from_bpe_vocab(&v, "fuzz.gguf").expect("fixed vocabulary");
            let chat = [
                ChatMessage::new("system", "Be brief."),
                ChatMessage::new("user", "Hi"),
                ChatMessage::new("assistant", "Hello"),
            ];
            let _ = tok.apply_chat_template(&chat, sel & 4 != 0);
        }
        2 => {
            let text = String::from_utf8_lossy(rest);
            let mut lines = text.split('\n');
            let tokens: Vec<String> = lines
                .by_ref()
                .take_while(|l| !l.is_empty())
                .map(String::from)
                .collect();
            let merges: Vec<String> = lines.map(String::from).collect();
            let types = [
                token_type::NORMAL,
                token_type::CONTROL,
                token_type::USER_DEFINED,
                token_type::BYTE,
            ];
            let v = BpeVocab {
                token_types: if sel & 4 != 0 {
                    (0..tokens.len()).map(|i| types[i % types.len()]).collect()
                } else {
                    Vec::new()
                },
                tokens,
                merges,
                pre: ["default", "smollm", "llama3", "qwen2"][usize::from((sel >> 3) & 3)].into(),
                bos: Some(0),
                eos: Some(u32::from(sel >> 5)),
                add_bos: sel & 0x80 != 0,
                chat_template: None,
            };
            if let Ok(tok) = Tokenizer::from_bpe_vocab(&v, "fuzz.gguf") {
                exercise(&tok);
            }
        }
        _ => {
            let text = String::from_utf8_lossy(rest);
            if let Ok(t) = CharTokenizer::from_vocab(&text) {
                if let Ok(ids) = t.encode(&text) {
                    assert_eq!(t.decode(&ids).expect("own ids"), text);
                }
            }
            let t = CharTokenizer::from_text(&text);
            let _ = t.encode(TEXT);
        }
    }
});
