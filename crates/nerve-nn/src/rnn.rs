//! Recurrent layers (RNN, LSTM, GRU) with PyTorch's options, gate order and parameter names
//! (`weight_ih_l0`, `weight_hh_l0`, `bias_ih_l0`, `bias_hh_l0`, `…_reverse`), so PyTorch weights
//! load 1:1.
//!
//! The input projection of all time steps is one GEMM; each step then adds one recurrent GEMM
//! and one fused cell op (all gate non-linearities and the state update in one autodiff node
//! with its own backward), not a graph node per gate per step.

use std::sync::atomic::{AtomicBool, Ordering};

use nerve_core::kernels::rnn::{lstm_backward, lstm_forward, LstmDims};
use nerve_core::{DType, Error, Float, Result, Tensor};

use crate::init;
use crate::module::Module;

/// Which recurrence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RnnKind {
    /// Elman RNN with tanh.
    RnnTanh,
    /// Elman RNN with ReLU.
    RnnRelu,
    /// Long short-term memory (gates i, f, g, o).
    Lstm,
    /// Gated recurrent unit (gates r, z, n).
    Gru,
}

impl RnnKind {
    fn gates(self) -> usize {
        match self {
            RnnKind::RnnTanh | RnnKind::RnnRelu => 1,
            RnnKind::Lstm => 4,
            RnnKind::Gru => 3,
        }
    }
    fn name(self) -> &'static str {
        match self {
            RnnKind::RnnTanh | RnnKind::RnnRelu => "RNN",
            RnnKind::Lstm => "LSTM",
            RnnKind::Gru => "GRU",
        }
    }
}

/// Options of a recurrent layer (PyTorch's defaults: one layer, with bias, sequence-first,
/// no dropout, one direction).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RnnOptions {
    /// Stacked layers.
    pub num_layers: usize,
    /// Whether the layers have biases.
    pub bias: bool,
    /// Inputs and outputs are `[batch, seq, feature]` instead of `[seq, batch, feature]`.
    pub batch_first: bool,
    /// Dropout on the outputs of every layer but the last (in training).
    pub dropout: f64,
    /// A second direction over the reversed sequence, outputs concatenated.
    pub bidirectional: bool,
}

impl Default for RnnOptions {
    fn default() -> Self {
        Self {
            num_layers: 1,
            bias: true,
            batch_first: false,
            dropout: 0.0,
            bidirectional: false,
        }
    }
}

/// One direction of one layer.
struct Cell {
    w_ih: Tensor,
    w_hh: Tensor,
    b_ih: Option<Tensor>,
    b_hh: Option<Tensor>,
    suffix: String,
}

/// A multi-layer, optionally bidirectional RNN, LSTM or GRU.
pub struct Rnn {
    kind: RnnKind,
    input_size: usize,
    hidden: usize,
    opts: RnnOptions,
    cells: Vec<Cell>,
    training: AtomicBool,
}

/// The recurrent state: `h` `[layers·directions, batch, hidden]`, and `c` for an LSTM.
#[derive(Clone, Debug)]
pub struct RnnState {
    /// Hidden state.
    pub h: Tensor,
    /// Cell state (LSTM only).
    pub c: Option<Tensor>,
}

/// `nn.LSTM(input_size, hidden_size, …)`.
pub fn lstm(input_size: usize, hidden: usize, opts: RnnOptions) -> Result<Rnn> {
    Rnn::new(RnnKind::Lstm, input_size, hidden, opts)
}

/// `nn.GRU(input_size, hidden_size, …)`.
pub fn gru(input_size: usize, hidden: usize, opts: RnnOptions) -> Result<Rnn> {
    Rnn::new(RnnKind::Gru, input_size, hidden, opts)
}

