//! diffusers' `UNet2DConditionModel` (SD 1.x / 2.x), differentiable, with a hook in every
//! cross-attention layer.

mod blocks;
pub mod config;
pub mod transformer;

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::engine::nn::linear::Linear;

use blocks::{DownBlock, MidBlock, UpBlock};
pub use config::UNetConfig;
use transformer::Transformer2D;
pub use transformer::{AdaptableLayer, CrossAttnLayer, UNetHook};

use crate::engine::nn::conv::Conv2d;
use crate::engine::nn::{GroupNorm, conv2d, group_norm, linear};

pub struct UNet {
    conv_in: Conv2d,
    time_linear_1: Linear,
    time_linear_2: Linear,
    down: Vec<DownBlock>,
    mid: Option<MidBlock>,
    up: Vec<UpBlock>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
    config: UNetConfig,
}

impl UNet {
    pub fn new(vb: VarBuilder, config: &UNetConfig) -> Result<Self> {
        let c0 = config.down[0].1.channels;
        let temb = 4 * c0;
        let mut next_index = 0;
        let mut down = Vec::new();
        let mut in_ch = c0;
        for (i, (kind, stage)) in config.down.iter().enumerate() {
            let is_final = i + 1 == config.down.len();
            down.push(DownBlock::new(
                vb.pp(format!("down_blocks.{i}")),
                &format!("down_blocks.{i}"),
                *kind,
                stage,
                in_ch,
                temb,
                !is_final,
                config,
                &mut next_index,
            )?);
            in_ch = stage.channels;
        }
        let deepest = &config.down.last().expect("at least one block").1;
        let mid = config
            .has_mid_block
            .then(|| MidBlock::new(vb.pp("mid_block"), deepest, temb, config, &mut next_index))
            .transpose()?;
        let mut up = Vec::new();
        let mut prev_out = deepest.channels;
        let n = config.up.len();
        for (i, (kind, stage)) in config.up.iter().enumerate() {
            let is_final = i + 1 == n;
            // The skip connections of the last resnet come from the stage below (or conv_in).
            let skip_in = config.up[(i + 1).min(n - 1)].1.channels;
            up.push(UpBlock::new(
                vb.pp(format!("up_blocks.{i}")),
                &format!("up_blocks.{i}"),
                *kind,
                stage,
                prev_out,
                skip_in,
                temb,
                !is_final,
                config,
                &mut next_index,
            )?);
            prev_out = stage.channels;
        }
        let pad_in = (config.conv_in_kernel - 1) / 2;
        let pad_out = (config.conv_out_kernel - 1) / 2;
        Ok(Self {
            conv_in: conv2d(
                vb.pp("conv_in"),
                config.in_channels,
                c0,
                config.conv_in_kernel,
                1,
                pad_in,
            )?,
            time_linear_1: linear(vb.pp("time_embedding.linear_1"), c0, temb, true)?,
            time_linear_2: linear(vb.pp("time_embedding.linear_2"), temb, temb, true)?,
            down,
            mid,
            up,
            norm_out: group_norm(vb.pp("conv_norm_out"), config.groups, c0, config.eps)?,
            conv_out: conv2d(
                vb.pp("conv_out"),
                c0,
                config.out_channels,
                config.conv_out_kernel,
                1,
                pad_out,
            )?,
            config: config.clone(),
        })
    }

    pub fn config(&self) -> &UNetConfig {
        &self.config
    }

    /// Every cross-attention layer, in module order (their `index` is their position here).
    pub fn cross_attn_layers(&self) -> Vec<&CrossAttnLayer> {
        self.transformers()
            .flat_map(|t| t.cross_attn_layers())
            .collect()
    }

    /// Every layer a [`UNetHook`] can add to, in module order.
    pub fn adaptable_layers(&self) -> Vec<AdaptableLayer> {
        self.transformers()
            .flat_map(|t| t.adaptable_layers())
            .collect()
    }

    /// The transformers of the down, mid and up blocks, in module order.
    fn transformers(&self) -> impl Iterator<Item = &Transformer2D> {
        let down = self.down.iter().flat_map(|b| b.transformers());
        let mid = self.mid.iter().flat_map(|b| b.transformers());
        let up = self.up.iter().flat_map(|b| b.transformers());
        down.chain(mid).chain(up)
    }

    /// Noise (or v) prediction for `sample` [B, C, H, W] at `timesteps` [B] (any dtype), with
    /// text context [B, L, D]. `hook` replaces how every cross-attention layer computes K and V.
    pub fn forward(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        context: &Tensor,
        hook: Option<&dyn UNetHook>,
    ) -> Result<Tensor> {
        let batch = sample.dim(0)?;
        let c0 = self.config.down[0].1.channels;
        let t_emb = timestep_embedding(timesteps, batch, c0, &self.config, sample.dtype())?
            .to_device(sample.device())?;
        let temb = self
            .time_linear_2
            .forward(&self.time_linear_1.forward(&t_emb)?.silu()?)?;
        let sample = if self.config.center_input_sample {
            ((sample * 2.0)? - 1.0)?
        } else {
            sample.clone()
        };
        let mut h = self.conv_in.forward(&sample)?;
        let mut skips = vec![h.clone()];
        for block in &self.down {
            let (out, states) = block.forward(&h, &temb, context, hook)?;
            h = out;
            skips.extend(states);
        }
        if let Some(mid) = &self.mid {
            h = mid.forward(&h, &temb, context, hook)?;
        }
        for block in &self.up {
            let take = block.num_skips();
            let block_skips = skips.split_off(skips.len() - take);
            // Up-sample to the size of the next skip connection, so odd sizes round-trip.
            let upsample_size = skips
                .last()
                .map(|s| s.dims4())
                .transpose()?
                .map(|(_, _, hh, ww)| (hh, ww));
            h = block.forward(&h, block_skips, &temb, context, hook, upsample_size)?;
        }
        self.conv_out.forward(&self.norm_out.forward_silu(&h)?)
    }
}

/// Sinusoidal timestep embedding (diffusers' `get_timestep_embedding`), [B, dim].
fn timestep_embedding(
    timesteps: &Tensor,
    batch: usize,
    dim: usize,
    cfg: &UNetConfig,
    dtype: DType,
) -> Result<Tensor> {
    let ts = timesteps
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1::<f64>()?;
    let ts = match ts.len() {
        1 => vec![ts[0]; batch],
        n if n == batch => ts,
        n => candle_core::bail!("{n} timesteps for a batch of {batch}"),
    };
    let half = dim / 2;
    let freqs: Vec<f64> = (0..half)
        .map(|i| (-(10000f64.ln()) * i as f64 / (half as f64 - cfg.freq_shift)).exp())
        .collect();
    let mut values = Vec::with_capacity(batch * dim);
    for t in ts {
        let sin = freqs.iter().map(|f| (t * f).sin());
        let cos = freqs.iter().map(|f| (t * f).cos());
        let row: Vec<f64> = if cfg.flip_sin_to_cos {
            cos.chain(sin).collect()
        } else {
            sin.chain(cos).collect()
        };
        values.extend(row);
        values.extend(std::iter::repeat_n(0.0, dim - 2 * half));
    }
    Tensor::from_vec(values, (batch, dim), &candle_core::Device::Cpu)?.to_dtype(dtype)
}
