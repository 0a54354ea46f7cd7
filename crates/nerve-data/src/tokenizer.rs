//! Subword tokenizers of pretrained models, on Hugging Face's `tokenizers` crate: read from a
//! `tokenizer.json` (BERT's WordPiece, byte-level BPE, …) or rebuilt from the vocabulary and
//! merges a GGUF file carries ([`BpeVocab`]), with the model's chat template
//! ([`Tokenizer::apply_chat_template`], Jinja via `minijinja`) and streaming decoding.
//!
//! ```no_run
//! # fn main() -> nerve_data::Result<()> {
//! let tok = nerve_data::Tokenizer::from_file("model/tokenizer.json")?;
//! let ids = tok.encode("This is an example sentence", true)?;
//! assert_eq!(tok.decode(&ids, true)?, "this is an example sentence");
//! # Ok(()) }
//! ```

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::error::{DataError, Result};

/// GGUF's token types (`tokenizer.ggml.token_type`).
pub mod token_type {
    /// An ordinary token.
    pub const NORMAL: i32 = 1;
    /// The unknown token.
    pub const UNKNOWN: i32 = 2;
    /// A control (special) token such as `<|im_start|>`.
    pub const CONTROL: i32 = 3;
    /// A token added by the user, matched before the model runs.
    pub const USER_DEFINED: i32 = 4;
    /// Unused.
    pub const UNUSED: i32 = 5;
    /// A byte token (`<0x0A>`).
    pub const BYTE: i32 = 6;
}

/// A byte-level BPE vocabulary as a GGUF file stores it (`tokenizer.ggml.*`, model `gpt2`).
#[derive(Clone, Debug, Default)]
pub struct BpeVocab {
    /// Token strings in byte-level form (`Ġthe`), by id.
    pub tokens: Vec<String>,
    /// Each token's type (see [`token_type`]); empty means all normal.
    pub token_types: Vec<i32>,
    /// Merges, `"a b"`, highest priority first.
    pub merges: Vec<String>,
    /// llama.cpp's pre-tokenizer name (`tokenizer.ggml.pre`): `default`/`gpt2`, `smollm`,
    /// `llama3`/`llama-bpe`, `qwen2`.
    pub pre: String,
    /// Beginning-of-sequence id.
    pub bos: Option<u32>,
    /// End-of-sequence id.
    pub eos: Option<u32>,
    /// Whether encoding with special tokens puts BOS first.
    pub add_bos: bool,
    /// The model's chat template (Jinja), if any.
    pub chat_template: Option<String>,
}

/// One message of a chat, for [`Tokenizer::apply_chat_template`].
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

impl ChatMessage {
    /// A message from `role`.
    pub fn new(role: &str, content: &str) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A tokenizer: text ↔ token ids, with the special tokens and chat template of its model.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos: Option<u32>,
    eos: Option<u32>,
    add_bos: bool,
    chat_template: Option<String>,
    source: PathBuf,
}

/// The regex of GPT-2's byte-level pre-tokenizer with Llama 3's changes (numbers in runs of
/// at most three digits, case-insensitive contractions).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's pre-tokenizer regex (single digits).
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

fn byte_level(use_regex: bool) -> Value {
    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex})
}