impl Rnn {
    /// A recurrent layer; every weight and bias `U(±1/sqrt(hidden))`, as PyTorch.
    pub fn new(kind: RnnKind, input_size: usize, hidden: usize, opts: RnnOptions) -> Result<Self> {
        if opts.num_layers == 0 || hidden == 0 {
            return Err(Error::invalid(
                kind.name(),
                "num_layers and hidden_size must be at least 1",
            ));
        }
        if !(0.0..1.0).contains(&opts.dropout) {
            return Err(Error::invalid(
                kind.name(),
                format!("dropout {} not in [0, 1)", opts.dropout),
            ));
        }
        let dirs = if opts.bidirectional { 2 } else { 1 };
        let gh = kind.gates() * hidden;
        let bound = 1.0 / (hidden as f64).sqrt();
        let mut cells = Vec::new();
        for layer in 0..opts.num_layers {
            let in_l = if layer == 0 {
                input_size
            } else {
                hidden * dirs
            };
            for d in 0..dirs {
                let p = |dims: &[usize]| -> Result<Tensor> {
                    let t = Tensor::zeros(dims).requires_grad_(true);
                    init::uniform_(&t, -bound, bound)?;
                    Ok(t)
                };
                cells.push(Cell {
                    w_ih: p(&[gh, in_l])?,
                    w_hh: p(&[gh, hidden])?,
                    b_ih: if opts.bias { Some(p(&[gh])?) } else { None },
                    b_hh: if opts.bias { Some(p(&[gh])?) } else { None },
                    suffix: format!("_l{layer}{}", if d == 1 { "_reverse" } else { "" }),
                });
            }
        }
        Ok(Self {
            kind,
            input_size,
            hidden,
            opts,
            cells,
            training: AtomicBool::new(true),
        })
    }

    /// Run over a sequence `[seq, batch, input]` (or `[batch, seq, input]` with `batch_first`),
    /// from `state` (zeros when `None`). Returns the outputs `[seq, batch, dirs·hidden]` (same
    /// layout as the input) and the final state.
    pub fn forward_with_state(
        &self,
        x: &Tensor,
        state: Option<&RnnState>,
    ) -> Result<(Tensor, RnnState)> {
        let op = self.kind.name();
        if x.rank() != 3 || x.dims()[2] != self.input_size {
            return Err(Error::bad_shape(
                op,
                x.dims(),
                format!("expected a 3-d input with {} features", self.input_size),
            ));
        }
        let x = if self.opts.batch_first {
            x.transpose(0, 1)?
        } else {
            x.clone()
        };
        let (t_len, batch) = (x.dims()[0], x.dims()[1]);
        let dirs = if self.opts.bidirectional { 2 } else { 1 };
        let layers = self.opts.num_layers;
        let want = [layers * dirs, batch, self.hidden];
        let zeros = Tensor::zeros(want).to_dtype(x.dtype())?;
        let (h0, c0) = match state {
            Some(s) => {
                if s.h.dims() != want {
                    return Err(Error::shape_mismatch(op, &want, s.h.dims()));
                }
                let c = match (self.kind, &s.c) {
                    (RnnKind::Lstm, Some(c)) if c.dims() == want => c.clone(),
                    (RnnKind::Lstm, Some(c)) => {
                        return Err(Error::shape_mismatch(op, &want, c.dims()))
                    }
                    (RnnKind::Lstm, None) => zeros.clone(),
                    _ => zeros.clone(),
                };
                (s.h.clone(), c)
            }
            None => (zeros.clone(), zeros),
        };
        let mut input = x;
        let (mut hn, mut cn) = (Vec::new(), Vec::new());
        for layer in 0..layers {
            let mut outs = Vec::new();
            for d in 0..dirs {
                let idx = layer * dirs + d;
                let (seq, h, c) = self.run_direction(
                    &self.cells[idx],
                    &input,
                    &h0.select(0, idx)?,
                    &c0.select(0, idx)?,
                    d == 1,
                    t_len,
                )?;
                outs.push(seq);
                hn.push(h);
                cn.push(c);
            }
            input = if dirs == 2 {
                Tensor::cat(&[&outs[0], &outs[1]], 2)?
            } else {
                outs.remove(0)
            };
            if layer + 1 < layers && self.opts.dropout > 0.0 {
                input = input.dropout(self.opts.dropout, self.training.load(Ordering::Relaxed))?;
            }
        }
        let out = if self.opts.batch_first {
            input.transpose(0, 1)?
        } else {
            input
        };
        let h = Tensor::stack(&hn.iter().collect::<Vec<_>>(), 0)?;
        let c = (self.kind == RnnKind::Lstm)
            .then(|| Tensor::stack(&cn.iter().collect::<Vec<_>>(), 0))
            .transpose()?;
        Ok((out, RnnState { h, c }))
    }

