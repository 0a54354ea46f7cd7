//! Times the pointwise activations and the normalisation layers forward (no grad) and
//! forward + backward (fastest of `REPS` calls, default 20), f32, at the sizes of the U-Net / GPT workloads:
//! `cargo run --release -p nerve-bench --example norm_act` (`ONLY=GroupNorm`: the rows whose
//! name contains that).

use nerve_core::{Generator, Result, Tensor};
use nerve_nn::{batch_norm2d, GroupNorm, LayerNorm, Module, RmsNorm};

fn main() -> Result<()> {
    let mut g = Generator::new(7);
    let img = Tensor::randn_with([64, 32, 28, 28], &mut g).requires_grad_(true);
    let img2 = Tensor::randn_with([64, 32, 28, 28], &mut g);
    let seq = Tensor::randn_with([16, 128, 128], &mut g).requires_grad_(true);
    let ones_img = Tensor::ones([64, 32, 28, 28]);
    let ones_seq = Tensor::ones([16, 128, 128]);
    let reps: usize = std::env::var("REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    // The fastest of `reps` calls: the machine is shared, and the minimum is the figure
    // least disturbed by other processes.
    let time = |f: &dyn Fn() -> Result<()>| -> Result<f64> {
        f()?;
        let mut best = f64::INFINITY;
        for _ in 0..reps {
            let t = std::time::Instant::now();
            f()?;
            best = best.min(t.elapsed().as_secs_f64() * 1e3);
        }
        Ok(best)
    };
    // Gradients are cleared after each backward, so no step pays for accumulating them.
    let only = std::env::var("ONLY").unwrap_or_default();
    let row = |name: &str, x: &Tensor, ones: &Tensor, f: &dyn Fn(&Tensor) -> Result<Tensor>| {
        if !name.contains(only.as_str()) {
            return Ok(());
        }
        let fwd = time(&|| nerve_core::no_grad(|| f(x)).map(drop))?;
        let both = time(&|| {
            f(x)?.backward_with(ones)?;
            x.zero_grad();
            Ok(())
        })?;
        println!(
            "{name:<36} {fwd:8.3} ms  {both:8.3} ms  {:8.3} ms",
            both - fwd
        );
        Result::Ok(())
    };
    println!("threads: {}", nerve_core::num_threads());
    println!(
        "{:<36} {:>11}  {:>11}  {:>11}",
        "", "forward", "fwd+bwd", "bwd"
    );
    row("add [64,32,28,28]", &img, &ones_img, &|x| x.add(&img2))?;
    row("silu [64,32,28,28]", &img, &ones_img, &|x| x.silu())?;
    row("gelu [64,32,28,28]", &img, &ones_img, &|x| x.gelu())?;
    row("gelu_tanh [64,32,28,28]", &img, &ones_img, &|x| {
        x.gelu_tanh()
    })?;
    row("sigmoid [64,32,28,28]", &img, &ones_img, &|x| x.sigmoid())?;
    row("tanh [64,32,28,28]", &img, &ones_img, &|x| x.tanh())?;
    row("relu [64,32,28,28]", &img, &ones_img, &|x| x.relu())?;
    row("leaky_relu [64,32,28,28]", &img, &ones_img, &|x| {
        x.leaky_relu(0.01)
    })?;
    let gn = GroupNorm::new(8, 32)?;
    row("GroupNorm(8,32) [64,32,28,28]", &img, &ones_img, &|x| {
        gn.forward(x)
    })?;
    let bn = batch_norm2d(32);
    row(
        "BatchNorm2d(32) train [64,32,28,28]",
        &img,
        &ones_img,
        &|x| bn.forward(x),
    )?;
    let ln = LayerNorm::new(&[128]);
    row("LayerNorm(128) [16,128,128]", &seq, &ones_seq, &|x| {
        ln.forward(x)
    })?;
    let rms = RmsNorm::new(&[128], 1e-6);
    row("RMSNorm(128) [16,128,128]", &seq, &ones_seq, &|x| {
        rms.forward(x)
    })?;
    row("softmax(-1) [16,128,128]", &seq, &ones_seq, &|x| {
        x.softmax(-1)
    })?;
    Ok(())
}
