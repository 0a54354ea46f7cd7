//! Convolution and pooling ops: gradient checks, forward checks against direct-loop
//! references and hand-computed values, error cases.

use nerve_core::gradcheck::gradcheck;
use nerve_core::{manual_seed, DType, Generator, Result, Tensor};

/// f64 standard-normal values from a fixed seed (tests run in parallel, so each owns its
/// generator).
fn randn(dims: &[usize], seed: u64) -> Tensor {
    let mut g = Generator::new(seed);
    Tensor::randn_with(dims, &mut g)
        .to_dtype(DType::F64)
        .unwrap()
}

fn t64(v: &[f64], dims: &[usize]) -> Tensor {
    Tensor::from_slice(v, dims).unwrap()
}

fn assert_close(a: &[f64], b: &[f64], tol: f64) {
    assert_eq!(a.len(), b.len(), "lengths differ");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= tol * (1.0 + y.abs()),
            "element {i}: {x} vs {y}"
        );
    }
}

// ---------------------------------------------------------------------------- references

#[derive(Clone, Copy, Debug)]
struct Cfg {
    stride: (usize, usize),
    padding: (usize, usize),
    dilation: (usize, usize),
    groups: usize,
}

/// Direct-loop conv2d: x [N,C,H,W], w [O,C/g,kh,kw], b [O].
fn ref_conv2d(x: &Tensor, w: &Tensor, b: Option<&Tensor>, c: Cfg) -> (Vec<f64>, Vec<usize>) {
    let (xd, wd) = (x.dims().to_vec(), w.dims().to_vec());
    let (xv, wv) = (x.to_f64_vec(), w.to_f64_vec());
    let bv = b.map(|b| b.to_f64_vec());
    let (n, ci, h, wi) = (xd[0], xd[1], xd[2], xd[3]);
    let (o, cg, kh, kw) = (wd[0], wd[1], wd[2], wd[3]);
    let og = o / c.groups;
    let ho = (h + 2 * c.padding.0 - c.dilation.0 * (kh - 1) - 1) / c.stride.0 + 1;
    let wo = (wi + 2 * c.padding.1 - c.dilation.1 * (kw - 1) - 1) / c.stride.1 + 1;
    let mut out = vec![0.0; n * o * ho * wo];
    for b_ in 0..n {
        for oc in 0..o {
            let g = oc / og;
            for oy in 0..ho {
                for ox in 0..wo {
                    let mut s = bv.as_ref().map_or(0.0, |bv| bv[oc]);
                    for k in 0..cg {
                        let ic = g * cg + k;
                        for ky in 0..kh {
                            for kx in 0..kw {
                                let iy = (oy * c.stride.0 + ky * c.dilation.0) as isize
                                    - c.padding.0 as isize;
                                let ix = (ox * c.stride.1 + kx * c.dilation.1) as isize
                                    - c.padding.1 as isize;
                                if iy < 0 || ix < 0 || iy >= h as isize || ix >= wi as isize {
                                    continue;
                                }
                                let (iy, ix) = (iy as usize, ix as usize);
                                s += xv[((b_ * ci + ic) * h + iy) * wi + ix]
                                    * wv[((oc * cg + k) * kh + ky) * kw + kx];
                            }
                        }
                    }
                    out[((b_ * o + oc) * ho + oy) * wo + ox] = s;
                }
            }
        }
    }
    (out, vec![n, o, ho, wo])
}

/// Direct-loop conv_transpose2d: x [N,Cin,H,W], w [Cin,Cout/g,kh,kw], b [Cout].
fn ref_conv_transpose2d(
    x: &Tensor,
    w: &Tensor,
    b: Option<&Tensor>,
    c: Cfg,
    out_pad: (usize, usize),
) -> (Vec<f64>, Vec<usize>) {
    let (xd, wd) = (x.dims().to_vec(), w.dims().to_vec());
    let (xv, wv) = (x.to_f64_vec(), w.to_f64_vec());
    let (n, cin, h, wi) = (xd[0], xd[1], xd[2], xd[3]);
    let (cog, kh, kw) = (wd[1], wd[2], wd[3]);
    let cout = cog * c.groups;
    let cig = cin / c.groups;
    let ho = (h - 1) * c.stride.0 + c.dilation.0 * (kh - 1) + out_pad.0 + 1 - 2 * c.padding.0;
    let wo = (wi - 1) * c.stride.1 + c.dilation.1 * (kw - 1) + out_pad.1 + 1 - 2 * c.padding.1;
    let mut out = vec![0.0; n * cout * ho * wo];
    if let Some(b) = b {
        let bv = b.to_f64_vec();
        for (i, v) in out.iter_mut().enumerate() {
            *v = bv[(i / (ho * wo)) % cout];
        }
    }
    for b_ in 0..n {
        for ic in 0..cin {
            let g = ic / cig;
            for iy in 0..h {
                for ix in 0..wi {
                    let xval = xv[((b_ * cin + ic) * h + iy) * wi + ix];
                    for k in 0..cog {
                        let oc = g * cog + k;
                        for ky in 0..kh {
                            for kx in 0..kw {
                                let oy = (iy * c.stride.0 + ky * c.dilation.0) as isize
                                    - c.padding.0 as isize;
                                let ox = (ix * c.stride.1 + kx * c.dilation.1) as isize
                                    - c.padding.1 as isize;
                                if oy < 0 || ox < 0 || oy >= ho as isize || ox >= wo as isize {
                                    continue;
                                }
                                out[((b_ * cout + oc) * ho + oy as usize) * wo + ox as usize] +=
                                    xval * wv[((ic * cog + k) * kh + ky) * kw + kx];
                            }
                        }
                    }
                }
            }
        }
    }
    (out, vec![n, cout, ho, wo])
}

