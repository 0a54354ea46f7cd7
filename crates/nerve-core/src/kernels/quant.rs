//! Matrix products whose weights stay in ggml's quantised blocks (`Q4_0`, `Q4_1`, `Q8_0`), run
//! the way llama.cpp runs them: each activation row is quantised to 8-bit blocks of 32
//! ([`Q8Rows`]), then every output is a sum over blocks of integer dot products scaled by the
//! two blocks' scales. Decoding a small language model reads every weight once per token, so
//! reading 4.5 (`Q4_1`: 5) bits per weight instead of 32 is what makes it fast.
//!
//! Block layouts are ggml's (`ggml-common.h`), little-endian, 32 weights per block:
//!
//! | format | bytes | layout                                   | weight `i`                  |
//! |--------|-------|------------------------------------------|-----------------------------|
//! | `Q4_0` | 18    | f16 `d`, 16 bytes of nibbles             | `d · (q_i − 8)`             |
//! | `Q4_1` | 20    | f16 `d`, f16 `m`, 16 bytes of nibbles    | `d · q_i + m`               |
//! | `Q8_0` | 34    | f16 `d`, 32 signed bytes                 | `d · q_i`                   |
//!
//! In the 4-bit formats byte `j` holds weight `j` in its low nibble and weight `j + 16` in its
//! high nibble.
//!
//! With activations `x_i ≈ dx · p_i` (`p_i` signed bytes) a block contributes
//! `d·dx·Σ q_i p_i + m·dx·Σ p_i` (`Q4_0`: `m = −8d`; `Q8_0`: no second term): the sums are
//! exact integers, and [`Q8Rows`] keeps `dx·Σ p_i` per block for the second term.
//!
//! Three implementations compute the integer sums ([`QuantKernel`]): portable Rust (the
//! reference), AVX2 (`vpmaddubsw`), and AVX-512 VNNI (`vpdpbusd`). They give the same
//! integer sums; the two SIMD kernels also add the same f32 terms in the same order (the same
//! bits), the portable one in another order. Every output row is computed with the same
//! additions whatever the other rows of the product are, so a prompt fed token by token gives
//! the same bits as fed whole (which matters: a last-bit difference can flip the 8-bit rounding
//! of a later activation).

use half::f16;
use rayon::prelude::*;

use super::{with_simd, SendPtr};
use crate::threading::{install, num_threads};
use crate::{Error, Result};

/// Weights (and activations) per block.
pub const QK: usize = 32;

/// A ggml block format the quantised product reads.
#[allow(non_camel_case_types)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QuantFormat {
    /// f16 scale, 32 4-bit weights: `d · (q − 8)`.
    Q4_0,
    /// f16 scale and f16 minimum, 32 4-bit weights: `d · q + m`.
    Q4_1,
    /// f16 scale, 32 signed 8-bit weights: `d · q`.
    Q8_0,
}

impl QuantFormat {
    /// Bytes per block of [`QK`] weights.
    pub fn block_bytes(self) -> usize {
        match self {
            QuantFormat::Q4_0 => 18,
            QuantFormat::Q4_1 => 20,
            QuantFormat::Q8_0 => 34,
        }
    }

    /// ggml's name (`"Q4_1"`).
    pub fn name(self) -> &'static str {
        match self {
            QuantFormat::Q4_0 => "Q4_0",
            QuantFormat::Q4_1 => "Q4_1",
            QuantFormat::Q8_0 => "Q8_0",
        }
    }
}

impl std::fmt::Display for QuantFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[inline(always)]
fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_bits(u16::from_le_bytes([b[i], b[i + 1]])).to_f32()
}

/// A weight matrix `[rows, cols]` held as ggml blocks: row `r` is `cols / 32` consecutive
/// blocks (the blocks run along `cols`, the input dimension of a `Linear`'s weight), so rows
/// can be reordered, selected or stacked as whole byte ranges.
///
/// ```
/// use nerve_core::kernels::quant::{QuantFormat, QuantMatrix};
/// // A [2, 32] matrix: row 0 all 1.0, row 1 all -0.5.
/// let mut w = vec![1.0f32; 32];
/// w.extend([-0.5f32; 32]);
/// let q = QuantMatrix::quantize(QuantFormat::Q8_0, 2, 32, &w).unwrap();
/// assert_eq!(q.as_bytes().len(), 2 * 34);
/// let y = q.matmul(&[1.0f32; 32], 1).unwrap(); // x [1, 32] · Wᵀ
/// // The block scales are f16 (relative error ≤ 2⁻¹¹ each, on weights and activations).
/// assert!((y[0] - 32.0).abs() < 32.0 * 1e-3, "{y:?}");
/// assert!((y[1] + 16.0).abs() < 16.0 * 1e-3, "{y:?}");
/// ```
#[derive(Clone, PartialEq, Eq)]
pub struct QuantMatrix {
    format: QuantFormat,
    rows: usize,
    cols: usize,
    data: Vec<u8>,
}

// Not derived: that would print every byte.
impl std::fmt::Debug for QuantMatrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuantMatrix")
            .field("format", &self.format)
            .field("rows", &self.rows)
            .field("cols", &self.cols)
            .finish()
    }
}

impl QuantMatrix {
    /// The matrix whose blocks are `data`, as stored in a GGUF file (`rows · cols / 32`
    /// blocks, row-major). `cols` must be a multiple of 32 and `data` exactly that long.
    pub fn from_blocks(
        format: QuantFormat,
        rows: usize,
        cols: usize,
        data: Vec<u8>,
    ) -> Result<Self> {
        if !cols.is_multiple_of(QK) {
            return Err(Error::bad_shape(
                "QuantMatrix",
                &[rows, cols],
                format!("{format} rows must be a whole number of {QK}-wide blocks"),
            ));
        }
        let want = rows * cols / QK * format.block_bytes();
        if data.len() != want {
            return Err(Error::invalid(
                "QuantMatrix",
                format!(
                    "a [{rows}, {cols}] {format} matrix is {want} bytes, got {}",
                    data.len()
                ),
            ));
        }
        Ok(Self {
            format,
            rows,
            cols,
            data,
        })
    }

