//! The IDX binary format used by MNIST and Fashion-MNIST.
//!
//! Layout: two zero bytes, a type byte (only `0x08`, unsigned byte, is supported), the number of
//! dimensions, then each dimension as a big-endian `u32`, then the data in row-major order.
//! Files may be gzip-compressed; compression is detected by the magic bytes, not the name.

use std::path::Path;

use crate::error::{read_maybe_gz, DataError, Result};

/// The contents of an IDX file of unsigned bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdxArray {
    /// The dimensions from the header, e.g. `[60000, 28, 28]`.
    pub dims: Vec<usize>,
    /// The elements in row-major order; `data.len()` is the product of `dims`.
    pub data: Vec<u8>,
}

/// Read an IDX file of unsigned bytes (type `0x08`), plain or gzip-compressed.
///
/// Errors name the file: unreadable or corrupt gzip, bad magic, unsupported type, and a data
/// length that differs from the product of the dimensions (truncation or trailing bytes).
pub fn read_idx(path: impl AsRef<Path>) -> Result<IdxArray> {
    let path = path.as_ref();
    parse_idx(&read_maybe_gz(path)?, path)
}

fn parse_idx(bytes: &[u8], path: &Path) -> Result<IdxArray> {
    let err = |msg: String| DataError::format(path, msg);
    if bytes.len() < 4 {
        return Err(err(format!(
            "not an IDX file: {} bytes, shorter than the 4-byte magic",
            bytes.len()
        )));
    }
    if bytes[0] != 0 || bytes[1] != 0 {
        return Err(err(format!(
            "not an IDX file: bad magic {:02x} {:02x} {:02x} {:02x} (expected 00 00 08 ndim)",
            bytes[0], bytes[1], bytes[2], bytes[3]
        )));
    }
    if bytes[2] != 0x08 {
        return Err(err(format!(
            "unsupported IDX data type 0x{:02x} (only 0x08, unsigned byte, is supported)",
            bytes[2]
        )));
    }
    let ndim = usize::from(bytes[3]);
    if ndim == 0 {
        return Err(err("IDX header has 0 dimensions".into()));
    }
    let header = 4 + 4 * ndim;
    if bytes.len() < header {
        return Err(err(format!(
            "truncated IDX header: {ndim} dimensions need {header} bytes, file has {}",
            bytes.len()
        )));
    }
    let dims: Vec<usize> = bytes[4..header]
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]) as usize)
        .collect();
    let expected = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| err(format!("IDX dimensions {dims:?} overflow")))?;
    let actual = bytes.len() - header;
    if actual != expected {
        let what = if actual < expected {
            "truncated"
        } else {
            "trailing bytes"
        };
        return Err(err(format!(
            "{what}: dimensions {dims:?} need {expected} data bytes, found {actual}"
        )));
    }
    Ok(IdxArray {
        dims,
        data: bytes[header..].to_vec(),
    })
}
