//! 2-D convolution: every model's convolutions go through [`Conv2d`].
//!
//! On the CPU in f32/f64 the convolution is lowered to im2col + one GEMM per image, forward and
//! backward, as a custom op. candle's own CPU backward is the training bottleneck: its input
//! gradient is a direct (non-GEMM) transposed convolution and its weight gradient is a
//! convolution whose "kernel" is the whole output image, which the tiled im2col handles with
//! GEMMs nine columns wide. Other devices and dtypes use candle's convolution (cuDNN on CUDA).

use candle_core::{Module, Result, Tensor};
use candle_nn::{Init, VarBuilder};

use super::channel::{add_bias, split_frozen_bias};
use crate::engine::kernels;
use crate::engine::kernels::conv::Im2ColConv;

/// A convolution layer (dilation 1, one group), weights `[out, in, kh, kw]`, optional bias.
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Tensor,
    bias: Option<Tensor>,
    stride: usize,
    padding: usize,
}

impl Conv2d {
    /// `[out, in, kh, kw]`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// Weights named `weight` (and `bias`) under `vb`, initialised like PyTorch's `Conv2d`.
    pub fn load(
        vb: VarBuilder,
        (in_ch, out_ch, kernel): (usize, usize, usize),
        stride: usize,
        padding: usize,
        bias: bool,
    ) -> Result<Self> {
        let fan_in = (in_ch * kernel * kernel) as f64;
        let bound = 1.0 / fan_in.sqrt();
        let uniform = Init::Uniform {
            lo: -bound,
            up: bound,
        };
        let weight = vb.get_with_hints((out_ch, in_ch, kernel, kernel), "weight", uniform)?;
        let bias = if bias {
            Some(vb.get_with_hints(out_ch, "bias", uniform)?)
        } else {
            None
        };
        Ok(Self {
            weight,
            bias,
            stride,
            padding,
        })
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (y, bias) = if kernels::supports(x.device(), x.dtype()) {
            let (_, _, h, w) = x.dims4()?;
            let (fused_bias, bias) = split_frozen_bias(self.bias.as_ref())?;
            let op = Im2ColConv {
                stride: self.stride,
                padding: self.padding,
                input_hw: (h, w),
                bias: fused_bias,
            };
            (
                x.contiguous()?.apply_op2(&self.weight.contiguous()?, op)?,
                bias,
            )
        } else {
            let y = x.conv2d(&self.weight, self.padding, self.stride, 1, 1)?;
            (y, self.bias.as_ref())
        };
        match bias {
            Some(bias) => add_bias(&y, bias, 1),
            None => Ok(y),
        }
    }
}
