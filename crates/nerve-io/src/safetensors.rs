//! safetensors files (Hugging Face's format; names as the checkpoint has them), read with the
//! `safetensors` crate, which checks the header against the file (size, offsets, overlaps)
//! before anything is used.

use std::collections::HashMap;
use std::path::Path;

use half::{bf16, f16};
use nerve_core::Tensor;
use safetensors::{Dtype, SafeTensors};

use crate::FormatError;

/// Named tensors of a file, in the order of their data in the file.
pub type Tensors = Vec<(String, Tensor)>;
/// A file's string metadata (`__metadata__`).
pub type Metadata = HashMap<String, String>;

fn chunks<const N: usize>(b: &[u8]) -> impl Iterator<Item = [u8; N]> + '_ {
    b.chunks_exact(N)
        .map(|c| c.try_into().expect("exact chunk"))
}

/// A tensor from its safetensors dtype, shape and little-endian bytes: floating dtypes keep
/// theirs (f32, f64, f16, bf16), integer ones become i64, bool stays bool. A shape whose
/// non-zero dimensions multiply past `i64::MAX`, or that disagrees with the bytes, is an
/// error.
pub fn tensor_from_bytes(dtype: Dtype, shape: &[usize], b: &[u8]) -> Result<Tensor, String> {
    // The safetensors crate checks the element count against the data, but a zero dimension
    // passes that check whatever the others are, and [0, 2^32, 2^32] overflows its strides.
    if !crate::shape::shape_fits(shape.iter().map(|&d| d as u64)) {
        return Err(format!("shape {shape:?} overflows the element count"));
    }
    let ints = |v: Vec<i64>| Tensor::from_vec(v, shape);
    let t = match dtype {
        Dtype::F32 => Tensor::from_vec(
            chunks::<4>(b).map(f32::from_le_bytes).collect::<Vec<_>>(),
            shape,
        ),
        Dtype::F64 => Tensor::from_vec(
            chunks::<8>(b).map(f64::from_le_bytes).collect::<Vec<_>>(),
            shape,
        ),
        Dtype::F16 => Tensor::from_vec(
            chunks::<2>(b).map(f16::from_le_bytes).collect::<Vec<_>>(),
            shape,
        ),
        Dtype::BF16 => Tensor::from_vec(
            chunks::<2>(b).map(bf16::from_le_bytes).collect::<Vec<_>>(),
            shape,
        ),
        Dtype::I64 => ints(chunks::<8>(b).map(i64::from_le_bytes).collect()),
        Dtype::I32 => ints(
            chunks::<4>(b)
                .map(|c| i32::from_le_bytes(c) as i64)
                .collect(),
        ),
        Dtype::I16 => ints(
            chunks::<2>(b)
                .map(|c| i16::from_le_bytes(c) as i64)
                .collect(),
        ),
        Dtype::I8 => ints(b.iter().map(|&v| v as i8 as i64).collect()),
        Dtype::U8 => ints(b.iter().map(|&v| v as i64).collect()),
        Dtype::U16 => ints(
            chunks::<2>(b)
                .map(|c| u16::from_le_bytes(c) as i64)
                .collect(),
        ),
        Dtype::U32 => ints(
            chunks::<4>(b)
                .map(|c| u32::from_le_bytes(c) as i64)
                .collect(),
        ),
        Dtype::BOOL => {
            Tensor::from_vec(b.iter().map(|&v| (v != 0) as u8).collect::<Vec<_>>(), shape)
        }
        d => return Err(format!("unsupported dtype {d:?}")),
    };
    t.map_err(|e| e.to_string())
}

/// Every tensor of a safetensors file (in data order) with the file's metadata. A truncated
/// or corrupt file, or a dtype nerve has no use for, is an error naming the file (and the
/// tensor).
pub fn load(path: impl AsRef<Path>) -> Result<(Tensors, Metadata), FormatError> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|source| FormatError::Io {
        path: path.into(),
        source,
    })?;
    load_bytes(&bytes, path)
}

/// [`load`] from bytes in memory; `path` names them in errors.
pub fn load_bytes(bytes: &[u8], path: &Path) -> Result<(Tensors, Metadata), FormatError> {
    let bad =
        |msg: String| FormatError::invalid(path, format!("not a valid safetensors file: {msg}"));
    let st = SafeTensors::deserialize(bytes).map_err(|e| bad(e.to_string()))?;
    let (_, meta) = SafeTensors::read_metadata(bytes).map_err(|e| bad(e.to_string()))?;
    let mut views = st.tensors();
    views.sort_by_key(|(_, v)| v.data().as_ptr() as usize);
    let mut out = Vec::with_capacity(views.len());
    for (name, view) in views {
        let t = tensor_from_bytes(view.dtype(), view.shape(), view.data())
            .map_err(|m| bad(format!("tensor {name}: {m}")))?;
        out.push((name, t));
    }
    Ok((out, meta.metadata().clone().unwrap_or_default()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_the_crate_writes_and_refuses_damage() {
        let data: Vec<u8> = [1.5f32, -2.0, 0.25, 8.0]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let ids: Vec<u8> = [3i32, -4].iter().flat_map(|v| v.to_le_bytes()).collect();
        let views = vec![
            (
                "w",
                safetensors::tensor::TensorView::new(Dtype::F32, vec![2, 2], &data).unwrap(),
            ),
            (
                "ids",
                safetensors::tensor::TensorView::new(Dtype::I32, vec![2], &ids).unwrap(),
            ),
        ];
        let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
        let bytes = safetensors::serialize(views, &Some(meta)).unwrap();
        let p = Path::new("mem.safetensors");
        let (t, m) = load_bytes(&bytes, p).unwrap();
        assert_eq!(m["format"], "pt");
        let w = &t.iter().find(|(n, _)| n == "w").unwrap().1;
        assert_eq!(w.dims(), &[2, 2]);
        assert_eq!(w.to_vec::<f32>().unwrap(), vec![1.5, -2.0, 0.25, 8.0]);
        let i = &t.iter().find(|(n, _)| n == "ids").unwrap().1;
        assert_eq!(i.to_vec::<i64>().unwrap(), vec![3, -4]);
        for cut in 0..bytes.len() {
            let e = load_bytes(&bytes[..cut], p).expect_err("truncated file refused");
            assert!(e.to_string().contains("mem.safetensors"), "{e}");
        }
        // A header claiming an absurd size.
        let mut huge = bytes.clone();
        huge[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(load_bytes(&huge, p).is_err());
    }
}
