//! GGUF, llama.cpp's checkpoint format (versions 2 and 3, little-endian): metadata, the tensor
//! directory, the raw quantised blocks and their dequantisation to `f32`.
//!
//! A GGUF file is a header (`"GGUF"`, version `u32`, tensor count `u64`, metadata count `u64`),
//! the metadata key/values, one info record per tensor (name, dimensions in ggml's order with
//! `ne[0]` innermost, ggml type, offset into the data section) and the data section, which
//! starts at the first multiple of `general.alignment` (default 32) after the infos.
//!
//! The whole file is read into memory (no mmap, so no `unsafe`). Every size the file declares
//! is checked against the bytes actually there before anything is allocated for it, so a
//! damaged or hostile file gives a [`FormatError::Invalid`] saying what is wrong, never a panic
//! or a huge allocation.
//!
//! ```no_run
//! use nerve_io::gguf::GgufFile;
//! # fn main() -> Result<(), nerve_io::FormatError> {
//! let file = GgufFile::open("SmolLM2-135M-Instruct.Q4_1.gguf")?;
//! assert_eq!(file.get_str("general.architecture")?, "llama");
//! let layers = file.get_u32("llama.block_count")?;
//! let embed = file.tensor("token_embd.weight")?; // dequantised, shape [vocab, dim]
//! # let _ = (layers, embed);
//! # Ok(())
//! # }
//! ```

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use nerve_core::Tensor;
use rayon::prelude::*;

use crate::FormatError;

/// The four bytes every GGUF file starts with.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";

/// Data-section alignment when the file has no `general.alignment`.
pub const DEFAULT_ALIGNMENT: usize = 32;

/// How deeply arrays may nest inside metadata arrays. ggml itself writes no nested arrays;
/// the limit keeps a hostile file from recursing the reader off its stack.
pub const MAX_ARRAY_DEPTH: usize = 8;

/// The most dimensions a ggml tensor has.
pub const MAX_DIMS: usize = 4;

// The fewest bytes a metadata entry takes (key length u64, a one-byte key, type u32, a one-byte
// value) and a tensor info (name length u64, n_dims u32, type u32, offset u64): used to refuse
// counts that the rest of the file cannot possibly hold.
const MIN_KV_BYTES: usize = 8 + 1 + 4 + 1;
const MIN_TENSOR_INFO_BYTES: usize = 8 + 4 + 4 + 8;

// Room reserved up front for a declared count of entries, strings or arrays: the count is
// checked against the bytes left, but one entry in memory is larger than its fewest bytes in
// the file, so a hostile count could still ask for several times the file's size at once.
// Past this, vectors grow as the entries actually arrive.
const MAX_RESERVE: usize = 4096;

// ------------------------------------------------------------------------------ ggml types

macro_rules! ggml_types {
    ($($name:ident = $id:literal, $block:literal, $size:expr;)*) => {
        /// A ggml tensor element type, numbered as in ggml's `enum ggml_type`.
        ///
        /// Quantised types store values in blocks: [`block_size`](GgmlType::block_size)
        /// elements in [`type_size`](GgmlType::type_size) bytes. Every type ggml defines up to
        /// `MXFP4` is known (so files holding any of them open and their raw bytes can be
        /// read); [`can_dequantize`](GgmlType::can_dequantize) says which ones
        /// [`dequantize`] turns into `f32`.
        #[allow(non_camel_case_types)]
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr(u32)]
        pub enum GgmlType {
            $(
                #[doc = concat!("ggml's `GGML_TYPE_", stringify!($name), "` (id ", stringify!($id), ").")]
                $name = $id,
            )*
        }

        impl GgmlType {
            /// The type with ggml's numeric id, if ggml defines it (and this reader knows it).
            pub fn from_id(id: u32) -> Option<GgmlType> {
                match id {
                    $($id => Some(GgmlType::$name),)*
                    _ => None,
                }
            }

            /// Elements per block (1 for the plain float and integer types).
            pub fn block_size(self) -> usize {
                match self {
                    $(GgmlType::$name => $block,)*
                }
            }

            /// Bytes per block.
            pub fn type_size(self) -> usize {
                match self {
                    $(GgmlType::$name => $size,)*
                }
            }

            /// ggml's name for the type (`"Q4_0"`, `"F16"`, ...).
            pub fn name(self) -> &'static str {
                match self {
                    $(GgmlType::$name => stringify!($name),)*
                }
            }
        }
    };
}

// Block sizes and bytes per block, as in ggml.h / ggml-common.h (QK_K = 256).
ggml_types! {
    F32 = 0, 1, 4;
    F16 = 1, 1, 2;
    Q4_0 = 2, 32, 2 + 16;
    Q4_1 = 3, 32, 2 + 2 + 16;
    Q5_0 = 6, 32, 2 + 4 + 16;
    Q5_1 = 7, 32, 2 + 2 + 4 + 16;
    Q8_0 = 8, 32, 2 + 32;
    Q8_1 = 9, 32, 4 + 4 + 32;
    Q2_K = 10, 256, 2 + 2 + 256 / 16 + 256 / 4;
    Q3_K = 11, 256, 2 + 256 / 4 + 256 / 8 + 12;
    Q4_K = 12, 256, 2 + 2 + 256 / 2 + 12;
    Q5_K = 13, 256, 2 + 2 + 256 / 2 + 256 / 8 + 12;
    Q6_K = 14, 256, 2 + 256 / 2 + 256 / 4 + 256 / 16;
    Q8_K = 15, 256, 4 + 256 + 256 / 8;
    IQ2_XXS = 16, 256, 2 + 256 / 4;
    IQ2_XS = 17, 256, 2 + 256 / 4 + 256 / 32;
    IQ3_XXS = 18, 256, 2 + 256 / 4 + 256 / 8;
    IQ1_S = 19, 256, 2 + 256 / 8 + 256 / 16;
    IQ4_NL = 20, 32, 2 + 16;
    IQ3_S = 21, 256, 2 + 256 / 4 + 256 / 8 + 256 / 32 + 4;
    IQ2_S = 22, 256, 2 + 256 / 4 + 256 / 16;
    IQ4_XS = 23, 256, 2 + 2 + 256 / 2 + 256 / 64;
    I8 = 24, 1, 1;
    I16 = 25, 1, 2;
    I32 = 26, 1, 4;
    I64 = 27, 1, 8;
    F64 = 28, 1, 8;
    IQ1_M = 29, 256, 256 / 8 + 256 / 16 + 256 / 32;
    BF16 = 30, 1, 2;
    TQ1_0 = 34, 256, 2 + 4 * 13;
    TQ2_0 = 35, 256, 2 + 64;
    MXFP4 = 39, 32, 1 + 16;
}

impl GgmlType {
    /// ggml's numeric id of the type.
    pub fn id(self) -> u32 {
        self as u32
    }

