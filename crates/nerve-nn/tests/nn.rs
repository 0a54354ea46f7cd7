//! Modules, the fused cross-entropy's gradient, checkpoints, optimizer state and schedules.

use std::collections::HashMap;

use nerve_core::gradcheck::gradcheck;
use nerve_core::{manual_seed, DType, Result, Tensor};
use nerve_nn::checkpoint::{load_safetensors, save_safetensors, CheckpointError};
use nerve_nn::loss::{self, CrossEntropyOptions, Reduction};
use nerve_nn::{
    batch_norm1d, load_model, load_optimizer, save_model, save_optimizer, Adam, Dropout, Linear,
    LrSchedule, Module, ModuleExt, Optimizer, ReLU, Sequential,
};

fn tmp(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("nerve-nn-test-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn mlp() -> Result<Sequential> {
    Ok(Sequential::new()
        .add(Linear::new(6, 8, true)?)
        .add(batch_norm1d(8))
        .add(ReLU)
        .add(Dropout::new(0.5))
        .add(Linear::new(8, 3, false)?))
}

#[test]
fn cross_entropy_wide_rows_and_nan() -> Result<()> {
    // Rows of 65 classes (four 16-lane vectors and a tail) against the definition in f64;
    // a NaN logit makes its row's loss NaN wherever it lies, and only that row's.
    let (n, c) = (6usize, 65usize);
    let mut x: Vec<f32> = (0..n * c)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.13)
        .collect();
    let nan_at = [(1, 0), (3, 40), (5, 64)];
    for &(r, k) in &nan_at {
        x[r * c + k] = f32::NAN;
    }
    let y: Vec<i64> = (0..n as i64).map(|i| i * 11 % c as i64).collect();
    let logits = Tensor::from_vec(x.clone(), [n, c])?.requires_grad_(true);
    let opts = CrossEntropyOptions {
        reduction: Reduction::None,
        ..Default::default()
    };
    let l = loss::cross_entropy(&logits, &Tensor::from_vec(y.clone(), [n])?, &opts)?;
    let got: Vec<f32> = l.to_vec()?;
    for i in 0..n {
        let row: Vec<f64> = x[i * c..(i + 1) * c].iter().map(|&v| v as f64).collect();
        let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = row.iter().map(|v| (v - m).exp()).sum::<f64>().ln() + m;
        if nan_at.iter().any(|&(r, _)| r == i) {
            assert!(got[i].is_nan(), "row {i}: {}", got[i]);
        } else {
            let want = lse - row[y[i] as usize];
            assert!(
                (got[i] as f64 - want).abs() < 1e-5,
                "row {i}: {} vs {want}",
                got[i]
            );
        }
    }
    Ok(())
}

#[test]
fn fused_cross_entropy_gradcheck() -> Result<()> {
    manual_seed(1);
    let x = Tensor::randn([5, 4]).to_dtype(DType::F64)?;
    let t = Tensor::from_vec(vec![0i64, 3, -100, 1, 2], [5])?;
    let w = Tensor::from_vec(vec![0.5f64, 1.0, 2.0, 1.5], [4])?;
    for (smooth, red) in [
        (0.0, Reduction::Mean),
        (0.1, Reduction::Sum),
        (0.3, Reduction::None),
    ] {
        let opts = CrossEntropyOptions {
            weight: Some(w.clone()),
            label_smoothing: smooth,
            reduction: red,
            ..Default::default()
        };
        gradcheck(
            |v| loss::cross_entropy(&v[0], &t, &opts),
            std::slice::from_ref(&x),
        )?;
    }
    // Out-of-range targets are an error naming the op, not a panic.
    let bad = Tensor::from_vec(vec![0i64, 4, 0, 0, 0], [5])?;
    let e = loss::cross_entropy(&x, &bad, &Default::default()).unwrap_err();
    assert!(
        e.to_string().contains("cross_entropy") && e.to_string().contains("out of range"),
        "{e}"
    );
    Ok(())
}

