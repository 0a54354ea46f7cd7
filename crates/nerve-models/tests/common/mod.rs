//! Helpers shared by the zoo's PyTorch parity tests.

use std::collections::HashMap;

use nerve_core::Tensor;

/// `x[i] = scale · sin(0.37 i + seed)` as f32, shaped `dims` (mirrors
/// `tools/torch_nn_fixtures.py`).
#[allow(dead_code)]
pub fn formula(dims: &[usize], seed: f64, scale: f64) -> Tensor {
    let n: usize = dims.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|i| (scale * (0.37 * i as f64 + seed).sin()) as f32)
        .collect();
    Tensor::from_vec(v, dims).unwrap()
}

/// PyTorch's results, written by `tools/torch_nn_fixtures.py`.
#[allow(dead_code)]
pub fn fixtures() -> HashMap<String, Tensor> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../nerve-nn/tests/fixtures/nn.safetensors"
    );
    nerve_nn::checkpoint::load_safetensors(path)
        .expect("fixture (run tools/torch_nn_fixtures.py)")
        .0
}

/// Element-wise `|a − b| ≤ tol · (1 + |b|)`, same shapes.
#[allow(dead_code)]
pub fn close(what: &str, a: &Tensor, b: &Tensor, tol: f64) {
    assert_eq!(a.dims(), b.dims(), "{what}");
    for (i, (x, y)) in a.to_f64_vec().iter().zip(b.to_f64_vec()).enumerate() {
        assert!(
            (x - y).abs() <= tol * (1.0 + y.abs()),
            "{what} [{i}]: {x} vs {y}"
        );
    }
}