    /// Whether [`dequantize`] handles this type: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1,
    /// Q8_0 and the K-quants Q2_K to Q8_K.
    pub fn can_dequantize(self) -> bool {
        use GgmlType::*;
        matches!(
            self,
            F32 | F16
                | BF16
                | Q4_0
                | Q4_1
                | Q5_0
                | Q5_1
                | Q8_0
                | Q2_K
                | Q3_K
                | Q4_K
                | Q5_K
                | Q6_K
                | Q8_K
        )
    }

    /// Bytes taken by `n_elements` values, `None` if `n_elements` is not a whole number of
    /// blocks or the size overflows `usize`.
    pub fn bytes_for(self, n_elements: usize) -> Option<usize> {
        if !n_elements.is_multiple_of(self.block_size()) {
            return None;
        }
        (n_elements / self.block_size()).checked_mul(self.type_size())
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

// ------------------------------------------------------------------------------ dequantisation

/// Why [`dequantize`] refused its input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DequantizeError {
    /// The type has no dequantiser here (see [`GgmlType::can_dequantize`]).
    #[error("dequantising {0} is not supported")]
    Unsupported(GgmlType),
    /// The input is not a whole number of blocks.
    #[error("{ty}: {len} bytes is not a whole number of {type_size}-byte blocks")]
    PartialBlock {
        /// The type.
        ty: GgmlType,
        /// The input's length in bytes.
        len: usize,
        /// Bytes per block.
        type_size: usize,
    },
    /// The output does not have room for exactly the values the input holds.
    #[error("{ty}: the input holds {expected} values but the output has room for {got}")]
    OutputLength {
        /// The type.
        ty: GgmlType,
        /// Values in the input.
        expected: usize,
        /// The output's length.
        got: usize,
    },
}

/// Decode `bytes`, a whole number of `ty` blocks, into `out` (one `f32` per element, in
/// storage order), with ggml's block layouts (`dequantize_row_*` in ggml-quants.c). The
/// results are bit-identical to gguf-py's `quants.dequantize` (ggml's C may differ in the last
/// bit where its compiler fuses a multiply-add).
///
/// Large inputs are split across nerve's thread pool (above
/// [`nerve_core::threading::par_elemwise_min`] elements).
///
/// ```
/// use nerve_io::gguf::{dequantize, GgmlType};
/// // One Q8_0 block: an f16 scale of 0.5, then 32 signed bytes.
/// let mut block = vec![0x00, 0x38];
/// block.extend((0..32).map(|i| (i as i8 - 16) as u8));
/// let mut out = [0f32; 32];
/// dequantize(GgmlType::Q8_0, &block, &mut out).unwrap();
/// assert_eq!(out[0], -8.0);
/// assert_eq!(out[31], 7.5);
/// ```
pub fn dequantize(ty: GgmlType, bytes: &[u8], out: &mut [f32]) -> Result<(), DequantizeError> {
    if !ty.can_dequantize() {
        return Err(DequantizeError::Unsupported(ty));
    }
    let (block, type_size) = (ty.block_size(), ty.type_size());
    if !bytes.len().is_multiple_of(type_size) {
        return Err(DequantizeError::PartialBlock {
            ty,
            len: bytes.len(),
            type_size,
        });
    }
    let n_blocks = bytes.len() / type_size;
    let expected = n_blocks * block;
    if out.len() != expected {
        return Err(DequantizeError::OutputLength {
            ty,
            expected,
            got: out.len(),
        });
    }
    if expected < nerve_core::threading::par_elemwise_min() {
        dequantize_blocks(ty, bytes, out);
        return Ok(());
    }
    // Chunks of at least 16 Ki elements: decoding is about as cheap as a copy.
    let chunk_blocks = nerve_core::threading::chunk_len(n_blocks, (1 << 14) / block);
    nerve_core::threading::install(|| {
        bytes
            .par_chunks(chunk_blocks * type_size)
            .zip(out.par_chunks_mut(chunk_blocks * block))
            .for_each(|(b, o)| dequantize_blocks(ty, b, o));
    });
    Ok(())
}

/// The serial kernels; `bytes` and `out` hold the same whole number of blocks.
fn dequantize_blocks(ty: GgmlType, bytes: &[u8], out: &mut [f32]) {
    match ty {
        GgmlType::F32 => {
            for (b, y) in bytes.chunks_exact(4).zip(out.iter_mut()) {
                *y = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        GgmlType::F16 => {
            for (b, y) in bytes.chunks_exact(2).zip(out.iter_mut()) {
                *y = f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
            }
        }
        GgmlType::BF16 => {
            for (b, y) in bytes.chunks_exact(2).zip(out.iter_mut()) {
                *y = bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
            }
        }
        GgmlType::Q4_0 => dq_q4_0(bytes, out),
        GgmlType::Q4_1 => dq_q4_1(bytes, out),
        GgmlType::Q5_0 => dq_q5_0(bytes, out),
        GgmlType::Q5_1 => dq_q5_1(bytes, out),
        GgmlType::Q8_0 => dq_q8_0(bytes, out),
        GgmlType::Q2_K => dq_q2_k(bytes, out),
        GgmlType::Q3_K => dq_q3_k(bytes, out),
        GgmlType::Q4_K => dq_q4_k(bytes, out),
        GgmlType::Q5_K => dq_q5_k(bytes, out),
        GgmlType::Q6_K => dq_q6_k(bytes, out),
        GgmlType::Q8_K => dq_q8_k(bytes, out),
        // `dequantize` checked `can_dequantize` first.
        _ => unreachable!("no dequantiser for {ty}"),
    }
}

#[inline(always)]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

// Each kernel works on one block at a time, as fixed-size arrays so the inner loops carry no
// bounds checks. Products are formed in the same order as gguf-py (scale * scale first, then
// * q, then - min) and Rust never fuses a multiply-add on its own, so the results match it bit
// for bit.

/// Q4_0: f16 d, 16 bytes of 4-bit q (low nibbles = elements 0..16, high = 16..32);
/// x = d * (q - 8).
fn dq_q4_0(bytes: &[u8], out: &mut [f32]) {
    for (b, y) in bytes.chunks_exact(18).zip(out.chunks_exact_mut(32)) {
        let d = f16_at(b, 0);
        let qs: &[u8; 16] = b[2..18].try_into().expect("18-byte block");
        let (lo, hi) = y.split_at_mut(16);
        for j in 0..16 {
            lo[j] = ((qs[j] & 0x0F) as i32 - 8) as f32 * d;
            hi[j] = ((qs[j] >> 4) as i32 - 8) as f32 * d;
        }
    }
}

/// Q4_1: f16 d, f16 m, 16 bytes of 4-bit q; x = d * q + m.
fn dq_q4_1(bytes: &[u8], out: &mut [f32]) {
    for (b, y) in bytes.chunks_exact(20).zip(out.chunks_exact_mut(32)) {
        let d = f16_at(b, 0);
        let m = f16_at(b, 2);
        let qs: &[u8; 16] = b[4..20].try_into().expect("20-byte block");
        let (lo, hi) = y.split_at_mut(16);
        for j in 0..16 {
            lo[j] = d * (qs[j] & 0x0F) as f32 + m;
            hi[j] = d * (qs[j] >> 4) as f32 + m;
        }
    }
}

/// Q5_0: f16 d, a u32 of fifth bits (bit j for element j), 16 bytes of low nibbles;
/// x = d * (q - 16).
fn dq_q5_0(bytes: &[u8], out: &mut [f32]) {
    for (b, y) in bytes.chunks_exact(22).zip(out.chunks_exact_mut(32)) {
        let d = f16_at(b, 0);
        let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
        let qs: &[u8; 16] = b[6..22].try_into().expect("22-byte block");
        let (lo, hi) = y.split_at_mut(16);
        for j in 0..16 {
            let h0 = ((qh >> j) & 1) << 4;
            let h1 = ((qh >> (j + 16)) & 1) << 4;
            lo[j] = (((qs[j] & 0x0F) as u32 | h0) as i32 - 16) as f32 * d;
            hi[j] = (((qs[j] >> 4) as u32 | h1) as i32 - 16) as f32 * d;
        }
    }
}

/// Q5_1: f16 d, f16 m, a u32 of fifth bits, 16 bytes of low nibbles; x = d * q + m.
fn dq_q5_1(bytes: &[u8], out: &mut [f32]) {
    for (b, y) in bytes.chunks_exact(24).zip(out.chunks_exact_mut(32)) {
        let d = f16_at(b, 0);
        let m = f16_at(b, 2);
        let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
        let qs: &[u8; 16] = b[8..24].try_into().expect("24-byte block");
        let (lo, hi) = y.split_at_mut(16);
        for j in 0..16 {
            let h0 = ((qh >> j) & 1) << 4;
            let h1 = ((qh >> (j + 16)) & 1) << 4;
            lo[j] = d * ((qs[j] & 0x0F) as u32 | h0) as f32 + m;
            hi[j] = d * ((qs[j] >> 4) as u32 | h1) as f32 + m;
        }
    }
}

/// Q8_0: f16 d, 32 signed bytes; x = d * q.
fn dq_q8_0(bytes: &[u8], out: &mut [f32]) {
    for (b, y) in bytes.chunks_exact(34).zip(out.chunks_exact_mut(32)) {
        let d = f16_at(b, 0);
        let qs: &[u8; 32] = b[2..34].try_into().expect("34-byte block");
        for (y, &q) in y.iter_mut().zip(qs) {
            *y = (q as i8) as f32 * d;
        }
    }
}

/// Q2_K: 16 bytes of 4-bit scale / 4-bit min pairs, 64 bytes of 2-bit q, f16 d, f16 dmin.
/// Each half of 128 elements reads 32 q bytes four times (shifts 0, 2, 4, 6); element e uses
/// scale byte e / 16: x = (d * sc) * q - dmin * m.
fn dq_q2_k(bytes: &[u8], out: &mut [f32]) {
    for (b, y) in bytes.chunks_exact(84).zip(out.chunks_exact_mut(256)) {
        let scales: &[u8; 16] = b[0..16].try_into().expect("84-byte block");
        let qs: &[u8; 64] = b[16..80].try_into().expect("84-byte block");
        let d = f16_at(b, 80);
        let dmin = f16_at(b, 82);
        for h in 0..2 {
            let q = &qs[h * 32..h * 32 + 32];
            for j in 0..4 {
                let shift = 2 * j;
                for k in 0..2 {
                    let sc = scales[h * 8 + j * 2 + k];
                    let dl = d * (sc & 0x0F) as f32;
                    let ml = dmin * (sc >> 4) as f32;
                    let base = h * 128 + j * 32 + k * 16;
                    let y = &mut y[base..base + 16];
                    let q = &q[k * 16..k * 16 + 16];
                    for l in 0..16 {
                        y[l] = dl * ((q[l] >> shift) & 3) as f32 - ml;
                    }
                }
            }
        }
    }
}

/// Q3_K: 32 bytes of high bits (bit e / 32 of byte e % 32; a clear bit subtracts 4), 64
/// bytes of 2-bit low q laid out as in Q2_K, 12 bytes of sixteen 6-bit scales, f16 d;
/// x = (d * (sc - 32)) * q.
fn dq_q3_k(bytes: &[u8], out: &mut [f32]) {
    for (b, y) in bytes.chunks_exact(110).zip(out.chunks_exact_mut(256)) {
        let hmask: &[u8; 32] = b[0..32].try_into().expect("110-byte block");
        let qs: &[u8; 64] = b[32..96].try_into().expect("110-byte block");
        let s: &[u8; 12] = b[96..108].try_into().expect("110-byte block");
        let d = f16_at(b, 108);
        // Scale i: low nibble from byte i (i < 8) or the high nibble of byte i - 8, two high
        // bits from byte 8 + i % 4 at shift 2 * (i / 4).
        let mut dl = [0f32; 16];
        for (i, dl) in dl.iter_mut().enumerate() {
            let low = if i < 8 { s[i] & 0x0F } else { s[i - 8] >> 4 };
            let high = (s[8 + i % 4] >> (2 * (i / 4))) & 3;
            *dl = d * ((low | (high << 4)) as i32 - 32) as f32;
        }
        for h in 0..2 {
            let q = &qs[h * 32..h * 32 + 32];
            for j in 0..4 {
                let shift = 2 * j;
                let hbit = h * 4 + j;
                for k in 0..2 {
                    let scale = dl[h * 8 + j * 2 + k];
                    let base = h * 128 + j * 32 + k * 16;
                    let y = &mut y[base..base + 16];
                    let q = &q[k * 16..k * 16 + 16];
                    let hm = &hmask[k * 16..k * 16 + 16];
                    for l in 0..16 {
                        let low = ((q[l] >> shift) & 3) as i32;
                        let sub = if (hm[l] >> hbit) & 1 == 1 { 0 } else { 4 };
                        y[l] = scale * (low - sub) as f32;
                    }
                }
            }
        }
    }
}

/// The 6-bit scale and min of sub-block `j` (0..8) of a Q4_K / Q5_K block, packed in 12
/// bytes as in ggml's `get_scale_min_k4`.
#[inline(always)]
fn scale_min_k4(j: usize, s: &[u8; 12]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

/// Q4_K: f16 d, f16 dmin, 12 bytes of 6-bit scales and mins, 128 bytes of 4-bit q: each 64
/// elements read 32 bytes, low nibbles first; x = (d * sc) * q - dmin * m.
fn dq_q4_k(bytes: &[u8], out: &mut [f32]) {
    for (b, y) in bytes.chunks_exact(144).zip(out.chunks_exact_mut(256)) {
        let d = f16_at(b, 0);
        let dmin = f16_at(b, 2);
        let s: &[u8; 12] = b[4..16].try_into().expect("144-byte block");
        let qs: &[u8; 128] = b[16..144].try_into().expect("144-byte block");
        for c in 0..4 {
            let (sc1, m1) = scale_min_k4(2 * c, s);
            let (sc2, m2) = scale_min_k4(2 * c + 1, s);
            let (d1, min1) = (d * sc1 as f32, dmin * m1 as f32);
            let (d2, min2) = (d * sc2 as f32, dmin * m2 as f32);
            let q = &qs[c * 32..c * 32 + 32];
            let (lo, hi) = y[c * 64..c * 64 + 64].split_at_mut(32);
            for l in 0..32 {
                lo[l] = d1 * (q[l] & 0x0F) as f32 - min1;
                hi[l] = d2 * (q[l] >> 4) as f32 - min2;
            }
        }
    }
}

/// Q5_K: as Q4_K with 32 bytes of fifth bits (bit e / 32 of byte e % 32) before the nibbles.
fn dq_q5_k(bytes: &[u8], out: &mut [f32]) {
    for (b, y) in bytes.chunks_exact(176).zip(out.chunks_exact_mut(256)) {
        let d = f16_at(b, 0);
        let dmin = f16_at(b, 2);
        let s: &[u8; 12] = b[4..16].try_into().expect("176-byte block");
        let qh: &[u8; 32] = b[16..48].try_into().expect("176-byte block");
        let qs: &[u8; 128] = b[48..176].try_into().expect("176-byte block");
        for c in 0..4 {
            let (sc1, m1) = scale_min_k4(2 * c, s);
            let (sc2, m2) = scale_min_k4(2 * c + 1, s);
            let (d1, min1) = (d * sc1 as f32, dmin * m1 as f32);
            let (d2, min2) = (d * sc2 as f32, dmin * m2 as f32);
            let q = &qs[c * 32..c * 32 + 32];
            let (lo, hi) = y[c * 64..c * 64 + 64].split_at_mut(32);
            for l in 0..32 {
                let h1 = ((qh[l] >> (2 * c)) & 1) << 4;
                let h2 = ((qh[l] >> (2 * c + 1)) & 1) << 4;
                lo[l] = d1 * ((q[l] & 0x0F) | h1) as f32 - min1;
                hi[l] = d2 * ((q[l] >> 4) | h2) as f32 - min2;
            }
        }
    }
}

/// Q6_K: 128 bytes of low nibbles, 64 bytes of 2-bit highs, 16 signed 8-bit scales, f16 d.
/// Each half of 128 elements reads 64 low bytes and 32 high bytes:
/// x = (d * sc) * (q - 32), with scale e / 16.
fn dq_q6_k(bytes: &[u8], out: &mut [f32]) {
    for (b, y) in bytes.chunks_exact(210).zip(out.chunks_exact_mut(256)) {
        let ql_all: &[u8; 128] = b[0..128].try_into().expect("210-byte block");
        let qh_all: &[u8; 64] = b[128..192].try_into().expect("210-byte block");
        let sc_all: &[u8; 16] = b[192..208].try_into().expect("210-byte block");
        let d = f16_at(b, 208);
        for h in 0..2 {
            let ql = &ql_all[h * 64..h * 64 + 64];
            let qh = &qh_all[h * 32..h * 32 + 32];
            let mut dl = [0f32; 8];
            for (dl, &sc) in dl.iter_mut().zip(&sc_all[h * 8..h * 8 + 8]) {
                *dl = d * (sc as i8) as f32;
            }
            let y = &mut y[h * 128..h * 128 + 128];
            for l in 0..32 {
                let is = l / 16;
                let q1 = ((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) as i32 - 32;
                let q2 = ((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) as i32 - 32;
                let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i32 - 32;
                let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i32 - 32;
                y[l] = dl[is] * q1 as f32;
                y[l + 32] = dl[is + 2] * q2 as f32;
                y[l + 64] = dl[is + 4] * q3 as f32;
                y[l + 96] = dl[is + 6] * q4 as f32;
            }
        }
    }
}

/// Q8_K: f32 d, 256 signed bytes, 16 i16 block sums (unused here); x = d * q.
fn dq_q8_k(bytes: &[u8], out: &mut [f32]) {
    for (b, y) in bytes.chunks_exact(292).zip(out.chunks_exact_mut(256)) {
        let d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        let qs: &[u8; 256] = b[4..260].try_into().expect("292-byte block");
        for (y, &q) in y.iter_mut().zip(qs) {
            *y = d * (q as i8) as f32;
        }
    }
}

// ------------------------------------------------------------------------------ metadata values

/// The type tag of a metadata value, numbered as in the GGUF spec (`gguf_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum GgufValueType {
    /// `u8`.
    U8 = 0,
    /// `i8`.
    I8 = 1,
    /// `u16`.
    U16 = 2,
    /// `i16`.
    I16 = 3,
    /// `u32`.
    U32 = 4,
    /// `i32`.
    I32 = 5,
    /// `f32`.
    F32 = 6,
    /// A byte that is 0 (false) or 1 (true).
    Bool = 7,
    /// A UTF-8 string, `u64` length first.
    String = 8,
    /// An array: element type `u32`, count `u64`, then the elements.
    Array = 9,
    /// `u64`.
    U64 = 10,
    /// `i64`.
    I64 = 11,
    /// `f64`.
    F64 = 12,
}

impl GgufValueType {
    /// The type with the spec's numeric id.
    pub fn from_id(id: u32) -> Option<GgufValueType> {
        use GgufValueType::*;
        Some(match id {
            0 => U8,
            1 => I8,
            2 => U16,
            3 => I16,
            4 => U32,
            5 => I32,
            6 => F32,
            7 => Bool,
            8 => String,
            9 => Array,
            10 => U64,
            11 => I64,
            12 => F64,
            _ => return None,
        })
    }

    /// The fewest bytes one value of this type takes in a file.
    fn min_encoded_size(self) -> usize {
        use GgufValueType::*;
        match self {
            U8 | I8 | Bool => 1,
            U16 | I16 => 2,
            U32 | I32 | F32 => 4,
            U64 | I64 | F64 => 8,
            String => 8,
            Array => 4 + 8,
        }
    }

    /// The spec's short name (`"u32"`, `"string"`, ...).
    pub fn name(self) -> &'static str {
        use GgufValueType::*;
        match self {
            U8 => "u8",
            I8 => "i8",
            U16 => "u16",
            I16 => "i16",
            U32 => "u32",
            I32 => "i32",
            F32 => "f32",
            Bool => "bool",
            String => "string",
            Array => "array",
            U64 => "u64",
            I64 => "i64",
            F64 => "f64",
        }
    }
}

/// One metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    /// `u8`.
    U8(u8),
    /// `i8`.
    I8(i8),
    /// `u16`.
    U16(u16),
    /// `i16`.
    I16(i16),
    /// `u32`.
    U32(u32),
    /// `i32`.
    I32(i32),
    /// `f32`.
    F32(f32),
    /// `bool`.
    Bool(bool),
    /// A string.
    String(String),
    /// An array (all elements of one type).
    Array(GgufArray),
    /// `u64`.
    U64(u64),
    /// `i64`.
    I64(i64),
    /// `f64`.
    F64(f64),
}

/// A metadata array: its elements stored unboxed, one `Vec` per element type.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufArray {
    /// `u8` elements.
    U8(Vec<u8>),
    /// `i8` elements.
    I8(Vec<i8>),
    /// `u16` elements.
    U16(Vec<u16>),
    /// `i16` elements.
    I16(Vec<i16>),
    /// `u32` elements.
    U32(Vec<u32>),
    /// `i32` elements.
    I32(Vec<i32>),
    /// `f32` elements.
    F32(Vec<f32>),
    /// `bool` elements.
    Bool(Vec<bool>),
    /// String elements.
    String(Vec<String>),
    /// Array elements (each of its own element type).
    Array(Vec<GgufArray>),
    /// `u64` elements.
    U64(Vec<u64>),
    /// `i64` elements.
    I64(Vec<i64>),
    /// `f64` elements.
    F64(Vec<f64>),
}

impl GgufValue {
    /// The value's type tag.
    pub fn value_type(&self) -> GgufValueType {
        match self {
            GgufValue::U8(_) => GgufValueType::U8,
            GgufValue::I8(_) => GgufValueType::I8,
            GgufValue::U16(_) => GgufValueType::U16,
            GgufValue::I16(_) => GgufValueType::I16,
            GgufValue::U32(_) => GgufValueType::U32,
            GgufValue::I32(_) => GgufValueType::I32,
            GgufValue::F32(_) => GgufValueType::F32,
            GgufValue::Bool(_) => GgufValueType::Bool,
            GgufValue::String(_) => GgufValueType::String,
            GgufValue::Array(_) => GgufValueType::Array,
            GgufValue::U64(_) => GgufValueType::U64,
            GgufValue::I64(_) => GgufValueType::I64,
            GgufValue::F64(_) => GgufValueType::F64,
        }
    }

    /// The value as an integer, if it is one of the eight integer types.
    pub fn as_integer(&self) -> Option<i128> {
        Some(match *self {
            GgufValue::U8(v) => v.into(),
            GgufValue::I8(v) => v.into(),
            GgufValue::U16(v) => v.into(),
            GgufValue::I16(v) => v.into(),
            GgufValue::U32(v) => v.into(),
            GgufValue::I32(v) => v.into(),
            GgufValue::U64(v) => v.into(),
            GgufValue::I64(v) => v.into(),
            _ => return None,
        })
    }

    /// The string, if the value is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// The array, if the value is one.
    pub fn as_array(&self) -> Option<&GgufArray> {
        match self {
            GgufValue::Array(a) => Some(a),
            _ => None,
        }
    }

    /// A readable name of the value's type: `"u32"`, `"array of string"`, ...
    pub fn type_name(&self) -> String {
        match self {
            GgufValue::Array(a) => a.type_name(),
            v => v.value_type().name().to_string(),
        }
    }
}

impl GgufArray {
    /// The type of the elements.
    pub fn element_type(&self) -> GgufValueType {
        match self {
            GgufArray::U8(_) => GgufValueType::U8,
            GgufArray::I8(_) => GgufValueType::I8,
            GgufArray::U16(_) => GgufValueType::U16,
            GgufArray::I16(_) => GgufValueType::I16,
            GgufArray::U32(_) => GgufValueType::U32,
            GgufArray::I32(_) => GgufValueType::I32,
            GgufArray::F32(_) => GgufValueType::F32,
            GgufArray::Bool(_) => GgufValueType::Bool,
            GgufArray::String(_) => GgufValueType::String,
            GgufArray::Array(_) => GgufValueType::Array,
            GgufArray::U64(_) => GgufValueType::U64,
            GgufArray::I64(_) => GgufValueType::I64,
            GgufArray::F64(_) => GgufValueType::F64,
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            GgufArray::U8(v) => v.len(),
            GgufArray::I8(v) => v.len(),
            GgufArray::U16(v) => v.len(),
            GgufArray::I16(v) => v.len(),
            GgufArray::U32(v) => v.len(),
            GgufArray::I32(v) => v.len(),
            GgufArray::F32(v) => v.len(),
            GgufArray::Bool(v) => v.len(),
            GgufArray::String(v) => v.len(),
            GgufArray::Array(v) => v.len(),
            GgufArray::U64(v) => v.len(),
            GgufArray::I64(v) => v.len(),
            GgufArray::F64(v) => v.len(),
        }
    }

    /// Whether the array has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A readable name of the array's type: `"array of string"`, `"array of array of u8"`.
    pub fn type_name(&self) -> String {
        match self {
            GgufArray::Array(inner) => match inner.first() {
                Some(first) => format!("array of {}", first.type_name()),
                None => "array of array".to_string(),
            },
            a => format!("array of {}", a.element_type().name()),
        }
    }
}

// ------------------------------------------------------------------------------ tensor infos

/// Where one tensor lives in the file and what it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// The tensor's name (`"blk.0.attn_q.weight"`).
    pub name: String,
    /// The shape in PyTorch (row-major) order: ggml's dimensions reversed, so the last entry
    /// is ggml's `ne[0]`, the contiguous one. Empty for a 0-dimensional tensor.
    pub shape: Vec<usize>,
    /// The element type.
    pub ggml_type: GgmlType,
    /// Position of the tensor's first byte from the start of the file (the file stores it
    /// relative to the data section; this is already absolute).
    pub offset: usize,
    /// Length of the tensor's data in bytes.
    pub n_bytes: usize,
}

impl TensorInfo {
    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

// ------------------------------------------------------------------------------ the file

/// A parsed GGUF file: its metadata, its tensor directory and its bytes.
pub struct GgufFile {
    path: PathBuf,
    bytes: Vec<u8>,
    version: u32,
    alignment: usize,
    data_offset: usize,
    metadata: Vec<(String, GgufValue)>,
    key_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
}

// Not derived: that would print every byte of the file.
impl fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("bytes", &self.bytes.len())
            .field("metadata", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl GgufFile {
    /// Read and parse the file at `path` (the whole file is read into memory).
    pub fn open(path: impl AsRef<Path>) -> Result<GgufFile, FormatError> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|source| FormatError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        GgufFile::from_bytes(bytes, path)
    }

    /// Parse a GGUF file held in memory; `path_for_errors` names it in error messages.
    pub fn from_bytes(
        bytes: Vec<u8>,
        path_for_errors: impl Into<PathBuf>,
    ) -> Result<GgufFile, FormatError> {
        let path = path_for_errors.into();
        match parse(&bytes) {
            Ok(p) => Ok(GgufFile {
                path,
                bytes,
                version: p.version,
                alignment: p.alignment,
                data_offset: p.data_offset,
                metadata: p.metadata,
                key_index: p.key_index,
                tensors: p.tensors,
                tensor_index: p.tensor_index,
            }),
            Err(msg) => Err(FormatError::invalid(path, msg)),
        }
    }

    /// The file's name as given to [`open`](GgufFile::open) or
    /// [`from_bytes`](GgufFile::from_bytes).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The GGUF version, 2 or 3.
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The data-section alignment in bytes (`general.alignment`, else 32).
    pub fn alignment(&self) -> usize {
        self.alignment
    }

    /// Where the data section starts, from the start of the file.
    pub fn data_offset(&self) -> usize {
        self.data_offset
    }

    /// The whole file.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    // -------------------------------------------------------------------- metadata

    /// All metadata key/values, in file order.
    pub fn metadata(&self) -> &[(String, GgufValue)] {
        &self.metadata
    }

    /// The value of `key`, if the file has it.
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.key_index.get(key).map(|&i| &self.metadata[i].1)
    }

