//! nerve-nn against PyTorch: losses, normalisation layers, optimizers and 20 AdamW steps of the
//! `cnn` workload's network. Inputs and initial weights come from the same closed-form formula
//! as `tools/torch_nn_fixtures.py`; the fixture holds PyTorch's results.

use std::collections::HashMap;

use nerve_core::{Result, Tensor};
use nerve_nn::loss::{self, CrossEntropyOptions, Reduction};
use nerve_nn::{
    batch_norm2d, Adagrad, Adam, GroupNorm, LayerNorm, Module, ModuleExt, Optimizer, RmsNorm,
    RmsProp, Sgd,
};

fn fixtures() -> HashMap<String, Tensor> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/nn.safetensors");
    nerve_nn::checkpoint::load_safetensors(path)
        .expect("fixture (run tools/torch_nn_fixtures.py)")
        .0
}

/// `x[i] = scale · sin(0.37 i + seed)` as f32, shaped `dims` (mirrors the Python script).
fn formula(dims: &[usize], seed: f64, scale: f64) -> Tensor {
    let n: usize = dims.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|i| (scale * (0.37 * i as f64 + seed).sin()) as f32)
        .collect();
    Tensor::from_vec(v, dims).unwrap()
}

fn targets(n: usize, c: i64, seed: i64) -> Tensor {
    Tensor::from_vec(
        (0..n as i64)
            .map(|i| (i * 7 + seed) % c)
            .collect::<Vec<_>>(),
        [n],
    )
    .unwrap()
}

fn close(what: &str, got: &Tensor, want: &Tensor, tol: f64) {
    assert_eq!(got.dims(), want.dims(), "{what}: shape");
    for (i, (a, b)) in got.to_f64_vec().iter().zip(want.to_f64_vec()).enumerate() {
        assert!(
            (a - b).abs() <= tol * (1.0 + b.abs()),
            "{what} [{i}]: {a} vs {b}"
        );
    }
}

