//! Helpers shared by the engine's own CPU kernels (`conv`, `channel`, `linear`, `attention`,
//! `group_norm`, `layer_norm`, `geglu`).

use candle_core::{Layout, Result, Storage, Tensor, WithDType, bail};
use gemm::Parallelism;
use num_traits::Float;

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

/// A row-major matrix view for [`matmul`]: pointer, row stride, column stride.
pub type MatRef<T> = (*const T, usize, usize);

/// `dst[m×n] (+)= lhs[m×k] · rhs[k×n]`; `dst` is row-major and contiguous.
///
/// # Safety
/// The pointers must cover the matrices their strides describe.
#[allow(clippy::too_many_arguments)]
pub unsafe fn matmul<T: WithDType>(
    (m, n, k): (usize, usize, usize),
    dst: *mut T,
    accumulate: bool,
    lhs: MatRef<T>,
    rhs: MatRef<T>,
    parallelism: Parallelism,
) {
    unsafe { matmul_into_rows((m, n, k), (dst, n), accumulate, lhs, rhs, parallelism) }
}

/// [`matmul`] into a row-major `dst` whose rows start `dst.1` elements apart.
///
/// # Safety
/// The pointers must cover the matrices their strides describe.
#[allow(clippy::too_many_arguments)]
pub unsafe fn matmul_into_rows<T: WithDType>(
    (m, n, k): (usize, usize, usize),
    (dst, dst_row_stride): (*mut T, usize),
    accumulate: bool,
    lhs: MatRef<T>,
    rhs: MatRef<T>,
    parallelism: Parallelism,
) {
    let one = T::from_f64(1.0);
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            dst_row_stride as isize,
            accumulate,
            lhs.0,
            lhs.2 as isize,
            lhs.1 as isize,
            rhs.0,
            rhs.2 as isize,
            rhs.1 as isize,
            one,
            one,
            false,
            false,
            false,
            parallelism,
        )
    }
}

/// GEMM threading inside one of `tasks` parallel tasks: `gemm`'s own threads when there are
/// fewer tasks than threads.
pub fn inner_parallelism(tasks: usize) -> Parallelism {
    let threads = rayon::current_num_threads();
    if tasks < threads {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    }
}

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

/// The gradients of `Σ y · upstream`, a random projection of an op's output: the kernels'
/// tests compare two implementations' backward passes through it.
#[cfg(test)]
pub fn projected_grads(y: &Tensor, upstream: &Tensor) -> candle_core::backprop::GradStore {
    (y * upstream)
        .and_then(|p| p.sum_all())
        .and_then(|s| s.backward())
        .expect("the projection of an op's output differentiates")
}
