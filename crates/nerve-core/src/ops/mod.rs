//! Tensor ops, one family per file: the public method, its derivative and its dispatch to the
//! kernels side by side.

pub mod binary;
pub mod conv;
pub mod index;
pub mod matmul;
pub mod norm;
pub mod random;
pub mod reduce;
pub mod shape;
pub mod unary;

/// Run `$body` with `$T` bound to the Rust type of a float dtype (f32 or f64); any other dtype
/// is an `UnsupportedDType` error naming `$op`.
macro_rules! float_dispatch {
    ($op:expr, $dtype:expr, $T:ident => $body:expr) => {
        match $dtype {
            $crate::DType::F32 => {
                #[allow(dead_code)]
                type $T = f32;
                $body
            }
            $crate::DType::F64 => {
                #[allow(dead_code)]
                type $T = f64;
                $body
            }
            dt => return Err($crate::Error::unsupported($op, dt)),
        }
    };
}
pub(crate) use float_dispatch;

/// Every dtype.
macro_rules! any_dispatch {
    ($dtype:expr, $T:ident => $body:expr) => {
        match $dtype {
            $crate::DType::F32 => {
                type $T = f32;
                $body
            }
            $crate::DType::F64 => {
                type $T = f64;
                $body
            }
            $crate::DType::F16 => {
                type $T = half::f16;
                $body
            }
            $crate::DType::BF16 => {
                type $T = half::bf16;
                $body
            }
            $crate::DType::I64 => {
                type $T = i64;
                $body
            }
            $crate::DType::Bool => {
                type $T = u8;
                $body
            }
        }
    };
}
pub(crate) use any_dispatch;
