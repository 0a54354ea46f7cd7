//! Fused scaled dot-product attention, forward and backward, one (batch, head) item at a time.
//!
//! Each item's scores `[L, S]` are produced by a GEMM, masked, soft-maxed and multiplied by
//! `V` while they are still in the core's cache; the backward pass likewise turns `dP` into
//! `dS` in place between its GEMMs. Items run in parallel, each on one thread (the products
//! are small), or one after another with threaded GEMMs when there are fewer items than
//! threads. Compared with a graph of tensor ops this saves some ten passes over `[B, H, L, S]`
//! tensors in memory.
//!
//! Layouts: the probabilities `p` are `[N, L, S]` for `N` items. The output (and its gradient)
//! is `[N / H, L, H · Ev]` with the `H` heads of a batch entry side by side in each row (PyTorch's
//! layout after merging heads; `[N, L, Ev]` for one head). `q`, `k` and `v` are read through an
//! [`AttnLayout`], so they can be contiguous `[N, L, E]` tensors or the three thirds of a
//! packed `[B, L, 3E]` projection, without copies.

mod tiled;

use rayon::prelude::*;

use super::gemm::{gemm, GemmFloat, GEMM_PAR_MIN};
use super::{assume_init, reduce, uninit_buf, with_scratch, with_simd, SendPtr};
use crate::threading::{install, num_threads};

/// Sizes of one attention call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttnDims {
    /// Items (batch × heads).
    pub items: usize,
    /// Queries per item `L`.
    pub l: usize,
    /// Keys per item `S`.
    pub s: usize,
    /// Query/key width `E`.
    pub e: usize,
    /// Value width `Ev`.
    pub ev: usize,
}

/// Where the rows of one operand lie: item `i` is batch entry `i / heads`, head `i % heads`;
/// its row `r` starts at `offset + entry · batch_stride + head · head_stride + r · row_stride`
/// and its values are contiguous.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttnLayout {
    /// Start of item 0's first row.
    pub offset: usize,
    /// Heads per batch entry.
    pub heads: usize,
    /// Distance between batch entries.
    pub batch_stride: usize,
    /// Distance between heads.
    pub head_stride: usize,
    /// Distance between rows.
    pub row_stride: usize,
}

impl AttnLayout {
    /// A contiguous `[N, rows, width]` tensor.
    pub fn contiguous(rows: usize, width: usize) -> Self {
        AttnLayout {
            offset: 0,
            heads: 1,
            batch_stride: rows * width,
            head_stride: 0,
            row_stride: width,
        }
    }

    /// Heads `heads` of width `width` side by side in rows of `[B, rows, total]` (a merged-head
    /// tensor, or one third of a packed projection when `offset` skips to it).
    pub fn heads(offset: usize, heads: usize, rows: usize, width: usize, total: usize) -> Self {
        AttnLayout {
            offset,
            heads,
            batch_stride: rows * total,
            head_stride: width,
            row_stride: total,
        }
    }

    fn base(&self, item: usize) -> usize {
        self.offset + item / self.heads * self.batch_stride + item % self.heads * self.head_stride
    }

    /// Panics unless `items` items of `rows × width` fit in `len` elements.
    fn check(&self, items: usize, rows: usize, width: usize, len: usize) {
        assert!(
            self.heads > 0 && items.is_multiple_of(self.heads),
            "attention: bad layout {self:?}"
        );
        if items > 0 && rows > 0 {
            let end = self.base(items - 1) + (rows - 1) * self.row_stride + width;
            assert!(
                end <= len,
                "attention: layout {self:?} overruns {len} elements"
            );
        }
    }
}

/// How the items of a call run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Plan {
    /// Items in parallel, each by the register-tiled kernels of [`tiled`] on one thread.
    Tiled(tiled::Tiles),
    /// Items in parallel, each by single-threaded GEMMs.
    Items,
    /// One item after another, each by threaded GEMMs (fewer large items than threads).
    Gemms,
}