    fn invalid(&self, msg: impl Into<String>) -> FormatError {
        FormatError::invalid(&self.path, msg)
    }

    fn require(&self, key: &str) -> Result<&GgufValue, FormatError> {
        self.get(key)
            .ok_or_else(|| self.invalid(format!("metadata key '{key}' is missing")))
    }

    fn wrong_type(&self, key: &str, value: &GgufValue, wanted: &str) -> FormatError {
        self.invalid(format!(
            "metadata key '{key}' is {}, not {wanted}",
            a_or_an(&value.type_name())
        ))
    }

    fn get_integer<T: TryFrom<i128>>(&self, key: &str, wanted: &str) -> Result<T, FormatError> {
        let value = self.require(key)?;
        let Some(v) = value.as_integer() else {
            return Err(self.wrong_type(key, value, wanted));
        };
        T::try_from(v).map_err(|_| {
            self.invalid(format!(
                "metadata key '{key}' is {v}, which does not fit {wanted}"
            ))
        })
    }

    /// The string value of `key`.
    pub fn get_str(&self, key: &str) -> Result<&str, FormatError> {
        let value = self.require(key)?;
        value
            .as_str()
            .ok_or_else(|| self.wrong_type(key, value, "a string"))
    }

    /// The boolean value of `key`.
    pub fn get_bool(&self, key: &str) -> Result<bool, FormatError> {
        match self.require(key)? {
            GgufValue::Bool(b) => Ok(*b),
            v => Err(self.wrong_type(key, v, "a bool")),
        }
    }

