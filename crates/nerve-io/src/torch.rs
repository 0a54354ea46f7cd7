//! PyTorch checkpoints: the `.pt` / `.pth` files `torch.save` writes, read without Python
//! and without running any code from the file.
//!
//! Two layouts exist and both are read:
//! - **zip** (the default since PyTorch 1.6): `<archive>/data.pkl` holds the pickle, each
//!   storage's bytes are the record `<archive>/data/<key>`, and `<archive>/byteorder` says
//!   `little` or `big` (absent: little). The archive folder's name varies.
//! - **legacy** (`_use_new_zipfile_serialization=False`, and everything saved before 1.6):
//!   a run of pickles — the magic number `0x1950a86a20f9469cfc6c`, the protocol version
//!   1001, a `sys_info` dict, the object itself, the list of storage keys — then for each
//!   key in that order an 8-byte little-endian element count and the storage's raw
//!   little-endian bytes.
//!
//! The pickle is run by the restricted machine in [`crate::pickle`]. Every storage's
//! declared size is checked against the bytes in the file and every tensor's extent against
//! its storage before anything is read; a view (transposed, narrowed, permuted) is copied out
//! to a contiguous tensor, and tensors sharing a storage each get their own copy. Floats and
//! bool keep their dtype (f32, f64, f16, bf16, bool); every integer dtype loads as `I64`.
//!
//! ```no_run
//! let sd = nerve_io::torch::load("resnet18.pth")?;
//! for (name, t) in sd.iter() {
//!     println!("{name}: {:?} {:?}", t.dims(), t.dtype());
//! }
//! # Ok::<(), nerve_io::FormatError>(())
//! ```

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read, Seek, SeekFrom};
use std::path::Path;

use half::{bf16, f16};
use nerve_core::Tensor;

use crate::pickle::{
    unpickle_from, Limits, PickleError, Source, StorageRef, StorageType, TensorSpec, Value,
};
use crate::FormatError;

/// The first pickle of a legacy file: 0x1950a86a20f9469cfc6c, little-endian.
const LEGACY_MAGIC: [u8; 10] = [0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];
/// The second pickle of a legacy file.
const LEGACY_PROTOCOL_VERSION: i64 = 1001;
/// Largest `data.pkl` (or `byteorder`) record read from a zip file.
const MAX_PICKLE_RECORD: u64 = 1 << 30;
/// Deflate cannot expand data by more than about this factor.
const MAX_DEFLATE_RATIO: u64 = 1100;

/// The tensors of a checkpoint, by dotted name, in file order.
///
/// Nested dicts flatten with dots (`{"model": {"fc.weight": t}}` gives `model.fc.weight`),
/// lists and tuples with their indices; values that are not tensors are left out (see
/// [`load_value`] for them). A file holding one bare tensor gives one entry named `""`.
#[derive(Debug, Clone, Default)]
pub struct StateDict {
    entries: Vec<(String, Tensor)>,
    index: HashMap<String, usize>,
}

impl StateDict {
    /// The tensors in `value`, flattened as described on [`StateDict`]. Tensors not yet read
    /// (`Value::TensorRef`) are skipped.
    pub fn from_value(value: &Value) -> StateDict {
        let mut sd = StateDict::default();
        walk(value, &mut String::new(), &mut |name, v| {
            if let Value::Tensor(t) = v {
                sd.push(name.to_string(), t.clone());
            }
        });
        sd
    }

    fn push(&mut self, name: String, t: Tensor) {
        self.index.entry(name.clone()).or_insert(self.entries.len());
        self.entries.push((name, t));
    }

    /// How many tensors.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The tensor named `name` (the first, should a name repeat).
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.index.get(name).map(|&i| &self.entries[i].1)
    }

    /// The names, in file order.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|(n, _)| n.as_str())
    }

    /// `(name, tensor)` pairs in file order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.entries.iter().map(|(n, t)| (n.as_str(), t))
    }

    /// The pairs, in file order.
    pub fn into_vec(self) -> Vec<(String, Tensor)> {
        self.entries
    }
}

