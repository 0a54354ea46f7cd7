//! Models from llama.cpp's GGUF files: the configuration from the metadata, the weights
//! dequantised to f32 under transformers' names (or kept in their quantised blocks for
//! [`QuantLlama`]), and the tokenizer rebuilt from the vocabulary the file carries.
//!
//! ```no_run
//! # fn main() -> Result<(), nerve_io::FormatError> {
//! let (model, tok) = nerve_models::gguf::load_llama("SmolLM2-135M-Instruct.Q4_1.gguf")?;
//! let ids = tok.encode("The capital of France is", true).unwrap();
//! # Ok(()) }
//! ```

use std::collections::HashMap;
use std::path::Path;

use nerve_core::kernels::quant::{QuantFormat, QuantMatrix};
use nerve_core::Tensor;
use nerve_data::{BpeVocab, Tokenizer};
use nerve_io::gguf::{GgmlType, GgufFile};
use nerve_io::FormatError;

use crate::llama::{Llama, LlamaConfig};
use crate::qllama::QuantLlama;

/// Architectures read as [`Llama`].
const LLAMA_ARCHS: &[&str] = &["llama", "mistral"];

/// The [`LlamaConfig`] of a GGUF file's metadata (`<arch>.block_count`, …); errors name the
/// file and the key.
pub fn llama_config(f: &GgufFile) -> Result<LlamaConfig, FormatError> {
    let arch = f.get_str("general.architecture")?;
    if !LLAMA_ARCHS.contains(&arch) {
        return Err(FormatError::invalid(
            f.path(),
            format!("architecture {arch:?} is not supported (known: {LLAMA_ARCHS:?})"),
        ));
    }
    let key = |k: &str| format!("{arch}.{k}");
    let heads = f.get_usize(&key("attention.head_count"))?;
    let opt_f64 = |k: &str, default: f64| -> Result<f64, FormatError> {
        match f.get(&key(k)) {
            Some(_) => f.get_f64(&key(k)),
            None => Ok(default),
        }
    };
    let vocab_size = match f.get(&key("vocab_size")) {
        Some(_) => f.get_usize(&key("vocab_size"))?,
        None => f.get_str_array("tokenizer.ggml.tokens")?.len(),
    };
    if f.tensor_info("rope_freqs.weight").is_some() || f.get(&key("rope.scaling.type")).is_some() {
        return Err(FormatError::invalid(
            f.path(),
            "rotary embedding scaling (rope_freqs / rope.scaling) is not supported yet",
        ));
    }
    let c = LlamaConfig {
        vocab_size,
        hidden_size: f.get_usize(&key("embedding_length"))?,
        intermediate_size: f.get_usize(&key("feed_forward_length"))?,
        num_hidden_layers: f.get_usize(&key("block_count"))?,
        num_attention_heads: heads,
        num_key_value_heads: match f.get(&key("attention.head_count_kv")) {
            Some(_) => f.get_usize(&key("attention.head_count_kv"))?,
            None => heads,
        },
        rms_norm_eps: opt_f64("attention.layer_norm_rms_epsilon", 1e-5)?,
        rope_theta: opt_f64("rope.freq_base", 10000.0)?,
        max_position_embeddings: f.get_usize(&key("context_length"))?,
        tie_word_embeddings: f.tensor_info("output.weight").is_none(),
    };
    c.validate()
        .map_err(|e| FormatError::invalid(f.path(), e.to_string()))?;
    if let Some(rot) = f.get(&key("rope.dimension_count")) {
        let n = rot.as_integer().unwrap_or(-1);
        if n != c.head_dim() as i128 {
            return Err(FormatError::invalid(
                f.path(),
                format!(
                    "{arch}.rope.dimension_count is {n}; only full-width rotary embeddings \
                     (head width {}) are supported",
                    c.head_dim()
                ),
            ));
        }
    }
    Ok(c)
}

