//! Mamba: the selective scan and the causal depthwise convolution against f64 finite
//! differences and a composite (op-by-op) reference; their one-step forms against the
//! sequence forms; the scan and a whole MambaBlock against the plain PyTorch recurrence of
//! `tools/torch_mamba_fixtures.py`.

use std::collections::HashMap;

use nerve_core::gradcheck::gradcheck;
use nerve_core::{manual_seed, DType, Generator, Result, Tensor};
use nerve_nn::mamba::causal_conv1d_update;
use nerve_nn::{
    causal_conv1d, selective_scan, selective_state_update, MambaBlock, MambaLayer, MambaOptions,
    Module, ModuleExt,
};

fn fixtures() -> HashMap<String, Tensor> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/mamba.safetensors"
    );
    nerve_nn::checkpoint::load_safetensors(path)
        .expect("fixture (run tools/torch_mamba_fixtures.py)")
        .0
}

/// Element-wise `|a − b| ≤ tol · (1 + |b|)`, same shapes.
fn close(what: &str, got: &Tensor, want: &Tensor, tol: f64) {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    for (i, (a, b)) in got.to_f64_vec().iter().zip(want.to_f64_vec()).enumerate() {
        assert!(
            (a - b).abs() <= tol * (1.0 + b.abs()),
            "{what} [{i}]: {a} vs {b}"
        );
    }
}

fn randn64(dims: &[usize], scale: f64, g: &mut Generator) -> Tensor {
    Tensor::randn_with(dims, g)
        .to_dtype(DType::F64)
        .unwrap()
        .mul_scalar(scale)
        .unwrap()
}

/// Inputs of a scan `[u, delta, A, B, C, D, delta_bias]` in f64: `A = −exp(·)` so the
/// recurrence decays, as in Mamba.
fn scan_inputs(b: usize, l: usize, d: usize, n: usize, seed: u64) -> Vec<Tensor> {
    let mut g = Generator::new(seed);
    vec![
        randn64(&[b, l, d], 1.0, &mut g),
        randn64(&[b, l, d], 0.5, &mut g),
        randn64(&[d, n], 0.5, &mut g).exp().unwrap().neg().unwrap(),
        randn64(&[b, l, n], 1.0, &mut g),
        randn64(&[b, l, n], 1.0, &mut g),
        randn64(&[d], 1.0, &mut g),
        randn64(&[d], 0.3, &mut g),
    ]
}

/// The scan composed of nerve's differentiable ops, one time step at a time: the reference
/// for the fused kernel's values and gradients.
fn scan_reference(x: &[Tensor], softplus: bool) -> Result<Tensor> {
    let (u, delta, a, bm, cm, dskip) = (&x[0], &x[1], &x[2], &x[3], &x[4], &x[5]);
    let mut dt = delta.clone();
    if let Some(bias) = x.get(6) {
        dt = dt.add(bias)?;
    }
    if softplus {
        dt = dt.softplus(1.0, 20.0)?;
    }
    let (b, l, d, n) = (u.dims()[0], u.dims()[1], u.dims()[2], a.dims()[1]);
    let mut h = Tensor::zeros_with([b, d, n], u.dtype());
    let mut ys = Vec::new();
    for t in 0..l {
        let dtt = dt.select(1, t)?.unsqueeze(2)?; // [b, d, 1]
        let ut = u.select(1, t)?;
        let bt = bm.select(1, t)?.unsqueeze(1)?; // [b, 1, n]
        let ct = cm.select(1, t)?.unsqueeze(1)?;
        h = dtt
            .mul(a)?
            .exp()?
            .mul(&h)?
            .add(&dtt.mul(&bt)?.mul(&ut.unsqueeze(2)?)?)?;
        ys.push(h.mul(&ct)?.sum_dim(&[2], false)?.add(&ut.mul(dskip)?)?);
    }
    Tensor::stack(&ys.iter().collect::<Vec<_>>(), 1)
}