fn cfg(stride: usize, padding: usize, dilation: usize, groups: usize) -> Cfg {
    Cfg {
        stride: (stride, stride),
        padding: (padding, padding),
        dilation: (dilation, dilation),
        groups,
    }
}

// ------------------------------------------------------------------------ forward checks

#[test]
fn conv2d_matches_reference() -> Result<()> {
    // (x dims, w dims, with bias, config)
    let cases: Vec<(Vec<usize>, Vec<usize>, bool, Cfg)> = vec![
        (vec![2, 3, 7, 6], vec![4, 3, 3, 3], true, cfg(1, 1, 1, 1)),
        (vec![1, 4, 9, 8], vec![6, 2, 3, 2], false, cfg(2, 1, 2, 2)),
        (
            vec![3, 2, 8, 7],
            vec![4, 2, 2, 3],
            true,
            Cfg {
                stride: (2, 1),
                padding: (0, 1),
                dilation: (1, 2),
                groups: 1,
            },
        ),
        // Pointwise fast path, with groups; and a strided 1×1.
        (vec![5, 6, 4, 5], vec![4, 3, 1, 1], true, cfg(1, 0, 1, 2)),
        (vec![2, 3, 5, 5], vec![2, 3, 1, 1], false, cfg(2, 0, 1, 1)),
        // Depthwise.
        (vec![4, 4, 6, 6], vec![4, 1, 3, 3], true, cfg(1, 1, 1, 4)),
        // Batch large enough for the batch-parallel path.
        (vec![17, 3, 10, 10], vec![5, 3, 3, 3], true, cfg(1, 1, 1, 1)),
        // Output rows as long as the input's at stride 1 (im2col's one-copy path): with
        // dilation, with fewer output rows than input rows, with a wide kernel.
        (vec![2, 3, 7, 9], vec![4, 3, 3, 3], true, cfg(1, 2, 2, 1)),
        (
            vec![2, 2, 6, 8],
            vec![3, 2, 5, 3],
            false,
            Cfg {
                stride: (1, 1),
                padding: (1, 1),
                dilation: (1, 1),
                groups: 1,
            },
        ),
        (
            vec![1, 2, 5, 6],
            vec![2, 2, 3, 5],
            true,
            Cfg {
                stride: (1, 1),
                padding: (0, 2),
                dilation: (1, 1),
                groups: 1,
            },
        ),
    ];
    for (i, (xd, wd, with_bias, c)) in cases.into_iter().enumerate() {
        let x = randn(&xd, 10 + i as u64);
        let w = randn(&wd, 20 + i as u64);
        let b = randn(&[wd[0]], 30 + i as u64);
        let b = with_bias.then_some(&b);
        let (want, dims) = ref_conv2d(&x, &w, b, c);
        let y = x.conv2d(&w, b, c.stride, c.padding, c.dilation, c.groups)?;
        assert_eq!(y.dims(), dims.as_slice(), "case {i}");
        assert_close(&y.to_f64_vec(), &want, 1e-12);
        // f32 agrees too.
        let y32 = x.to_dtype(DType::F32)?.conv2d(
            &w.to_dtype(DType::F32)?,
            b.map(|b| b.to_dtype(DType::F32)).transpose()?.as_ref(),
            c.stride,
            c.padding,
            c.dilation,
            c.groups,
        )?;
        assert_eq!(y32.dtype(), DType::F32);
        assert_close(&y32.to_f64_vec(), &want, 1e-4);
    }
    Ok(())
}

