//! EfficientNet-Lite0 against the reference `efficientnet_lite_pytorch` (fixtures from
//! `tools/torch_efficientnet_fixtures.py`).
//!
//! Without the checkpoint: the `state_dict` names, shapes and order and the parameter names
//! equal the reference's; a model holding formula weights gives PyTorch's logits within
//! 1e-4 (relative to the largest logit) on a batch of two 64×64 inputs and on an odd-sized
//! 57×43 input (TensorFlow "SAME" padding on both); a checkpoint with a missing, extra or
//! mis-shaped tensor is refused, naming it; the image resize equals PIL's bilinear resize
//! (torchvision's for PIL images) bit for bit.
//!
//! With the 18 MB checkpoint (`NERVE_EFFICIENTNET_PTH` names
//! `efficientnet-lite0-57934424.pth`; `nerve data get efficientnet-lite0` fetches it): the
//! real logits on the 64×64 formula input within 1e-3 relative. With the photos as well
//! (`NERVE_SKLEARN_IMAGES` names the folder holding scikit-learn's `china.jpg` and
//! `flower.jpg`): the preprocessed tensor within 4 pixel levels (4/128 after normalisation) of
//! PyTorch's at every 16th pixel and its channel means within 2e-3, and the same top-5 classes
//! in the same order with probabilities within 0.02. The resize is PIL's to the bit, so the
//! difference is the JPEG decoders' (zune-jpeg against libjpeg-turbo: 98.8% of the decoded
//! bytes equal, the rest off by 1–3 levels; measured: sampled pixels off by at most 1 level,
//! probabilities by at most 0.002). Each of these says so and passes when its variable is
//! unset.

use std::collections::HashMap;
use std::sync::OnceLock;

use nerve_core::{no_grad, Tensor};
use nerve_data::vision::RgbImage;
use nerve_models::efficientnet::{imagenet_classes, top_k, EfficientNet, EfficientNetConfig};
use nerve_nn::{Module, ModuleExt};

fn fixture_dir() -> &'static str {
    concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures")
}

fn reference() -> &'static (HashMap<String, Tensor>, serde_json::Value) {
    static REF: OnceLock<(HashMap<String, Tensor>, serde_json::Value)> = OnceLock::new();
    REF.get_or_init(|| {
        let tensors = nerve_nn::checkpoint::load_safetensors(format!(
            "{}/efficientnet.safetensors",
            fixture_dir()
        ))
        .expect("fixture (run tools/torch_efficientnet_fixtures.py)")
        .0;
        let text = std::fs::read_to_string(format!("{}/efficientnet.json", fixture_dir()))
            .expect("fixture (run tools/torch_efficientnet_fixtures.py)");
        (tensors, serde_json::from_str(&text).unwrap())
    })
}

/// The reference's `state_dict` names and shapes, in order.
fn reference_state_dict() -> Vec<(String, Vec<usize>)> {
    reference().1["state_dict"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let shape = e[1]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap() as usize);
            (e[0].as_str().unwrap().to_string(), shape.collect())
        })
        .collect()
}

// ----------------------------------------------------------- formula values (see the script)

fn fnv1a32(s: &str) -> u32 {
    s.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ b as u32).wrapping_mul(0x0100_0193)
    })
}

fn lowbias32(mut x: u32) -> u32 {
    x ^= x >> 16;
    x = x.wrapping_mul(0x7feb_352d);
    x ^= x >> 15;
    x = x.wrapping_mul(0x846c_a68b);
    x ^ (x >> 16)
}

/// The value the fixture script gives element `i` of the tensor `name` shaped `shape`.
fn formula_value(name: &str, shape: &[usize], u: f64) -> f64 {
    let leaf = name.rsplit('.').next().unwrap();
    if name == "input" {
        2.0 * u - 1.0
    } else if name == "_fc.weight" {
        (2.0 * u - 1.0) * (3.0f64 / 1280.0).sqrt()
    } else if name == "_fc.bias" {
        0.2 * (u - 0.5)
    } else if shape.len() == 4 {
        let fan_in = (shape[1] * shape[2] * shape[3]) as f64;
        (2.0 * u - 1.0) * (6.0 / fan_in).sqrt()
    } else if leaf == "weight" || leaf == "running_var" {
        0.5 + u
    } else {
        0.2 * (u - 0.5)
    }
}

