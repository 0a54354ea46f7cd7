//! One finite-difference gradient check (f64, central differences, PyTorch's default
//! tolerances: eps 1e-6, atol 1e-5, rtol 1e-3) per differentiable op, on shapes that include
//! broadcasting, size-1 dimensions and non-contiguous views.

use nerve_core::gradcheck::gradcheck;
use nerve_core::{manual_seed, DType, Result, Tensor};

fn rnd(dims: &[usize]) -> Tensor {
    Tensor::randn(dims).to_dtype(DType::F64).unwrap()
}

/// Random values bounded away from zero (for log, sqrt, div, pow bases).
fn pos(dims: &[usize]) -> Tensor {
    Tensor::uniform(dims, 0.5, 2.0)
        .to_dtype(DType::F64)
        .unwrap()
}

/// Random values away from the kinks of relu/abs/clamp (|x| > 0.05).
fn away(dims: &[usize]) -> Tensor {
    let x = Tensor::uniform(dims, 0.1, 2.0);
    let s = Tensor::bernoulli_p(dims, 0.5)
        .unwrap()
        .mul_scalar(2.0)
        .unwrap()
        .sub_scalar(1.0)
        .unwrap();
    x.mul(&s).unwrap().to_dtype(DType::F64).unwrap()
}

fn check(f: impl Fn(&[Tensor]) -> Result<Tensor>, inputs: &[Tensor]) {
    manual_seed(7);
    gradcheck(f, inputs).unwrap();
}

macro_rules! unary_tests {
    ($($name:ident: $gen:ident => |$x:ident| $e:expr;)*) => {$(
        #[test]
        fn $name() {
            manual_seed(1);
            // contiguous, with a size-1 dim
            check(|v| { let $x = &v[0]; $e }, &[$gen(&[3, 1, 4])]);
            // non-contiguous view (transposed)
            check(|v| { let $x = &v[0].transpose(0, 1)?; $e }, &[$gen(&[4, 3])]);
        }
    )*};
}

unary_tests! {
    neg: rnd => |x| x.neg();
    abs: away => |x| x.abs();
    exp: rnd => |x| x.exp();
    log: pos => |x| x.log();
    sqrt: pos => |x| x.sqrt();
    rsqrt: pos => |x| x.rsqrt();
    reciprocal: pos => |x| x.reciprocal();
    sin: rnd => |x| x.sin();
    cos: rnd => |x| x.cos();
    tanh: rnd => |x| x.tanh();
    sigmoid: rnd => |x| x.sigmoid();
    relu: away => |x| x.relu();
    leaky_relu: away => |x| x.leaky_relu(0.1);
    elu: away => |x| x.elu(1.3);
    gelu_erf: rnd => |x| x.gelu();
    gelu_tanh: rnd => |x| x.gelu_tanh();
    silu: rnd => |x| x.silu();
    softplus: rnd => |x| x.softplus(1.5, 20.0);
    affine: rnd => |x| x.affine(2.5, -1.0);
    powf: pos => |x| x.powf(2.7);
    square: rnd => |x| x.square();
    clamp: away => |x| x.clamp(Some(-0.8), Some(0.9));
    softmax_last: rnd => |x| x.softmax(-1);
    softmax_first: rnd => |x| x.softmax(0);
    log_softmax_last: rnd => |x| x.log_softmax(-1);
    log_softmax_first: rnd => |x| x.log_softmax(0);
    cumsum_0: rnd => |x| x.cumsum(0);
    cumsum_last: rnd => |x| x.cumsum(-1);
    sum_all: rnd => |x| x.sum();
    sum_dim0: rnd => |x| x.sum_dim(&[0], false);
    sum_dim_last_keep: rnd => |x| x.sum_dim(&[-1], true);
    mean_dims: rnd => |x| x.mean_dim(&[0, 1], false);
    var_dim: rnd => |x| x.var_dim(&[0], 1, true);
    std_all: rnd => |x| x.std_dim(&[], 1, false);
    logsumexp: rnd => |x| x.logsumexp(&[-1], false);
    norm: rnd => |x| x.norm();
    norm_p3: away => |x| x.norm_dim(3.0, &[0], false);
    amax: rnd => |x| x.amax(&[0], false);
    amin: rnd => |x| x.amin(&[-1], true);
    max_all: rnd => |x| x.max();
    max_dim_values: rnd => |x| Ok(x.max_dim(-1, false)?.0);
    min_dim_values: rnd => |x| Ok(x.min_dim(0, true)?.0);
    reshape: rnd => |x| x.reshape(&[-1, 2]);
    flatten: rnd => |x| x.flatten(0, -1);
    transpose: rnd => |x| x.transpose(0, -1);
    permute: rnd => |x| x.permute(&(0..x.rank() as isize).rev().collect::<Vec<_>>());
    narrow: rnd => |x| x.narrow(-1, 1, 2);
    slice_step: rnd => |x| x.slice(-1, 0, 3, 2);
    select: rnd => |x| x.select(0, 1);
    unsqueeze_squeeze: rnd => |x| x.unsqueeze(1)?.squeeze(1);
    expand: rnd => |x| { let mut d = vec![-1; x.rank() + 1]; d[0] = 3; x.unsqueeze(0)?.expand(&d) };
    contiguous: rnd => |x| x.contiguous();
    flip: rnd => |x| x.flip(&[0, -1]);
    roll: rnd => |x| x.roll(&[1, -2], &[0, -1]);
    pad: rnd => |x| x.pad(&[(1, 2), (0, 1)], 0.5);
    split: rnd => |x| { let p = x.split(2, -1)?; p[0].mul(&p[0])?.sum()?.add(&p[p.len() - 1].sum()?) };
    chunk: rnd => |x| { let p = x.chunk(2, 0)?; p[0].sum_dim(&[0], false)?.mul(&p[1].sum_dim(&[0], false)?) };
    dropout_eval: rnd => |x| x.dropout(0.5, false);
}

