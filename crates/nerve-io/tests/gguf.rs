//! The GGUF reader against gguf-py (llama.cpp's Python package): the fixtures under
//! `tests/fixtures/gguf_*` come from `tools/gguf_fixtures.py`, which also wrote gguf-py's
//! dequantisation of every tensor. Plus hand-checked blocks, and damaged and hostile files
//! that must be refused with a message, never a panic.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use nerve_io::gguf::{
    dequantize, DequantizeError, GgmlType, GgufArray, GgufFile, GgufValue, GgufValueType,
};
use nerve_io::FormatError;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("fixtures")
        .join(name)
}

/// gguf-py's dequantised tensors: name -> (row-major shape, values).
fn references() -> HashMap<String, (Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(fixture("gguf_types_reference.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            assert_eq!(view.dtype(), safetensors::Dtype::F32);
            let values = view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            (name, (view.shape().to_vec(), values))
        })
        .collect()
}

/// Bit-identical, or both NaN (NaN payloads are not compared).
fn same(a: f32, b: f32) -> bool {
    a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan())
}

fn assert_matches_reference(file: &GgufFile, name: &str, want: &(Vec<usize>, Vec<f32>)) {
    let info = file.tensor_info(name).unwrap();
    assert_eq!(info.shape, want.0, "{name}: shape");
    let t = file.tensor(name).unwrap();
    assert_eq!(t.dims(), &want.0[..], "{name}: tensor dims");
    let got = t.to_vec::<f32>().unwrap();
    assert_eq!(got.len(), want.1.len(), "{name}: length");
    for (i, (&g, &w)) in got.iter().zip(&want.1).enumerate() {
        assert!(
            same(g, w),
            "{name}[{i}] ({}): {g} != gguf-py's {w}",
            info.ggml_type
        );
    }
}

fn open_types() -> GgufFile {
    GgufFile::open(fixture("gguf_types.gguf")).unwrap()
}

// ------------------------------------------------------------------ against gguf-py

/// Tolerance 0: every value of every tensor, of every supported type, is bit-identical to
/// gguf-py's dequantisation (the kernels round in the same order as its numpy code).
#[test]
fn every_type_dequantises_exactly_like_gguf_py() {
    let file = open_types();
    let refs = references();
    let mut types = HashSet::new();
    for info in file.tensor_infos() {
        let want = refs
            .get(&info.name)
            .unwrap_or_else(|| panic!("no reference for {}", info.name));
        assert_matches_reference(&file, &info.name, want);
        types.insert(info.ggml_type);
    }
    assert_eq!(
        file.tensor_infos().len(),
        refs.keys().filter(|k| !k.starts_with("align64/")).count()
    );
    use GgmlType::*;
    for ty in [
        F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K,
    ] {
        assert!(types.contains(&ty), "the fixture has no {ty} tensor");
        assert!(ty.can_dequantize());
    }
}

#[test]
fn custom_alignment_is_honoured() {
    let file = GgufFile::open(fixture("gguf_align64.gguf")).unwrap();
    assert_eq!(file.alignment(), 64);
    assert_eq!(file.get_u32("general.alignment").unwrap(), 64);
    assert_eq!(file.data_offset() % 64, 0);
    let refs = references();
    for info in file.tensor_infos() {
        assert_eq!(info.offset % 64, 0, "{}", info.name);
        assert_matches_reference(&file, &info.name, &refs[&format!("align64/{}", info.name)]);
    }
    // The first tensor is 36 bytes, so the second starts one alignment later.
    let infos = file.tensor_infos();
    assert_eq!(infos[1].offset - infos[0].offset, 64);
}

#[test]
fn version_2_files_read_like_version_3() {
    let mut bytes = std::fs::read(fixture("gguf_types.gguf")).unwrap();
    bytes[4..8].copy_from_slice(&2u32.to_le_bytes());
    let v2 = GgufFile::from_bytes(bytes, "v2.gguf").unwrap();
    let v3 = open_types();
    assert_eq!((v2.version(), v3.version()), (2, 3));
    assert_eq!(v2.metadata(), v3.metadata());
    assert_eq!(v2.tensor_infos(), v3.tensor_infos());
}

// ------------------------------------------------------------------ metadata

