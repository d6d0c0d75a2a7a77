//! The QuickGELU op on the CPU: one parallel, vectorised pass forward and one backward.
//! `nn::quick_gelu` decides when it runs.

use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;

use super::{ELEMENTS_PER_TASK, Real, contiguous, sigmoid, with_cpu_slice, with_floats};

/// The slope inside the sigmoid.
pub(crate) const SLOPE: f64 = 1.702;

pub(crate) struct FusedQuickGelu;

impl CustomOp1 for FusedQuickGelu {
    fn name(&self) -> &'static str {
        "fused-quick-gelu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = with_floats!((s), |x| forward(contiguous(x, l)?));
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _out: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let grad = grad.contiguous()?;
        let dx = match x.dtype() {
            DType::F32 => backward_tensor::<f32>(x, &grad)?,
            DType::F64 => backward_tensor::<f64>(x, &grad)?,
            other => bail!("the fused QuickGELU has no {other:?} backward"),
        };
        Ok(Some(dx))
    }
}

fn forward<T: Real>(x: &[T]) -> Vec<T> {
    let mut y = vec![T::zero(); x.len()];
    y.par_chunks_mut(ELEMENTS_PER_TASK)
        .zip(x.par_chunks(ELEMENTS_PER_TASK))
        .for_each(|(y, x)| pulp::Arch::new().dispatch(ForwardRows { x, y }));
    y
}

/// `y = x · σ(a·x)` over a run of elements, compiled for the best instruction set the CPU
/// has: the sigmoid's exp vectorises there (the library's `exp` took a twentieth of SD's text
/// encoder).
struct ForwardRows<'a, T> {
    x: &'a [T],
    y: &'a mut [T],
}

impl<T: Real> pulp::WithSimd for ForwardRows<'_, T> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) {
        let slope = T::from_f64(SLOPE);
        for (y, &x) in self.y.iter_mut().zip(self.x) {
            *y = x * sigmoid(slope * x);
        }
    }
}

/// `dx = dy · (s + a·x·s·(1 − s))` with `s = σ(a·x)`.
fn backward_tensor<T: Real>(x: &Tensor, grad: &Tensor) -> Result<Tensor> {
    let dx = with_cpu_slice::<T, _>(x, |x| {
        with_cpu_slice::<T, _>(grad, |dy| {
            let mut dx = vec![T::zero(); x.len()];
            dx.par_chunks_mut(ELEMENTS_PER_TASK)
                .zip(x.par_chunks(ELEMENTS_PER_TASK))
                .zip(dy.par_chunks(ELEMENTS_PER_TASK))
                .for_each(|((dx, x), dy)| pulp::Arch::new().dispatch(BackwardRows { x, dy, dx }));
            Ok(dx)
        })
    })?;
    Tensor::from_vec(dx, x.shape(), &Device::Cpu)
}

/// The backward over a run of elements, as [`ForwardRows`].
struct BackwardRows<'a, T> {
    x: &'a [T],
    dy: &'a [T],
    dx: &'a mut [T],
}

impl<T: Real> pulp::WithSimd for BackwardRows<'_, T> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) {
        let slope = T::from_f64(SLOPE);
        for ((dx, &x), &dy) in self.dx.iter_mut().zip(self.x).zip(self.dy) {
            let s = sigmoid(slope * x);
            *dx = dy * (s + slope * x * s * (T::one() - s));
        }
    }
}
