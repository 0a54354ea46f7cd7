//! IDX files (MNIST), plain or gzip-compressed: parse, then build the data set an image file
//! makes (with labels to match) and read a batch, as `load_idx_pair` does.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use nerve_data::mnist::idx_pair_dataset;
use nerve_data::IdxArray;

fuzz_target!(|data: &[u8]| {
    let path = Path::new("fuzz.idx");
    let Ok(img) = IdxArray::from_bytes(data, path) else {
        return;
    };
    assert_eq!(img.data.len(), img.dims.iter().product::<usize>());
    let n = img.dims[0];
    if n > img.data.len().max(4096) {
        return; // zero-sized samples by the billion: labels as large as the claim, not the file
    }
    let labels = IdxArray {
        dims: vec![n],
        data: (0..n).map(|i| (i % 10) as u8).collect(),
    };
    if let Ok(ds) = idx_pair_dataset(img, path, labels, Path::new("labels.idx"), 10) {
        if !ds.is_empty() {
            let (x, y) = ds
                .batch(&[0, ds.len() - 1])
                .expect("batch of a valid data set");
            assert_eq!(x.dims()[0], 2);
            assert_eq!(y.to_vec::<i64>().expect("i64 labels").len(), 2);
        }
    }
});