#[test]
fn metadata_values_and_types_read_back() {
    let f = open_types();
    let keys: Vec<&str> = f.metadata().iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        keys[..4],
        ["general.architecture", "test.u8", "test.i8", "test.u16"]
    );
    assert_eq!(keys.len(), 32);
    let v = |k: &str| f.get(k).unwrap_or_else(|| panic!("{k} missing")).clone();

    assert_eq!(
        v("general.architecture"),
        GgufValue::String("nerve-test".into())
    );
    assert_eq!(v("test.u8"), GgufValue::U8(200));
    assert_eq!(v("test.i8"), GgufValue::I8(-100));
    assert_eq!(v("test.u16"), GgufValue::U16(60000));
    assert_eq!(v("test.i16"), GgufValue::I16(-30000));
    assert_eq!(v("test.u32"), GgufValue::U32(4_000_000_000));
    assert_eq!(v("test.i32"), GgufValue::I32(-2_000_000_000));
    assert_eq!(v("test.f32"), GgufValue::F32(0.15625));
    assert_eq!(v("test.bool_true"), GgufValue::Bool(true));
    assert_eq!(v("test.bool_false"), GgufValue::Bool(false));
    assert_eq!(v("test.string"), GgufValue::String("héllo, ✓ wörld".into()));
    assert_eq!(v("test.u64"), GgufValue::U64((1 << 63) + 5));
    assert_eq!(v("test.i64"), GgufValue::I64(-(1 << 62) - 7));
    assert_eq!(v("test.f64"), GgufValue::F64(1.0 / 3.0));
    let arr = |k: &str| match v(k) {
        GgufValue::Array(a) => a,
        other => panic!("{k} is {other:?}"),
    };
    assert_eq!(arr("test.arr.u8"), GgufArray::U8(vec![0, 1, 255]));
    assert_eq!(arr("test.arr.i8"), GgufArray::I8(vec![-128, 0, 127]));
    assert_eq!(arr("test.arr.u16"), GgufArray::U16(vec![0, 65535]));
    assert_eq!(arr("test.arr.i16"), GgufArray::I16(vec![-32768, 32767]));
    assert_eq!(arr("test.arr.u32"), GgufArray::U32(vec![1, 2, u32::MAX]));
    assert_eq!(arr("test.arr.i32"), GgufArray::I32(vec![-1, 0, i32::MAX]));
    assert_eq!(arr("test.arr.f32"), GgufArray::F32(vec![0.5, -2.25, 1e-3]));
    assert_eq!(
        arr("test.arr.bool"),
        GgufArray::Bool(vec![true, false, true])
    );
    assert_eq!(
        arr("test.arr.string"),
        GgufArray::String(vec!["a".into(), "".into(), "üß".into()])
    );
    assert_eq!(arr("test.arr.u64"), GgufArray::U64(vec![u64::MAX, 0]));
    assert_eq!(
        arr("test.arr.i64"),
        GgufArray::I64(vec![i64::MIN, i64::MAX])
    );
    assert_eq!(arr("test.arr.f64"), GgufArray::F64(vec![0.1, -1e300]));
    assert_eq!(
        arr("test.arr.nested_i32"),
        GgufArray::Array(vec![GgufArray::I32(vec![1, 2]), GgufArray::I32(vec![3])])
    );
    assert_eq!(
        arr("test.arr.nested_str"),
        GgufArray::Array(vec![
            GgufArray::String(vec!["x".into()]),
            GgufArray::String(vec!["y".into(), "z".into()]),
        ])
    );
    let nested3 = arr("test.arr.nested3");
    assert_eq!(
        nested3,
        GgufArray::Array(vec![GgufArray::Array(vec![GgufArray::I32(vec![7])])])
    );
    assert_eq!(nested3.type_name(), "array of array of array of i32");
    assert_eq!(v("test.u16").value_type(), GgufValueType::U16);
    assert_eq!(arr("test.arr.string").element_type(), GgufValueType::String);

    // The tokenizer keys through the typed getters.
    assert_eq!(
        f.get_str_array("tokenizer.ggml.tokens").unwrap(),
        ["<unk>", "hé", "\u{120}the"]
    );
    assert_eq!(
        f.get_f32_array("tokenizer.ggml.scores").unwrap(),
        [0.0, -1.5, -2.0]
    );
    assert_eq!(
        f.get_i32_array("tokenizer.ggml.token_type").unwrap(),
        [2, 1, 1]
    );
    assert_eq!(f.get_u32_array("test.arr.u32").unwrap(), [1, 2, u32::MAX]);
    assert_eq!(f.get_array("test.arr.u8").unwrap().len(), 3);
}

