//! Group norm over `(B, C, …)` activations, as PyTorch's `GroupNorm` (affine), optionally
//! followed by SiLU as every UNet and VAE resnet applies it.
//!
//! On the CPU in f32 / f64 one op computes it in three passes over each group, and its backward
//! in two, in place of ten candle ops (and their backward ops) that each write a full-size
//! tensor: at the VAE's 512×512 layers every such pass moves 134 MB, and in a small model's
//! training step the ops' own overhead dominates. Other devices compose candle ops.

use candle_core::{
    CpuStorage, CustomOp3, D, DType, Device, Layout, Module, Result, Shape, Tensor, bail,
};
use candle_nn::VarBuilder;
use rayon::prelude::*;

use super::channel::scale_shift;
use super::cpu_kernels::{
    LANES, Real, contiguous, moments, silu, silu_grad, with_cpu_slice, with_floats,
};
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
        if x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64) {
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
        let shape = self.shape(l1.shape(), l2.shape(), l3.shape())?;
        let out = with_floats!((s1, s2, s3), |x, w, b| self.run(
            &shape,
            contiguous(x, l1)?,
            contiguous(w, l2)?,
            contiguous(b, l3)?
        ));
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let shape = self.shape(x.shape(), weight.shape(), bias.shape())?;
        let grad = grad.contiguous()?;
        let [dx, dw, db] = match x.dtype() {
            DType::F32 => self.backward_tensors::<f32>(&shape, x, weight, bias, &grad)?,
            DType::F64 => self.backward_tensors::<f64>(&shape, x, weight, bias, &grad)?,
            other => bail!("the fused group norm has no {other:?} backward"),
        };
        // Frozen weights (the base model under an adapter) get no gradient.
        Ok((
            x.track_op().then_some(dx),
            weight.track_op().then_some(dw),
            bias.track_op().then_some(db),
        ))
    }
}

/// The activations as runs of `channels_per_group` channels, one run per group and image.
struct GroupShape {
    channels_per_group: usize,
    channel_len: usize,
}

impl FusedGroupNorm {
    fn shape(&self, x: &Shape, weight: &Shape, bias: &Shape) -> Result<GroupShape> {
        let dims = x.dims();
        let channels = dims[1];
        if weight.elem_count() != channels || bias.elem_count() != channels {
            bail!("group norm: {channels} channels but weights for {weight:?}");
        }
        Ok(GroupShape {
            channels_per_group: channels / self.groups,
            channel_len: dims[2..].iter().product(),
        })
    }

    fn backward_tensors<T: Real>(
        &self,
        shape: &GroupShape,
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        grad: &Tensor,
    ) -> Result<[Tensor; 3]> {
        let [dx, dw, db] = with_cpu_slice::<T, _>(x, |x| {
            with_cpu_slice::<T, _>(weight, |w| {
                with_cpu_slice::<T, _>(bias, |b| {
                    with_cpu_slice::<T, _>(grad, |dz| Ok(self.backward(shape, x, w, b, dz)))
                })
            })
        })?;
        let cpu = &Device::Cpu;
        Ok([
            Tensor::from_vec(dx, x.shape(), cpu)?,
            Tensor::from_vec(dw, weight.shape(), cpu)?,
            Tensor::from_vec(db, bias.shape(), cpu)?,
        ])
    }

