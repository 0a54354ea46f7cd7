use nerve_core::{Generator, Result, Tensor};
fn main() -> Result<()> {
    let mut g = Generator::new(7);
    let x2 = Tensor::randn_with([64, 32, 14, 14], &mut g);
    let w2 = Tensor::randn_with([64, 32, 3, 3], &mut g);
    let b2 = Tensor::randn_with([64], &mut g);
    for _ in 0..10 { nerve_core::no_grad(|| x2.conv2d(&w2, Some(&b2), (1, 1), (1, 1), (1, 1), 1))?; }
    let mut best = f64::MAX;
    let t0 = std::time::Instant::now();
    for _ in 0..300 {
        let t = std::time::Instant::now();
        std::hint::black_box(nerve_core::no_grad(|| x2.conv2d(&w2, Some(&b2), (1, 1), (1, 1), (1, 1), 1))?);
        best = best.min(t.elapsed().as_secs_f64());
    }
    println!("best {:.3} ms mean {:.3} ms", best * 1e3, t0.elapsed().as_secs_f64() * 1e3 / 300.0);
    Ok(())
}
