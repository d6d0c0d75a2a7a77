//! Differentiable layers shared by the text encoder, UNet and VAE. Each one runs the engine's
//! CPU kernel where `kernels::supports` says so, and composes candle ops elsewhere.
//!
//! candle's fused `softmax_last_dim` has no backward (gradients silently vanish), so softmax is
//! composed here from basic ops that have one wherever a graph is recorded.

pub mod attention;
pub mod channel;
pub mod conv;
pub mod geglu;
pub mod group_norm;
pub mod layer_norm;
pub mod linear;
pub mod quick_gelu;
pub mod resnet;
pub mod sampling;

use candle_core::{D, DType, Result, Tensor};
use candle_nn::VarBuilder;

use conv::Conv2d;
use linear::Linear;

pub use group_norm::{GroupNorm, group_norm};
pub use layer_norm::LayerNorm;

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

/// `(x − mean) / √(variance + eps)` over the last dimension, from candle ops (the norms'
/// fallback off the kernels).
fn standardize_last_dim(x: &Tensor, eps: f64) -> Result<Tensor> {
    let centered = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    centered.broadcast_div(&(var + eps)?.sqrt()?)
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
    use crate::engine::diffusion::noise::NoiseStream;
    use crate::engine::kernels::test_support::rel_diff;
    use candle_core::{Device, Var};

    /// The fused (inference) and differentiable (training) softmax compute the same values.
    #[test]
    fn fused_and_differentiable_paths_agree() {
        let mut rng = NoiseStream::new(3);
        let x = (rng.tensor((2, 5, 16), &Device::Cpu).unwrap() * 3.0).unwrap();
        let tracked = Var::from_tensor(&x).unwrap();
        assert!(!x.track_op() && tracked.as_tensor().track_op());
        let fused = softmax_last_dim(&x).unwrap();
        let slow = softmax_last_dim(tracked.as_tensor()).unwrap();
        assert!(rel_diff(&fused, &slow) < 1e-6);
    }
}
