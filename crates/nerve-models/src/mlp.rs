//! Multi-layer perceptron.

use nerve_core::Result;
use nerve_nn::{Flatten, Linear, ReLU, Sequential};

/// `Flatten → Linear → ReLU → … → Linear`: `in_features`, then each of `hidden`, then
/// `classes`. The `mlp` workload and `nerve train --model mlp` use hidden `[512, 512]`.
///
/// In PyTorch: `nn.Sequential(nn.Flatten(), nn.Linear(i, h0), nn.ReLU(), …, nn.Linear(h, c))`,
/// so parameters are named `1.weight`, `1.bias`, `3.weight`, …
pub fn mlp(in_features: usize, hidden: &[usize], classes: usize) -> Result<Sequential> {
    let mut terms = Vec::new();
    let mut width = in_features;
    for &h in hidden.iter().chain([&classes]) {
        terms.push([width, h]);
        width = h;
    }
    let terms: Vec<&[usize]> = terms.iter().map(|t| t.as_slice()).collect();
    crate::check_size(
        "mlp",
        crate::parameters_at_least(&terms),
        "in_features, hidden and classes",
    )?;
    let mut m = Sequential::new().add(Flatten::default());
    let mut width = in_features;
    for &h in hidden {
        m = m.add(Linear::new(width, h, true)?).add(ReLU);
        width = h;
    }
    Ok(m.add(Linear::new(width, classes, true)?))
}
