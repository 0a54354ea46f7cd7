//! Matrix products: `matmul` with PyTorch's rules (1-D operands, batched, batch dims
//! broadcast). Transposed and strided views go to the GEMM kernel without a copy.

use rayon::prelude::*;

use super::float_dispatch;
use crate::dtype::Element;
use crate::kernels::gemm::{gemm, gemm_bias};
use crate::kernels::strided::Runs;
use crate::kernels::{assume_init, uninit_buf, SendPtr};
use crate::shape::broadcast_shapes;
use crate::threading::{install, num_threads};
use crate::{Error, Result, Tensor};

/// Products smaller than this (m·n·k) per batch item, which a GEMM would run on one thread, are
/// run one per thread, batch-parallel.
const SMALL_GEMM: usize = crate::kernels::gemm::GEMM_PAR_MIN;

impl Tensor {
    /// Matrix product with PyTorch's `matmul` rules.
    pub fn matmul(&self, rhs: &Tensor) -> Result<Tensor> {
        const OP: &str = "matmul";
        self.check_same_dtype(rhs, OP)?;
        match (self.rank(), rhs.rank()) {
            (0, _) | (_, 0) => Err(Error::shape_mismatch(OP, self.dims(), rhs.dims())),
            (1, 1) => self
                .unsqueeze(0)?
                .mm_batched(&rhs.unsqueeze(1)?)?
                .reshape_usize(&[]),
            (1, _) => self.unsqueeze(0)?.mm_batched(rhs)?.squeeze(-2),
            (_, 1) => self.mm_batched(&rhs.unsqueeze(1)?)?.squeeze(-1),
            (ra, 2) if ra > 2 && self.dims()[ra - 1] > 0 => {
                // [..., M, K] · [K, N]: the batch dims fold into the rows (as PyTorch does),
                // so one large GEMM runs instead of one small one per batch item, and the
                // weight's gradient is one GEMM, not a batch of them summed.
                let k = self.dims()[ra - 1];
                if rhs.dims()[0] != k {
                    return Err(Error::shape_mismatch(OP, self.dims(), rhs.dims()));
                }
                let mut out_dims = self.dims().to_vec();
                out_dims[ra - 1] = rhs.dims()[1];
                self.reshape_usize(&[self.numel() / k, k])?
                    .mm_batched(rhs)?
                    .reshape_usize(&out_dims)
            }
            _ => self.mm_batched(rhs),
        }
    }

