//! The machine's f32 fused multiply-add peak, one thread and every thread at once, and the
//! shortest `lstm` training step its GEMMs alone allow at that peak:
//! `cargo run --release -p nerve-bench --example fma_peak`.

use nerve_core::kernels::peak::fma_gflops;

/// GEMM FLOP of one `lstm` training step (batch 32, sequence 64, embedding 64, hidden 256,
/// vocab 65): forward input projection, recurrent products and head; backward the head's two
/// products, the recurrent `dh` products, `dW_hh`, `dW_ih` and `dx`.
fn lstm_step_flop() -> f64 {
    let (b, t, e, h, v) = (32.0, 64.0, 64.0, 256.0, 65.0);
    let tokens = b * t;
    let proj = 2.0 * tokens * e * 4.0 * h;
    let recurrent = 2.0 * tokens * h * 4.0 * h;
    let head = 2.0 * tokens * h * v;
    // Forward: proj + recurrent + head; backward: 2 head, dh + dW_hh, dW_ih + dx.
    3.0 * (proj + recurrent + head)
}

fn main() {
    let threads = nerve_core::num_threads();
    let one = fma_gflops(1, 1.0);
    let all = fma_gflops(threads, 1.0);
    println!("f32 FMA peak: {one:.1} GFLOP/s on 1 thread, {all:.1} GFLOP/s on {threads} threads");
    let flop = lstm_step_flop();
    println!(
        "lstm step: {:.3} GFLOP of GEMMs, at least {:.2} ms at the {threads}-thread peak",
        flop / 1e9,
        flop / (all * 1e9) * 1e3
    );
}