    /// Quantise `values` `[rows, cols]` (row-major) with ggml's reference quantisers
    /// (`quantize_row_q4_0_ref` and friends): per block, `Q8_0` scales by `max|x| / 127`,
    /// `Q4_1` maps `[min, max]` onto 0..=15, `Q4_0` scales by the signed value of largest
    /// magnitude over −8.
    pub fn quantize(format: QuantFormat, rows: usize, cols: usize, values: &[f32]) -> Result<Self> {
        if values.len() != rows * cols {
            return Err(Error::bad_shape(
                "QuantMatrix::quantize",
                &[values.len()],
                format!("expected {rows}·{cols} values"),
            ));
        }
        let mut data = vec![0u8; rows * cols / QK.max(1) * format.block_bytes()];
        if !cols.is_multiple_of(QK) {
            // from_blocks names the problem.
            return Self::from_blocks(format, rows, cols, data);
        }
        for (x, b) in values
            .chunks_exact(QK)
            .zip(data.chunks_exact_mut(format.block_bytes()))
        {
            quantize_block(format, x, b);
        }
        Self::from_blocks(format, rows, cols, data)
    }

    /// The block format.
    pub fn format(&self) -> QuantFormat {
        self.format
    }

    /// Output dimension (rows of the weight).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Input dimension (columns of the weight).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The blocks, row-major.
    pub fn as_bytes(&self) -> &[u8] {
        &self.data
    }

    /// Bytes of one row.
    pub fn row_bytes(&self) -> usize {
        self.cols / QK * self.format.block_bytes()
    }

    /// The blocks of row `r`.
    pub fn row(&self, r: usize) -> &[u8] {
        let rb = self.row_bytes();
        &self.data[r * rb..(r + 1) * rb]
    }

    /// Row `r` as f32 (`out` holds `cols` values), bit for bit as ggml (and
    /// `nerve_io::gguf::dequantize`) computes it.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        assert_eq!(out.len(), self.cols, "QuantMatrix::dequantize_row: output");
        let bb = self.format.block_bytes();
        for (b, y) in self.row(r).chunks_exact(bb).zip(out.chunks_exact_mut(QK)) {
            dequantize_block(self.format, b, y);
        }
    }

    /// The whole matrix as f32 `[rows, cols]`.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        for (r, y) in out.chunks_exact_mut(self.cols.max(1)).enumerate() {
            self.dequantize_row(r, y);
        }
        out
    }

    /// The matrix whose row `i` is row `order[i]` of this one (rows are whole block runs, so
    /// this moves bytes and loses nothing).
    pub fn select_rows(&self, order: &[usize]) -> Result<Self> {
        let rb = self.row_bytes();
        let mut data = Vec::with_capacity(order.len() * rb);
        for &r in order {
            if r >= self.rows {
                return Err(Error::invalid(
                    "QuantMatrix::select_rows",
                    format!("row {r} of a matrix of {} rows", self.rows),
                ));
            }
            data.extend_from_slice(self.row(r));
        }
        Self::from_blocks(self.format, order.len(), self.cols, data)
    }

    /// `y [m, rows] = x [m, cols] · Wᵀ` (`x` row-major): [`quant_matmul`].
    pub fn matmul(&self, x: &[f32], m: usize) -> Result<Vec<f32>> {
        quant_matmul(self, x, m)
    }

    /// The same product with the weights dequantised and the activations as given (not
    /// rounded to 8 bits), summed in f64: slow, a reference for checking what the quantised
    /// product's rounding of the activations costs.
    pub fn matmul_reference(&self, x: &[f32], m: usize) -> Result<Vec<f32>> {
        let k = self.cols;
        if x.len() != m * k {
            return Err(Error::bad_shape(
                "QuantMatrix::matmul_reference",
                &[x.len()],
                format!("expected [{m}, {k}] values"),
            ));
        }
        let mut y = vec![0f32; m * self.rows];
        let mut w = vec![0f32; k];
        for j in 0..self.rows {
            self.dequantize_row(j, &mut w);
            for i in 0..m {
                let xi = &x[i * k..(i + 1) * k];
                y[i * self.rows + j] = xi
                    .iter()
                    .zip(&w)
                    .map(|(&a, &b)| a as f64 * b as f64)
                    .sum::<f64>() as f32;
            }
        }
        Ok(y)
    }
}

/// One block of 32 weights, bit-exact with ggml's `dequantize_row_*` (the products in the
/// same order; Rust never fuses a multiply-add on its own).
#[inline(always)]
fn dequantize_block(format: QuantFormat, b: &[u8], y: &mut [f32]) {
    let d = f16_at(b, 0);
    match format {
        QuantFormat::Q4_0 => {
            for j in 0..16 {
                y[j] = ((b[2 + j] & 0x0F) as i32 - 8) as f32 * d;
                y[j + 16] = ((b[2 + j] >> 4) as i32 - 8) as f32 * d;
            }
        }
        QuantFormat::Q4_1 => {
            let m = f16_at(b, 2);
            for j in 0..16 {
                y[j] = d * (b[4 + j] & 0x0F) as f32 + m;
                y[j + 16] = d * (b[4 + j] >> 4) as f32 + m;
            }
        }
        QuantFormat::Q8_0 => {
            for j in 0..QK {
                y[j] = (b[2 + j] as i8) as f32 * d;
            }
        }
    }
}

