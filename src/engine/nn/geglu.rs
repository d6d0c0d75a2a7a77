//! GEGLU, the gate of the UNet transformers' feed-forward: the projection's last dimension is
//! split in a value half and a gate half, and the output is `value · GELU(gate)` (exact GELU,
//! `x · Φ(x)`).
//!
//! On the CPU in f32 / f64 one op computes it, and its backward writes both halves' gradients
//! in one pass: composed from candle ops it takes two narrows, a scalar libm `erf` per element
//! (twice more in the backward) and a concatenation of the two gradients. Other devices compose
//! candle ops.

use candle_core::{Result, Tensor, bail};

use crate::engine::kernels;
use crate::engine::kernels::geglu::FusedGeglu;

/// `value · GELU(gate)` for `h = [value, gate]` along the last dimension.
pub fn geglu(h: &Tensor) -> Result<Tensor> {
    let Some(&width) = h.dims().last() else {
        bail!("GEGLU takes a tensor with a feature dimension, got a scalar");
    };
    if width % 2 != 0 {
        bail!("GEGLU splits the last dimension in two halves, got {width}");
    }
    if kernels::supports(h.device(), h.dtype()) {
        return h.contiguous()?.apply_op1(FusedGeglu);
    }
    composed(h)
}

/// From candle ops, for devices without the fused op.
fn composed(h: &Tensor) -> Result<Tensor> {
    let last = h.rank() - 1;
    let half = h.dim(last)? / 2;
    h.narrow(last, 0, half)? * h.narrow(last, half, half)?.gelu_erf()?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::diffusion::noise::NoiseStream;
    use crate::engine::kernels::test_support::projected_grads;
    use candle_core::{DType, Device, Var};

    /// The fused op equals the composed ops in value, and in gradient up to candle's
    /// six-digit constant in its GELU derivative; in f32 (the vectorised normal CDF) and f64,
    /// on a width that is no multiple of the lanes and gates spread over both signs and tails.
    #[test]
    fn fused_geglu_matches_composed_ops() {
        let mut rng = NoiseStream::new(3);
        let dev = Device::Cpu;
        for (dtype, tolerance) in [(DType::F64, 1e-12), (DType::F32, 1e-6)] {
            let h = (rng.tensor(&[3, 5, 2 * 37], &dev).unwrap() * 3.0).unwrap();
            let h = Var::from_tensor(&h.to_dtype(dtype).unwrap()).unwrap();
            let upstream = rng
                .tensor(&[3, 5, 37], &dev)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            let run = |f: fn(&Tensor) -> Result<Tensor>| {
                let y = f(h.as_tensor()).unwrap();
                let grads = projected_grads(&y, &upstream);
                [y, grads.get(h.as_tensor()).unwrap().clone()]
            };
            let (fused, reference) = (run(geglu), run(composed));
            for (what, tolerance, (f, c)) in [("output", tolerance), ("dh", 1e-6)]
                .iter()
                .zip(fused.iter().zip(&reference))
                .map(|((w, t), fc)| (w, t, fc))
            {
                let diff = crate::parity::relative_l2(f, c).unwrap();
                assert!(diff < *tolerance, "{dtype:?}: {what} differs by {diff:e}");
            }
        }
    }

    /// The f64 backward matches central differences of the forward, element by element.
    #[test]
    fn fused_geglu_gradient_matches_finite_differences() {
        let mut rng = NoiseStream::new(4);
        let dev = Device::Cpu;
        let h = (rng.tensor(&[2, 2 * 19], &dev).unwrap() * 3.0)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap();
        let upstream = rng
            .tensor(&[2, 19], &dev)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap();
        let objective = |h: &Tensor| {
            (geglu(h).unwrap() * &upstream)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let var = Var::from_tensor(&h).unwrap();
        let grads = projected_grads(&geglu(var.as_tensor()).unwrap(), &upstream);
        let analytic: Vec<f64> = grads
            .get(var.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let values: Vec<f64> = h.flatten_all().unwrap().to_vec1().unwrap();
        let eps = 1e-6;
        for (i, &analytic) in analytic.iter().enumerate() {
            let shifted = |delta: f64| {
                let mut v = values.clone();
                v[i] += delta;
                objective(&Tensor::from_vec(v, h.shape(), &dev).unwrap())
            };
            let numeric = (shifted(eps) - shifted(-eps)) / (2.0 * eps);
            assert!(
                (numeric - analytic).abs() < 1e-7 * (1.0 + numeric.abs()),
                "element {i}: analytic {analytic}, numeric {numeric}"
            );
        }
    }
}