#[test]
fn module_names_modes_and_freezing() -> Result<()> {
    let m = mlp()?;
    let names: Vec<String> = m.state_dict().into_iter().map(|(n, _)| n).collect();
    assert_eq!(
        names,
        [
            "0.weight",
            "0.bias",
            "1.weight",
            "1.bias",
            "1.running_mean",
            "1.running_var",
            "1.num_batches_tracked",
            "4.weight"
        ]
    );
    assert_eq!(m.num_parameters(), 6 * 8 + 8 + 8 + 8 + 8 * 3);
    // Dropout is active in training and the identity in evaluation.
    let x = Tensor::randn([64, 6]);
    m.eval();
    let a = m.forward(&x)?.to_vec::<f32>()?;
    let b = m.forward(&x)?.to_vec::<f32>()?;
    assert_eq!(a, b);
    m.train();
    let c = m.forward(&x)?.to_vec::<f32>()?;
    assert_ne!(a, c);
    assert_eq!(m.set_frozen("0.", true), 2);
    assert!(!m.named_parameters()[0].1.requires_grad());
    assert!(m.named_parameters()[2].1.requires_grad());
    assert!(m
        .summary()
        .contains("(0): Linear(in_features=6, out_features=8, bias=true)"));
    Ok(())
}

#[test]
fn checkpoint_round_trip_and_bad_files() -> Result<()> {
    manual_seed(2);
    let dir = tmp("ckpt");
    let path = dir.join("model.safetensors");
    let a = mlp()?;
    a.train();
    a.forward(&Tensor::randn([16, 6]))?; // moves the running statistics
    a.eval();
    let meta = HashMap::from([("epoch".to_string(), "3".to_string())]);
    save_model(&a, &path, &meta).unwrap();
    // No temporary file is left behind.
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
    let b = mlp()?;
    b.eval();
    let got = load_model(&b, &path).unwrap();
    assert_eq!(got["epoch"], "3");
    let x = Tensor::randn([4, 6]);
    assert_eq!(
        a.forward(&x)?.to_vec::<f32>()?,
        b.forward(&x)?.to_vec::<f32>()?
    );

    // A model of another shape: a typed error naming the file and the tensor; nothing loaded.
    let other = Sequential::new().add(Linear::new(6, 9, true)?);
    let before = other.state_dict()[0].1.to_vec::<f32>()?;
    match load_model(&other, &path) {
        Err(CheckpointError::Mismatch { path: p, source }) => {
            assert_eq!(p, path);
            let msg = source.to_string();
            assert!(
                msg.contains("size mismatch for 0.weight") && msg.contains("unexpected keys"),
                "{msg}"
            );
        }
        other => panic!("expected a mismatch, got {other:?}"),
    }
    assert_eq!(other.state_dict()[0].1.to_vec::<f32>()?, before);

    // A truncated file and a missing file.
    let bytes = std::fs::read(&path).unwrap();
    let cut = dir.join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let e = load_model(&b, &cut).unwrap_err();
    assert!(
        matches!(e, CheckpointError::Format { .. }) && e.to_string().contains("cut.safetensors"),
        "{e}"
    );
    let e = load_model(&b, dir.join("missing.safetensors")).unwrap_err();
    assert!(
        matches!(e, CheckpointError::Io { .. }) && e.to_string().contains("missing.safetensors"),
        "{e}"
    );

    // Every dtype survives a round trip.
    let ts = vec![
        (
            "f64".to_string(),
            Tensor::from_vec(vec![1.5f64, -2.0], [2])?,
        ),
        ("i64".to_string(), Tensor::from_vec(vec![7i64, -3, 0], [3])?),
        (
            "bf16".to_string(),
            Tensor::from_vec(vec![1.0f32, 0.5], [2])?.to_dtype(DType::BF16)?,
        ),
    ];
    let p2 = dir.join("dtypes.safetensors");
    save_safetensors(&p2, &ts, &HashMap::new()).unwrap();
    let (back, _) = load_safetensors(&p2).unwrap();
    for (n, t) in &ts {
        assert_eq!(back[n].dtype(), t.dtype());
        assert_eq!(back[n].to_f64_vec(), t.to_f64_vec());
    }
    std::fs::remove_dir_all(dir).ok();
    Ok(())
}