impl Plan {
    /// The plan for `T` and `dims` on this machine: items in parallel when there are enough of
    /// them for every thread or each is small, by the tiled kernels where they run.
    fn for_dims<T>(dims: AttnDims) -> Plan {
        let threads = num_threads();
        let per_item = dims.l * dims.s * dims.e.max(dims.ev);
        let items = dims.items >= threads || per_item < GEMM_PAR_MIN;
        match tiled::Tiles::new::<T>(dims.e, dims.ev) {
            Some(t) if items => Plan::Tiled(t),
            _ if threads > 1 && items => Plan::Items,
            _ => Plan::Gemms,
        }
    }
}

/// Run `f(item, parallel_gemm)` for every item as `plan` says.
fn for_items(dims: AttnDims, plan: Plan, f: impl Fn(usize, bool) + Sync) {
    if plan == Plan::Gemms || num_threads() == 1 || dims.items == 1 {
        (0..dims.items).for_each(|i| f(i, plan == Plan::Gemms));
    } else {
        install(|| (0..dims.items).into_par_iter().for_each(|i| f(i, false)));
    }
}

/// Item `i`'s rows of an operand.
fn rows_of<T>((data, lay): Operand<T>, i: usize) -> tiled::Rows<T> {
    tiled::Rows {
        ptr: data[lay.base(i)..].as_ptr(),
        stride: lay.row_stride,
    }
}

/// `C (m×n, row stride ldc) = alpha · A·B` with A, B given by pointer and strides.
///
/// # Safety
/// As [`gemm`].
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn mm<T: GemmFloat>(
    (m, n, k): (usize, usize, usize),
    alpha: T,
    (a, rsa, csa): (*const T, usize, usize),
    (b, rsb, csb): (*const T, usize, usize),
    (c, ldc): (*mut T, usize),
    parallel: bool,
) {
    // SAFETY: forwarded contract.
    unsafe {
        gemm::<T>(
            m,
            n,
            k,
            alpha,
            a,
            rsa as isize,
            csa as isize,
            b,
            rsb as isize,
            csb as isize,
            T::ZERO,
            c,
            ldc as isize,
            1,
            parallel,
        )
    }
}

/// Row `i` of the scores, in place: keys after `i` blocked when `causal`, then softmax.
#[inline(always)]
fn softmax_row<T: GemmFloat>(row: &mut [T], i: usize, causal: bool) {
    let n = if causal {
        (i + 1).min(row.len())
    } else {
        row.len()
    };
    let (live, blocked) = row.split_at_mut(n);
    blocked.fill(T::ZERO);
    let m = reduce::max_shift(live);
    for v in live.iter_mut() {
        *v = (*v - m).exp();
    }
    let inv = T::ONE / reduce::sum(live);
    for v in live.iter_mut() {
        *v *= inv;
    }
}

/// One operand: its storage and where its items' rows lie.
pub type Operand<'a, T> = (&'a [T], AttnLayout);

/// Check the operands' layouts against their storage and `dims`; the layout of the output
/// (heads merged, as many per batch entry as `q` has).
fn output_layout<T>(dims: AttnDims, q: Operand<T>, k: Operand<T>, v: Operand<T>) -> AttnLayout {
    let AttnDims { items, l, s, e, ev } = dims;
    q.1.check(items, l, e, q.0.len());
    k.1.check(items, s, e, k.0.len());
    v.1.check(items, s, ev, v.0.len());
    let heads = q.1.heads;
    AttnLayout::heads(0, heads, l, ev, heads * ev)
}

