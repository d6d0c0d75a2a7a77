//! Differentiable building blocks shared by the text encoder, UNet and VAE.
//!
//! candle's fused `layer_norm` and `softmax_last_dim` have no backward (gradients silently vanish),
//! so layer norm and softmax are written here from basic ops that do. The fused kernels are used
//! only where candle records no graph (`track_op` is false), i.e. where no gradient can flow.
//! Norm affines go through `channel::scale_shift`, whose backward is fast.

use candle_core::{D, DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::channel::scale_shift;
use super::conv::Conv2d;
use super::linear::Linear;

pub use super::group_norm::{GroupNorm, group_norm};

/// Layer norm over the last dimension, built from differentiable ops.
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
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let needs_grad = x.track_op() || self.weight.track_op() || self.bias.track_op();
        if !needs_grad && x.is_contiguous() {
            return candle_nn::ops::layer_norm(x, &self.weight, &self.bias, self.eps as f32);
        }
        let dtype = x.dtype();
        let x = x.to_dtype(compute_dtype(dtype))?;
        let mean = x.mean_keepdim(D::Minus1)?;
        let centered = x.broadcast_sub(&mean)?;
        let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centered.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        let last = normed.rank() - 1;
        scale_shift(&normed.to_dtype(dtype)?, &self.weight, &self.bias, last)
    }
}

/// Half-precision tensors are normalised and soft-maxed in f32, as diffusers does.
pub fn compute_dtype(dtype: DType) -> DType {
    match dtype {
        DType::F16 | DType::BF16 => DType::F32,
        d => d,
    }
}

pub fn linear(vb: VarBuilder, in_dim: usize, out_dim: usize, bias: bool) -> Result<Linear> {
    Linear::load(vb, in_dim, out_dim, bias)
}

pub fn conv2d(
    vb: VarBuilder,
    in_ch: usize,
    out_ch: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
) -> Result<Conv2d> {
    Conv2d::load(vb, (in_ch, out_ch, kernel), stride, padding, true)
}

/// Softmax over the last dimension: differentiable when a graph is recorded, fused otherwise.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if x.track_op() {
        candle_nn::ops::softmax(x, D::Minus1)
    } else {
        candle_nn::ops::softmax_last_dim(&x.contiguous()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::noise::NoiseStream;
    use candle_core::{Device, Var};

    fn rel_diff(a: &Tensor, b: &Tensor) -> f64 {
        crate::parity::relative_l2(a, b).unwrap()
    }

    /// The fused (inference) and differentiable (training) paths compute the same values.
    #[test]
    fn fused_and_differentiable_paths_agree() {
        let mut rng = NoiseStream::new(3);
        let x = (rng.tensor((2, 5, 16), &Device::Cpu).unwrap() * 3.0).unwrap();
        let tracked = Var::from_tensor(&x).unwrap();
        assert!(!x.track_op() && tracked.as_tensor().track_op());
        let fused = softmax_last_dim(&x).unwrap();
        let slow = softmax_last_dim(tracked.as_tensor()).unwrap();
        assert!(rel_diff(&fused, &slow) < 1e-6);
        let norm = LayerNorm {
            weight: (rng.tensor(16, &Device::Cpu).unwrap() + 1.0).unwrap(),
            bias: rng.tensor(16, &Device::Cpu).unwrap(),
            eps: 1e-5,
        };
        let fused = norm.forward(&x).unwrap();
        let slow = norm.forward(tracked.as_tensor()).unwrap();
        assert!(rel_diff(&fused, &slow) < 1e-6);
    }
}
