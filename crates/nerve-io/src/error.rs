//! The error every reader returns.

use std::path::PathBuf;

/// What can go wrong reading a checkpoint file.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    /// The file could not be opened or read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is damaged, truncated, hostile or of a kind this reader does not handle.
    #[error("{path}: {msg}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong, in words.
        msg: String,
    },
    /// A tensor could not be built from the file's data.
    #[error("{path}: {source}")]
    Tensor {
        /// The file.
        path: PathBuf,
        /// The error.
        source: nerve_core::Error,
    },
}

impl FormatError {
    /// An [`FormatError::Invalid`] for `path`.
    pub fn invalid(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        FormatError::Invalid {
            path: path.into(),
            msg: msg.into(),
        }
    }
}