#[test]
fn conv_transpose2d_matches_reference() -> Result<()> {
    type Case = (Vec<usize>, Vec<usize>, bool, Cfg, (usize, usize));
    let cases: Vec<Case> = vec![
        (
            vec![2, 3, 4, 5],
            vec![3, 2, 3, 3],
            true,
            cfg(1, 0, 1, 1),
            (0, 0),
        ),
        (
            vec![2, 4, 3, 4],
            vec![4, 3, 3, 3],
            true,
            cfg(2, 1, 1, 2),
            (1, 1),
        ),
        (
            vec![1, 2, 5, 4],
            vec![2, 3, 2, 3],
            false,
            Cfg {
                stride: (3, 2),
                padding: (1, 0),
                dilation: (1, 2),
                groups: 1,
            },
            (2, 1),
        ),
        (
            vec![9, 4, 3, 3],
            vec![4, 2, 1, 1],
            true,
            cfg(1, 0, 1, 1),
            (0, 0),
        ),
    ];
    for (i, (xd, wd, with_bias, c, op)) in cases.into_iter().enumerate() {
        let x = randn(&xd, 40 + i as u64);
        let w = randn(&wd, 50 + i as u64);
        let b = randn(&[wd[1] * c.groups], 60 + i as u64);
        let b = with_bias.then_some(&b);
        let (want, dims) = ref_conv_transpose2d(&x, &w, b, c, op);
        let y = x.conv_transpose2d(&w, b, c.stride, c.padding, op, c.dilation, c.groups)?;
        assert_eq!(y.dims(), dims.as_slice(), "case {i}");
        assert_close(&y.to_f64_vec(), &want, 1e-12);
    }
    Ok(())
}

#[test]
fn conv_hand_computed() -> Result<()> {
    let x = Tensor::ones([1, 1, 3, 3]).to_dtype(DType::F64)?;
    let w = Tensor::ones([1, 1, 2, 2]).to_dtype(DType::F64)?;
    let b = t64(&[0.5], &[1]);
    let y = x.conv2d(&w, Some(&b), (1, 1), (0, 0), (1, 1), 1)?;
    assert_eq!(y.to_vec::<f64>()?, vec![4.5; 4]);
    // Padding 1: corners see 1 input, edges 2, the middle 4.
    let y = x.conv2d(&w, None, (1, 1), (1, 1), (1, 1), 1)?;
    assert_eq!(y.dims(), &[1, 1, 4, 4]);
    #[rustfmt::skip]
    let want = [1., 2., 2., 1., 2., 4., 4., 2., 2., 4., 4., 2., 1., 2., 2., 1.];
    assert_eq!(y.to_vec::<f64>()?, want);
    // A 1-D sliding difference.
    let x = t64(&[1., 4., 9., 16., 25.], &[1, 1, 5]);
    let w = t64(&[-1., 1.], &[1, 1, 2]);
    let y = x.conv1d(&w, None, 1, 0, 1, 1)?;
    assert_eq!(y.to_vec::<f64>()?, vec![3., 5., 7., 9.]);
    // Transposed, stride 2: every input pixel spreads to a 2×2 block.
    let x = t64(&[1., 2., 3., 4.], &[1, 1, 2, 2]);
    let w = Tensor::ones([1, 1, 2, 2]).to_dtype(DType::F64)?;
    let y = x.conv_transpose2d(&w, None, (2, 2), (0, 0), (0, 0), (1, 1), 1)?;
    #[rustfmt::skip]
    let want = [1., 1., 2., 2., 1., 1., 2., 2., 3., 3., 4., 4., 3., 3., 4., 4.];
    assert_eq!(y.to_vec::<f64>()?, want);
    Ok(())
}