impl IntoIterator for StateDict {
    type Item = (String, Tensor);
    type IntoIter = std::vec::IntoIter<(String, Tensor)>;
    fn into_iter(self) -> Self::IntoIter {
        self.entries.into_iter()
    }
}

/// Visit every value under `v` with its dotted name: dict entries by key (string or
/// integer keys), list and tuple items by index.
fn walk<'v>(v: &'v Value, name: &mut String, f: &mut impl FnMut(&str, &'v Value)) {
    let child = |key: &str, c: &'v Value, name: &mut String, f: &mut _| {
        let len = name.len();
        if !name.is_empty() {
            name.push('.');
        }
        name.push_str(key);
        walk(c, name, f);
        name.truncate(len);
    };
    match v {
        Value::Dict(d) => {
            for (k, c) in &d.items {
                let key = match k {
                    Value::Str(s) => s.clone(),
                    Value::Int(i) => i.to_string(),
                    _ => continue,
                };
                child(&key, c, name, f);
            }
        }
        Value::List(items) | Value::Tuple(items) => {
            for (i, c) in items.iter().enumerate() {
                child(&i.to_string(), c, name, f);
            }
        }
        _ => f(name, v),
    }
}

/// Load the tensors of a `.pt` / `.pth` file (zip or legacy), by dotted name in file order.
///
/// Errors name the file and what is wrong: not a torch file, a refused global, a storage
/// shorter than declared, a view outside its storage, a truncated file.
pub fn load(path: impl AsRef<Path>) -> Result<StateDict, FormatError> {
    Ok(StateDict::from_value(&load_value(path)?))
}

