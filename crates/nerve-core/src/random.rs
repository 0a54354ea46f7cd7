//! Seeded random numbers: a global generator (`manual_seed`) and explicit [`Generator`]s.

use std::sync::Mutex;

use rand::{Rng, RngCore, SeedableRng};

/// PCG's 128-bit multiplicative generator with the XSL RR output (`pcg64_fast`): the same
/// stream as `rand_pcg::Pcg64Mcg` for the same seed, with a state that can be read and set
/// (which checkpoints need to resume a run exactly).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Mcg128 {
    state: u128,
}

impl Mcg128 {
    const MULTIPLIER: u128 = 0x2360_ED05_1FC6_5DA4_4385_DF64_9FCC_F645;
}

impl RngCore for Mcg128 {
    fn next_u32(&mut self) -> u32 {
        self.next_u64() as u32
    }
    fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_mul(Self::MULTIPLIER);
        let rot = (self.state >> 122) as u32;
        let xsl = ((self.state >> 64) as u64) ^ (self.state as u64);
        xsl.rotate_right(rot)
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        for chunk in dest.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}

impl SeedableRng for Mcg128 {
    type Seed = [u8; 16];
    fn from_seed(seed: [u8; 16]) -> Self {
        Mcg128 {
            state: u128::from_le_bytes(seed) | 1,
        }
    }
}

/// A seeded pseudo-random generator (PCG 64), reproducible across platforms.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Generator {
    rng: Mcg128,
}

impl Generator {
    /// A generator with the given seed.
    pub fn new(seed: u64) -> Self {
        Generator {
            rng: Mcg128::seed_from_u64(seed),
        }
    }
    /// The generator's whole state: [`Generator::from_state`] of it continues the same
    /// stream.
    pub fn state(&self) -> u128 {
        self.rng.state
    }
    /// A generator continuing from a state read with [`Generator::state`] (the low bit is
    /// forced to 1, as every state of this generator has it).
    pub fn from_state(state: u128) -> Self {
        Generator {
            rng: Mcg128 { state: state | 1 },
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

/// The global generator's state (like `torch.get_rng_state`): a checkpoint stores it so that
/// a resumed run draws the same dropout masks and noise as an uninterrupted one.
pub fn rng_state() -> u128 {
    with_global(|g| g.state())
}

/// Set the global generator's state read with [`rng_state`] (like `torch.set_rng_state`).
pub fn set_rng_state(state: u128) {
    with_global(|g| *g = Generator::from_state(state));
}

/// Run `f` with the global generator (seeded with 0 unless `manual_seed` was called).
pub fn with_global<R>(f: impl FnOnce(&mut Generator) -> R) -> R {
    let mut g = GLOBAL.lock().unwrap_or_else(|e| e.into_inner());
    f(g.get_or_insert_with(|| Generator::new(0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_stream_as_rand_pcg_for_every_draw_kind() {
        for seed in [0, 1, 42, u64::MAX] {
            let mut ours = Generator::new(seed);
            let mut theirs = rand_pcg::Pcg64Mcg::seed_from_u64(seed);
            for _ in 0..100 {
                assert_eq!(ours.next_u64(), theirs.next_u64());
                assert_eq!(ours.next_f64().to_bits(), theirs.gen::<f64>().to_bits());
                assert_eq!(ours.below(17), theirs.gen_range(0..17));
            }
        }
    }

    #[test]
    fn state_round_trip_continues_the_stream() {
        let mut g = Generator::new(7);
        g.next_u64();
        let mut copy = Generator::from_state(g.state());
        let a: Vec<u64> = (0..10).map(|_| g.next_u64()).collect();
        let b: Vec<u64> = (0..10).map(|_| copy.next_u64()).collect();
        assert_eq!(a, b);
        manual_seed(3);
        let s = rng_state();
        let x = with_global(|g| g.next_f64());
        set_rng_state(s);
        assert_eq!(with_global(|g| g.next_f64()), x);
    }
}
