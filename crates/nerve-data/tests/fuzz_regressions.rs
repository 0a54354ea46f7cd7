//! Hostile files found by the fuzz targets (`tools/fuzz.sh`) or by the audit that came with
//! them, kept as regression tests: each must give a typed error naming the file and what is
//! wrong, never a panic, a hang or an allocation the file does not justify.

mod common;

use common::{gzip, idx_bytes};
use nerve_data::{BpeVocab, ChatMessage, DataError, IdxArray, Tokenizer};

/// The message of a [`DataError::Format`], which must name `file`.
fn format_error<T>(result: nerve_data::Result<T>, file: &str) -> String {
    match result {
        Ok(_) => panic!("{file}: accepted, but must be refused"),
        Err(e @ DataError::Format { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains(file), "{msg}");
            msg
        }
        Err(e) => panic!("{file}: expected DataError::Format, got {e:?}"),
    }
}

#[test]
fn idx_zero_dimension_beside_huge_ones_is_refused() {
    // No data, so the length check passes, but 3 × (2^32 − 1) overflows any product of the
    // dimensions that meets the zero last (and `IdxArray::data.len()` is their product).
    let max = u32::MAX;
    let bytes = idx_bytes(&[0, max, max, max], &[]);
    let msg = format_error(IdxArray::from_bytes(&bytes, "zero-dim.idx"), "zero-dim.idx");
    assert!(msg.contains("overflow"), "{msg}");
    let a = IdxArray::from_bytes(&idx_bytes(&[0, max, max], &[]), "empty.idx").unwrap();
    assert_eq!(a.dims, [0, max as usize, max as usize]);
}

#[test]
fn idx_gzip_keeps_only_the_declared_data_and_counts_the_rest() {
    // Two data bytes declared, a megabyte more in the stream: refused with the exact count.
    let mut raw = idx_bytes(&[2], &[7, 9]);
    raw.resize(raw.len() + (1 << 20), 0);
    let msg = format_error(
        IdxArray::from_bytes(&gzip(&raw), "long.idx.gz"),
        "long.idx.gz",
    );
    assert!(
        msg.contains("trailing bytes") && msg.contains(&format!("found {}", 2 + (1 << 20))),
        "{msg}"
    );
}

// The `tokenizers` crate `expect`s while reading some components of a tokenizer.json: a
// syntax error inside the decoder (`expect("Helper")`), a Precompiled normaliser whose
// charsmap is not base64 (`expect("Precompiled")`). The first was found by the tokenizer fuzz
// target, the second by reading the crate's source after it.

#[test]
fn tokenizer_json_with_a_malformed_decoder_is_an_error_not_a_panic() {
    let bytes = br#"{"decoder": {"type": "ByteLevel" "oops": 1}}"#;
    let msg = format_error(Tokenizer::from_bytes(bytes, "tok.json"), "tok.json");
    assert!(
        msg.contains("not a tokenizer.json") && msg.contains("line 1"),
        "{msg}"
    );
}

#[test]
fn tokenizer_json_with_a_bad_precompiled_normalizer_is_an_error_not_a_panic() {
    let bytes = br#"{"normalizer": {"type": "Precompiled", "precompiled_charsmap": "!!"}}"#;
    let msg = format_error(Tokenizer::from_bytes(bytes, "tok.json"), "tok.json");
    assert!(
        msg.contains("not a tokenizer.json") && msg.contains("Precompiled"),
        "{msg}"
    );
}

/// A byte-level BPE tokenizer of three tokens with `template` as its chat template.
fn with_template(template: &str) -> Tokenizer {
    let v = BpeVocab {
        tokens: vec!["a".into(), "b".into(), "<s>".into()],
        bos: Some(2),
        chat_template: Some(template.into()),
        ..BpeVocab::default()
    };
    Tokenizer::from_bpe_vocab(&v, "model.gguf").unwrap()
}

// A chat template comes from the model file and is a program: one that loops for ever or
// writes without end must fail, not hang or fill memory. Found by the audit.

#[test]
fn chat_template_that_runs_for_ever_is_stopped() {
    // 10^15 iterations: hours of work without the step limit.
    let tok = with_template(
        "{% for a in range(100000) %}{% for b in range(100000) %}{% for c in range(100000) %}\
         {% endfor %}{% endfor %}{% endfor %}",
    );
    let msg = format_error(
        tok.apply_chat_template(&[ChatMessage::new("user", "hi")], true),
        "model.gguf",
    );
    assert!(
        msg.contains("chat template") && msg.contains("steps"),
        "{msg}"
    );
}

#[test]
fn chat_template_with_endless_output_is_refused() {
    // 20 strings of 10^7 bytes: 200 MB, over the 64 MiB limit.
    let tok = with_template("{% for i in range(20) %}{{ 'x' * 10000000 }}{% endfor %}");
    let msg = format_error(
        tok.apply_chat_template(&[ChatMessage::new("user", "hi")], true),
        "model.gguf",
    );
    assert!(msg.contains("longer than"), "{msg}");
    // A real template still renders.
    let tok = with_template(
        "{{ bos_token }}{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}\
         {% if add_generation_prompt %}<assistant>{% endif %}",
    );
    let chat = [ChatMessage::new("user", "hi")];
    assert_eq!(
        tok.apply_chat_template(&chat, true).unwrap(),
        "<s><user>hi<assistant>"
    );
}