    /// The value of `key` as a `u32`: any integer type whose value fits is accepted.
    pub fn get_u32(&self, key: &str) -> Result<u32, FormatError> {
        self.get_integer(key, "a u32")
    }

    /// The value of `key` as a `u64`: any integer type whose value fits is accepted.
    pub fn get_u64(&self, key: &str) -> Result<u64, FormatError> {
        self.get_integer(key, "a u64")
    }

    /// The value of `key` as an `i64`: any integer type whose value fits is accepted.
    pub fn get_i64(&self, key: &str) -> Result<i64, FormatError> {
        self.get_integer(key, "an i64")
    }

    /// The value of `key` as a `usize`: any integer type whose value fits is accepted.
    pub fn get_usize(&self, key: &str) -> Result<usize, FormatError> {
        self.get_integer(key, "a usize")
    }

    /// The value of `key` as an `f32`: an `f32`, or an `f64` rounded to `f32`.
    pub fn get_f32(&self, key: &str) -> Result<f32, FormatError> {
        match self.require(key)? {
            GgufValue::F32(v) => Ok(*v),
            GgufValue::F64(v) => Ok(*v as f32),
            v => Err(self.wrong_type(key, v, "a float")),
        }
    }

    /// The value of `key` as an `f64`: an `f64` or an `f32`.
    pub fn get_f64(&self, key: &str) -> Result<f64, FormatError> {
        match self.require(key)? {
            GgufValue::F32(v) => Ok(f64::from(*v)),
            GgufValue::F64(v) => Ok(*v),
            v => Err(self.wrong_type(key, v, "a float")),
        }
    }