    /// `x·Wᵀ + b` over the last dimension (PyTorch's `torch.nn.functional.linear`): `self`
    /// `[..., in]`, `weight` `[out, in]`, `bias` `[out]`; returns `[..., out]`.
    ///
    /// For f32 and f64 this is one GEMM over all leading dimensions with the bias added to
    /// each tile of the output as it is stored, and one autodiff node whose backward forms
    /// `dx = g·W`, `dW = gᵀ·x` (contiguous, in the weight's layout) and `db = Σ g` over the
    /// rows: no separate pass over the output for the bias, forward or backward. Other dtypes
    /// run as `matmul` and `add`.
    pub fn linear(&self, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        const OP: &str = "linear";
        self.check_same_dtype(weight, OP)?;
        if let Some(b) = bias {
            self.check_same_dtype(b, OP)?;
        }
        let (out_f, in_f) = match *weight.dims() {
            [o, i] => (o, i),
            _ => return Err(Error::shape_mismatch(OP, self.dims(), weight.dims())),
        };
        if self.rank() == 0 || self.dims()[self.rank() - 1] != in_f {
            return Err(Error::shape_mismatch(OP, self.dims(), weight.dims()));
        }
        if let Some(b) = bias.filter(|b| b.dims() != [out_f]) {
            return Err(Error::shape_mismatch(OP, weight.dims(), b.dims()));
        }
        if !matches!(self.dtype(), crate::DType::F32 | crate::DType::F64) {
            let y = self.matmul(&weight.t()?)?;
            return match bias {
                Some(b) => y.add(b),
                None => Ok(y),
            };
        }
        let lead = &self.dims()[..self.rank() - 1];
        let rows: usize = lead.iter().product();
        let mut out_dims = lead.to_vec();
        out_dims.push(out_f);
        let x2 = self.detach().reshape_usize(&[rows, in_f])?;
        let w = weight.detach();
        let out = float_dispatch!(OP, self.dtype(), T => {
            let bias_v: Option<Vec<T>> = bias.map(|b| b.detach().to_vec()).transpose()?;
            // Written in full by the GEMM (beta = 0 never reads it).
            let mut c = uninit_buf::<T>(rows * out_f);
            x2.read2::<T, T, _>(&w, |xs, lx, ws, lw| {
                let (rsa, csa) = (lx.strides()[0] as isize, lx.strides()[1] as isize);
                // B = Wᵀ: B[k][j] = W[j][k].
                let (rsb, csb) = (lw.strides()[1] as isize, lw.strides()[0] as isize);
                let a = xs[lx.offset()..].as_ptr();
                let b = ws[lw.offset()..].as_ptr();
                let pc = c.as_mut_ptr().cast::<T>();
                // SAFETY: the layouts address elements inside their storages (offsets and
                // strides of [rows, in] and [out, in]); C holds rows × out elements and the
                // bias `out` values.
                unsafe {
                    match &bias_v {
                        Some(bv) => gemm_bias::<T>(rows, out_f, in_f, a, rsa, csa, b, rsb, csb,
                            pc, out_f as isize, 1, bv.as_ptr(), true),
                        None => gemm::<T>(rows, out_f, in_f, T::ONE, a, rsa, csa, b, rsb, csb,
                            T::ZERO, pc, out_f as isize, 1, true),
                    }
                }
            });
            // SAFETY: the GEMM wrote every element.
            Tensor::from_buf(unsafe { assume_init(c) }, &out_dims)
        });
        let x_dims = self.dims().to_vec();
        let (req_x, req_w) = (self.requires_grad(), weight.requires_grad());
        let (has_bias, req_b) = (bias.is_some(), bias.is_some_and(Tensor::requires_grad));
        let mut inputs = vec![self, weight];
        inputs.extend(bias);
        Ok(out.with_grad(OP, &inputs, move |g| {
            let g2 = g.reshape_usize(&[rows, out_f])?;
            let gx = req_x
                .then(|| g2.matmul(&w)?.reshape_usize(&x_dims))
                .transpose()?;
            let gw = req_w
                .then(|| g2.transpose_usize(0, 1).matmul(&x2))
                .transpose()?;
            let mut grads = vec![gx, gw];
            if has_bias {
                grads.push(req_b.then(|| g2.sum_dim(&[0], false)).transpose()?);
            }
            Ok(grads)
        }))
    }

