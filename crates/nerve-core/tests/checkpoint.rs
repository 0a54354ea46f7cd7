//! Gradient checkpointing gives the gradients of the plain computation, dropout included.

use nerve_core::{checkpoint, manual_seed, no_grad, Result, Tensor};

/// `tanh(dropout(x W + b)) W2` with the tensors' gradients after `backward`.
fn block(x: &Tensor, w: &Tensor, b: &Tensor, w2: &Tensor) -> Result<Tensor> {
    x.matmul(w)?.add(b)?.dropout(0.3, true)?.tanh()?.matmul(w2)
}

fn grads(use_checkpoint: bool, x_requires_grad: bool) -> Result<Vec<Vec<f32>>> {
    manual_seed(5);
    let x = Tensor::randn([4, 6]).requires_grad_(x_requires_grad);
    let w = Tensor::randn([6, 8]).requires_grad_(true);
    let b = Tensor::randn([8]).requires_grad_(true);
    let w2 = Tensor::randn([8, 3]).requires_grad_(true);
    let y = if use_checkpoint {
        let (w, b, w2) = (w.clone(), b.clone(), w2.clone());
        let params = [w.clone(), b.clone(), w2.clone()];
        checkpoint(move |x| block(x, &w, &b, &w2), &x, &params)?
    } else {
        block(&x, &w, &b, &w2)?
    };
    // Random numbers drawn between forward and backward must not change the recomputation.
    let _ = Tensor::randn([10]);
    y.square()?.sum()?.backward()?;
    let mut out = Vec::new();
    for t in [&x, &w, &b, &w2] {
        out.push(t.grad().map_or(Vec::new(), |g| g.to_vec::<f32>().unwrap()));
    }
    Ok(out)
}

#[test]
fn checkpoint_matches_plain_backward() -> Result<()> {
    for x_grad in [true, false] {
        let plain = grads(false, x_grad)?;
        let ckpt = grads(true, x_grad)?;
        assert_eq!(plain, ckpt, "x requires grad: {x_grad}");
        assert!(plain[1].iter().any(|v| *v != 0.0));
        assert_eq!(plain[0].is_empty(), !x_grad);
    }
    Ok(())
}

#[test]
fn checkpoint_without_gradients_is_plain() -> Result<()> {
    // No random numbers here: the generator is process-wide and the other test, running on
    // another thread, replays it.
    let x = Tensor::from_vec(vec![1.0f32, -2.0, 3.5, 0.25, 4.0, -1.5], [2, 3])?;
    let y = no_grad(|| checkpoint(|x| x.mul_scalar(2.0), &x, &[]))?;
    assert!(!y.requires_grad());
    assert_eq!(y.to_vec::<f32>()?, x.mul_scalar(2.0)?.to_vec::<f32>()?);
    Ok(())
}
