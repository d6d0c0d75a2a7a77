//! Group norm (optionally followed by SiLU) and layer norm on the CPU, forward and backward.
//! `nn::group_norm` and `nn::layer_norm` decide when they run.
//!
//! Both normalise runs of values by their own mean and variance (two-pass, in f64), and share
//! the backward's last step: from dx̂, the gradient of the normalised values, to dx.

use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;

use super::{LANES, Real, contiguous, moments, silu, silu_grad, with_cpu_slice, with_floats};

/// [`moments`] rounded to the kernel's element type.
#[inline(always)]
fn rounded_moments<T: Real>(x: &[T], eps: f64) -> (T, T) {
    let (mean, inv_std) = moments(x, eps);
    (T::from_f64(mean), T::from_f64(inv_std))
}

/// `dx = (dx̂ − m1 − x̂ · m2) · inv_std` with `x̂ = (x − mean) · inv_std`, in place: `dx` holds
/// dx̂ on entry, `m1` and `m2` are the means of dx̂ and dx̂ · x̂ over the normalised run.
#[inline(always)]
fn input_grad<T: Real>(dx: &mut [T], x: &[T], (mean, inv_std): (T, T), (m1, m2): (T, T)) {
    for (dx, &x) in dx.iter_mut().zip(x) {
        let xhat = (x - mean) * inv_std;
        *dx = (*dx - m1 - xhat * m2) * inv_std;
    }
}

/// Weight and bias gradients summed in f64, rounded to the kernel's element type.
fn rounded<T: Real>(sums: Vec<f64>) -> Vec<T> {
    sums.into_iter().map(T::from_f64).collect()
}

/// The gradients as tensors shaped like `like` (x, weight, bias).
fn grad_tensors<T: Real>(like: [&Tensor; 3], grads: [Vec<T>; 3]) -> Result<[Tensor; 3]> {
    let [dx, dw, db] = grads;
    let cpu = &Device::Cpu;
    Ok([
        Tensor::from_vec(dx, like[0].shape(), cpu)?,
        Tensor::from_vec(dw, like[1].shape(), cpu)?,
        Tensor::from_vec(db, like[2].shape(), cpu)?,
    ])
}

/// The gradients of the inputs that are tracked: frozen weights (the base model under an
/// adapter) get none.
fn tracked_grads(
    inputs: [&Tensor; 3],
    [dx, dw, db]: [Tensor; 3],
) -> (Option<Tensor>, Option<Tensor>, Option<Tensor>) {
    (
        inputs[0].track_op().then_some(dx),
        inputs[1].track_op().then_some(dw),
        inputs[2].track_op().then_some(db),
    )
}

pub(crate) struct FusedGroupNorm {
    pub(crate) groups: usize,
    pub(crate) eps: f64,
    pub(crate) silu: bool,
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
        Ok(tracked_grads([x, weight, bias], [dx, dw, db]))
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
        grad_tensors([x, weight, bias], [dx, dw, db])
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
        [dx, rounded(dw), rounded(db)]
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
        let (mean, inv_std) = rounded_moments(self.x, self.eps);
        let len = self.channel_len;
        // Pass 1: dy = dz · silu'(y), dx̂ = dy · γ into dx, and the sums the normalisation's
        // backward needs.
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
                *dx = dy * gamma;
                dy_xhat[k % LANES] += dy * xhat;
                dy_sum[k % LANES] += dy;
            }
            let total = |lanes: [T; LANES]| lanes.iter().map(|&v| v.to_f64()).sum::<f64>();
            let (w, b) = (total(dy_xhat), total(dy_sum));
            self.sums[c] = (w, b);
            sum_dxhat += gamma.to_f64() * b;
            sum_dxhat_xhat += gamma.to_f64() * w;
        }
        // Pass 2: from dx̂ to dx.
        let n = self.x.len() as f64;
        let (m1, m2) = (T::from_f64(sum_dxhat / n), T::from_f64(sum_dxhat_xhat / n));
        input_grad(self.dx, self.x, (mean, inv_std), (m1, m2));
    }
}

pub(crate) struct FusedLayerNorm {
    pub(crate) eps: f64,
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
        Ok(tracked_grads([x, weight, bias], [dx, dw, db]))
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
        grad_tensors([x, weight, weight], [dx, dw, db])
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
        [dx, rounded(dw), rounded(db)]
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
            let (mean, inv_std) = rounded_moments(x, self.eps);
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
            let (mean, inv_std) = rounded_moments(x, self.eps);
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
            input_grad(dx, x, (mean, inv_std), (s1 / n, s2 / n));
        }
    }
}