#[test]
fn pooling_hand_computed() -> Result<()> {
    let x = Tensor::arange(0.0, 25.0, 1.0)?.reshape(&[1, 1, 5, 5])?;
    let (v, i) = x.max_pool2d_with_indices((2, 2), (2, 2), (0, 0), (1, 1), false)?;
    assert_eq!(v.dims(), &[1, 1, 2, 2]);
    assert_eq!(v.to_vec::<f32>()?, vec![6., 8., 16., 18.]);
    assert_eq!(i.to_vec::<i64>()?, vec![6, 8, 16, 18]);
    // ceil_mode adds the partial windows on the right and bottom.
    let (v, i) = x.max_pool2d_with_indices((2, 2), (2, 2), (0, 0), (1, 1), true)?;
    assert_eq!(v.dims(), &[1, 1, 3, 3]);
    assert_eq!(
        v.to_vec::<f32>()?,
        vec![6., 8., 9., 16., 18., 19., 21., 23., 24.]
    );
    assert_eq!(i.dtype(), DType::I64);
    assert_eq!(i.to_vec::<i64>()?, vec![6, 8, 9, 16, 18, 19, 21, 23, 24]);
    // Padding counts as -inf, even below negative values; dilation 2 skips a pixel.
    let neg = x.neg()?;
    let v = neg.max_pool2d((3, 3), (2, 2), (1, 1), (1, 1), false)?;
    // Windows start at rows/cols 0, 1, 3 (clipped by the padding): each max is its first.
    assert_eq!(
        v.to_vec::<f32>()?,
        vec![0., -1., -3., -5., -6., -8., -15., -16., -18.]
    );
    let (v, i) = x.max_pool2d_with_indices((2, 2), (1, 1), (0, 0), (2, 2), false)?;
    assert_eq!(v.dims(), &[1, 1, 3, 3]);
    assert_eq!(i.to_vec::<i64>()?, vec![12, 13, 14, 17, 18, 19, 22, 23, 24]);

    let x = Tensor::arange(0.0, 16.0, 1.0)?.reshape(&[1, 1, 4, 4])?;
    let v = x.avg_pool2d((2, 2), (2, 2), (0, 0), false, true)?;
    assert_eq!(v.to_vec::<f32>()?, vec![2.5, 4.5, 10.5, 12.5]);
    let x = x.to_dtype(DType::F64)?;
    let v = x.avg_pool2d((3, 3), (2, 2), (1, 1), false, true)?;
    assert_close(
        &v.to_vec::<f64>()?,
        &[10. / 9., 24. / 9., 51. / 9., 10.],
        1e-12,
    );
    let v = x.avg_pool2d((3, 3), (2, 2), (1, 1), false, false)?;
    assert_close(&v.to_vec::<f64>()?, &[2.5, 4., 8.5, 10.], 1e-12);
    // ceil_mode, kernel 3 stride 2 on 4: ceil((4 - 3) / 2) + 1 = 2 windows instead of 1; the
    // second covers rows (cols) 2..4 only: 10, 11, 14, 15 (divided by 4 either way, as the
    // clipped part is outside the padding too).
    let v = x.avg_pool2d((3, 3), (2, 2), (0, 0), true, false)?;
    assert_eq!(v.dims(), &[1, 1, 2, 2]);
    assert_close(&v.to_vec::<f64>()?, &[5., 6.5, 11., 12.5], 1e-12);
    let v = x.avg_pool2d((3, 3), (2, 2), (0, 0), true, true)?;
    assert_close(&v.to_vec::<f64>()?, &[5., 6.5, 11., 12.5], 1e-12);
    // 5 → 3 adaptive bins: 0..2, 1..4, 3..5.
    let x = t64(&[0., 1., 2., 3., 4.], &[1, 1, 1, 5]);
    let v = x.adaptive_avg_pool2d((1, 3))?;
    assert_close(&v.to_vec::<f64>()?, &[0.5, 2., 3.5], 1e-12);
    // Nearest 2 → 5 copies sources 0, 0, 0, 1, 1; 2 → 4 doubles.
    let x = t64(&[1., 2.], &[1, 1, 1, 2]);
    let v = x.upsample_nearest2d((1, 5))?;
    assert_eq!(v.to_vec::<f64>()?, vec![1., 1., 1., 2., 2.]);
    let v = x.interpolate_nearest((3.0, 2.0))?;
    assert_eq!(v.dims(), &[1, 1, 3, 4]);
    assert_eq!(
        v.to_vec::<f64>()?,
        vec![1., 1., 2., 2., 1., 1., 2., 2., 1., 1., 2., 2.]
    );
    Ok(())
}

// ------------------------------------------------------------------------------ gradchecks

#[test]
fn gradcheck_conv2d() -> Result<()> {
    manual_seed(0);
    let configs = [
        // (x, w, stride, padding, dilation, groups)
        ([2, 4, 6, 7], [4, 2, 3, 2], (2, 2), (1, 1), (2, 2), 2),
        ([1, 3, 5, 5], [2, 3, 2, 3], (1, 2), (1, 0), (1, 1), 1),
        ([3, 2, 4, 4], [4, 2, 1, 1], (1, 1), (0, 0), (1, 1), 1),
    ];
    for (i, (xd, wd, s, p, d, g)) in configs.into_iter().enumerate() {
        let x = randn(&xd, 100 + i as u64);
        let w = randn(&wd, 110 + i as u64);
        let b = randn(&[wd[0]], 120 + i as u64);
        gradcheck(
            |t| t[0].conv2d(&t[1], Some(&t[2]), s, p, d, g),
            &[x.clone(), w.clone(), b],
        )?;
        gradcheck(|t| t[0].conv2d(&t[1], None, s, p, d, g), &[x, w])?;
    }
    Ok(())
}