/// Forward: returns the probabilities `p` (`softmax(q kᵀ · scale)`, keys after the query's
/// index blocked when `causal`, i.e. PyTorch's `is_causal`) and the output `p v` in the
/// merged-head layout (see the module docs), with as many heads per batch entry as `q`'s
/// layout has.
///
/// # Panics
/// If a layout does not fit its storage or the items are not whole batch entries.
pub fn attention_forward<T: GemmFloat>(
    dims: AttnDims,
    (q, lq): Operand<T>,
    (k, lk): Operand<T>,
    (v, lv): Operand<T>,
    scale: T,
    causal: bool,
) -> (Vec<T>, Vec<T>) {
    let plan = Plan::for_dims::<T>(dims);
    forward_with(plan, dims, (q, lq), (k, lk), (v, lv), scale, causal)
}

fn forward_with<T: GemmFloat>(
    plan: Plan,
    dims: AttnDims,
    (q, lq): Operand<T>,
    (k, lk): Operand<T>,
    (v, lv): Operand<T>,
    scale: T,
    causal: bool,
) -> (Vec<T>, Vec<T>) {
    let AttnDims { items, l, s, e, ev } = dims;
    let lo = output_layout(dims, (q, lq), (k, lk), (v, lv));
    // Written in full below: every item's GEMMs (beta = 0) and row pass; the items' blocks
    // of the output tile it (heads side by side in each row).
    let (mut p, mut out) = (
        uninit_buf::<T>(items * l * s),
        uninit_buf::<T>(items * l * ev),
    );
    let (pp, po) = (
        SendPtr(p.as_mut_ptr().cast::<T>()),
        SendPtr(out.as_mut_ptr().cast::<T>()),
    );
    if let Plan::Tiled(tiles) = plan {
        let it = tiled::Item::new(dims, scale, causal);
        for_items(dims, plan, |i, _| {
            let o = tiled::RowsMut {
                // SAFETY: item i's block of out starts there (the output layout tiles it).
                ptr: unsafe { po.get().add(lo.base(i)) },
                stride: lo.row_stride,
            };
            let [qi, ki, vi] = [(q, lq), (k, lk), (v, lv)].map(|op| rows_of(op, i));
            // SAFETY: the layouts were checked to fit their storage; item i's blocks of p
            // and out are written by this task only.
            unsafe { tiled::forward(tiles, it, qi, ki, vi, pp.get().add(i * l * s), o) };
        });
        // SAFETY: every item wrote its whole blocks of p and out, which tile both.
        return unsafe { (assume_init(p), assume_init(out)) };
    }
    for_items(dims, plan, |i, par| {
        let (qi, ki, vi) = (&q[lq.base(i)..], &k[lk.base(i)..], &v[lv.base(i)..]);
        // SAFETY: item i's blocks of p and out are written by this task only; the inputs
        // are read inside their slices (checked layouts).
        unsafe {
            let pi = pp.get().add(i * l * s);
            let (rq, rk, rv) = (lq.row_stride, lk.row_stride, lv.row_stride);
            mm(
                (l, s, e),
                scale,
                (qi.as_ptr(), rq, 1),
                (ki.as_ptr(), 1, rk),
                (pi, s),
                par,
            );
            let rows = std::slice::from_raw_parts_mut(pi, l * s);
            with_simd(
                #[inline(always)]
                || {
                    for (r, row) in rows.chunks_exact_mut(s).enumerate() {
                        softmax_row(row, r, causal);
                    }
                },
            );
            let oi = po.get().add(lo.base(i));
            mm(
                (l, ev, s),
                T::ONE,
                (pi, s, 1),
                (vi.as_ptr(), rv, 1),
                (oi, lo.row_stride),
                par,
            );
        }
    });
    // SAFETY: every item wrote its whole blocks of p and out, which tile both.
    unsafe { (assume_init(p), assume_init(out)) }
}