#[test]
fn losses_match_pytorch() -> Result<()> {
    let fx = fixtures();
    let logits = formula(&[6, 5], 1.0, 2.0);
    let tgt = targets(6, 5, 3);
    let cw = formula(&[5], 2.0, 0.4).add_scalar(1.0)?;
    let probs = formula(&[6, 5], 3.0, 1.5).softmax(1)?;
    let pred = formula(&[4, 3], 4.0, 1.0);
    let goal = formula(&[4, 3], 5.0, 1.0);
    let p01 = formula(&[4, 3], 6.0, 2.0).sigmoid()?;
    let y01 = formula(&[4, 3], 7.0, 1.0)
        .gt(&Tensor::zeros([4, 3]))?
        .to_dtype(nerve_core::DType::F32)?;
    let posw = formula(&[3], 8.0, 0.5).add_scalar(1.0)?;
    let logp = formula(&[4, 3], 9.0, 1.0).log_softmax(1)?;
    let q = formula(&[4, 3], 10.0, 1.0).softmax(1)?;
    let mut ign: Vec<i64> = tgt.to_vec()?;
    ign[2] = -100;
    let tgt_ign = Tensor::from_vec(ign, [6])?;
    let logits3 = formula(&[2, 4, 3], 11.0, 1.0);
    let tgt3 = Tensor::from_vec(vec![0i64, 3, 1, 2, 2, 0], [2, 3])?;
    let ce = |w: Option<&Tensor>, smooth: f64, red: Reduction| CrossEntropyOptions {
        weight: w.cloned(),
        label_smoothing: smooth,
        reduction: red,
        ..Default::default()
    };
    type Case<'a> = (
        &'a str,
        Box<dyn Fn(&Tensor) -> Result<Tensor> + 'a>,
        &'a Tensor,
    );
    let cases: Vec<Case> = vec![
        (
            "ce",
            Box::new(|x| loss::cross_entropy(x, &tgt, &ce(None, 0.0, Reduction::Mean))),
            &logits,
        ),
        (
            "ce_weight",
            Box::new(|x| loss::cross_entropy(x, &tgt, &ce(Some(&cw), 0.0, Reduction::Mean))),
            &logits,
        ),
        (
            "ce_ignore",
            Box::new(|x| loss::cross_entropy(x, &tgt_ign, &Default::default())),
            &logits,
        ),
        (
            "ce_smooth",
            Box::new(|x| loss::cross_entropy(x, &tgt, &ce(None, 0.1, Reduction::Mean))),
            &logits,
        ),
        (
            "ce_smooth_weight",
            Box::new(|x| loss::cross_entropy(x, &tgt, &ce(Some(&cw), 0.2, Reduction::Mean))),
            &logits,
        ),
        (
            "ce_sum",
            Box::new(|x| loss::cross_entropy(x, &tgt, &ce(None, 0.0, Reduction::Sum))),
            &logits,
        ),
        (
            "ce_none",
            Box::new(|x| loss::cross_entropy(x, &tgt, &ce(None, 0.0, Reduction::None))),
            &logits,
        ),
        (
            "ce_probs",
            Box::new(|x| loss::cross_entropy(x, &probs, &Default::default())),
            &logits,
        ),
        (
            "ce_3d",
            Box::new(|x| loss::cross_entropy(x, &tgt3, &Default::default())),
            &logits3,
        ),
        (
            "nll",
            Box::new(|x| {
                loss::nll_loss(
                    &x.log_softmax(1)?,
                    &tgt,
                    &ce(Some(&cw), 0.0, Reduction::Mean),
                )
            }),
            &logits,
        ),
        (
            "mse",
            Box::new(|x| loss::mse_loss(x, &goal, Reduction::Mean)),
            &pred,
        ),
        (
            "l1",
            Box::new(|x| loss::l1_loss(x, &goal, Reduction::Mean)),
            &pred,
        ),
        (
            "smooth_l1",
            Box::new(|x| loss::smooth_l1_loss(x, &goal, 0.5, Reduction::Mean)),
            &pred,
        ),
        (
            "huber",
            Box::new(|x| loss::huber_loss(x, &goal, 0.7, Reduction::Mean)),
            &pred,
        ),
        (
            "bce",
            Box::new(|x| loss::binary_cross_entropy(x, &y01, None, Reduction::Mean)),
            &p01,
        ),
        (
            "bce_logits",
            Box::new(|x| {
                loss::binary_cross_entropy_with_logits(x, &y01, None, Some(&posw), Reduction::Mean)
            }),
            &pred,
        ),
        (
            "kl_div",
            Box::new(|x| loss::kl_div(x, &q, Reduction::BatchMean, false)),
            &logp,
        ),
    ];
    for (name, f, x) in cases {
        let x = x.detach().requires_grad_(true);
        let y = f(&x)?;
        close(
            &format!("{name} out"),
            &y,
            &fx[&format!("loss.{name}.out")],
            1e-5,
        );
        y.backward_with(&Tensor::ones_like(&y))?;
        close(
            &format!("{name} grad"),
            &x.grad().unwrap(),
            &fx[&format!("loss.{name}.grad")],
            1e-5,
        );
    }
    Ok(())
}

fn layer_case(
    fx: &HashMap<String, Tensor>,
    name: &str,
    layer: &dyn Module,
    x: &Tensor,
) -> Result<()> {
    let x = x.detach().requires_grad_(true);
    layer.zero_grad();
    let y = layer.forward(&x)?;
    close(
        &format!("{name} out"),
        &y,
        &fx[&format!("layer.{name}.out")],
        1e-4,
    );
    y.backward_with(&formula(y.dims(), 20.0, 1.0))?;
    close(
        &format!("{name} grad_input"),
        &x.grad().unwrap(),
        &fx[&format!("layer.{name}.grad_input")],
        1e-4,
    );
    for (pn, p) in layer.named_parameters() {
        close(
            &format!("{name} grad {pn}"),
            &p.grad().unwrap(),
            &fx[&format!("layer.{name}.grad.{pn}")],
            1e-4,
        );
    }
    for (bn, b) in layer.named_buffers() {
        close(
            &format!("{name} buffer {bn}"),
            &b,
            &fx[&format!("layer.{name}.buffer.{bn}")],
            1e-5,
        );
    }
    Ok(())
}

