//! Storage: the flat, shared buffer behind one or more tensor views.

use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use half::{bf16, f16};

use crate::dtype::{DType, Element};

/// A CPU buffer of one dtype.
#[derive(Clone, Debug)]
pub enum CpuStorage {
    /// f32 elements.
    F32(Vec<f32>),
    /// f64 elements.
    F64(Vec<f64>),
    /// f16 elements.
    F16(Vec<f16>),
    /// bf16 elements.
    BF16(Vec<bf16>),
    /// i64 elements.
    I64(Vec<i64>),
    /// bool elements, one byte each.
    Bool(Vec<u8>),
}

impl CpuStorage {
    /// The dtype of the buffer.
    pub fn dtype(&self) -> DType {
        match self {
            CpuStorage::F32(_) => DType::F32,
            CpuStorage::F64(_) => DType::F64,
            CpuStorage::F16(_) => DType::F16,
            CpuStorage::BF16(_) => DType::BF16,
            CpuStorage::I64(_) => DType::I64,
            CpuStorage::Bool(_) => DType::Bool,
        }
    }
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            CpuStorage::F32(v) => v.len(),
            CpuStorage::F64(v) => v.len(),
            CpuStorage::F16(v) => v.len(),
            CpuStorage::BF16(v) => v.len(),
            CpuStorage::I64(v) => v.len(),
            CpuStorage::Bool(v) => v.len(),
        }
    }
    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Element `i` as f64.
    pub fn get_f64(&self, i: usize) -> f64 {
        match self {
            CpuStorage::F32(v) => v[i] as f64,
            CpuStorage::F64(v) => v[i],
            CpuStorage::F16(v) => v[i].to_f64(),
            CpuStorage::BF16(v) => v[i].to_f64(),
            CpuStorage::I64(v) => v[i] as f64,
            CpuStorage::Bool(v) => v[i] as f64,
        }
    }
    /// `n` elements equal to `value` converted to `dtype`.
    pub fn full(n: usize, value: f64, dtype: DType) -> CpuStorage {
        match dtype {
            DType::F32 => CpuStorage::F32(vec![value as f32; n]),
            DType::F64 => CpuStorage::F64(vec![value; n]),
            DType::F16 => CpuStorage::F16(vec![f16::from_f64(value); n]),
            DType::BF16 => CpuStorage::BF16(vec![bf16::from_f64(value); n]),
            DType::I64 => CpuStorage::I64(vec![value as i64; n]),
            DType::Bool => CpuStorage::Bool(vec![(value != 0.0) as u8; n]),
        }
    }
    /// Borrow as a typed slice.
    pub fn as_slice<T: Element>(&self) -> Option<&[T]> {
        T::slice(self)
    }
}

/// Live-storage accounting, used to prove that training does not leak.
static LIVE_BYTES: std::sync::atomic::AtomicIsize = std::sync::atomic::AtomicIsize::new(0);

/// Bytes held by all live tensor storages of the process.
pub fn live_storage_bytes() -> isize {
    LIVE_BYTES.load(std::sync::atomic::Ordering::Relaxed)
}

/// Shared, lockable storage. Views share it through an `Arc`; in-place updates (optimizers)
/// take the write lock.
#[derive(Debug)]
pub struct Storage {
    data: RwLock<CpuStorage>,
    bytes: usize,
}

impl Storage {
    pub(crate) fn new(data: CpuStorage) -> Self {
        let bytes = data.len() * data.dtype().size_in_bytes();
        LIVE_BYTES.fetch_add(bytes as isize, std::sync::atomic::Ordering::Relaxed);
        Storage {
            data: RwLock::new(data),
            bytes,
        }
    }
    /// Read access to the buffer.
    pub fn read(&self) -> RwLockReadGuard<'_, CpuStorage> {
        self.data.read().unwrap_or_else(|e| e.into_inner())
    }
    /// Write access to the buffer.
    pub fn write(&self) -> RwLockWriteGuard<'_, CpuStorage> {
        self.data.write().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Storage {
    fn drop(&mut self) {
        LIVE_BYTES.fetch_sub(self.bytes as isize, std::sync::atomic::Ordering::Relaxed);
    }
}
