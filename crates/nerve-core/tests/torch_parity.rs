//! Parity with PyTorch: outputs and input gradients of every op against fixtures written by
//! `tools/torch_fixtures.py` (PyTorch, f32). Tolerance: |nerve - torch| <= 1e-5 + 1e-4·|torch|
//! (f32 kernels that sum in a different order), unless a case states otherwise.

use std::collections::HashMap;

use nerve_core::{DType, Result, Tensor};
use safetensors::{Dtype, SafeTensors};

struct Fixtures {
    tensors: HashMap<String, Tensor>,
}

impl Fixtures {
    fn load() -> Fixtures {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/ops.safetensors"
        );
        let bytes = std::fs::read(path).expect("fixture file (run tools/torch_fixtures.py)");
        let st = SafeTensors::deserialize(&bytes).expect("valid safetensors");
        let mut tensors = HashMap::new();
        for (name, view) in st.tensors() {
            let dims = view.shape().to_vec();
            let data = view.data();
            let t = match view.dtype() {
                Dtype::F32 => Tensor::from_vec(
                    data.chunks_exact(4)
                        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                        .collect::<Vec<f32>>(),
                    dims,
                ),
                Dtype::I64 => Tensor::from_vec(
                    data.chunks_exact(8)
                        .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
                        .collect::<Vec<i64>>(),
                    dims,
                ),
                d => panic!("unexpected fixture dtype {d:?}"),
            }
            .unwrap();
            tensors.insert(name, t);
        }
        Fixtures { tensors }
    }

    fn get(&self, name: &str) -> Option<Tensor> {
        self.tensors.get(name).cloned()
    }

    /// Run `f` on the case's inputs, compare its output and every input gradient.
    fn check(&self, case: &str, f: impl Fn(&[Tensor]) -> Result<Tensor>) {
        let inputs: Vec<Tensor> = (0..)
            .map_while(|i| self.get(&format!("{case}.in{i}")))
            .map(|t| {
                let float = t.dtype() == DType::F32;
                t.requires_grad_(float)
            })
            .collect();
        assert!(!inputs.is_empty(), "no fixture for {case}");
        let out = f(&inputs).unwrap_or_else(|e| panic!("{case}: {e}"));
        let want = self.get(&format!("{case}.out")).unwrap();
        assert_close(case, "output", &out, &want);
        let Some(gout) = self.get(&format!("{case}.gout")) else {
            return;
        };
        if !out.requires_grad() {
            return;
        }
        out.backward_with(&gout).unwrap();
        for (i, x) in inputs.iter().enumerate() {
            if let Some(want) = self.get(&format!("{case}.grad{i}")) {
                let got = x.grad().unwrap_or_else(|| x.zeros_like());
                assert_close(case, &format!("grad of input {i}"), &got, &want);
            }
        }
    }
}

fn assert_close(case: &str, what: &str, got: &Tensor, want: &Tensor) {
    assert_eq!(got.dims(), want.dims(), "{case}: {what} shape");
    let (g, w) = (got.to_f64_vec(), want.to_f64_vec());
    for (i, (a, b)) in g.iter().zip(&w).enumerate() {
        let ok = (a - b).abs() <= 1e-5 + 1e-4 * b.abs() || (a.is_nan() && b.is_nan());
        assert!(ok, "{case}: {what} element {i}: nerve {a} vs torch {b}");
    }
}

macro_rules! parity {
    ($($name:ident => |$v:ident| $e:expr;)*) => {$(
        #[test]
        fn $name() {
            FIX.with(|f| f.check(stringify!($name), |$v: &[Tensor]| $e));
        }
    )*};
}

thread_local! {
    static FIX: Fixtures = Fixtures::load();
}

parity! {
    neg => |v| v[0].neg();
    abs => |v| v[0].abs();
    exp => |v| v[0].exp();
    log => |v| v[0].log();
    sqrt => |v| v[0].sqrt();
    rsqrt => |v| v[0].rsqrt();
    reciprocal => |v| v[0].reciprocal();
    sin => |v| v[0].sin();
    cos => |v| v[0].cos();
    tanh => |v| v[0].tanh();
    sigmoid => |v| v[0].sigmoid();
    relu => |v| v[0].relu();
    leaky_relu => |v| v[0].leaky_relu(0.01);
    elu => |v| v[0].elu(1.0);
    gelu => |v| v[0].gelu();
    gelu_tanh => |v| v[0].gelu_tanh();
    silu => |v| v[0].silu();
    softplus => |v| v[0].softplus(1.0, 20.0);
    clamp => |v| v[0].clamp(Some(-0.5), Some(0.7));
    powf => |v| v[0].powf(1.7);
    add => |v| v[0].add(&v[1]);
    sub => |v| v[0].sub(&v[1]);
    mul => |v| v[0].mul(&v[1]);
    div => |v| v[0].div(&v[1]);
    pow => |v| v[0].pow(&v[1]);
    maximum => |v| v[0].maximum(&v[1]);
    minimum => |v| v[0].minimum(&v[1]);
    where_cond => |v| v[0].gt(&v[1])?.where_cond(&v[0], &v[1].mul_scalar(2.0)?);
    masked_fill => |v| v[0].masked_fill(&v[1].gt(&Tensor::scalar(0f32))?, 0.25);
    sum_dims => |v| v[0].sum_dim(&[0, 2], false);
    sum_keep => |v| v[0].sum_dim(&[1], true);
    mean => |v| v[0].mean_dim(&[-1], false);
    var => |v| v[0].var_dim(&[1], 1, false);
    var_biased => |v| v[0].var_dim(&[0, 2], 0, true);
    std => |v| v[0].std_dim(&[], 1, false);
    amax => |v| v[0].amax(&[1, 2], false);
    max_dim => |v| Ok(v[0].max_dim(1, false)?.0);
    min_dim => |v| Ok(v[0].min_dim(-1, true)?.0);
    logsumexp => |v| v[0].logsumexp(&[2], false);
    norm => |v| v[0].norm_dim(2.0, &[0, 1], false);
    softmax0 => |v| v[0].softmax(0);
    softmax2 => |v| v[0].softmax(-1);
    log_softmax1 => |v| v[0].log_softmax(1);
    cumsum => |v| v[0].cumsum(1);
    argmax => |v| v[0].argmax(1, false);
    matmul_2d => |v| v[0].matmul(&v[1]);
    matmul_batched => |v| v[0].matmul(&v[1]);
    matmul_vec => |v| v[0].matmul(&v[1]);
    matmul_t => |v| v[0].t()?.matmul(&v[1].t()?);
    cat => |v| Tensor::cat(&[&v[0], &v[1]], 1);
    stack => |v| Tensor::stack(&[&v[0], &v[1]], -1);
    flip => |v| v[0].flip(&[0, 2]);
    roll => |v| v[0].roll(&[1, -1], &[0, 2]);
    pad => |v| v[0].pad(&[(1, 2), (0, 1)], 0.5);
    index_select => |v| v[0].index_select(1, &v[1]);
    gather => |v| v[0].gather(1, &v[1]);
    scatter_add => |v| v[0].scatter_add(0, &v[2], &v[1]);
    embedding => |v| v[0].embedding(&v[1]);
}