/// Load the whole object a `.pt` / `.pth` file holds (dicts, numbers, strings, tensors),
/// for checkpoints whose other entries (epoch, config, optimizer state) matter.
pub fn load_value(path: impl AsRef<Path>) -> Result<Value, FormatError> {
    let path = path.as_ref();
    let file = File::open(path).map_err(|source| FormatError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    read_value(file, path, &Limits::default())
}

/// [`load_value`] from any seekable reader (a file, a `Cursor` over bytes in memory), under
/// the given limits. `path` names the source in errors.
pub fn read_value<R: Read + Seek>(
    mut reader: R,
    path: &Path,
    limits: &Limits,
) -> Result<Value, FormatError> {
    let io = |source| FormatError::Io {
        path: path.to_path_buf(),
        source,
    };
    let len = reader.seek(SeekFrom::End(0)).map_err(io)?;
    reader.seek(SeekFrom::Start(0)).map_err(io)?;
    let mut head = [0u8; 4];
    let n = (len as usize).min(4);
    reader.read_exact(&mut head[..n]).map_err(io)?;
    reader.seek(SeekFrom::Start(0)).map_err(io)?;
    if head == *b"PK\x03\x04" {
        return read_zip(reader, len, path, limits);
    }
    if len >= 262 {
        let mut magic = [0u8; 5];
        reader.seek(SeekFrom::Start(257)).map_err(io)?;
        reader.read_exact(&mut magic).map_err(io)?;
        reader.seek(SeekFrom::Start(0)).map_err(io)?;
        if magic == *b"ustar" {
            return Err(FormatError::invalid(
                path,
                "a tar archive: PyTorch's oldest checkpoint format, which is not supported; \
                 load it with torch and save it again",
            ));
        }
    }
    read_legacy(reader, len, path, limits)
}

// ------------------------------------------------------------------------------------ zip

fn read_zip<R: Read + Seek>(
    reader: R,
    len: u64,
    path: &Path,
    limits: &Limits,
) -> Result<Value, FormatError> {
    let invalid = |msg: String| FormatError::invalid(path, msg);
    let mut zip = zip::ZipArchive::new(reader)
        .map_err(|e| invalid(format!("not a readable zip archive: {e}")))?;
    let pickles: Vec<String> = zip
        .file_names()
        .filter(|n| n.ends_with("/data.pkl") && n.matches('/').count() == 1)
        .map(String::from)
        .collect();
    let pkl = match pickles.as_slice() {
        [one] => one.clone(),
        [] => {
            return Err(invalid(
                "zip archive without <archive>/data.pkl: not a torch.save file".into(),
            ))
        }
        _ => {
            return Err(invalid(format!(
                "zip archive with several pickles ({}): not a torch.save file",
                pickles.join(", ")
            )))
        }
    };
    let prefix = &pkl[..pkl.len() - "data.pkl".len()];
    if zip
        .index_for_name(&format!("{prefix}constants.pkl"))
        .is_some()
    {
        return Err(invalid(
            "a TorchScript archive (torch.jit.save); load it in Python and torch.save its \
             state_dict()"
                .into(),
        ));
    }
    let big_endian = match zip.index_for_name(&format!("{prefix}byteorder")) {
        None => false,
        Some(i) => {
            let bytes = read_record(&mut zip, i, 16, len, path)?;
            match bytes.as_slice() {
                b"little" => false,
                b"big" => true,
                other => {
                    return Err(invalid(format!(
                        "byteorder record says {:?}, not \"little\" or \"big\"",
                        String::from_utf8_lossy(other)
                    )))
                }
            }
        }
    };
    let pkl_index = zip
        .index_for_name(&pkl)
        .ok_or_else(|| invalid(format!("{pkl} disappeared")))?;
    let bytes = read_record(&mut zip, pkl_index, MAX_PICKLE_RECORD, len, path)?;
    let mut src = Source::new(bytes.as_slice(), bytes.len() as u64);
    let unpickled = unpickle_from(&mut src, limits).map_err(|e| e.into_format(path, &pkl))?;

    let mut loader = Loader::new(&unpickled.tensors, &unpickled.value, len, big_endian);
    for storage in &unpickled.storages {
        let name = format!("{prefix}data/{}", storage.key);
        let index = zip.index_for_name(&name).ok_or_else(|| {
            invalid(format!(
                "storage {} is referenced but its record {name} is missing",
                storage.key
            ))
        })?;
        let needed = storage_bytes(storage, path)?;
        let data = read_record_exact(&mut zip, index, needed, storage, len, path)?;
        loader.fill(storage, &data, path, limits)?;
    }
    loader.finish(unpickled.value, path)
}

/// Read a whole zip record of at most `max` bytes.
fn read_record<R: Read + Seek>(
    zip: &mut zip::ZipArchive<R>,
    index: usize,
    max: u64,
    file_len: u64,
    path: &Path,
) -> Result<Vec<u8>, FormatError> {
    let entry = zip
        .by_index(index)
        .map_err(|e| FormatError::invalid(path, format!("zip record {index}: {e}")))?;
    let name = entry.name().to_string();
    let size = entry.size();
    if size > max {
        return Err(FormatError::invalid(
            path,
            format!("{name} claims {size} bytes, more than the {max} accepted"),
        ));
    }
    read_entry(entry, size, &name, file_len, path)
}

/// Read the first `needed` bytes of a storage record, refusing a record that holds fewer.
fn read_record_exact<R: Read + Seek>(
    zip: &mut zip::ZipArchive<R>,
    index: usize,
    needed: u64,
    storage: &StorageRef,
    file_len: u64,
    path: &Path,
) -> Result<Vec<u8>, FormatError> {
    let entry = zip
        .by_index(index)
        .map_err(|e| FormatError::invalid(path, format!("zip record {index}: {e}")))?;
    let name = entry.name().to_string();
    if entry.size() < needed {
        return Err(FormatError::invalid(
            path,
            format!(
                "storage {} ({name}) holds {} bytes but is declared as {} x {} = {needed} bytes",
                storage.key,
                entry.size(),
                storage.numel,
                storage.storage_type.class_name(),
            ),
        ));
    }
    read_entry(entry, needed, &name, file_len, path)
}

/// Read a whole zip entry and keep its first `n` bytes, after checking that the entry can
/// hold what it claims: a stored record must lie within the file, a deflated one cannot
/// expand past deflate's ratio. Reading to the end is what makes the zip reader check the
/// record's CRC, so a damaged record is an error, not wrong values.
fn read_entry<R: Read>(
    mut entry: zip::read::ZipFile<'_, R>,
    n: u64,
    name: &str,
    file_len: u64,
    path: &Path,
) -> Result<Vec<u8>, FormatError> {
    let invalid = |msg: String| FormatError::invalid(path, msg);
    let (size, compressed) = (entry.size(), entry.compressed_size());
    let bound = match entry.compression() {
        zip::CompressionMethod::Stored => compressed,
        _ => compressed
            .saturating_mul(MAX_DEFLATE_RATIO)
            .saturating_add(64),
    };
    if compressed > file_len || size > bound {
        return Err(invalid(format!(
            "{name} claims {size} bytes ({compressed} compressed) in a file of {file_len} bytes"
        )));
    }
    let mut data = Vec::with_capacity(size.min(compressed.saturating_add(64)) as usize);
    entry
        .read_to_end(&mut data)
        .map_err(|e| invalid(format!("reading {name}: {e}")))?;
    if (data.len() as u64) < n {
        return Err(invalid(format!(
            "{name} ends after {} of {n} bytes",
            data.len()
        )));
    }
    data.truncate(n as usize);
    Ok(data)
}

/// Bytes a storage occupies in the file: declared elements times element size.
fn storage_bytes(s: &StorageRef, path: &Path) -> Result<u64, FormatError> {
    s.numel
        .checked_mul(s.storage_type.element_size() as u64)
        .ok_or_else(|| {
            FormatError::invalid(
                path,
                format!("storage {} declares {} elements", s.key, s.numel),
            )
        })
}

// --------------------------------------------------------------------------------- legacy

fn read_legacy<R: Read>(
    reader: R,
    len: u64,
    path: &Path,
    limits: &Limits,
) -> Result<Value, FormatError> {
    let invalid = |msg: String| FormatError::invalid(path, msg);
    let mut src = Source::new(BufReader::new(reader), len);
    let not_torch = |why: String| {
        invalid(format!(
            "not a PyTorch checkpoint: neither a zip archive nor a legacy torch.save file \
             ({why})"
        ))
    };
    let magic = unpickle_from(&mut src, limits).map_err(|e| match e {
        PickleError::Invalid { offset, msg } => not_torch(format!("byte {offset}: {msg}")),
        e => e.into_format(path, "magic number"),
    })?;
    match &magic.value {
        Value::BigInt(b) if *b == LEGACY_MAGIC => {}
        v => {
            return Err(not_torch(format!(
                "first pickle is a {}, not torch's magic number",
                v.kind()
            )))
        }
    }
    let version =
        unpickle_from(&mut src, limits).map_err(|e| e.into_format(path, "legacy header"))?;
    match version.value {
        Value::Int(LEGACY_PROTOCOL_VERSION) => {}
        Value::Int(v) => return Err(invalid(format!("legacy protocol version {v}, not 1001"))),
        v => {
            return Err(invalid(format!(
                "legacy protocol version is a {}",
                v.kind()
            )))
        }
    }
    unpickle_from(&mut src, limits).map_err(|e| e.into_format(path, "sys_info pickle"))?;
    let unpickled =
        unpickle_from(&mut src, limits).map_err(|e| e.into_format(path, "main pickle"))?;
    let keys =
        unpickle_from(&mut src, limits).map_err(|e| e.into_format(path, "storage key list"))?;
    let keys: Vec<String> = match keys.value {
        Value::List(items) | Value::Tuple(items) => items
            .into_iter()
            .map(|k| match k {
                Value::Str(s) => Ok(s),
                Value::Int(i) => Ok(i.to_string()),
                other => Err(invalid(format!("storage key is a {}", other.kind()))),
            })
            .collect::<Result<_, _>>()?,
        other => {
            return Err(invalid(format!(
                "storage key list is a {}, not a list",
                other.kind()
            )))
        }
    };

    let declared: HashMap<&str, &StorageRef> = unpickled
        .storages
        .iter()
        .map(|s| (s.key.as_str(), s))
        .collect();
    let mut loader = Loader::new(&unpickled.tensors, &unpickled.value, len, false);
    let mut seen = std::collections::HashSet::new();
    for key in &keys {
        let storage = *declared.get(key.as_str()).ok_or_else(|| {
            invalid(format!(
                "storage {key} has data but the pickle never refers to it"
            ))
        })?;
        if !seen.insert(key.as_str()) {
            return Err(invalid(format!("storage {key} is listed twice")));
        }
        let at = src.pos();
        let count = u64::from_le_bytes(
            src.array()
                .map_err(|e| e.into_format(path, &format!("size of storage {key}")))?,
        );
        if count != storage.numel {
            return Err(invalid(format!(
                "byte {at}: storage {key} holds {count} elements in the file but the pickle \
                 declares {} x {}",
                storage.numel,
                storage.storage_type.class_name()
            )));
        }
        let nbytes = storage_bytes(storage, path)?;
        let data = src
            .bytes(nbytes)
            .map_err(|e| e.into_format(path, &format!("data of storage {key}")))?;
        loader.fill(storage, &data, path, limits)?;
    }
    loader.finish(unpickled.value, path)
}

// ----------------------------------------------------------------------------- tensors

/// Builds the tensors of one pickle as their storages' bytes arrive.
struct Loader<'u> {
    /// Tensor indices by the root storage key they read.
    by_storage: HashMap<&'u str, Vec<&'u TensorSpec>>,
    /// A name for each tensor index, for messages.
    names: HashMap<usize, String>,
    loaded: Vec<Option<Tensor>>,
    big_endian: bool,
    /// Bytes of tensor data still allowed (bounds what stride-0 views can make us allocate).
    budget: u64,
}