fn invalid_msg(err: FormatError) -> String {
    match err {
        FormatError::Invalid { msg, .. } => msg,
        other => panic!("expected FormatError::Invalid, got {other:?}"),
    }
}

#[test]
fn typed_getters_convert_integers_that_fit_and_name_the_key_otherwise() {
    let f = open_types();
    assert_eq!(f.get_u32("test.u8").unwrap(), 200);
    assert_eq!(f.get_u32("test.u16").unwrap(), 60000);
    assert_eq!(f.get_u32("test.u32").unwrap(), 4_000_000_000);
    assert_eq!(f.get_u64("test.u64").unwrap(), (1 << 63) + 5);
    assert_eq!(f.get_i64("test.i8").unwrap(), -100);
    assert_eq!(f.get_usize("test.u16").unwrap(), 60000);
    assert_eq!(f.get_f32("test.f32").unwrap(), 0.15625);
    assert_eq!(f.get_f32("test.f64").unwrap(), (1.0f64 / 3.0) as f32);
    assert_eq!(f.get_f64("test.f32").unwrap(), 0.15625);
    assert!(f.get_bool("test.bool_true").unwrap());
    assert_eq!(f.get_str("test.string").unwrap(), "héllo, ✓ wörld");

    let msg = invalid_msg(f.get_u32("test.u64").unwrap_err());
    assert!(
        msg.contains("'test.u64'") && msg.contains("does not fit a u32"),
        "{msg}"
    );
    let msg = invalid_msg(f.get_u64("test.i8").unwrap_err());
    assert!(
        msg.contains("'test.i8' is -100, which does not fit a u64"),
        "{msg}"
    );
    let msg = invalid_msg(f.get_str("test.u8").unwrap_err());
    assert_eq!(msg, "metadata key 'test.u8' is a u8, not a string");
    let msg = invalid_msg(f.get_u32("test.string").unwrap_err());
    assert_eq!(msg, "metadata key 'test.string' is a string, not a u32");
    let msg = invalid_msg(f.get_str_array("tokenizer.ggml.scores").unwrap_err());
    assert_eq!(
        msg,
        "metadata key 'tokenizer.ggml.scores' is an array of f32, not an array of string"
    );
    let msg = invalid_msg(f.get_f32("test.bool_true").unwrap_err());
    assert!(msg.contains("is a bool, not a float"), "{msg}");
    let msg = invalid_msg(f.get_str("llama.block_count").unwrap_err());
    assert_eq!(msg, "metadata key 'llama.block_count' is missing");
    assert!(f.get("llama.block_count").is_none());
}

// ------------------------------------------------------------------ shapes and bytes

#[test]
fn shapes_are_ggml_dims_reversed() {
    let f = open_types();
    let shape = |n: &str| f.tensor_info(n).unwrap().shape.clone();
    // gguf-py wrote these from numpy shapes; the file holds them reversed (ne[0] innermost).
    assert_eq!(shape("f32.scalar"), Vec::<usize>::new());
    assert_eq!(shape("f32.vec"), [7]);
    assert_eq!(shape("f32.mat"), [3, 5]);
    assert_eq!(shape("f32.3d"), [2, 3, 4]);
    assert_eq!(shape("f32.4d"), [2, 1, 3, 2]);
    assert_eq!(shape("q4_0.3d"), [2, 3, 32]);
    assert_eq!(shape("q8_k.3d"), [3, 1, 512]);
    // The ggml dimensions as stored: f32.3d's info is name, n_dims = 3, ne = [4, 3, 2].
    let bytes = f.bytes();
    let name = b"f32.3d";
    let at = bytes.windows(name.len()).position(|w| w == name).unwrap() + name.len();
    let u64_at = |i: usize| u64::from_le_bytes(bytes[i..i + 8].try_into().unwrap());
    assert_eq!(u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap()), 3);
    assert_eq!(
        [u64_at(at + 4), u64_at(at + 12), u64_at(at + 20)],
        [4, 3, 2]
    );

    let t = f.tensor("f32.scalar").unwrap();
    assert_eq!(t.rank(), 0);
    assert_eq!(t.item::<f32>().unwrap(), 3.5);
}