/// Central differences agree with the fused backward for every input, with softplus and
/// `delta_bias` and without, on odd sizes: 35 steps (two 32-step chunks, the second partial)
/// and 19 channels (one full 16-lane block, one partial). Tolerances: gradcheck's defaults
/// (atol 1e-5, rtol 1e-3).
#[test]
fn selective_scan_gradcheck() -> Result<()> {
    let x = scan_inputs(2, 35, 19, 3, 1);
    gradcheck(
        |t| selective_scan(&t[0], &t[1], &t[2], &t[3], &t[4], &t[5], Some(&t[6]), true),
        &x,
    )?;
    // Without softplus Δ must be positive for a decaying recurrence.
    let mut x = scan_inputs(1, 5, 3, 2, 2);
    x[1] = x[1].abs()?.add_scalar(0.1)?;
    x.truncate(6);
    gradcheck(
        |t| selective_scan(&t[0], &t[1], &t[2], &t[3], &t[4], &t[5], None, false),
        &x,
    )?;
    // B and C as strided views of one tensor (as they come out of x_proj), a bias without
    // softplus.
    let mut g = Generator::new(3);
    let x = scan_inputs(2, 4, 5, 3, 4);
    let bc = randn64(&[2, 4, 7], 1.0, &mut g);
    gradcheck(
        |t| {
            let (bm, cm) = (t[3].narrow(2, 1, 3)?, t[3].narrow(2, 4, 3)?);
            selective_scan(&t[0], &t[1], &t[2], &bm, &cm, &t[4], Some(&t[5]), false)
        },
        &[
            x[0].clone(),
            x[1].abs()?.add_scalar(0.5)?,
            x[2].clone(),
            bc,
            x[5].clone(),
            x[6].clone(),
        ],
    )?;
    Ok(())
}

/// On a size that runs the kernels in parallel (4·70·40·16 state updates), values and all
/// gradients equal the op-by-op reference to 1e-10 (f64) and 2e-4 (f32, relative).
#[test]
fn selective_scan_matches_composite_reference_in_parallel() -> Result<()> {
    for dtype in [DType::F64, DType::F32] {
        let x: Vec<Tensor> = scan_inputs(4, 70, 40, 16, 5)
            .iter()
            .map(|t| t.to_dtype(dtype).unwrap().requires_grad_(true))
            .collect();
        let w = Tensor::randn_with([4, 70, 40], &mut Generator::new(6)).to_dtype(dtype)?;
        let fused = selective_scan(&x[0], &x[1], &x[2], &x[3], &x[4], &x[5], Some(&x[6]), true)?;
        fused.mul(&w)?.sum()?.backward()?;
        let got: Vec<Tensor> = x.iter().map(|t| t.grad().unwrap()).collect();
        for t in &x {
            t.zero_grad();
        }
        let want = scan_reference(&x, true)?;
        want.mul(&w)?.sum()?.backward()?;
        let tol = if dtype == DType::F64 { 1e-10 } else { 2e-4 };
        close("y", &fused, &want, tol);
        for (i, (g, t)) in got.iter().zip(&x).enumerate() {
            close(&format!("grad of input {i}"), g, &t.grad().unwrap(), tol);
        }
    }
    Ok(())
}

/// Gradients are only returned for inputs that require them, and nothing is recorded
/// under `no_grad`.
#[test]
fn selective_scan_grad_only_where_required() -> Result<()> {
    let x = scan_inputs(1, 3, 2, 2, 7);
    let u = x[0].clone().requires_grad_(true);
    let y = selective_scan(&u, &x[1], &x[2], &x[3], &x[4], &x[5], Some(&x[6]), true)?;
    y.sum()?.backward()?;
    assert_eq!(u.grad().unwrap().dims(), &[1, 3, 2]);
    assert!(x[2].grad().is_none());
    let y =
        nerve_core::no_grad(|| selective_scan(&u, &x[1], &x[2], &x[3], &x[4], &x[5], None, true))?;
    assert!(!y.requires_grad());
    Ok(())
}

#[test]
fn selective_scan_rejects_bad_shapes_and_dtypes() {
    let x = scan_inputs(2, 3, 4, 5, 8);
    let run = |i: usize, bad: Tensor| {
        let mut v = x.clone();
        v[i] = bad;
        selective_scan(&v[0], &v[1], &v[2], &v[3], &v[4], &v[5], Some(&v[6]), true)
            .unwrap_err()
            .to_string()
    };
    assert!(run(1, Tensor::zeros_with([2, 3, 5], DType::F64)).contains("delta"));
    assert!(run(2, Tensor::zeros_with([5, 5], DType::F64)).contains("A must be"));
    assert!(run(3, Tensor::zeros_with([2, 3, 4], DType::F64)).contains("B"));
    assert!(run(5, Tensor::zeros_with([3], DType::F64)).contains("D"));
    assert!(run(6, Tensor::zeros_with([2], DType::F64)).contains("delta_bias"));
    assert!(run(4, Tensor::zeros([2, 3, 5])).contains("F32"));
}

