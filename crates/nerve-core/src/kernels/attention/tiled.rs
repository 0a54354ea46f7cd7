//! Attention of one item on one thread with register tiles, no GEMM calls.
//!
//! Every product of the forward and backward passes is a sum `C[i][c] = Σ_k A(i, k) · B(k, c)`
//! over a tile of `R` rows and `NC` columns held in registers: `B`'s rows are read in place
//! (rows of `V`, `K`, `Q`, `dO`, or of a transposed copy of `K` or `V` made once per item) and
//! `A` is broadcast from the rows of `Q`, `dO`, `P` or `dS` where they lie. Nothing is packed
//! per product, and causal attention skips the key blocks after each row block (half the work).
//!
//! The forward pass goes through the queries `R` rows at a time: scores against the live keys,
//! softmax while the rows are in L1, then the rows of the output. The backward pass does the
//! same for `dP`, `dS` and `dQ`, keeping `dS` for the whole item, then goes through the keys `R`
//! at a time for `dV = Pᵀ·dO` and `dK = dSᵀ·Q` (each written once, from all the queries that
//! see those keys).

use std::mem::size_of;

use super::softmax_row;
use crate::dtype::Float;
use crate::kernels::gemm::GemmFloat;
use crate::kernels::{reduce, simd_level, with_scratch, SimdLevel};

/// One operand of an item: where its row 0 starts and the distance between rows (values of a
/// row are contiguous).
#[derive(Clone, Copy)]
pub(super) struct Rows<T> {
    /// Row 0.
    pub ptr: *const T,
    /// Row stride.
    pub stride: usize,
}

/// An output of an item, as [`Rows`].
#[derive(Clone, Copy)]
pub(super) struct RowsMut<T> {
    /// Row 0.
    pub ptr: *mut T,
    /// Row stride.
    pub stride: usize,
}

/// The tile sizes of one call, chosen once (so every item of it agrees): rows `R` of a tile
/// and its widest column chunk `NC` (two vector registers), for a SIMD level with FMA.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Tiles {
    level: SimdLevel,
    r: usize,
    nc: usize,
}

impl Tiles {
    /// The tiles for `T` on this machine, where the tiled kernels run items of widths `e` and
    /// `ev`: the machine has AVX2 with FMA, and both widths are whole numbers of quarter
    /// chunks (multiples of 8 for f32 with AVX-512).
    pub(super) fn new<T>(e: usize, ev: usize) -> Option<Tiles> {
        let level = simd_level();
        let (r, nc) = match (level, size_of::<T>()) {
            (SimdLevel::Avx512, 4) => (12, 32),
            (SimdLevel::Avx512, _) => (12, 16),
            (SimdLevel::Avx2, 4) => (6, 16),
            (SimdLevel::Avx2, _) => (6, 8),
            (SimdLevel::Plain, _) => return None,
        };
        let q = nc / 4;
        (e > 0 && ev > 0 && e.is_multiple_of(q) && ev.is_multiple_of(q)).then_some(Tiles {
            level,
            r,
            nc,
        })
    }

    /// The narrowest column chunk, to which key counts are padded.
    fn quantum(self) -> usize {
        self.nc / 4
    }
}

/// Sizes of one item and whether it is causal.
#[derive(Clone, Copy)]
pub(super) struct Item<T> {
    /// Queries.
    pub l: usize,
    /// Keys.
    pub s: usize,
    /// Query/key width.
    pub e: usize,
    /// Value width.
    pub ev: usize,
    /// Score scale.
    pub scale: T,
    /// Keys after the query's index blocked.
    pub causal: bool,
}

impl<T> Item<T> {
    /// One item of an attention call with sizes `dims`.
    pub fn new(dims: super::AttnDims, scale: T, causal: bool) -> Self {
        let super::AttnDims { l, s, e, ev, .. } = dims;
        Item {
            l,
            s,
            e,
            ev,
            scale,
            causal,
        }
    }

    /// Keys that rows `r0..r0 + rows` see (the rest of their scores are zero probabilities).
    fn live(&self, r0: usize, rows: usize) -> usize {
        if self.causal {
            (r0 + rows).min(self.s)
        } else {
            self.s
        }
    }
}

