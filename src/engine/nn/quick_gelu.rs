//! QuickGELU, CLIP's activation: `x · σ(1.702 x)`.
//!
//! On the CPU in f32 / f64 one op computes it in one parallel, vectorised pass (the same
//! values to rounding), and its backward is one pass too. Composed from candle ops it is three
//! passes on the calling thread: on SD's text encoder that took a quarter of the forward pass.
//! Other devices compose candle ops.

use candle_core::{Result, Tensor};

use crate::engine::kernels;
use crate::engine::kernels::quick_gelu::{FusedQuickGelu, SLOPE};

/// `x · σ(1.702 x)`, element-wise.
pub fn quick_gelu(x: &Tensor) -> Result<Tensor> {
    if kernels::supports(x.device(), x.dtype()) {
        return x.contiguous()?.apply_op1(FusedQuickGelu);
    }
    composed(x)
}

/// From candle ops, for devices without the fused op.
fn composed(x: &Tensor) -> Result<Tensor> {
    x * candle_nn::ops::sigmoid(&(x * SLOPE)?)?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::diffusion::noise::NoiseStream;
    use crate::engine::kernels::ELEMENTS_PER_TASK;
    use crate::engine::kernels::test_support::projected_grads;
    use candle_core::{DType, Device, Var};

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