#[test]
fn to_dtype_roundtrip_through_f32() {
    // f32 rounding (~1e-7 relative) needs a larger step: eps 1e-2, atol 1e-4.
    let gc = nerve_core::gradcheck::GradCheck {
        eps: 1e-2,
        atol: 1e-4,
        rtol: 1e-3,
    };
    manual_seed(5);
    gc.check(
        |v| {
            v[0].to_dtype(DType::F32)?
                .mul_scalar(3.0)?
                .to_dtype(DType::F64)
        },
        &[rnd(&[3, 4])],
    )
    .unwrap();
}

#[test]
fn dropout_train() {
    // The mask is random per call, so fix it by reseeding inside f.
    check(
        |v| {
            manual_seed(3);
            v[0].dropout(0.3, true)
        },
        &[rnd(&[4, 5])],
    );
}

macro_rules! binary_tests {
    ($($name:ident: $ga:ident, $gb:ident => |$a:ident, $b:ident| $e:expr;)*) => {$(
        #[test]
        fn $name() {
            manual_seed(2);
            // same shape
            check(|v| { let ($a, $b) = (&v[0], &v[1]); $e }, &[$ga(&[2, 3]), $gb(&[2, 3])]);
            // broadcasting both ways with size-1 dims and a missing leading dim
            check(|v| { let ($a, $b) = (&v[0], &v[1]); $e }, &[$ga(&[2, 1, 4]), $gb(&[3, 1])]);
            // non-contiguous lhs, scalar-like rhs
            check(|v| { let ($a, $b) = (&v[0].t()?, &v[1]); $e }, &[$ga(&[4, 3]), $gb(&[1])]);
            // the same tensor used twice
            check(|v| { let ($a, $b) = (&v[0], &v[0]); $e }, &[$ga(&[3, 2])]);
        }
    )*};
}

binary_tests! {
    add: rnd, rnd => |a, b| a.add(b);
    sub: rnd, rnd => |a, b| a.sub(b);
    mul: rnd, rnd => |a, b| a.mul(b);
    div: rnd, pos => |a, b| a.div(b);
    pow: pos, rnd => |a, b| a.pow(b);
    maximum: rnd, rnd => |a, b| a.maximum(b);
    minimum: rnd, rnd => |a, b| a.minimum(b);
    where_cond: rnd, rnd => |a, b| a.gt(b)?.where_cond(a, &b.mul_scalar(2.0)?);
    masked_fill: rnd, rnd => |a, b| { let m = a.lt(b)?; a.broadcast_to(m.dims())?.masked_fill(&m, 0.25)?.mul(b) };
    operators: rnd, rnd => |a, b| Ok(&(&(a * b) + &(a / 2.0)) - b);
}