impl<'u> Loader<'u> {
    fn new(tensors: &'u [TensorSpec], value: &Value, file_len: u64, big_endian: bool) -> Self {
        let mut by_storage: HashMap<&str, Vec<&TensorSpec>> = HashMap::new();
        for t in tensors {
            by_storage
                .entry(t.storage.key.as_str())
                .or_default()
                .push(t);
        }
        let mut names = HashMap::new();
        walk(value, &mut String::new(), &mut |name, v| {
            if let Value::TensorRef(t) = v {
                names.entry(t.index).or_insert_with(|| name.to_string());
            }
        });
        Loader {
            by_storage,
            names,
            loaded: vec![None; tensors.len()],
            big_endian,
            budget: file_len.saturating_mul(64).max(1 << 31),
        }
    }

    fn name(&self, index: usize) -> String {
        match self.names.get(&index) {
            Some(n) => format!("tensor '{n}'"),
            None => format!("tensor #{index}"),
        }
    }

    /// Build every tensor reading `storage`, whose bytes are `data`.
    fn fill(
        &mut self,
        storage: &StorageRef,
        data: &[u8],
        path: &Path,
        limits: &Limits,
    ) -> Result<(), FormatError> {
        let Some(specs) = self.by_storage.get(storage.key.as_str()) else {
            return Ok(());
        };
        for spec in specs.clone() {
            let t = materialize(spec, data, self.big_endian, limits, &mut self.budget).map_err(
                |e| match e {
                    BuildError::Msg(m) => {
                        FormatError::invalid(path, format!("{}: {m}", self.name(spec.index)))
                    }
                    BuildError::Tensor(source) => FormatError::Tensor {
                        path: path.to_path_buf(),
                        source,
                    },
                },
            )?;
            self.loaded[spec.index] = Some(t);
        }
        Ok(())
    }