#[test]
fn normalisation_layers_match_pytorch() -> Result<()> {
    let fx = fixtures();
    let bn = batch_norm2d(3);
    bn.weight
        .copy_(&formula(&[3], 12.0, 0.5).add_scalar(1.0)?)?;
    bn.bias.copy_(&formula(&[3], 13.0, 0.5))?;
    layer_case(&fx, "bn_train", &bn, &formula(&[4, 3, 5, 5], 14.0, 2.0))?;
    bn.eval();
    layer_case(&fx, "bn_eval", &bn, &formula(&[4, 3, 5, 5], 15.0, 2.0))?;
    let ln = LayerNorm::new(&[8]);
    ln.weight
        .as_ref()
        .unwrap()
        .copy_(&formula(&[8], 16.0, 0.5).add_scalar(1.0)?)?;
    ln.bias.as_ref().unwrap().copy_(&formula(&[8], 17.0, 0.5))?;
    layer_case(&fx, "layernorm", &ln, &formula(&[2, 3, 8], 18.0, 2.0))?;
    let gn = GroupNorm::new(2, 4)?;
    gn.weight
        .copy_(&formula(&[4], 19.0, 0.5).add_scalar(1.0)?)?;
    gn.bias.copy_(&formula(&[4], 21.0, 0.5))?;
    layer_case(&fx, "groupnorm", &gn, &formula(&[2, 4, 3, 3], 22.0, 2.0))?;
    let rms = RmsNorm::new(&[8], 1e-6);
    rms.weight
        .copy_(&formula(&[8], 23.0, 0.5).add_scalar(1.0)?)?;
    layer_case(&fx, "rmsnorm", &rms, &formula(&[2, 3, 8], 24.0, 2.0))
}

#[test]
fn optimizers_match_pytorch() -> Result<()> {
    let fx = fixtures();
    let c = formula(&[7], 30.0, 0.5).add_scalar(1.0)?;
    let t = formula(&[7], 31.0, 1.0);
    let quad = |p: &Tensor| -> Result<Tensor> {
        p.sub(&t)?
            .square()?
            .mul(&c)?
            .sum()?
            .add(&p.powf(4.0)?.sum()?.mul_scalar(0.1)?)
    };
    type Make = Box<dyn Fn(Vec<Tensor>) -> Box<dyn Optimizer>>;
    let makes: Vec<(&str, Make)> = vec![
        ("sgd", Box::new(|ps| Box::new(Sgd::new(ps, 0.05)))),
        (
            "sgd_momentum",
            Box::new(|ps| {
                let mut o = Sgd::new(ps, 0.05);
                (o.momentum, o.dampening, o.weight_decay) = (0.9, 0.1, 0.01);
                Box::new(o)
            }),
        ),
        (
            "sgd_nesterov",
            Box::new(|ps| {
                let mut o = Sgd::new(ps, 0.05);
                (o.momentum, o.nesterov) = (0.9, true);
                Box::new(o)
            }),
        ),
        (
            "adam",
            Box::new(|ps| {
                let mut o = Adam::new(ps, 0.05);
                o.weight_decay = 0.01;
                Box::new(o)
            }),
        ),
        ("adamw", Box::new(|ps| Box::new(Adam::adamw(ps, 0.05, 0.1)))),
        (
            "rmsprop",
            Box::new(|ps| {
                let mut o = RmsProp::new(ps, 0.01);
                (o.momentum, o.weight_decay) = (0.5, 0.01);
                Box::new(o)
            }),
        ),
        (
            "adagrad",
            Box::new(|ps| {
                let mut o = Adagrad::new(ps, 0.1);
                (o.lr_decay, o.weight_decay) = (0.01, 0.01);
                Box::new(o)
            }),
        ),
    ];
    for (name, make) in makes {
        let p = formula(&[7], 32.0, 1.0).requires_grad_(true);
        let mut opt = make(vec![p.clone()]);
        for _ in 0..6 {
            opt.zero_grad();
            quad(&p)?.backward()?;
            opt.step()?;
        }
        close(name, &p, &fx[&format!("optim.{name}.final")], 1e-5);
    }
    Ok(())
}

