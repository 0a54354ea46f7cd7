//! Temporary naive GEMM (replaced by the blocked SIMD implementation).
#![allow(missing_docs, clippy::too_many_arguments, clippy::missing_safety_doc)]
macro_rules! naive {
    ($name:ident, $t:ty) => {
        pub unsafe fn $name(
            m: usize,
            n: usize,
            k: usize,
            alpha: $t,
            a: *const $t,
            rsa: isize,
            csa: isize,
            b: *const $t,
            rsb: isize,
            csb: isize,
            beta: $t,
            c: *mut $t,
            rsc: isize,
            csc: isize,
            _parallel: bool,
        ) {
            for i in 0..m {
                for j in 0..n {
                    let mut s: $t = 0.0;
                    for p in 0..k {
                        s += *a.offset(i as isize * rsa + p as isize * csa)
                            * *b.offset(p as isize * rsb + j as isize * csb);
                    }
                    let cp = c.offset(i as isize * rsc + j as isize * csc);
                    *cp = if beta == 0.0 {
                        alpha * s
                    } else {
                        alpha * s + beta * *cp
                    };
                }
            }
        }
    };
}
naive!(sgemm, f32);
naive!(dgemm, f64);
pub fn sgemm_kernel_name() -> &'static str {
    "naive"
}