fn split(pattern: &str) -> Value {
    json!({"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false})
}

impl Tokenizer {
    /// Read a Hugging Face `tokenizer.json`; the BOS/EOS ids are taken from the usual special
    /// tokens when present (`[CLS]`/`[SEP]`, `<s>`/`</s>`, `<|endoftext|>`).
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
        Self::from_bytes(&bytes, path)
    }

    /// [`Tokenizer::from_file`] of a `tokenizer.json` held in memory; `source` names it in
    /// errors.
    pub fn from_bytes(bytes: &[u8], source: impl AsRef<Path>) -> Result<Self> {
        let path = source.as_ref();
        let bad = |msg: String| DataError::format(path, format!("not a tokenizer.json: {msg}"));
        // The `tokenizers` crate panics (`expect("Helper")`) on some malformed JSON inside a
        // component, so the syntax is checked here first; a panic on well-formed JSON (its
        // `Precompiled` normaliser `expect`s its fields) is caught and reported as an error.
        serde_json::from_slice::<serde::de::IgnoredAny>(bytes).map_err(|e| bad(e.to_string()))?;
        let inner = std::panic::catch_unwind(|| tokenizers::Tokenizer::from_bytes(bytes))
            .map_err(|panic| {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "a component it cannot read".into());
                bad(format!("the tokenizers library failed on it ({what})"))
            })?
            .map_err(|e| bad(e.to_string()))?;
        let find = |names: &[&str]| names.iter().find_map(|n| inner.token_to_id(n));
        Ok(Self {
            bos: find(&["<s>", "[CLS]", "<|begin_of_text|>"]),
            eos: find(&["</s>", "[SEP]", "<|endoftext|>", "<|end_of_text|>"]),
            inner,
            add_bos: false,
            chat_template: None,
            source: path.to_path_buf(),
        })
    }

    /// A byte-level BPE tokenizer rebuilt from a GGUF vocabulary; `source` names the file in
    /// errors. Control and user-defined tokens are matched whole before the BPE runs, as
    /// llama.cpp and transformers do.
    pub fn from_bpe_vocab(v: &BpeVocab, source: impl AsRef<Path>) -> Result<Self> {
        let source = source.as_ref();
        let bad = |msg: String| DataError::format(source, msg);
        if v.tokens.is_empty() {
            return Err(bad("the tokenizer has no tokens".into()));
        }
        if !v.token_types.is_empty() && v.token_types.len() != v.tokens.len() {
            return Err(bad(format!(
                "{} token types for {} tokens",
                v.token_types.len(),
                v.tokens.len()
            )));
        }
        for (i, m) in v.merges.iter().enumerate() {
            if m.split(' ').count() != 2 {
                return Err(bad(format!("merge {i} ({m:?}) is not two tokens")));
            }
        }
        for (what, id) in [("bos", v.bos), ("eos", v.eos)] {
            if id.is_some_and(|id| id as usize >= v.tokens.len()) {
                return Err(bad(format!(
                    "{what} token id {id:?} outside the vocabulary"
                )));
            }
        }
        let pre = match v.pre.as_str() {
            "" | "default" | "gpt2" => byte_level(true),
            "smollm" | "starcoder" | "refact" => json!({
                "type": "Sequence",
                "pretokenizers": [{"type": "Digits", "individual_digits": true}, byte_level(true)]
            }),
            "llama3" | "llama-bpe" | "llama-v3" | "smaug-bpe" => json!({
                "type": "Sequence", "pretokenizers": [split(LLAMA3_SPLIT), byte_level(false)]
            }),
            "qwen2" => json!({
                "type": "Sequence", "pretokenizers": [split(QWEN2_SPLIT), byte_level(false)]
            }),
            other => {
                return Err(bad(format!(
                    "pre-tokenizer {other:?} is not supported (known: default, gpt2, smollm, \
                     starcoder, llama3, llama-bpe, qwen2)"
                )))
            }
        };
        let vocab: serde_json::Map<String, Value> = v
            .tokens
            .iter()
            .enumerate()
            .map(|(i, t)| (t.clone(), json!(i)))
            .collect();
        let special = |ty: i32| ty == token_type::CONTROL || ty == token_type::USER_DEFINED;
        let added: Vec<Value> = v
            .token_types
            .iter()
            .enumerate()
            .filter(|(_, &ty)| special(ty))
            .map(|(i, &ty)| {
                json!({"id": i, "content": v.tokens[i], "single_word": false, "lstrip": false,
                       "rstrip": false, "normalized": false,
                       "special": ty == token_type::CONTROL})
            })
            .collect();
        let spec = json!({
            "version": "1.0",
            "truncation": null,
            "padding": null,
            "added_tokens": added,
            "normalizer": null,
            "pre_tokenizer": pre,
            "post_processor": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true},
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {
                "type": "BPE", "dropout": null, "unk_token": null,
                "continuing_subword_prefix": null, "end_of_word_suffix": null,
                "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                "vocab": vocab, "merges": v.merges,
            }
        });
        let inner = tokenizers::Tokenizer::from_bytes(spec.to_string().as_bytes())
            .map_err(|e| bad(format!("cannot build the BPE tokenizer: {e}")))?;
        Ok(Self {
            inner,
            bos: v.bos,
            eos: v.eos,
            add_bos: v.add_bos,
            chat_template: v.chat_template.clone(),
            source: source.to_path_buf(),
        })
    }

    /// Token ids of `text`; with `add_special_tokens`, the model's own additions (BERT's
    /// `[CLS] … [SEP]`, a BOS where the model wants one).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, add_special_tokens)
            .map_err(|e| DataError::Invalid(format!("encoding {text:?}: {e}")))?;
        let mut ids = enc.get_ids().to_vec();
        if add_special_tokens && self.add_bos {
            if let Some(b) = self.bos.filter(|&b| ids.first() != Some(&b)) {
                ids.insert(0, b);
            }
        }
        Ok(ids)
    }

    /// The text of `ids`, leaving out special tokens when `skip_special_tokens`.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| DataError::Invalid(format!("decoding {} ids: {e}", ids.len())))
    }

    /// A decoder for streaming: feed ids one at a time, get text as soon as it is complete
    /// UTF-8 (a character split over several byte tokens comes out whole).
    pub fn stream(&self, skip_special_tokens: bool) -> TokenStream<'_> {
        TokenStream {
            tok: self,
            ids: Vec::new(),
            printed: 0,
            skip: skip_special_tokens,
        }
    }

    /// The id of a token string, if it is in the vocabulary.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The string of a token id.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// Tokens in the vocabulary, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Beginning-of-sequence id.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    /// End-of-sequence id.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos
    }

    /// The model's chat template, if it has one.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// The Hugging Face tokenizer underneath, for what this wrapper does not expose.
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }

    /// Render `messages` with the model's chat template (as transformers'
    /// `apply_chat_template(..., tokenize=False)`), ending with the assistant's turn header
    /// when `add_generation_prompt`.
    pub fn apply_chat_template(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let src = self
            .chat_template
            .as_deref()
            .ok_or_else(|| DataError::format(&self.source, "the model has no chat template"))?;
        let bad =
            |e: minijinja::Error| DataError::format(&self.source, format!("chat template: {e:#}"));
        let mut env = minijinja::Environment::new();
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        // The template comes from the model file: bound the work and the output, so a
        // hostile one (loops nested over `range(99999)`) fails instead of hanging.
        env.set_fuel(Some(CHAT_TEMPLATE_FUEL));
        env.add_template("chat", src).map_err(bad)?;
        let token = |id: Option<u32>| id.and_then(|i| self.id_to_token(i)).unwrap_or_default();
        let mut out = CappedWriter::new(MAX_CHAT_BYTES);
        let rendered = env.get_template("chat").map_err(bad)?.render_captured_to(
            minijinja::context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => token(self.bos),
                eos_token => token(self.eos),
            },
            &mut out,
        );
        if out.overflowed {
            return Err(DataError::format(
                &self.source,
                format!("chat template: the output is longer than {MAX_CHAT_BYTES} bytes"),
            ));
        }
        match rendered {
            Err(e) if e.kind() == minijinja::ErrorKind::OutOfFuel => Err(DataError::format(
                &self.source,
                format!(
                    "chat template: stopped after {CHAT_TEMPLATE_FUEL} steps (a loop that \
                     does not end, or far more work than a chat needs)"
                ),
            )),
            Err(e) => Err(bad(e)),
            Ok(_) => String::from_utf8(out.buf).map_err(|_| {
                DataError::format(&self.source, "chat template: the output is not UTF-8")
            }),
        }
    }
}

