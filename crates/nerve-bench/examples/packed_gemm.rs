//! GFLOP/s of one thread multiplying a small `A` (32 rows: an LSTM step) by a right-hand
//! matrix packed once ([`PackedB`]), the shapes of the `lstm` workload's recurrence:
//! `cargo run --release -p nerve-bench --example packed_gemm`.

use nerve_core::kernels::gemm::PackedB;

fn main() {
    for (m, k, n) in [
        (32, 256, 1024),
        (32, 1024, 256),
        (32, 256, 512),
        (32, 1024, 128),
    ] {
        let a: Vec<f32> = (0..m * k).map(|i| (i % 7) as f32 * 0.1).collect();
        let packed = PackedB::from_fn(m, k, n, |p, j| ((p + j) % 5) as f32 * 0.1);
        let mut c = vec![0f32; m * n];
        let reps = 2000;
        let mut best = f64::INFINITY;
        for _ in 0..5 {
            let t = std::time::Instant::now();
            for _ in 0..reps {
                // SAFETY: A is m×k and C m×n, both contiguous and owned here.
                unsafe {
                    packed.mul(
                        m,
                        a.as_ptr(),
                        k as isize,
                        1,
                        c.as_mut_ptr(),
                        n as isize,
                        std::slice::from_ref(&(0..n)),
                    )
                };
            }
            best = best.min(t.elapsed().as_secs_f64() / reps as f64);
        }
        let gflops = 2.0 * (m * k * n) as f64 / best / 1e9;
        println!("{m}x{k}x{n}: {:7.2} us  {gflops:6.1} GFLOP/s", best * 1e6);
    }
}
