//! The GEGLU op on the CPU: `value · GELU(gate)` and both halves' gradients in one pass each.
//! `nn::geglu` decides when it runs.

use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;

use super::{ELEMENTS_PER_TASK, Real, contiguous, with_cpu_slice, with_floats};

pub(crate) struct FusedGeglu;

impl CustomOp1 for FusedGeglu {
    fn name(&self) -> &'static str {
        "fused-geglu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let mut dims = l.dims().to_vec();
        let half = dims.last().copied().unwrap_or(0) / 2;
        if let Some(last) = dims.last_mut() {
            *last = half;
        }
        let out = with_floats!((s), |h| forward(contiguous(h, l)?, half));
        Ok((out, Shape::from(dims)))
    }

    fn bwd(&self, h: &Tensor, _out: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let grad = grad.contiguous()?;
        let half = h.dims().last().copied().unwrap_or(0) / 2;
        let dh = match h.dtype() {
            DType::F32 => backward_tensor::<f32>(h, &grad, half)?,
            DType::F64 => backward_tensor::<f64>(h, &grad, half)?,
            other => bail!("the fused GEGLU has no {other:?} backward"),
        };
        Ok(Some(dh))
    }
}

fn rows_per_task(half: usize) -> usize {
    ELEMENTS_PER_TASK.div_ceil(half.max(1))
}

fn forward<T: Real>(h: &[T], half: usize) -> Vec<T> {
    let mut out = vec![T::zero(); h.len() / 2];
    if half == 0 {
        return out;
    }
    let rows = rows_per_task(half);
    out.par_chunks_mut(half * rows)
        .zip(h.par_chunks(2 * half * rows))
        .for_each(|(out, h)| pulp::Arch::new().dispatch(GegluRows { h, out, half }));
    out
}

fn backward_tensor<T: Real>(h: &Tensor, grad: &Tensor, half: usize) -> Result<Tensor> {
    let dh = with_cpu_slice::<T, _>(h, |h| {
        with_cpu_slice::<T, _>(grad, |dy| {
            let mut dh = vec![T::zero(); h.len()];
            if half > 0 {
                let rows = rows_per_task(half);
                dh.par_chunks_mut(2 * half * rows)
                    .zip(h.par_chunks(2 * half * rows))
                    .zip(dy.par_chunks(half * rows))
                    .for_each(|((dh, h), dy)| {
                        pulp::Arch::new().dispatch(GegluGradRows { h, dy, dh, half })
                    });
            }
            Ok(dh)
        })
    })?;
    Tensor::from_vec(dh, h.shape(), &Device::Cpu)
}

/// Rows of the forward pass, compiled for the best instruction set the CPU has.
struct GegluRows<'a, T> {
    h: &'a [T],
    out: &'a mut [T],
    half: usize,
}

impl<T: Real> pulp::WithSimd for GegluRows<'_, T> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) {
        for (out, h) in self
            .out
            .chunks_exact_mut(self.half)
            .zip(self.h.chunks_exact(2 * self.half))
        {
            let (value, gate) = h.split_at(self.half);
            for ((y, &v), &g) in out.iter_mut().zip(value).zip(gate) {
                *y = v * g * T::normal_cdf(g);
            }
        }
    }
}

/// Rows of the backward pass: `d value = dy · GELU(g)`, `d gate = dy · v · GELU'(g)` with
/// `GELU'(g) = Φ(g) + g · φ(g)`.
struct GegluGradRows<'a, T> {
    h: &'a [T],
    dy: &'a [T],
    dh: &'a mut [T],
    half: usize,
}

impl<T: Real> pulp::WithSimd for GegluGradRows<'_, T> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) {
        let inv_sqrt_2pi =
            T::from_f64(0.5 * std::f64::consts::FRAC_2_SQRT_PI * std::f64::consts::FRAC_1_SQRT_2);
        let minus_half = T::from_f64(-0.5);
        for ((dh, h), dy) in self
            .dh
            .chunks_exact_mut(2 * self.half)
            .zip(self.h.chunks_exact(2 * self.half))
            .zip(self.dy.chunks_exact(self.half))
        {
            let (value, gate) = h.split_at(self.half);
            let (d_value, d_gate) = dh.split_at_mut(self.half);
            for ((((dv, dg), &v), &g), &dy) in
                d_value.iter_mut().zip(d_gate).zip(value).zip(gate).zip(dy)
            {
                let cdf = T::normal_cdf(g);
                let density = inv_sqrt_2pi * T::exp_nonpositive(minus_half * g * g);
                *dv = dy * g * cdf;
                *dg = dy * v * (cdf + g * density);
            }
        }
    }
}