#[test]
fn gradcheck_conv2d_non_contiguous_input() -> Result<()> {
    // The leaf is [N, H, W, C]; the op sees a permuted (strided) NCHW view.
    let x = randn(&[2, 5, 4, 3], 130);
    let w = randn(&[2, 3, 3, 3], 131);
    let b = randn(&[2], 132);
    gradcheck(
        |t| {
            let x = t[0].permute(&[0, 3, 1, 2])?;
            assert!(!x.is_contiguous());
            x.conv2d(&t[1], Some(&t[2]), (1, 1), (1, 1), (1, 1), 1)
        },
        &[x, w, b],
    )?;
    // Transposed weight view too.
    let x = randn(&[1, 3, 4, 4], 133);
    let w = randn(&[3, 2, 2, 2], 134);
    gradcheck(
        |t| t[0].conv2d(&t[1].transpose(0, 1)?, None, (1, 1), (0, 0), (1, 1), 1),
        &[x, w],
    )
}

#[test]
fn gradcheck_conv1d() -> Result<()> {
    let x = randn(&[2, 4, 9], 140);
    let w = randn(&[6, 2, 3], 141);
    let b = randn(&[6], 142);
    gradcheck(|t| t[0].conv1d(&t[1], Some(&t[2]), 2, 1, 2, 2), &[x, w, b])?;
    let x = randn(&[1, 3, 7], 143);
    let w = randn(&[2, 3, 1], 144);
    gradcheck(|t| t[0].conv1d(&t[1], None, 1, 0, 1, 1), &[x, w])
}

#[test]
fn gradcheck_conv_transpose2d() -> Result<()> {
    let x = randn(&[2, 4, 3, 3], 150);
    let w = randn(&[4, 2, 3, 3], 151);
    let b = randn(&[4], 152);
    gradcheck(
        |t| t[0].conv_transpose2d(&t[1], Some(&t[2]), (2, 2), (1, 1), (1, 1), (1, 1), 2),
        &[x, w, b],
    )?;
    let x = randn(&[1, 2, 3, 4], 153);
    let w = randn(&[2, 3, 2, 3], 154);
    gradcheck(
        |t| t[0].conv_transpose2d(&t[1], None, (1, 2), (0, 1), (0, 1), (2, 1), 1),
        &[x, w],
    )?;
    let x = randn(&[2, 3, 5], 155);
    let w = randn(&[3, 2, 3], 156);
    gradcheck(
        |t| t[0].conv_transpose1d(&t[1], None, 2, 1, 1, 1, 1),
        &[x, w],
    )
}

#[test]
fn gradcheck_max_pool2d() -> Result<()> {
    let x = randn(&[2, 3, 7, 6], 160);
    gradcheck(
        |t| t[0].max_pool2d((2, 2), (2, 2), (0, 0), (1, 1), false),
        std::slice::from_ref(&x),
    )?;
    // Overlapping windows, padding, ceil_mode, dilation.
    gradcheck(
        |t| t[0].max_pool2d((3, 3), (2, 2), (1, 1), (1, 1), true),
        std::slice::from_ref(&x),
    )?;
    gradcheck(
        |t| t[0].max_pool2d((2, 3), (1, 2), (1, 1), (2, 1), false),
        &[x],
    )
}

#[test]
fn gradcheck_avg_pool2d() -> Result<()> {
    let x = randn(&[2, 2, 7, 6], 170);
    for include_pad in [true, false] {
        for ceil_mode in [false, true] {
            gradcheck(
                |t| t[0].avg_pool2d((3, 2), (2, 2), (1, 1), ceil_mode, include_pad),
                std::slice::from_ref(&x),
            )?;
        }
    }
    Ok(())
}

#[test]
fn gradcheck_adaptive_and_upsample() -> Result<()> {
    let x = randn(&[2, 2, 5, 7], 180);
    gradcheck(
        |t| t[0].adaptive_avg_pool2d((3, 4)),
        std::slice::from_ref(&x),
    )?;
    gradcheck(
        |t| t[0].adaptive_avg_pool2d((7, 9)),
        std::slice::from_ref(&x),
    )?;
    gradcheck(
        |t| t[0].upsample_nearest2d((8, 14)),
        std::slice::from_ref(&x),
    )?;
    gradcheck(
        |t| t[0].upsample_nearest2d((3, 4)),
        std::slice::from_ref(&x),
    )?;
    gradcheck(|t| t[0].interpolate_nearest((2.0, 1.5)), &[x])
}