    /// The array value of `key`, of any element type.
    pub fn get_array(&self, key: &str) -> Result<&GgufArray, FormatError> {
        let value = self.require(key)?;
        value
            .as_array()
            .ok_or_else(|| self.wrong_type(key, value, "an array"))
    }

    /// The array of strings at `key` (`tokenizer.ggml.tokens`, `tokenizer.ggml.merges`).
    pub fn get_str_array(&self, key: &str) -> Result<&[String], FormatError> {
        match self.require(key)? {
            GgufValue::Array(GgufArray::String(v)) => Ok(v),
            v => Err(self.wrong_type(key, v, "an array of string")),
        }
    }

    /// The array of `f32` at `key` (`tokenizer.ggml.scores`).
    pub fn get_f32_array(&self, key: &str) -> Result<&[f32], FormatError> {
        match self.require(key)? {
            GgufValue::Array(GgufArray::F32(v)) => Ok(v),
            v => Err(self.wrong_type(key, v, "an array of f32")),
        }
    }

    /// The array of `i32` at `key` (`tokenizer.ggml.token_type`).
    pub fn get_i32_array(&self, key: &str) -> Result<&[i32], FormatError> {
        match self.require(key)? {
            GgufValue::Array(GgufArray::I32(v)) => Ok(v),
            v => Err(self.wrong_type(key, v, "an array of i32")),
        }
    }

