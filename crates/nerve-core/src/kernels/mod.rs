//! CPU kernels: run-time SIMD dispatch, strided walks, element-wise maps, reductions, GEMM,
//! fused recurrent loops, products with ggml-quantised weights.
//!
//! Hot loops are plain loops over contiguous slices. They are compiled several times, inside
//! `#[target_feature]` wrappers (AVX-512, AVX2+FMA) chosen once at run time, so that LLVM
//! vectorises them for the machine without `-C target-cpu=native`.

pub mod attention;
pub mod elementwise;
pub mod gemm;
pub mod norm;
pub mod peak;
pub mod quant;
pub mod reduce;
pub mod rnn;
pub mod strided;
pub mod vmath;

use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicU8, Ordering};

/// A raw pointer shared by the tasks of one parallel kernel, which write disjoint parts of
/// the memory it points to and only read the rest.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr<T>(pub(crate) *mut T);
impl<T> SendPtr<T> {
    /// The pointer (a method, so closures capture the whole `SendPtr`).
    #[inline(always)]
    pub(crate) fn get(self) -> *mut T {
        self.0
    }
}
// SAFETY: see the type's docs; the kernel call outlives every task that holds one.
unsafe impl<T> Send for SendPtr<T> {}
// SAFETY: as above.
unsafe impl<T> Sync for SendPtr<T> {}

/// 64-byte-aligned, zero-initialised scratch memory.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([u8; 64]);

thread_local! {
    /// Scratch buffers of this thread, reused across kernel calls (no page faults or memsets
    /// for the large temporaries of convolutions).
    static SCRATCH_POOL: std::cell::RefCell<Vec<Vec<Line>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Run `f` on a scratch slice of `len` elements of `T` (a plain float or integer type: every
/// bit pattern valid). Its contents are unspecified (stale values of an earlier use), so `f`
/// must write before it reads. Buffers come from a per-thread pool, so nested calls work.
pub(crate) fn with_scratch<T: crate::dtype::Element, R>(
    len: usize,
    f: impl FnOnce(&mut [T]) -> R,
) -> R {
    let lines = (len * std::mem::size_of::<T>()).div_ceil(64);
    let mut buf = SCRATCH_POOL
        .with(|p| {
            let mut p = p.borrow_mut();
            let i = p.iter().position(|b| b.len() >= lines)?;
            Some(p.swap_remove(i))
        })
        .unwrap_or_else(|| vec![Line([0; 64]); lines]);
    // SAFETY: the buffer holds at least len·size_of::<T>() initialised bytes, 64-byte
    // aligned; T is a plain number type for which every bit pattern is a valid value.
    let slice = unsafe { std::slice::from_raw_parts_mut(buf.as_mut_ptr().cast::<T>(), len) };
    let r = f(slice);
    SCRATCH_POOL.with(|p| {
        let mut p = p.borrow_mut();
        // Keep a few of the largest buffers.
        p.push(buf);
        p.sort_by_key(|b| std::cmp::Reverse(b.len()));
        p.truncate(4);
    });
    r
}

/// An output buffer of `n` elements that kernels write before anyone reads (no memset: for
/// large outputs that is a tenth of a softmax).
pub(crate) fn uninit_buf<U>(n: usize) -> Vec<MaybeUninit<U>> {
    let mut v = Vec::with_capacity(n);
    // SAFETY: MaybeUninit needs no initialisation; capacity is n.
    unsafe { v.set_len(n) };
    v
}

/// The buffer as initialised values.
///
/// # Safety
/// Every element must have been written.
pub(crate) unsafe fn assume_init<U>(v: Vec<MaybeUninit<U>>) -> Vec<U> {
    let mut v = std::mem::ManuallyDrop::new(v);
    // SAFETY: MaybeUninit<U> has U's layout; the caller guarantees every element is set.
    unsafe { Vec::from_raw_parts(v.as_mut_ptr().cast(), v.len(), v.capacity()) }
}

/// A written slice as initialised values.
///
/// # Safety
/// Every element must have been written.
#[inline(always)]
pub(crate) unsafe fn assume_init_mut<U>(s: &mut [MaybeUninit<U>]) -> &mut [U] {
    // SAFETY: as for `assume_init`.
    unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr().cast(), s.len()) }
}

/// Deterministic test values in [-1, 1] (an xorshift sequence from `seed`).
#[cfg(test)]
pub(crate) fn test_data(len: usize, seed: u64) -> Vec<f64> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s % 2001) as f64 / 1000.0 - 1.0
        })
        .collect()
}

/// The widest SIMD instruction set the kernels use on this machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SimdLevel {
    /// No x86 SIMD beyond the baseline (or not x86).
    Plain,
    /// AVX2 with FMA.
    Avx2,
    /// AVX-512 (F, VL, BW, DQ) with FMA.
    Avx512,
}

static LEVEL: AtomicU8 = AtomicU8::new(0);

/// The SIMD level detected at run time (cached). `NERVE_SIMD=plain|avx2` caps it.
pub fn simd_level() -> SimdLevel {
    match LEVEL.load(Ordering::Relaxed) {
        1 => SimdLevel::Plain,
        2 => SimdLevel::Avx2,
        3 => SimdLevel::Avx512,
        _ => {
            let l = detect();
            LEVEL.store(
                match l {
                    SimdLevel::Plain => 1,
                    SimdLevel::Avx2 => 2,
                    SimdLevel::Avx512 => 3,
                },
                Ordering::Relaxed,
            );
            l
        }
    }
}

fn detect() -> SimdLevel {
    detect_capped(&std::env::var("NERVE_SIMD").unwrap_or_default())
}

/// Override the detected level (`"plain"`, `"avx2"`, or `""` for the machine's best), so
/// tests can run every kernel this machine supports.
#[cfg(test)]
pub(crate) fn set_simd_cap_for_tests(cap: &str) {
    let code = match detect_capped(cap) {
        SimdLevel::Plain => 1,
        SimdLevel::Avx2 => 2,
        SimdLevel::Avx512 => 3,
    };
    LEVEL.store(code, Ordering::Relaxed);
}

fn detect_capped(cap: &str) -> SimdLevel {
    #[cfg(target_arch = "x86_64")]
    {
        let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
        let avx512 = avx2
            && is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512vl")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512dq");
        if avx512 && cap != "avx2" && cap != "plain" {
            return SimdLevel::Avx512;
        }
        if avx2 && cap != "plain" {
            return SimdLevel::Avx2;
        }
    }
    let _ = cap;
    SimdLevel::Plain
}

/// Run `f` compiled for the best SIMD level of this machine. `f` and everything it calls
/// that is `#[inline(always)]` is vectorised for that level.
#[inline(always)]
pub fn with_simd<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        match simd_level() {
            // SAFETY: the level was detected at run time, so the CPU has these features.
            SimdLevel::Avx512 => return unsafe { run_avx512(f) },
            // SAFETY: as above.
            SimdLevel::Avx2 => return unsafe { run_avx2(f) },
            SimdLevel::Plain => {}
        }
    }
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn run_avx2<R>(f: impl FnOnce() -> R) -> R {
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vl,avx512bw,avx512dq,avx2,fma")]
unsafe fn run_avx512<R>(f: impl FnOnce() -> R) -> R {
    f()
}