#[test]
fn tensor_bytes_are_the_raw_blocks() {
    let f = open_types();
    let names: Vec<&str> = f.tensor_names().collect();
    assert_eq!(names.len(), 30);
    assert_eq!(names[0], "f32.scalar");
    let info = f.tensor_info("q4_0.mat").unwrap().clone();
    assert_eq!(info.ggml_type, GgmlType::Q4_0);
    assert_eq!(info.n_bytes, 4 * 2 * 18);
    assert_eq!(info.numel(), 256);
    let raw = f.tensor_bytes("q4_0.mat").unwrap();
    assert_eq!(raw.len(), 144);
    assert_eq!(raw, &f.bytes()[info.offset..info.offset + 144]);
    // The first block of q4_0.mat is all zeros: its f16 scale is -0.0 (gguf-py: 0 / -8).
    assert_eq!(&raw[..2], &[0x00, 0x80]);
    let mut out = vec![0f32; 256];
    dequantize(GgmlType::Q4_0, raw, &mut out).unwrap();
    assert_eq!(out, f.tensor("q4_0.mat").unwrap().to_vec::<f32>().unwrap());
    assert!(out[..32].iter().all(|&x| x == 0.0));

    let debug = format!("{f:?}");
    assert!(
        debug.len() < 200 && debug.contains("tensors: 30"),
        "{debug}"
    );

    let msg = invalid_msg(f.tensor("nope").unwrap_err());
    assert_eq!(msg, "no tensor named 'nope'");
    assert!(f.tensor_bytes("nope").is_err());
}

// ------------------------------------------------------------------ hand-checked blocks

fn f16_bits(x: f32) -> [u8; 2] {
    half::f16::from_f32(x).to_bits().to_le_bytes()
}

#[test]
fn q4_0_block_by_hand() {
    // d = 0.5; byte j holds element j in its low nibble and element j + 16 in its high one.
    let mut block = f16_bits(0.5).to_vec();
    block.extend((0u8..16).map(|j| (15 - j) << 4 | j));
    let mut out = [0f32; 32];
    dequantize(GgmlType::Q4_0, &block, &mut out).unwrap();
    // x = d * (q - 8): low nibbles 0..16 give -4.0 ..= 3.5, high nibbles 15..=0 give 3.5 ..= -4.0.
    #[rustfmt::skip]
    let want = [
        -4.0, -3.5, -3.0, -2.5, -2.0, -1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5,
        3.5, 3.0, 2.5, 2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -1.5, -2.0, -2.5, -3.0, -3.5, -4.0,
    ];
    assert_eq!(out, want);
}

#[test]
fn q8_0_blocks_by_hand() {
    // Two blocks: d = 0.25 with q = -128, -1, 0, 1, 127, then 2 * i; d = -2 with q = i - 16.
    let mut bytes = f16_bits(0.25).to_vec();
    let mut q: Vec<i8> = vec![-128, -1, 0, 1, 127];
    q.extend((5..32).map(|i| 2 * i as i8));
    bytes.extend(q.iter().map(|&q| q as u8));
    bytes.extend(f16_bits(-2.0));
    bytes.extend((0..32).map(|i| (i as i8 - 16) as u8));
    let mut out = [0f32; 64];
    dequantize(GgmlType::Q8_0, &bytes, &mut out).unwrap();
    assert_eq!(out[..5], [-32.0, -0.25, 0.0, 0.25, 31.75]);
    assert_eq!(out[5], 2.5); // 10 * 0.25
    assert_eq!(out[31], 15.5); // 62 * 0.25
    assert_eq!(out[32], 32.0); // -16 * -2
    assert_eq!(out[48], -0.0); // 0 * -2
    assert!(out[48].is_sign_negative());
    assert_eq!(out[63], -30.0); // 15 * -2
}

#[test]
fn q4_1_and_q5_0_blocks_by_hand() {
    // Q4_1: d = 2, m = -1, every byte 0x21: low nibble 1 -> 1.0, high nibble 2 -> 3.0.
    let mut block = f16_bits(2.0).to_vec();
    block.extend(f16_bits(-1.0));
    block.extend([0x21; 16]);
    let mut out = [0f32; 32];
    dequantize(GgmlType::Q4_1, &block, &mut out).unwrap();
    assert!(out[..16].iter().all(|&x| x == 1.0) && out[16..].iter().all(|&x| x == 3.0));

    // Q5_0: d = 1; fifth bits set for elements 0 and 17 only (bits 0 and 17 of the u32);
    // every nibble 0. x = q - 16, so -16 everywhere except 0.0 at elements 0 and 17.
    let mut block = f16_bits(1.0).to_vec();
    block.extend((1u32 | 1 << 17).to_le_bytes());
    block.extend([0u8; 16]);
    dequantize(GgmlType::Q5_0, &block, &mut out).unwrap();
    for (i, &x) in out.iter().enumerate() {
        let want = if i == 0 || i == 17 { 0.0 } else { -16.0 };
        assert_eq!(x, want, "element {i}");
    }
}