    /// The array of `u32` at `key`.
    pub fn get_u32_array(&self, key: &str) -> Result<&[u32], FormatError> {
        match self.require(key)? {
            GgufValue::Array(GgufArray::U32(v)) => Ok(v),
            v => Err(self.wrong_type(key, v, "an array of u32")),
        }
    }

    // -------------------------------------------------------------------- tensors

    /// The tensor directory, in file order.
    pub fn tensor_infos(&self) -> &[TensorInfo] {
        &self.tensors
    }

    /// The tensor names, in file order.
    pub fn tensor_names(&self) -> impl Iterator<Item = &str> + '_ {
        self.tensors.iter().map(|t| t.name.as_str())
    }

    /// The info of the tensor called `name`, if there is one.
    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensor_index.get(name).map(|&i| &self.tensors[i])
    }

    fn require_tensor(&self, name: &str) -> Result<&TensorInfo, FormatError> {
        self.tensor_info(name)
            .ok_or_else(|| self.invalid(format!("no tensor named '{name}'")))
    }

    /// The raw bytes of the tensor called `name`: its blocks as stored, for kernels that
    /// work on quantised data directly.
    pub fn tensor_bytes(&self, name: &str) -> Result<&[u8], FormatError> {
        let info = self.require_tensor(name)?;
        // In bounds: checked when the file was parsed.
        Ok(&self.bytes[info.offset..info.offset + info.n_bytes])
    }

    /// The tensor called `name`, dequantised to `f32`, in its row-major shape.
    pub fn tensor(&self, name: &str) -> Result<Tensor, FormatError> {
        let info = self.require_tensor(name)?;
        if !info.ggml_type.can_dequantize() {
            return Err(self.invalid(format!(
                "tensor '{name}' is {}, which nerve cannot dequantise (it reads F32, F16, BF16, \
                 Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K and Q8_K)",
                info.ggml_type
            )));
        }
        let mut values = vec![0f32; info.numel()];
        let bytes = &self.bytes[info.offset..info.offset + info.n_bytes];
        dequantize(info.ggml_type, bytes, &mut values)
            .map_err(|e| self.invalid(format!("tensor '{name}': {e}")))?;
        Tensor::from_vec(values, info.shape.clone()).map_err(|source| FormatError::Tensor {
            path: self.path.clone(),
            source,
        })
    }
}

