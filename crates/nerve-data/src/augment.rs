//! Data augmentation for image samples of shape `[C, H, W]`.

use rand::{Rng, SeedableRng};
use rand_pcg::Pcg64Mcg;

use crate::error::{DataError, Result};

/// Random image augmentation, applied per sample to `[C, H, W]` samples (or `[H, W]`; any
/// leading dimensions count as channels).
///
/// Like torchvision's `RandomCrop(size, padding = pad)` followed by `RandomHorizontalFlip()`:
/// the image is shifted by a random offset in `-pad..=pad` along each axis with zero fill, then
/// mirrored left-right with probability 0.5 if `hflip` is set. The same transform is used for all
/// channels of a sample. `Augment::default()` does nothing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Augment {
    /// Zero padding for the random crop, in pixels; 0 disables cropping.
    pub pad: usize,
    /// Mirror left-right with probability 0.5.
    pub hflip: bool,
}

impl Augment {
    /// Augment a batch in place: `batch` holds `batch.len() / sample_len` samples of shape
    /// `sample_dims`. The randomness is a deterministic function of `(seed, epoch, batch_index)`,
    /// so runs are reproducible whatever the thread doing the work.
    ///
    /// Errors if `sample_dims` has rank below 2 or does not divide `batch`.
    pub fn apply_batch(
        &self,
        batch: &mut [f32],
        sample_dims: &[usize],
        seed: u64,
        epoch: usize,
        batch_index: usize,
    ) -> Result<()> {
        if *self == Augment::default() {
            return Ok(());
        }
        let rank = sample_dims.len();
        if rank < 2 {
            return Err(DataError::Invalid(format!(
                "augment: samples must be images [C, H, W] or [H, W], got shape {sample_dims:?}"
            )));
        }
        let (h, w) = (sample_dims[rank - 2], sample_dims[rank - 1]);
        let len: usize = sample_dims.iter().product();
        if len == 0 {
            return Ok(());
        }
        if !batch.len().is_multiple_of(len) {
            return Err(DataError::Invalid(format!(
                "augment: {} values are not a whole number of samples of shape {sample_dims:?}",
                batch.len()
            )));
        }
        let mut rng = Pcg64Mcg::seed_from_u64(mix(&[
            seed,
            0x0061_7567_6d65_6e74, // "augment": keeps this stream apart from the shuffle's
            epoch as u64,
            batch_index as u64,
        ]));
        let mut scratch = Vec::with_capacity(len);
        for sample in batch.chunks_exact_mut(len) {
            if self.pad > 0 {
                let p = self.pad as isize;
                let dy = rng.gen_range(-p..=p);
                let dx = rng.gen_range(-p..=p);
                shift(sample, h, w, dy, dx, &mut scratch);
            }
            if self.hflip && rng.gen_bool(0.5) {
                sample.chunks_exact_mut(w).for_each(<[f32]>::reverse);
            }
        }
        Ok(())
    }
}

/// `out[c][y][x] = in[c][y + dy][x + dx]`, zero outside the image.
fn shift(sample: &mut [f32], h: usize, w: usize, dy: isize, dx: isize, scratch: &mut Vec<f32>) {
    if dy == 0 && dx == 0 {
        return;
    }
    scratch.clear();
    scratch.extend_from_slice(sample);
    for (src, dst) in scratch
        .chunks_exact(h * w)
        .zip(sample.chunks_exact_mut(h * w))
    {
        for y in 0..h {
            let row = &mut dst[y * w..(y + 1) * w];
            let sy = y as isize + dy;
            if sy < 0 || sy >= h as isize {
                row.fill(0.0);
                continue;
            }
            let src_row = &src[sy as usize * w..(sy as usize + 1) * w];
            for (x, v) in row.iter_mut().enumerate() {
                let sx = x as isize + dx;
                *v = if (0..w as isize).contains(&sx) {
                    src_row[sx as usize]
                } else {
                    0.0
                };
            }
        }
    }
}

/// Hash several words into one seed (SplitMix64 finaliser).
pub(crate) fn mix(words: &[u64]) -> u64 {
    words.iter().fold(0x9e37_79b9_7f4a_7c15, |h, &v| {
        let mut z = (h ^ v).wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    })
}
