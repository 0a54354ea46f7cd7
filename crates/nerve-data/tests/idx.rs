mod common;

use common::{gzip, idx_bytes, temp_dir, temp_path};
use nerve_data::idx::read_idx;
use nerve_data::mnist::{load_idx_pair, load_mnist};
use nerve_data::{DataError, IdxArray};

fn sample() -> (Vec<u32>, Vec<u8>) {
    let dims = vec![3, 2, 4];
    let data = (0..24).map(|i| (i * 10) as u8).collect();
    (dims, data)
}

#[test]
fn round_trip_plain_and_gz() {
    let (dims, data) = sample();
    let expected = IdxArray {
        dims: vec![3, 2, 4],
        data: data.clone(),
    };
    let raw = idx_bytes(&dims, &data);
    // The gz file has no .gz suffix and the plain one has: detection is by content.
    for (name, bytes) in [("plain.gz", raw.clone()), ("packed", gzip(&raw))] {
        let path = temp_path(name);
        std::fs::write(&path, bytes).unwrap();
        assert_eq!(read_idx(&path).unwrap(), expected, "{name}");
        std::fs::remove_file(&path).unwrap();
    }
}

#[test]
fn truncated_and_trailing_data_name_the_file() {
    let (dims, data) = sample();
    let raw = idx_bytes(&dims, &data);
    for (name, bytes, needle) in [
        ("truncated", raw[..raw.len() - 5].to_vec(), "found 19"),
        ("trailing", [raw.as_slice(), &[1, 2]].concat(), "found 26"),
        ("truncated-header", raw[..9].to_vec(), "header"),
        ("truncated-gz", gzip(&raw[..raw.len() - 1]), "found 23"),
    ] {
        let path = temp_path(name);
        std::fs::write(&path, bytes).unwrap();
        let err = read_idx(&path).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, DataError::Format { .. }), "{name}: {err:?}");
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        assert!(msg.contains(needle), "{name}: {msg}");
        std::fs::remove_file(&path).unwrap();
    }
}

#[test]
fn bad_magic_type_and_missing_file() {
    let path = temp_path("magic");
    std::fs::write(&path, b"PK\x03\x04 not an idx file").unwrap();
    let msg = read_idx(&path).unwrap_err().to_string();
    assert!(msg.contains("bad magic") && msg.contains(&path.display().to_string()));

    std::fs::write(&path, [0, 0, 0x0d, 1, 0, 0, 0, 1, 0, 0, 0, 0]).unwrap();
    let msg = read_idx(&path).unwrap_err().to_string();
    assert!(msg.contains("unsupported IDX data type 0x0d"), "{msg}");
    std::fs::remove_file(&path).unwrap();

    let err = read_idx(&path).unwrap_err();
    assert!(matches!(err, DataError::Io { .. }), "{err:?}");
    assert!(err.to_string().contains(&path.display().to_string()));
}

#[test]
fn mnist_layout_plain_and_gz() {
    let dir = temp_dir("mnist");
    let images: Vec<u8> = (0..5 * 28 * 28).map(|i| (i % 256) as u8).collect();
    let labels = [3u8, 0, 9, 1, 7];
    std::fs::write(
        dir.join("train-images-idx3-ubyte.gz"),
        gzip(&idx_bytes(&[5, 28, 28], &images)),
    )
    .unwrap();
    std::fs::write(
        dir.join("train-labels-idx1-ubyte"),
        idx_bytes(&[5], &labels),
    )
    .unwrap();
    let ds = load_mnist(&dir, true).unwrap();
    assert_eq!(ds.len(), 5);
    assert_eq!(ds.sample_dims(), &[1, 28, 28]);
    assert_eq!(ds.num_classes(), 10);
    assert_eq!(ds.labels(), &[3, 0, 9, 1, 7]);
    assert_eq!(ds.features()[255], 1.0);
    assert!(ds.features().iter().all(|v| (0.0..=1.0).contains(v)));
    let (x, y) = ds.batch(&[4, 0]).unwrap();
    assert_eq!(x.dims(), &[2, 1, 28, 28]);
    assert_eq!(y.to_vec::<i64>().unwrap(), vec![7, 3]);

    // The test split is missing: the error names the directory and the names tried.
    let msg = load_mnist(&dir, false).unwrap_err().to_string();
    assert!(msg.contains(&dir.display().to_string()), "{msg}");
    assert!(
        msg.contains("t10k-images-idx3-ubyte") && msg.contains("t10k-images-idx3-ubyte.gz"),
        "{msg}"
    );

    // Count mismatch and out-of-range labels are errors naming the label file.
    let bad = dir.join("bad-labels");
    std::fs::write(&bad, idx_bytes(&[4], &labels[..4])).unwrap();
    let msg = load_idx_pair(dir.join("train-images-idx3-ubyte.gz"), &bad, 10)
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("bad-labels") && msg.contains("4 labels"),
        "{msg}"
    );
    std::fs::write(&bad, idx_bytes(&[5], &[1, 2, 10, 3, 4])).unwrap();
    let msg = load_idx_pair(dir.join("train-images-idx3-ubyte.gz"), &bad, 10)
        .unwrap_err()
        .to_string();
    assert!(msg.contains("label 10 at index 2"), "{msg}");
    std::fs::remove_dir_all(&dir).unwrap();
}