fn formula_tensor(name: &str, shape: &[usize]) -> Tensor {
    let h = fnv1a32(name);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|i| {
            let u = lowbias32(i as u32 ^ h) as f64 / 4_294_967_296.0;
            formula_value(name, shape, u) as f32
        })
        .collect();
    Tensor::from_vec(v, shape).unwrap()
}

/// Formula tensors for every reference name (counters are 0).
fn formula_weights() -> HashMap<String, Tensor> {
    reference_state_dict()
        .into_iter()
        .map(|(name, shape)| {
            let t = if name.ends_with("num_batches_tracked") {
                Tensor::zeros_with(shape.clone(), nerve_core::DType::I64)
            } else {
                formula_tensor(&name, &shape)
            };
            (name, t)
        })
        .collect()
}

/// `max |a − b| / max(1, max |b|)`, same shapes.
fn rel_err(what: &str, a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "{what}");
    let (a, b) = (a.to_f64_vec(), b.to_f64_vec());
    let worst = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max);
    let scale = b.iter().map(|y| y.abs()).fold(1.0, f64::max);
    worst / scale
}

// --------------------------------------------------------------------- without the checkpoint

#[test]
fn state_dict_names_shapes_and_order_match_the_reference() {
    let model = EfficientNet::new(EfficientNetConfig::default()).unwrap();
    let ours: Vec<(String, Vec<usize>)> = model
        .state_dict()
        .into_iter()
        .map(|(n, t)| (n, t.dims().to_vec()))
        .collect();
    let theirs = reference_state_dict();
    assert_eq!(ours.len(), 296);
    assert_eq!(ours, theirs);
    let params: Vec<String> = model
        .named_parameters()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    let want: Vec<String> = reference().1["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert_eq!(params, want);
    assert_eq!(model.num_parameters(), 4_652_008);
}

#[test]
fn formula_weights_give_pytorchs_logits() {
    let model =
        EfficientNet::from_tensors(EfficientNetConfig::default(), formula_weights()).unwrap();
    let (fx, _) = reference();
    // A batch of two 64×64 inputs: every stage's size is even, as at 224.
    let x = formula_tensor("input", &[2, 3, 64, 64]);
    let y = no_grad(|| model.forward(&x)).unwrap();
    let err = rel_err("formula_b2_64", &y, &fx["formula_b2_64"]);
    eprintln!("formula weights, [2, 3, 64, 64]: relative error {err:.2e}");
    assert!(err <= 1e-4, "relative error {err}");
    // Odd sizes: "SAME" padding split (1, 2), (2, 2), (0, 1) … as TensorFlow does.
    let x = formula_tensor("input", &[1, 3, 57, 43]);
    let y = no_grad(|| model.forward(&x)).unwrap();
    let err = rel_err("formula_b1_57x43", &y, &fx["formula_b1_57x43"]);
    eprintln!("formula weights, [1, 3, 57, 43]: relative error {err:.2e}");
    assert!(err <= 1e-4, "relative error {err}");
}

#[test]
fn a_bad_checkpoint_is_refused_naming_the_tensor() {
    let cfg = EfficientNetConfig::default;
    let mut w = formula_weights();
    w.remove("_blocks.7._bn1.running_var");
    let err = EfficientNet::from_tensors(cfg(), w)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("_blocks.7._bn1.running_var"), "{err}");

    let mut w = formula_weights();
    w.insert(
        "_blocks.0._se_reduce.weight".into(),
        Tensor::zeros([8, 32, 1, 1]),
    );
    let err = EfficientNet::from_tensors(cfg(), w)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("unexpected") && err.contains("_blocks.0._se_reduce.weight"),
        "{err}"
    );

    let mut w = formula_weights();
    w.insert("_fc.weight".into(), Tensor::zeros([10, 1280]));
    let err = EfficientNet::from_tensors(cfg(), w)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("_fc.weight") && err.contains("[1000, 1280]"),
        "{err}"
    );

    // Old checkpoints without the BatchNorm counters load.
    let w: HashMap<_, _> = formula_weights()
        .into_iter()
        .filter(|(n, _)| !n.ends_with("num_batches_tracked"))
        .collect();
    assert!(EfficientNet::from_tensors(cfg(), w).is_ok());

    // A file that is not a checkpoint: the error names it.
    let dir = std::env::temp_dir().join(format!("nerve-effnet-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("not-a-checkpoint.pth");
    std::fs::write(&bad, b"hello").unwrap();
    let err = EfficientNet::load(&bad).err().unwrap().to_string();
    assert!(err.contains("not-a-checkpoint.pth"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn input_that_is_not_rgb_images_is_refused() {
    let model =
        EfficientNet::from_tensors(EfficientNetConfig::default(), formula_weights()).unwrap();
    let err = model
        .forward(&Tensor::zeros([1, 1, 32, 32]))
        .unwrap_err()
        .to_string();
    assert!(err.contains("[1, 1, 32, 32]"), "{err}");
}

#[test]
fn larger_lite_variants_have_the_reference_sizes() {
    // Parameter counts of the reference's `EfficientNet.from_name('efficientnet-liteN')`.
    for (n, params) in [
        (1, 5_416_680),
        (2, 6_092_072),
        (3, 8_197_096),
        (4, 13_006_568),
    ] {
        let m = EfficientNet::new(EfficientNetConfig::lite(n).unwrap()).unwrap();
        assert_eq!(m.num_parameters(), params, "Lite{n}");
    }
    assert!(EfficientNetConfig::lite(5).is_err());
}

/// The 61×37 noise image of the fixture script (bytes from the formula hash, name "image").
fn formula_image(width: usize, height: usize) -> RgbImage {
    let h = fnv1a32("image");
    let pixels = (0..width * height * 3)
        .map(|i| (lowbias32(i as u32 ^ h) & 0xff) as u8)
        .collect();
    RgbImage::new(width, height, pixels).unwrap()
}

/// Bytes weighted by `i % 251 + 1`, as the fixture script sums them.
fn checksum(img: &RgbImage) -> u64 {
    img.pixels
        .iter()
        .enumerate()
        .map(|(i, &v)| v as u64 * (i as u64 % 251 + 1))
        .sum()
}

#[test]
fn resize_is_pils_bilinear_bit_for_bit() {
    let img = formula_image(61, 37);
    for case in reference().1["resize"].as_array().unwrap() {
        let (w, h) = (
            case["width"].as_u64().unwrap() as usize,
            case["height"].as_u64().unwrap() as usize,
        );
        let out = match case.get("short_side") {
            Some(s) => {
                let c = case["crop"].as_u64().unwrap() as usize;
                let r = img.resize_short_side(s.as_u64().unwrap() as usize).unwrap();
                r.center_crop(c, c).unwrap()
            }
            None => img.resize(w, h).unwrap(),
        };
        assert_eq!((out.width, out.height), (w, h), "{case}");
        assert_eq!(checksum(&out), case["checksum"].as_u64().unwrap(), "{case}");
    }
}

// ----------------------------------------------------------------------- with the checkpoint

fn real_model() -> Option<&'static EfficientNet> {
    static MODEL: OnceLock<Option<EfficientNet>> = OnceLock::new();
    MODEL
        .get_or_init(|| {
            let Ok(path) = std::env::var("NERVE_EFFICIENTNET_PTH") else {
                eprintln!("NERVE_EFFICIENTNET_PTH is not set: EfficientNet-Lite0 checkpoint tests skipped");
                return None;
            };
            Some(EfficientNet::load(&path).expect("load EfficientNet-Lite0"))
        })
        .as_ref()
}

#[test]
fn real_weights_give_pytorchs_logits() {
    let Some(model) = real_model() else { return };
    let x = formula_tensor("input", &[1, 3, 64, 64]);
    let y = no_grad(|| model.forward(&x)).unwrap();
    let err = rel_err("real_64", &y, &reference().0["real_64"]);
    eprintln!("EfficientNet-Lite0, [1, 3, 64, 64]: relative error {err:.2e}");
    assert!(err <= 1e-3, "relative error {err}");
}

#[test]
fn photos_preprocess_and_classify_as_pytorch() {
    let Some(model) = real_model() else { return };
    let Ok(dir) = std::env::var("NERVE_SKLEARN_IMAGES") else {
        eprintln!("NERVE_SKLEARN_IMAGES is not set: photo tests skipped");
        return;
    };
    let (fx, meta) = reference();
    let pre = model.config().preprocess();
    for photo in ["china.jpg", "flower.jpg"] {
        let want = &meta["photos"][photo];
        let path = std::path::Path::new(&dir).join(photo);
        let img = nerve_data::vision::load_rgb(&path).unwrap();
        assert_eq!(
            (img.width as u64, img.height as u64),
            (
                want["width"].as_u64().unwrap(),
                want["height"].as_u64().unwrap()
            ),
            "{photo}: size"
        );
        let rgb_sum: u64 = img.pixels.iter().map(|&p| p as u64).sum();
        let x = pre.apply(&img).unwrap();
        assert_eq!(x.dims(), &[3, 224, 224]);

        // The tensor at every 16th pixel, and its mean per channel.
        let stem = photo.trim_end_matches(".jpg");
        let sample = x
            .narrow(1, 8, 209)
            .unwrap()
            .narrow(2, 8, 209)
            .unwrap()
            .to_f64_vec();
        let sample: Vec<f64> = (0..3 * 209 * 209)
            .filter(|i| (i % 209) % 16 == 0 && ((i / 209) % 209) % 16 == 0)
            .map(|i| sample[i])
            .collect();
        let theirs = fx[&format!("{stem}_sample")].to_f64_vec();
        assert_eq!(sample.len(), theirs.len());
        let worst = sample
            .iter()
            .zip(&theirs)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        let v = x.to_f64_vec();
        let means: Vec<f64> = v
            .chunks(224 * 224)
            .map(|c| c.iter().sum::<f64>() / c.len() as f64)
            .collect();
        let want_means: Vec<f64> = want["channel_means"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m.as_f64().unwrap())
            .collect();
        let mean_err = means
            .iter()
            .zip(&want_means)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        eprintln!(
            "{photo}: decoded RGB sum {rgb_sum} (PIL {}), sampled pixels max |Δ| {worst:.4}, \
             channel means max |Δ| {mean_err:.2e}",
            want["rgb_sum"]
        );
        assert!(
            worst <= 4.0 / 128.0,
            "{photo}: sampled pixel off by {worst}"
        );
        assert!(mean_err <= 2e-3, "{photo}: channel mean off by {mean_err}");

        // The same five classes in the same order, probabilities close.
        let logits = no_grad(|| model.forward(&x.unsqueeze(0).unwrap())).unwrap();
        let ours = &top_k(&logits, 5).unwrap()[0];
        let want_top: Vec<(usize, f64)> = want["top5"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| {
                (
                    t["index"].as_u64().unwrap() as usize,
                    t["prob"].as_f64().unwrap(),
                )
            })
            .collect();
        for ((i, p), (wi, wp)) in ours.iter().zip(&want_top) {
            eprintln!(
                "  {photo}: {:<20} {p:.4}   PyTorch {:<20} {wp:.4}",
                imagenet_classes()[*i],
                imagenet_classes()[*wi]
            );
        }
        let idx: Vec<usize> = ours.iter().map(|t| t.0).collect();
        let want_idx: Vec<usize> = want_top.iter().map(|t| t.0).collect();
        assert_eq!(idx, want_idx, "{photo}: top-5 classes");
        for ((_, p), (_, wp)) in ours.iter().zip(&want_top) {
            assert!(
                (*p as f64 - wp).abs() <= 0.02,
                "{photo}: probability {p} vs {wp}"
            );
        }
    }
}