    /// Put the built tensors into the tree.
    fn finish(self, mut value: Value, path: &Path) -> Result<Value, FormatError> {
        let mut tensors = Vec::with_capacity(self.loaded.len());
        for (i, t) in self.loaded.into_iter().enumerate() {
            match t {
                Some(t) => tensors.push(t),
                None => {
                    let name = match self.names.get(&i) {
                        Some(n) => format!("tensor '{n}'"),
                        None => format!("tensor #{i}"),
                    };
                    return Err(FormatError::invalid(
                        path,
                        format!("{name}: its storage has no data in the file"),
                    ));
                }
            }
        }
        replace_refs(&mut value, &tensors);
        Ok(value)
    }
}

fn replace_refs(v: &mut Value, tensors: &[Tensor]) {
    match v {
        Value::TensorRef(spec) => {
            if let Some(t) = tensors.get(spec.index) {
                *v = Value::Tensor(t.clone());
            }
        }
        Value::Tuple(items) | Value::List(items) | Value::Set(items) => {
            items.iter_mut().for_each(|c| replace_refs(c, tensors))
        }
        Value::Dict(d) => {
            for (k, c) in &mut d.items {
                replace_refs(k, tensors);
                replace_refs(c, tensors);
            }
            if let Some(s) = &mut d.state {
                replace_refs(s, tensors);
            }
        }
        _ => {}
    }
}