#[test]
fn dequantize_refuses_bad_lengths_and_unsupported_types() {
    let mut out = [0f32; 32];
    assert_eq!(
        dequantize(GgmlType::IQ2_XXS, &[0u8; 66], &mut [0f32; 256]),
        Err(DequantizeError::Unsupported(GgmlType::IQ2_XXS))
    );
    assert_eq!(
        dequantize(GgmlType::Q8_0, &[0u8; 33], &mut out),
        Err(DequantizeError::PartialBlock {
            ty: GgmlType::Q8_0,
            len: 33,
            type_size: 34
        })
    );
    assert_eq!(
        dequantize(GgmlType::Q8_0, &[0u8; 68], &mut out),
        Err(DequantizeError::OutputLength {
            ty: GgmlType::Q8_0,
            expected: 64,
            got: 32
        })
    );
}

#[test]
fn ggml_type_table_matches_ggml() {
    use GgmlType::*;
    let table = [
        (F32, 0, 1, 4),
        (F16, 1, 1, 2),
        (Q4_0, 2, 32, 18),
        (Q4_1, 3, 32, 20),
        (Q5_0, 6, 32, 22),
        (Q5_1, 7, 32, 24),
        (Q8_0, 8, 32, 34),
        (Q2_K, 10, 256, 84),
        (Q3_K, 11, 256, 110),
        (Q4_K, 12, 256, 144),
        (Q5_K, 13, 256, 176),
        (Q6_K, 14, 256, 210),
        (Q8_K, 15, 256, 292),
        (BF16, 30, 1, 2),
    ];
    for (ty, id, block, size) in table {
        assert_eq!(
            (ty.id(), ty.block_size(), ty.type_size()),
            (id, block, size),
            "{ty}"
        );
        assert_eq!(GgmlType::from_id(id), Some(ty));
    }
    assert_eq!(GgmlType::from_id(4), None); // Q4_2, removed from ggml
    assert_eq!(Q4_K.to_string(), "Q4_K");
}

/// A large tensor goes through the parallel path; it must give what the serial one gives.
#[test]
fn parallel_dequantisation_matches_block_by_block() {
    let n_blocks = 40_000; // 1.28 M elements, above the parallel threshold
    let mut bytes = Vec::with_capacity(n_blocks * 20);
    let mut seed = 0x1234_5678_u32;
    for _ in 0..n_blocks * 20 {
        seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
        bytes.push((seed >> 24) as u8);
    }
    // Keep the scales finite and modest: f16 exponent bits from a small range.
    for b in bytes.chunks_exact_mut(20) {
        b[1] = 0x20 | (b[1] & 0x8F);
        b[3] = 0x20 | (b[3] & 0x8F);
    }
    let mut all = vec![0f32; n_blocks * 32];
    dequantize(GgmlType::Q4_1, &bytes, &mut all).unwrap();
    for (i, (b, want)) in bytes
        .chunks_exact(20)
        .zip(all.chunks_exact(32))
        .enumerate()
        .step_by(97)
    {
        let mut one = [0f32; 32];
        dequantize(GgmlType::Q4_1, b, &mut one).unwrap();
        assert_eq!(&one[..], want, "block {i}");
    }
}

// ------------------------------------------------------------------ damaged files

/// Every prefix that cuts into the header, the metadata, the tensor infos or a tensor's data
/// is refused with a message; only the trailing padding after the last tensor may go.
#[test]
fn every_truncation_is_refused() {
    let bytes = std::fs::read(fixture("gguf_types.gguf")).unwrap();
    let full = GgufFile::from_bytes(bytes.clone(), "full.gguf").unwrap();
    let needed = full
        .tensor_infos()
        .iter()
        .map(|t| t.offset + t.n_bytes)
        .max()
        .unwrap();
    assert!(needed <= bytes.len() && bytes.len() - needed < 32);
    for len in 0..needed {
        match GgufFile::from_bytes(bytes[..len].to_vec(), "cut.gguf") {
            Err(FormatError::Invalid { msg, path }) => {
                assert_eq!(path, Path::new("cut.gguf"));
                assert!(!msg.is_empty());
            }
            Err(other) => panic!("prefix of {len} bytes: unexpected {other:?}"),
            Ok(_) => panic!("a prefix of {len} of {} bytes was accepted", bytes.len()),
        }
    }
    for len in needed..=bytes.len() {
        assert!(GgufFile::from_bytes(bytes[..len].to_vec(), "cut.gguf").is_ok());
    }
}

