//! diffusers' `AutoencoderKL`: encoder (image → latent distribution) and decoder.

use std::path::Path;

use anyhow::{Context, bail};
use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::engine::nn::linear::Linear;
use serde::Deserialize;

use crate::engine::io::config::{read_json, require_default, require_silu};
use crate::engine::nn::attention::attention;
use crate::engine::nn::conv::Conv2d;
use crate::engine::nn::resnet::{ResnetBlock, ResnetConfig};
use crate::engine::nn::sampling::{Downsample, Upsample};
use crate::engine::nn::{GroupNorm, conv2d, group_norm, linear};

const VAE_EPS: f64 = 1e-6;

/// Older diffusers checkpoints name the mid-block attention projections differently.
pub const WEIGHT_ALIASES: &[(&str, &str)] = &[
    (".to_q.", ".query."),
    (".to_k.", ".key."),
    (".to_v.", ".value."),
    (".to_out.0.", ".proj_attn."),
];

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct VaeConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub act_fn: String,
    pub latent_channels: usize,
    pub norm_num_groups: usize,
    pub scaling_factor: f64,
    pub use_quant_conv: bool,
    pub use_post_quant_conv: bool,
    pub mid_block_add_attention: bool,
}

impl Default for VaeConfig {
    fn default() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            down_block_types: vec!["DownEncoderBlock2D".into()],
            up_block_types: vec!["UpDecoderBlock2D".into()],
            block_out_channels: vec![64],
            layers_per_block: 1,
            act_fn: "silu".into(),
            latent_channels: 4,
            norm_num_groups: 32,
            scaling_factor: 0.18215,
            use_quant_conv: true,
            use_post_quant_conv: true,
            mid_block_add_attention: true,
        }
    }
}

impl VaeConfig {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let cfg: Self = read_json(path)?;
        cfg.validate()
            .with_context(|| format!("{}: unsupported VAE config", path.display()))?;
        Ok(cfg)
    }

    fn validate(&self) -> anyhow::Result<()> {
        require_silu("act_fn", &self.act_fn)?;
        let n = self.block_out_channels.len();
        if n == 0 || self.down_block_types.len() != n || self.up_block_types.len() != n {
            bail!(
                "down_block_types, up_block_types and block_out_channels must have the same, non-zero length"
            );
        }
        for t in &self.down_block_types {
            require_default("down_block_types[]", &t.as_str(), &"DownEncoderBlock2D")?;
        }
        for t in &self.up_block_types {
            require_default("up_block_types[]", &t.as_str(), &"UpDecoderBlock2D")?;
        }
        Ok(())
    }

    /// Spatial down-sampling factor between image and latents.
    pub fn downscale(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }
}

/// Single-head self-attention over all pixels, with group norm and a residual.
struct MidAttention {
    norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
}

