//! The error type of nerve-data: every failure names the file (and where in it) or the argument.

use std::path::{Path, PathBuf};

/// The error type of nerve-data.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// Reading (or decompressing) a file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying I/O error.
        source: std::io::Error,
    },
    /// A file is not in the expected format (bad magic, wrong length, bad label, ...).
    #[error("{}: {msg}", path.display())]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        msg: String,
    },
    /// A value in a text file could not be used.
    #[error("{}:{line}:{column}: {msg}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// The line, counting from 1.
        line: usize,
        /// The column (field), counting from 1.
        column: usize,
        /// What is wrong.
        msg: String,
    },
    /// None of the candidate file names exist in a directory.
    #[error("{}: none of {} found", dir.display(), tried.join(", "))]
    NotFound {
        /// The directory searched.
        dir: PathBuf,
        /// The file names tried.
        tried: Vec<String>,
    },
    /// An invalid argument (index out of range, inconsistent sizes, ...).
    #[error("{0}")]
    Invalid(String),
    /// The background prefetch thread died without reporting an error.
    #[error("data loader: the prefetch thread stopped unexpectedly")]
    Worker,
    /// An error from nerve-core (building a tensor).
    #[error(transparent)]
    Core(#[from] nerve_core::Error),
}

/// nerve-data's result type.
pub type Result<T> = std::result::Result<T, DataError>;

impl DataError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        DataError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    pub(crate) fn format(path: &Path, msg: impl Into<String>) -> Self {
        DataError::Format {
            path: path.to_path_buf(),
            msg: msg.into(),
        }
    }

    pub(crate) fn parse(path: &Path, line: usize, column: usize, msg: impl Into<String>) -> Self {
        DataError::Parse {
            path: path.to_path_buf(),
            line,
            column,
            msg: msg.into(),
        }
    }
}

/// Decompress `bytes` if they start with the gzip magic bytes; `path` names them in errors.
pub(crate) fn decode_maybe_gz(bytes: Vec<u8>, path: &Path) -> Result<Vec<u8>> {
    use std::io::Read;
    if !bytes.starts_with(&[0x1f, 0x8b]) {
        return Ok(bytes);
    }
    let mut out = Vec::with_capacity(bytes.len() * 4);
    flate2::read::GzDecoder::new(bytes.as_slice())
        .read_to_end(&mut out)
        .map_err(|e| DataError::io(path, e))?;
    Ok(out)
}
