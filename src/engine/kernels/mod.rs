//! The engine's own CPU kernels: candle custom ops with forward and backward passes for f32
//! and f64 tensors, and the GEMM driving, Winograd transforms and helpers they share.
//!
//! The layers in `nn` choose between a kernel here and candle's ops by one rule, [`supports`]:
//! a kernel runs on CPU tensors in f32 or f64; every other device and dtype composes candle
//! ops (cuBLAS / cuDNN on CUDA).

pub(crate) mod attention;
pub(crate) mod channel;
pub(crate) mod conv;
pub(crate) mod geglu;
pub(crate) mod linear;
mod matmul;
pub(crate) mod norm;
mod packed_gemm;
pub(crate) mod quick_gelu;
mod winograd;

use candle_core::{DType, Device, Layout, Result, Storage, Tensor, WithDType, bail};
use num_traits::Float;

/// Whether the engine's kernels compute for tensors on `device` in `dtype`: the one dispatch
/// rule every layer in `nn` follows.
pub fn supports(device: &Device, dtype: DType) -> bool {
    device.is_cpu() && matches!(dtype, DType::F32 | DType::F64)
}

/// The slice a contiguous layout covers; the kernels are only handed contiguous tensors.
pub fn contiguous<'a, T: WithDType>(data: &'a [T], layout: &Layout) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => bail!("the engine's CPU kernels take contiguous tensors"),
    }
}

/// Runs `f` on the elements of `t`, a contiguous CPU tensor of element type `T` (for the
/// kernels' backward passes, which get tensors rather than storages).
pub fn with_cpu_slice<T: WithDType, R>(t: &Tensor, f: impl FnOnce(&[T]) -> Result<R>) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        bail!("the engine's CPU kernels take CPU tensors");
    };
    f(contiguous(T::cpu_storage_as_slice(cpu)?, layout)?)
}

/// Evaluates `$body` (a `Vec` of results) with the idents bound to the storages' slices when
/// all are f32 or all f64, and wraps it back into a `CpuStorage` of that dtype.
macro_rules! with_floats {
    (($($s:expr),+), |$($a:ident),+| $body:expr) => {
        match ($($s,)+) {
            ($(candle_core::CpuStorage::F32($a),)+) => candle_core::CpuStorage::F32($body),
            ($(candle_core::CpuStorage::F64($a),)+) => candle_core::CpuStorage::F64($body),
            _ => candle_core::bail!("the engine's CPU kernels take f32 or f64 tensors of one dtype"),
        }
    };
}
pub(crate) use with_floats;

/// A pointer tasks share, each writing (or reading) its own part of the allocation.
#[derive(Clone, Copy)]
pub struct SharedMut<T>(pub *mut T);
unsafe impl<T> Send for SharedMut<T> {}
unsafe impl<T> Sync for SharedMut<T> {}

impl<T> SharedMut<T> {
    /// The element at `offset`; a method so that closures capture the whole (Sync) wrapper.
    ///
    /// # Safety
    /// `offset` must lie in the allocation.
    pub unsafe fn at(self, offset: usize) -> *mut T {
        unsafe { self.0.add(offset) }
    }
}

/// The element type of the fused kernels (f32, and f64 for gradient checks).
pub trait Real: WithDType + Float {
    /// `e^x` for `x ≤ 0` (softmax arguments): vectorisable in f32, exact to ~1 ulp.
    fn exp_nonpositive(x: Self) -> Self;
    /// The standard normal CDF `Φ(x) = (1 + erf(x / √2)) / 2` (GELU's gate): vectorisable in
    /// f32, within 5e-7 of the exact value.
    fn normal_cdf(x: Self) -> Self;
}

impl Real for f32 {
    #[inline(always)]
    fn exp_nonpositive(x: f32) -> f32 {
        // Cephes' expf: e^x = 2^n · e^r with |r| ≤ ln2/2, e^r by a degree-7 polynomial, in
        // fused multiply-adds: the kernels call it inside pulp's target-feature functions,
        // where each is one instruction (a third of a 4096-token softmax's time).
        const LN2_HI: f32 = 0.693_359_4;
        const LN2_LO: f32 = -2.121_944_4e-4;
        let clamped = x.max(-87.0);
        let n = clamped.mul_add(std::f32::consts::LOG2_E, 0.5).floor();
        let r = n.mul_add(-LN2_LO, n.mul_add(-LN2_HI, clamped));
        let p = 1.987_569_2e-4f32
            .mul_add(r, 1.398_199_9e-3)
            .mul_add(r, 8.333_452e-3)
            .mul_add(r, 4.166_579_6e-2)
            .mul_add(r, 1.666_666_5e-1)
            .mul_add(r, 0.5);
        let e_r = (p * r).mul_add(r, r) + 1.0;
        // 2^n from n's bits: adding 2^23 puts the integer n + 127 (in 1..=127 here) in the
        // low mantissa bits, and the shift moves it into the exponent field. An `as` cast
        // would saturate lane by lane and keep the loop from vectorising.
        let two_n = f32::from_bits((n + (127.0 + 8_388_608.0)).to_bits() << 23);
        if x < -87.0 { 0.0 } else { e_r * two_n }
    }