    /// One direction of one layer over `x` `[T, B, in]`: outputs `[T, B, H]` and final h, c.
    #[allow(clippy::too_many_arguments)]
    fn run_direction(
        &self,
        cell: &Cell,
        x: &Tensor,
        h0: &Tensor,
        c0: &Tensor,
        reverse: bool,
        t_len: usize,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, inp) = (x.dims()[1], x.dims()[2]);
        // An LSTM or RNN adds b_hh with b_ih (summed first: one pass over xp); a GRU keeps
        // it with the recurrent part.
        let b_hh = if self.kind == RnnKind::Gru {
            None
        } else {
            cell.b_hh.as_ref()
        };
        let bias = match (&cell.b_ih, b_hh) {
            (Some(bi), Some(bh)) => Some(bi.add(bh)?),
            (Some(b), None) | (None, Some(b)) => Some(b.clone()),
            (None, None) => None,
        };
        let x2 = x.reshape(&[-1, inp as isize])?;
        if self.kind == RnnKind::Lstm {
            // The whole time loop, input projections included, is one autodiff node (no
            // per-step slicing of xp, whose backward would cost a full-size zero tensor per
            // step); it adds the bias itself.
            let packed =
                lstm_sequence(&x2, &cell.w_ih, bias.as_ref(), h0, c0, &cell.w_hh, reverse)?;
            let seq = packed.narrow(0, 0, t_len)?;
            return Ok((seq, packed.select(0, t_len)?, packed.select(0, t_len + 1)?));
        }
        // All time steps' input projections in one GEMM.
        let mut xp = x2.matmul(&cell.w_ih.t()?)?;
        if let Some(bias) = bias {
            xp = xp.add(&bias)?;
        }
        let xp = xp.reshape(&[t_len as isize, b as isize, -1])?;
        let w_hh_t = cell.w_hh.t()?;
        let (mut h, c) = (h0.clone(), c0.clone());
        let mut outs = vec![None; t_len];
        for step in 0..t_len {
            let t = if reverse { t_len - 1 - step } else { step };
            let xt = xp.select(0, t)?;
            let hp = h.matmul(&w_hh_t)?;
            match self.kind {
                RnnKind::Lstm => unreachable!("LSTM layers run as one fused sequence op"),
                RnnKind::Gru => {
                    let hp = match &cell.b_hh {
                        Some(bh) => hp.add(bh)?,
                        None => hp,
                    };
                    h = gru_cell(&xt, &hp, &h)?;
                }
                RnnKind::RnnTanh => h = xt.add(&hp)?.tanh()?,
                RnnKind::RnnRelu => h = xt.add(&hp)?.relu()?,
            }
            outs[t] = Some(h.clone());
        }
        let outs: Vec<Tensor> = outs
            .into_iter()
            .map(|o| o.expect("every step ran"))
            .collect();
        let seq = Tensor::stack(&outs.iter().collect::<Vec<_>>(), 0)?;
        Ok((seq, h, c))
    }
}