/// Corrupted bytes (seeded, deterministic) anywhere in the header region: the reader may
/// accept or refuse the file but must not panic, and what it accepts must dequantise.
#[test]
fn corrupted_headers_never_panic() {
    let bytes = std::fs::read(fixture("gguf_types.gguf")).unwrap();
    let header_end = open_types().data_offset();
    let mut seed = 0x9E37_79B9_u32;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 17;
        seed ^= seed << 5;
        seed
    };
    for _ in 0..3000 {
        let mut b = bytes.clone();
        for _ in 0..1 + next() % 4 {
            let at = next() as usize % header_end;
            b[at] = match next() % 4 {
                0 => 0xFF,
                1 => 0,
                _ => next() as u8,
            };
        }
        if let Ok(f) = GgufFile::from_bytes(b, "fuzz.gguf") {
            for info in f.tensor_infos() {
                if info.ggml_type.can_dequantize() && info.numel() < 1 << 20 {
                    f.tensor(&info.name).unwrap();
                }
            }
        }
    }
}

// ------------------------------------------------------------------ crafted files

/// A GGUF writer for hand-made (and hostile) files.
struct Craft(Vec<u8>);

impl Craft {
    fn new(version: u32, n_tensors: u64, n_kv: u64) -> Craft {
        let mut c = Craft(b"GGUF".to_vec());
        c.u32(version).u64(n_tensors).u64(n_kv);
        c
    }
    fn u32(&mut self, v: u32) -> &mut Craft {
        self.0.extend(v.to_le_bytes());
        self
    }
    fn u64(&mut self, v: u64) -> &mut Craft {
        self.0.extend(v.to_le_bytes());
        self
    }
    fn raw(&mut self, b: &[u8]) -> &mut Craft {
        self.0.extend(b);
        self
    }
    fn str(&mut self, s: &str) -> &mut Craft {
        self.u64(s.len() as u64).raw(s.as_bytes())
    }
    /// A tensor info: name, ggml dims (ne[0] first), type id, offset.
    fn tensor(&mut self, name: &str, ne: &[u64], ty: u32, offset: u64) -> &mut Craft {
        self.str(name).u32(ne.len() as u32);
        for &d in ne {
            self.u64(d);
        }
        self.u32(ty).u64(offset)
    }
    /// Zero padding up to the next multiple of `align`.
    fn pad(&mut self, align: usize) -> &mut Craft {
        while !self.0.len().is_multiple_of(align) {
            self.0.push(0);
        }
        self
    }
    fn parse(&self) -> Result<GgufFile, FormatError> {
        GgufFile::from_bytes(self.0.clone(), "crafted.gguf")
    }
    #[track_caller]
    fn refused(&self, want: &str) {
        match self.parse() {
            Err(FormatError::Invalid { msg, path }) => {
                assert_eq!(path, Path::new("crafted.gguf"));
                assert!(
                    msg.contains(want),
                    "message {msg:?} does not contain {want:?}"
                );
            }
            Err(other) => panic!("expected Invalid containing {want:?}, got {other:?}"),
            Ok(_) => panic!("accepted a file that should fail with {want:?}"),
        }
    }
}

const F32: u32 = 0;
const Q4_0: u32 = 2;
const STRING: u32 = 8;
const ARRAY: u32 = 9;
const U32: u32 = 4;