/// `noun` with its article, as the type names are spoken: "an i32", "an f32", "a u8".
fn a_or_an(noun: &str) -> String {
    let article = match noun.as_bytes().first() {
        Some(b'a' | b'e' | b'i' | b'o' | b'f') => "an",
        _ => "a",
    };
    format!("{article} {noun}")
}

// ------------------------------------------------------------------------------ parsing

/// A cursor over the file's bytes whose reads fail, with a message, past the end.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if n > self.remaining() {
            return Err(format!(
                "needs {n} bytes at offset {} but the file ends at {}",
                self.pos,
                self.bytes.len()
            ));
        }
        let out = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u32(&mut self) -> Result<u32, String> {
        self.array().map(u32::from_le_bytes)
    }

    fn u64(&mut self) -> Result<u64, String> {
        self.array().map(u64::from_le_bytes)
    }

    /// A count of items of at least `min_size` bytes each, refused unless the rest of the
    /// file could hold that many.
    fn count(&mut self, min_size: usize) -> Result<usize, String> {
        let n = self.u64()?;
        let fits = usize::try_from(n)
            .ok()
            .filter(|&n| n <= self.remaining() / min_size);
        fits.ok_or_else(|| {
            format!(
                "declares {n} elements of at least {min_size} bytes each but only {} bytes follow",
                self.remaining()
            )
        })
    }

    fn string(&mut self) -> Result<String, String> {
        let len = self.u64()?;
        if len > self.remaining() as u64 {
            return Err(format!(
                "string length {len} at offset {} runs past the end of the file ({} bytes left)",
                self.pos - 8,
                self.remaining()
            ));
        }
        let start = self.pos;
        let raw = self.take(len as usize)?;
        match std::str::from_utf8(raw) {
            Ok(s) => Ok(s.to_owned()),
            Err(e) => Err(format!(
                "string at offset {start} is not valid UTF-8 (bad byte at {})",
                start + e.valid_up_to()
            )),
        }
    }

    fn value_type(&mut self) -> Result<GgufValueType, String> {
        let id = self.u32()?;
        GgufValueType::from_id(id).ok_or_else(|| format!("unknown value type {id}"))
    }

    fn value(&mut self, ty: GgufValueType) -> Result<GgufValue, String> {
        Ok(match ty {
            GgufValueType::U8 => GgufValue::U8(self.array::<1>()?[0]),
            GgufValueType::I8 => GgufValue::I8(i8::from_le_bytes(self.array()?)),
            GgufValueType::U16 => GgufValue::U16(u16::from_le_bytes(self.array()?)),
            GgufValueType::I16 => GgufValue::I16(i16::from_le_bytes(self.array()?)),
            GgufValueType::U32 => GgufValue::U32(self.u32()?),
            GgufValueType::I32 => GgufValue::I32(i32::from_le_bytes(self.array()?)),
            GgufValueType::F32 => GgufValue::F32(f32::from_le_bytes(self.array()?)),
            GgufValueType::Bool => GgufValue::Bool(to_bool(self.array::<1>()?[0])?),
            GgufValueType::String => GgufValue::String(self.string()?),
            GgufValueType::Array => GgufValue::Array(self.array_value(1)?),
            GgufValueType::U64 => GgufValue::U64(self.u64()?),
            GgufValueType::I64 => GgufValue::I64(i64::from_le_bytes(self.array()?)),
            GgufValueType::F64 => GgufValue::F64(f64::from_le_bytes(self.array()?)),
        })
    }

    /// An array's element type, count and elements; `depth` is 1 for a top-level array.
    fn array_value(&mut self, depth: usize) -> Result<GgufArray, String> {
        if depth > MAX_ARRAY_DEPTH {
            return Err(format!(
                "arrays nest more than {MAX_ARRAY_DEPTH} deep at offset {}",
                self.pos
            ));
        }
        let ty = self.value_type().map_err(|e| format!("array: {e}"))?;
        let n = self
            .count(ty.min_encoded_size())
            .map_err(|e| format!("array of {}: {e}", ty.name()))?;
        fn fixed<const N: usize, T>(
            r: &mut Reader,
            n: usize,
            f: fn([u8; N]) -> T,
        ) -> Result<Vec<T>, String> {
            let raw = r.take(n * N)?;
            Ok(raw
                .chunks_exact(N)
                .map(|c| {
                    let mut a = [0u8; N];
                    a.copy_from_slice(c);
                    f(a)
                })
                .collect())
        }
        Ok(match ty {
            GgufValueType::U8 => GgufArray::U8(self.take(n)?.to_vec()),
            GgufValueType::I8 => GgufArray::I8(fixed(self, n, i8::from_le_bytes)?),
            GgufValueType::U16 => GgufArray::U16(fixed(self, n, u16::from_le_bytes)?),
            GgufValueType::I16 => GgufArray::I16(fixed(self, n, i16::from_le_bytes)?),
            GgufValueType::U32 => GgufArray::U32(fixed(self, n, u32::from_le_bytes)?),
            GgufValueType::I32 => GgufArray::I32(fixed(self, n, i32::from_le_bytes)?),
            GgufValueType::F32 => GgufArray::F32(fixed(self, n, f32::from_le_bytes)?),
            GgufValueType::U64 => GgufArray::U64(fixed(self, n, u64::from_le_bytes)?),
            GgufValueType::I64 => GgufArray::I64(fixed(self, n, i64::from_le_bytes)?),
            GgufValueType::F64 => GgufArray::F64(fixed(self, n, f64::from_le_bytes)?),
            GgufValueType::Bool => GgufArray::Bool(
                self.take(n)?
                    .iter()
                    .map(|&b| to_bool(b))
                    .collect::<Result<_, _>>()?,
            ),
            GgufValueType::String => {
                let mut v = Vec::with_capacity(n.min(MAX_RESERVE));
                for i in 0..n {
                    v.push(self.string().map_err(|e| format!("element {i}: {e}"))?);
                }
                GgufArray::String(v)
            }
            GgufValueType::Array => {
                let mut v = Vec::with_capacity(n.min(MAX_RESERVE));
                for i in 0..n {
                    v.push(
                        self.array_value(depth + 1)
                            .map_err(|e| format!("element {i}: {e}"))?,
                    );
                }
                GgufArray::Array(v)
            }
        })
    }
}

fn to_bool(b: u8) -> Result<bool, String> {
    match b {
        0 => Ok(false),
        1 => Ok(true),
        _ => Err(format!("bool byte is {b}, neither 0 nor 1")),
    }
}

struct Parsed {
    version: u32,
    alignment: usize,
    data_offset: usize,
    metadata: Vec<(String, GgufValue)>,
    key_index: HashMap<String, usize>,
    tensors: Vec<TensorInfo>,
    tensor_index: HashMap<String, usize>,
}