#[test]
fn matmul_2d() {
    check(|v| v[0].matmul(&v[1]), &[rnd(&[3, 4]), rnd(&[4, 5])]);
}

#[test]
fn matmul_transposed_views() {
    check(
        |v| v[0].t()?.matmul(&v[1].t()?),
        &[rnd(&[4, 3]), rnd(&[5, 4])],
    );
}

/// A Linear's `x·Wᵀ` hands `W` its gradient contiguous (`gᵀ·x` written in `W`'s layout),
/// with the values of the plain product.
#[test]
fn matmul_transposed_weight_gradient_is_contiguous() -> Result<()> {
    let x = rnd(&[4, 3]);
    let w = rnd(&[5, 3]).requires_grad_(true);
    let g = rnd(&[4, 5]);
    x.matmul(&w.t()?)?.mul(&g)?.sum()?.backward()?;
    let gw = w.grad().expect("w has a gradient");
    assert!(gw.is_contiguous());
    let want: Vec<f64> = g.t()?.matmul(&x)?.to_vec()?;
    let got: Vec<f64> = gw.to_vec()?;
    assert!(want.iter().zip(&got).all(|(a, b)| (a - b).abs() < 1e-12));
    // The same for a transposed left operand.
    let xt = x.t()?.contiguous()?.requires_grad_(true);
    xt.t()?
        .matmul(&w.detach().t()?)?
        .mul(&g)?
        .sum()?
        .backward()?;
    let gx = xt.grad().expect("xt has a gradient");
    assert!(gx.is_contiguous());
    let want: Vec<f64> = w.detach().t()?.matmul(&g.t()?)?.to_vec()?;
    let got: Vec<f64> = gx.to_vec()?;
    assert!(want.iter().zip(&got).all(|(a, b)| (a - b).abs() < 1e-12));
    Ok(())
}

#[test]
fn linear_with_and_without_bias() {
    check(
        |v| v[0].linear(&v[1], Some(&v[2])),
        &[rnd(&[2, 3, 4]), rnd(&[5, 4]), rnd(&[5])],
    );
    check(|v| v[0].linear(&v[1], None), &[rnd(&[3, 4]), rnd(&[5, 4])]);
    // Non-contiguous input and weight.
    check(
        |v| v[0].t()?.linear(&v[1].t()?, Some(&v[2])),
        &[rnd(&[4, 3]), rnd(&[4, 5]), rnd(&[5])],
    );
}

/// `linear` (one GEMM with the bias in its epilogue) equals `x·Wᵀ + b` on f32 sizes that take
/// each of the GEMM's paths.
#[test]
fn linear_matches_matmul_and_add() -> Result<()> {
    manual_seed(3);
    // Blocked and threaded with partial tiles; one row (GEMV); no inner dimension; few rows
    // with a transposed weight (the column-split path for short products).
    for (rows, inp, out, wt) in [
        (301, 200, 77, false),
        (1, 64, 40, false),
        (37, 0, 9, false),
        (24, 256, 500, true),
    ] {
        let x = Tensor::randn([rows, inp]);
        let w = if wt {
            Tensor::randn([inp, out]).t()?
        } else {
            Tensor::randn([out, inp])
        };
        let b = Tensor::randn([out]);
        let got: Vec<f32> = x.linear(&w, Some(&b))?.to_vec()?;
        let want: Vec<f32> = x.matmul(&w.t()?)?.add(&b)?.to_vec()?;
        assert_eq!(got.len(), rows * out);
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() <= 1e-4 * (1.0 + w.abs()), "{g} vs {w}");
        }
    }
    Ok(())
}

#[test]
fn linear_refuses_mismatched_shapes() {
    let x = Tensor::zeros([3, 4]);
    let err = x
        .linear(&Tensor::zeros([5, 3]), None)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("linear") && err.contains("[3, 4]") && err.contains("[5, 3]"),
        "{err}"
    );
    let err = x
        .linear(&Tensor::zeros([5, 4]), Some(&Tensor::zeros([4])))
        .unwrap_err()
        .to_string();
    assert!(err.contains("linear") && err.contains("[4]"), "{err}");
}

#[test]
fn matmul_batched_broadcast() {
    check(
        |v| v[0].matmul(&v[1]),
        &[rnd(&[2, 1, 3, 4]), rnd(&[3, 4, 2])],
    );
}

