//! CSV data sets: the first byte picks the options (delimiter, header rule, label column,
//! class count), the rest is the file; then a batch is read from the data set.
#![no_main]

use libfuzzer_sys::fuzz_target;
use nerve_data::csv::{csv_from_bytes, CsvOptions};

fuzz_target!(|data: &[u8]| {
    let Some((&sel, file)) = data.split_first() else {
        return;
    };
    let opts = CsvOptions {
        delimiter: [',', ';', '\t', ' '][usize::from(sel & 3)],
        header: [None, Some(true), Some(false), None][usize::from((sel >> 2) & 3)],
        label_column: [None, Some(0), Some(1), None][usize::from((sel >> 4) & 3)],
        num_classes: [None, Some(10)][usize::from((sel >> 6) & 1)],
    };
    let Ok(ds) = csv_from_bytes(file.to_vec(), "fuzz.csv", &opts) else {
        return;
    };
    assert!(!ds.is_empty());
    assert_eq!(ds.features().len(), ds.len() * ds.sample_len());
    let (x, y) = ds
        .batch(&[ds.len() - 1, 0])
        .expect("batch of a valid data set");
    assert_eq!(x.dims()[0], 2);
    assert!(y
        .to_vec::<i64>()
        .expect("i64 labels")
        .iter()
        .all(|&l| l >= 0));
});
