//! Errors: every failure names the op and the shapes or dtypes involved.

use crate::DType;

/// The error type of nerve-core.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Two shapes that must agree (or broadcast) do not.
    #[error("{op}: shape mismatch between {lhs:?} and {rhs:?}")]
    ShapeMismatch {
        /// The op that failed.
        op: &'static str,
        /// The first shape.
        lhs: Vec<usize>,
        /// The second shape.
        rhs: Vec<usize>,
    },
    /// A shape is invalid for the op (wrong rank, zero size, bad reshape, ...).
    #[error("{op}: {msg} (shape {shape:?})")]
    BadShape {
        /// The op that failed.
        op: &'static str,
        /// The shape involved.
        shape: Vec<usize>,
        /// What is wrong.
        msg: String,
    },
    /// A dimension index is out of range for the tensor's rank.
    #[error("{op}: dimension {dim} out of range for a tensor of rank {rank}")]
    DimOutOfRange {
        /// The op that failed.
        op: &'static str,
        /// The requested dimension (may be negative).
        dim: isize,
        /// The rank of the tensor.
        rank: usize,
    },
    /// Two dtypes that must agree do not.
    #[error("{op}: dtype mismatch between {lhs:?} and {rhs:?}")]
    DTypeMismatch {
        /// The op that failed.
        op: &'static str,
        /// The first dtype.
        lhs: DType,
        /// The second dtype.
        rhs: DType,
    },
    /// The op is not implemented for this dtype.
    #[error("{op}: not supported for dtype {dtype:?}{hint}")]
    UnsupportedDType {
        /// The op that failed.
        op: &'static str,
        /// The dtype given.
        dtype: DType,
        /// Extra advice, may be empty.
        hint: &'static str,
    },
    /// An index (gather, index_select, embedding, one_hot, ...) is out of range.
    #[error("{op}: index {index} out of range for size {size}")]
    IndexOutOfRange {
        /// The op that failed.
        op: &'static str,
        /// The offending index.
        index: i64,
        /// The size of the indexed dimension.
        size: usize,
    },
    /// Autodiff misuse: backward on a non-scalar without a gradient, a freed graph, ...
    #[error("backward: {0}")]
    Autograd(String),
    /// Any other invalid argument.
    #[error("{op}: {msg}")]
    InvalidArgument {
        /// The op that failed.
        op: &'static str,
        /// What is wrong.
        msg: String,
    },
}

/// nerve-core's result type.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// A shape mismatch between two operands of `op`.
    pub fn shape_mismatch(op: &'static str, lhs: &[usize], rhs: &[usize]) -> Self {
        Error::ShapeMismatch {
            op,
            lhs: lhs.to_vec(),
            rhs: rhs.to_vec(),
        }
    }
    /// An operand of `op` whose shape is unusable, and why.
    pub fn bad_shape(op: &'static str, shape: &[usize], msg: impl Into<String>) -> Self {
        Error::BadShape {
            op,
            shape: shape.to_vec(),
            msg: msg.into(),
        }
    }
    /// An invalid argument to `op`, and why.
    pub fn invalid(op: &'static str, msg: impl Into<String>) -> Self {
        Error::InvalidArgument {
            op,
            msg: msg.into(),
        }
    }
    pub(crate) fn unsupported(op: &'static str, dtype: DType) -> Self {
        let hint = match dtype {
            DType::F16 | DType::BF16 => {
                ": half types are for storage; convert with .to_dtype(DType::F32) to compute"
            }
            _ => "",
        };
        Error::UnsupportedDType { op, dtype, hint }
    }
}