#[test]
fn matmul_vector_cases() {
    check(|v| v[0].matmul(&v[1]), &[rnd(&[4]), rnd(&[4])]);
    check(|v| v[0].matmul(&v[1]), &[rnd(&[2, 3, 4]), rnd(&[4])]);
    check(|v| v[0].matmul(&v[1]), &[rnd(&[4]), rnd(&[2, 4, 3])]);
}

#[test]
fn cat_and_stack() {
    check(
        |v| Tensor::cat(&[&v[0], &v[1]], 1),
        &[rnd(&[2, 3]), rnd(&[2, 2])],
    );
    check(
        |v| Tensor::cat(&[&v[0].t()?, &v[1]], 0),
        &[rnd(&[3, 2]), rnd(&[1, 3])],
    );
    check(
        |v| Tensor::stack(&[&v[0], &v[1], &v[0]], 1),
        &[rnd(&[2, 3]), rnd(&[2, 3])],
    );
}

fn idx(v: &[i64], dims: &[usize]) -> Tensor {
    Tensor::from_slice(v, dims).unwrap()
}

#[test]
fn index_select() {
    check(
        |v| v[0].index_select(0, &v[1]),
        &[rnd(&[4, 3]), idx(&[3, 0, 3], &[3])],
    );
    check(
        |v| v[0].t()?.index_select(1, &v[1]),
        &[rnd(&[4, 3]), idx(&[1, 1, 0, 2], &[4])],
    );
}

#[test]
fn gather() {
    check(
        |v| v[0].gather(1, &v[1]),
        &[rnd(&[3, 4]), idx(&[0, 3, 3, 1, 2, 0], &[3, 2])],
    );
    check(
        |v| v[0].gather(0, &v[1]),
        &[rnd(&[3, 4]), idx(&[2, 0, 1, 1], &[1, 4])],
    );
}

#[test]
fn scatter_add() {
    check(
        |v| v[0].scatter_add(0, &v[2], &v[1]),
        &[
            rnd(&[3, 4]),
            rnd(&[2, 4]),
            idx(&[0, 2, 2, 1, 0, 0, 1, 1], &[2, 4]),
        ],
    );
    // index smaller than src
    check(
        |v| v[0].scatter_add(1, &v[2], &v[1]),
        &[rnd(&[2, 3]), rnd(&[2, 4]), idx(&[2, 2, 0, 1], &[2, 2])],
    );
}

#[test]
fn embedding() {
    check(
        |v| v[0].embedding(&v[1]),
        &[rnd(&[5, 3]), idx(&[4, 0, 4, 2, 1, 1], &[2, 3])],
    );
}

#[test]
fn composite_mlp_step() {
    // A tensor used several times, broadcasting bias, views and reductions together.
    check(
        |v| {
            let h = v[0].matmul(&v[1])?.add(&v[2])?.tanh()?;
            let y = h.matmul(&v[1].t()?)?;
            y.log_softmax(-1)?
                .mul(&h.sum_dim(&[-1], true)?)?
                .mean_dim(&[0], false)
        },
        &[rnd(&[4, 3]), rnd(&[3, 3]), rnd(&[3])],
    );
}

// ------------------------------------------------------------------------ normalisation ops
// Inputs, weights and biases all differentiated; odd sizes, one and several positions per
// channel, and non-contiguous (transposed) inputs and weights.

#[test]
fn layer_norm_affine_and_plain() {
    check(
        |v| v[0].layer_norm(&[7], Some(&v[1]), Some(&v[2]), 1e-5),
        &[rnd(&[3, 5, 7]), rnd(&[7]), rnd(&[7])],
    );
    // Over two trailing dims.
    check(
        |v| v[0].layer_norm(&[2, 5], Some(&v[1]), Some(&v[2]), 1e-5),
        &[rnd(&[3, 2, 5]), rnd(&[2, 5]), rnd(&[2, 5])],
    );
    check(|v| v[0].layer_norm(&[5], None, None, 1e-5), &[rnd(&[4, 5])]);
    check(
        |v| v[0].layer_norm(&[5], Some(&v[1]), None, 1e-5),
        &[rnd(&[2, 5]), rnd(&[5])],
    );
    // A 17-wide row exercises the 16-lane main loop and its tail.
    check(
        |v| v[0].layer_norm(&[17], Some(&v[1]), Some(&v[2]), 1e-5),
        &[rnd(&[2, 17]), rnd(&[17]), rnd(&[17])],
    );
}