#[test]
fn a_small_crafted_file_reads() {
    let mut c = Craft::new(2, 1, 2);
    c.str("general.architecture").u32(STRING).str("llama");
    c.str("empty").u32(ARRAY).u32(U32).u64(0);
    c.tensor("w", &[3, 2], F32, 0).pad(32);
    for i in 0..6 {
        c.raw(&(i as f32).to_le_bytes());
    }
    let f = c.parse().unwrap();
    assert_eq!(f.version(), 2);
    assert_eq!(f.get_u32_array("empty").unwrap(), &[] as &[u32]);
    let t = f.tensor("w").unwrap();
    assert_eq!(t.dims(), &[2, 3]);
    assert_eq!(t.to_vec::<f32>().unwrap(), [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
}

#[test]
fn bad_magic_and_versions_are_refused() {
    Craft(vec![]).refused("too short for the magic");
    Craft(b"GGU".to_vec()).refused("too short for the magic");
    let mut c = Craft::new(3, 0, 0);
    c.0[..4].copy_from_slice(b"GGML");
    c.refused("not a GGUF file: starts with \"GGML\"");
    Craft::new(1, 0, 0).refused("unsupported GGUF version 1");
    Craft::new(4, 0, 0).refused("unsupported GGUF version 4");
    Craft::new(0, 0, 0).refused("unsupported GGUF version 0");
    Craft::new(3u32.swap_bytes(), 0, 0).refused("byte-swapped");
    Craft(b"GGUF\x03\0\0".to_vec()).refused("version");
    assert_eq!(Craft::new(3, 0, 0).parse().unwrap().tensor_infos().len(), 0);
}

#[test]
fn impossible_counts_are_refused_before_allocating() {
    Craft::new(3, u64::MAX, 0).refused("declares 18446744073709551615 tensors");
    Craft::new(3, 0, u64::MAX).refused("18446744073709551615 metadata entries");
    Craft::new(3, 1 << 40, 1 << 40).refused("only 0 bytes follow the header");
    // One entry: its string array claims 2^62 strings.
    let mut c = Craft::new(3, 0, 1);
    c.str("tokens").u32(ARRAY).u32(STRING).u64(1 << 62);
    c.refused("metadata key 'tokens': array of string: declares 4611686018427387904 elements");
    let mut c = Craft::new(3, 0, 1);
    c.str("n").u32(ARRAY).u32(U32).u64(u64::MAX).raw(&[0; 64]);
    c.refused(
        "declares 18446744073709551615 elements of at least 4 bytes each but only 64 bytes follow",
    );
}

#[test]
fn string_lengths_past_the_end_are_refused() {
    let mut c = Craft::new(3, 0, 1);
    c.u64(u64::MAX).raw(b"key").raw(&[0; 16]);
    c.refused(
        "metadata entry 0: key: string length 18446744073709551615 at offset 24 runs past the end",
    );
    let mut c = Craft::new(3, 0, 1);
    c.str("k").u32(STRING).u64(1 << 40).raw(b"abc");
    c.refused("metadata key 'k': string length 1099511627776");
    let mut c = Craft::new(3, 0, 1);
    c.str("k")
        .u32(ARRAY)
        .u32(STRING)
        .u64(2)
        .str("ok")
        .u64(100)
        .raw(b"short");
    c.refused("metadata key 'k': element 1: string length 100");
    let mut c = Craft::new(3, 1, 0);
    c.u64(1 << 50).raw(&[0; 40]);
    c.refused("tensor info 0: name: string length 1125899906842624");
}

#[test]
fn malformed_metadata_is_refused() {
    let mut c = Craft::new(3, 0, 1);
    c.str("k").u32(13).raw(&[0; 16]);
    c.refused("metadata key 'k': unknown value type 13");
    let mut c = Craft::new(3, 0, 1);
    c.str("k").u32(7).raw(&[2]).raw(&[0; 16]);
    c.refused("metadata key 'k': bool byte is 2, neither 0 nor 1");
    let mut c = Craft::new(3, 0, 1);
    c.u64(2).raw(&[0xC3, 0x28]).u32(U32).u32(1);
    c.refused("is not valid UTF-8");
    let mut c = Craft::new(3, 0, 1);
    c.str("k").u32(STRING).u64(3).raw(&[b'a', 0xFF, b'b']);
    c.refused("metadata key 'k': string at offset 45 is not valid UTF-8 (bad byte at 46)");
    let mut c = Craft::new(3, 0, 2);
    c.str("k").u32(U32).u32(1).str("k").u32(U32).u32(2);
    c.refused("metadata key 'k' appears twice");
    let mut c = Craft::new(3, 0, 1);
    c.str("").u32(U32).u32(1);
    c.refused("metadata entry 0: the key is empty");
    let mut c = Craft::new(3, 0, 1);
    c.str("k").u32(ARRAY).u32(13).u64(0);
    c.refused("metadata key 'k': array: unknown value type 13");
}

#[test]
fn arrays_nested_too_deep_are_refused() {
    let nest = |depth: usize| {
        let mut c = Craft::new(3, 0, 1);
        c.str("deep").u32(ARRAY);
        for _ in 1..depth {
            c.u32(ARRAY).u64(1);
        }
        c.u32(U32).u64(1).u32(42);
        c
    };
    let ok = nest(8).parse().unwrap();
    assert_eq!(
        ok.get_array("deep").unwrap().type_name(),
        format!("{}u32", "array of ".repeat(8))
    );
    nest(9).refused("metadata key 'deep': element 0: element 0: element 0: element 0: element 0: element 0: element 0: element 0: arrays nest more than 8 deep");
    // Deep enough to overflow the stack if the depth were not limited.
    nest(100_000).refused("arrays nest more than 8 deep");
}

#[test]
fn bad_alignment_is_refused() {
    let mut c = Craft::new(3, 0, 1);
    c.str("general.alignment").u32(U32).u32(48);
    c.refused("general.alignment must be a power of two");
    let mut c = Craft::new(3, 0, 1);
    c.str("general.alignment").u32(U32).u32(0);
    c.refused("general.alignment must be a power of two");
    let mut c = Craft::new(3, 0, 1);
    c.str("general.alignment").u32(STRING).str("32");
    c.refused("general.alignment must be a power of two that fits a u32, but is String(\"32\")");
}

/// A file with one tensor info and 4096 zero bytes of data after it.
fn one_tensor(ne: &[u64], ty: u32, offset: u64) -> Craft {
    let mut c = Craft::new(3, 1, 0);
    c.tensor("t", ne, ty, offset).pad(32).raw(&[0; 4096]);
    c
}

#[test]
fn malformed_tensor_infos_are_refused() {
    assert!(one_tensor(&[64, 4], Q4_0, 0).parse().is_ok());
    one_tensor(&[1, 1, 1, 1, 1], F32, 0)
        .refused("tensor info 0: tensor 't': 5 dimensions, more than 4");
    one_tensor(&[1 << 32, 1 << 32, 1 << 32], F32, 0).refused(
        "tensor 't': dimensions [4294967296, 4294967296, 4294967296] overflow the element count",
    );
    one_tensor(&[1 << 63, 1], F32, 0)
        .refused("tensor 't': dimension 9223372036854775808 is too large");
    one_tensor(&[1 << 62, 4], Q4_0, 0).refused("overflow the element count");
    // 2^62 F64 elements fit i64 but their 2^65 bytes do not fit usize.
    one_tensor(&[1 << 61, 2], 28, 0)
        .refused("tensor 't': dimensions [2305843009213693952, 2] overflow the byte size");
    one_tensor(&[16, 2], Q4_0, 0)
        .refused("tensor 't': rows of 16 elements are not a whole number of Q4_0 blocks of 32");
    one_tensor(&[4], 99, 0).refused("tensor 't': unknown ggml type id 99");
    one_tensor(&[4], 4, 0).refused("unknown ggml type id 4");
    one_tensor(&[4, 4], F32, 4)
        .refused("tensor 't': data offset 4 is not a multiple of the alignment 32");
    one_tensor(&[4, 4], F32, 4096)
        .refused("tensor 't': its 64 bytes of data at offset 4096 in the data section");
    one_tensor(&[4, 4], F32, u64::MAX - 31).refused("run past the end of the file");
    one_tensor(&[2048, 2], F32, 0).refused("run past the end of the file (4192 bytes)");
    let mut c = Craft::new(3, 2, 0);
    c.tensor("t", &[4], F32, 0)
        .tensor("t", &[4], F32, 32)
        .pad(32)
        .raw(&[0; 64]);
    c.refused("tensor name 't' appears twice");
}

#[test]
fn types_without_a_dequantiser_open_but_do_not_dequantise() {
    // IQ4_NL (id 20): 32-element blocks of 18 bytes.
    let f = one_tensor(&[32, 2], 20, 0).parse().unwrap();
    let info = &f.tensor_infos()[0];
    assert_eq!(info.ggml_type, GgmlType::IQ4_NL);
    assert_eq!(f.tensor_bytes("t").unwrap().len(), 36);
    let msg = invalid_msg(f.tensor("t").unwrap_err());
    assert!(
        msg.starts_with("tensor 't' is IQ4_NL, which nerve cannot dequantise"),
        "{msg}"
    );
}