/// The scan equals PyTorch's plain recurrence (fixture, computed in f64): in f64 to 1e-10,
/// in f32 to 1e-4 relative; values and the gradient of every input.
#[test]
fn selective_scan_matches_pytorch() -> Result<()> {
    let fx = fixtures();
    for (case, softplus) in [("sp", true), ("plain", false)] {
        let mut names = vec!["u", "delta", "A", "B", "C", "D"];
        if softplus {
            names.push("delta_bias");
        }
        for (dtype, tol) in [(DType::F64, 1e-10), (DType::F32, 1e-4)] {
            let x: Vec<Tensor> = names
                .iter()
                .map(|k| {
                    fx[&format!("scan.{case}.{k}")]
                        .detach()
                        .to_dtype(dtype)
                        .unwrap()
                        .requires_grad_(true)
                })
                .collect();
            let y = selective_scan(&x[0], &x[1], &x[2], &x[3], &x[4], &x[5], x.get(6), softplus)?;
            close(
                &format!("{case} y"),
                &y,
                &fx[&format!("scan.{case}.y")],
                tol,
            );
            let w = Tensor::from_vec(
                (0..y.numel())
                    .map(|i| (0.37 * i as f64 + 8.0).sin() as f32 as f64)
                    .collect::<Vec<_>>(),
                y.dims(),
            )?
            .to_dtype(dtype)?;
            y.mul(&w)?.sum()?.backward()?;
            for (k, t) in names.iter().zip(&x) {
                close(
                    &format!("{case} {dtype:?} grad {k}"),
                    &t.grad().unwrap(),
                    &fx[&format!("scan.{case}.grad.{k}")],
                    tol,
                );
            }
        }
    }
    Ok(())
}

/// Running the one-step recurrence over a sequence from a zero state gives the scan's
/// outputs (same arithmetic: to 1e-6 in f32).
#[test]
fn state_update_steps_equal_the_scan() -> Result<()> {
    let (b, l, d, n) = (3, 9, 21, 5);
    let x: Vec<Tensor> = scan_inputs(b, l, d, n, 9)
        .iter()
        .map(|t| t.to_dtype(DType::F32).unwrap())
        .collect();
    let full = selective_scan(&x[0], &x[1], &x[2], &x[3], &x[4], &x[5], Some(&x[6]), true)?;
    let mut state = Tensor::zeros([b, d, n]);
    for t in 0..l {
        let (y, next) = selective_state_update(
            &state,
            &x[0].select(1, t)?,
            &x[1].select(1, t)?,
            &x[2],
            &x[3].select(1, t)?,
            &x[4].select(1, t)?,
            &x[5],
            Some(&x[6]),
            true,
        )?;
        close(&format!("step {t}"), &y, &full.select(1, t)?, 1e-6);
        state = next;
    }
    Ok(())
}

/// The causal depthwise convolution: gradcheck (kernel shorter and longer than the
/// sequence), PyTorch-layout parity with nerve's grouped `conv1d`, and its one-step form.
#[test]
fn causal_conv1d_gradcheck_and_parity() -> Result<()> {
    let mut g = Generator::new(10);
    for (b, l, d, k) in [(2, 6, 5, 3), (1, 2, 3, 4), (2, 5, 17, 1)] {
        let x = randn64(&[b, l, d], 1.0, &mut g);
        let w = randn64(&[d, k], 1.0, &mut g);
        let bias = randn64(&[d], 1.0, &mut g);
        gradcheck(
            |t| causal_conv1d(&t[0], &t[1], Some(&t[2])),
            &[x.clone(), w.clone(), bias.clone()],
        )?;
        gradcheck(
            |t| causal_conv1d(&t[0], &t[1], None),
            &[x.clone(), w.clone()],
        )?;
        // PyTorch's formulation: conv1d over [B, D, L], padding K − 1, first L outputs.
        let want = x
            .transpose(1, 2)?
            .conv1d(&w.unsqueeze(1)?, Some(&bias), 1, k - 1, 1, d)?
            .narrow(2, 0, l)?
            .transpose(1, 2)?;
        close("conv", &causal_conv1d(&x, &w, Some(&bias))?, &want, 1e-12);
        // Step by step from a zero state.
        let full = causal_conv1d(&x, &w, Some(&bias))?;
        let mut state = Tensor::zeros_with([b, k - 1, d], DType::F64);
        for t in 0..l {
            let (y, next) = causal_conv1d_update(&state, &x.select(1, t)?, &w, Some(&bias))?;
            close("conv step", &y, &full.select(1, t)?, 0.0);
            state = next;
        }
    }
    assert!(
        causal_conv1d(&Tensor::zeros([2, 3, 4]), &Tensor::zeros([5, 2]), None)
            .unwrap_err()
            .to_string()
            .contains("weight")
    );
    Ok(())
}