/// ggml's reference quantiser for one block of 32 values.
fn quantize_block(format: QuantFormat, x: &[f32], b: &mut [u8]) {
    let put16 = |b: &mut [u8], i: usize, v: f32| {
        b[i..i + 2].copy_from_slice(&f16::from_f32(v).to_bits().to_le_bytes())
    };
    match format {
        QuantFormat::Q4_0 => {
            // The value of largest magnitude, with its sign, maps to −8.
            let mut amax = 0f32;
            let mut max = 0f32;
            for &v in x {
                if v.abs() > amax {
                    amax = v.abs();
                    max = v;
                }
            }
            let d = max / -8.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            put16(b, 0, d);
            for j in 0..16 {
                let q0 = ((x[j] * id + 8.5) as i8).min(15) as u8;
                let q1 = ((x[j + 16] * id + 8.5) as i8).min(15) as u8;
                b[2 + j] = q0 | (q1 << 4);
            }
        }
        QuantFormat::Q4_1 => {
            let (mut min, mut max) = (f32::INFINITY, f32::NEG_INFINITY);
            for &v in x {
                min = min.min(v);
                max = max.max(v);
            }
            let d = (max - min) / 15.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            put16(b, 0, d);
            put16(b, 2, min);
            for j in 0..16 {
                let q0 = (((x[j] - min) * id + 0.5) as i8).min(15) as u8;
                let q1 = (((x[j + 16] - min) * id + 0.5) as i8).min(15) as u8;
                b[4 + j] = q0 | (q1 << 4);
            }
        }
        QuantFormat::Q8_0 => {
            let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
            let d = amax / 127.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            put16(b, 0, d);
            for j in 0..QK {
                b[2 + j] = ((x[j] * id).round() as i8) as u8;
            }
        }
    }
}

/// Rows of activations `[rows, cols]` quantised to 8-bit blocks of 32, the left operand of
/// [`quant_matmul_q8`]: block `b` of row `i` is `d[i, b] · qs[i, 32b..32b + 32]` with
/// `d = max|x| / 127` (kept in f32) and the values rounded to nearest, ties to even.
/// `s[i, b] = d[i, b] · Σ qs` feeds the minimum term of the 4-bit formats (ggml's `Q8_1`).
/// A NaN or infinite value makes its block's scale NaN, so the outputs it reaches are NaN
/// rather than silently finite.
#[derive(Clone, Debug, PartialEq)]
pub struct Q8Rows {
    rows: usize,
    cols: usize,
    qs: Vec<i8>,
    d: Vec<f32>,
    s: Vec<f32>,
}

impl Q8Rows {
    /// Quantise `x` `[rows, cols]` (row-major); `cols` must be a multiple of 32.
    pub fn quantize(x: &[f32], rows: usize, cols: usize) -> Result<Self> {
        if x.len() != rows * cols || !cols.is_multiple_of(QK) {
            return Err(Error::bad_shape(
                "Q8Rows::quantize",
                &[x.len()],
                format!("expected [{rows}, {cols}] values with {cols} a multiple of {QK}"),
            ));
        }
        let nb = rows * cols / QK;
        let mut qs = vec![0i8; rows * cols];
        let mut d = vec![0f32; nb];
        let mut s = vec![0f32; nb];
        with_simd(|| {
            for (((xb, qb), db), sb) in x
                .chunks_exact(QK)
                .zip(qs.chunks_exact_mut(QK))
                .zip(d.iter_mut())
                .zip(s.iter_mut())
            {
                let amax = xb.iter().fold(0f32, |a, v| a.max(v.abs()));
                // NaN when the block holds a NaN or an infinity, else 0.
                let poison: f32 = xb.iter().map(|v| v * 0.0).sum();
                let scale = amax / 127.0 + poison;
                let id = if scale > 0.0 && scale.is_finite() {
                    1.0 / scale
                } else {
                    0.0
                };
                let mut sum = 0i32;
                for (q, &v) in qb.iter_mut().zip(xb) {
                    // |v · id| <= 127 up to rounding; the cast saturates anyway.
                    let r = (v * id).round_ties_even() as i32;
                    *q = r.clamp(-127, 127) as i8;
                    sum += *q as i32;
                }
                *db = scale;
                *sb = scale * sum as f32;
            }
        });
        Ok(Self {
            rows,
            cols,
            qs,
            d,
            s,
        })
    }

    /// Rows.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The rows as f32 (`d · q`), for checking what the quantisation kept.
    pub fn dequantize(&self) -> Vec<f32> {
        self.qs
            .chunks_exact(QK)
            .zip(&self.d)
            .flat_map(|(q, &d)| q.iter().map(move |&v| v as f32 * d))
            .collect()
    }
}

/// Which implementation of the block dot products runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QuantKernel {
    /// Portable Rust, the reference.
    Scalar,
    /// AVX2 with FMA and F16C: `vpmaddubsw` + `vpmaddwd` on one block (256 bits).
    Avx2,
    /// AVX-512 VNNI (with VL and BW): `vpdpbusd` on one block.
    Avx512Vnni,
}

impl QuantKernel {
    /// The fastest kernel this machine runs, within [`super::simd_level`] (so
    /// `NERVE_SIMD=avx2|plain` caps it too).
    pub fn best() -> Self {
        use super::SimdLevel;
        let level = super::simd_level();
        for k in [QuantKernel::Avx512Vnni, QuantKernel::Avx2] {
            let allowed = match k {
                QuantKernel::Avx512Vnni => level == SimdLevel::Avx512,
                _ => level != SimdLevel::Plain,
            };
            if allowed && k.is_available() {
                return k;
            }
        }
        QuantKernel::Scalar
    }

