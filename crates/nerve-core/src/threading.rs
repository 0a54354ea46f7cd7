//! The thread pool that every parallel kernel runs in, and its size setting.
//!
//! The size comes from [`set_num_threads`], else the `NERVE_NUM_THREADS` environment variable,
//! else the number of cores. Kernels only go parallel above a measured work size, so tiny ops
//! pay no thread overhead.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Instant;

static POOL: OnceLock<RwLock<Arc<rayon::ThreadPool>>> = OnceLock::new();

fn build(n: usize) -> Arc<rayon::ThreadPool> {
    Arc::new(
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .thread_name(|i| format!("nerve-{i}"))
            .build()
            .expect("failed to start the nerve thread pool"),
    )
}

fn default_threads() -> usize {
    std::env::var("NERVE_NUM_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

fn cell() -> &'static RwLock<Arc<rayon::ThreadPool>> {
    POOL.get_or_init(|| RwLock::new(build(default_threads())))
}

/// The pool kernels run in.
pub fn pool() -> Arc<rayon::ThreadPool> {
    cell().read().unwrap_or_else(|e| e.into_inner()).clone()
}

/// Number of threads kernels use.
pub fn num_threads() -> usize {
    pool().current_num_threads()
}

/// Set the number of threads kernels use (like `torch.set_num_threads`). 0 means all cores.
pub fn set_num_threads(n: usize) {
    let n = if n == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        n
    };
    *cell().write().unwrap_or_else(|e| e.into_inner()) = build(n);
}

/// Run `f` inside the pool (a no-op hop when already on one of its threads).
///
/// Afterwards the pool's threads stay awake for [`LINGER`], running any kernel that arrives
/// meanwhile, instead of going to sleep: a training step is a chain of parallel kernels with
/// short serial gaps between them, and waking a sleeping thread for each one cost the `lstm`
/// workload some 70 context switches and about a tenth of its time per step (PyTorch's
/// OpenMP threads spin the same way).
pub fn install<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        return f();
    }
    let pool = pool();
    let r = pool.install(f);
    linger(&pool);
    r
}

/// How long pool threads stay awake after a kernel.
pub const LINGER: std::time::Duration = std::time::Duration::from_micros(300);

/// When the lingering threads may go back to sleep (nanoseconds since [`epoch`]).
static LINGER_UNTIL: AtomicU64 = AtomicU64::new(0);
/// Pool threads lingering now.
static LINGERING: AtomicUsize = AtomicUsize::new(0);

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_ns() -> u64 {
    epoch().elapsed().as_nanos() as u64
}

/// Keep the pool's threads awake for [`LINGER`] from now (see [`install`]).
fn linger(pool: &Arc<rayon::ThreadPool>) {
    LINGER_UNTIL.fetch_max(now_ns() + LINGER.as_nanos() as u64, Ordering::Relaxed);
    let threads = pool.current_num_threads();
    if threads < 2 {
        return;
    }
    while LINGERING.load(Ordering::Relaxed) < threads {
        LINGERING.fetch_add(1, Ordering::Relaxed);
        pool.spawn(|| {
            thread_local! {
                static IN_LINGER: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
            }
            // A linger job picked up by another one's yield returns at once.
            if !IN_LINGER.with(|c| c.replace(true)) {
                while now_ns() < LINGER_UNTIL.load(Ordering::Relaxed) {
                    // Run whatever kernel work has arrived, else wait a moment.
                    if rayon::yield_now() != Some(rayon::Yield::Executed) {
                        std::hint::spin_loop();
                    }
                }
                IN_LINGER.with(|c| c.set(false));
            }
            LINGERING.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

/// Default element count above which element-wise work is split across threads: below it the
/// fork/join costs more than it saves (measured with `cargo run --release -p nerve-bench
/// --example par_threshold`; see the README). On the 2-core reference machine a fork/join
/// costs 10–20 µs: `add` gains from the second thread from about 2^18 elements, `gelu` from
/// about 2^15 (hence an eighth of this for transcendental work).
pub const PAR_ELEMWISE_MIN: usize = 1 << 18;

static PAR_MIN: std::sync::atomic::AtomicUsize =
    std::sync::atomic::AtomicUsize::new(PAR_ELEMWISE_MIN);

/// Element count above which cheap element-wise work goes parallel (transcendental work at an
/// eighth of it).
#[inline]
pub fn par_elemwise_min() -> usize {
    PAR_MIN.load(std::sync::atomic::Ordering::Relaxed)
}

/// Override [`par_elemwise_min`] (for measuring the threshold on a new machine).
pub fn set_par_elemwise_min(n: usize) {
    PAR_MIN.store(n.max(1), std::sync::atomic::Ordering::Relaxed);
}

/// Split `n` items into at most `num_threads() * 4` chunks of at least `min_chunk` items.
pub fn chunk_len(n: usize, min_chunk: usize) -> usize {
    let parts = (num_threads() * 4).max(1);
    n.div_ceil(parts).max(min_chunk).max(1)
}
