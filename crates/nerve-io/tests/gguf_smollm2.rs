//! The GGUF reader on a real model: SmolLM2-135M-Instruct quantised to Q4_1 (98 MB, not in
//! the repository). Runs only when `NERVE_SMOLLM2_GGUF` names the file:
//!
//! ```text
//! NERVE_SMOLLM2_GGUF=/path/SmolLM2-135M-Instruct.Q4_1.gguf \
//!     cargo test --release -p nerve-io --test gguf_smollm2 -- --nocapture
//! ```
//!
//! With `NERVE_SMOLLM2_REF` naming a safetensors file written by
//! `python3 tools/gguf_fixtures.py --real MODEL OUT` (gguf-py's dequantisation of a few of the
//! model's tensors), it also compares those tensors with nerve's and prints the largest
//! difference (tolerance 0: the kernels match gguf-py bit for bit).

use nerve_io::gguf::{GgmlType, GgufFile};

fn model() -> Option<GgufFile> {
    let Some(path) = std::env::var_os("NERVE_SMOLLM2_GGUF") else {
        eprintln!("NERVE_SMOLLM2_GGUF is not set: skipping the SmolLM2 GGUF test");
        return None;
    };
    let start = std::time::Instant::now();
    let file = GgufFile::open(path).expect("open the SmolLM2 GGUF");
    eprintln!(
        "opened (read + parsed) in {:.3} s",
        start.elapsed().as_secs_f64()
    );
    Some(file)
}

#[test]
fn smollm2_metadata_and_tensor_directory() {
    let Some(f) = model() else { return };
    assert_eq!(f.version(), 3);
    assert_eq!(f.get_str("general.architecture").unwrap(), "llama");
    assert_eq!(f.get_u32("llama.block_count").unwrap(), 30);
    assert_eq!(f.get_u32("llama.embedding_length").unwrap(), 576);
    assert_eq!(f.get_u32("llama.attention.head_count").unwrap(), 9);
    assert_eq!(f.get_u32("llama.attention.head_count_kv").unwrap(), 3);
    assert_eq!(f.get_u32("llama.feed_forward_length").unwrap(), 1536);
    assert_eq!(f.get_str("tokenizer.ggml.model").unwrap(), "gpt2");
    let tokens = f.get_str_array("tokenizer.ggml.tokens").unwrap();
    assert_eq!(tokens.len(), 49152);
    assert_eq!(tokens[0], "<|endoftext|>");
    assert_eq!(
        f.get_str_array("tokenizer.ggml.merges").unwrap().len(),
        48900
    );
    assert_eq!(
        f.get_i32_array("tokenizer.ggml.token_type").unwrap().len(),
        49152
    );

    // 30 blocks of 9 tensors, the token embedding and the final norm (the output projection
    // is tied to the embedding).
    assert_eq!(f.tensor_infos().len(), 272);
    let embd = f.tensor_info("token_embd.weight").unwrap();
    assert_eq!(embd.ggml_type, GgmlType::Q8_0);
    assert_eq!(embd.shape, [49152, 576]);
    assert_eq!(embd.n_bytes, 49152 * 576 / 32 * 34);
    let q = f.tensor_info("blk.0.attn_q.weight").unwrap();
    assert_eq!(
        (q.ggml_type, &q.shape[..]),
        (GgmlType::Q4_1, &[576, 576][..])
    );
    let k = f.tensor_info("blk.0.attn_k.weight").unwrap();
    assert_eq!(k.shape, [192, 576]);
    let norm = f.tensor_info("output_norm.weight").unwrap();
    assert_eq!(
        (norm.ggml_type, &norm.shape[..]),
        (GgmlType::F32, &[576][..])
    );
}

#[test]
fn smollm2_every_tensor_dequantises_to_finite_values() {
    let Some(f) = model() else { return };
    let mut n = 0usize;
    let mut seconds = 0f64;
    for info in f.tensor_infos() {
        let start = std::time::Instant::now();
        let t = f.tensor(&info.name).unwrap();
        seconds += start.elapsed().as_secs_f64();
        assert_eq!(t.dims(), &info.shape[..]);
        n += t.numel();
        let bad = t
            .with_data(|v: &[f32]| v.iter().position(|v| !v.is_finite()).map(|i| (i, v[i])))
            .unwrap();
        if let Some((i, v)) = bad {
            panic!("{}[{i}] is {v}", info.name);
        }
    }
    // Reported, not asserted: timings are not tests.
    eprintln!(
        "dequantised {} tensors, {n} values, in {seconds:.3} s (load to f32 tensors: allocation \
         and decoding, with {} threads)",
        f.tensor_infos().len(),
        nerve_core::num_threads()
    );
}

#[test]
fn smollm2_matches_gguf_py() {
    let Some(f) = model() else { return };
    let Some(ref_path) = std::env::var_os("NERVE_SMOLLM2_REF") else {
        eprintln!("NERVE_SMOLLM2_REF is not set: skipping the comparison with gguf-py");
        return;
    };
    let bytes = std::fs::read(ref_path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    assert!(!st.is_empty());
    for (name, view) in st.tensors() {
        let ours = f.tensor(&name).unwrap();
        assert_eq!(ours.dims(), view.shape(), "{name}");
        let ours = ours.to_vec::<f32>().unwrap();
        let mut max_diff = 0f32;
        for (a, b) in ours.iter().zip(view.data().chunks_exact(4)) {
            let b = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            max_diff = max_diff.max((a - b).abs());
        }
        eprintln!(
            "{name} ({}): max |nerve - gguf-py| = {max_diff:e} over {} values",
            f.tensor_info(&name).unwrap().ggml_type,
            ours.len()
        );
        assert_eq!(max_diff, 0.0, "{name}");
    }
}