enum BuildError {
    Msg(String),
    Tensor(nerve_core::Error),
}

impl From<String> for BuildError {
    fn from(m: String) -> Self {
        BuildError::Msg(m)
    }
}

/// Copy one tensor out of its storage's bytes, after checking that the view lies inside
/// the storage and the storage inside `data`.
fn materialize(
    spec: &TensorSpec,
    data: &[u8],
    big_endian: bool,
    limits: &Limits,
    budget: &mut u64,
) -> Result<Tensor, BuildError> {
    let st = spec.storage.storage_type;
    let esize = st.element_size() as u64;
    let (base, avail) = (spec.storage.base(), spec.storage.len());
    let overflow = || format!("size {:?} overflows", spec.size);
    if !crate::shape::shape_fits(spec.size.iter().copied()) {
        return Err(overflow().into());
    }
    let numel = spec
        .size
        .iter()
        .try_fold(1u64, |n, &d| n.checked_mul(d))
        .ok_or_else(overflow)?;
    if numel > avail && numel > limits.max_expanded_numel {
        return Err(format!(
            "{numel} elements from a storage of {avail}: expanded views beyond {} elements \
             are refused",
            limits.max_expanded_numel
        )
        .into());
    }
    // Size-1 dims never move the address; zeroing their stride keeps the walk overflow-free.
    let stride: Vec<u64> = spec
        .size
        .iter()
        .zip(&spec.stride)
        .map(|(&n, &s)| if n == 1 { 0 } else { s })
        .collect();
    let mut last = spec.storage_offset;
    if numel > 0 {
        for (&n, &s) in spec.size.iter().zip(&stride) {
            last = (n - 1)
                .checked_mul(s)
                .and_then(|x| last.checked_add(x))
                .ok_or_else(overflow)?;
        }
        if last >= avail {
            return Err(format!(
                "view (offset {}, size {:?}, stride {:?}) reaches element {last} of a storage \
                 holding {avail}",
                spec.storage_offset, spec.size, spec.stride
            )
            .into());
        }
        let end = base
            .checked_add(last + 1)
            .and_then(|e| e.checked_mul(esize))
            .ok_or_else(overflow)?;
        if end > data.len() as u64 {
            return Err(format!(
                "view reaches byte {end} of a storage of {} bytes",
                data.len()
            )
            .into());
        }
    }
    let out_bytes = numel.saturating_mul(st.dtype().size_in_bytes() as u64);
    if out_bytes > *budget {
        return Err(format!(
            "{numel} elements exceed what this file may expand to ({} bytes left)",
            *budget
        )
        .into());
    }
    *budget -= out_bytes;
    let walk = Walk {
        start: (base + spec.storage_offset) as usize,
        size: spec.size.iter().map(|&n| n as usize).collect(),
        stride: stride.iter().map(|&s| s as usize).collect(),
        numel: numel as usize,
        big_endian,
    };
    let dims = walk.size.clone();
    let t = match st {
        StorageType::Float => Tensor::from_vec(walk.gather(data, f32::from_le_bytes), dims),
        StorageType::Double => Tensor::from_vec(walk.gather(data, f64::from_le_bytes), dims),
        StorageType::Half => Tensor::from_vec(
            walk.gather(data, |b| f16::from_bits(u16::from_le_bytes(b))),
            dims,
        ),
        StorageType::BFloat16 => Tensor::from_vec(
            walk.gather(data, |b| bf16::from_bits(u16::from_le_bytes(b))),
            dims,
        ),
        StorageType::Long => Tensor::from_vec(walk.gather(data, i64::from_le_bytes), dims),
        StorageType::Int => {
            Tensor::from_vec(walk.gather(data, |b| i32::from_le_bytes(b) as i64), dims)
        }
        StorageType::Short => {
            Tensor::from_vec(walk.gather(data, |b| i16::from_le_bytes(b) as i64), dims)
        }
        StorageType::Char => {
            Tensor::from_vec(walk.gather(data, |b: [u8; 1]| b[0] as i8 as i64), dims)
        }
        StorageType::Byte | StorageType::Untyped => {
            Tensor::from_vec(walk.gather(data, |b: [u8; 1]| b[0] as i64), dims)
        }
        StorageType::Bool => {
            Tensor::from_vec(walk.gather(data, |b: [u8; 1]| (b[0] != 0) as u8), dims)
        }
    };
    t.map_err(BuildError::Tensor)
}

