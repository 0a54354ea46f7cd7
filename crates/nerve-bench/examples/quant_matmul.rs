//! The quantised product (`nerve_core::kernels::quant`) on SmolLM2-135M's shapes, as decoding
//! runs it: one activation row against weights that are not in cache (each timed call cycles
//! through enough copies of the matrix to pass the last-level cache, as a decoding step reads
//! 100 MB of weights). First each kernel on one thread (time per matrix and weight bandwidth),
//! then the best kernel on one thread against all with the parallel threshold forced to 1,
//! from small to large products: the crossover sets
//! `nerve_core::kernels::quant::QUANT_PAR_MIN`.
//!
//! `cargo run --release -p nerve-bench --example quant_matmul`

use std::time::Instant;

use nerve_core::kernels::quant::{
    quant_matmul_q8, set_quant_par_min, Q8Rows, QuantFormat, QuantKernel, QuantMatrix, QK,
};
use nerve_core::threading::set_num_threads;
use nerve_core::{Generator, Result};

/// Bytes of weights each timed pass streams through (more than the last-level cache).
const PASS_BYTES: usize = 96 << 20;

/// Best time in microseconds of one product with `w`, streaming through its copies (other
/// processes on the machine only ever slow a pass down, so the best pass is the figure).
fn time_us(ws: &[QuantMatrix], xq: &Q8Rows, kernel: QuantKernel) -> Result<f64> {
    let pass = || -> Result<f64> {
        let t = Instant::now();
        for w in ws {
            std::hint::black_box(quant_matmul_q8(&[w], xq, kernel)?);
        }
        Ok(t.elapsed().as_secs_f64() * 1e6 / ws.len() as f64)
    };
    pass()?;
    let mut best = f64::INFINITY;
    let start = Instant::now();
    let mut n = 0;
    while n < 5 || start.elapsed().as_secs_f64() < 0.5 {
        best = best.min(pass()?);
        n += 1;
    }
    Ok(best)
}

/// Copies of a random `[rows, cols]` matrix filling [`PASS_BYTES`], and a quantised
/// activation row.
fn setup(
    g: &mut Generator,
    format: QuantFormat,
    rows: usize,
    cols: usize,
) -> Result<(Vec<QuantMatrix>, Q8Rows)> {
    let values: Vec<f32> = (0..rows * cols).map(|_| g.next_f32() - 0.5).collect();
    let w = QuantMatrix::quantize(format, rows, cols, &values)?;
    let copies = PASS_BYTES.div_ceil(w.as_bytes().len()).max(1);
    let x: Vec<f32> = (0..cols).map(|_| g.next_f32() - 0.5).collect();
    Ok((vec![w; copies], Q8Rows::quantize(&x, 1, cols)?))
}

fn main() -> Result<()> {
    let mut g = Generator::new(0);
    let all = std::thread::available_parallelism().map_or(1, |n| n.get());
    let kernels: Vec<QuantKernel> = [
        QuantKernel::Scalar,
        QuantKernel::Avx2,
        QuantKernel::Avx512Vnni,
    ]
    .into_iter()
    .filter(|k| k.is_available())
    .collect();
    println!("one thread, m = 1, weights not in cache: us per product, GB/s of weights");
    set_num_threads(1);
    for (format, rows, cols) in [
        (QuantFormat::Q4_1, 576, 576),
        (QuantFormat::Q4_1, 1536, 576),
        (QuantFormat::Q4_1, 576, 1536),
        (QuantFormat::Q8_0, 49152, 576),
        (QuantFormat::Q4_0, 1536, 576),
    ] {
        let (ws, xq) = setup(&mut g, format, rows, cols)?;
        let mut line = format!("{format} {rows:>5}x{cols:<5}");
        for &k in &kernels {
            let us = time_us(&ws, &xq, k)?;
            let gbs = ws[0].as_bytes().len() as f64 / us / 1e3;
            line += &format!("  {k:?} {us:8.1} us {gbs:5.1} GB/s");
        }
        println!("{line}");
    }
    println!("\nbest kernel, m = 1, threshold forced to 1: us on 1 and {all} threads");
    println!(
        "{:>10} {:>10} {:>10} {:>10}",
        "blocks", "shape", "1t us", "Nt us"
    );
    set_quant_par_min(1);
    for rows in [16, 32, 64, 128, 192, 256, 384, 576, 1152, 1536, 3072] {
        let cols = 576;
        let (ws, xq) = setup(&mut g, QuantFormat::Q4_1, rows, cols)?;
        let mut t = Vec::new();
        for threads in [1, all] {
            set_num_threads(threads);
            t.push(time_us(&ws, &xq, QuantKernel::best())?);
        }
        println!(
            "{:>10} {:>10} {:>10.1} {:>10.1}",
            rows * cols / QK,
            format!("{rows}x{cols}"),
            t[0],
            t[1]
        );
    }
    Ok(())
}
