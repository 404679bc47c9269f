//! The one matrix product the kernels call: `gemm` on strided operands.

/// A `(rows, cols)` matrix operand: where it starts and its row and column strides.
#[derive(Debug, Clone, Copy)]
pub struct Matrix {
    ptr: *const f32,
    row_stride: isize,
    col_stride: isize,
}

impl Matrix {
    /// A row-major matrix whose rows are `row_stride` elements apart.
    pub fn rows(ptr: *const f32, row_stride: usize) -> Self {
        Self {
            ptr,
            row_stride: row_stride as isize,
            col_stride: 1,
        }
    }

    /// The transpose of a row-major matrix whose rows are `row_stride` elements apart.
    pub fn transposed(ptr: *const f32, row_stride: usize) -> Self {
        Self {
            ptr,
            row_stride: 1,
            col_stride: row_stride as isize,
        }
    }
}

/// `dst (m×n, row-major, rows dst_rs apart) = [dst +] scale · lhs (m×k) · rhs (k×n)`, on
/// `threads` threads (1: the calling thread only).
///
/// # Safety
/// `lhs` must be valid for `m×k`, `rhs` for `k×n` and `dst` for `m×n` elements at their strides,
/// and `dst` must not overlap the others.
#[allow(clippy::too_many_arguments)]
pub unsafe fn product(
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    (m, n, k): (usize, usize, usize),
    lhs: Matrix,
    rhs: Matrix,
    scale: f32,
    threads: usize,
) {
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: forwarded from the caller.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_rs as isize,
            accumulate,
            lhs.ptr,
            lhs.col_stride,
            lhs.row_stride,
            rhs.ptr,
            rhs.col_stride,
            rhs.row_stride,
            1.0,
            scale,
            false,
            false,
            false,
            parallelism,
        )
    }
}
