//! The scikit-learn 8x8 digits set, embedded in the crate.

use std::path::Path;

use crate::csv::{parse_csv, CsvOptions};
use crate::error::{decode_maybe_gz, DataError, Result};
use crate::Dataset;

static DIGITS_CSV_GZ: &[u8] = include_bytes!("../data/digits.csv.gz");

/// The scikit-learn digits set (UCI optical recognition of handwritten digits): 1797 images of
/// per-sample shape `[1, 8, 8]` with pixels scaled from `0..=16` to `[0, 1]`, labels `0..10`.
///
/// It is embedded in the crate, so it needs no files or network: good for tests and examples.
/// The samples are in the original order (the first is a 0); use [`Dataset::split`] to get a
/// shuffled train/validation split.
///
/// # Panics
///
/// Only if the embedded file were corrupt, which the crate's tests rule out.
pub fn digits() -> Dataset {
    // The embedded file is fixed at compile time and checked by the tests.
    load_digits().unwrap_or_else(|e| panic!("the embedded digits set is corrupt: {e}"))
}

fn load_digits() -> Result<Dataset> {
    let path = Path::new("<embedded digits.csv.gz>");
    let bytes = decode_maybe_gz(DIGITS_CSV_GZ.to_vec(), path)?;
    let table = parse_csv(bytes, path, &CsvOptions::default())?;
    if table.width != 64 || table.labels.iter().any(|&l| l > 9) {
        return Err(DataError::format(
            path,
            "expected 64 pixels and labels 0..10",
        ));
    }
    let features = table.features.iter().map(|&p| p / 16.0).collect();
    Dataset::new(features, vec![1, 8, 8], table.labels, 10)
}
