//! Layer norm over the last dimension.
//!
//! On the CPU in f32 / f64 one op computes it row by row, with its own backward; candle's fused
//! `layer_norm` has none (gradients silently vanish), and composing it from basic ops costs ten
//! ops and their backward ops per norm, which dominates a small model's training step. Other
//! devices compose candle ops.

use candle_core::{
    CpuStorage, CustomOp3, D, DType, Device, Layout, Module, Result, Shape, Tensor, bail,
};
use candle_nn::VarBuilder;
use rayon::prelude::*;

use super::channel::scale_shift;
use super::cpu_kernels::{Real, contiguous, moments, with_cpu_slice, with_floats};
use super::nn::compute_dtype;

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
        let x = x.to_dtype(compute_dtype(dtype))?;
        let mean = x.mean_keepdim(D::Minus1)?;
        let centered = x.broadcast_sub(&mean)?;
        let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centered.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        let last = normed.rank() - 1;
        scale_shift(&normed.to_dtype(dtype)?, &self.weight, &self.bias, last)
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64) {
            // Recorded for the backward pass only when something upstream is tracked.
            let op = FusedLayerNorm { eps: self.eps };
            return x.contiguous()?.apply_op3(&self.weight, &self.bias, op);
        }
        self.composed(x)
    }
}

struct FusedLayerNorm {
    eps: f64,
}

/// Rows per parallel task: a fixed split, so the weight gradients sum in the same order
/// whatever the thread count.
const ROWS_PER_TASK: usize = 32;

impl CustomOp3 for FusedLayerNorm {
    fn name(&self) -> &'static str {
        "fused-layer-norm"
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
        let dim = row_len(l1.shape(), l2.shape(), l3.shape())?;
        let out = with_floats!((s1, s2, s3), |x, w, b| self.forward(
            dim,
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
        let dim = row_len(x.shape(), weight.shape(), bias.shape())?;
        let grad = grad.contiguous()?;
        let [dx, dw, db] = match x.dtype() {
            DType::F32 => self.backward_tensors::<f32>(dim, x, weight, &grad)?,
            DType::F64 => self.backward_tensors::<f64>(dim, x, weight, &grad)?,
            other => bail!("the fused layer norm has no {other:?} backward"),
        };
        // Frozen weights (the base model under an adapter) get no gradient.
        Ok((
            x.track_op().then_some(dx),
            weight.track_op().then_some(dw),
            bias.track_op().then_some(db),
        ))
    }
}

fn row_len(x: &Shape, weight: &Shape, bias: &Shape) -> Result<usize> {
    let dim = *x.dims().last().unwrap_or(&0);
    if dim == 0 || weight.elem_count() != dim || bias.elem_count() != dim {
        bail!("layer norm: rows of {dim} but weights {weight:?} and bias {bias:?}");
    }
    Ok(dim)
}

impl FusedLayerNorm {
    fn forward<T: Real>(&self, dim: usize, x: &[T], weight: &[T], bias: &[T]) -> Vec<T> {
        let mut out = vec![T::zero(); x.len()];
        out.par_chunks_mut(dim * ROWS_PER_TASK)
            .zip(x.par_chunks(dim * ROWS_PER_TASK))
            .for_each(|(y, x)| {
                pulp::Arch::new().dispatch(NormalizeRows {
                    x,
                    y,
                    weight,
                    bias,
                    eps: self.eps,
                })
            });
        out
    }

    fn backward_tensors<T: Real>(
        &self,
        dim: usize,
        x: &Tensor,
        weight: &Tensor,
        grad: &Tensor,
    ) -> Result<[Tensor; 3]> {
        let [dx, dw, db] = with_cpu_slice::<T, _>(x, |x| {
            with_cpu_slice::<T, _>(weight, |w| {
                with_cpu_slice::<T, _>(grad, |dy| Ok(self.backward(dim, x, w, dy)))
            })
        })?;
        let cpu = &Device::Cpu;
        Ok([
            Tensor::from_vec(dx, x.shape(), cpu)?,
            Tensor::from_vec(dw, weight.shape(), cpu)?,
            Tensor::from_vec(db, weight.shape(), cpu)?,
        ])
    }

