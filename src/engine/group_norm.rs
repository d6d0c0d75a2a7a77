//! Group norm over `(B, C, …)` activations, as PyTorch's `GroupNorm` (affine), optionally
//! followed by SiLU as every UNet and VAE resnet applies it.
//!
//! Where no gradient is recorded (sampling, decoding, the base model's layers before an
//! adapter) one CPU kernel does it in three passes over each group, in place of ten candle ops
//! that each write a full-size tensor: at the VAE's 512×512 layers every such pass moves
//! 134 MB. With a gradient, candle ops that differentiate compute it.

use candle_core::{CpuStorage, CustomOp3, D, DType, Layout, Module, Result, Shape, Tensor, bail};
use candle_nn::VarBuilder;
use rayon::prelude::*;

use super::channel::scale_shift;
use super::cpu_kernels::{Real, contiguous, silu};
use super::nn::compute_dtype;

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
        let tracked = x.track_op() || self.weight.track_op() || self.bias.track_op();
        let fused = !tracked && x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64);
        if fused {
            let op = FusedGroupNorm {
                groups: self.groups,
                eps: self.eps,
                silu: then_silu,
            };
            return x
                .contiguous()?
                .apply_op3_no_bwd(&self.weight, &self.bias, &op);
        }
        let normed = self.composed(x)?;
        if then_silu { normed.silu() } else { Ok(normed) }
    }

    /// From candle ops that differentiate.
    fn composed(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims();
        let dtype = x.dtype();
        let grouped = x
            .reshape((dims[0], self.groups, ()))?
            .to_dtype(compute_dtype(dtype))?;
        let centered = grouped.broadcast_sub(&grouped.mean_keepdim(D::Minus1)?)?;
        let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centered.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        let normed = normed.reshape(dims)?.to_dtype(dtype)?;
        scale_shift(&normed, &self.weight, &self.bias, 1)
    }
}

struct FusedGroupNorm {
    groups: usize,
    eps: f64,
    silu: bool,
}

impl CustomOp3 for FusedGroupNorm {
    fn name(&self) -> &'static str {
        "fused-group-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dims = l1.shape().dims();
        let channels = dims[1];
        if l2.shape().elem_count() != channels || l3.shape().elem_count() != channels {
            bail!(
                "group norm: {channels} channels but weights for {:?}",
                l2.shape()
            );
        }
        let shape = GroupShape {
            channels_per_group: channels / self.groups,
            channel_len: dims[2..].iter().product(),
        };
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(x), CpuStorage::F32(w), CpuStorage::F32(b)) => {
                CpuStorage::F32(self.run(
                    &shape,
                    contiguous(x, l1)?,
                    contiguous(w, l2)?,
                    contiguous(b, l3)?,
                ))
            }
            (CpuStorage::F64(x), CpuStorage::F64(w), CpuStorage::F64(b)) => {
                CpuStorage::F64(self.run(
                    &shape,
                    contiguous(x, l1)?,
                    contiguous(w, l2)?,
                    contiguous(b, l3)?,
                ))
            }
            _ => bail!("the fused group norm takes f32 or f64 tensors of one dtype"),
        };
        Ok((out, l1.shape().clone()))
    }
}

/// The activations as runs of `channels_per_group` channels, one run per group and image.
struct GroupShape {
    channels_per_group: usize,
    channel_len: usize,
}

impl FusedGroupNorm {
    fn run<T: Real>(&self, shape: &GroupShape, x: &[T], weight: &[T], bias: &[T]) -> Vec<T> {
        let group_len = shape.channels_per_group * shape.channel_len;
        let mut out = vec![T::zero(); x.len()];
        let norm_groups = weight.len() / shape.channels_per_group;
        out.par_chunks_mut(group_len)
            .zip(x.par_chunks(group_len))
            .enumerate()
            .for_each(|(i, (y, x))| {
                let first = (i % norm_groups) * shape.channels_per_group;
                let last = first + shape.channels_per_group;
                pulp::Arch::new().dispatch(NormalizeGroup {
                    x,
                    y,
                    channel_len: shape.channel_len,
                    weight: &weight[first..last],
                    bias: &bias[first..last],
                    eps: self.eps,
                    silu: self.silu,
                });
            });
        out
    }
}

/// One group, compiled for the best instruction set the CPU has.
struct NormalizeGroup<'a, T> {
    x: &'a [T],
    y: &'a mut [T],
    channel_len: usize,
    weight: &'a [T],
    bias: &'a [T],
    eps: f64,
    silu: bool,
}

/// Independent accumulators, so the sums vectorise.
const LANES: usize = 16;

impl<T: Real> pulp::WithSimd for NormalizeGroup<'_, T> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) {
        // Two-pass statistics in f64: the mean, then the centred squares.
        let n = self.x.len() as f64;
        let mean = lane_sum(self.x, |v| v) / n;
        let var = lane_sum(self.x, |v| (v - mean) * (v - mean)) / n;
        let inv_std = 1.0 / (var + self.eps).sqrt();
        for (c, (y, x)) in self
            .y
            .chunks_exact_mut(self.channel_len)
            .zip(self.x.chunks_exact(self.channel_len))
            .enumerate()
        {
            let scale = self.weight[c].to_f64() * inv_std;
            let (a, b) = (
                T::from_f64(scale),
                T::from_f64(self.bias[c].to_f64() - mean * scale),
            );
            if self.silu {
                for (y, &x) in y.iter_mut().zip(x) {
                    *y = silu(x * a + b);
                }
            } else {
                for (y, &x) in y.iter_mut().zip(x) {
                    *y = x * a + b;
                }
            }
        }
    }
}

/// `Σ f(x)` in f64 over independent lanes.
#[inline(always)]
fn lane_sum<T: Real>(xs: &[T], f: impl Fn(f64) -> f64) -> f64 {
    let mut lanes = [0f64; LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (&x, lane) in chunk.iter().zip(&mut lanes) {
            *lane += f(x.to_f64());
        }
    }
    let tail: f64 = chunks.remainder().iter().map(|&x| f(x.to_f64())).sum();
    lanes.iter().sum::<f64>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::noise::NoiseStream;
    use candle_core::{Device, Var};

    /// The fused kernel equals the composed ops, with and without SiLU, in f32 and f64, for a
    /// batch and a spatial size that is no multiple of the lanes.
    #[test]
    fn fused_group_norm_matches_composed_ops() {
        let mut rng = NoiseStream::new(9);
        let dev = Device::Cpu;
        for (dtype, tolerance) in [(DType::F64, 1e-12), (DType::F32, 1e-6)] {
            let t = |rng: &mut NoiseStream, dims: &[usize]| {
                rng.tensor(dims, &dev).unwrap().to_dtype(dtype).unwrap()
            };
            let x = ((t(&mut rng, &[2, 12, 5, 7]) * 3.0).unwrap() + 1.5).unwrap();
            let norm = GroupNorm {
                weight: t(&mut rng, &[12]),
                bias: t(&mut rng, &[12]),
                groups: 4,
                eps: 1e-5,
            };
            // A tracked input takes the composed path.
            let tracked = Var::from_tensor(&x).unwrap();
            for silu in [false, true] {
                let fused = norm.apply(&x, silu).unwrap();
                let composed = norm.apply(tracked.as_tensor(), silu).unwrap();
                let diff = crate::parity::relative_l2(&fused, &composed).unwrap();
                assert!(diff < tolerance, "{dtype:?} silu {silu}: {diff:e}");
            }
        }
    }
}
