//! Hostile files found by the fuzz targets (`tools/fuzz.sh`) or by the audit that came with
//! them, kept as regression tests: each must give a typed error naming the file and what is
//! wrong, never a panic. The inputs are built here byte by byte.

use std::io::Cursor;
use std::path::Path;

use nerve_io::gguf::GgufFile;
use nerve_io::pickle::Limits;
use nerve_io::FormatError;

/// The message of a [`FormatError::Invalid`], which must name `file`.
fn invalid<T>(result: Result<T, FormatError>, file: &str) -> String {
    match result {
        Ok(_) => panic!("{file}: loaded, but must be refused"),
        Err(e @ FormatError::Invalid { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains(file), "{msg}");
            msg
        }
        Err(e) => panic!("{file}: expected FormatError::Invalid, got {e:?}"),
    }
}

/// A safetensors file of one U8 tensor with no data.
fn safetensors_empty_u8(shape: &str) -> Vec<u8> {
    let header = format!(r#"{{"t":{{"dtype":"U8","shape":{shape},"data_offsets":[0,0]}}}}"#);
    let mut b = (header.len() as u64).to_le_bytes().to_vec();
    b.extend(header.as_bytes());
    b
}

/// A GGUF v3 file of one F32 tensor with ggml dimensions `ne` (innermost first) and no data.
fn gguf_one_f32(ne: &[u64]) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend(1u64.to_le_bytes()); // tensors
    b.extend(0u64.to_le_bytes()); // metadata entries
    b.extend(1u64.to_le_bytes());
    b.push(b't');
    b.extend((ne.len() as u32).to_le_bytes());
    for d in ne {
        b.extend(d.to_le_bytes());
    }
    b.extend(0u32.to_le_bytes()); // F32
    b.extend(0u64.to_le_bytes()); // offset
    b.resize(b.len().next_multiple_of(32), 0);
    b
}

// A shape with a zero dimension holds no data, so the data-length checks pass whatever the
// other dimensions are; but [0, 2^32, 2^32] overflows the strides of a row-major tensor (and
// any element count that meets the zero last), which panicked in nerve-core with overflow
// checks on. Found by the audit; crashed the safetensors, gguf and torch fuzz targets.

#[test]
fn safetensors_zero_dimension_beside_huge_ones_is_refused() {
    let path = Path::new("zero-dim.safetensors");
    let bytes = safetensors_empty_u8("[0,4294967296,4294967296]");
    let msg = invalid(nerve_io::safetensors::load_bytes(&bytes, path), "zero-dim");
    assert!(
        msg.contains("tensor t") && msg.contains("overflow"),
        "{msg}"
    );
    // Zero dimensions beside sizes that fit are fine: an empty tensor.
    let (t, _) = nerve_io::safetensors::load_bytes(&safetensors_empty_u8("[0,3,4]"), path).unwrap();
    assert_eq!(t[0].1.dims(), &[0, 3, 4]);
}

#[test]
fn gguf_zero_dimension_beside_huge_ones_is_refused() {
    // ggml order: ne[0] = 0 innermost, so the row-major shape is [2^32, 2^32, 0].
    let bytes = gguf_one_f32(&[0, 1 << 32, 1 << 32]);
    let msg = invalid(
        GgufFile::from_bytes(bytes, "zero-dim.gguf"),
        "zero-dim.gguf",
    );
    assert!(
        msg.contains("tensor 't'") && msg.contains("overflow the element count"),
        "{msg}"
    );
    let f = GgufFile::from_bytes(gguf_one_f32(&[0, 3, 4]), "empty.gguf").unwrap();
    assert_eq!(f.tensor("t").unwrap().dims(), &[4, 3, 0]);
}

/// A legacy `torch.save` file holding `{"t": tensor}` whose storage `"0"` is an empty
/// FloatStorage and whose size is `(0, 2^32, 2^32)`, stride `(1, 1, 1)`.
fn legacy_zero_dim_checkpoint() -> Vec<u8> {
    let magic = [0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];
    let mut b = b"\x80\x02\x8a\x0a".to_vec();
    b.extend(magic);
    b.push(b'.');
    b.extend(b"\x80\x02M\xe9\x03."); // protocol version 1001
    b.extend(b"\x80\x02}."); // sys_info
    b.extend(b"\x80\x02}X\x01\x00\x00\x00tctorch._utils\n_rebuild_tensor_v2\n(");
    b.extend(b"(X\x07\x00\x00\x00storagectorch\nFloatStorage\nX\x01\x00\x00\x000");
    b.extend(b"X\x03\x00\x00\x00cpuK\x00tQK\x00");
    b.extend(b"(K\x00\x8a\x05\x00\x00\x00\x00\x01\x8a\x05\x00\x00\x00\x00\x01t"); // size
    b.extend(b"(K\x01K\x01K\x01t\x89ccollections\nOrderedDict\n)RtRs."); // stride, ...
    b.extend(b"\x80\x02]X\x01\x00\x00\x000a."); // storage keys: ["0"]
    b.extend(0u64.to_le_bytes()); // storage "0": 0 elements
    b
}

#[test]
fn torch_zero_dimension_beside_huge_ones_is_refused() {
    let bytes = legacy_zero_dim_checkpoint();
    let path = Path::new("zero-dim.pt");
    let msg = invalid(
        nerve_io::torch::read_value(Cursor::new(&bytes), path, &Limits::default()),
        "zero-dim.pt",
    );
    assert!(
        msg.contains("tensor 't'") && msg.contains("overflows"),
        "{msg}"
    );
}