/// A MambaBlock with weights from PyTorch's state_dict matches the reference mixer: output
/// to 1e-4, gradients of the input and every parameter to 1e-4 (relative, f32 against f64).
#[test]
fn mamba_block_matches_pytorch() -> Result<()> {
    let fx = fixtures();
    let block = MambaBlock::new(
        MambaOptions::new(10)
            .with_d_state(3)
            .with_d_conv(3)
            .with_expand(2)
            .with_dt_rank(Some(3)),
    )?;
    let state: HashMap<String, Tensor> = fx
        .iter()
        .filter_map(|(k, v)| {
            k.strip_prefix("block.state.")
                .map(|n| (n.to_string(), v.clone()))
        })
        .collect();
    block
        .load_state_dict(&state, true)
        .map_err(|e| nerve_core::Error::invalid("load", e.to_string()))?;
    let x = fx["block.x"].clone().requires_grad_(true);
    let y = block.forward(&x)?;
    close("block out", &y, &fx["block.out"], 1e-4);
    let w = Tensor::from_vec(
        (0..y.numel())
            .map(|i| (0.37 * i as f64 + 12.0).sin() as f32)
            .collect::<Vec<_>>(),
        y.dims(),
    )?;
    y.mul(&w)?.sum()?.backward()?;
    close("grad x", &x.grad().unwrap(), &fx["block.grad.x"], 1e-4);
    for (name, p) in block.named_parameters() {
        close(
            &format!("grad {name}"),
            &p.grad().unwrap(),
            &fx[&format!("block.grad.{name}")],
            1e-4,
        );
    }
    Ok(())
}

/// Names, shapes and initialisation follow mamba_ssm; stepping a layer token by token gives
/// the full forward pass.
#[test]
fn mamba_layer_names_init_and_step() -> Result<()> {
    manual_seed(11);
    let layer = MambaLayer::new(MambaOptions::new(20), 1e-5)?;
    let names: Vec<(String, Vec<usize>)> = layer
        .named_parameters()
        .into_iter()
        .map(|(n, t)| (n, t.dims().to_vec()))
        .collect();
    let want: Vec<(&str, Vec<usize>)> = vec![
        ("mixer.A_log", vec![40, 16]),
        ("mixer.D", vec![40]),
        ("mixer.in_proj.weight", vec![80, 20]),
        ("mixer.conv1d.weight", vec![40, 1, 4]),
        ("mixer.conv1d.bias", vec![40]),
        ("mixer.x_proj.weight", vec![2 + 32, 40]),
        ("mixer.dt_proj.weight", vec![40, 2]),
        ("mixer.dt_proj.bias", vec![40]),
        ("mixer.out_proj.weight", vec![20, 40]),
        ("norm.weight", vec![20]),
    ];
    assert_eq!(
        names,
        want.iter()
            .map(|(n, d)| (n.to_string(), d.clone()))
            .collect::<Vec<_>>()
    );
    let m = &layer.mixer;
    assert_eq!(m.a_log.select(0, 7)?.exp()?.to_f64_vec()[..3].len(), 3);
    for (i, v) in m.a_log.select(0, 7)?.exp()?.to_f64_vec().iter().enumerate() {
        assert!((v - (i + 1) as f64).abs() < 1e-5, "A_log row: {v}");
    }
    // softplus(dt_proj.bias) lies in [dt_min, dt_max].
    for v in m
        .dt_proj
        .bias
        .as_ref()
        .unwrap()
        .softplus(1.0, 20.0)?
        .to_f64_vec()
    {
        assert!((0.001 - 1e-7..=0.1 + 1e-7).contains(&v), "initial dt {v}");
    }
    let bound = 1.0 / 2f64.sqrt();
    assert!(m
        .dt_proj
        .weight
        .to_f64_vec()
        .iter()
        .all(|v| v.abs() <= bound));

    let x = Tensor::randn([2, 7, 20]);
    let full = layer.forward(&x)?;
    let mut cache = layer.mixer.new_cache(2);
    for t in 0..7 {
        let y = layer.step(&x.select(1, t)?, &mut cache)?;
        close(&format!("step {t}"), &y, &full.select(1, t)?, 1e-5);
    }
    assert!(layer.step(&Tensor::zeros([2, 3]), &mut cache).is_err());
    assert!(MambaBlock::new(MambaOptions::new(8).with_d_state(0))
        .err()
        .unwrap()
        .to_string()
        .contains("d_state"));
    Ok(())
}