    fn mm_batched(&self, rhs: &Tensor) -> Result<Tensor> {
        const OP: &str = "matmul";
        let (ra, rb) = (self.rank(), rhs.rank());
        let (m, k) = (self.dims()[ra - 2], self.dims()[ra - 1]);
        let (k2, n) = (rhs.dims()[rb - 2], rhs.dims()[rb - 1]);
        if k != k2 {
            return Err(Error::shape_mismatch(OP, self.dims(), rhs.dims()));
        }
        let batch = broadcast_shapes(OP, &self.dims()[..ra - 2], &rhs.dims()[..rb - 2])
            .map_err(|_| Error::shape_mismatch(OP, self.dims(), rhs.dims()))?;
        let mut da = batch.clone();
        da.extend_from_slice(&[m, k]);
        let mut db = batch.clone();
        db.extend_from_slice(&[k, n]);
        let la = self.layout().broadcast_as(OP, &da)?;
        let lb = rhs.layout().broadcast_as(OP, &db)?;
        let nb = la.rank() - 2;
        let (rsa, csa) = (la.strides()[nb] as isize, la.strides()[nb + 1] as isize);
        let (rsb, csb) = (lb.strides()[nb] as isize, lb.strides()[nb + 1] as isize);
        let runs = Runs::new(
            &batch,
            [
                (&la.strides()[..nb], la.offset()),
                (&lb.strides()[..nb], lb.offset()),
            ],
        );
        let count = runs.numel();
        // Storage offsets of each batch item.
        let mut offs = Vec::with_capacity(count);
        let [sa, sb] = runs.inner_strides();
        runs.for_each(0, count, |_, len, [oa, ob]| {
            for i in 0..len {
                offs.push((oa + i * sa, ob + i * sb));
            }
        });
        let mut out_dims = batch.clone();
        out_dims.extend_from_slice(&[m, n]);
        let out = float_dispatch!(OP, self.dtype(), T => {
            // Written in full by the GEMMs (beta = 0 never reads it).
            let mut c = uninit_buf::<T>(count * m * n);
            self.read2::<T, T, _>(rhs, |a, _, b, _| {
                let (pa, pb, pc) = (SendPtr(a.as_ptr() as *mut T), SendPtr(b.as_ptr() as *mut T), SendPtr(c.as_mut_ptr().cast::<T>()));
                let one = |i: usize, parallel: bool| {
                    let (oa, ob) = offs[i];
                    // SAFETY: offsets come from the broadcast layouts, which stay inside the
                    // storages; each batch item writes its own m×n block of `c`.
                    unsafe {
                        gemm::<T>(m, n, k, T::ONE, pa.get().add(oa), rsa, csa, pb.get().add(ob),
                            rsb, csb, T::ZERO, pc.get().add(i * m * n), n as isize, 1, parallel)
                    }
                };
                if count > 1 && m * n * k < SMALL_GEMM && num_threads() > 1 {
                    install(|| (0..count).into_par_iter().for_each(|i| one(i, false)));
                } else {
                    for i in 0..count {
                        one(i, true);
                    }
                }
            });
            // SAFETY: each batch item's GEMM wrote its whole m×n block.
            Tensor::from_buf(unsafe { assume_init(c) }, &out_dims)
        });
        let (a, b) = (self.detach(), rhs.detach());
        let (req_a, req_b) = (self.requires_grad(), rhs.requires_grad());
        let plain = a.rank() == 2 && b.rank() == 2;
        Ok(out.with_grad(OP, &[self, rhs], move |g| {
            // Each gradient is written in its operand's layout: for a transposed operand (a
            // Linear's `x·Wᵀ`) the transposed product is computed into contiguous memory and
            // handed back as its transposed view, so the transpose's backward returns the
            // weight's gradient contiguous instead of as a strided view copied later.
            let ga = req_a
                .then(|| {
                    if plain && is_transposed_matrix(&a) {
                        b.matmul(&g.transpose_usize(1, 0))?
                            .transpose_usize(1, 0)
                            .sum_to(a.dims())
                    } else {
                        g.matmul(&b.transpose_usize(b.rank() - 2, b.rank() - 1))?
                            .sum_to(a.dims())
                    }
                })
                .transpose()?;
            let gb = req_b
                .then(|| {
                    if plain && is_transposed_matrix(&b) {
                        g.transpose_usize(1, 0)
                            .matmul(&a)?
                            .transpose_usize(1, 0)
                            .sum_to(b.dims())
                    } else {
                        a.transpose_usize(a.rank() - 2, a.rank() - 1)
                            .matmul(g)?
                            .sum_to(b.dims())
                    }
                })
                .transpose()?;
            Ok(vec![ga, gb])
        }))
    }
}

/// Whether `t` is a matrix stored transposed: rank 2, with the transposed layout contiguous
/// (unit row stride) and not contiguous as it stands.
fn is_transposed_matrix(t: &Tensor) -> bool {
    t.rank() == 2 && !t.is_contiguous() && t.layout().transpose(0, 1).is_contiguous()
}