/// Training, saving model and optimizer, and resuming gives exactly the uninterrupted run.
#[test]
fn resume_from_checkpoint_is_exact() -> Result<()> {
    manual_seed(3);
    let dir = tmp("resume");
    let x = Tensor::randn([32, 6]);
    let y = Tensor::from_vec((0..32).map(|i| i % 3).collect::<Vec<i64>>(), [32])?;
    let make = || -> Result<Sequential> {
        Ok(Sequential::new()
            .add(Linear::new(6, 8, true)?)
            .add(ReLU)
            .add(Linear::new(8, 3, true)?))
    };
    let step = |m: &Sequential, o: &mut Adam| -> Result<()> {
        let l = loss::cross_entropy(&m.forward(&x)?, &y, &Default::default())?;
        o.zero_grad();
        l.backward()?;
        o.step()
    };
    let a = make()?;
    let mut oa = Adam::adamw(a.parameters(), 1e-2, 0.01);
    for _ in 0..3 {
        step(&a, &mut oa)?;
    }
    save_model(&a, dir.join("m.safetensors"), &HashMap::new()).unwrap();
    save_optimizer(&oa, dir.join("o.safetensors"), &HashMap::new()).unwrap();
    for _ in 0..3 {
        step(&a, &mut oa)?;
    }
    let b = make()?;
    let mut ob = Adam::adamw(b.parameters(), 5.0, 0.01);
    load_model(&b, dir.join("m.safetensors")).unwrap();
    load_optimizer(&mut ob, dir.join("o.safetensors")).unwrap();
    assert_eq!(ob.lr(), 1e-2);
    for _ in 0..3 {
        step(&b, &mut ob)?;
    }
    for ((_, pa), (_, pb)) in a.named_parameters().iter().zip(b.named_parameters()) {
        assert_eq!(pa.to_vec::<f32>()?, pb.to_vec::<f32>()?);
    }
    std::fs::remove_dir_all(dir).ok();
    Ok(())
}

#[test]
fn lr_schedules_follow_pytorch() {
    let close = |a: f64, b: f64| assert!((a - b).abs() < 1e-12, "{a} vs {b}");
    close(
        LrSchedule::Step {
            step_size: 3,
            gamma: 0.5,
        }
        .lr(1.0, 7),
        0.25,
    );
    close(
        LrSchedule::MultiStep {
            milestones: vec![2, 5],
            gamma: 0.1,
        }
        .lr(1.0, 5),
        0.01,
    );
    close(LrSchedule::Exponential { gamma: 0.9 }.lr(2.0, 2), 1.62);
    let cos = LrSchedule::Cosine {
        t_max: 10,
        eta_min: 0.1,
    };
    close(cos.lr(1.0, 0), 1.0);
    close(cos.lr(1.0, 5), 0.55);
    close(cos.lr(1.0, 10), 0.1);
    let wc = LrSchedule::WarmupCosine {
        warmup: 4,
        total: 14,
        eta_min: 0.0,
    };
    close(wc.lr(1.0, 0), 0.25);
    close(wc.lr(1.0, 3), 1.0);
    close(wc.lr(1.0, 4), 1.0);
    close(wc.lr(1.0, 9), 0.5);
    let oc = LrSchedule::OneCycle {
        total: 100,
        pct_start: 0.3,
        div_factor: 25.0,
        final_div_factor: 1e4,
    };
    close(oc.lr(1.0, 0), 0.04);
    close(oc.lr(1.0, 29), 1.0);
    close(oc.lr(1.0, 99), 0.04 / 1e4);
}

/// `[N, C, H, W]` logits pair each position with its own target (as PyTorch).
#[test]
fn cross_entropy_over_spatial_dims() -> Result<()> {
    manual_seed(4);
    let x = Tensor::randn([2, 3, 2, 4]);
    let t = Tensor::from_vec(
        (0..16).map(|i| (i * 5 % 7 % 3) as i64).collect::<Vec<_>>(),
        [2, 2, 4],
    )?;
    let got = loss::cross_entropy(
        &x,
        &t,
        &CrossEntropyOptions {
            reduction: Reduction::None,
            ..Default::default()
        },
    )?;
    assert_eq!(got.dims(), &[2, 2, 4]);
    let lp = x.log_softmax(1)?.to_vec::<f32>()?;
    let tv: Vec<i64> = t.to_vec()?;
    for (k, g) in got.to_vec::<f32>()?.iter().enumerate() {
        let (n, h, w) = (k / 8, k / 4 % 2, k % 4);
        let c = tv[k] as usize;
        let want = -lp[((n * 3 + c) * 2 + h) * 4 + w];
        assert!((g - want).abs() < 1e-5, "position {k}: {g} vs {want}");
    }
    Ok(())
}