#[test]
fn layer_norm_non_contiguous_input_and_weight() {
    check(
        |v| {
            v[0].transpose(0, 1)?
                .layer_norm(&[3, 2], Some(&v[1].t()?), Some(&v[2]), 1e-5)
        },
        &[rnd(&[3, 4, 2]), rnd(&[2, 3]), rnd(&[3, 2])],
    );
}

#[test]
fn rms_norm_with_and_without_weight() {
    check(
        |v| v[0].rms_norm(&[7], Some(&v[1]), 1e-6),
        &[rnd(&[3, 5, 7]), rnd(&[7])],
    );
    check(|v| v[0].rms_norm(&[3, 4], None, 1e-6), &[rnd(&[2, 3, 4])]);
    check(
        |v| v[0].t()?.rms_norm(&[3], Some(&v[1]), 1e-6),
        &[rnd(&[3, 5]), rnd(&[3])],
    );
}

#[test]
fn group_norm_spatial_and_flat() {
    check(
        |v| v[0].group_norm(3, Some(&v[1]), Some(&v[2]), 1e-5),
        &[rnd(&[2, 6, 3, 5]), rnd(&[6]), rnd(&[6])],
    );
    // One group (LayerNorm over C, *) and one channel per group (InstanceNorm).
    check(
        |v| v[0].group_norm(1, Some(&v[1]), Some(&v[2]), 1e-5),
        &[rnd(&[3, 4, 5]), rnd(&[4]), rnd(&[4])],
    );
    check(
        |v| v[0].group_norm(4, Some(&v[1]), None, 1e-5),
        &[rnd(&[2, 4, 7]), rnd(&[4])],
    );
    // [N, C]: one position per channel.
    check(
        |v| v[0].group_norm(2, Some(&v[1]), Some(&v[2]), 1e-5),
        &[rnd(&[3, 6]), rnd(&[6]), rnd(&[6])],
    );
    check(|v| v[0].group_norm(2, None, None, 1e-5), &[rnd(&[2, 4, 3])]);
}

#[test]
fn group_norm_non_contiguous_input() {
    check(
        |v| {
            v[0].transpose(1, 2)?
                .group_norm(2, Some(&v[1]), Some(&v[2]), 1e-5)
        },
        &[rnd(&[2, 5, 4, 3]), rnd(&[4]), rnd(&[4])],
    );
}

#[test]
fn batch_norm_training() {
    for dims in [&[4usize, 3, 5][..], &[6, 4], &[2, 3, 2, 3]] {
        let c = dims[1];
        check(
            |v| {
                // Running statistics are updated in place on every call; the output does
                // not depend on them in training.
                let (rm, rv) = (Tensor::zeros([c]), Tensor::ones([c]));
                v[0].batch_norm(
                    Some(&rm),
                    Some(&rv),
                    Some(&v[1]),
                    Some(&v[2]),
                    true,
                    0.1,
                    1e-5,
                )
            },
            &[rnd(dims), rnd(&[c]), rnd(&[c])],
        );
    }
    check(
        |v| v[0].batch_norm(None, None, None, None, true, 0.1, 1e-5),
        &[rnd(&[5, 2, 3])],
    );
    // Non-contiguous input.
    check(
        |v| {
            v[0].transpose(0, 1)?
                .batch_norm(None, None, Some(&v[1]), Some(&v[2]), true, 0.1, 1e-5)
        },
        &[rnd(&[3, 4, 2]), rnd(&[3]), rnd(&[3])],
    );
}

#[test]
fn batch_norm_evaluation() {
    let rm = rnd(&[3]);
    let rv = pos(&[3]);
    check(
        |v| {
            v[0].batch_norm(
                Some(&rm),
                Some(&rv),
                Some(&v[1]),
                Some(&v[2]),
                false,
                0.1,
                1e-5,
            )
        },
        &[rnd(&[4, 3, 5]), rnd(&[3]), rnd(&[3])],
    );
    check(
        |v| v[0].batch_norm(Some(&rm), Some(&rv), None, None, false, 0.1, 1e-5),
        &[rnd(&[4, 3])],
    );
}
