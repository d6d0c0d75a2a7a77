//! QuickGELU, CLIP's activation: `x · σ(1.702 x)`.
//!
//! On the CPU in f32 / f64 one op computes it in one parallel, vectorised pass (the same
//! values to rounding), and its backward is one pass too. Composed from candle ops it is three
//! passes on the calling thread: on SD's text encoder that took a quarter of the forward pass.
//! Other devices compose candle ops.

use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;

use super::cpu_kernels::{
    ELEMENTS_PER_TASK, Real, contiguous, sigmoid, with_cpu_slice, with_floats,
};

/// The slope inside the sigmoid.
const SLOPE: f64 = 1.702;

/// `x · σ(1.702 x)`, element-wise.
pub fn quick_gelu(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64) {
        return x.contiguous()?.apply_op1(FusedQuickGelu);
    }
    composed(x)
}

/// From candle ops, for devices without the fused op.
fn composed(x: &Tensor) -> Result<Tensor> {
    x * candle_nn::ops::sigmoid(&(x * SLOPE)?)?
}

struct FusedQuickGelu;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::cpu_kernels::projected_grads;
    use crate::engine::noise::NoiseStream;
    use candle_core::Var;

    /// The value and gradient of `quick_gelu` (fused) and `composed` at `x`.
    fn value_and_grad(
        f: fn(&Tensor) -> Result<Tensor>,
        x: &Tensor,
        upstream: &Tensor,
    ) -> [Tensor; 2] {
        let x = Var::from_tensor(x).unwrap();
        let y = f(x.as_tensor()).unwrap();
        let grads = projected_grads(&y, upstream);
        [y, grads.get(x.as_tensor()).unwrap().clone()]
    }

    /// The fused op gives the composed ops' output and gradient to rounding, in f64 and f32,
    /// over both signs and the tails, on a length that is no multiple of a task.
    #[test]
    fn fused_quick_gelu_matches_composed_ops() {
        let mut rng = NoiseStream::new(5);
        let dev = Device::Cpu;
        let len = ELEMENTS_PER_TASK + 37;
        let x = (rng.tensor(len, &dev).unwrap() * 6.0).unwrap();
        let upstream = rng.tensor(len, &dev).unwrap();
        for (dtype, tolerance) in [(DType::F64, 1e-14), (DType::F32, 1e-6)] {
            let (x, upstream) = (
                x.to_dtype(dtype).unwrap(),
                upstream.to_dtype(dtype).unwrap(),
            );
            let [y, dx] = value_and_grad(quick_gelu, &x, &upstream);
            let [y_ref, dx_ref] = value_and_grad(composed, &x, &upstream);
            let diff = crate::parity::relative_l2(&y, &y_ref).unwrap();
            assert!(diff < tolerance, "{dtype:?}: y differs by {diff:e}");
            let diff = crate::parity::relative_l2(&dx, &dx_ref).unwrap();
            assert!(diff < tolerance, "{dtype:?}: dx differs by {diff:e}");
        }
    }

    /// The f64 backward matches central differences of the forward at points of both signs.
    #[test]
    fn fused_quick_gelu_gradient_matches_finite_differences() {
        let dev = Device::Cpu;
        let values: Vec<f64> = (-12..=12).map(|i| i as f64 * 0.45 + 0.01).collect();
        let x = Tensor::new(values.as_slice(), &dev).unwrap();
        let ones = x.ones_like().unwrap();
        let [_, analytic] = value_and_grad(quick_gelu, &x, &ones);
        let analytic: Vec<f64> = analytic.to_vec1().unwrap();
        let eps = 1e-6;
        for (&v, analytic) in values.iter().zip(analytic) {
            let at = |v: f64| {
                let t = Tensor::new(&[v], &dev).unwrap();
                quick_gelu(&t).unwrap().to_vec1::<f64>().unwrap()[0]
            };
            let numeric = (at(v + eps) - at(v - eps)) / (2.0 * eps);
            assert!(
                (numeric - analytic).abs() < 1e-8 * (1.0 + numeric.abs()),
                "x = {v}: analytic {analytic}, numeric {numeric}"
            );
        }
    }
}
