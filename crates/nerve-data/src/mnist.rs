//! MNIST-style data sets (MNIST, Fashion-MNIST): pairs of IDX image and label files.

use std::path::Path;

use crate::error::{DataError, Result};
use crate::idx::{read_idx, IdxArray};
use crate::Dataset;

/// Load the MNIST (or Fashion-MNIST) training (`train = true`) or test split from `dir`.
///
/// Looks for `train-images-idx3-ubyte` and `train-labels-idx1-ubyte` (or the `t10k-` files),
/// each with or without a `.gz` suffix. Images become f32 in `[0, 1]` with per-sample shape
/// `[1, rows, cols]`; labels are i64 in `0..10`.
pub fn load_mnist(dir: impl AsRef<Path>, train: bool) -> Result<Dataset> {
    let dir = dir.as_ref();
    let prefix = if train { "train" } else { "t10k" };
    let images = find(dir, &format!("{prefix}-images-idx3-ubyte"))?;
    let labels = find(dir, &format!("{prefix}-labels-idx1-ubyte"))?;
    load_idx_pair(&images, &labels, 10)
}

/// Load an image IDX file and a label IDX file as a [`Dataset`] with `num_classes` classes.
///
/// Images of shape `[n, h, w]` get per-sample shape `[1, h, w]`; other ranks keep the header's
/// dimensions after the first. Pixels are scaled by `1/255`. The counts must agree and every
/// label must be below `num_classes`.
pub fn load_idx_pair(
    images: impl AsRef<Path>,
    labels: impl AsRef<Path>,
    num_classes: usize,
) -> Result<Dataset> {
    let (images, labels) = (images.as_ref(), labels.as_ref());
    idx_pair_dataset(
        read_idx(images)?,
        images,
        read_idx(labels)?,
        labels,
        num_classes,
    )
}

/// The [`Dataset`] of [`load_idx_pair`] from IDX arrays already read (see
/// [`IdxArray::from_bytes`]); `images` and `labels` name their files in errors.
pub fn idx_pair_dataset(
    img: IdxArray,
    images: &Path,
    lab: IdxArray,
    labels: &Path,
    num_classes: usize,
) -> Result<Dataset> {
    if img.dims.len() < 2 {
        return Err(DataError::format(
            images,
            format!("expected images of rank >= 2, header says {:?}", img.dims),
        ));
    }
    if lab.dims.len() != 1 {
        return Err(DataError::format(
            labels,
            format!("expected labels of rank 1, header says {:?}", lab.dims),
        ));
    }
    let n = img.dims[0];
    if lab.dims[0] != n {
        return Err(DataError::format(
            labels,
            format!(
                "{} labels but {} has {n} images",
                lab.dims[0],
                images.display()
            ),
        ));
    }
    if let Some((i, &l)) = lab
        .data
        .iter()
        .enumerate()
        .find(|&(_, &l)| usize::from(l) >= num_classes)
    {
        return Err(DataError::format(
            labels,
            format!("label {l} at index {i} is not below {num_classes}"),
        ));
    }
    let mut sample_dims = img.dims[1..].to_vec();
    if sample_dims.len() == 2 {
        sample_dims.insert(0, 1);
    }
    let features = img.data.iter().map(|&p| f32::from(p) / 255.0).collect();
    let labels = lab.data.iter().map(|&l| i64::from(l)).collect();
    Dataset::new(features, sample_dims, labels, num_classes)
}

fn find(dir: &Path, name: &str) -> Result<std::path::PathBuf> {
    let tried = [name.to_string(), format!("{name}.gz")];
    tried
        .iter()
        .map(|n| dir.join(n))
        .find(|p| p.is_file())
        .ok_or_else(|| DataError::NotFound {
            dir: dir.to_path_buf(),
            tried: tried.to_vec(),
        })
}
