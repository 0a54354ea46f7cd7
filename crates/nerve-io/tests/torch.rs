//! The PyTorch `.pt` / `.pth` reader against files torch.save wrote (zip and legacy), checked
//! value for value — exactly, no tolerance — against `expected.safetensors`; and against
//! hostile and damaged files, which must fail with a message saying what is wrong and never
//! panic. Fixtures: `tools/torch_pt_fixtures.py`.

use std::io::Cursor;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use nerve_core::{DType, Tensor};
use nerve_io::pickle::{Limits, Value};
use nerve_io::torch::{self, StateDict};
use nerve_io::FormatError;
use safetensors::{Dtype, SafeTensors};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/torch")
        .join(name)
}

fn read(name: &str) -> Vec<u8> {
    std::fs::read(fixture(name)).unwrap()
}

fn load(name: &str) -> StateDict {
    torch::load(fixture(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn load_err(name: &str) -> String {
    match torch::load(fixture(name)) {
        Ok(sd) => panic!("{name} loaded ({} tensors) but must be refused", sd.len()),
        Err(e @ FormatError::Invalid { .. }) => e.to_string(),
        Err(e) => panic!("{name}: expected FormatError::Invalid, got {e:?}"),
    }
}

fn from_bytes(bytes: &[u8]) -> Result<StateDict, FormatError> {
    let v = torch::read_value(Cursor::new(bytes), Path::new("mem.pt"), &Limits::default())?;
    Ok(StateDict::from_value(&v))
}

/// The expected values, read once per test.
struct Expected {
    bytes: Vec<u8>,
}

impl Expected {
    fn new() -> Self {
        Expected {
            bytes: read("expected.safetensors"),
        }
    }

    fn order(&self, fixture: &str) -> Vec<String> {
        let (_, meta) = SafeTensors::read_metadata(&self.bytes).unwrap();
        let meta = meta.metadata().as_ref().unwrap();
        let order = &meta[&format!("order/{fixture}")];
        order.split('\n').map(String::from).collect()
    }

    /// Names in file order, shapes, dtypes (integers widened to I64) and values, all exact.
    fn check(&self, file: &str, fixture: &str) {
        let sd = load(file);
        let st = SafeTensors::deserialize(&self.bytes).unwrap();
        let names: Vec<&str> = sd.names().collect();
        assert_eq!(names, self.order(fixture), "{file}: names and their order");
        for (name, t) in sd.iter() {
            let view = st.tensor(&format!("{fixture}/{name}")).unwrap();
            assert_eq!(t.dims(), view.shape(), "{file}: {name}: shape");
            assert_same(t, view.dtype(), view.data(), &format!("{file}: {name}"));
        }
    }
}

/// `t` holds exactly the little-endian `data` of safetensors dtype `dtype`.
fn assert_same(t: &Tensor, dtype: Dtype, data: &[u8], what: &str) {
    fn le<const N: usize, T>(data: &[u8], f: impl Fn([u8; N]) -> T) -> Vec<T> {
        data.chunks_exact(N)
            .map(|c| f(c.try_into().unwrap()))
            .collect()
    }
    let want_dtype = match dtype {
        Dtype::F32 => DType::F32,
        Dtype::F64 => DType::F64,
        Dtype::F16 => DType::F16,
        Dtype::BF16 => DType::BF16,
        Dtype::BOOL => DType::Bool,
        _ => DType::I64,
    };
    assert_eq!(t.dtype(), want_dtype, "{what}: dtype (saved as {dtype:?})");
    match dtype {
        Dtype::F32 => assert_eq!(t.to_vec::<f32>().unwrap(), le(data, f32::from_le_bytes)),
        Dtype::F64 => assert_eq!(t.to_vec::<f64>().unwrap(), le(data, f64::from_le_bytes)),
        Dtype::F16 => assert_eq!(
            t.to_vec::<f16>().unwrap(),
            le(data, |b| f16::from_bits(u16::from_le_bytes(b)))
        ),
        Dtype::BF16 => assert_eq!(
            t.to_vec::<bf16>().unwrap(),
            le(data, |b| bf16::from_bits(u16::from_le_bytes(b)))
        ),
        Dtype::BOOL => assert_eq!(t.to_vec::<u8>().unwrap(), data.to_vec(), "{what}"),
        Dtype::I64 => assert_eq!(t.to_vec::<i64>().unwrap(), le(data, i64::from_le_bytes)),
        Dtype::I32 => assert_eq!(
            t.to_vec::<i64>().unwrap(),
            le(data, |b| i32::from_le_bytes(b) as i64)
        ),
        Dtype::I16 => assert_eq!(
            t.to_vec::<i64>().unwrap(),
            le(data, |b| i16::from_le_bytes(b) as i64)
        ),
        Dtype::I8 => assert_eq!(
            t.to_vec::<i64>().unwrap(),
            le(data, |b: [u8; 1]| b[0] as i8 as i64)
        ),
        Dtype::U8 => assert_eq!(
            t.to_vec::<i64>().unwrap(),
            le(data, |b: [u8; 1]| b[0] as i64)
        ),
        other => panic!("{what}: fixture dtype {other:?} not handled"),
    }
}

// ------------------------------------------------------------------------ valid files

#[test]
fn module_state_dict_matches_torch_in_both_formats() {
    let e = Expected::new();
    e.check("module_zip.pt", "module");
    e.check("module_legacy.pt", "module");
    e.check("module_zip_proto4.pt", "module_zip_proto4");
    let sd = load("module_legacy.pt");
    let nbt = sd.get("1.num_batches_tracked").unwrap();
    assert_eq!((nbt.dtype(), nbt.dims()), (DType::I64, &[][..]));
    assert_eq!(nbt.item::<i64>().unwrap(), 2);
    assert_eq!(sd.get("0.weight").unwrap().dims(), &[3, 4]);
}

#[test]
fn every_dtype_loads_as_its_nerve_dtype_with_exact_values() {
    let e = Expected::new();
    e.check("dtypes_zip.pt", "dtypes");
    e.check("dtypes_legacy.pt", "dtypes");
    // The same tensors written big-endian (byteorder = "big"), byte-swapped back on load.
    e.check("dtypes_bigendian_zip.pt", "dtypes");
    let sd = load("dtypes_legacy.pt");
    let dtype = |n: &str| sd.get(n).unwrap().dtype();
    let floats = [
        ("f32", DType::F32),
        ("f64", DType::F64),
        ("f16", DType::F16),
    ];
    for (n, d) in floats
        .into_iter()
        .chain([("bf16", DType::BF16), ("bool", DType::Bool)])
    {
        assert_eq!(dtype(n), d, "{n}");
    }
    for n in ["i64", "i32", "i16", "i8", "u8"] {
        assert_eq!(dtype(n), DType::I64, "{n} widens to I64");
    }
    assert_eq!(
        sd.get("i32").unwrap().to_vec::<i64>().unwrap(),
        [-(1 << 31), 5, (1 << 31) - 1, -7]
    );
    assert_eq!(
        sd.get("u8").unwrap().to_vec::<i64>().unwrap(),
        [0, 1, 200, 255]
    );
    assert_eq!(sd.get("scalar").unwrap().dims(), &[] as &[usize]);
    assert_eq!(sd.get("empty").unwrap().dims(), &[0, 3]);
}

#[test]
fn views_are_copied_out_in_row_major_order() {
    // base = arange(24).reshape(4, 6) / 7 - 1, computed here independently of the fixture.
    let base = |i: usize, j: usize| (i * 6 + j) as f32 / 7.0 - 1.0;
    for file in ["dtypes_zip.pt", "dtypes_legacy.pt"] {
        let sd = load(file);
        let get = |n: &str| sd.get(n).unwrap();
        let t = get("transposed");
        assert_eq!(t.dims(), &[6, 4], "{file}");
        assert!(t.is_contiguous());
        let want: Vec<f32> = (0..6)
            .flat_map(|j| (0..4).map(move |i| base(i, j)))
            .collect();
        assert_eq!(t.to_vec::<f32>().unwrap(), want, "{file}: transposed");
        let want: Vec<f32> = (0..4)
            .flat_map(|i| (2..5).map(move |j| base(i, j)))
            .collect();
        assert_eq!(
            get("narrowed").to_vec::<f32>().unwrap(),
            want,
            "{file}: narrowed"
        );
        let want: Vec<f32> = (0..6).map(|j| base(2, j)).collect();
        assert_eq!(get("row").to_vec::<f32>().unwrap(), want, "{file}: row");
        let want: Vec<f32> = [0, 2]
            .iter()
            .flat_map(|&i| [0, 3].map(|j| base(i, j)))
            .collect();
        assert_eq!(
            get("strided").to_vec::<f32>().unwrap(),
            want,
            "{file}: strided"
        );
        assert_eq!(
            get("expanded").to_vec::<f32>().unwrap(),
            [1.0, 2.0, 3.0, 1.0, 2.0, 3.0],
            "{file}: stride-0"
        );
        // Two tensors on one storage, overlapping in elements 4 and 5.
        let (a, b) = (get("shared_a").to_vec::<f32>().unwrap(), get("shared_b"));
        assert_eq!(b.dims(), &[2, 3]);
        assert_eq!(
            &a[4..6],
            &b.to_vec::<f32>().unwrap()[0..2],
            "{file}: shared"
        );
        assert!(!get("shared_a").shares_storage(b));
    }
}

#[test]
fn nested_checkpoint_flattens_to_dotted_names_and_keeps_other_entries() {
    let e = Expected::new();
    e.check("nested_zip.pt", "nested");
    e.check("nested_legacy.pt", "nested");
    let sd = load("nested_zip.pt");
    assert!(sd.get("model.1.running_var").is_some());
    assert!(sd.get("optimizer.state.0.step").is_some());
    assert!(sd.get("history.1").is_some());
    assert!(sd.get("epoch").is_none(), "non-tensor leaves are left out");

    let v = torch::load_value(fixture("nested_legacy.pt")).unwrap();
    assert!(matches!(v.get("epoch"), Some(Value::Int(3))));
    assert_eq!(v.get("name").and_then(Value::as_str), Some("tiny"));
    match v.get("lr") {
        Some(Value::List(l)) => assert!(matches!(l[..], [Value::Float(a), Value::Float(b)]
            if a == 0.1 && b == 0.01)),
        other => panic!("lr: {other:?}"),
    }
    let w = v.get("model").and_then(|m| m.get("0.bias"));
    assert_eq!(w.and_then(Value::as_tensor).unwrap().dims(), &[3]);
}

#[test]
fn state_dict_metadata_is_kept_as_the_dicts_build_state() {
    for file in ["module_zip.pt", "module_legacy.pt"] {
        let Value::Dict(d) = torch::load_value(fixture(file)).unwrap() else {
            panic!("{file}: not a dict")
        };
        let meta = d.state.as_ref().and_then(|s| s.get("_metadata"));
        let version = meta.and_then(|m| m.get("1")).and_then(|m| m.get("version"));
        assert!(matches!(version, Some(Value::Int(2))), "{file}: {meta:?}");
    }
}

#[test]
fn a_parameter_saved_alone_is_one_tensor_named_empty() {
    let e = Expected::new();
    e.check("parameter_zip.pt", "parameter");
    e.check("parameter_legacy.pt", "parameter");
    assert_eq!(load("parameter_zip.pt").get("").unwrap().dims(), &[3, 2]);
}

#[test]
fn legacy_storage_views_read_their_slice_of_the_root_storage() {
    Expected::new().check("storage_view_legacy.pt", "storage_view_legacy");
    let sd = load("storage_view_legacy.pt");
    assert_eq!(
        sd.get("a").unwrap().to_vec::<f32>().unwrap(),
        [1.5, 2.0, 2.5]
    );
    assert_eq!(
        sd.get("b").unwrap().to_vec::<f32>().unwrap(),
        [2.5, 3.0, 3.5]
    );
}

// ------------------------------------------------------------------ hostile and damaged

#[test]
fn a_pickle_calling_os_system_is_refused_naming_the_global() {
    for file in ["evil_os_system_zip.pt", "evil_os_system_legacy.pt"] {
        let e = load_err(file);
        assert!(e.contains("refused global os.system"), "{file}: {e}");
    }
    let e = load_err("evil_exec_proto4_zip.pt");
    assert!(e.contains("refused global builtins.exec"), "{e}");
}

#[test]
fn a_pickled_whole_module_is_refused_naming_its_class() {
    let e = load_err("whole_module_zip.pt");
    assert!(
        e.contains("refused global torch.nn.modules.container.Sequential"),
        "{e}"
    );
}

#[test]
fn a_torchscript_archive_is_refused_as_such() {
    let e = load_err("torchscript_zip.pt");
    assert!(e.contains("a TorchScript archive (torch.jit.save)"), "{e}");
}

#[test]
fn a_storage_shorter_than_declared_is_refused() {
    let e = load_err("short_storage_zip.pt");
    assert!(
        e.contains("holds 12 bytes but is declared as 6 x FloatStorage = 24 bytes"),
        "{e}"
    );
    let e = load_err("count_mismatch_legacy.pt");
    assert!(
        e.contains("storage k holds 3 elements in the file but the pickle declares 4"),
        "{e}"
    );
}

#[test]
fn a_view_past_its_storage_is_refused_naming_the_tensor() {
    let e = load_err("view_past_storage_zip.pt");
    assert!(
        e.contains("tensor 'w'") && e.contains("reaches element 4 of a storage holding 4"),
        "{e}"
    );
}

#[test]
fn absurd_sizes_fail_before_allocating() {
    let e = load_err("huge_storage_zip.pt");
    assert!(e.contains("holds 16 bytes but is declared as"), "{e}");
    let e = load_err("huge_expand_zip.pt");
    assert!(e.contains("expanded views beyond"), "{e}");
}

#[test]
fn a_truncated_legacy_file_is_refused() {
    let e = load_err("truncated_legacy.pt");
    assert!(
        e.contains("data of storage") && e.contains("unexpected end of data"),
        "{e}"
    );
}

#[test]
fn files_that_are_not_checkpoints_are_refused_clearly() {
    for bytes in [&b""[..], b"hello world\n", b"\x80\x02K\x07.", &[0u8; 600]] {
        match from_bytes(bytes) {
            Err(e @ FormatError::Invalid { .. }) => {
                assert!(e.to_string().contains("not a PyTorch checkpoint"), "{e}")
            }
            other => panic!("{bytes:?}: {other:?}"),
        }
    }
    match torch::load(fixture("no-such-file.pt")) {
        Err(FormatError::Io { .. }) => {}
        other => panic!("{other:?}"),
    }
}

/// Every strict prefix of a legacy file is an error (the format has no slack at the end);
/// the whole file loads.
#[test]
fn every_prefix_of_a_legacy_file_is_an_error_never_a_panic() {
    for file in ["module_legacy.pt", "parameter_legacy.pt"] {
        let bytes = read(file);
        for n in 0..bytes.len() {
            match from_bytes(&bytes[..n]) {
                Err(FormatError::Invalid { .. }) => {}
                other => panic!("{file}: prefix of {n} bytes gave {other:?}"),
            }
        }
        assert!(from_bytes(&bytes).is_ok());
    }
}

fn same(a: &StateDict, b: &StateDict) -> bool {
    a.len() == b.len()
        && a.iter().zip(b.iter()).all(|((n1, t1), (n2, t2))| {
            n1 == n2
                && t1.dtype() == t2.dtype()
                && t1.dims() == t2.dims()
                && t1
                    .to_f64_vec()
                    .iter()
                    .zip(t2.to_f64_vec())
                    .all(|(x, y)| x.to_bits() == y.to_bits())
        })
}

/// Truncations and single-byte flips of a zip file: an error, or (a flip in a record the
/// reader does not use) exactly the original tensors — the zip CRC catches damage to the
/// records it does read. Flips in a legacy file, which has no checksum: no panic.
#[test]
fn truncated_and_flipped_files_give_errors_or_the_right_tensors_never_a_panic() {
    let bytes = read("module_zip.pt");
    let good = from_bytes(&bytes).unwrap();
    for n in 0..bytes.len() {
        if let Ok(sd) = from_bytes(&bytes[..n]) {
            assert!(same(&sd, &good), "truncated to {n} bytes: wrong tensors");
        }
    }
    for i in 0..bytes.len() {
        for flip in [0xff, 0x01] {
            let mut b = bytes.clone();
            b[i] ^= flip;
            if let Ok(sd) = from_bytes(&b) {
                assert!(same(&sd, &good), "byte {i} ^ {flip:#x}: wrong tensors");
            }
        }
    }
    for file in [
        "module_legacy.pt",
        "dtypes_legacy.pt",
        "storage_view_legacy.pt",
    ] {
        let bytes = read(file);
        for i in 0..bytes.len() {
            for flip in [0xff, 0x01, 0x80] {
                let mut b = bytes.clone();
                b[i] ^= flip;
                let _ = from_bytes(&b);
            }
        }
    }
}