/// Backward of [`attention_forward`]: from the probabilities `p` and the output gradient
/// `g` (merged-head layout), returns the gradients of `q`, `k` and `v` in one buffer. With
/// `packed`, `q`, `k` and `v` must be the three thirds of one `[B, L, 3E]` projection (layouts
/// `AttnLayout::heads(0 | E | 2E, H, L, E / H, 3E)`) and the buffer has that shape; otherwise
/// they must be contiguous and the buffer holds `dq`, then `dk`, then `dv`. `causal` must be
/// as in the forward pass (it only lets the backward pass skip the blocked scores).
///
/// # Panics
/// If the layouts are not one of those two forms or do not fit their storage.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward<T: GemmFloat>(
    dims: AttnDims,
    (q, lq): Operand<T>,
    (k, lk): Operand<T>,
    (v, lv): Operand<T>,
    p: &[T],
    g: &[T],
    scale: T,
    causal: bool,
    packed: bool,
) -> Vec<T> {
    let plan = Plan::for_dims::<T>(dims);
    backward_with(
        plan,
        dims,
        (q, lq),
        (k, lk),
        (v, lv),
        p,
        g,
        scale,
        causal,
        packed,
    )
}

#[allow(clippy::too_many_arguments)]
fn backward_with<T: GemmFloat>(
    plan: Plan,
    dims: AttnDims,
    (q, lq): Operand<T>,
    (k, lk): Operand<T>,
    (v, lv): Operand<T>,
    p: &[T],
    g: &[T],
    scale: T,
    causal: bool,
    packed: bool,
) -> Vec<T> {
    let AttnDims { items, l, s, e, ev } = dims;
    let lo = output_layout(dims, (q, lq), (k, lk), (v, lv));
    let heads = lo.heads;
    assert!(
        p.len() == items * l * s && g.len() == items * l * ev,
        "attention: sizes"
    );
    let (nq, nk, nv) = (items * l * e, items * s * e, items * s * ev);
    let (gq, gk, gv, len) = if packed {
        let w = heads * e;
        let third = |o| AttnLayout::heads(o, heads, l, e, 3 * w);
        assert!(
            l == s && e == ev && lq == third(0) && lk == third(w) && lv == third(2 * w),
            "attention: not a packed projection"
        );
        (lq, lk, lv, nq * 3)
    } else {
        let (cq, ck, cv) = (
            AttnLayout::contiguous(l, e),
            AttnLayout::contiguous(s, e),
            AttnLayout::contiguous(s, ev),
        );
        assert!(
            lq == cq && lk == ck && lv == cv,
            "attention: operands not contiguous"
        );
        let at = |o, lay: AttnLayout| AttnLayout { offset: o, ..lay };
        (cq, at(nq, ck), at(nq + nk, cv), nq + nk + nv)
    };
    // Every element is written: the items' blocks of dq, dk and dv tile the buffer.
    let mut grads = uninit_buf::<T>(len);
    let pg = SendPtr(grads.as_mut_ptr().cast::<T>());
    if let Plan::Tiled(tiles) = plan {
        let it = tiled::Item::new(dims, scale, causal);
        for_items(dims, plan, |i, _| {
            let out = |lay: AttnLayout| tiled::RowsMut {
                // SAFETY: item i's block of a gradient starts there (its layout tiles the
                // buffer).
                ptr: unsafe { pg.get().add(lay.base(i)) },
                stride: lay.row_stride,
            };
            let [qi, ki, vi] = [(q, lq), (k, lk), (v, lv)].map(|op| rows_of(op, i));
            let gi = rows_of((g, lo), i);
            // SAFETY: the layouts were checked to fit their storage and p, g their sizes;
            // item i's blocks of the gradients are written by this task only.
            unsafe {
                tiled::backward(
                    tiles,
                    it,
                    qi,
                    ki,
                    vi,
                    p[i * l * s..].as_ptr(),
                    gi,
                    (out(gq), out(gk), out(gv)),
                )
            };
        });
        // SAFETY: every item wrote its whole blocks of dq, dk and dv, which tile the buffer.
        return unsafe { assume_init(grads) };
    }
    for_items(dims, plan, |i, par| {
        let (qi, ki, vi) = (&q[lq.base(i)..], &k[lk.base(i)..], &v[lv.base(i)..]);
        let (pi, gi) = (&p[i * l * s..(i + 1) * l * s], &g[lo.base(i)..]);
        let (rq, rk, rv, rg) = (lq.row_stride, lk.row_stride, lv.row_stride, lo.row_stride);
        with_scratch::<T, _>(l * s, |ds| {
            // SAFETY: item i's blocks of the gradients are written by this task only (the
            // layouts were checked to tile the buffer); the inputs are read inside their
            // slices; ds is l×s.
            unsafe {
                // dv = pᵀ g
                let dvi = pg.get().add(gv.base(i));
                mm(
                    (s, ev, l),
                    T::ONE,
                    (pi.as_ptr(), 1, s),
                    (gi.as_ptr(), rg, 1),
                    (dvi, gv.row_stride),
                    par,
                );
                // dp = g vᵀ, then ds = p ⊙ (dp − Σ_j dp ⊙ p) · scale in place.
                let dsp = ds.as_mut_ptr();
                mm(
                    (l, s, ev),
                    T::ONE,
                    (gi.as_ptr(), rg, 1),
                    (vi.as_ptr(), 1, rv),
                    (dsp, s),
                    par,
                );
                with_simd(
                    #[inline(always)]
                    || {
                        for (d, pr) in ds.chunks_exact_mut(s).zip(pi.chunks_exact(s)) {
                            let mut dot = T::ZERO;
                            for (&a, &b) in d.iter().zip(pr) {
                                dot += a * b;
                            }
                            for (a, &b) in d.iter_mut().zip(pr) {
                                *a = b * (*a - dot) * scale;
                            }
                        }
                    },
                );
                // dq = ds k, dk = dsᵀ q
                let dqi = pg.get().add(gq.base(i));
                mm(
                    (l, e, s),
                    T::ONE,
                    (dsp, s, 1),
                    (ki.as_ptr(), rk, 1),
                    (dqi, gq.row_stride),
                    par,
                );
                let dki = pg.get().add(gk.base(i));
                mm(
                    (s, e, l),
                    T::ONE,
                    (dsp, 1, s),
                    (qi.as_ptr(), rq, 1),
                    (dki, gk.row_stride),
                    par,
                );
            }
        });
    });
    // SAFETY: every item wrote its whole blocks of dq, dk and dv, which tile the buffer.
    unsafe { assume_init(grads) }
}

