//! Helpers shared by the engine's own CPU kernels (`conv`, `channel`).

use candle_core::{Layout, Result, WithDType, bail};

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