/// Step counts are per parameter (as PyTorch): a parameter that first gets a gradient at the
/// second step gets Adam's bias-corrected first update, of size `lr`.
#[test]
fn optimizer_steps_count_per_parameter_and_reject_foreign_state() -> Result<()> {
    let a = Tensor::from_vec(vec![1.0f32], [1])?.requires_grad_(true);
    let b = Tensor::from_vec(vec![1.0f32], [1])?.requires_grad_(true);
    let mut opt = Adam::new(vec![a.clone(), b.clone()], 0.1);
    a.square()?.sum()?.backward()?;
    opt.step()?;
    opt.zero_grad();
    a.add(&b)?.square()?.sum()?.backward()?;
    opt.step()?;
    let db = 1.0 - b.item::<f32>()?;
    assert!((db - 0.1).abs() < 1e-4, "first update of b: {db}");
    let sd: HashMap<String, Tensor> = opt.state_dict().into_iter().collect();
    assert_eq!(sd["state.0.step"].item::<i64>()?, 2);
    assert_eq!(sd["state.1.step"].item::<i64>()?, 1);
    let mut sgd_state = sd.clone();
    sgd_state.insert("state.0.momentum_buffer".into(), Tensor::zeros([1]));
    let e = opt.load_state_dict(&sgd_state).unwrap_err();
    assert!(e.to_string().contains("momentum_buffer"), "{e}");
    Ok(())
}

/// Two-way checkpoint proof. PyTorch → nerve: a `state_dict` saved by PyTorch
/// (`tools/torch_nn_fixtures.py`) loads into the same nerve model and gives PyTorch's output.
/// nerve → PyTorch: the file nerve writes has exactly the names, dtypes and shapes of
/// PyTorch's, which is what `load_state_dict(strict=True)` checks (exercised for real by
/// `tools/check_nerve_checkpoint.py`).
#[test]
fn pytorch_checkpoints_load_and_nerve_checkpoints_match_them() -> Result<()> {
    use nerve_nn::{batch_norm2d, Conv2d, ConvOptions, Flatten, MaxPool2d};
    let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/");
    let torch_file = format!("{fixtures}torch_small_cnn.safetensors");
    let model = Sequential::new()
        .add(Conv2d::new(1, 4, 3, ConvOptions::default().padding(1))?)
        .add(batch_norm2d(4))
        .add(ReLU)
        .add(MaxPool2d::new(2))
        .add(Flatten::default())
        .add(Linear::new(64, 3, true)?);
    load_model(&model, &torch_file).unwrap();
    model.eval();
    let (fx, _) = load_safetensors(format!("{fixtures}nn.safetensors")).unwrap();
    let got = model.forward(&fx["ckpt.input"])?;
    for (a, b) in got.to_f64_vec().iter().zip(fx["ckpt.output"].to_f64_vec()) {
        assert!((a - b).abs() < 1e-5, "{a} vs {b}");
    }
    let dir = tmp("two-way");
    let ours = dir.join("nerve.safetensors");
    save_model(&model, &ours, &HashMap::new()).unwrap();
    let (theirs, _) = load_safetensors(&torch_file).unwrap();
    let (mine, _) = load_safetensors(&ours).unwrap();
    let mut names: Vec<&String> = theirs.keys().collect();
    names.sort();
    let mut my_names: Vec<&String> = mine.keys().collect();
    my_names.sort();
    assert_eq!(names, my_names);
    for n in names {
        assert_eq!(theirs[n].dims(), mine[n].dims(), "{n}");
        assert_eq!(theirs[n].dtype(), mine[n].dtype(), "{n}");
        assert_eq!(theirs[n].to_f64_vec(), mine[n].to_f64_vec(), "{n}");
    }
    std::fs::remove_dir_all(dir).ok();
    Ok(())
}

