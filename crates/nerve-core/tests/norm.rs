//! The fused normalisation ops against their composite formulas (built from primitive ops and
//! differentiated by autodiff): outputs and every gradient, in f64 to 1e-10 on sizes that
//! split across threads; f32 against f64 to 1e-5; batch norm's running statistics; errors.

use nerve_core::{manual_seed, DType, Result, Tensor};

fn rnd(dims: &[usize], dtype: DType) -> Tensor {
    Tensor::randn(dims).to_dtype(dtype).unwrap()
}

/// Leaves of `xs` (copies requiring grad), `f` on them, then backward with a fixed random
/// upstream gradient: the output and each leaf's gradient.
fn run(f: impl Fn(&[Tensor]) -> Result<Tensor>, xs: &[Tensor]) -> (Tensor, Vec<Tensor>) {
    let leaves: Vec<Tensor> = xs
        .iter()
        .map(|x| x.detach().copy().unwrap().requires_grad_(true))
        .collect();
    let y = f(&leaves).unwrap();
    manual_seed(99);
    let g = Tensor::randn(y.dims()).to_dtype(y.dtype()).unwrap();
    y.backward_with(&g).unwrap();
    // An input the output does not depend on gets a zero gradient.
    let grads = leaves
        .iter()
        .map(|l| l.grad().unwrap_or_else(|| l.zeros_like()))
        .collect();
    (y, grads)
}

/// Largest `|a - b| / (1 + |b|)`.
fn max_err(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims());
    a.to_f64_vec()
        .iter()
        .zip(b.to_f64_vec())
        .map(|(x, y)| (x - y).abs() / (1.0 + y.abs()))
        .fold(0.0, f64::max)
}

/// `fused` and `composite` agree on the output and every gradient within `tol`.
fn same(
    what: &str,
    fused: impl Fn(&[Tensor]) -> Result<Tensor>,
    composite: impl Fn(&[Tensor]) -> Result<Tensor>,
    xs: &[Tensor],
    tol: f64,
) {
    let (y1, g1) = run(fused, xs);
    let (y2, g2) = run(composite, xs);
    let e = max_err(&y1, &y2);
    assert!(e <= tol, "{what}: output off by {e:e}");
    for (i, (a, b)) in g1.iter().zip(&g2).enumerate() {
        let e = max_err(a, b);
        assert!(e <= tol, "{what}: gradient of input {i} off by {e:e}");
    }
}

/// `(x - mean) / sqrt(var + eps)` over `dims` (biased variance).
fn standardize(x: &Tensor, dims: &[isize], eps: f64) -> Result<Tensor> {
    let xc = x.sub(&x.mean_dim(dims, true)?)?;
    let var = xc.square()?.mean_dim(dims, true)?;
    xc.mul(&var.add_scalar(eps)?.rsqrt()?)
}

/// Per-channel parameter `[C]` shaped to broadcast over `[N, C, *]` of rank `rank`.
fn per_channel(p: &Tensor, rank: usize) -> Result<Tensor> {
    let mut d = vec![-1isize];
    d.extend(std::iter::repeat_n(1, rank - 2));
    p.reshape(&d)
}

#[test]
fn layer_norm_matches_composite() {
    manual_seed(1);
    let f64_ = DType::F64;
    // 16 × 128 × 129: large enough to split across threads, rows with a 16-lane tail.
    for (dims, norm) in [(vec![16, 128, 129], vec![129]), (vec![3, 5, 7], vec![5, 7])] {
        let xs = [
            rnd(&dims, f64_).affine(2.0, 3.0).unwrap(),
            rnd(&norm, f64_),
            rnd(&norm, f64_),
        ];
        let nd: Vec<isize> = (dims.len() - norm.len()..dims.len())
            .map(|d| d as isize)
            .collect();
        same(
            "layer_norm",
            |v| v[0].layer_norm(&norm, Some(&v[1]), Some(&v[2]), 1e-5),
            |v| standardize(&v[0], &nd, 1e-5)?.mul(&v[1])?.add(&v[2]),
            &xs,
            1e-10,
        );
        same(
            "rms_norm",
            |v| v[0].rms_norm(&norm, Some(&v[1]), 1e-6),
            |v| {
                let ms = v[0].square()?.mean_dim(&nd, true)?;
                v[0].mul(&ms.add_scalar(1e-6)?.rsqrt()?)?.mul(&v[1])
            },
            &xs[..2],
            1e-10,
        );
    }
}

