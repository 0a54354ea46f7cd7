//! A real published checkpoint: EfficientNet-Lite0 (`efficientnet-lite0-57934424.pth`,
//! 18.8 MB, a legacy-format torch.save of an OrderedDict). Not in the repository: the test
//! runs when `NERVE_EFFICIENTNET_PTH` names the file and returns early otherwise.
//!
//! The reference numbers were recorded from `torch.load(path, weights_only=True)` (torch
//! 2.x): names, shapes, dtypes, and for a few tensors the f64 sum and a position-weighted
//! sum `Σ x[i] * (i % 7 + 1)` over the row-major flattening — the weighted one changes when
//! a view's strides are misread, the plain one does not. 50 of the file's tensors are
//! permuted views (e.g. `_conv_stem.weight` has strides (1, 32, 288, 96)).

use nerve_core::DType;
use nerve_io::torch;

/// (name, shape, sum, weighted sum), from torch.load.
const REFERENCE: [(&str, &[usize], f64, f64); 5] = [
    (
        "_conv_stem.weight",
        &[32, 3, 3, 3],
        -26.811376610887237,
        -108.16233640880091,
    ),
    (
        "_blocks.0._depthwise_conv.weight",
        &[32, 1, 3, 3],
        5.221442859619856,
        40.171540550887585,
    ),
    (
        "_blocks.15._project_conv.weight",
        &[320, 1152, 1, 1],
        39.96609939538757,
        124.12893240978883,
    ),
    (
        "_fc.weight",
        &[1000, 1280],
        -470.63256730128705,
        -1848.465090003945,
    ),
    ("_fc.bias", &[1000], -0.04981697298353538, 3.061945061046572),
];

#[test]
fn efficientnet_lite0_loads_with_torchs_names_shapes_and_values() {
    let Some(path) = std::env::var_os("NERVE_EFFICIENTNET_PTH") else {
        eprintln!("NERVE_EFFICIENTNET_PTH not set: skipping the EfficientNet-Lite0 check");
        return;
    };
    let sd = torch::load(&path).unwrap();
    assert_eq!(sd.len(), 296, "tensor count");
    let names: Vec<&str> = sd.names().collect();
    assert_eq!(
        (names[0], names[1], names[295]),
        ("_conv_stem.weight", "_bn0.weight", "_fc.bias")
    );
    let (mut floats, mut ints) = (0, 0);
    for (name, t) in sd.iter() {
        match t.dtype() {
            DType::F32 => floats += 1,
            DType::I64 => {
                ints += 1;
                assert!(name.ends_with("num_batches_tracked"), "{name}");
            }
            d => panic!("{name}: unexpected dtype {d:?}"),
        }
    }
    assert_eq!((floats, ints), (247, 49));
    let numel: usize = sd.iter().map(|(_, t)| t.numel()).sum();
    assert_eq!(numel, 4_694_073);

    // Tolerance: 1e-9 relative; the sums are of the same f32 values in f64, only the
    // summation order differs from torch's.
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * b.abs().max(1.0);
    for (name, shape, sum, weighted) in REFERENCE {
        let t = sd.get(name).unwrap();
        assert_eq!(t.dims(), shape, "{name}");
        let v = t.to_f64_vec();
        let s: f64 = v.iter().sum();
        let w: f64 = v
            .iter()
            .enumerate()
            .map(|(i, x)| x * ((i % 7) as f64 + 1.0))
            .sum();
        assert!(close(s, sum), "{name}: sum {s} vs torch {sum}");
        assert!(
            close(w, weighted),
            "{name}: weighted sum {w} vs torch {weighted}"
        );
    }
    let stem = sd
        .get("_conv_stem.weight")
        .unwrap()
        .to_vec::<f32>()
        .unwrap();
    // stem[1, 2, 0, 1] in row-major order.
    assert_eq!(stem[27 + 2 * 9 + 1] as f64, -0.08920226991176605);
}