    /// Whether this machine has the instructions the kernel needs.
    pub fn is_available(self) -> bool {
        match self {
            QuantKernel::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            QuantKernel::Avx2 => {
                is_x86_feature_detected!("avx2")
                    && is_x86_feature_detected!("fma")
                    && is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            QuantKernel::Avx512Vnni => {
                QuantKernel::Avx2.is_available()
                    && is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512vl")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512vnni")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }
}

/// Default number of block products (one activation block against one weight block) above
/// which a product is split across threads. Measured with `cargo run --release -p
/// nerve-bench --example quant_matmul` (see the README).
pub const QUANT_PAR_MIN: usize = 1 << 12;

static PAR_MIN: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(QUANT_PAR_MIN);

/// Block products above which quantised products go parallel ([`QUANT_PAR_MIN`] unless
/// overridden).
pub fn quant_par_min() -> usize {
    PAR_MIN.load(std::sync::atomic::Ordering::Relaxed)
}

/// Override [`quant_par_min`] (for measuring the threshold on a new machine).
pub fn set_quant_par_min(n: usize) {
    PAR_MIN.store(n.max(1), std::sync::atomic::Ordering::Relaxed);
}

/// `y [m, rows] = x [m, cols] · Wᵀ` with `W` in quantised blocks: `x` is quantised to
/// [`Q8Rows`], then [`quant_matmul_q8`] runs with the best kernel. `x` is row-major and
/// `cols` must match `w`.
pub fn quant_matmul(w: &QuantMatrix, x: &[f32], m: usize) -> Result<Vec<f32>> {
    let xq = Q8Rows::quantize(x, m, w.cols())?;
    let mut out = quant_matmul_q8(&[w], &xq, QuantKernel::best())?;
    Ok(out.pop().unwrap_or_default())
}

/// The products of one activation `x [m, cols]` with several weights sharing `cols` (a
/// layer's query, key and value projections): `x` is quantised once and all the outputs are
/// computed in one parallel region (one fork/join instead of one per matrix).
pub fn quant_matmul_many(ws: &[&QuantMatrix], x: &[f32], m: usize) -> Result<Vec<Vec<f32>>> {
    let Some(first) = ws.first() else {
        return Ok(Vec::new());
    };
    let xq = Q8Rows::quantize(x, m, first.cols())?;
    quant_matmul_q8(ws, &xq, QuantKernel::best())
}

/// `y_w [x.rows, w.rows] = x · wᵀ` for every `w` in `ws` with the given kernel (an error when
/// this machine lacks it, or when a weight's `cols` differs from `x`'s). Split across threads
/// above [`quant_par_min`] block products.
pub fn quant_matmul_q8(
    ws: &[&QuantMatrix],
    x: &Q8Rows,
    kernel: QuantKernel,
) -> Result<Vec<Vec<f32>>> {
    matmul_q8_with(ws, x, kernel, quant_par_min())
}

fn matmul_q8_with(
    ws: &[&QuantMatrix],
    x: &Q8Rows,
    kernel: QuantKernel,
    par_min: usize,
) -> Result<Vec<Vec<f32>>> {
    if !kernel.is_available() {
        return Err(Error::invalid(
            "quant_matmul",
            format!("this machine cannot run the {kernel:?} kernel"),
        ));
    }
    for w in ws {
        if w.cols != x.cols {
            return Err(Error::shape_mismatch(
                "quant_matmul",
                &[x.rows, x.cols],
                &[w.rows, w.cols],
            ));
        }
    }
    let m = x.rows;
    let mut outs: Vec<Vec<f32>> = ws.iter().map(|w| vec![0f32; m * w.rows]).collect();
    let ptrs: Vec<SendPtr<f32>> = outs.iter_mut().map(|o| SendPtr(o.as_mut_ptr())).collect();
    let blocks: usize = ws.iter().map(|w| w.rows * w.cols / QK).sum::<usize>() * m;
    let threads = num_threads();
    if threads > 1 && blocks >= par_min {
        // Tasks of whole weight rows, about eight per thread for balance.
        let total_rows: usize = ws.iter().map(|w| w.rows).sum();
        let chunk = total_rows.div_ceil(threads * 8).max(8);
        let tasks: Vec<(usize, usize, usize)> = ws
            .iter()
            .enumerate()
            .flat_map(|(wi, w)| {
                (0..w.rows)
                    .step_by(chunk)
                    .map(move |j0| (wi, j0, (j0 + chunk).min(w.rows)))
            })
            .collect();
        install(|| {
            tasks.par_iter().for_each(|&(wi, j0, j1)| {
                // SAFETY: ptrs[wi] points at an [m, ws[wi].rows] buffer that outlives the
                // region; tasks write disjoint column ranges j0..j1 of it.
                unsafe { run_rows(kernel, ws[wi], x, j0, j1, ptrs[wi]) }
            })
        });
    } else {
        for (w, &p) in ws.iter().zip(&ptrs) {
            // SAFETY: as above, one task for all columns.
            unsafe { run_rows(kernel, w, x, 0, w.rows, p) }
        }
    }
    Ok(outs)
}

/// Columns `j0..j1` of `out [x.rows, w.rows]`.
///
/// # Safety
/// `out` must point at `x.rows · w.rows` writable f32 that no one else touches in columns
/// `j0..j1`; `kernel` must be available; `w.cols == x.cols`; `j1 <= w.rows`.
unsafe fn run_rows(
    kernel: QuantKernel,
    w: &QuantMatrix,
    x: &Q8Rows,
    j0: usize,
    j1: usize,
    out: SendPtr<f32>,
) {
    match kernel {
        QuantKernel::Scalar => rows_scalar(w, x, j0, j1, out),
        // SAFETY: the caller checked the features; the rest is forwarded.
        #[cfg(target_arch = "x86_64")]
        QuantKernel::Avx2 => unsafe { x86::avx2::rows(w, x, j0, j1, out) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        QuantKernel::Avx512Vnni => unsafe { x86::vnni::rows(w, x, j0, j1, out) },
        #[cfg(not(target_arch = "x86_64"))]
        _ => unreachable!("checked by is_available"),
    }
}

/// The reference: per block the integer dot product, then `acc += (d·dx) · dot` and, for the
/// 4-bit formats, `acc_min += m · s` (the SIMD kernels add in the same two sums).
fn rows_scalar(w: &QuantMatrix, x: &Q8Rows, j0: usize, j1: usize, out: SendPtr<f32>) {
    let (k, n, bb) = (w.cols, w.rows, w.format.block_bytes());
    let nb = k / QK;
    for j in j0..j1 {
        let wrow = w.row(j);
        for i in 0..x.rows {
            let xq = &x.qs[i * k..(i + 1) * k];
            let (xd, xs) = (&x.d[i * nb..(i + 1) * nb], &x.s[i * nb..(i + 1) * nb]);
            let (mut acc, mut acc_min) = (0f32, 0f32);
            for (b, blk) in wrow.chunks_exact(bb).enumerate() {
                let p: &[i8; QK] = xq[b * QK..(b + 1) * QK].try_into().expect("block");
                let d = f16_at(blk, 0);
                match w.format {
                    QuantFormat::Q8_0 => {
                        let dot: i32 = (0..QK)
                            .map(|l| (blk[2 + l] as i8) as i32 * p[l] as i32)
                            .sum();
                        acc += (d * xd[b]) * dot as f32;
                    }
                    QuantFormat::Q4_0 | QuantFormat::Q4_1 => {
                        let (off, m) = match w.format {
                            QuantFormat::Q4_1 => (4, f16_at(blk, 2)),
                            _ => (2, -8.0 * d),
                        };
                        let dot: i32 = (0..16)
                            .map(|l| {
                                (blk[off + l] & 0x0F) as i32 * p[l] as i32
                                    + (blk[off + l] >> 4) as i32 * p[l + 16] as i32
                            })
                            .sum();
                        acc += (d * xd[b]) * dot as f32;
                        acc_min += m * xs[b];
                    }
                }
            }
            // SAFETY: (i, j) is inside the output and in this task's columns.
            unsafe { *out.get().add(i * n + j) = acc + acc_min };
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    /// The SIMD kernel for one instruction set: `$dot(u, s)` is the 8 lanes of
    /// `Σ u[4l..4l+4] · s[4l..4l+4]` (`u` unsigned bytes, `s` signed bytes) as i32; `$ri`
    /// activation rows share each decoded weight block (their sums must fit the registers:
    /// 2 with AVX2's 16, 4 with AVX-512's 32).
    macro_rules! simd_kernel {
        ($module:ident, $features:literal, $ri:literal, $dot:item) => {
            pub(super) mod $module {
                use std::arch::x86_64::*;

                use super::super::{QuantFormat, QuantMatrix, Q8Rows, SendPtr, QK};

                $dot

                /// Columns `j0..j1` of `out [x.rows, w.rows]`.
                ///
                /// # Safety
                /// As `run_rows`, and this machine has the kernel's features.
                #[target_feature(enable = $features)]
                pub(crate) unsafe fn rows(
                    w: &QuantMatrix,
                    x: &Q8Rows,
                    j0: usize,
                    j1: usize,
                    out: SendPtr<f32>,
                ) {
                    // SAFETY: forwarded.
                    unsafe {
                        match w.format {
                            QuantFormat::Q4_0 => rows_fmt::<0>(w, x, j0, j1, out),
                            QuantFormat::Q4_1 => rows_fmt::<1>(w, x, j0, j1, out),
                            QuantFormat::Q8_0 => rows_fmt::<2>(w, x, j0, j1, out),
                        }
                    }
                }

                /// Format `F` (0: Q4_0, 1: Q4_1, 2: Q8_0), one weight row at a time (straight
                /// through memory, as the hardware prefetchers like it) against `$ri`
                /// activation rows at a time (each weight block decoded once for all of them;
                /// decoding has one).
                #[target_feature(enable = $features)]
                #[inline]
                unsafe fn rows_fmt<const F: u8>(
                    w: &QuantMatrix,
                    x: &Q8Rows,
                    j0: usize,
                    j1: usize,
                    out: SendPtr<f32>,
                ) {
                    let m = x.rows;
                    // SAFETY (every call below): forwarded; the tiles stay inside rows
                    // 0..m of x and j0..j1 of w.
                    unsafe {
                        for j in j0..j1 {
                            let mut i = 0;
                            while i + $ri <= m {
                                tile::<F, $ri>(w, x, i, j, out);
                                i += $ri;
                            }
                            for i in i..m {
                                tile::<F, 1>(w, x, i, j, out);
                            }
                        }
                    }
                }

                /// Outputs `(i0..i0 + RI, j)`. Block `b` goes into sum `b % U` (the last
                /// `nb % U` into sum 0), then the sums are added in order: `U` independent
                /// chains of multiply-adds, and the same additions whatever `RI` is, so a row's
                /// result does not depend on the rows computed with it.
                #[target_feature(enable = $features)]
                #[inline]
                unsafe fn tile<const F: u8, const RI: usize>(
                    w: &QuantMatrix,
                    x: &Q8Rows,
                    i0: usize,
                    j: usize,
                    out: SendPtr<f32>,
                ) {
                    const U: usize = 4;
                    let (k, n) = (w.cols, w.rows);
                    let nb = k / QK;
                    let mut acc = [[_mm256_setzero_ps(); RI]; U];
                    let mut acc_min = [[0f32; RI]; U];
                    // SAFETY: row j of w and rows i0..i0 + RI of x are in bounds (the
                    // caller's contract), and so is every block `step` reads.
                    unsafe {
                        let mut b = 0;
                        while b + U <= nb {
                            for u in 0..U {
                                step::<F, RI>(w, x, i0, j, b + u, &mut acc[u], &mut acc_min[u]);
                            }
                            b += U;
                        }
                        for b in b..nb {
                            step::<F, RI>(w, x, i0, j, b, &mut acc[0], &mut acc_min[0]);
                        }
                        for r in 0..RI {
                            let mut v = acc[0][r];
                            let mut vm = acc_min[0][r];
                            for u in 1..U {
                                v = _mm256_add_ps(v, acc[u][r]);
                                vm += acc_min[u][r];
                            }
                            let v = _mm_add_ps(
                                _mm256_castps256_ps128(v),
                                _mm256_extractf128_ps(v, 1),
                            );
                            let v = _mm_add_ps(v, _mm_movehl_ps(v, v));
                            let v = _mm_add_ss(v, _mm_movehdup_ps(v));
                            *out.get().add((i0 + r) * n + j) = _mm_cvtss_f32(v) + vm;
                        }
                    }
                }

                /// Block `b` of row `j` of w against rows `i0..i0 + RI` of x, added into
                /// `acc` (`d·dx·dot`) and `acc_min` (`m·s`).
                #[target_feature(enable = $features)]
                #[inline]
                unsafe fn step<const F: u8, const RI: usize>(
                    w: &QuantMatrix,
                    x: &Q8Rows,
                    i0: usize,
                    j: usize,
                    b: usize,
                    acc: &mut [__m256; RI],
                    acc_min: &mut [f32; RI],
                ) {
                    let k = w.cols;
                    let nb = k / QK;
                    let bb = match F {
                        0 => 18,
                        1 => 20,
                        _ => 34,
                    };
                    // SAFETY: block b of row j of w and of rows i0..i0 + RI of x are in
                    // bounds (the caller's contract).
                    unsafe {
                        let blk = w.data.as_ptr().add((j * nb + b) * bb);
                        // Scales: f16 → f32 with F16C. The 4-byte load is written in assembly
                        // only so that it stays one `vmovd`: LLVM otherwise merges the scale
                        // loads of several blocks (strided) into a gather, which is several
                        // times slower here.
                        let scales: __m128i;
                        std::arch::asm!(
                            "vmovd {s}, dword ptr [{p}]",
                            p = in(reg) blk,
                            s = out(xmm_reg) scales,
                            options(pure, readonly, nostack, preserves_flags),
                        );
                        let dm = _mm_cvtph_ps(scales);
                        let d = _mm_cvtss_f32(dm);
                        let min = match F {
                            0 => -8.0 * d,
                            1 => _mm_cvtss_f32(_mm_movehdup_ps(dm)),
                            _ => 0.0,
                        };
                        // The weights as bytes (4-bit: low nibbles are weights 0..16, high ones
                        // 16..32).
                        let wq = if F == 2 {
                            _mm256_loadu_si256(blk.add(2) as *const __m256i)
                        } else {
                            let v = _mm_loadu_si128(
                                blk.add(if F == 1 { 4 } else { 2 }) as *const __m128i
                            );
                            let low4 = _mm_set1_epi8(0x0F);
                            let lo = _mm_and_si128(v, low4);
                            let hi = _mm_and_si128(_mm_srli_epi16(v, 4), low4);
                            _mm256_set_m128i(hi, lo)
                        };
                        let wu = if F == 2 { _mm256_abs_epi8(wq) } else { wq };
                        for r in 0..RI {
                            let p = _mm256_loadu_si256(
                                x.qs.as_ptr().add((i0 + r) * k + b * QK) as *const __m256i
                            );
                            // Q8_0: |w| · (p with w's sign) = w · p, unsigned × signed.
                            let p = if F == 2 { _mm256_sign_epi8(p, wq) } else { p };
                            let dot = _mm256_cvtepi32_ps(dot(wu, p));
                            let dx = *x.d.as_ptr().add((i0 + r) * nb + b);
                            let scale = _mm256_set1_ps(d * dx);
                            acc[r] = _mm256_fmadd_ps(dot, scale, acc[r]);
                            if F != 2 {
                                acc_min[r] += min * *x.s.as_ptr().add((i0 + r) * nb + b);
                            }
                        }
                    }
                }
            }
        };
    }

    simd_kernel!(
        avx2,
        "avx2,fma,f16c",
        2,
        /// `vpmaddubsw` (products summed in pairs to i16, which saturates past 32767: never
        /// here, as 4-bit weights, or |Q8_0 weight| ≤ 128, against |p| ≤ 127 give at most
        /// 2 · 128 · 127 = 32512) then `vpmaddwd` with ones.
        #[target_feature(enable = "avx2,fma,f16c")]
        #[inline]
        fn dot(u: __m256i, s: __m256i) -> __m256i {
            _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1))
        }
    );

    simd_kernel!(
        vnni,
        "avx512f,avx512vl,avx512bw,avx512vnni,avx2,fma,f16c",
        4,
        /// `vpdpbusd`: four u8 × i8 products summed into each i32 lane.
        #[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512vnni,avx2,fma,f16c")]
        #[inline]
        fn dot(u: __m256i, s: __m256i) -> __m256i {
            _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s)
        }
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::random::Generator;

    const FORMATS: [QuantFormat; 3] = [QuantFormat::Q4_0, QuantFormat::Q4_1, QuantFormat::Q8_0];

    fn kernels() -> Vec<QuantKernel> {
        [
            QuantKernel::Scalar,
            QuantKernel::Avx2,
            QuantKernel::Avx512Vnni,
        ]
        .into_iter()
        .filter(|k| k.is_available())
        .collect()
    }

    fn put_f16(b: &mut [u8], i: usize, v: f32) {
        b[i..i + 2].copy_from_slice(&f16::from_f32(v).to_bits().to_le_bytes());
    }

    /// Random blocks: random bytes for the weights, scales `scale()` and minimums `min()`.
    fn random_matrix(
        g: &mut Generator,
        format: QuantFormat,
        rows: usize,
        cols: usize,
        mut scale: impl FnMut(&mut Generator) -> f32,
        mut min: impl FnMut(&mut Generator) -> f32,
    ) -> QuantMatrix {
        let bb = format.block_bytes();
        let mut data = vec![0u8; rows * cols / QK * bb];
        for b in data.chunks_exact_mut(bb) {
            for v in b.iter_mut() {
                *v = g.below(256) as u8;
            }
            put_f16(b, 0, scale(g));
            if format == QuantFormat::Q4_1 {
                put_f16(b, 2, min(g));
            }
        }
        QuantMatrix::from_blocks(format, rows, cols, data).unwrap()
    }

    fn normal(g: &mut Generator, n: usize) -> Vec<f32> {
        let mut v = vec![0f64; n];
        g.fill_normal(&mut v);
        v.into_iter().map(|v| v as f32).collect()
    }

    #[test]
    fn simd_kernels_equal_scalar_exactly_with_unit_scales() {
        // Scales 1 and integer minimums, activations whose blocks reach exactly ±127 (so dx =
        // 1): every partial sum is an integer below 2^24, so any order of the f32 additions
        // gives the same bits, and only the integer dot products can make a difference.
        let mut g = Generator::new(1);
        for format in FORMATS {
            for (m, k, n) in [
                (1, 32, 1),
                (3, 96, 7),
                (17, 256, 33),
                (4, 512, 19),
                (5, 64, 8),
            ] {
                let w = random_matrix(&mut g, format, n, k, |_| 1.0, |g| g.below(17) as f32 - 8.0);
                let mut x: Vec<f32> = (0..m * k).map(|_| g.below(255) as f32 - 127.0).collect();
                for blk in x.chunks_exact_mut(QK) {
                    blk[g.below(QK as u64) as usize] = if g.below(2) == 0 { 127.0 } else { -127.0 };
                }
                let xq = Q8Rows::quantize(&x, m, k).unwrap();
                assert_eq!(xq.dequantize(), x, "activations must quantise exactly here");
                let want = matmul_q8_with(&[&w], &xq, QuantKernel::Scalar, usize::MAX).unwrap();
                // The reference is exact here: check it against integer arithmetic too.
                let wd = w.dequantize();
                for i in 0..m {
                    for j in 0..n {
                        let exact: f64 = (0..k)
                            .map(|l| wd[j * k + l] as f64 * x[i * k + l] as f64)
                            .sum();
                        assert_eq!(
                            want[0][i * n + j] as f64,
                            exact,
                            "{format} scalar ({i}, {j})"
                        );
                    }
                }
                for kernel in kernels() {
                    for par_min in [usize::MAX, 0] {
                        let got = matmul_q8_with(&[&w], &xq, kernel, par_min).unwrap();
                        assert_eq!(got, want, "{format} {kernel:?} m={m} k={k} n={n}");
                    }
                }
            }
        }
    }

    /// f64 reference on the dequantised weights and the exact activations, and a bound on
    /// the kernel's error: activation rounding (at most dx/2 per value, times |w|) plus f32
    /// rounding (1e-5 of the magnitude of the terms, which cancel for the 4-bit formats).
    /// Returns that magnitude for each output.
    fn check_against_dequantised(
        w: &QuantMatrix,
        x: &[f32],
        m: usize,
        y: &[f32],
        what: &str,
    ) -> Vec<f64> {
        let (n, k) = (w.rows(), w.cols());
        let wd = w.dequantize();
        let xq = Q8Rows::quantize(x, m, k).unwrap();
        let mut worst = 0f64;
        let mut mags = vec![0f64; m * n];
        for i in 0..m {
            for j in 0..n {
                let (mut exact, mut rounding, mut mag) = (0f64, 0f64, 0f64);
                for b in 0..k / QK {
                    let blk = &w.row(j)[b * w.format().block_bytes()..];
                    let min = match w.format() {
                        QuantFormat::Q4_1 => f16_at(blk, 2).abs() as f64,
                        QuantFormat::Q4_0 => 8.0 * f16_at(blk, 0).abs() as f64,
                        QuantFormat::Q8_0 => 0.0,
                    };
                    let dx = xq.d[i * k / QK + b] as f64;
                    for l in b * QK..(b + 1) * QK {
                        let (wv, xv) = (wd[j * k + l] as f64, x[i * k + l] as f64);
                        exact += wv * xv;
                        rounding += wv.abs() * dx / 2.0;
                        mag += (wv.abs() + 2.0 * min) * (xv.abs() + dx);
                    }
                }
                let err = (y[i * n + j] as f64 - exact).abs();
                let tol = rounding * (1.0 + 1e-5) + 1e-5 * mag + 1e-30;
                assert!(
                    err <= tol,
                    "{what} ({i}, {j}): got {} want {exact} (err {err:e} > tol {tol:e})",
                    y[i * n + j]
                );
                worst = worst.max(err / tol);
                mags[i * n + j] = mag;
            }
        }
        // The bound must not be loose by orders of magnitude either (a sanity check of the
        // test itself): activation rounding errors are a sizeable fraction of it.
        assert!(
            worst > 1e-3,
            "{what}: worst error / tolerance only {worst:e}"
        );
        mags
    }

    #[test]
    fn matches_dequantised_f32_product_on_random_blocks_and_odd_shapes() {
        let mut g = Generator::new(2);
        for format in FORMATS {
            for m in [1, 3, 17] {
                for (k, n) in [(32, 1), (96, 7), (320, 33), (576, 61)] {
                    let w = random_matrix(
                        &mut g,
                        format,
                        n,
                        k,
                        |g| 0.001 + g.next_f32() * 0.05,
                        |g| -0.4 * g.next_f32(),
                    );
                    let mut x = normal(&mut g, m * k);
                    // A zero block (scale 0) and a block of very different magnitude.
                    if m * k > QK {
                        x[..QK].fill(0.0);
                    }
                    if m * k >= 3 * QK {
                        for v in &mut x[2 * QK..3 * QK] {
                            *v *= 100.0;
                        }
                    }
                    let xq = Q8Rows::quantize(&x, m, k).unwrap();
                    let want = matmul_q8_with(&[&w], &xq, QuantKernel::Scalar, usize::MAX).unwrap();
                    let mags =
                        check_against_dequantised(&w, &x, m, &want[0], &format!("{format} scalar"));
                    for kernel in kernels() {
                        for par_min in [usize::MAX, 0] {
                            let got = matmul_q8_with(&[&w], &xq, kernel, par_min).unwrap();
                            let what = format!("{format} {kernel:?} par_min {par_min} m={m}");
                            check_against_dequantised(&w, &x, m, &got[0], &what);
                            // Same integer sums, so only f32 rounding apart: a few ulps of
                            // the terms' magnitude.
                            for ((a, b), mag) in got[0].iter().zip(&want[0]).zip(&mags) {
                                assert!(
                                    ((a - b).abs() as f64) <= 2e-6 * mag,
                                    "{what}: {a} vs scalar {b} (terms' magnitude {mag})"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn each_row_is_the_same_whatever_the_other_rows() {
        // Decoding (m = 1) and a prompt (m > 1) run different tiles; a row of x gives the same
        // bits either way (the same additions in the same order), so a prompt fed token by
        // token decodes exactly as fed whole.
        let mut g = Generator::new(6);
        for format in FORMATS {
            let (m, k, n) = (11, 576, 67);
            let w = random_matrix(
                &mut g,
                format,
                n,
                k,
                |g| 0.01 + g.next_f32() * 0.01,
                |_| -0.1,
            );
            let x = normal(&mut g, m * k);
            for kernel in kernels() {
                let xq = Q8Rows::quantize(&x, m, k).unwrap();
                let all = matmul_q8_with(&[&w], &xq, kernel, usize::MAX)
                    .unwrap()
                    .remove(0);
                for i in 0..m {
                    let xi = Q8Rows::quantize(&x[i * k..(i + 1) * k], 1, k).unwrap();
                    let one = matmul_q8_with(&[&w], &xi, kernel, usize::MAX)
                        .unwrap()
                        .remove(0);
                    assert_eq!(
                        &all[i * n..(i + 1) * n],
                        &one[..],
                        "{format} {kernel:?} row {i}"
                    );
                }
            }
        }
    }

    #[test]
    fn many_equals_one_at_a_time() {
        let mut g = Generator::new(3);
        let (m, k) = (3, 128);
        let ws: Vec<QuantMatrix> = [
            (QuantFormat::Q4_1, 40),
            (QuantFormat::Q8_0, 9),
            (QuantFormat::Q4_0, 70),
        ]
        .into_iter()
        .map(|(f, n)| random_matrix(&mut g, f, n, k, |g| 0.01 + g.next_f32() * 0.01, |_| -0.1))
        .collect();
        let x = normal(&mut g, m * k);
        let refs: Vec<&QuantMatrix> = ws.iter().collect();
        let many = quant_matmul_many(&refs, &x, m).unwrap();
        for (w, y) in ws.iter().zip(&many) {
            assert_eq!(&w.matmul(&x, m).unwrap(), y);
        }
        let xq = Q8Rows::quantize(&x, m, k).unwrap();
        for kernel in kernels() {
            assert_eq!(
                matmul_q8_with(&refs, &xq, kernel, 0).unwrap(),
                matmul_q8_with(&refs, &xq, kernel, usize::MAX).unwrap()
            );
        }
    }

    #[test]
    fn quantize_round_trips_within_half_a_step() {
        let mut g = Generator::new(4);
        let (rows, cols) = (5, 96);
        let x = normal(&mut g, rows * cols);
        for format in FORMATS {
            let q = QuantMatrix::quantize(format, rows, cols, &x).unwrap();
            let y = q.dequantize();
            for (xb, yb) in x.chunks_exact(QK).zip(y.chunks_exact(QK)) {
                let (lo, hi) = xb
                    .iter()
                    .fold((f32::MAX, f32::MIN), |(a, b), &v| (a.min(v), b.max(v)));
                let amax = lo.abs().max(hi.abs());
                // Half a step, plus the f16 rounding of the stored scale (2^-11 relative,
                // times at most 127 or 15 steps) and minimum.
                let tol = match format {
                    QuantFormat::Q8_0 => 0.5 * amax / 127.0 + amax / 2048.0,
                    QuantFormat::Q4_1 => {
                        0.5 * (hi - lo) / 15.0 + (hi - lo) / 2048.0 + lo.abs() / 2048.0
                    }
                    // The extreme of the other sign maps to 16, clamped to 15: a whole step.
                    QuantFormat::Q4_0 => amax / 8.0 + amax / 2048.0,
                };
                for (a, b) in xb.iter().zip(yb) {
                    assert!(
                        (a - b).abs() <= tol * 1.0001,
                        "{format}: {a} → {b} (tol {tol})"
                    );
                }
            }
        }
    }

    #[test]
    fn select_rows_moves_whole_rows() {
        let mut g = Generator::new(5);
        let w = random_matrix(&mut g, QuantFormat::Q4_1, 6, 64, |_| 0.5, |_| -1.0);
        let s = w.select_rows(&[5, 0, 3]).unwrap();
        let (wd, sd) = (w.dequantize(), s.dequantize());
        assert_eq!(&sd[..64], &wd[5 * 64..6 * 64]);
        assert_eq!(&sd[64..128], &wd[..64]);
        assert_eq!(&sd[128..], &wd[3 * 64..4 * 64]);
        assert!(w.select_rows(&[6]).is_err());
    }

    #[test]
    fn non_finite_activations_give_nan() {
        let w = QuantMatrix::quantize(QuantFormat::Q4_1, 2, 64, &[0.25; 128]).unwrap();
        for bad in [f32::NAN, f32::INFINITY] {
            let mut x = vec![1.0f32; 64];
            x[40] = bad;
            for kernel in kernels() {
                let xq = Q8Rows::quantize(&x, 1, 64).unwrap();
                let y = matmul_q8_with(&[&w], &xq, kernel, usize::MAX).unwrap();
                assert!(
                    y[0].iter().all(|v| v.is_nan()),
                    "{bad} {kernel:?}: {:?}",
                    y[0]
                );
            }
        }
    }

    #[test]
    fn shapes_are_checked() {
        assert!(QuantMatrix::from_blocks(QuantFormat::Q8_0, 2, 48, vec![0; 68]).is_err());
        assert!(QuantMatrix::from_blocks(QuantFormat::Q8_0, 2, 32, vec![0; 67]).is_err());
        let w = QuantMatrix::from_blocks(QuantFormat::Q8_0, 2, 32, vec![0; 68]).unwrap();
        assert!(w.matmul(&[0.0; 64], 1).is_err());
        assert_eq!(w.matmul(&[0.0; 64], 2).unwrap(), vec![0.0; 4]);
    }
}
