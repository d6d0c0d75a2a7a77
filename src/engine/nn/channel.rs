//! Per-channel bias and scale-and-shift (convolution biases, norm affines) with a backward that
//! sums each channel's gradient in one parallel pass.
//!
//! candle differentiates a broadcast by summing the gradient over the broadcast dims; unless they
//! are the trailing dims it does so single-threaded with integer divisions per element and dim.
//! A `(1, C, 1, 1)` bias on an NCHW activation, or a `(C)` norm weight on `(B, T, C)` tokens, hits
//! that path: it was 15 % of a demo UNet training step. Other devices and dtypes broadcast.

use candle_core::{Result, Tensor};

use crate::engine::kernels;
use crate::engine::kernels::channel::{AddBias, ScaleShift};

/// `x + bias`, with `bias` (C) along dim `axis` of `x`.
pub fn add_bias(x: &Tensor, bias: &Tensor, axis: usize) -> Result<Tensor> {
    if !kernels::supports(x.device(), x.dtype()) {
        return x.broadcast_add(&along(bias, x, axis)?);
    }
    x.contiguous()?
        .apply_op2(&bias.contiguous()?, AddBias { axis })
}

/// A layer's bias split by who adds it: a frozen one (first) is added by the op producing the
/// layer's output, in place; one being trained (second) needs [`add_bias`], its own op with a
/// backward.
pub fn split_frozen_bias(bias: Option<&Tensor>) -> Result<(Option<Tensor>, Option<&Tensor>)> {
    Ok(match bias {
        Some(b) if !b.track_op() => (Some(b.contiguous()?), None),
        other => (None, other),
    })
}

/// `x · scale + shift`, with `scale` and `shift` (C) along dim `axis` of `x`.
pub fn scale_shift(x: &Tensor, scale: &Tensor, shift: &Tensor, axis: usize) -> Result<Tensor> {
    if !kernels::supports(x.device(), x.dtype()) {
        return x
            .broadcast_mul(&along(scale, x, axis)?)?
            .broadcast_add(&along(shift, x, axis)?);
    }
    x.contiguous()?.apply_op3(
        &scale.contiguous()?,
        &shift.contiguous()?,
        ScaleShift { axis },
    )
}

/// `v` (C) reshaped to broadcast along dim `axis` of `x`.
fn along(v: &Tensor, x: &Tensor, axis: usize) -> Result<Tensor> {
    let mut dims = vec![1; x.rank()];
    dims[axis] = v.elem_count();
    v.reshape(dims)
}
