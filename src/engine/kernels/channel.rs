//! Per-channel bias and scale-and-shift ops on the CPU, and the backward that sums each
//! channel's gradient in one parallel pass (see `nn::channel` for why).

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor, WithDType, bail,
};
use rayon::prelude::*;

use super::{ELEMENTS_PER_TASK, Real, contiguous, with_floats};

/// `x += bias` in place, `x` of `shape` and `bias` (C) along its dim `axis`: for ops that add
/// a frozen bias to an output they own (no second buffer to allocate and zero).
pub fn add_bias_in_place<T: Real>(
    x: &mut [T],
    shape: &Shape,
    bias: &[T],
    axis: usize,
) -> Result<()> {
    let ch = Channels::of(shape, axis, bias.len())?;
    if ch.inner == 0 {
        return Ok(());
    }
    x.par_chunks_mut(ch.inner)
        .enumerate()
        .for_each(|(plane, values)| {
            let b = bias[plane % ch.channels];
            values.iter_mut().for_each(|v| *v += b);
        });
    Ok(())
}

/// A tensor seen as `[outer, channels, inner]` around the channel dim.
#[derive(Debug, Clone, Copy)]
struct Channels {
    outer: usize,
    channels: usize,
    inner: usize,
}

impl Channels {
    fn of(shape: &Shape, axis: usize, per_channel: usize) -> Result<Self> {
        let dims = shape.dims();
        if axis >= dims.len() || dims[axis] != per_channel {
            bail!("a per-channel vector of {per_channel} does not match dim {axis} of {shape:?}");
        }
        Ok(Self {
            outer: dims[..axis].iter().product(),
            channels: dims[axis],
            inner: dims[axis + 1..].iter().product(),
        })
    }

    /// `x · scale + shift` per channel (no `scale`: `x + shift`), in parallel over blocks of
    /// outer rows.
    fn affine<T: Real>(&self, x: &[T], scale: Option<&[T]>, shift: &[T]) -> Vec<T> {
        let mut out = vec![T::zero(); x.len()];
        let row = self.channels * self.inner;
        if row == 0 {
            return out;
        }
        let rows_per_task = ELEMENTS_PER_TASK.div_ceil(row);
        out.par_chunks_mut(row * rows_per_task)
            .zip(x.par_chunks(row * rows_per_task))
            .for_each(|(out, x)| {
                pulp::Arch::new().dispatch(AffineRows {
                    x,
                    out,
                    scale,
                    shift,
                    inner: self.inner,
                })
            });
        out
    }

    /// The sum of each channel over the outer and inner dims.
    fn sums<T: WithDType>(&self, x: &[T]) -> Vec<T> {
        let row = self.channels * self.inner;
        let rows_per_task = self.outer.div_ceil(rayon::current_num_threads()).max(1);
        let partials: Vec<Vec<T>> = x
            .par_chunks(row.max(1) * rows_per_task)
            .map(|rows| {
                let mut acc = vec![T::zero(); self.channels];
                for r in rows.chunks_exact(row.max(1)) {
                    for (c, a) in acc.iter_mut().enumerate() {
                        let plane = &r[c * self.inner..(c + 1) * self.inner];
                        *a = plane.iter().fold(*a, |s, &v| s + v);
                    }
                }
                acc
            })
            .collect();
        let mut total = vec![T::zero(); self.channels];
        for part in partials {
            for (t, p) in total.iter_mut().zip(part) {
                *t += p;
            }
        }
        total
    }
}

/// Rows `[channels, inner]` of the per-channel affine map, compiled for the best instruction
/// set the CPU has; the arithmetic is exactly `x · scale + shift` (or `x + shift`).
struct AffineRows<'a, T> {
    x: &'a [T],
    out: &'a mut [T],
    scale: Option<&'a [T]>,
    shift: &'a [T],
    inner: usize,
}

