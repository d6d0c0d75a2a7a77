//! GEGLU, the gate of the UNet transformers' feed-forward: the projection's last dimension is
//! split in a value half and a gate half, and the output is `value · GELU(gate)` (exact GELU,
//! `x · Φ(x)`).
//!
//! On the CPU in f32 / f64 one op computes it, and its backward writes both halves' gradients
//! in one pass: composed from candle ops it takes two narrows, a scalar libm `erf` per element
//! (twice more in the backward) and a concatenation of the two gradients. Other devices compose
//! candle ops.

use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;

use super::cpu_kernels::{ELEMENTS_PER_TASK, Real, contiguous, with_cpu_slice, with_floats};

/// `value · GELU(gate)` for `h = [value, gate]` along the last dimension.
pub fn geglu(h: &Tensor) -> Result<Tensor> {
    let Some(&width) = h.dims().last() else {
        bail!("GEGLU takes a tensor with a feature dimension, got a scalar");
    };
    if width % 2 != 0 {
        bail!("GEGLU splits the last dimension in two halves, got {width}");
    }
    if h.device().is_cpu() && matches!(h.dtype(), DType::F32 | DType::F64) {
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

struct FusedGeglu;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::cpu_kernels::projected_grads;
    use crate::engine::noise::NoiseStream;
    use candle_core::Var;

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

    /// The f32 normal CDF stays within 5e-7 of the f64 one from −9 to 9.
    #[test]
    fn f32_normal_cdf_is_accurate() {
        let worst = (-9000..=9000)
            .map(|i| {
                let x = i as f64 / 1000.0;
                (f32::normal_cdf(x as f32) as f64 - f64::normal_cdf(x)).abs()
            })
            .fold(0.0, f64::max);
        assert!(worst < 5e-7, "worst error {worst:e}");
    }
}
