//! `Display` in PyTorch's style: `tensor([[1., 2.], [3., 4.]])`.

use std::fmt;

use crate::{DType, Tensor};

/// Number of elements above which the middle of each dimension is elided (PyTorch: 1000).
const SUMMARIZE_ABOVE: usize = 1000;
const EDGE: usize = 3;

enum Style {
    Int,
    FloatInt,
    Fixed(usize),
    Sci,
    Bool,
}

fn choose_style(dtype: DType, vals: &[f64]) -> Style {
    match dtype {
        DType::I64 => return Style::Int,
        DType::Bool => return Style::Bool,
        _ => {}
    }
    let finite: Vec<f64> = vals.iter().copied().filter(|v| v.is_finite()).collect();
    if finite.iter().all(|v| v.fract() == 0.0) {
        let max = finite.iter().fold(0f64, |m, v| m.max(v.abs()));
        return if max >= 1e8 {
            Style::Sci
        } else {
            Style::FloatInt
        };
    }
    let nz: Vec<f64> = finite
        .iter()
        .map(|v| v.abs())
        .filter(|&v| v > 0.0)
        .collect();
    let max = nz.iter().copied().fold(0f64, f64::max);
    let min = nz.iter().copied().fold(f64::INFINITY, f64::min);
    if max >= 1e8 || (min < 1e-4 && min > 0.0) || (min > 0.0 && max / min > 1000.0) {
        Style::Sci
    } else {
        Style::Fixed(4)
    }
}

fn fmt_one(v: f64, style: &Style) -> String {
    if v.is_nan() {
        return "nan".into();
    }
    if v.is_infinite() {
        return if v > 0.0 { "inf".into() } else { "-inf".into() };
    }
    match style {
        Style::Int => format!("{}", v as i64),
        Style::Bool => if v != 0.0 { "True" } else { "False" }.into(),
        Style::FloatInt => format!("{v:.0}."),
        Style::Fixed(p) => format!("{v:.p$}"),
        Style::Sci => {
            let s = format!("{v:.4e}");
            // Rust prints 1.2340e3, PyTorch 1.2340e+03.
            match s.split_once('e') {
                Some((m, e)) => {
                    let (sign, digits) = match e.strip_prefix('-') {
                        Some(d) => ('-', d),
                        None => ('+', e),
                    };
                    format!("{m}e{sign}{digits:0>2}")
                }
                None => s,
            }
        }
    }
}

impl fmt::Display for Tensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let vals = self.to_f64_vec();
        let summarize = vals.len() > SUMMARIZE_ABOVE;
        let style = choose_style(self.dtype(), &vals);
        let strs: Vec<String> = vals.iter().map(|&v| fmt_one(v, &style)).collect();
        let width = strs.iter().map(|s| s.len()).max().unwrap_or(0);
        let dims = self.dims().to_vec();
        let strides = crate::shape::contiguous_strides(&dims);
        #[allow(clippy::too_many_arguments)]
        fn rec(
            out: &mut String,
            strs: &[String],
            dims: &[usize],
            strides: &[usize],
            base: usize,
            indent: usize,
            width: usize,
            summarize: bool,
        ) {
            if dims.is_empty() {
                out.push_str(&format!("{:>width$}", strs[base]));
                return;
            }
            out.push('[');
            let n = dims[0];
            let idx: Vec<Option<usize>> = if summarize && n > 2 * EDGE {
                (0..EDGE)
                    .map(Some)
                    .chain(std::iter::once(None))
                    .chain((n - EDGE..n).map(Some))
                    .collect()
            } else {
                (0..n).map(Some).collect()
            };
            for (j, i) in idx.iter().enumerate() {
                if j > 0 {
                    if dims.len() == 1 {
                        out.push_str(", ");
                    } else {
                        out.push(',');
                        out.push_str(&"\n".repeat(dims.len() - 1));
                        out.push_str(&" ".repeat(indent + 1));
                    }
                }
                match i {
                    Some(i) => rec(
                        out,
                        strs,
                        &dims[1..],
                        &strides[1..],
                        base + i * strides[0],
                        indent + 1,
                        width,
                        summarize,
                    ),
                    None => out.push_str("..."),
                }
            }
            out.push(']');
        }
        let mut body = String::new();
        rec(&mut body, &strs, &dims, &strides, 0, 7, width, summarize);
        write!(f, "tensor({body}")?;
        if self.numel() == 0 {
            write!(f, ", size={dims:?}")?;
        }
        if !matches!(self.dtype(), DType::F32 | DType::I64 | DType::Bool) {
            write!(f, ", dtype={}", self.dtype().torch_name())?;
        }
        if let Some(op) = self.grad_fn() {
            write!(f, ", grad_fn=<{op}>")?;
        } else if self.requires_grad() {
            write!(f, ", requires_grad=True")?;
        }
        write!(f, ")")
    }
}
