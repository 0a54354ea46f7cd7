//! The IDX binary format used by MNIST and Fashion-MNIST.
//!
//! Layout: two zero bytes, a type byte (only `0x08`, unsigned byte, is supported), the number of
//! dimensions, then each dimension as a big-endian `u32`, then the data in row-major order.
//! Files may be gzip-compressed; compression is detected by the magic bytes, not the name.

use std::path::Path;

use crate::error::{DataError, Result};

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
    let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    IdxArray::from_bytes(&bytes, path)
}

impl IdxArray {
    /// Parse an IDX file held in memory, plain or gzip-compressed (detected by the magic
    /// bytes), as [`read_idx`] does; `path` names it in errors.
    ///
    /// A compressed file is decompressed into memory only as far as its header says the data
    /// goes (the rest is counted, not kept), so a small file cannot make the reader allocate
    /// more than its dimensions declare.
    ///
    /// ```
    /// use nerve_data::IdxArray;
    /// // Two 2-byte rows: magic 00 00 08, 2 dimensions, then [2, 2] and the data.
    /// let bytes = [0, 0, 8, 2, 0, 0, 0, 2, 0, 0, 0, 2, 1, 2, 3, 4];
    /// let a = IdxArray::from_bytes(&bytes, "inline.idx")?;
    /// assert_eq!((a.dims, a.data), (vec![2, 2], vec![1, 2, 3, 4]));
    /// # Ok::<(), nerve_data::DataError>(())
    /// ```
    pub fn from_bytes(bytes: &[u8], path: impl AsRef<Path>) -> Result<IdxArray> {
        let path = path.as_ref();
        if is_gzip(bytes) {
            let (head, unread) = gunzip_idx(bytes, path)?;
            parse_idx(&head, unread, path)
        } else {
            parse_idx(bytes, 0, path)
        }
    }
}

/// Decompress a gzip-compressed IDX file: the header, then at most the data it declares.
/// Returns those bytes and the count of decompressed bytes past them (read to the end, so
/// the gzip checksum is still verified, but not kept).
fn gunzip_idx(bytes: &[u8], path: &Path) -> Result<(Vec<u8>, u64)> {
    use std::io::Read;
    let io = |e| DataError::io(path, e);
    let mut gz = flate2::read::GzDecoder::new(bytes);
    let mut out = Vec::new();
    (&mut gz).take(4).read_to_end(&mut out).map_err(io)?;
    if out.len() == 4 {
        let ndim = u64::from(out[3]);
        (&mut gz).take(4 * ndim).read_to_end(&mut out).map_err(io)?;
    }
    // A bad or incomplete header reads no further: `parse_idx` reports it.
    if let Ok((header, expected)) = parse_header(&out, path) {
        debug_assert_eq!(header, out.len());
        let want = u64::try_from(expected).unwrap_or(u64::MAX);
        (&mut gz).take(want).read_to_end(&mut out).map_err(io)?;
    }
    let unread = std::io::copy(&mut gz, &mut std::io::sink()).map_err(io)?;
    Ok((out, unread))
}

fn is_gzip(bytes: &[u8]) -> bool {
    bytes.starts_with(&[0x1f, 0x8b])
}

/// Check the header of an IDX file: its length in bytes and the data length it declares.
fn parse_header(bytes: &[u8], path: &Path) -> Result<(usize, usize)> {
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
    let dims = dims_of(&bytes[4..header]);
    // Zero dimensions are skipped: a tensor of shape [0, 2^32 - 1, 2^32 - 1] holds no data,
    // but its shape (and strides) would still overflow `usize` wherever it is used.
    dims.iter()
        .filter(|&&d| d != 0)
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| err(format!("IDX dimensions {dims:?} overflow")))?;
    let expected = dims.iter().product();
    Ok((header, expected))
}

fn dims_of(header_dims: &[u8]) -> Vec<usize> {
    header_dims
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]) as usize)
        .collect()
}

/// Parse a whole IDX file; `unread` more data bytes followed `bytes` (in a gzip stream).
fn parse_idx(bytes: &[u8], unread: u64, path: &Path) -> Result<IdxArray> {
    let (header, expected) = parse_header(bytes, path)?;
    let dims = dims_of(&bytes[4..header]);
    let actual = (bytes.len() - header) as u64 + unread;
    if actual != expected as u64 {
        let what = if actual < expected as u64 {
            "truncated"
        } else {
            "trailing bytes"
        };
        return Err(DataError::format(
            path,
            format!("{what}: dimensions {dims:?} need {expected} data bytes, found {actual}"),
        ));
    }
    Ok(IdxArray {
        dims,
        data: bytes[header..].to_vec(),
    })
}