#[test]
fn max_pool_2x2_wide_rows_ties_and_nan() -> Result<()> {
    // Rows of 41 (20 windows: full vectors and a tail, an odd column and row left over),
    // values from a few levels (ties inside windows) and NaNs, in f32 and f64, against the
    // definition: the first maximum in row-major window order wins, a NaN wins over
    // numbers, and a later NaN over an earlier one.
    let (n, c, h, w) = (2usize, 3usize, 7usize, 41usize);
    let mut vals: Vec<f64> = (0..n * c * h * w)
        .map(|i| ((i * 7919 + i / 5) % 4) as f64 - 1.5)
        .collect();
    for at in [0usize, 43, 44, 300, 301, 342, 1000, 1721] {
        vals[at] = f64::NAN;
    }
    let (ho, wo) = (h / 2, w / 2);
    let mut want_v = Vec::new();
    let mut want_i = Vec::new();
    for plane in vals.chunks(h * w) {
        for oy in 0..ho {
            for ox in 0..wo {
                let mut at = 2 * oy * w + 2 * ox;
                for pos in [at + 1, at + w, at + w + 1] {
                    let (v, best) = (plane[pos], plane[at]);
                    if v > best || v.is_nan() {
                        at = pos;
                    }
                }
                want_v.push(plane[at]);
                want_i.push(at as i64);
            }
        }
    }
    for dtype in [DType::F32, DType::F64] {
        let x = Tensor::from_vec(vals.clone(), [n, c, h, w])?.to_dtype(dtype)?;
        let (v, i) = x.max_pool2d_with_indices((2, 2), (2, 2), (0, 0), (1, 1), false)?;
        assert_eq!(i.to_vec::<i64>()?, want_i, "{dtype:?}");
        for (k, (got, want)) in v.to_f64_vec().iter().zip(&want_v).enumerate() {
            assert!(
                got == want || (got.is_nan() && want.is_nan()),
                "{dtype:?} output {k}: {got} vs {want}"
            );
        }
    }
    Ok(())
}

#[test]
fn large_pool_parallel_paths() -> Result<()> {
    // Enough planes to split the pooling loops over threads; compare with per-plane runs.
    let x = randn(&[8, 16, 12, 12], 190).requires_grad_(true);
    let y = x.max_pool2d((2, 2), (2, 2), (0, 0), (1, 1), false)?;
    let a = x.avg_pool2d((3, 3), (1, 1), (1, 1), false, false)?;
    y.sum()?.add(&a.sum()?)?.backward()?;
    let g = x.grad().unwrap().to_f64_vec();
    let part = x.detach().narrow(0, 3, 1)?.requires_grad_(true);
    let yp = part.max_pool2d((2, 2), (2, 2), (0, 0), (1, 1), false)?;
    let ap = part.avg_pool2d((3, 3), (1, 1), (1, 1), false, false)?;
    assert_eq!(yp.to_f64_vec(), y.narrow(0, 3, 1)?.to_f64_vec());
    yp.sum()?.add(&ap.sum()?)?.backward()?;
    let plane = 16 * 12 * 12;
    assert_close(
        &part.grad().unwrap().to_f64_vec(),
        &g[3 * plane..4 * plane],
        1e-12,
    );
    Ok(())
}

#[test]
fn conv2d_batch_parallel_gradients_match_per_sample() -> Result<()> {
    // The batch-parallel backward (per-worker partial weight gradients) equals the sum of
    // per-sample backward passes.
    let x = randn(&[12, 3, 8, 8], 200).requires_grad_(true);
    let w = randn(&[4, 3, 3, 3], 201).requires_grad_(true);
    let b = randn(&[4], 202).requires_grad_(true);
    x.conv2d(&w, Some(&b), (1, 1), (1, 1), (1, 1), 1)?
        .square()?
        .sum()?
        .backward()?;
    let (gw, gb) = (
        w.grad().unwrap().to_f64_vec(),
        b.grad().unwrap().to_f64_vec(),
    );
    let mut sw = vec![0.0; gw.len()];
    let mut sb = vec![0.0; gb.len()];
    for n in 0..12 {
        let (w1, b1) = (
            w.detach().requires_grad_(true),
            b.detach().requires_grad_(true),
        );
        let xn = x.detach().narrow(0, n, 1)?;
        xn.conv2d(&w1, Some(&b1), (1, 1), (1, 1), (1, 1), 1)?
            .square()?
            .sum()?
            .backward()?;
        for (s, v) in sw.iter_mut().zip(w1.grad().unwrap().to_f64_vec()) {
            *s += v;
        }
        for (s, v) in sb.iter_mut().zip(b1.grad().unwrap().to_f64_vec()) {
            *s += v;
        }
    }
    assert_close(&gw, &sw, 1e-10);
    assert_close(&gb, &sb, 1e-10);
    Ok(())
}

// ------------------------------------------------------------------------ PyTorch parity