impl Module for Rnn {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.forward_with_state(x, None)?.0)
    }
    fn own_parameters(&self) -> Vec<(String, Tensor)> {
        let mut v = Vec::new();
        for c in &self.cells {
            v.push((format!("weight_ih{}", c.suffix), c.w_ih.clone()));
            v.push((format!("weight_hh{}", c.suffix), c.w_hh.clone()));
            if let Some(b) = &c.b_ih {
                v.push((format!("bias_ih{}", c.suffix), b.clone()));
            }
            if let Some(b) = &c.b_hh {
                v.push((format!("bias_hh{}", c.suffix), b.clone()));
            }
        }
        v
    }
    fn set_training(&self, training: bool) {
        self.training.store(training, Ordering::Relaxed);
    }
    fn describe(&self) -> String {
        format!(
            "{}({}, {}, num_layers={}, batch_first={}, bidirectional={})",
            self.kind.name(),
            self.input_size,
            self.hidden,
            self.opts.num_layers,
            self.opts.batch_first,
            self.opts.bidirectional
        )
    }
}

/// Run `$body` with `$T` bound to the float type of `$t`.
macro_rules! float_body {
    ($op:expr, $t:expr, $T:ident => $body:block) => {
        match $t.dtype() {
            DType::F32 => {
                type $T = f32;
                $body
            }
            DType::F64 => {
                type $T = f64;
                $body
            }
            d => Err(Error::invalid($op, format!("needs f32 or f64, got {d:?}"))),
        }
    };
}

#[inline(always)]
fn sigmoid<T: Float>(x: T) -> T {
    T::ONE / (T::ONE + (-x).exp())
}

/// The fused LSTM cell: pre-activations `a` `[B, 4H]` (gates i, f, g, o) and `c` `[B, H]` →
/// `[B, 2H]` holding the new `h` then the new `c`.
pub fn lstm_cell(a: &Tensor, c: &Tensor) -> Result<Tensor> {
    const OP: &str = "lstm_cell";
    let (b, h4) = (a.dims()[0], a.dims()[1]);
    let hs = h4 / 4;
    if a.rank() != 2 || h4 % 4 != 0 || c.dims() != [b, hs] {
        return Err(Error::shape_mismatch(OP, a.dims(), c.dims()));
    }
    float_body!(OP, a, T => {
        let av: Vec<T> = a.contiguous()?.to_vec()?;
        let cv: Vec<T> = c.contiguous()?.to_vec()?;
        // Saved per element: i, f, g, o, tanh(c_new).
        let mut saved = vec![0.0 as T; b * hs * 5];
        let mut out = vec![0.0 as T; b * hs * 2];
        for r in 0..b {
            for j in 0..hs {
                let g4 = &av[r * h4..(r + 1) * h4];
                let (i, f, g, o) = (sigmoid(g4[j]), sigmoid(g4[hs + j]), g4[2 * hs + j].tanh(), sigmoid(g4[3 * hs + j]));
                let cn = f * cv[r * hs + j] + i * g;
                let tc = cn.tanh();
                out[r * 2 * hs + j] = o * tc;
                out[r * 2 * hs + hs + j] = cn;
                let s = &mut saved[(r * hs + j) * 5..(r * hs + j) * 5 + 5];
                s.copy_from_slice(&[i, f, g, o, tc]);
            }
        }
        let out = Tensor::from_vec(out, [b, 2 * hs])?;
        Ok(out.attach_backward(OP, &[a, c], move |grad| {
            let gv: Vec<T> = grad.contiguous()?.to_vec()?;
            let mut da = vec![0.0 as T; b * h4];
            let mut dc = vec![0.0 as T; b * hs];
            for r in 0..b {
                for j in 0..hs {
                    let s = &saved[(r * hs + j) * 5..(r * hs + j) * 5 + 5];
                    let (i, f, g, o, tc) = (s[0], s[1], s[2], s[3], s[4]);
                    let dh = gv[r * 2 * hs + j];
                    let dct = gv[r * 2 * hs + hs + j] + dh * o * (1.0 - tc * tc);
                    let d = &mut da[r * h4..(r + 1) * h4];
                    d[j] = dct * g * i * (1.0 - i);
                    d[hs + j] = dct * cv[r * hs + j] * f * (1.0 - f);
                    d[2 * hs + j] = dct * i * (1.0 - g * g);
                    d[3 * hs + j] = dh * tc * o * (1.0 - o);
                    dc[r * hs + j] = dct * f;
                }
            }
            Ok(vec![Some(Tensor::from_vec(da, [b, h4])?), Some(Tensor::from_vec(dc, [b, hs])?)])
        }))
    })
}