#[test]
fn attention_matches_pytorch() -> Result<()> {
    use nerve_nn::{scaled_dot_product_attention, SdpaOptions};
    let fx = fixtures();
    let q = formula(&[2, 3, 5, 4], 50.0, 1.0);
    let k = formula(&[2, 3, 6, 4], 51.0, 1.0);
    let v = formula(&[2, 3, 6, 3], 52.0, 1.0);
    let bool_mask = formula(&[5, 6], 53.0, 1.0).gt(&Tensor::full([5, 6], -0.5))?;
    let float_mask = formula(&[2, 1, 5, 6], 54.0, 0.5);
    let cases = [
        ("plain", SdpaOptions::default()),
        (
            "causal",
            SdpaOptions {
                causal: true,
                ..Default::default()
            },
        ),
        (
            "bool_mask",
            SdpaOptions {
                mask: Some(bool_mask),
                ..Default::default()
            },
        ),
        (
            "float_mask",
            SdpaOptions {
                mask: Some(float_mask),
                scale: Some(0.3),
                ..Default::default()
            },
        ),
    ];
    for (name, opts) in cases {
        let (qq, kk, vv) = (
            q.detach().requires_grad_(true),
            k.detach().requires_grad_(true),
            v.detach().requires_grad_(true),
        );
        let y = scaled_dot_product_attention(&qq, &kk, &vv, &opts)?;
        close(
            &format!("sdpa {name} out"),
            &y,
            &fx[&format!("sdpa.{name}.out")],
            1e-5,
        );
        y.backward_with(&formula(y.dims(), 55.0, 1.0))?;
        for (n, t) in [("q", &qq), ("k", &kk), ("v", &vv)] {
            close(
                &format!("sdpa {name} grad {n}"),
                &t.grad().unwrap(),
                &fx[&format!("sdpa.{name}.grad_{n}")],
                1e-5,
            );
        }
    }
    Ok(())
}

#[test]
fn recurrent_layers_match_pytorch() -> Result<()> {
    use nerve_nn::{Rnn, RnnKind, RnnOptions, RnnState};
    let fx = fixtures();
    let cases = [
        (
            "lstm",
            RnnKind::Lstm,
            RnnOptions {
                num_layers: 2,
                bidirectional: true,
                batch_first: true,
                ..Default::default()
            },
        ),
        (
            "gru",
            RnnKind::Gru,
            RnnOptions {
                num_layers: 2,
                bidirectional: true,
                ..Default::default()
            },
        ),
        ("rnn", RnnKind::RnnTanh, RnnOptions::default()),
    ];
    for (name, kind, opts) in cases {
        let layer = Rnn::new(kind, 3, 4, opts)?;
        for (k, (_, p)) in layer.named_parameters().iter().enumerate() {
            p.copy_(&formula(p.dims(), 60.0 + k as f64, 0.5))?;
        }
        let x = formula(
            if opts.batch_first {
                &[2, 5, 3]
            } else {
                &[5, 2, 3]
            },
            70.0,
            1.0,
        )
        .requires_grad_(true);
        let dirs = if opts.bidirectional { 2 } else { 1 };
        let sd = [opts.num_layers * dirs, 2, 4];
        let h0 = formula(&sd, 71.0, 0.5).requires_grad_(true);
        let c0 = formula(&sd, 72.0, 0.5).requires_grad_(true);
        let state = RnnState {
            h: h0.clone(),
            c: (kind == RnnKind::Lstm).then(|| c0.clone()),
        };
        let (y, st) = layer.forward_with_state(&x, Some(&state))?;
        close(
            &format!("{name} out"),
            &y,
            &fx[&format!("rnn.{name}.out")],
            1e-5,
        );
        close(
            &format!("{name} hn"),
            &st.h,
            &fx[&format!("rnn.{name}.hn")],
            1e-5,
        );
        let mut loss = y
            .mul(&formula(y.dims(), 73.0, 1.0))?
            .sum()?
            .add(&st.h.mul(&formula(st.h.dims(), 74.0, 1.0))?.sum()?)?;
        if let Some(c) = &st.c {
            close(
                &format!("{name} cn"),
                c,
                &fx[&format!("rnn.{name}.cn")],
                1e-5,
            );
            loss = loss.add(&c.mul(&formula(c.dims(), 75.0, 1.0))?.sum()?)?;
        }
        loss.backward()?;
        close(
            &format!("{name} grad x"),
            &x.grad().unwrap(),
            &fx[&format!("rnn.{name}.grad_x")],
            1e-4,
        );
        close(
            &format!("{name} grad h0"),
            &h0.grad().unwrap(),
            &fx[&format!("rnn.{name}.grad_h0")],
            1e-4,
        );
        if kind == RnnKind::Lstm {
            close(
                &format!("{name} grad c0"),
                &c0.grad().unwrap(),
                &fx[&format!("rnn.{name}.grad_c0")],
                1e-4,
            );
        }
        for (pn, p) in layer.named_parameters() {
            close(
                &format!("{name} grad {pn}"),
                &p.grad().unwrap(),
                &fx[&format!("rnn.{name}.grad.{pn}")],
                1e-4,
            );
        }
    }
    Ok(())
}

