//! Helpers shared by the engine's own CPU kernels (`conv`, `channel`, `linear`).

use candle_core::{Layout, Result, WithDType, bail};
use gemm::Parallelism;

/// The slice a contiguous layout covers; the kernels are only handed contiguous tensors.
pub fn contiguous<'a, T: WithDType>(data: &'a [T], layout: &Layout) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => bail!("the engine's CPU kernels take contiguous tensors"),
    }
}

/// Evaluates `$body` (a `Vec` of results) with the idents bound to the storages' slices when
/// all are f32 or all f64, and wraps it back into a `CpuStorage` of that dtype.
macro_rules! with_floats {
    (($($s:expr),+), |$($a:ident),+| $body:expr) => {
        match ($($s),+) {
            ($(candle_core::CpuStorage::F32($a)),+) => candle_core::CpuStorage::F32($body),
            ($(candle_core::CpuStorage::F64($a)),+) => candle_core::CpuStorage::F64($body),
            _ => candle_core::bail!("the engine's CPU kernels take f32 or f64 tensors of one dtype"),
        }
    };
}
pub(crate) use with_floats;

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
    let one = T::from_f64(1.0);
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            n as isize,
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