/// A whole LSTM layer-direction as one autodiff node: the inputs of every step `x`
/// `[T·B, in]` (time-major rows), the input weight `w_ih` `[4H, in]`, the bias `[4H]`
/// (`b_ih + b_hh`, if any), initial `h0`, `c0` `[B, H]` and recurrent weight `w_hh`
/// `[4H, H]`; returns `[T + 2, B, H]`: the outputs of every step (in time order), then the
/// final `h`, then the final `c`.
///
/// The forward pass projects every step's input in one GEMM, then runs the fused time loop.
/// The backward pass runs back-propagation through time with one GEMM per step for `dh`,
/// then forms both weight gradients in one GEMM, `[dW_ih | dW_hh] = daᵀ·[x | h_prev]` (the
/// pre-activation gradients `da` are packed once for both), and `dx = da·W_ih`.
pub fn lstm_sequence(
    x: &Tensor,
    w_ih: &Tensor,
    bias: Option<&Tensor>,
    h0: &Tensor,
    c0: &Tensor,
    w_hh: &Tensor,
    reverse: bool,
) -> Result<Tensor> {
    const OP: &str = "lstm_sequence";
    let (h4, hs) = (
        w_hh.dims().first().copied().unwrap_or(0),
        w_hh.dims().get(1).copied().unwrap_or(0),
    );
    let b = h0.dims().first().copied().unwrap_or(0);
    let inp = w_ih.dims().get(1).copied().unwrap_or(0);
    if x.rank() != 2
        || w_hh.rank() != 2
        || w_ih.rank() != 2
        || h4 != 4 * hs
        || w_ih.dims().first() != Some(&h4)
        || x.dims()[1] != inp
        || h0.dims() != [b, hs]
        || c0.dims() != [b, hs]
        || (b == 0 && x.dims()[0] != 0)
        || (b > 0 && !x.dims()[0].is_multiple_of(b))
    {
        return Err(Error::shape_mismatch(OP, x.dims(), w_ih.dims()));
    }
    if let Some(bias) = bias.filter(|bias| bias.dims() != [h4]) {
        return Err(Error::shape_mismatch(OP, w_hh.dims(), bias.dims()));
    }
    let t_len = x.dims()[0].checked_div(b).unwrap_or(0);
    let dims = LstmDims {
        steps: t_len,
        batch: b,
        hidden: hs,
    };
    let xd = x.detach().contiguous()?;
    let w_i = w_ih.detach();
    let xp = nerve_core::no_grad(|| xd.matmul(&w_i.t()?))?;
    float_body!(OP, x, T => {
        let w = w_hh.detach().contiguous()?;
        let h0v: Vec<T> = h0.contiguous()?.to_vec()?;
        let mut c: Vec<T> = c0.contiguous()?.to_vec()?;
        let bias_v: Vec<T> = match bias {
            Some(bias) => bias.contiguous()?.to_vec()?,
            None => vec![0.0 as T; h4],
        };
        let bh = b * hs;
        let (mut packed, tape) = xp.with_data::<T, _>(|xv| {
            w.with_data::<T, _>(|wv| lstm_forward(dims, reverse, xv, &bias_v, wv, &h0v, &mut c))
        })??;
        let mut parents = vec![x, w_ih, h0, c0, w_hh];
        parents.extend(bias);
        let tracked = nerve_core::is_grad_enabled() && parents.iter().any(|p| p.requires_grad());
        // Each row's input and the h its step started from, side by side, `[T·B, in + H]`
        // (for both weight gradients in one GEMM; only when a backward pass may follow):
        // h_prev is the output of the neighbouring time index the step came after, or h0.
        let width = inp + hs;
        let mut xh: Vec<T> = Vec::with_capacity(if tracked { t_len * b * width } else { 0 });
        xd.with_data::<T, _>(|xv| {
            for t in (0..t_len).filter(|_| tracked) {
                let src = match (reverse, t) {
                    (false, 0) => &h0v[..],
                    (false, t) => &packed[(t - 1) * bh..t * bh],
                    (true, t) if t + 1 == t_len => &h0v[..],
                    (true, t) => &packed[(t + 1) * bh..(t + 2) * bh],
                };
                for r in 0..b {
                    let row = t * b + r;
                    xh.extend_from_slice(&xv[row * inp..(row + 1) * inp]);
                    xh.extend_from_slice(&src[r * hs..(r + 1) * hs]);
                }
            }
        })?;
        // Then the final h and c (the vector has room for them).
        let last = if reverse { 0 } else { t_len.saturating_sub(1) };
        if t_len > 0 {
            packed.extend_from_within(last * bh..(last + 1) * bh);
        } else {
            packed.extend_from_slice(&h0v);
        }
        packed.extend_from_slice(&c);
        let out = Tensor::from_vec(packed, [t_len + 2, b, hs])?;
        if !tracked {
            return Ok(out);
        }
        let xh = Tensor::from_vec(xh, [t_len * b, width])?;
        let with_bias = bias.is_some();
        let need_dw = w_ih.requires_grad() || w_hh.requires_grad();
        let need_dx = x.requires_grad();
        Ok(out.attach_backward(OP, &parents, move |grad| {
            nerve_core::no_grad(|| {
                let (da, db, dh, dc) = grad.with_data::<T, _>(|gv| {
                    let mut dh: Vec<T> = gv[t_len * bh..(t_len + 1) * bh].to_vec();
                    let mut dc: Vec<T> = gv[(t_len + 1) * bh..].to_vec();
                    let (da, db) = w.with_data::<T, _>(|wv| {
                        lstm_backward(dims, reverse, &tape, wv, &gv[..t_len * bh], &mut dh, &mut dc)
                    })?;
                    Ok::<_, Error>((da, db, dh, dc))
                })??;
                let da = Tensor::from_vec(da, [t_len * b, h4])?;
                let (dw_ih, dw_hh) = if need_dw {
                    let dw = da.t()?.matmul(&xh)?;
                    (
                        Some(dw.narrow(1, 0, inp)?.contiguous()?),
                        Some(dw.narrow(1, inp, hs)?.contiguous()?),
                    )
                } else {
                    (None, None)
                };
                let dx = need_dx.then(|| da.matmul(&w_i)).transpose()?;
                let mut grads = vec![
                    dx,
                    dw_ih,
                    Some(Tensor::from_vec(dh, [b, hs])?),
                    Some(Tensor::from_vec(dc, [b, hs])?),
                    dw_hh,
                ];
                if with_bias {
                    grads.push(Some(Tensor::from_vec(db, [h4])?));
                }
                Ok(grads)
            })
        }))
    })
}