/// The conv/pool cases of `tools/torch_fixtures.py` (PyTorch outputs and input gradients for a
/// random upstream gradient, f32): `name.in{i}`, `name.out`, `name.gout`, `name.grad{i}`.
fn torch_fixtures() -> std::collections::HashMap<String, Tensor> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/ops.safetensors"
    );
    let bytes = std::fs::read(path).expect("fixture file");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("valid safetensors");
    st.tensors()
        .into_iter()
        .filter(|(name, _)| {
            ["conv", "pool", "upsample"]
                .iter()
                .any(|k| name.contains(k))
        })
        .map(|(name, view)| {
            let dims = view.shape().to_vec();
            let t = match view.dtype() {
                safetensors::Dtype::F32 => {
                    let v: Vec<f32> = view
                        .data()
                        .chunks_exact(4)
                        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                        .collect();
                    Tensor::from_vec(v, dims).unwrap()
                }
                d => panic!("unexpected fixture dtype {d:?}"),
            };
            (name, t)
        })
        .collect()
}

#[test]
fn torch_parity() -> Result<()> {
    type Op = fn(&[Tensor]) -> Result<Tensor>;
    let cases: [(&str, Op); 10] = [
        ("conv2d", |t| {
            t[0].conv2d(&t[1], Some(&t[2]), (2, 2), (1, 1), (1, 1), 2)
        }),
        ("conv2d_dil", |t| {
            t[0].conv2d(&t[1], None, (1, 1), (2, 2), (2, 2), 1)
        }),
        ("conv1d", |t| t[0].conv1d(&t[1], Some(&t[2]), 1, 1, 1, 1)),
        ("conv_transpose2d", |t| {
            t[0].conv_transpose2d(&t[1], Some(&t[2]), (2, 2), (1, 1), (1, 1), (1, 1), 1)
        }),
        ("max_pool2d", |t| {
            t[0].max_pool2d((2, 2), (2, 2), (0, 0), (1, 1), false)
        }),
        ("max_pool2d_pad", |t| {
            t[0].max_pool2d((3, 3), (2, 2), (1, 1), (1, 1), true)
        }),
        ("avg_pool2d", |t| {
            t[0].avg_pool2d((3, 3), (2, 2), (1, 1), false, false)
        }),
        ("adaptive_avg_pool2d", |t| t[0].adaptive_avg_pool2d((3, 2))),
        ("upsample_nearest", |t| t[0].upsample_nearest2d((5, 7))),
        ("upsample_nearest", |t| {
            t[0].interpolate_nearest((5.0 / 3.0, 7.0 / 4.0))
        }),
    ];
    let fx = torch_fixtures();
    let close = |case: &str, what: &str, got: &Tensor, want: &Tensor| {
        assert_eq!(got.dims(), want.dims(), "{case} {what}");
        for (i, (a, b)) in got.to_f64_vec().iter().zip(want.to_f64_vec()).enumerate() {
            assert!(
                (a - b).abs() <= 1e-5 + 1e-4 * b.abs(),
                "{case} {what} [{i}]: {a} vs {b}"
            );
        }
    };
    for (case, f) in cases {
        let inputs: Vec<Tensor> = (0..)
            .map_while(|i| fx.get(&format!("{case}.in{i}")))
            .map(|t| t.detach().requires_grad_(true))
            .collect();
        assert!(!inputs.is_empty(), "no fixture for {case}");
        let out = f(&inputs)?;
        close(case, "output", &out, &fx[&format!("{case}.out")]);
        out.backward_with(&fx[&format!("{case}.gout")])?;
        for (i, x) in inputs.iter().enumerate() {
            let want = &fx[&format!("{case}.grad{i}")];
            close(case, &format!("grad {i}"), &x.grad().unwrap(), want);
        }
    }
    Ok(())
}

#[test]
fn partial_requires_grad() -> Result<()> {
    // Only the weight (first layer of a network), only the input, only the bias.
    let x = randn(&[3, 2, 6, 6], 210);
    let w = randn(&[4, 2, 3, 3], 211);
    let b = randn(&[4], 212);
    let run = |rx: bool, rw: bool, rb: bool| -> Result<[Option<Vec<f64>>; 3]> {
        let (x, w, b) = (
            x.detach().requires_grad_(rx),
            w.detach().requires_grad_(rw),
            b.detach().requires_grad_(rb),
        );
        let y = x.conv2d(&w, Some(&b), (2, 1), (1, 1), (1, 1), 1)?;
        y.square()?.sum()?.backward()?;
        Ok([x.grad(), w.grad(), b.grad()].map(|g| g.map(|g| g.to_f64_vec())))
    };
    let all = run(true, true, true)?;
    for mask in [
        (false, true, false),
        (true, false, false),
        (false, false, true),
    ] {
        let got = run(mask.0, mask.1, mask.2)?;
        for (k, want) in [mask.0, mask.1, mask.2].into_iter().enumerate() {
            match (&got[k], want) {
                (Some(g), true) => assert_close(g, all[k].as_ref().unwrap(), 1e-12),
                (None, false) => {}
                _ => panic!("gradient {k} presence wrong for {mask:?}"),
            }
        }
    }
    // Same for the transposed convolution.
    let w = randn(&[2, 3, 3, 3], 213);
    let xt = x.detach();
    let wt = w.detach().requires_grad_(true);
    xt.conv_transpose2d(&wt, None, (2, 2), (1, 1), (1, 1), (1, 1), 1)?
        .sum()?
        .backward()?;
    let xa = x.detach().requires_grad_(true);
    let wa = w.detach().requires_grad_(true);
    xa.conv_transpose2d(&wa, None, (2, 2), (1, 1), (1, 1), (1, 1), 1)?
        .sum()?
        .backward()?;
    assert!(xt.grad().is_none());
    assert_close(
        &wt.grad().unwrap().to_f64_vec(),
        &wa.grad().unwrap().to_f64_vec(),
        1e-12,
    );
    Ok(())
}