/// A key/value cache for incremental decoding that grows in place: `[batch, kv_heads, cap,
/// head_dim]` buffers of which the first `len` positions hold the keys and values of the
/// tokens seen so far. Appending never copies what is cached (except when the capacity
/// doubles), and [`cached_attention`] reads it where it lies.
#[derive(Clone, Debug, Default)]
pub struct KvBuffer<T> {
    k: Vec<T>,
    v: Vec<T>,
    batch: usize,
    heads: usize,
    dim: usize,
    cap: usize,
    len: usize,
}

impl<T: GemmFloat> KvBuffer<T> {
    /// Positions cached.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Append `t` positions of keys and values `[batch, heads, t, dim]` (contiguous). The
    /// first append fixes batch, heads and dim; later ones must match.
    pub fn append(&mut self, k: &[T], v: &[T], batch: usize, heads: usize, t: usize, dim: usize) {
        assert_eq!(k.len(), batch * heads * t * dim, "KvBuffer::append: keys");
        assert_eq!(v.len(), k.len(), "KvBuffer::append: values");
        if self.cap == 0 {
            (self.batch, self.heads, self.dim) = (batch, heads, dim);
        }
        assert!(
            (self.batch, self.heads, self.dim) == (batch, heads, dim),
            "KvBuffer::append: [{batch}, {heads}, _, {dim}] after [{}, {}, _, {}]",
            self.batch,
            self.heads,
            self.dim
        );
        if self.len + t > self.cap {
            let cap = (self.len + t).max(2 * self.cap).max(64);
            let grow = |old: &[T]| {
                let mut new = vec![T::ZERO; batch * heads * cap * dim];
                for item in 0..batch * heads {
                    let (src, dst) = (item * self.cap * dim, item * cap * dim);
                    new[dst..dst + self.len * dim].copy_from_slice(&old[src..src + self.len * dim]);
                }
                new
            };
            self.k = grow(&self.k);
            self.v = grow(&self.v);
            self.cap = cap;
        }
        for item in 0..batch * heads {
            let dst = (item * self.cap + self.len) * dim;
            let src = item * t * dim;
            self.k[dst..dst + t * dim].copy_from_slice(&k[src..src + t * dim]);
            self.v[dst..dst + t * dim].copy_from_slice(&v[src..src + t * dim]);
        }
        self.len += t;
    }
}