/// One batch row of the GRU cell: gates from `x` and `hp` (`[3H]`, blocks r, z, n) and the
/// previous `h`; the gates saved in `gates` (`[3H]`), the new h in `out`.
#[inline(always)]
fn gru_row<T: Float>(x: &[T], hp: &[T], h: &[T], gates: &mut [T], out: &mut [T]) {
    let hs = out.len();
    let (h, x, hp, gates) = (&h[..hs], &x[..3 * hs], &hp[..3 * hs], &mut gates[..3 * hs]);
    let (gr, rest) = gates.split_at_mut(hs);
    let (gz, gn) = rest.split_at_mut(hs);
    for j in 0..hs {
        let r = sigmoid(x[j] + hp[j]);
        let z = sigmoid(x[hs + j] + hp[hs + j]);
        let n = (x[2 * hs + j] + r * hp[2 * hs + j]).tanh();
        out[j] = (T::ONE - z) * n + z * h[j];
        (gr[j], gz[j], gn[j]) = (r, z, n);
    }
}

/// One batch row of the GRU cell's backward: from the saved gates, `hp`, the previous `h` and
/// the output gradient `g`, the gradients of `x`, `hp` (`[3H]`) and `h`.
#[inline(always)]
fn gru_row_grads<T: Float>(
    gates: &[T],
    hp: &[T],
    h: &[T],
    g: &[T],
    dx: &mut [T],
    dp: &mut [T],
    dh: &mut [T],
) {
    let hs = dh.len();
    let (gates, hp, h, g) = (&gates[..3 * hs], &hp[..3 * hs], &h[..hs], &g[..hs]);
    let (dx, dp) = (&mut dx[..3 * hs], &mut dp[..3 * hs]);
    for j in 0..hs {
        let (r, z, n) = (gates[j], gates[hs + j], gates[2 * hs + j]);
        let dn = g[j] * (T::ONE - z) * (T::ONE - n * n);
        let dz = g[j] * (h[j] - n) * z * (T::ONE - z);
        let dr = dn * hp[2 * hs + j] * r * (T::ONE - r);
        (dx[j], dx[hs + j], dx[2 * hs + j]) = (dr, dz, dn);
        (dp[j], dp[hs + j], dp[2 * hs + j]) = (dr, dz, dn * r);
        dh[j] = g[j] * z;
    }
}