/// Undo llama.cpp's reordering of the query/key rows (its converter interleaves the two
/// halves of each head for its rotary kernel): `[heads·hd, in]` with rows `(h, j, s)` back
/// to transformers' `(h, s, j)`.
fn unpermute(w: Tensor, heads: usize) -> nerve_core::Result<Tensor> {
    let (rows, cols) = (w.dims()[0], w.dims()[1]);
    let half = rows / heads / 2;
    w.reshape(&[heads as isize, half as isize, 2, cols as isize])?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(&[rows as isize, cols as isize])
}

/// [`unpermute`] for a quantised matrix: the permutation moves whole rows, and a row is a
/// run of blocks, so the blocks move unchanged.
fn unpermute_rows(w: &QuantMatrix, heads: usize) -> nerve_core::Result<QuantMatrix> {
    let hd = w.rows() / heads.max(1);
    let half = hd / 2;
    // Transformers' row (h, s, j) is llama.cpp's row (h, j, s).
    let order: Vec<usize> = (0..w.rows())
        .map(|r| {
            let (h, s, j) = (r / hd, (r % hd) / half, r % half);
            h * hd + 2 * j + s
        })
        .collect();
    w.select_rows(&order)
}

/// The block format [`QuantMatrix`] reads for a ggml type, if it reads it.
pub fn quant_format(ty: GgmlType) -> Option<QuantFormat> {
    match ty {
        GgmlType::Q4_0 => Some(QuantFormat::Q4_0),
        GgmlType::Q4_1 => Some(QuantFormat::Q4_1),
        GgmlType::Q8_0 => Some(QuantFormat::Q8_0),
        _ => None,
    }
}