fn parse(bytes: &[u8]) -> Result<Parsed, String> {
    let mut r = Reader { bytes, pos: 0 };

    // Header.
    if bytes.len() < 4 {
        return Err(format!(
            "not a GGUF file: {} bytes, too short for the magic",
            bytes.len()
        ));
    }
    let magic = r.array::<4>()?;
    if magic != GGUF_MAGIC {
        return Err(format!(
            "not a GGUF file: starts with {:?} ({magic:02x?}), not \"GGUF\"",
            String::from_utf8_lossy(&magic)
        ));
    }
    let version = r.u32().map_err(|e| format!("header: version: {e}"))?;
    if version != 2 && version != 3 {
        let hint = if version & 0xFFFF == 0 && version != 0 {
            " (it looks byte-swapped: big-endian GGUF files are not supported)"
        } else if version == 1 {
            " (GGUF v1, with 32-bit counts, is obsolete)"
        } else {
            ""
        };
        return Err(format!(
            "unsupported GGUF version {version}{hint}; this reader handles versions 2 and 3"
        ));
    }
    let n_tensors = r.u64().map_err(|e| format!("header: tensor count: {e}"))?;
    let n_kv = r
        .u64()
        .map_err(|e| format!("header: metadata count: {e}"))?;
    let left = r.remaining() as u128;
    let least = u128::from(n_tensors) * MIN_TENSOR_INFO_BYTES as u128
        + u128::from(n_kv) * MIN_KV_BYTES as u128;
    if least > left {
        return Err(format!(
            "header declares {n_tensors} tensors and {n_kv} metadata entries, which need at \
             least {least} bytes, but only {left} bytes follow the header"
        ));
    }
    // Both fit in usize now: each is at most the file's length.
    let (n_tensors, n_kv) = (n_tensors as usize, n_kv as usize);

    // Metadata.
    let mut metadata = Vec::with_capacity(n_kv.min(MAX_RESERVE));
    let mut key_index = HashMap::with_capacity(n_kv.min(MAX_RESERVE));
    for i in 0..n_kv {
        let key = r
            .string()
            .map_err(|e| format!("metadata entry {i}: key: {e}"))?;
        if key.is_empty() {
            return Err(format!("metadata entry {i}: the key is empty"));
        }
        if key_index.contains_key(&key) {
            return Err(format!("metadata key '{key}' appears twice"));
        }
        let value = r
            .value_type()
            .and_then(|ty| r.value(ty))
            .map_err(|e| format!("metadata key '{key}': {e}"))?;
        key_index.insert(key.clone(), i);
        metadata.push((key, value));
    }

    let alignment = match key_index.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(&i) => {
            let value = &metadata[i].1;
            let a = value
                .as_integer()
                .and_then(|a| u32::try_from(a).ok())
                .filter(|a| a.is_power_of_two());
            match a {
                Some(a) => a as usize,
                None => {
                    return Err(format!(
                        "general.alignment must be a power of two that fits a u32, but is {value:?}"
                    ))
                }
            }
        }
    };

    // Tensor infos.
    let mut tensors = Vec::with_capacity(n_tensors.min(MAX_RESERVE));
    let mut tensor_index = HashMap::with_capacity(n_tensors.min(MAX_RESERVE));
    // Offsets as the file states them (relative to the data section), checked below.
    let mut rel_offsets = Vec::with_capacity(n_tensors.min(MAX_RESERVE));
    for i in 0..n_tensors {
        let name = r
            .string()
            .map_err(|e| format!("tensor info {i}: name: {e}"))?;
        let (info, rel) = tensor_info(&mut r, name).map_err(|e| format!("tensor info {i}: {e}"))?;
        if tensor_index.contains_key(&info.name) {
            return Err(format!("tensor name '{}' appears twice", info.name));
        }
        tensor_index.insert(info.name.clone(), i);
        tensors.push(info);
        rel_offsets.push(rel);
    }

    // Data section: at the next multiple of the alignment.
    let data_offset = r
        .pos
        .checked_next_multiple_of(alignment)
        .ok_or("data section offset overflows")?;
    for (info, rel) in tensors.iter_mut().zip(rel_offsets) {
        let name = &info.name;
        if !rel.is_multiple_of(alignment as u64) {
            return Err(format!(
                "tensor '{name}': data offset {rel} is not a multiple of the alignment {alignment}"
            ));
        }
        let start = usize::try_from(rel)
            .ok()
            .and_then(|rel| rel.checked_add(data_offset));
        let end = start.and_then(|s| s.checked_add(info.n_bytes));
        match (start, end) {
            (Some(start), Some(end)) if end <= bytes.len() => info.offset = start,
            _ => {
                return Err(format!(
                    "tensor '{name}': its {} bytes of data at offset {rel} in the data section \
                     (which starts at {data_offset}) run past the end of the file ({} bytes)",
                    info.n_bytes,
                    bytes.len()
                ))
            }
        }
    }

    Ok(Parsed {
        version,
        alignment,
        data_offset,
        metadata,
        key_index,
        tensors,
        tensor_index,
    })
}

/// One tensor info after its name: dimensions, type, offset (returned separately, still
/// relative to the data section).
fn tensor_info(r: &mut Reader, name: String) -> Result<(TensorInfo, u64), String> {
    let ctx = |e: String| format!("tensor '{name}': {e}");
    let n_dims = r.u32().map_err(ctx)?;
    if n_dims as usize > MAX_DIMS {
        return Err(ctx(format!("{n_dims} dimensions, more than {MAX_DIMS}")));
    }
    let mut ne = Vec::with_capacity(n_dims as usize);
    for _ in 0..n_dims {
        ne.push(r.u64().map_err(ctx)?);
    }
    let type_id = r.u32().map_err(ctx)?;
    let ggml_type =
        GgmlType::from_id(type_id).ok_or_else(|| ctx(format!("unknown ggml type id {type_id}")))?;
    let rel_offset = r.u64().map_err(ctx)?;

    // ggml stores dimensions as i64; each and the element count must fit that and usize.
    if let Some(&d) = ne
        .iter()
        .find(|&&d| d > i64::MAX as u64 || usize::try_from(d).is_err())
    {
        return Err(ctx(format!("dimension {d} is too large")));
    }
    // Zero dimensions aside: `[0, 2^40, 2^40]` holds no data, but its shape would still
    // overflow every product and stride taken of it.
    if !crate::shape::shape_fits(ne.iter().copied()) {
        return Err(ctx(format!("dimensions {ne:?} overflow the element count")));
    }
    let numel = ne
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d))
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| ctx(format!("dimensions {ne:?} overflow the element count")))?;
    let row = ne.first().copied().unwrap_or(1);
    if !row.is_multiple_of(ggml_type.block_size() as u64) {
        return Err(ctx(format!(
            "rows of {row} elements are not a whole number of {ggml_type} blocks of {}",
            ggml_type.block_size()
        )));
    }
    let n_bytes = ggml_type
        .bytes_for(numel)
        .ok_or_else(|| ctx(format!("dimensions {ne:?} overflow the byte size")))?;
    let shape = ne.iter().rev().map(|&d| d as usize).collect();
    Ok((
        TensorInfo {
            name,
            shape,
            ggml_type,
            offset: 0,
            n_bytes,
        },
        rel_offset,
    ))
}
