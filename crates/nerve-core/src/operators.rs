//! `std::ops` for tensors: `&a + &b`, `&a * 2.0`, `-&a`. These panic on a shape or dtype
//! mismatch (with the same message the named methods return as an error); use the methods
//! (`add`, `mul`, ...) to handle errors.

use std::ops::{Add, Div, Mul, Neg, Sub};

use crate::Tensor;

macro_rules! bin_op {
    ($trait:ident, $fn:ident, $method:ident, $scalar:ident) => {
        impl $trait<&Tensor> for &Tensor {
            type Output = Tensor;
            fn $fn(self, rhs: &Tensor) -> Tensor {
                self.$method(rhs).unwrap_or_else(|e| panic!("{e}"))
            }
        }
        impl $trait<Tensor> for Tensor {
            type Output = Tensor;
            fn $fn(self, rhs: Tensor) -> Tensor {
                $trait::$fn(&self, &rhs)
            }
        }
        impl $trait<&Tensor> for Tensor {
            type Output = Tensor;
            fn $fn(self, rhs: &Tensor) -> Tensor {
                $trait::$fn(&self, rhs)
            }
        }
        impl $trait<f64> for &Tensor {
            type Output = Tensor;
            fn $fn(self, rhs: f64) -> Tensor {
                self.$scalar(rhs).unwrap_or_else(|e| panic!("{e}"))
            }
        }
        impl $trait<f64> for Tensor {
            type Output = Tensor;
            fn $fn(self, rhs: f64) -> Tensor {
                $trait::$fn(&self, rhs)
            }
        }
    };
}

bin_op!(Add, add, add, add_scalar);
bin_op!(Sub, sub, sub, sub_scalar);
bin_op!(Mul, mul, mul, mul_scalar);
bin_op!(Div, div, div, div_scalar);

impl Neg for &Tensor {
    type Output = Tensor;
    fn neg(self) -> Tensor {
        Tensor::neg(self).unwrap_or_else(|e| panic!("{e}"))
    }
}

impl Neg for Tensor {
    type Output = Tensor;
    fn neg(self) -> Tensor {
        -&self
    }
}