#[test]
fn attention_gradcheck_and_errors() -> Result<()> {
    use nerve_nn::{scaled_dot_product_attention, SdpaOptions};
    manual_seed(5);
    let q = Tensor::randn([2, 3, 4]).to_dtype(DType::F64)?;
    let k = Tensor::randn([2, 5, 4]).to_dtype(DType::F64)?;
    let v = Tensor::randn([2, 5, 2]).to_dtype(DType::F64)?;
    let mask = Tensor::randn([3, 5]).gt(&Tensor::full([3, 5], -0.8))?;
    for opts in [
        SdpaOptions::default(),
        SdpaOptions {
            causal: true,
            ..Default::default()
        },
        SdpaOptions {
            mask: Some(mask.clone()),
            scale: Some(0.7),
            ..Default::default()
        },
    ] {
        gradcheck(
            |t| scaled_dot_product_attention(&t[0], &t[1], &t[2], &opts),
            &[q.clone(), k.clone(), v.clone()],
        )?;
    }
    // One item (rank 2: the fused kernel runs it alone, with threaded GEMMs), causal.
    let causal = SdpaOptions {
        causal: true,
        ..Default::default()
    };
    gradcheck(
        |t| scaled_dot_product_attention(&t[0], &t[1], &t[2], &causal),
        &[q.select(0, 0)?, k.select(0, 1)?, v.select(0, 0)?],
    )?;
    // The packed self-attention equals splitting heads, SDPA and merging; gradients check.
    let qkv = Tensor::randn([2, 5, 12]).to_dtype(DType::F64)?;
    for is_causal in [false, true] {
        let heads = |t: &Tensor| t.reshape(&[2, 5, 2, 2])?.transpose(1, 2);
        let split = |i: usize| heads(&qkv.narrow(2, i * 4, 4)?);
        let opts = SdpaOptions {
            causal: is_causal,
            ..Default::default()
        };
        let want = scaled_dot_product_attention(&split(0)?, &split(1)?, &split(2)?, &opts)?
            .transpose(1, 2)?
            .reshape(&[2, 5, 4])?;
        let got = nerve_nn::packed_self_attention(&qkv, 2, is_causal)?;
        for (a, b) in got.to_f64_vec().iter().zip(want.to_f64_vec()) {
            assert!((a - b).abs() < 1e-12, "{a} vs {b}");
        }
        gradcheck(
            |t| nerve_nn::packed_self_attention(&t[0], 2, is_causal),
            std::slice::from_ref(&qkv),
        )?;
    }
    assert!(nerve_nn::packed_self_attention(&qkv, 5, false).is_err());
    // Dropout 0 is the identity; with dropout the output keeps its shape and differs.
    let a = scaled_dot_product_attention(&q, &k, &v, &SdpaOptions::default())?;
    let d = scaled_dot_product_attention(
        &q,
        &k,
        &v,
        &SdpaOptions {
            dropout_p: 0.5,
            ..Default::default()
        },
    )?;
    assert_eq!(a.dims(), d.dims());
    assert_ne!(a.to_f64_vec(), d.to_f64_vec());
    // Mismatched head sizes name the op and both shapes.
    let e = scaled_dot_product_attention(
        &q,
        &Tensor::randn([2, 5, 3]).to_dtype(DType::F64)?,
        &v,
        &SdpaOptions::default(),
    )
    .unwrap_err();
    assert!(
        e.to_string().contains("scaled_dot_product_attention")
            && e.to_string().contains("[2, 5, 3]"),
        "{e}"
    );
    Ok(())
}

#[test]
fn fused_recurrent_cells_gradcheck() -> Result<()> {
    use nerve_nn::rnn::{gru_cell, lstm_cell};
    manual_seed(6);
    let f64t = |d: &[usize]| Tensor::randn(d).to_dtype(DType::F64);
    gradcheck(
        |t| lstm_cell(&t[0], &t[1]),
        &[f64t(&[3, 8])?, f64t(&[3, 2])?],
    )?;
    gradcheck(
        |t| gru_cell(&t[0], &t[1], &t[2]),
        &[f64t(&[3, 6])?, f64t(&[3, 6])?, f64t(&[3, 2])?],
    )?;
    // Shapes that do not fit are errors naming the cell.
    let e = lstm_cell(&f64t(&[3, 8])?, &f64t(&[3, 3])?).unwrap_err();
    assert!(e.to_string().contains("lstm_cell"), "{e}");
    Ok(())
}

/// The whole LSTM layer-direction node (input projection, time loop, both weight gradients
/// from one GEMM) against finite differences, both directions, every input.
#[test]
fn lstm_sequence_gradcheck() -> Result<()> {
    use nerve_nn::rnn::lstm_sequence;
    manual_seed(8);
    let f64t = |d: &[usize]| Tensor::randn(d).to_dtype(DType::F64);
    // T = 3 steps of B = 2 rows, 3 inputs, H = 2 units.
    for reverse in [false, true] {
        gradcheck(
            |t| lstm_sequence(&t[0], &t[1], Some(&t[5]), &t[2], &t[3], &t[4], reverse),
            &[
                f64t(&[6, 3])?,
                f64t(&[8, 3])?,
                f64t(&[2, 2])?,
                f64t(&[2, 2])?,
                f64t(&[8, 2])?,
                f64t(&[8])?,
            ],
        )?;
    }
    let e = lstm_sequence(
        &f64t(&[5, 3])?,
        &f64t(&[8, 3])?,
        None,
        &f64t(&[2, 2])?,
        &f64t(&[2, 2])?,
        &f64t(&[8, 2])?,
        false,
    )
    .unwrap_err();
    assert!(e.to_string().contains("lstm_sequence"), "{e}");
    Ok(())
}