// ------------------------------------------------------------------------------- errors

#[test]
fn errors_name_op_and_shapes() {
    let x = Tensor::zeros([1, 3, 5, 5]);
    let w = Tensor::zeros([4, 2, 3, 3]);
    let e = x
        .conv2d(&w, None, (1, 1), (0, 0), (1, 1), 1)
        .unwrap_err()
        .to_string();
    assert!(e.contains("conv2d"), "{e}");
    assert!(
        e.contains("[1, 3, 5, 5]") && e.contains("[4, 2, 3, 3]"),
        "{e}"
    );

    let e = Tensor::zeros([2, 3, 7])
        .conv1d(&Tensor::zeros([4, 2, 3]), None, 1, 0, 1, 1)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("conv1d") && e.contains("[2, 3, 7]") && e.contains("[4, 2, 3]"),
        "{e}"
    );

    let e = x
        .conv_transpose2d(&w, None, (1, 1), (0, 0), (0, 0), (1, 1), 1)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("conv_transpose2d") && e.contains("[4, 2, 3, 3]"),
        "{e}"
    );

    // Bias of the wrong length, kernel larger than the input, bad rank, bad groups.
    let w = Tensor::zeros([4, 3, 3, 3]);
    let e = x
        .conv2d(&w, Some(&Tensor::zeros([3])), (1, 1), (0, 0), (1, 1), 1)
        .unwrap_err()
        .to_string();
    assert!(e.contains("conv2d") && e.contains("[3]"), "{e}");
    let e = x
        .conv2d(
            &Tensor::zeros([4, 3, 7, 7]),
            None,
            (1, 1),
            (0, 0),
            (1, 1),
            1,
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("conv2d") && e.contains("[1, 3, 5, 5]"), "{e}");
    let e = Tensor::zeros([3, 5, 5])
        .conv2d(&w, None, (1, 1), (0, 0), (1, 1), 1)
        .unwrap_err()
        .to_string();
    assert!(e.contains("conv2d") && e.contains("[3, 5, 5]"), "{e}");
    assert!(x.conv2d(&w, None, (1, 1), (0, 0), (1, 1), 2).is_err());
    assert!(x.conv2d(&w, None, (0, 1), (0, 0), (1, 1), 1).is_err());
    assert!(x
        .conv_transpose2d(
            &Tensor::zeros([3, 2, 3, 3]),
            None,
            (1, 1),
            (0, 0),
            (1, 1),
            (1, 1),
            1
        )
        .is_err());
    // Mixed dtypes, integer dtypes.
    let e = x
        .to_dtype(DType::F64)
        .unwrap()
        .conv2d(&w, None, (1, 1), (0, 0), (1, 1), 1);
    assert!(e.unwrap_err().to_string().contains("conv2d"));
    let xi = x.to_dtype(DType::I64).unwrap();
    let wi = w.to_dtype(DType::I64).unwrap();
    assert!(xi.conv2d(&wi, None, (1, 1), (0, 0), (1, 1), 1).is_err());

    // Pools.
    let e = x
        .max_pool2d((3, 3), (1, 1), (2, 2), (1, 1), false)
        .unwrap_err()
        .to_string();
    assert!(e.contains("max_pool2d"), "{e}");
    let e = x
        .max_pool2d((7, 7), (1, 1), (0, 0), (1, 1), false)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("max_pool2d") && e.contains("[1, 3, 5, 5]"),
        "{e}"
    );
    let e = Tensor::zeros([5, 5]).avg_pool2d((2, 2), (2, 2), (0, 0), false, true);
    assert!(e.unwrap_err().to_string().contains("avg_pool2d"));
    assert!(x.adaptive_avg_pool2d((0, 2)).is_err());
    assert!(x.upsample_nearest2d((0, 2)).is_err());
}

// ------------------------------------------------------------------------------- timing