/// Steps (minijinja's "fuel": roughly one per instruction) a chat template may take. Real
/// templates take a few dozen per message.
const CHAT_TEMPLATE_FUEL: u64 = 10_000_000;

/// The longest rendered chat, in bytes.
const MAX_CHAT_BYTES: usize = 64 << 20;

/// A `Vec` that refuses to grow past `max` bytes.
struct CappedWriter {
    buf: Vec<u8>,
    max: usize,
    overflowed: bool,
}

impl CappedWriter {
    fn new(max: usize) -> Self {
        Self {
            buf: Vec::new(),
            max,
            overflowed: false,
        }
    }
}

impl std::io::Write for CappedWriter {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        if b.len() > self.max - self.buf.len() {
            self.overflowed = true;
            return Err(std::io::Error::other("output too long"));
        }
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Streaming decoder of [`Tokenizer::stream`].
pub struct TokenStream<'a> {
    tok: &'a Tokenizer,
    ids: Vec<u32>,
    printed: usize,
    skip: bool,
}

impl TokenStream<'_> {
    /// Add one id; returns the new text that is complete so far (possibly empty).
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.ids.push(id);
        let text = self.tok.decode(&self.ids, self.skip)?;
        // Hold back an incomplete UTF-8 sequence (decoded as U+FFFD) until it completes.
        if text.ends_with('\u{FFFD}') || !text.is_char_boundary(self.printed) {
            return Ok(String::new());
        }
        let new = text[self.printed..].to_string();
        self.printed = text.len();
        Ok(new)
    }
}