#[test]
fn group_norm_matches_composite() {
    manual_seed(2);
    let f64_ = DType::F64;
    for (dims, groups) in [
        (vec![8usize, 16, 24, 25], 4usize),
        (vec![3, 6, 5], 3),
        (vec![4, 6], 2),
    ] {
        let c = dims[1];
        let xs = [
            rnd(&dims, f64_).affine(1.5, -2.0).unwrap(),
            rnd(&[c], f64_),
            rnd(&[c], f64_),
        ];
        let rank = dims.len();
        same(
            "group_norm",
            |v| v[0].group_norm(groups, Some(&v[1]), Some(&v[2]), 1e-5),
            |v| {
                let g = v[0].reshape(&[dims[0] as isize, groups as isize, -1])?;
                let dims_i: Vec<isize> = dims.iter().map(|&d| d as isize).collect();
                standardize(&g, &[2], 1e-5)?
                    .reshape(&dims_i)?
                    .mul(&per_channel(&v[1], rank)?)?
                    .add(&per_channel(&v[2], rank)?)
            },
            &xs,
            1e-10,
        );
    }
}

#[test]
fn batch_norm_matches_composite() {
    manual_seed(3);
    let f64_ = DType::F64;
    for dims in [vec![32usize, 16, 12, 12], vec![7, 5, 3], vec![9, 4]] {
        let (c, rank) = (dims[1], dims.len());
        let xs = [
            rnd(&dims, f64_).affine(0.5, 1.0).unwrap(),
            rnd(&[c], f64_),
            rnd(&[c], f64_),
        ];
        let red: Vec<isize> = (0..rank as isize).filter(|&d| d != 1).collect();
        same(
            "batch_norm training",
            |v| v[0].batch_norm(None, None, Some(&v[1]), Some(&v[2]), true, 0.1, 1e-5),
            |v| {
                standardize(&v[0], &red, 1e-5)?
                    .mul(&per_channel(&v[1], rank)?)?
                    .add(&per_channel(&v[2], rank)?)
            },
            &xs,
            1e-10,
        );
        let rm = rnd(&[c], f64_);
        let rv = Tensor::uniform([c], 0.5, 2.0).to_dtype(f64_).unwrap();
        same(
            "batch_norm evaluation",
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
            |v| {
                let m = per_channel(&rm, rank)?;
                let s = per_channel(&rv.add_scalar(1e-5)?.rsqrt()?, rank)?;
                v[0].sub(&m)?
                    .mul(&s)?
                    .mul(&per_channel(&v[1], rank)?)?
                    .add(&per_channel(&v[2], rank)?)
            },
            &xs,
            1e-10,
        );
    }
}

/// A norm applied to `[x, weight, bias]`.
type Op = dyn Fn(&[Tensor]) -> Result<Tensor>;

#[test]
fn f32_matches_f64() {
    // Large groups with an offset mean (|mean| ≫ std stresses f32 accumulation): 1e-5.
    manual_seed(4);
    let x = Tensor::randn([8, 32, 30, 30]).affine(0.5, 20.0).unwrap();
    let w = Tensor::randn([32]);
    let b = Tensor::randn([32]);
    let cases: [(&str, Box<Op>); 4] = [
        (
            "group_norm",
            Box::new(|v| v[0].group_norm(8, Some(&v[1]), Some(&v[2]), 1e-5)),
        ),
        (
            "batch_norm",
            Box::new(|v| v[0].batch_norm(None, None, Some(&v[1]), Some(&v[2]), true, 0.1, 1e-5)),
        ),
        (
            "layer_norm",
            Box::new(|v| {
                v[0].reshape(&[-1, 32])?
                    .layer_norm(&[32], Some(&v[1]), Some(&v[2]), 1e-5)
            }),
        ),
        (
            "rms_norm",
            Box::new(|v| v[0].reshape(&[-1, 32])?.rms_norm(&[32], Some(&v[1]), 1e-6)),
        ),
    ];
    for (name, f) in cases {
        let (y32, g32) = run(&f, &[x.clone(), w.clone(), b.clone()]);
        let to64 = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
        let (y64, g64) = run(&f, &[to64(&x), to64(&w), to64(&b)]);
        assert_eq!(y32.dtype(), DType::F32);
        let e = max_err(&y32, &y64);
        assert!(e < 1e-5, "{name} output: {e:e}");
        // The weight and bias gradients sum ~10^5 terms: relative to their size.
        for (i, (a, b)) in g32.iter().zip(&g64).enumerate() {
            let scale = b
                .abs()
                .unwrap()
                .max()
                .unwrap()
                .item::<f64>()
                .unwrap()
                .max(1.0);
            let e = max_err(a, b) / scale;
            assert!(e < 1e-5, "{name} gradient {i}: {e:e}");
        }
    }
}