#[test]
fn multihead_attention_matches_pytorch() -> Result<()> {
    use nerve_nn::{MhaMasks, MultiheadAttention};
    let fx = fixtures();
    for (name, batch_first) in [("mha_bf", true), ("mha_sf", false)] {
        let mha = MultiheadAttention::new(8, 2, true, batch_first)?;
        let names: Vec<String> = mha.named_parameters().into_iter().map(|(n, _)| n).collect();
        assert_eq!(
            names,
            [
                "in_proj_weight",
                "in_proj_bias",
                "out_proj.weight",
                "out_proj.bias"
            ]
        );
        for (k, (_, p)) in mha.named_parameters().iter().enumerate() {
            p.copy_(&formula(p.dims(), 80.0 + k as f64, 0.4))?;
        }
        let (sq, skv): (&[usize], &[usize]) = if batch_first {
            (&[2, 5, 8], &[2, 6, 8])
        } else {
            (&[5, 2, 8], &[6, 2, 8])
        };
        let q = formula(sq, 90.0, 1.0).requires_grad_(true);
        let k = formula(skv, 91.0, 1.0).requires_grad_(true);
        let v = formula(skv, 92.0, 1.0).requires_grad_(true);
        let masks = if batch_first {
            let mut kpm = vec![0u8; 12];
            kpm[5] = 1;
            MhaMasks {
                key_padding_mask: Some(
                    Tensor::from_vec(kpm, [2, 6])?.to_dtype(nerve_core::DType::Bool)?,
                ),
                attn_mask: Some(formula(&[5, 6], 93.0, 1.0).gt(&Tensor::full([5, 6], 0.7))?),
                is_causal: false,
            }
        } else {
            MhaMasks {
                attn_mask: Some(formula(&[5, 6], 94.0, 0.5)),
                ..Default::default()
            }
        };
        let y = mha.attend(&q, &k, &v, &masks)?;
        close(
            &format!("{name} out"),
            &y,
            &fx[&format!("{name}.out")],
            1e-5,
        );
        y.backward_with(&formula(y.dims(), 95.0, 1.0))?;
        for (n, t) in [("q", &q), ("k", &k), ("v", &v)] {
            close(
                &format!("{name} grad {n}"),
                &t.grad().unwrap(),
                &fx[&format!("{name}.grad_{n}")],
                1e-4,
            );
        }
        for (pn, p) in mha.named_parameters() {
            close(
                &format!("{name} grad {pn}"),
                &p.grad().unwrap(),
                &fx[&format!("{name}.grad.{pn}")],
                1e-4,
            );
        }
    }
    Ok(())
}