/// The fused GRU cell: input part `x` `[B, 3H]` (`x W_ihᵀ + b_ih`, gates r, z, n), recurrent
/// part `hp` `[B, 3H]` (`h W_hhᵀ + b_hh`) and `h` `[B, H]` → the new `h`.
pub fn gru_cell(x: &Tensor, hp: &Tensor, h: &Tensor) -> Result<Tensor> {
    const OP: &str = "gru_cell";
    let (b, h3) = (x.dims()[0], x.dims()[1]);
    let hs = h3 / 3;
    if x.rank() != 2 || h3 % 3 != 0 || hp.dims() != x.dims() || h.dims() != [b, hs] {
        return Err(Error::shape_mismatch(OP, x.dims(), h.dims()));
    }
    float_body!(OP, x, T => {
        let xv: Vec<T> = x.contiguous()?.to_vec()?;
        let pv: Vec<T> = hp.contiguous()?.to_vec()?;
        let hv: Vec<T> = h.contiguous()?.to_vec()?;
        // Saved: the gates r, z, n, laid out like x (contiguous blocks, so the loops vectorise).
        let mut saved = vec![0.0 as T; b * h3];
        let mut out = vec![0.0 as T; b * hs];
        nerve_core::kernels::with_simd(
            #[inline(always)]
            || {
                for r_ in 0..b {
                    let rows = r_ * h3..(r_ + 1) * h3;
                    gru_row(
                        &xv[rows.clone()],
                        &pv[rows.clone()],
                        &hv[r_ * hs..(r_ + 1) * hs],
                        &mut saved[rows],
                        &mut out[r_ * hs..(r_ + 1) * hs],
                    );
                }
            },
        );
        let out = Tensor::from_vec(out, [b, hs])?;
        Ok(out.attach_backward(OP, &[x, hp, h], move |grad| {
            let gv: Vec<T> = grad.contiguous()?.to_vec()?;
            let mut dx = vec![0.0 as T; b * h3];
            let mut dp = vec![0.0 as T; b * h3];
            let mut dh = vec![0.0 as T; b * hs];
            nerve_core::kernels::with_simd(
                #[inline(always)]
                || {
                    for r_ in 0..b {
                        let (rows, units) = (r_ * h3..(r_ + 1) * h3, r_ * hs..(r_ + 1) * hs);
                        gru_row_grads(
                            &saved[rows.clone()],
                            &pv[rows.clone()],
                            &hv[units.clone()],
                            &gv[units.clone()],
                            &mut dx[rows.clone()],
                            &mut dp[rows],
                            &mut dh[units],
                        );
                    }
                },
            );
            Ok(vec![
                Some(Tensor::from_vec(dx, [b, h3])?),
                Some(Tensor::from_vec(dp, [b, h3])?),
                Some(Tensor::from_vec(dh, [b, hs])?),
            ])
        }))
    })
}