impl<T: Real> pulp::WithSimd for AffineRows<'_, T> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) {
        let Self {
            x,
            out,
            scale,
            shift,
            inner,
        } = self;
        let row = shift.len() * inner;
        for (out, x) in out.chunks_exact_mut(row).zip(x.chunks_exact(row)) {
            if inner == 1 {
                // Channels last (a linear layer's bias): the row runs along the channels.
                match scale {
                    Some(scale) => {
                        let params = scale.iter().zip(shift);
                        for ((o, &x), (&s, &b)) in out.iter_mut().zip(x).zip(params) {
                            *o = x * s + b;
                        }
                    }
                    None => {
                        for ((o, &x), &b) in out.iter_mut().zip(x).zip(shift) {
                            *o = x + b;
                        }
                    }
                }
                continue;
            }
            let planes = out.chunks_exact_mut(inner).zip(x.chunks_exact(inner));
            for (c, (out, x)) in planes.enumerate() {
                let b = shift[c];
                match scale {
                    Some(scale) => {
                        let s = scale[c];
                        for (o, &x) in out.iter_mut().zip(x) {
                            *o = x * s + b;
                        }
                    }
                    None => {
                        for (o, &x) in out.iter_mut().zip(x) {
                            *o = x + b;
                        }
                    }
                }
            }
        }
    }
}

pub(crate) struct AddBias {
    pub(crate) axis: usize,
}

impl CustomOp2 for AddBias {
    fn name(&self) -> &'static str {
        "add-channel-bias"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let ch = Channels::of(l1.shape(), self.axis, l2.shape().elem_count())?;
        let out = with_floats!((s1, s2), |x, b| {
            let b = contiguous(b, l2)?;
            ch.affine(contiguous(x, l1)?, None, b)
        });
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        bias: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // A frozen bias (the base model under an adapter) needs no gradient.
        let bias_grad = bias
            .track_op()
            .then(|| channel_sums(grad, self.axis))
            .transpose()?;
        Ok((x.track_op().then(|| grad.clone()), bias_grad))
    }
}

pub(crate) struct ScaleShift {
    pub(crate) axis: usize,
}

impl CustomOp3 for ScaleShift {
    fn name(&self) -> &'static str {
        "channel-scale-shift"
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
        let ch = Channels::of(l1.shape(), self.axis, l2.shape().elem_count())?;
        Channels::of(l1.shape(), self.axis, l3.shape().elem_count())?;
        let out = with_floats!((s1, s2, s3), |x, scale, shift| {
            let (scale, shift) = (contiguous(scale, l2)?, contiguous(shift, l3)?);
            ch.affine(contiguous(x, l1)?, Some(scale), shift)
        });
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        scale: &Tensor,
        shift: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // Frozen affine weights (the base model under an adapter) need no gradient.
        let grad = grad.contiguous()?;
        let x_grad = x
            .track_op()
            .then(|| {
                let no_shift = scale.zeros_like()?;
                grad.apply_op3_no_bwd(scale, &no_shift, &ScaleShift { axis: self.axis })
            })
            .transpose()?;
        let scale_grad = scale
            .track_op()
            .then(|| channel_sums(&(&grad * x)?, self.axis))
            .transpose()?;
        let shift_grad = shift
            .track_op()
            .then(|| channel_sums(&grad, self.axis))
            .transpose()?;
        Ok((x_grad, scale_grad, shift_grad))
    }
}

/// Each channel's sum (C) over every other dim.
fn channel_sums(t: &Tensor, axis: usize) -> Result<Tensor> {
    t.contiguous()?.apply_op1_no_bwd(&ChannelSums { axis })
}

struct ChannelSums {
    axis: usize,
}

impl CustomOp1 for ChannelSums {
    fn name(&self) -> &'static str {
        "channel-sums"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let channels = l.shape().dims().get(self.axis).copied().unwrap_or(0);
        let ch = Channels::of(l.shape(), self.axis, channels)?;
        #[allow(unused_parens)] // one storage: the macro's tuple pattern is a parenthesised one
        let out = with_floats!((s), |x| ch.sums(contiguous(x, l)?));
        Ok((out, Shape::from(channels)))
    }
}
