//! Seeded random numbers: a global generator (`manual_seed`) and explicit [`Generator`]s.

use std::sync::Mutex;

use rand::{Rng, RngCore, SeedableRng};
use rand_pcg::Pcg64Mcg;

/// A seeded pseudo-random generator (PCG 64), reproducible across platforms.
#[derive(Clone, Debug)]
pub struct Generator {
    rng: Pcg64Mcg,
}

impl Generator {
    /// A generator with the given seed.
    pub fn new(seed: u64) -> Self {
        Generator {
            rng: Pcg64Mcg::seed_from_u64(seed),
        }
    }
    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        self.rng.gen::<f64>()
    }
    /// Uniform in [0, 1) as f32.
    pub fn next_f32(&mut self) -> f32 {
        self.rng.gen::<f32>()
    }
    /// A raw 64-bit value.
    pub fn next_u64(&mut self) -> u64 {
        self.rng.next_u64()
    }
    /// Uniform integer in [0, n).
    pub fn below(&mut self, n: u64) -> u64 {
        self.rng.gen_range(0..n.max(1))
    }
    /// Standard normal (Box-Muller, both values used).
    pub fn fill_normal(&mut self, out: &mut [f64]) {
        let mut i = 0;
        while i < out.len() {
            let u1 = 1.0 - self.next_f64(); // (0, 1]
            let u2 = self.next_f64();
            let r = (-2.0 * u1.ln()).sqrt();
            let t = 2.0 * std::f64::consts::PI * u2;
            out[i] = r * t.cos();
            if i + 1 < out.len() {
                out[i + 1] = r * t.sin();
            }
            i += 2;
        }
    }
    /// Fisher-Yates permutation of 0..n.
    pub fn permutation(&mut self, n: usize) -> Vec<usize> {
        let mut p: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            let j = self.below(i as u64 + 1) as usize;
            p.swap(i, j);
        }
        p
    }
}

static GLOBAL: Mutex<Option<Generator>> = Mutex::new(None);

/// Seed the global generator used by `rand`, `randn`, dropout, ... (like `torch.manual_seed`).
pub fn manual_seed(seed: u64) {
    *GLOBAL.lock().unwrap_or_else(|e| e.into_inner()) = Some(Generator::new(seed));
}

/// Run `f` with the global generator (seeded with 0 unless `manual_seed` was called).
pub fn with_global<R>(f: impl FnOnce(&mut Generator) -> R) -> R {
    let mut g = GLOBAL.lock().unwrap_or_else(|e| e.into_inner());
    f(g.get_or_insert_with(|| Generator::new(0)))
}