/// Causal attention of `t` new queries `q` `[batch, heads, t, dim]` (contiguous) over every
/// position of `cache` (whose last `t` positions are the new tokens' own keys): new query `i`
/// sees positions `0..=len − t + i`. Grouped-query attention reads key/value head
/// `h / (heads / kv_heads)` for query head `h` without repeating it. Returns `[batch, t,
/// heads · dim]` (heads merged, ready for the output projection). For decoding: no gradients.
pub fn cached_attention<T: GemmFloat>(
    q: &[T],
    cache: &KvBuffer<T>,
    heads: usize,
    t: usize,
    scale: T,
) -> Vec<T> {
    let (b, g, d, s) = (cache.batch, cache.heads, cache.dim, cache.len);
    assert!(
        g > 0 && heads.is_multiple_of(g) && t <= s,
        "cached_attention: sizes"
    );
    assert_eq!(q.len(), b * heads * t * d, "cached_attention: queries");
    let rep = heads / g;
    let past = s - t;
    // Each (entry, head) item's rows `[t, d]`, then scattered into the merged layout.
    let item = |bh: usize| -> Vec<T> {
        let (bi, h) = (bh / heads, bh % heads);
        let kv = (bi * g + h / rep) * cache.cap * d;
        let keys = &cache.k[kv..kv + s * d];
        let vals = &cache.v[kv..kv + s * d];
        let mut scores = vec![T::ZERO; s];
        let mut rows = vec![T::ZERO; t * d];
        with_simd(|| {
            for i in 0..t {
                let qi = &q[(bh * t + i) * d..(bh * t + i + 1) * d];
                let seen = past + i + 1;
                let mut max = T::NEG_INFINITY;
                for (j, sc) in scores[..seen].iter_mut().enumerate() {
                    let kj = &keys[j * d..(j + 1) * d];
                    let mut acc = T::ZERO;
                    for l in 0..d {
                        acc += qi[l] * kj[l];
                    }
                    *sc = acc * scale;
                    if *sc > max {
                        max = *sc;
                    }
                }
                let mut sum = T::ZERO;
                for sc in &mut scores[..seen] {
                    *sc = (*sc - max).exp();
                    sum += *sc;
                }
                let inv = T::ONE / sum;
                let o = &mut rows[i * d..(i + 1) * d];
                for (j, &p) in scores[..seen].iter().enumerate() {
                    let w = p * inv;
                    let vj = &vals[j * d..(j + 1) * d];
                    for l in 0..d {
                        o[l] += w * vj[l];
                    }
                }
            }
        });
        rows
    };
    let work = b * heads * t * s * d;
    let items: Vec<Vec<T>> = if work >= 1 << 17 && num_threads() > 1 && b * heads > 1 {
        install(|| (0..b * heads).into_par_iter().map(item).collect())
    } else {
        (0..b * heads).map(item).collect()
    };
    let mut out = vec![T::ZERO; b * t * heads * d];
    for (bh, rows) in items.iter().enumerate() {
        let (bi, h) = (bh / heads, bh % heads);
        for i in 0..t {
            let dst = ((bi * t + i) * heads + h) * d;
            out[dst..dst + d].copy_from_slice(&rows[i * d..(i + 1) * d]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Test values in [-2, 2].
    fn data(len: usize, seed: u64) -> Vec<f64> {
        crate::kernels::test_data(len, seed)
            .into_iter()
            .map(|x| 2.0 * x)
            .collect()
    }

    type Mat = Vec<Vec<f64>>;

    /// Rows `0..n` (`w` wide) of item `i` of an operand, in f64.
    fn item<T: Copy + Into<f64>>((d, lay): Operand<T>, i: usize, n: usize, w: usize) -> Mat {
        (0..n)
            .map(|r| {
                let at = lay.base(i) + r * lay.row_stride;
                d[at..at + w].iter().map(|&x| x.into()).collect()
            })
            .collect()
    }

    /// `[n × w]` with entries `Σ_y a(x, y) · b(y, c)`.
    fn prod(
        n: usize,
        m: usize,
        w: usize,
        a: impl Fn(usize, usize) -> f64,
        b: impl Fn(usize, usize) -> f64,
    ) -> Mat {
        (0..n)
            .map(|x| {
                (0..w)
                    .map(|c| (0..m).map(|y| a(x, y) * b(y, c)).sum())
                    .collect()
            })
            .collect()
    }

    /// The attention of one item and its gradients in f64, from the definitions:
    /// `[p, out, dq, dk, dv]`.
    fn reference(q: &Mat, k: &Mat, v: &Mat, g: &Mat, scale: f64, causal: bool) -> [Mat; 5] {
        let (l, s, e, ev) = (q.len(), k.len(), q[0].len(), v[0].len());
        let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
        let p: Mat = (0..l)
            .map(|i| {
                let live = if causal { (i + 1).min(s) } else { s };
                let sc: Vec<f64> = (0..live).map(|j| dot(&q[i], &k[j]) * scale).collect();
                let m = sc.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let sum: f64 = sc.iter().map(|x| (x - m).exp()).sum();
                (0..s)
                    .map(|j| {
                        if j < live {
                            (sc[j] - m).exp() / sum
                        } else {
                            0.0
                        }
                    })
                    .collect()
            })
            .collect();
        let out = prod(l, s, ev, |i, j| p[i][j], |j, c| v[j][c]);
        let dp = prod(l, ev, s, |i, c| g[i][c], |c, j| v[j][c]);
        let ds: Mat = (0..l)
            .map(|i| {
                let d = dot(&dp[i], &p[i]);
                (0..s).map(|j| p[i][j] * (dp[i][j] - d) * scale).collect()
            })
            .collect();
        let dq = prod(l, s, e, |i, j| ds[i][j], |j, c| k[j][c]);
        let dk = prod(s, l, e, |j, i| ds[i][j], |i, c| q[i][c]);
        let dv = prod(s, l, ev, |j, i| p[i][j], |i, c| g[i][c]);
        [p, out, dq, dk, dv]
    }

    fn assert_close(what: &str, got: &Mat, want: &Mat, tol: f64) {
        for (r, (gr, wr)) in got.iter().zip(want).enumerate() {
            for (c, (&x, &y)) in gr.iter().zip(wr).enumerate() {
                assert!(
                    (x - y).abs() <= tol * (1.0 + y.abs()),
                    "{what}[{r}][{c}]: {x} vs {y}"
                );
            }
        }
    }

    /// Every plan this machine has (tiled kernels at each SIMD level, GEMMs per item and
    /// threaded GEMMs) against the f64 definitions, forward and backward, for contiguous and
    /// packed operands, causal or not, with partial tiles and chunks.
    fn check<T: GemmFloat + Into<f64>>(from: impl Fn(f64) -> T, tol: f64) {
        // (batch, heads, l, s, e, ev)
        let shapes = [
            (1, 1, 1, 1, 8, 8),
            (2, 2, 13, 45, 16, 24),
            (1, 3, 65, 65, 32, 32),
            (1, 2, 128, 128, 32, 32),
            (2, 1, 30, 70, 64, 64),
            (1, 2, 70, 30, 8, 16),
            (1, 1, 5, 200, 40, 8),
            (1, 2, 9, 9, 12, 12),
        ];
        for level in ["", "avx2", "plain"] {
            crate::kernels::set_simd_cap_for_tests(level);
            for &(b, h, l, s, e, ev) in &shapes {
                let items = b * h;
                let dims = AttnDims { items, l, s, e, ev };
                let scale = 1.0 / (e as f64).sqrt();
                let conv = |v: Vec<f64>| v.into_iter().map(&from).collect::<Vec<T>>();
                let g = conv(data(items * l * ev, 4));
                let mut plans = vec![Plan::Items, Plan::Gemms];
                plans.extend(tiled::Tiles::new::<T>(e, ev).map(Plan::Tiled));
                for causal in [false, true] {
                    for packed in [false, true] {
                        if packed && (l != s || e != ev) {
                            continue;
                        }
                        // Packed: the thirds of one projection; else separate tensors.
                        let (bq, bk, bv, lq, lk, lv) = if packed {
                            let w = h * e;
                            let third = |o| AttnLayout::heads(o, h, l, e, 3 * w);
                            let buf = conv(data(b * l * 3 * w, 1));
                            (
                                buf.clone(),
                                buf.clone(),
                                buf,
                                third(0),
                                third(w),
                                third(2 * w),
                            )
                        } else {
                            (
                                conv(data(items * l * e, 1)),
                                conv(data(items * s * e, 2)),
                                conv(data(items * s * ev, 3)),
                                AttnLayout::contiguous(l, e),
                                AttnLayout::contiguous(s, e),
                                AttnLayout::contiguous(s, ev),
                            )
                        };
                        let (q, k, v) = ((&bq[..], lq), (&bk[..], lk), (&bv[..], lv));
                        // Heads merged in the output's rows as many as q's layout has.
                        let lo = AttnLayout::heads(0, lq.heads, l, ev, lq.heads * ev);
                        for &plan in &plans {
                            let what = format!(
                                "{plan:?} {:?} causal {causal} packed {packed}",
                                (b, h, l, s, e, ev)
                            );
                            let sc = from(scale);
                            let (p, out) = forward_with(plan, dims, q, k, v, sc, causal);
                            let grads =
                                backward_with(plan, dims, q, k, v, &p, &g, sc, causal, packed);
                            let (gq, gk, gv) = if packed {
                                (lq, lk, lv)
                            } else {
                                let (nq, nk) = (items * l * e, items * s * e);
                                let at = |o, lay: AttnLayout| AttnLayout { offset: o, ..lay };
                                (
                                    AttnLayout::contiguous(l, e),
                                    at(nq, AttnLayout::contiguous(s, e)),
                                    at(nq + nk, AttnLayout::contiguous(s, ev)),
                                )
                            };
                            for i in 0..items {
                                let want = reference(
                                    &item(q, i, l, e),
                                    &item(k, i, s, e),
                                    &item(v, i, s, ev),
                                    &item((&g[..], lo), i, l, ev),
                                    scale,
                                    causal,
                                );
                                let pl = AttnLayout::contiguous(l, s);
                                let got = [
                                    ("p", item((&p[..], pl), i, l, s)),
                                    ("out", item((&out[..], lo), i, l, ev)),
                                    ("dq", item((&grads[..], gq), i, l, e)),
                                    ("dk", item((&grads[..], gk), i, s, e)),
                                    ("dv", item((&grads[..], gv), i, s, ev)),
                                ];
                                for ((name, g), w) in got.iter().zip(&want) {
                                    assert_close(&format!("{what} {name}"), g, w, tol);
                                }
                            }
                        }
                    }
                }
            }
        }
        crate::kernels::set_simd_cap_for_tests("");
    }

    #[test]
    fn every_plan_matches_the_definition_f64() {
        check::<f64>(|x| x, 1e-11);
    }

    #[test]
    fn every_plan_matches_the_definition_f32() {
        check::<f32>(|x| x as f32, 2e-5);
    }
}
