use nerve_core::{Result, Tensor};
use nerve_nn::{loss, Adam, Module, ModuleExt, Optimizer};
fn time(name: &str, mut f: impl FnMut() -> Result<()>) -> Result<()> {
    for _ in 0..5 { f()?; }
    let mut best = f64::MAX;
    for _ in 0..40 { let t = std::time::Instant::now(); f()?; best = best.min(t.elapsed().as_secs_f64()); }
    println!("{name:<30} {:.3} ms", best * 1e3);
    Ok(())
}
fn main() -> Result<()> {
    let m = nerve_models::cnn(&[1, 28, 28], 10)?;
    let x = Tensor::randn([64, 1, 28, 28]);
    let y = Tensor::from_vec((0..64i64).map(|i| i % 10).collect::<Vec<_>>(), [64])?;
    let mut opt = Adam::adamw(m.parameters(), 1e-3, 0.01);
    time("forward no_grad", || { nerve_core::no_grad(|| m.forward(&x))?; Ok(()) })?;
    time("forward (graph)", || { m.forward(&x)?; Ok(()) })?;
    time("forward+loss+backward", || { let l = loss::cross_entropy(&m.forward(&x)?, &y, &Default::default())?; l.backward()?; m.zero_grad(); Ok(()) })?;
    time("full step", || { let l = loss::cross_entropy(&m.forward(&x)?, &y, &Default::default())?; l.backward()?; opt.step()?; opt.zero_grad(); Ok(()) })?;
    // layer by layer forward
    let mut h = x.clone();
    for (name, layer) in m.children() {
        let hin = h.clone();
        time(&format!("  fwd {name} {}", layer.describe()), || { nerve_core::no_grad(|| layer.forward(&hin))?; Ok(()) })?;
        h = nerve_core::no_grad(|| layer.forward(&hin))?;
    }
    Ok(())
}
