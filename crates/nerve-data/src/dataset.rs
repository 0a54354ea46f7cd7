//! An in-memory labelled data set.

use nerve_core::Tensor;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_pcg::Pcg64Mcg;

use crate::error::{DataError, Result};

/// An in-memory labelled data set: f32 samples of a fixed shape and i64 class labels.
#[derive(Clone, Debug, PartialEq)]
pub struct Dataset {
    features: Vec<f32>,
    sample_dims: Vec<usize>,
    labels: Vec<i64>,
    num_classes: usize,
}

impl Dataset {
    /// A data set from row-major `features` (`labels.len()` samples of shape `sample_dims`),
    /// `labels` and the number of classes.
    ///
    /// Errors if `features.len()` is not `labels.len()` times the sample size, or if a label is
    /// outside `0..num_classes`.
    pub fn new(
        features: Vec<f32>,
        sample_dims: Vec<usize>,
        labels: Vec<i64>,
        num_classes: usize,
    ) -> Result<Self> {
        let sample_len = sample_dims
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| DataError::Invalid(format!("sample dims {sample_dims:?} overflow")))?;
        if labels.len().checked_mul(sample_len) != Some(features.len()) {
            return Err(DataError::Invalid(format!(
                "Dataset::new: {} features for {} samples of shape {sample_dims:?}",
                features.len(),
                labels.len()
            )));
        }
        if let Some((i, l)) = labels
            .iter()
            .enumerate()
            .find(|&(_, &l)| l < 0 || l as u64 >= num_classes as u64)
        {
            return Err(DataError::Invalid(format!(
                "Dataset::new: label {l} of sample {i} is outside 0..{num_classes}"
            )));
        }
        Ok(Dataset {
            features,
            sample_dims,
            labels,
            num_classes,
        })
    }

    /// The number of samples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether there are no samples.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The shape of one sample, e.g. `[1, 28, 28]`.
    pub fn sample_dims(&self) -> &[usize] {
        &self.sample_dims
    }

    /// The number of elements in one sample.
    pub fn sample_len(&self) -> usize {
        self.sample_dims.iter().product()
    }

    /// The number of classes; labels are in `0..num_classes`.
    pub fn num_classes(&self) -> usize {
        self.num_classes
    }

    /// All features, row-major, `len() * sample_len()` values.
    pub fn features(&self) -> &[f32] {
        &self.features
    }

    /// All labels.
    pub fn labels(&self) -> &[i64] {
        &self.labels
    }

    /// Sample `i`: its features and label, or `None` if `i` is out of range.
    pub fn get(&self, i: usize) -> Option<(&[f32], i64)> {
        let n = self.sample_len();
        let label = *self.labels.get(i)?;
        Some((&self.features[i * n..(i + 1) * n], label))
    }

    /// A seeded shuffled split into `(train, validation)`: the first part gets
    /// `round(fraction * len())` samples, the second the rest. `fraction` is clamped to
    /// `[0, 1]` (NaN counts as 0). The same seed gives the same split.
    pub fn split(&self, fraction: f64, seed: u64) -> (Dataset, Dataset) {
        let n = self.len();
        let k = if fraction.is_nan() {
            0
        } else {
            ((fraction.clamp(0.0, 1.0) * n as f64).round() as usize).min(n)
        };
        let mut order: Vec<usize> = (0..n).collect();
        order.shuffle(&mut Pcg64Mcg::seed_from_u64(seed));
        (self.gather(&order[..k]), self.gather(&order[k..]))
    }

    /// The samples at `indices` (in that order, repeats allowed). Errors if one is out of range.
    pub fn subset(&self, indices: &[usize]) -> Result<Dataset> {
        self.check_indices(indices)?;
        Ok(self.gather(indices))
    }

    /// The mean and (population) standard deviation over all feature values, as used by
    /// [`normalize`](Self::normalize). `(0, 0)` for an empty data set.
    pub fn mean_std(&self) -> (f32, f32) {
        if self.features.is_empty() {
            return (0.0, 0.0);
        }
        let n = self.features.len() as f64;
        let mean = self.features.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
        let var = self
            .features
            .iter()
            .map(|&v| (f64::from(v) - mean).powi(2))
            .sum::<f64>()
            / n;
        (mean as f32, var.sqrt() as f32)
    }

    /// Replace every feature value `v` by `(v - mean) / std`, in place.
    /// Errors (and changes nothing) if `std` is not a positive finite number or `mean` is not finite.
    pub fn normalize(&mut self, mean: f32, std: f32) -> Result<()> {
        if !(std.is_finite() && std > 0.0 && mean.is_finite()) {
            return Err(DataError::Invalid(format!(
                "normalize: need a finite mean and a positive finite std, got mean {mean}, std {std}"
            )));
        }
        let inv = 1.0 / std;
        self.features
            .iter_mut()
            .for_each(|v| *v = (*v - mean) * inv);
        Ok(())
    }

    /// The samples at `indices` as a batch: `x` of shape `[b, ...sample_dims]` (f32) and `y` of
    /// shape `[b]` (i64). Errors if an index is out of range.
    pub fn batch(&self, indices: &[usize]) -> Result<(Tensor, Tensor)> {
        self.check_indices(indices)?;
        let (x, y) = self.gather_raw(indices);
        self.to_tensors(x, y)
    }

    pub(crate) fn to_tensors(&self, x: Vec<f32>, y: Vec<i64>) -> Result<(Tensor, Tensor)> {
        let mut dims = Vec::with_capacity(self.sample_dims.len() + 1);
        dims.push(y.len());
        dims.extend_from_slice(&self.sample_dims);
        let n = y.len();
        Ok((Tensor::from_vec(x, dims)?, Tensor::from_vec(y, [n])?))
    }

    pub(crate) fn check_indices(&self, indices: &[usize]) -> Result<()> {
        match indices.iter().find(|&&i| i >= self.len()) {
            Some(i) => Err(DataError::Invalid(format!(
                "sample index {i} out of range for a data set of {} samples",
                self.len()
            ))),
            None => Ok(()),
        }
    }

    /// Features and labels of `indices`, which must be in range.
    pub(crate) fn gather_raw(&self, indices: &[usize]) -> (Vec<f32>, Vec<i64>) {
        let n = self.sample_len();
        let mut x = Vec::with_capacity(indices.len() * n);
        for &i in indices {
            x.extend_from_slice(&self.features[i * n..(i + 1) * n]);
        }
        (x, indices.iter().map(|&i| self.labels[i]).collect())
    }

    fn gather(&self, indices: &[usize]) -> Dataset {
        let (features, labels) = self.gather_raw(indices);
        Dataset {
            features,
            sample_dims: self.sample_dims.clone(),
            labels,
            num_classes: self.num_classes,
        }
    }
}