    #[inline(always)]
    fn normal_cdf(x: f32) -> f32 {
        // Abramowitz & Stegun 7.1.26: erfc(z) = t·P(t)·e^(−z²) with t = 1 / (1 + p·z), z ≥ 0,
        // absolute error ≤ 1.5e-7 (relative error grows in the far tail, 2e-3 at x = −5,
        // where GELU's value is below 1e-6 anyway).
        let z = x.abs() * std::f32::consts::FRAC_1_SQRT_2;
        let t = 1.0 / (1.0 + 0.327_591_1 * z);
        let poly = ((((1.061_405_4 * t - 1.453_152_1) * t + 1.421_413_7) * t - 0.284_496_74) * t
            + 0.254_829_6)
            * t;
        let half_tail = 0.5 * poly * Self::exp_nonpositive(-z * z);
        if x >= 0.0 { 1.0 - half_tail } else { half_tail }
    }
}

impl Real for f64 {
    #[inline(always)]
    fn exp_nonpositive(x: f64) -> f64 {
        x.exp()
    }

    #[inline(always)]
    fn normal_cdf(x: f64) -> f64 {
        0.5 * candle_core::cpu::erf::erfc_f64(-x * std::f64::consts::FRAC_1_SQRT_2)
    }
}

/// `1 / (1 + e^-x)`, vectorisable (no branch, no libm call in f32).
#[inline(always)]
pub fn sigmoid<T: Real>(x: T) -> T {
    let e = T::exp_nonpositive(-x.abs());
    (if x >= T::zero() { T::one() } else { e }) / (T::one() + e)
}

/// `x · sigmoid(x)`.
#[inline(always)]
pub fn silu<T: Real>(x: T) -> T {
    x * sigmoid(x)
}

/// The derivative of [`silu`]: `s · (1 + x · (1 − s))` with `s = sigmoid(x)`.
#[inline(always)]
pub fn silu_grad<T: Real>(x: T) -> T {
    let s = sigmoid(x);
    s * (T::one() + x * (T::one() - s))
}

/// Independent accumulators for reductions, so they vectorise.
pub const LANES: usize = 16;

/// Elements per parallel task of an element-wise kernel: smaller tasks cost more in scheduling
/// than they save.
pub const ELEMENTS_PER_TASK: usize = 16 * 1024;

/// The mean and 1/√(variance + eps) of `x`, two-pass in f64.
#[inline(always)]
pub fn moments<T: Real>(x: &[T], eps: f64) -> (f64, f64) {
    let n = x.len() as f64;
    let mean = lane_sum(x, |v| v) / n;
    let var = lane_sum(x, |v| (v - mean) * (v - mean)) / n;
    (mean, 1.0 / (var + eps).sqrt())
}

/// `Σ f(x)` in f64 over independent lanes.
#[inline(always)]
pub fn lane_sum<T: Real>(xs: &[T], f: impl Fn(f64) -> f64) -> f64 {
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

/// What the kernels' tests share: random inputs and comparisons of two implementations.
#[cfg(test)]
pub(crate) mod test_support {
    use candle_core::{DType, Device, Tensor};

    use crate::engine::diffusion::noise::NoiseStream;

    /// The gradients of `Σ y · upstream`, a random projection of an op's output: the
    /// kernels' tests compare two implementations' backward passes through it.
    pub fn projected_grads(y: &Tensor, upstream: &Tensor) -> candle_core::backprop::GradStore {
        (y * upstream)
            .and_then(|p| p.sum_all())
            .and_then(|s| s.backward())
            .expect("the projection of an op's output differentiates")
    }

    pub fn rel_diff(a: &Tensor, b: &Tensor) -> f64 {
        crate::parity::relative_l2(a, b).unwrap()
    }

    pub fn random(rng: &mut NoiseStream, shape: (usize, usize, usize), dtype: DType) -> Tensor {
        rng.tensor(shape, &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vectorisable exp is within a few ulp of the library's over the softmax range.
    #[test]
    fn fast_exp_is_accurate() {
        let mut worst = 0f64;
        for i in 0..=200_000 {
            let x = -90.0 * i as f32 / 200_000.0;
            let exact = (x as f64).exp();
            let fast = f32::exp_nonpositive(x) as f64;
            if exact > 1e-37 {
                worst = worst.max(((fast - exact) / exact).abs());
            }
        }
        assert!(
            worst < 4.0 * f32::EPSILON as f64,
            "worst relative error {worst:e}"
        );
        assert_eq!(f32::exp_nonpositive(f32::NEG_INFINITY), 0.0);
        assert_eq!(f32::exp_nonpositive(0.0), 1.0);
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
