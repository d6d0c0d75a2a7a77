//! Layer norm over the last dimension.
//!
//! On the CPU in f32 / f64 one op computes it row by row, with its own backward; candle's fused
//! `layer_norm` has none (gradients silently vanish), and composing it from basic ops costs ten
//! ops and their backward ops per norm, which dominates a small model's training step. Other
//! devices compose candle ops.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::channel::scale_shift;
use super::{compute_dtype, standardize_last_dim};
use crate::engine::kernels;
use crate::engine::kernels::norm::FusedLayerNorm;

#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn new(vb: VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: vb.get_with_hints(dim, "weight", candle_nn::Init::Const(1.0))?,
            bias: vb.get_with_hints(dim, "bias", candle_nn::Init::Const(0.0))?,
            eps,
        })
    }

    /// From candle ops, for devices without the fused op.
    fn composed(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let normed = standardize_last_dim(&x.to_dtype(compute_dtype(dtype))?, self.eps)?;
        let last = normed.rank() - 1;
        scale_shift(&normed.to_dtype(dtype)?, &self.weight, &self.bias, last)
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if kernels::supports(x.device(), x.dtype()) {
            // Recorded for the backward pass only when something upstream is tracked.
            let op = FusedLayerNorm { eps: self.eps };
            return x.contiguous()?.apply_op3(&self.weight, &self.bias, op);
        }
        self.composed(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::diffusion::noise::NoiseStream;
    use crate::engine::kernels::test_support::projected_grads;
    use candle_core::{DType, Device, Var};

    /// The fused op equals the composed ops, values and the gradients of input, weight and
    /// bias, in f32 and f64, over more rows than one task takes.
    #[test]
    fn fused_layer_norm_matches_composed_ops() {
        let mut rng = NoiseStream::new(5);
        let dev = Device::Cpu;
        for (dtype, tolerance) in [(DType::F64, 1e-12), (DType::F32, 1e-5)] {
            let t = |rng: &mut NoiseStream, dims: &[usize]| {
                rng.tensor(dims, &dev).unwrap().to_dtype(dtype).unwrap()
            };
            let x = Var::from_tensor(&((t(&mut rng, &[3, 25, 19]) * 2.0).unwrap() - 0.7).unwrap())
                .unwrap();
            let weight = Var::from_tensor(&t(&mut rng, &[19])).unwrap();
            let bias = Var::from_tensor(&t(&mut rng, &[19])).unwrap();
            let norm = LayerNorm {
                weight: weight.as_tensor().clone(),
                bias: bias.as_tensor().clone(),
                eps: 1e-5,
            };
            let upstream = t(&mut rng, &[3, 25, 19]);
            let run = |fused: bool| {
                let y = if fused {
                    norm.forward(x.as_tensor()).unwrap()
                } else {
                    norm.composed(x.as_tensor()).unwrap()
                };
                let grads = projected_grads(&y, &upstream);
                let g = |v: &Var| grads.get(v.as_tensor()).unwrap().clone();
                [y, g(&x), g(&weight), g(&bias)]
            };
            let (fused, composed) = (run(true), run(false));
            for (what, (f, c)) in ["output", "dx", "dweight", "dbias"]
                .iter()
                .zip(fused.iter().zip(&composed))
            {
                let diff = crate::parity::relative_l2(f, c).unwrap();
                assert!(diff < tolerance, "{dtype:?}: {what} differs by {diff:e}");
            }
        }
    }
}