/// Run `$f` with the constants of `$tiles`, compiled for its SIMD level.
macro_rules! dispatch {
    ($tiles:expr, $t:ty, $f:ident($($arg:expr),*)) => {
        match $tiles {
            #[cfg(target_arch = "x86_64")]
            Tiles { level: SimdLevel::Avx512, r: 12, nc: 32 } => {
                // SAFETY: the level was detected at run time (Tiles::new).
                unsafe { crate::kernels::run_avx512(#[inline(always)] || $f::<$t, 12, 32, 16, 8>($($arg),*)) }
            }
            #[cfg(target_arch = "x86_64")]
            Tiles { level: SimdLevel::Avx512, r: 12, nc: 16 } => {
                // SAFETY: as above.
                unsafe { crate::kernels::run_avx512(#[inline(always)] || $f::<$t, 12, 16, 8, 4>($($arg),*)) }
            }
            #[cfg(target_arch = "x86_64")]
            Tiles { level: SimdLevel::Avx2, r: 6, nc: 16 } => {
                // SAFETY: as above.
                unsafe { crate::kernels::run_avx2(#[inline(always)] || $f::<$t, 6, 16, 8, 4>($($arg),*)) }
            }
            #[cfg(target_arch = "x86_64")]
            Tiles { level: SimdLevel::Avx2, r: 6, nc: 8 } => {
                // SAFETY: as above.
                unsafe { crate::kernels::run_avx2(#[inline(always)] || $f::<$t, 6, 8, 4, 2>($($arg),*)) }
            }
            t => unreachable!("attention: no tiled kernels for {t:?}"),
        }
    };
}

/// Forward of one item: writes its probabilities `p` (`l × s`, contiguous) and output rows.
///
/// # Safety
/// `q` must hold `l` rows of `e` values, `k` `s` rows of `e`, `v` `s` rows of `ev`; `p` must
/// be valid for `l · s` writes and `o` for `l` rows of `ev` values, neither overlapping the
/// inputs or anything another thread touches. `tiles` must be `Tiles::new::<T>(e, ev)`.
pub(super) unsafe fn forward<T: GemmFloat>(
    tiles: Tiles,
    it: Item<T>,
    q: Rows<T>,
    k: Rows<T>,
    v: Rows<T>,
    p: *mut T,
    o: RowsMut<T>,
) {
    let s_pad = it.s.next_multiple_of(tiles.quantum());
    with_scratch::<T, _>(it.e * s_pad, |kt| {
        let kt = kt.as_mut_ptr();
        dispatch!(tiles, T, forward_item(it, q, k, v, p, o, kt))
    })
}

/// Backward of one item: from its probabilities `p` and output gradient `g`, writes the
/// gradients of its queries, keys and values.
///
/// # Safety
/// As [`forward`], with `p` readable (`l × s`), `g` holding `l` rows of `ev` values, and `dq`,
/// `dk`, `dv` valid for the writes of `l`, `s`, `s` rows of `e`, `e`, `ev` values.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn backward<T: GemmFloat>(
    tiles: Tiles,
    it: Item<T>,
    q: Rows<T>,
    k: Rows<T>,
    v: Rows<T>,
    p: *const T,
    g: Rows<T>,
    (dq, dk, dv): (RowsMut<T>, RowsMut<T>, RowsMut<T>),
) {
    let s_pad = it.s.next_multiple_of(tiles.quantum());
    with_scratch::<T, _>((it.ev + it.l) * s_pad, |buf| {
        let (vt, ds) = buf.split_at_mut(it.ev * s_pad);
        let (vt, ds) = (vt.as_mut_ptr(), ds.as_mut_ptr());
        dispatch!(
            tiles,
            T,
            backward_item(it, q, k, v, p, g, dq, dk, dv, vt, ds)
        )
    })
}

/// `dst[c · ld + r] = src(r, c)` for the `rows × cols` rows of `src`, zeros in columns
/// `rows..ld`: a transposed copy whose rows are the columns of `src`.
///
/// # Safety
/// `src` must hold `rows` rows of `cols` values; `dst` must be valid for `cols · ld` writes.
#[inline(always)]
unsafe fn transpose<T: Float>(src: Rows<T>, rows: usize, cols: usize, dst: *mut T, ld: usize) {
    const B: usize = 8;
    let mut r0 = 0;
    while r0 < rows {
        let rb = B.min(rows - r0);
        for c in 0..cols {
            for r in 0..rb {
                // SAFETY: r0 + r < rows, c < cols, c · ld + r0 + r < cols · ld (r0 + r < rows ≤ ld).
                unsafe { *dst.add(c * ld + r0 + r) = *src.ptr.add((r0 + r) * src.stride + c) };
            }
        }
        r0 += B;
    }
    for c in 0..cols {
        for r in rows..ld {
            // SAFETY: as above, within row c of dst.
            unsafe { *dst.add(c * ld + r) = T::ZERO };
        }
    }
}

/// The register tile: `C[i][c] = alpha · Σ_{k < depth} A(i, k) · B(k, c)` for `i < R`,
/// `c < NC`, storing rows `i < rows` and columns `c < cols` of it. `B(k, c) = b[k · ldb + c]`;
/// `A(i, k) = a[i · lda + k]`, or `a[k · lda + i]` with `AT` (A stored transposed). Rows past
/// `rows` repeat the last row (computed, not stored), unless `FULL` says there are none.
///
/// # Safety
/// Every `A(i, k)` for `i < rows`, `k < depth` and `B(k, c)` for `c < NC` must be readable,
/// and rows `i < rows` of `C` (`c + i · ldc`, `cols` values) writable; `0 < rows ≤ R`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn tile<T: Float, const R: usize, const NC: usize, const AT: bool, const FULL: bool>(
    depth: usize,
    (a, lda): (*const T, usize),
    rows: usize,
    (b, ldb): (*const T, usize),
    (c, ldc): (*mut T, usize),
    cols: usize,
    alpha: T,
) {
    let mut acc = [[T::ZERO; NC]; R];
    let mut off = [0usize; R];
    for (i, o) in off.iter_mut().enumerate() {
        let i = if FULL { i } else { i.min(rows - 1) };
        *o = if AT { i } else { i * lda };
    }
    let step = if AT { lda } else { 1 };
    for kk in 0..depth {
        // SAFETY: B(kk, 0..NC) is readable (caller); an unaligned read of NC values.
        let bk = unsafe { b.add(kk * ldb).cast::<[T; NC]>().read_unaligned() };
        #[allow(clippy::needless_range_loop)]
        for i in 0..R {
            // SAFETY: A(i, kk) of a row i < rows (clamped) is readable (caller).
            let av = unsafe { *a.add(kk * step + off[i]) };
            for j in 0..NC {
                acc[i][j] = av.mul_add(bk[j], acc[i][j]);
            }
        }
    }
    // Constant indices only: a variable index into `acc` would keep it in memory.
    #[allow(clippy::needless_range_loop)]
    for i in 0..R {
        if i < rows {
            let mut out = [T::ZERO; NC];
            for j in 0..NC {
                out[j] = acc[i][j] * alpha;
            }
            // SAFETY: row i < rows of C has `cols ≤ NC` writable values (caller).
            let ci = unsafe { c.add(i * ldc) };
            if cols == NC {
                // SAFETY: as above, all NC values.
                unsafe { ci.cast::<[T; NC]>().write_unaligned(out) };
            } else {
                // SAFETY: as above, `cols` values.
                unsafe { std::ptr::copy_nonoverlapping(out.as_ptr(), ci, cols) };
            }
        }
    }
}

/// [`tile`] for a chunk `w` wide (one of `N1 > N2 > N4`), rows full or not.
///
/// # Safety
/// As [`tile`] with `NC = w`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn tile_w<
    T: Float,
    const R: usize,
    const N1: usize,
    const N2: usize,
    const N4: usize,
    const AT: bool,
>(
    w: usize,
    depth: usize,
    a: (*const T, usize),
    rows: usize,
    b: (*const T, usize),
    c: (*mut T, usize),
    cols: usize,
    alpha: T,
) {
    // SAFETY: forwarded contract.
    unsafe {
        match (w == N1, w == N2, rows == R) {
            (true, _, true) => tile::<T, R, N1, AT, true>(depth, a, rows, b, c, cols, alpha),
            (true, _, false) => tile::<T, R, N1, AT, false>(depth, a, rows, b, c, cols, alpha),
            (_, true, true) => tile::<T, R, N2, AT, true>(depth, a, rows, b, c, cols, alpha),
            (_, true, false) => tile::<T, R, N2, AT, false>(depth, a, rows, b, c, cols, alpha),
            (_, _, true) => tile::<T, R, N4, AT, true>(depth, a, rows, b, c, cols, alpha),
            (_, _, false) => tile::<T, R, N4, AT, false>(depth, a, rows, b, c, cols, alpha),
        }
    }
}

/// `C = alpha · A·B` for rows `0..rows` and columns `0..n` (`n` a multiple of `N4`) in column
/// chunks of [`tile`]: `N1` wide while that fits, then at most one `N2` and one `N4`. B's and
/// C's chunks start `c0` values into their rows; only columns below `store` are written.
///
/// # Safety
/// As [`tile`] for every chunk: B readable at columns `< n` of rows `< depth`, C writable at
/// columns `< min(n, store)` of rows `< rows`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn product<
    T: Float,
    const R: usize,
    const N1: usize,
    const N2: usize,
    const N4: usize,
    const AT: bool,
>(
    n: usize,
    store: usize,
    depth: usize,
    a: (*const T, usize),
    rows: usize,
    (b, ldb): (*const T, usize),
    (c, ldc): (*mut T, usize),
    alpha: T,
) {
    let mut c0 = 0;
    while c0 < n {
        let w = match n - c0 {
            left if left >= N1 => N1,
            left if left >= N2 => N2,
            _ => N4,
        };
        // SAFETY: chunk c0..c0 + w lies inside the columns the caller vouches for.
        unsafe {
            tile_w::<T, R, N1, N2, N4, AT>(
                w,
                depth,
                a,
                rows,
                (b.add(c0), ldb),
                (c.add(c0), ldc),
                w.min(store - c0),
                alpha,
            )
        };
        c0 += w;
    }
}

/// [`forward`] for one machine's tile sizes, with scratch `kt` for `e × s.next_multiple_of(N4)`
/// values.
///
/// # Safety
/// As [`forward`]; `kt` must be valid for those writes and overlap nothing else.
#[inline(always)]
unsafe fn forward_item<
    T: GemmFloat,
    const R: usize,
    const N1: usize,
    const N2: usize,
    const N4: usize,
>(
    it: Item<T>,
    q: Rows<T>,
    k: Rows<T>,
    v: Rows<T>,
    p: *mut T,
    o: RowsMut<T>,
    kt: *mut T,
) {
    let Item { l, s, e, ev, .. } = it;
    let s_pad = s.next_multiple_of(N4);
    {
        // SAFETY: k holds s rows of e values; kt is e × s_pad.
        unsafe { transpose(k, s, e, kt, s_pad) };
        let mut r0 = 0;
        while r0 < l {
            let rows = R.min(l - r0);
            let live = it.live(r0, rows);
            // SAFETY: rows r0..r0 + rows of p, q and o exist (r0 + rows ≤ l); every product
            // reads inside them, kt (columns < live.next_multiple_of(N4) ≤ s_pad) and the
            // first `live` rows of v, and stores columns < s of p.
            unsafe {
                let pr = p.add(r0 * s);
                let qa = (q.ptr.add(r0 * q.stride), q.stride);
                product::<T, R, N1, N2, N4, false>(
                    live.next_multiple_of(N4),
                    s,
                    e,
                    qa,
                    rows,
                    (kt.cast_const(), s_pad),
                    (pr, s),
                    it.scale,
                );
                let prows = std::slice::from_raw_parts_mut(pr, rows * s);
                for (r, row) in prows.chunks_exact_mut(s).enumerate() {
                    softmax_row(row, r0 + r, it.causal);
                }
                product::<T, R, N1, N2, N4, false>(
                    ev,
                    ev,
                    live,
                    (pr.cast_const(), s),
                    rows,
                    (v.ptr, v.stride),
                    (o.ptr.add(r0 * o.stride), o.stride),
                    T::ONE,
                );
            }
            r0 += rows;
        }
    }
}

/// [`backward`] for one machine's tile sizes, with scratch `vt` for `ev × s_pad` and `ds` for
/// `l × s_pad` values (`s_pad = s.next_multiple_of(N4)`).
///
/// # Safety
/// As [`backward`]; `vt` and `ds` must be valid for those writes and overlap nothing else.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn backward_item<
    T: GemmFloat,
    const R: usize,
    const N1: usize,
    const N2: usize,
    const N4: usize,
>(
    it: Item<T>,
    q: Rows<T>,
    k: Rows<T>,
    v: Rows<T>,
    p: *const T,
    g: Rows<T>,
    dq: RowsMut<T>,
    dk: RowsMut<T>,
    dv: RowsMut<T>,
    vt: *mut T,
    ds: *mut T,
) {
    let Item { l, s, e, ev, .. } = it;
    let s_pad = s.next_multiple_of(N4);
    {
        // SAFETY: v holds s rows of ev values; vt is ev × s_pad.
        unsafe { transpose(v, s, ev, vt, s_pad) };
        // Query blocks: dP = dO·Vᵀ, dS = P ⊙ (dP − rowsum(dP ⊙ P)) · scale, dQ = dS·K.
        let mut r0 = 0;
        while r0 < l {
            let rows = R.min(l - r0);
            let live = it.live(r0, rows);
            let n = live.next_multiple_of(N4);
            // SAFETY: rows r0..r0 + rows of g, p, ds and dq exist; the products read inside
            // them, vt (columns < n ≤ s_pad) and the first `live` rows of k; ds rows are
            // s_pad long and written at columns < min(live + R, s_pad).
            unsafe {
                let dsr = ds.add(r0 * s_pad);
                let ga = (g.ptr.add(r0 * g.stride), g.stride);
                product::<T, R, N1, N2, N4, false>(
                    n,
                    n,
                    ev,
                    ga,
                    rows,
                    (vt.cast_const(), s_pad),
                    (dsr, s_pad),
                    T::ONE,
                );
                for r in 0..rows {
                    let d = std::slice::from_raw_parts_mut(dsr.add(r * s_pad), s_pad);
                    let pr = std::slice::from_raw_parts(p.add((r0 + r) * s), live);
                    let (d_live, d_rest) = d.split_at_mut(live);
                    let dot = reduce::dot(d_live, pr);
                    for (x, &pv) in d_live.iter_mut().zip(pr) {
                        *x = pv * (*x - dot) * it.scale;
                    }
                    // The key blocks below read up to R − 1 columns past a row's live keys
                    // (their scores are blocked: zero).
                    let zeros = d_rest.len().min(R);
                    d_rest[..zeros].fill(T::ZERO);
                }
                product::<T, R, N1, N2, N4, false>(
                    e,
                    e,
                    live,
                    (dsr.cast_const(), s_pad),
                    rows,
                    (k.ptr, k.stride),
                    (dq.ptr.add(r0 * dq.stride), dq.stride),
                    T::ONE,
                );
            }
            r0 += rows;
        }
        // Key blocks: dV = Pᵀ·dO and dK = dSᵀ·Q over the queries that see them.
        let mut j0 = 0;
        while j0 < s {
            let keys = R.min(s - j0);
            // Causal: queries before j0 see none of these keys. (Where no query does, the
            // products are empty and start at row 0, so no pointer leaves the operands.)
            let first = if it.causal && j0 < l { j0 } else { 0 };
            let depth = if it.causal && j0 >= l { 0 } else { l - first };
            // SAFETY: A reads columns j0..j0 + keys of rows first..l of p (l × s) and ds
            // (written there, see above); B reads rows first..l of g and q; C is rows
            // j0..j0 + keys of dv and dk.
            unsafe {
                let pa = (p.add(first * s + j0), s);
                product::<T, R, N1, N2, N4, true>(
                    ev,
                    ev,
                    depth,
                    pa,
                    keys,
                    (g.ptr.add(first * g.stride), g.stride),
                    (dv.ptr.add(j0 * dv.stride), dv.stride),
                    T::ONE,
                );
                let da = (ds.add(first * s_pad + j0).cast_const(), s_pad);
                product::<T, R, N1, N2, N4, true>(
                    e,
                    e,
                    depth,
                    da,
                    keys,
                    (q.ptr.add(first * q.stride), q.stride),
                    (dk.ptr.add(j0 * dk.stride), dk.stride),
                    T::ONE,
                );
            }
            j0 += keys;
        }
    }
}
