//! Products through the `gemm` crate on raw row-major matrices, for kernels whose operands
//! are not packed once (convolutions, attention).

use candle_core::WithDType;
use gemm::Parallelism;

/// A row-major matrix view for [`matmul`]: pointer, row stride, column stride.
pub type MatRef<T> = (*const T, usize, usize);

/// `dst[m×n] (+)= lhs[m×k] · rhs[k×n]`; `dst` is row-major and contiguous.
///
/// # Safety
/// The pointers must cover the matrices their strides describe.
#[allow(clippy::too_many_arguments)]
pub unsafe fn matmul<T: WithDType>(
    (m, n, k): (usize, usize, usize),
    dst: *mut T,
    accumulate: bool,
    lhs: MatRef<T>,
    rhs: MatRef<T>,
    parallelism: Parallelism,
) {
    unsafe { matmul_into_rows((m, n, k), (dst, n), accumulate, lhs, rhs, parallelism) }
}

/// [`matmul`] into a row-major `dst` whose rows start `dst.1` elements apart.
///
/// # Safety
/// The pointers must cover the matrices their strides describe.
#[allow(clippy::too_many_arguments)]
pub unsafe fn matmul_into_rows<T: WithDType>(
    (m, n, k): (usize, usize, usize),
    (dst, dst_row_stride): (*mut T, usize),
    accumulate: bool,
    lhs: MatRef<T>,
    rhs: MatRef<T>,
    parallelism: Parallelism,
) {
    let one = T::from_f64(1.0);
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_row_stride as isize,
            accumulate,
            lhs.0,
            lhs.2 as isize,
            lhs.1 as isize,
            rhs.0,
            rhs.2 as isize,
            rhs.1 as isize,
            one,
            one,
            false,
            false,
            false,
            parallelism,
        )
    }
}

/// GEMM threading inside one of `tasks` parallel tasks: `gemm`'s own threads when there are
/// fewer tasks than threads.
pub fn inner_parallelism(tasks: usize) -> Parallelism {
    let threads = rayon::current_num_threads();
    if tasks < threads {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    }
}
