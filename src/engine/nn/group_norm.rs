//! Group norm over `(B, C, …)` activations, as PyTorch's `GroupNorm` (affine), optionally
//! followed by SiLU as every UNet and VAE resnet applies it.
//!
//! On the CPU in f32 / f64 one op computes it in three passes over each group, and its backward
//! in two, in place of ten candle ops (and their backward ops) that each write a full-size
//! tensor: at the VAE's 512×512 layers every such pass moves 134 MB, and in a small model's
//! training step the ops' own overhead dominates. Other devices compose candle ops.

use candle_core::{Module, Result, Tensor, bail};
use candle_nn::VarBuilder;

use super::channel::scale_shift;
use super::{compute_dtype, standardize_last_dim};
use crate::engine::kernels;
use crate::engine::kernels::norm::FusedGroupNorm;

#[derive(Debug, Clone)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

/// Weights named `weight` and `bias` under `vb` (1 and 0 when initialised).
pub fn group_norm(vb: VarBuilder, groups: usize, channels: usize, eps: f64) -> Result<GroupNorm> {
    if channels % groups != 0 {
        bail!(
            "{}: {channels} channels cannot be split into {groups} norm groups",
            vb.prefix()
        );
    }
    Ok(GroupNorm {
        weight: vb.get_with_hints(channels, "weight", candle_nn::Init::Const(1.0))?,
        bias: vb.get_with_hints(channels, "bias", candle_nn::Init::Const(0.0))?,
        groups,
        eps,
    })
}

impl Module for GroupNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.apply(x, false)
    }
}

impl GroupNorm {
    /// `silu(group_norm(x))`.
    pub fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        self.apply(x, true)
    }

    fn apply(&self, x: &Tensor, then_silu: bool) -> Result<Tensor> {
        let dims = x.dims();
        if dims.len() < 3 {
            bail!("group norm takes (batch, channels, …) activations, got {dims:?}");
        }
        if kernels::supports(x.device(), x.dtype()) {
            let op = FusedGroupNorm {
                groups: self.groups,
                eps: self.eps,
                silu: then_silu,
            };
            // Recorded for the backward pass only when something upstream is tracked.
            return x.contiguous()?.apply_op3(&self.weight, &self.bias, op);
        }
        let normed = self.composed(x)?;
        if then_silu { normed.silu() } else { Ok(normed) }
    }

    /// From candle ops, for devices without the fused op.
    fn composed(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims();
        let dtype = x.dtype();
        let grouped = x
            .reshape((dims[0], self.groups, ()))?
            .to_dtype(compute_dtype(dtype))?;
        let normed = standardize_last_dim(&grouped, self.eps)?
            .reshape(dims)?
            .to_dtype(dtype)?;
        scale_shift(&normed, &self.weight, &self.bias, 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::diffusion::noise::NoiseStream;
    use crate::engine::kernels::test_support::projected_grads;
    use candle_core::{DType, Device, Var};

    /// The fused op equals the composed ops, values and the gradients of input, weight and
    /// bias, with and without SiLU, in f32 and f64, for a batch and a spatial size that is no
    /// multiple of the lanes.
    #[test]
    fn fused_group_norm_matches_composed_ops() {
        let mut rng = NoiseStream::new(9);
        let dev = Device::Cpu;
        for (dtype, tolerance) in [(DType::F64, 1e-12), (DType::F32, 1e-5)] {
            let t = |rng: &mut NoiseStream, dims: &[usize]| {
                rng.tensor(dims, &dev).unwrap().to_dtype(dtype).unwrap()
            };
            let x =
                Var::from_tensor(&((t(&mut rng, &[2, 12, 5, 7]) * 3.0).unwrap() + 1.5).unwrap())
                    .unwrap();
            let weight = Var::from_tensor(&t(&mut rng, &[12])).unwrap();
            let bias = Var::from_tensor(&t(&mut rng, &[12])).unwrap();
            let norm = GroupNorm {
                weight: weight.as_tensor().clone(),
                bias: bias.as_tensor().clone(),
                groups: 4,
                eps: 1e-5,
            };
            let upstream = t(&mut rng, &[2, 12, 5, 7]);
            for silu in [false, true] {
                let run = |fused: bool| {
                    let y = if fused {
                        norm.apply(x.as_tensor(), silu).unwrap()
                    } else {
                        let y = norm.composed(x.as_tensor()).unwrap();
                        if silu { y.silu().unwrap() } else { y }
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
                    assert!(
                        diff < tolerance,
                        "{dtype:?} silu {silu}: {what} differs by {diff:e}"
                    );
                }
            }
        }
    }
}