impl MidAttention {
    fn new(vb: VarBuilder, c: usize, groups: usize) -> Result<Self> {
        Ok(Self {
            norm: group_norm(vb.pp("group_norm"), groups, c, VAE_EPS)?,
            to_q: linear(vb.pp("to_q"), c, c, true)?,
            to_k: linear(vb.pp("to_k"), c, c, true)?,
            to_v: linear(vb.pp("to_v"), c, c, true)?,
            to_out: linear(vb.pp("to_out.0"), c, c, true)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let tokens = self
            .norm
            .forward(x)?
            .reshape((b, c, h * w))?
            .transpose(1, 2)?
            .contiguous()?;
        let q = self.to_q.forward(&tokens)?;
        let k = self.to_k.forward(&tokens)?;
        let v = self.to_v.forward(&tokens)?;
        let out = self.to_out.forward(&attention(&q, &k, &v, 1, false)?)?;
        out.transpose(1, 2)?.reshape((b, c, h, w))? + x
    }
}

struct MidBlock {
    first: ResnetBlock,
    attention: Option<MidAttention>,
    second: ResnetBlock,
}

impl MidBlock {
    fn new(vb: VarBuilder, cfg: &VaeConfig) -> Result<Self> {
        let c = *cfg.block_out_channels.last().expect("validated");
        let rcfg = resnet(cfg, c, c);
        Ok(Self {
            first: ResnetBlock::new(vb.pp("resnets.0"), rcfg)?,
            attention: cfg
                .mid_block_add_attention
                .then(|| MidAttention::new(vb.pp("attentions.0"), c, cfg.norm_num_groups))
                .transpose()?,
            second: ResnetBlock::new(vb.pp("resnets.1"), rcfg)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.first.forward(x, None)?;
        if let Some(attn) = &self.attention {
            h = attn.forward(&h)?;
        }
        self.second.forward(&h, None)
    }
}

fn resnet(cfg: &VaeConfig, cin: usize, cout: usize) -> ResnetConfig {
    ResnetConfig {
        in_channels: cin,
        out_channels: cout,
        temb_channels: None,
        groups: cfg.norm_num_groups,
        eps: VAE_EPS,
        output_scale_factor: 1.0,
    }
}

struct Encoder {
    conv_in: Conv2d,
    blocks: Vec<(Vec<ResnetBlock>, Option<Downsample>)>,
    mid: MidBlock,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    fn new(vb: VarBuilder, cfg: &VaeConfig) -> Result<Self> {
        let chans = &cfg.block_out_channels;
        let mut blocks = Vec::new();
        let mut cin = chans[0];
        for (i, &cout) in chans.iter().enumerate() {
            let bvb = vb.pp(format!("down_blocks.{i}"));
            let resnets = (0..cfg.layers_per_block)
                .map(|j| {
                    let c = if j == 0 { cin } else { cout };
                    ResnetBlock::new(bvb.pp(format!("resnets.{j}")), resnet(cfg, c, cout))
                })
                .collect::<Result<Vec<_>>>()?;
            let down = (i + 1 < chans.len())
                .then(|| Downsample::new(bvb.pp("downsamplers.0"), cout, 0))
                .transpose()?;
            blocks.push((resnets, down));
            cin = cout;
        }
        let last = *chans.last().expect("validated");
        Ok(Self {
            conv_in: conv2d(vb.pp("conv_in"), cfg.in_channels, chans[0], 3, 1, 1)?,
            blocks,
            mid: MidBlock::new(vb.pp("mid_block"), cfg)?,
            norm_out: group_norm(vb.pp("conv_norm_out"), cfg.norm_num_groups, last, VAE_EPS)?,
            conv_out: conv2d(vb.pp("conv_out"), last, 2 * cfg.latent_channels, 3, 1, 1)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.conv_in.forward(x)?;
        for (resnets, down) in &self.blocks {
            for r in resnets {
                h = r.forward(&h, None)?;
            }
            if let Some(d) = down {
                h = d.forward(&h)?;
            }
        }
        let h = self.mid.forward(&h)?;
        self.conv_out.forward(&self.norm_out.forward_silu(&h)?)
    }
}

struct Decoder {
    conv_in: Conv2d,
    mid: MidBlock,
    blocks: Vec<(Vec<ResnetBlock>, Option<Upsample>)>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    fn new(vb: VarBuilder, cfg: &VaeConfig) -> Result<Self> {
        let reversed: Vec<usize> = cfg.block_out_channels.iter().rev().copied().collect();
        let mut blocks = Vec::new();
        let mut cin = reversed[0];
        for (i, &cout) in reversed.iter().enumerate() {
            let bvb = vb.pp(format!("up_blocks.{i}"));
            let resnets = (0..cfg.layers_per_block + 1)
                .map(|j| {
                    let c = if j == 0 { cin } else { cout };
                    ResnetBlock::new(bvb.pp(format!("resnets.{j}")), resnet(cfg, c, cout))
                })
                .collect::<Result<Vec<_>>>()?;
            let up = (i + 1 < reversed.len())
                .then(|| Upsample::new(bvb.pp("upsamplers.0"), cout))
                .transpose()?;
            blocks.push((resnets, up));
            cin = cout;
        }
        let first = cfg.block_out_channels[0];
        Ok(Self {
            conv_in: conv2d(vb.pp("conv_in"), cfg.latent_channels, reversed[0], 3, 1, 1)?,
            mid: MidBlock::new(vb.pp("mid_block"), cfg)?,
            blocks,
            norm_out: group_norm(vb.pp("conv_norm_out"), cfg.norm_num_groups, first, VAE_EPS)?,
            conv_out: conv2d(vb.pp("conv_out"), first, cfg.out_channels, 3, 1, 1)?,
        })
    }

    fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let mut h = self.mid.forward(&self.conv_in.forward(z)?)?;
        for (resnets, up) in &self.blocks {
            for r in resnets {
                h = r.forward(&h, None)?;
            }
            if let Some(u) = up {
                h = u.forward(&h, None)?;
            }
        }
        self.conv_out.forward(&self.norm_out.forward_silu(&h)?)
    }
}

/// Mean and log-variance of the latent posterior for an image batch.
pub struct LatentDistribution {
    pub mean: Tensor,
    pub logvar: Tensor,
}

impl LatentDistribution {
    /// `mean + std · noise`; `noise` has the mean's shape.
    pub fn sample(&self, noise: &Tensor) -> Result<Tensor> {
        let std = (&self.logvar * 0.5)?.exp()?;
        self.mean.clone() + (std * noise)?
    }
}

pub struct AutoencoderKl {
    encoder: Encoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
    decoder: Decoder,
    config: VaeConfig,
}

impl AutoencoderKl {
    pub fn new(vb: VarBuilder, config: &VaeConfig) -> Result<Self> {
        let l = config.latent_channels;
        Ok(Self {
            encoder: Encoder::new(vb.pp("encoder"), config)?,
            quant_conv: config
                .use_quant_conv
                .then(|| conv2d(vb.pp("quant_conv"), 2 * l, 2 * l, 1, 1, 0))
                .transpose()?,
            post_quant_conv: config
                .use_post_quant_conv
                .then(|| conv2d(vb.pp("post_quant_conv"), l, l, 1, 1, 0))
                .transpose()?,
            decoder: Decoder::new(vb.pp("decoder"), config)?,
            config: config.clone(),
        })
    }

    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    /// Image in [-1, 1], [B, 3, H, W] → unscaled latent posterior.
    pub fn encode(&self, image: &Tensor) -> Result<LatentDistribution> {
        let mut moments = self.encoder.forward(image)?;
        if let Some(q) = &self.quant_conv {
            moments = q.forward(&moments)?;
        }
        let l = self.config.latent_channels;
        Ok(LatentDistribution {
            mean: moments.narrow(1, 0, l)?,
            logvar: moments.narrow(1, l, l)?.clamp(-30.0, 20.0)?,
        })
    }

    /// Unscaled latents → image (raw decoder output, about [-1, 1]).
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let z = match &self.post_quant_conv {
            Some(p) => p.forward(latents)?,
            None => latents.clone(),
        };
        self.decoder.forward(&z)
    }

    /// Latents as the UNet sees them → unscaled latents. Like diffusers' SD pipelines, only
    /// `scaling_factor` applies (`shift_factor` belongs to later model families).
    pub fn unscale(&self, latents: &Tensor) -> Result<Tensor> {
        latents / self.config.scaling_factor
    }

    /// Unscaled latents → latents as the UNet sees them.
    pub fn scale(&self, latents: &Tensor) -> Result<Tensor> {
        latents * self.config.scaling_factor
    }
}
