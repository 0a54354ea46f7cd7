//! Times forward and backward of the `cnn` workload's two convolutions and its max-pool
//! (batch 64, MNIST-sized, f32): `cargo run --release -p nerve-bench --example cnn_convs`.

use nerve_core::{Generator, Result, Tensor};

fn main() -> Result<()> {
    let mut g = Generator::new(7);
    let x = Tensor::randn_with([64, 1, 28, 28], &mut g);
    let w1 = Tensor::randn_with([32, 1, 3, 3], &mut g).requires_grad_(true);
    let b1 = Tensor::randn_with([32], &mut g).requires_grad_(true);
    let x2 = Tensor::randn_with([64, 32, 14, 14], &mut g).requires_grad_(true);
    let w2 = Tensor::randn_with([64, 32, 3, 3], &mut g).requires_grad_(true);
    let b2 = Tensor::randn_with([64], &mut g).requires_grad_(true);
    let p = Tensor::randn_with([64, 32, 28, 28], &mut g).requires_grad_(true);
    let ones1 = Tensor::ones([64, 32, 28, 28]);
    let ones2 = Tensor::ones([64, 64, 14, 14]);
    let onesp = Tensor::ones([64, 32, 14, 14]);
    let time = |name: &str, f: &dyn Fn() -> Result<()>| -> Result<()> {
        f()?;
        let reps = 20;
        let t = std::time::Instant::now();
        for _ in 0..reps {
            f()?;
        }
        let ms = t.elapsed().as_secs_f64() * 1e3 / reps as f64;
        println!("{name:<40} {ms:8.3} ms");
        Ok(())
    };
    println!("threads: {}", nerve_core::num_threads());
    time("conv1 forward (64x1x28x28 -> 32)", &|| {
        nerve_core::no_grad(|| x.conv2d(&w1, Some(&b1), (1, 1), (1, 1), (1, 1), 1))?;
        Ok(())
    })?;
    time("conv1 forward+backward (w, b)", &|| {
        let y = x.conv2d(&w1, Some(&b1), (1, 1), (1, 1), (1, 1), 1)?;
        y.backward_with(&ones1)
    })?;
    time("conv2 forward (64x32x14x14 -> 64)", &|| {
        nerve_core::no_grad(|| x2.conv2d(&w2, Some(&b2), (1, 1), (1, 1), (1, 1), 1))?;
        Ok(())
    })?;
    time("conv2 forward+backward (x, w, b)", &|| {
        let y = x2.conv2d(&w2, Some(&b2), (1, 1), (1, 1), (1, 1), 1)?;
        y.backward_with(&ones2)
    })?;
    time("maxpool 2x2 forward (28->14)", &|| {
        nerve_core::no_grad(|| p.max_pool2d((2, 2), (2, 2), (0, 0), (1, 1), false))?;
        Ok(())
    })?;
    time("maxpool 2x2 forward+backward (28->14)", &|| {
        let y = p.max_pool2d((2, 2), (2, 2), (0, 0), (1, 1), false)?;
        y.backward_with(&onesp)
    })?;
    Ok(())
}