    /// The gradients of x, weight and bias for the output gradient `dy`.
    fn backward<T: Real>(&self, dim: usize, x: &[T], weight: &[T], dy: &[T]) -> [Vec<T>; 3] {
        let mut dx = vec![T::zero(); x.len()];
        let tasks = x.len().div_ceil(dim * ROWS_PER_TASK);
        // Per task: its rows' Σ dy·x̂ then Σ dy, per column; summed in task order below.
        let mut partial = vec![0f64; tasks * 2 * dim];
        dx.par_chunks_mut(dim * ROWS_PER_TASK)
            .zip(partial.par_chunks_mut(2 * dim))
            .enumerate()
            .for_each(|(task, (dx, sums))| {
                let rows = task * dim * ROWS_PER_TASK..;
                let n = dx.len();
                pulp::Arch::new().dispatch(RowsBackward {
                    x: &x[rows.clone()][..n],
                    dy: &dy[rows][..n],
                    dx,
                    sums,
                    weight,
                    eps: self.eps,
                })
            });
        let (mut dw, mut db) = (vec![0f64; dim], vec![0f64; dim]);
        for sums in partial.chunks_exact(2 * dim) {
            let (w, b) = sums.split_at(dim);
            dw.iter_mut().zip(w).for_each(|(t, v)| *t += v);
            db.iter_mut().zip(b).for_each(|(t, v)| *t += v);
        }
        let cast = |v: Vec<f64>| v.into_iter().map(T::from_f64).collect();
        [dx, cast(dw), cast(db)]
    }
}

/// Rows of `x` normalised into `y`, compiled for the best instruction set the CPU has.
struct NormalizeRows<'a, T> {
    x: &'a [T],
    y: &'a mut [T],
    weight: &'a [T],
    bias: &'a [T],
    eps: f64,
}

impl<T: Real> pulp::WithSimd for NormalizeRows<'_, T> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) {
        let dim = self.weight.len();
        for (y, x) in self.y.chunks_exact_mut(dim).zip(self.x.chunks_exact(dim)) {
            let (mean, inv_std) = moments(x, self.eps);
            let (mean, inv_std) = (T::from_f64(mean), T::from_f64(inv_std));
            for (((y, &x), &w), &b) in y.iter_mut().zip(x).zip(self.weight).zip(self.bias) {
                *y = (x - mean) * inv_std * w + b;
            }
        }
    }
}

/// Rows' backward, compiled for the best instruction set the CPU has.
struct RowsBackward<'a, T> {
    x: &'a [T],
    dy: &'a [T],
    dx: &'a mut [T],
    /// Σ dy·x̂ per column, then Σ dy per column.
    sums: &'a mut [f64],
    weight: &'a [T],
    eps: f64,
}

impl<T: Real> pulp::WithSimd for RowsBackward<'_, T> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) {
        let dim = self.weight.len();
        let (dw, db) = self.sums.split_at_mut(dim);
        let rows = self
            .dx
            .chunks_exact_mut(dim)
            .zip(self.x.chunks_exact(dim))
            .zip(self.dy.chunks_exact(dim));
        for ((dx, x), dy) in rows {
            let (mean, inv_std) = moments(x, self.eps);
            let (mean, inv_std) = (T::from_f64(mean), T::from_f64(inv_std));
            // dx̂ = dy · w into dx, with the row's Σ dx̂ and Σ dx̂·x̂.
            let (mut s1, mut s2) = (T::zero(), T::zero());
            for ((((dx, &x), &dy), &w), (dw, db)) in dx
                .iter_mut()
                .zip(x)
                .zip(dy)
                .zip(self.weight)
                .zip(dw.iter_mut().zip(db.iter_mut()))
            {
                let xhat = (x - mean) * inv_std;
                *dw += (dy * xhat).to_f64();
                *db += dy.to_f64();
                *dx = dy * w;
                s1 += *dx;
                s2 += *dx * xhat;
            }
            let n = T::from_f64(dim as f64);
            let (m1, m2) = (s1 / n, s2 / n);
            for (dx, &x) in dx.iter_mut().zip(x) {
                let xhat = (x - mean) * inv_std;
                *dx = (*dx - m1 - xhat * m2) * inv_std;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::cpu_kernels::projected_grads;
    use crate::engine::noise::NoiseStream;
    use candle_core::Var;

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