#[test]
fn positional_encodings() -> Result<()> {
    use nerve_nn::{apply_rotary, sinusoidal_encoding};
    let pe = sinusoidal_encoding(4, 6)?.to_vec::<f32>()?;
    // Position 0: sin 0 = 0 in even columns, cos 0 = 1 in odd ones; position 1, column 0: sin 1.
    assert_eq!(&pe[..6], &[0.0, 1.0, 0.0, 1.0, 0.0, 1.0]);
    assert!((pe[6] - 1f32.sin()).abs() < 1e-6);
    // Rotary: the score between positions m and n depends only on m - n, and norms are kept.
    manual_seed(7);
    let q = Tensor::randn([1, 8]).to_dtype(DType::F64)?;
    let k = Tensor::randn([1, 8]).to_dtype(DType::F64)?;
    let score = |m: usize, n: usize| -> Result<f64> {
        apply_rotary(&q, m, 10000.0)?
            .mul(&apply_rotary(&k, n, 10000.0)?)?
            .sum()?
            .item::<f64>()
    };
    assert!((score(3, 1)? - score(7, 5)?).abs() < 1e-9);
    assert!((score(3, 1)? - score(1, 3)?).abs() > 1e-6);
    let n0 = q.square()?.sum()?.item::<f64>()?;
    let n5 = apply_rotary(&q, 5, 10000.0)?
        .square()?
        .sum()?
        .item::<f64>()?;
    assert!((n0 - n5).abs() < 1e-9);
    gradcheck(
        |t| apply_rotary(&t[0], 2, 10000.0),
        &[Tensor::randn([2, 3, 4]).to_dtype(DType::F64)?],
    )?;
    assert!(apply_rotary(&Tensor::randn([2, 3]), 0, 10000.0).is_err());
    Ok(())
}

#[test]
fn grad_norm_clipping_and_the_first_nonfinite_parameter() -> Result<()> {
    let a = Tensor::from_vec(vec![1.0f32, 2.0], [2])?.requires_grad_(true);
    let b = Tensor::from_vec(vec![3.0f32], [1])?.requires_grad_(true);
    a.set_grad(Some(Tensor::from_vec(vec![3.0f32, 0.0], [2])?));
    b.set_grad(Some(Tensor::from_vec(vec![4.0f32], [1])?));
    let params = [a.clone(), b.clone()];
    assert_eq!(nerve_nn::grad_norm(&params)?, 5.0);
    assert_eq!(nerve_nn::clip_grad_norm(&params, 1.0)?, 5.0);
    assert!((nerve_nn::grad_norm(&params)? - 1.0).abs() < 1e-6);
    let named = vec![("a".to_string(), a.clone()), ("b".to_string(), b.clone())];
    assert_eq!(nerve_nn::first_nonfinite(&named), None);
    // A gradient: reported with its index; a value is reported before any gradient.
    b.set_grad(Some(Tensor::from_vec(vec![f32::NAN], [1])?));
    let found = nerve_nn::first_nonfinite(&named).expect("a NaN gradient");
    assert_eq!(
        (found.name.as_str(), found.in_grad, found.index),
        ("b", true, 0)
    );
    assert!(found.to_string().contains("the gradient of `b`"), "{found}");
    let c = Tensor::from_vec(vec![0.0f32, f32::INFINITY], [2])?;
    let named = vec![("b".to_string(), b), ("c".to_string(), c)];
    let found = nerve_nn::first_nonfinite(&named).expect("an infinite value");
    assert_eq!(
        (found.name.as_str(), found.in_grad, found.index),
        ("c", false, 1)
    );
    assert_eq!(found.value, f64::INFINITY);
    // A non-finite norm leaves the gradients alone.
    assert!(nerve_nn::clip_grad_norm(&[named[0].1.clone()], 1.0)?.is_nan());
    Ok(())
}
