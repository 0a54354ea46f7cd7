//! Checkpoints as safetensors files, with PyTorch `state_dict` names: a model saved here loads
//! in PyTorch with `model.load_state_dict(safetensors.torch.load_file(path))`, and the other
//! way round. Files are written atomically (a temporary file, then a rename), so a crash never
//! leaves a half-written checkpoint; a bad file is reported with its path and what is wrong,
//! and a model is only changed once the whole file has been checked.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use nerve_core::{DType, Tensor};
use safetensors::{Dtype, View};

use crate::module::{Module, ModuleExt, StateDictError};
use crate::optim::Optimizer;

/// What can go wrong reading or writing a checkpoint.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// The file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is not a valid safetensors file, or holds a dtype nerve cannot use.
    #[error("{path}: not a valid safetensors checkpoint: {msg}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// The file's tensors do not fit the model.
    #[error("{path}: {source}")]
    Mismatch {
        /// The file.
        path: PathBuf,
        /// Missing, unexpected and mis-shaped names.
        source: StateDictError,
    },
    /// A tensor operation failed (e.g. optimizer state of the wrong shape).
    #[error("{path}: {source}")]
    Tensor {
        /// The file.
        path: PathBuf,
        /// The error.
        source: nerve_core::Error,
    },
}

/// Named tensors read from a file.
pub type Tensors = HashMap<String, Tensor>;
/// A file's string metadata.
pub type Metadata = HashMap<String, String>;

/// A tensor's bytes for safetensors.
struct Raw {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl View for &Raw {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

fn to_raw(t: &Tensor) -> nerve_core::Result<Raw> {
    let (dtype, data): (Dtype, Vec<u8>) = match t.dtype() {
        DType::F32 => (
            Dtype::F32,
            t.to_vec::<f32>()?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        ),
        DType::F64 => (
            Dtype::F64,
            t.to_vec::<f64>()?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        ),
        DType::F16 => (
            Dtype::F16,
            t.to_vec::<f16>()?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        ),
        DType::BF16 => (
            Dtype::BF16,
            t.to_vec::<bf16>()?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        ),
        DType::I64 => (
            Dtype::I64,
            t.to_vec::<i64>()?
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect(),
        ),
        DType::Bool => (Dtype::BOOL, t.to_vec::<u8>()?),
    };
    Ok(Raw {
        dtype,
        shape: t.dims().to_vec(),
        data,
    })
}

/// Write named tensors (and string metadata) to a safetensors file, atomically.
pub fn save_safetensors(
    path: impl AsRef<Path>,
    tensors: &[(String, Tensor)],
    metadata: &HashMap<String, String>,
) -> Result<(), CheckpointError> {
    let path = path.as_ref();
    let raws: Vec<(String, Raw)> = tensors
        .iter()
        .map(|(n, t)| Ok((n.clone(), to_raw(t)?)))
        .collect::<nerve_core::Result<_>>()
        .map_err(|source| CheckpointError::Tensor {
            path: path.into(),
            source,
        })?;
    let meta = (!metadata.is_empty()).then(|| metadata.clone());
    let bytes =
        safetensors::serialize(raws.iter().map(|(n, r)| (n.as_str(), r)), &meta).map_err(|e| {
            CheckpointError::Format {
                path: path.into(),
                msg: e.to_string(),
            }
        })?;
    write_atomic(path, &bytes)
}

/// Write `bytes` to `path` through a temporary file in the same folder and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), CheckpointError> {
    let io = |source| CheckpointError::Io {
        path: path.into(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".tmp{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let result = (|| {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        // Make the rename itself durable (best effort: not every platform can sync a folder).
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io)
}

/// Read every tensor of a safetensors file, with its metadata (the reader of
/// [`nerve_io::safetensors`]).
pub fn load_safetensors(path: impl AsRef<Path>) -> Result<(Tensors, Metadata), CheckpointError> {
    let path = path.as_ref();
    let (tensors, meta) = nerve_io::safetensors::load(path).map_err(|e| match e {
        nerve_io::FormatError::Io { path, source } => CheckpointError::Io { path, source },
        other => CheckpointError::Format {
            path: path.into(),
            msg: other.to_string(),
        },
    })?;
    Ok((tensors.into_iter().collect(), meta))
}

/// Save a model's `state_dict` (parameters and buffers) to a safetensors file.
pub fn save_model(
    model: &dyn Module,
    path: impl AsRef<Path>,
    metadata: &HashMap<String, String>,
) -> Result<(), CheckpointError> {
    save_safetensors(path, &model.state_dict(), metadata)
}

/// Load a safetensors file into a model: every name must match and every shape fit, else
/// nothing is changed. Returns the file's metadata.
pub fn load_model(
    model: &dyn Module,
    path: impl AsRef<Path>,
) -> Result<HashMap<String, String>, CheckpointError> {
    let path = path.as_ref();
    let (tensors, meta) = load_safetensors(path)?;
    model
        .load_state_dict(&tensors, true)
        .map_err(|source| CheckpointError::Mismatch {
            path: path.into(),
            source,
        })?;
    Ok(meta)
}

/// Save an optimizer's state (and learning rate, plus any `metadata`) to a safetensors file.
pub fn save_optimizer(
    opt: &dyn Optimizer,
    path: impl AsRef<Path>,
    metadata: &HashMap<String, String>,
) -> Result<(), CheckpointError> {
    let mut meta = metadata.clone();
    meta.insert("lr".to_string(), opt.lr().to_string());
    save_safetensors(path, &opt.state_dict(), &meta)
}

/// Restore an optimizer's state and learning rate from a safetensors file; returns the file's
/// metadata. State of another optimizer or model is an error and changes nothing.
pub fn load_optimizer(
    opt: &mut dyn Optimizer,
    path: impl AsRef<Path>,
) -> Result<HashMap<String, String>, CheckpointError> {
    let path = path.as_ref();
    let (tensors, meta) = load_safetensors(path)?;
    opt.load_state_dict(&tensors)
        .map_err(|source| CheckpointError::Tensor {
            path: path.into(),
            source,
        })?;
    if let Some(lr) = meta.get("lr").and_then(|v| v.parse().ok()) {
        opt.set_lr(lr);
    }
    Ok(meta)
}