/// The transformers name of a llama.cpp tensor name, if it is one the model uses.
fn hf_name(name: &str) -> Option<String> {
    let fixed = match name {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(n) = fixed {
        return Some(n.to_string());
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, part) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let hf = match part {
        "attn_norm.weight" => "input_layernorm.weight",
        "attn_q.weight" => "self_attn.q_proj.weight",
        "attn_k.weight" => "self_attn.k_proj.weight",
        "attn_v.weight" => "self_attn.v_proj.weight",
        "attn_output.weight" => "self_attn.o_proj.weight",
        "ffn_norm.weight" => "post_attention_layernorm.weight",
        "ffn_gate.weight" => "mlp.gate_proj.weight",
        "ffn_up.weight" => "mlp.up_proj.weight",
        "ffn_down.weight" => "mlp.down_proj.weight",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}"))
}

/// Every weight of a Llama GGUF file, dequantised to f32, under transformers' names (query
/// and key rows back in transformers' order). An unknown tensor name is an error.
pub fn llama_tensors(
    f: &GgufFile,
    c: &LlamaConfig,
) -> Result<HashMap<String, Tensor>, FormatError> {
    let mut out = HashMap::new();
    for info in f.tensor_infos() {
        let name = llama_name(f, &info.name)?;
        let mut t = f.tensor(&info.name)?;
        let tensor_err = |source| FormatError::Tensor {
            path: f.path().to_path_buf(),
            source,
        };
        if t.rank() == 2 && name.ends_with("q_proj.weight") {
            t = unpermute(t, c.num_attention_heads).map_err(tensor_err)?;
        } else if t.rank() == 2 && name.ends_with("k_proj.weight") {
            t = unpermute(t, c.num_key_value_heads).map_err(tensor_err)?;
        }
        out.insert(name, t);
    }
    Ok(out)
}

/// transformers' name of the GGUF tensor `name`, or an error naming the file and the tensor.
fn llama_name(f: &GgufFile, name: &str) -> Result<String, FormatError> {
    hf_name(name).ok_or_else(|| {
        FormatError::invalid(
            f.path(),
            format!("tensor {name} is not part of the Llama architecture"),
        )
    })
}

/// The weights of a Llama GGUF file for a [`QuantLlama`], under transformers' names: every
/// 2-D tensor as blocks (query and key rows back in transformers' order), the 1-D ones (the
/// norms) as f32. `Q4_0`, `Q4_1` and `Q8_0` tensors keep their blocks as stored; a 2-D tensor
/// of another type (F16, the K-quants, …) is dequantised and requantised to `Q8_0`, which
/// loses little. An unknown tensor name is an error.
#[allow(clippy::type_complexity)]
pub fn llama_quant_weights(
    f: &GgufFile,
    c: &LlamaConfig,
) -> Result<(HashMap<String, QuantMatrix>, HashMap<String, Vec<f32>>), FormatError> {
    let (mut blocks, mut dense) = (HashMap::new(), HashMap::new());
    for info in f.tensor_infos() {
        let name = llama_name(f, &info.name)?;
        let tensor_err = |source| FormatError::Tensor {
            path: f.path().to_path_buf(),
            source,
        };
        if info.shape.len() != 2 {
            let t = f.tensor(&info.name)?;
            dense.insert(name, t.to_vec::<f32>().map_err(tensor_err)?);
            continue;
        }
        let (rows, cols) = (info.shape[0], info.shape[1]);
        let mut w = match quant_format(info.ggml_type) {
            Some(format) => {
                let bytes = f.tensor_bytes(&info.name)?.to_vec();
                QuantMatrix::from_blocks(format, rows, cols, bytes)
            }
            None => {
                let values: Vec<f32> = f.tensor(&info.name)?.to_vec().map_err(tensor_err)?;
                QuantMatrix::quantize(QuantFormat::Q8_0, rows, cols, &values)
            }
        }
        .map_err(|e| FormatError::invalid(f.path(), format!("tensor {}: {e}", info.name)))?;
        if name.ends_with("q_proj.weight") {
            w = unpermute_rows(&w, c.num_attention_heads).map_err(tensor_err)?;
        } else if name.ends_with("k_proj.weight") {
            w = unpermute_rows(&w, c.num_key_value_heads).map_err(tensor_err)?;
        }
        blocks.insert(name, w);
    }
    Ok((blocks, dense))
}

/// The byte-level BPE vocabulary of a GGUF file (`tokenizer.ggml.*`, model `gpt2`).
pub fn bpe_vocab(f: &GgufFile) -> Result<BpeVocab, FormatError> {
    let model = f.get_str("tokenizer.ggml.model")?;
    if model != "gpt2" {
        return Err(FormatError::invalid(
            f.path(),
            format!("tokenizer model {model:?} is not supported (only byte-level BPE, \"gpt2\")"),
        ));
    }
    let id = |k: &str| -> Result<Option<u32>, FormatError> {
        f.get(k).map(|_| f.get_u32(k)).transpose()
    };
    Ok(BpeVocab {
        tokens: f.get_str_array("tokenizer.ggml.tokens")?.to_vec(),
        token_types: match f.get("tokenizer.ggml.token_type") {
            Some(_) => f.get_i32_array("tokenizer.ggml.token_type")?.to_vec(),
            None => Vec::new(),
        },
        merges: f.get_str_array("tokenizer.ggml.merges")?.to_vec(),
        pre: match f.get("tokenizer.ggml.pre") {
            Some(_) => f.get_str("tokenizer.ggml.pre")?.to_string(),
            None => "default".into(),
        },
        bos: id("tokenizer.ggml.bos_token_id")?,
        eos: id("tokenizer.ggml.eos_token_id")?,
        add_bos: match f.get("tokenizer.ggml.add_bos_token") {
            Some(_) => f.get_bool("tokenizer.ggml.add_bos_token")?,
            None => false,
        },
        chat_template: match f.get("tokenizer.chat_template") {
            Some(_) => Some(f.get_str("tokenizer.chat_template")?.to_string()),
            None => None,
        },
    })
}

/// The tokenizer a GGUF file carries.
pub fn tokenizer(f: &GgufFile) -> Result<Tokenizer, FormatError> {
    Tokenizer::from_bpe_vocab(&bpe_vocab(f)?, f.path())
        .map_err(|e| FormatError::invalid(f.path(), e.to_string()))
}

/// A Llama model and its tokenizer from a GGUF file, weights dequantised to f32.
pub fn load_llama(path: impl AsRef<Path>) -> Result<(Llama, Tokenizer), FormatError> {
    let path = path.as_ref();
    let f = GgufFile::open(path)?;
    let c = llama_config(&f)?;
    let tok = tokenizer(&f)?;
    let tensors = llama_tensors(&f, &c)?;
    drop(f);
    let model =
        Llama::from_tensors(c, tensors).map_err(|e| FormatError::invalid(path, e.to_string()))?;
    Ok((model, tok))
}

/// A Llama model with its weights left in their quantised blocks (see
/// [`llama_quant_weights`]), and its tokenizer, from a GGUF file: for fast decoding.
pub fn load_llama_quantized(
    path: impl AsRef<Path>,
) -> Result<(QuantLlama, Tokenizer), FormatError> {
    let path = path.as_ref();
    let f = GgufFile::open(path)?;
    let c = llama_config(&f)?;
    let tok = tokenizer(&f)?;
    let (blocks, norms) = llama_quant_weights(&f, &c)?;
    drop(f);
    let model = QuantLlama::from_weights(c, blocks, norms)
        .map_err(|e| FormatError::invalid(path, e.to_string()))?;
    Ok((model, tok))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_transformers() {
        assert_eq!(
            hf_name("blk.12.attn_q.weight").as_deref(),
            Some("model.layers.12.self_attn.q_proj.weight")
        );
        assert_eq!(
            hf_name("token_embd.weight").as_deref(),
            Some("model.embed_tokens.weight")
        );
        assert_eq!(hf_name("blk.x.attn_q.weight"), None);
        assert_eq!(hf_name("blk.0.attn_q.bias"), None);
    }

    #[test]
    fn quantised_rows_dequantise_and_unpermute_like_f32() {
        // Random blocks of every format the quantised product reads: QuantMatrix decodes them
        // bit for bit as nerve-io does, and unpermuting the rows of blocks equals unpermuting
        // the f32 matrix.
        let mut g = nerve_core::random::Generator::new(7);
        let (heads, hd, cols) = (3usize, 8usize, 64usize);
        let rows = heads * hd;
        for ty in [GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q8_0] {
            let format = quant_format(ty).unwrap();
            let bb = format.block_bytes();
            let mut bytes: Vec<u8> = (0..rows * cols / 32 * bb)
                .map(|_| g.below(256) as u8)
                .collect();
            for b in bytes.chunks_exact_mut(bb) {
                let d = half::f16::from_f32(g.next_f32() * 0.1)
                    .to_bits()
                    .to_le_bytes();
                let m = half::f16::from_f32(-g.next_f32()).to_bits().to_le_bytes();
                b[..2].copy_from_slice(&d);
                if ty == GgmlType::Q4_1 {
                    b[2..4].copy_from_slice(&m);
                }
            }
            let mut want = vec![0f32; rows * cols];
            nerve_io::gguf::dequantize(ty, &bytes, &mut want).unwrap();
            let w = QuantMatrix::from_blocks(format, rows, cols, bytes).unwrap();
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&w.dequantize()), bits(&want), "{ty}");
            let t = Tensor::from_vec(want, [rows, cols]).unwrap();
            let u: Vec<f32> = unpermute(t, heads).unwrap().to_vec().unwrap();
            assert_eq!(
                bits(&unpermute_rows(&w, heads).unwrap().dequantize()),
                bits(&u),
                "{ty}"
            );
        }
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        // llama.cpp: w.reshape(h, 2, hd/2, in).swapaxes(1, 2).reshape(w.shape).
        let (h, hd, cols) = (3usize, 4usize, 2usize);
        let hf: Vec<f32> = (0..h * hd * cols).map(|v| v as f32).collect();
        let hf = Tensor::from_vec(hf, [h * hd, cols]).unwrap();
        let gguf = hf
            .reshape(&[h as isize, 2, (hd / 2) as isize, cols as isize])
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape(&[(h * hd) as isize, cols as isize])
            .unwrap();
        assert_ne!(gguf.to_f64_vec(), hf.to_f64_vec());
        assert_eq!(unpermute(gguf, h).unwrap().to_f64_vec(), hf.to_f64_vec());
    }
}