#[test]
fn batch_norm_updates_running_statistics() {
    manual_seed(5);
    let x = Tensor::randn([6, 3, 4]).to_dtype(DType::F64).unwrap();
    let rm = Tensor::from_slice(&[0.5f32, -1.0, 2.0], [3]).unwrap();
    let rv = Tensor::from_slice(&[1.0f32, 2.0, 0.5], [3]).unwrap();
    let (rm0, rv0) = (rm.to_f64_vec(), rv.to_f64_vec());
    x.batch_norm(Some(&rm), Some(&rv), None, None, true, 0.25, 1e-5)
        .unwrap();
    let mean = x.mean_dim(&[0, 2], false).unwrap().to_f64_vec();
    let var = x.var_dim(&[0, 2], 1, false).unwrap().to_f64_vec();
    // f32 buffers: one rounding.
    for c in 0..3 {
        let want_m = 0.75 * rm0[c] + 0.25 * mean[c];
        let want_v = 0.75 * rv0[c] + 0.25 * var[c];
        assert!((rm.to_f64_vec()[c] - want_m).abs() < 1e-6);
        assert!((rv.to_f64_vec()[c] - want_v).abs() < 1e-6);
    }
    // Evaluation leaves them alone.
    let (rm1, rv1) = (rm.to_f64_vec(), rv.to_f64_vec());
    x.batch_norm(Some(&rm), Some(&rv), None, None, false, 0.25, 1e-5)
        .unwrap();
    assert_eq!((rm.to_f64_vec(), rv.to_f64_vec()), (rm1, rv1));
}

#[test]
fn norm_errors_name_the_op() {
    let x = Tensor::randn([2, 6, 3]);
    let msg = |r: Result<Tensor>| r.unwrap_err().to_string();
    assert!(msg(x.layer_norm(&[4], None, None, 1e-5)).contains("layer_norm"));
    assert!(msg(x.rms_norm(&[2, 3], None, 1e-5)).contains("rms_norm"));
    assert!(msg(x.group_norm(4, None, None, 1e-5)).contains("group_norm"));
    let w = Tensor::ones([5]);
    assert!(msg(x.group_norm(3, Some(&w), None, 1e-5)).contains("group_norm"));
    assert!(msg(x.batch_norm(None, None, None, None, false, 0.1, 1e-5)).contains("batch_norm"));
    let one = Tensor::randn([1, 6]);
    assert!(msg(one.batch_norm(None, None, None, None, true, 0.1, 1e-5)).contains("batch_norm"));
    let ints = Tensor::zeros_with([2, 3], DType::I64);
    assert!(ints.layer_norm(&[3], None, None, 1e-5).is_err());
}

#[test]
fn empty_inputs_give_empty_outputs_and_gradients() {
    for dims in [[0usize, 4, 3], [2, 0, 3], [2, 4, 0]] {
        let x = Tensor::zeros(dims).requires_grad_(true);
        let c = dims[1];
        let w = Tensor::ones([c]).requires_grad_(true);
        let (rm, rv) = (Tensor::zeros([c]), Tensor::ones([c]));
        let outs = [
            x.layer_norm(&dims[2..], None, None, 1e-5).unwrap(),
            x.group_norm(1, Some(&w), Some(&w), 1e-5).unwrap(),
            x.batch_norm(Some(&rm), Some(&rv), Some(&w), None, false, 0.1, 1e-5)
                .unwrap(),
        ];
        for y in outs {
            assert_eq!(y.dims(), &dims);
            y.sum().unwrap().backward().unwrap();
        }
        assert_eq!(x.grad().unwrap().dims(), &dims);
    }
}