    /// The gradients of x, weight and bias for the output gradient `dz`.
    fn backward<T: Real>(
        &self,
        shape: &GroupShape,
        x: &[T],
        weight: &[T],
        bias: &[T],
        dz: &[T],
    ) -> [Vec<T>; 3] {
        let cpg = shape.channels_per_group;
        let group_len = cpg * shape.channel_len;
        let norm_groups = weight.len() / cpg;
        let mut dx = vec![T::zero(); x.len()];
        // Per image and channel: Σ dy·x̂ and Σ dy, summed over the batch below.
        let mut channel_sums = vec![(0f64, 0f64); x.len() / shape.channel_len];
        dx.par_chunks_mut(group_len)
            .zip(channel_sums.par_chunks_mut(cpg))
            .enumerate()
            .for_each(|(i, (dx, sums))| {
                let first = (i % norm_groups) * cpg;
                let at = i * group_len;
                pulp::Arch::new().dispatch(GroupBackward {
                    x: &x[at..at + group_len],
                    dz: &dz[at..at + group_len],
                    dx,
                    sums,
                    channel_len: shape.channel_len,
                    weight: &weight[first..first + cpg],
                    bias: &bias[first..first + cpg],
                    eps: self.eps,
                    silu: self.silu,
                });
            });
        let mut dw = vec![0f64; weight.len()];
        let mut db = vec![0f64; weight.len()];
        for (i, &(w, b)) in channel_sums.iter().enumerate() {
            dw[i % weight.len()] += w;
            db[i % weight.len()] += b;
        }
        let cast = |v: Vec<f64>| v.into_iter().map(T::from_f64).collect();
        [dx, cast(dw), cast(db)]
    }

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

impl<T: Real> pulp::WithSimd for NormalizeGroup<'_, T> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) {
        let (mean, inv_std) = moments(self.x, self.eps);
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

/// One group's backward, compiled for the best instruction set the CPU has.
struct GroupBackward<'a, T> {
    x: &'a [T],
    dz: &'a [T],
    dx: &'a mut [T],
    /// Per channel of the group: (Σ dy·x̂, Σ dy).
    sums: &'a mut [(f64, f64)],
    channel_len: usize,
    weight: &'a [T],
    bias: &'a [T],
    eps: f64,
    silu: bool,
}

impl<T: Real> pulp::WithSimd for GroupBackward<'_, T> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) {
        let (mean, inv_std) = moments(self.x, self.eps);
        let (mean, inv_std) = (T::from_f64(mean), T::from_f64(inv_std));
        let len = self.channel_len;
        // Pass 1: dy = dz · silu'(y) into dx, and the sums the normalisation's backward needs.
        let (mut sum_dxhat, mut sum_dxhat_xhat) = (0f64, 0f64);
        for (c, dx) in self.dx.chunks_exact_mut(len).enumerate() {
            let (x, dz) = (&self.x[c * len..][..len], &self.dz[c * len..][..len]);
            let (gamma, beta) = (self.weight[c], self.bias[c]);
            let mut dy_xhat = [T::zero(); LANES];
            let mut dy_sum = [T::zero(); LANES];
            for (k, ((dx, &x), &dz)) in dx.iter_mut().zip(x).zip(dz).enumerate() {
                let xhat = (x - mean) * inv_std;
                let dy = if self.silu {
                    dz * silu_grad(xhat * gamma + beta)
                } else {
                    dz
                };
                *dx = dy;
                dy_xhat[k % LANES] += dy * xhat;
                dy_sum[k % LANES] += dy;
            }
            let total = |lanes: [T; LANES]| lanes.iter().map(|&v| v.to_f64()).sum::<f64>();
            let (w, b) = (total(dy_xhat), total(dy_sum));
            self.sums[c] = (w, b);
            sum_dxhat += gamma.to_f64() * b;
            sum_dxhat_xhat += gamma.to_f64() * w;
        }
        // Pass 2: dx = (dx̂ − mean(dx̂) − x̂ · mean(dx̂ · x̂)) / σ, with dx̂ = dy · γ.
        let n = self.x.len() as f64;
        let (m1, m2) = (T::from_f64(sum_dxhat / n), T::from_f64(sum_dxhat_xhat / n));
        for (c, dx) in self.dx.chunks_exact_mut(len).enumerate() {
            let gamma = self.weight[c];
            for (dx, &x) in dx.iter_mut().zip(&self.x[c * len..][..len]) {
                let xhat = (x - mean) * inv_std;
                *dx = (*dx * gamma - m1 - xhat * m2) * inv_std;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::cpu_kernels::projected_grads;
    use crate::engine::noise::NoiseStream;
    use candle_core::{Device, Var};

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
