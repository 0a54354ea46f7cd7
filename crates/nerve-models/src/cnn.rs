//! The small convolutional network of the `cnn` workload.

use nerve_core::{Error, Result};
use nerve_nn::{Conv2d, ConvOptions, Flatten, Linear, MaxPool2d, ReLU, Sequential};

/// conv 3×3 `channels→32` (padding 1), ReLU, max-pool 2; conv 3×3 `32→64`, ReLU, max-pool 2;
/// flatten, `64·(h/4)·(w/4) → 128`, ReLU, `128 → classes`. On 1×28×28 images this is the
/// `cnn` workload (flatten size 3136).
///
/// In PyTorch the same `nn.Sequential` of 10 modules: parameters `0.*`, `3.*`, `7.*`, `9.*`.
pub fn cnn(sample_dims: &[usize], classes: usize) -> Result<Sequential> {
    let &[c, h, w] = sample_dims else {
        return Err(Error::invalid(
            "cnn",
            format!("needs image samples [channels, height, width], got {sample_dims:?}"),
        ));
    };
    if h < 4 || w < 4 {
        return Err(Error::invalid(
            "cnn",
            format!("needs images of at least 4x4, got {h}x{w}"),
        ));
    }
    let params =
        crate::parameters_at_least(&[&[64, h / 4, w / 4, 128], &[128, classes], &[c, 32, 9]]);
    crate::check_size("cnn", params, "the image size, channels and classes")?;
    let pad1 = ConvOptions::default().padding(1);
    Ok(Sequential::new()
        .add(Conv2d::new(c, 32, 3, pad1)?)
        .add(ReLU)
        .add(MaxPool2d::new(2))
        .add(Conv2d::new(32, 64, 3, pad1)?)
        .add(ReLU)
        .add(MaxPool2d::new(2))
        .add(Flatten::default())
        .add(Linear::new(64 * (h / 4) * (w / 4), 128, true)?)
        .add(ReLU)
        .add(Linear::new(128, classes, true)?))
}