/// The element walk of a strided view whose extent has been checked against the data.
struct Walk {
    start: usize,
    size: Vec<usize>,
    stride: Vec<usize>,
    numel: usize,
    big_endian: bool,
}

impl Walk {
    fn is_contiguous(&self) -> bool {
        let mut expected = 1;
        for (&n, &s) in self.size.iter().zip(&self.stride).rev() {
            if n != 1 && s != expected {
                return false;
            }
            expected *= n;
        }
        true
    }

    /// Decode the view's elements in row-major order; `f` reads one little-endian element.
    fn gather<T, const N: usize>(&self, data: &[u8], f: impl Fn([u8; N]) -> T) -> Vec<T> {
        let load = |c: &[u8]| {
            let mut a = [0u8; N];
            a.copy_from_slice(c);
            if self.big_endian {
                a.reverse();
            }
            f(a)
        };
        if self.numel == 0 {
            // An empty tensor reads nothing; its offset was never checked against the data.
            return Vec::new();
        }
        if self.is_contiguous() {
            let bytes = &data[self.start * N..(self.start + self.numel) * N];
            return bytes.chunks_exact(N).map(load).collect();
        }
        let rank = self.size.len();
        let mut out = Vec::with_capacity(self.numel);
        let mut idx = vec![0usize; rank];
        let mut off = self.start;
        for _ in 0..self.numel {
            out.push(load(&data[off * N..off * N + N]));
            for d in (0..rank).rev() {
                idx[d] += 1;
                off += self.stride[d];
                if idx[d] < self.size[d] {
                    break;
                }
                off -= self.stride[d] * self.size[d];
                idx[d] = 0;
            }
        }
        out
    }
}
