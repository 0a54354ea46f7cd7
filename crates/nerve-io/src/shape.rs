//! Checks on the tensor shapes that files declare.

/// The largest element count a declared shape may describe: PyTorch and ggml store sizes as
/// `i64`.
pub(crate) const MAX_NUMEL: u64 = i64::MAX as u64;

/// Whether a tensor of shape `dims` can be described in memory: the product of its non-zero
/// dimensions is at most [`MAX_NUMEL`]. Zero dimensions are skipped because they make the
/// element count 0 without making the shape safe to use: `[0, 2^40, 2^40]` holds nothing,
/// but its row-major strides (2^80 for the first dimension) and any running product that
/// meets the zero last overflow.
pub(crate) fn shape_fits(dims: impl IntoIterator<Item = u64>) -> bool {
    dims.into_iter()
        .filter(|&d| d != 0)
        .try_fold(1u64, |acc, d| acc.checked_mul(d))
        .is_some_and(|n| n <= MAX_NUMEL)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_dimensions_do_not_hide_an_overflowing_shape() {
        assert!(shape_fits([]));
        assert!(shape_fits([0, 3, 4]));
        assert!(shape_fits([1 << 31, 1 << 31, 0]));
        assert!(!shape_fits([0, 1 << 32, 1 << 32]));
        assert!(!shape_fits([1 << 40, 0, 1 << 40]));
        assert!(!shape_fits([u64::MAX]));
        assert!(shape_fits([MAX_NUMEL]));
    }
}
