//! The UNet's down, mid and up blocks (plain and cross-attention variants).

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use super::config::{DownKind, StageConfig, UNetConfig, UpKind};
use super::transformer::{Transformer2D, TransformerConfig, UNetHook};
use crate::engine::nn::resnet::{ResnetBlock, ResnetConfig};
use crate::engine::nn::sampling::{Downsample, Upsample};

fn resnet_config(
    cfg: &UNetConfig,
    cin: usize,
    cout: usize,
    temb: usize,
    scale: f64,
) -> ResnetConfig {
    ResnetConfig {
        in_channels: cin,
        out_channels: cout,
        temb_channels: Some(temb),
        groups: cfg.groups,
        eps: cfg.eps,
        output_scale_factor: scale,
    }
}

/// The transformer `attentions.{j}` of the block at `path`.
fn attention_layer(
    vb: &VarBuilder,
    path: &str,
    j: usize,
    stage: &StageConfig,
    cfg: &UNetConfig,
    next_index: &mut usize,
) -> Result<Transformer2D> {
    let name = format!("attentions.{j}");
    let tcfg = TransformerConfig {
        channels: stage.channels,
        heads: stage.heads,
        layers: stage.transformer_layers,
        context_dim: stage.context_dim,
        groups: cfg.groups,
        linear_projection: cfg.linear_projection,
    };
    Transformer2D::new(vb.pp(&name), &tcfg, &format!("{path}.{name}"), next_index)
}

pub struct DownBlock {
    resnets: Vec<ResnetBlock>,
    attentions: Vec<Transformer2D>,
    downsample: Option<Downsample>,
}

impl DownBlock {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        vb: VarBuilder,
        path: &str,
        kind: DownKind,
        stage: &StageConfig,
        in_channels: usize,
        temb: usize,
        add_downsample: bool,
        cfg: &UNetConfig,
        next_index: &mut usize,
    ) -> Result<Self> {
        let mut resnets = Vec::new();
        let mut attentions = Vec::new();
        for j in 0..stage.layers {
            let cin = if j == 0 { in_channels } else { stage.channels };
            let rcfg = resnet_config(cfg, cin, stage.channels, temb, 1.0);
            resnets.push(ResnetBlock::new(vb.pp(format!("resnets.{j}")), rcfg)?);
            if kind == DownKind::CrossAttn {
                attentions.push(attention_layer(&vb, path, j, stage, cfg, next_index)?);
            }
        }
        let downsample = add_downsample
            .then(|| {
                Downsample::new(
                    vb.pp("downsamplers.0"),
                    stage.channels,
                    cfg.downsample_padding,
                )
            })
            .transpose()?;
        Ok(Self {
            resnets,
            attentions,
            downsample,
        })
    }

    pub fn transformers(&self) -> impl Iterator<Item = &Transformer2D> {
        self.attentions.iter()
    }

    /// Output and the skip states it leaves for the up path.
    pub fn forward(
        &self,
        x: &Tensor,
        temb: &Tensor,
        context: &Tensor,
        hook: Option<&dyn UNetHook>,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let mut h = x.clone();
        let mut states = Vec::new();
        for (j, resnet) in self.resnets.iter().enumerate() {
            h = resnet.forward(&h, Some(temb))?;
            if let Some(attn) = self.attentions.get(j) {
                h = attn.forward(&h, context, hook)?;
            }
            states.push(h.clone());
        }
        if let Some(down) = &self.downsample {
            h = down.forward(&h)?;
            states.push(h.clone());
        }
        Ok((h, states))
    }
}

pub struct MidBlock {
    first: ResnetBlock,
    layers: Vec<(Transformer2D, ResnetBlock)>,
}

impl MidBlock {
    pub fn new(
        vb: VarBuilder,
        stage: &StageConfig,
        temb: usize,
        cfg: &UNetConfig,
        next_index: &mut usize,
    ) -> Result<Self> {
        let c = stage.channels;
        let rcfg = resnet_config(cfg, c, c, temb, cfg.mid_block_scale_factor);
        let first = ResnetBlock::new(vb.pp("resnets.0"), rcfg)?;
        let attn = attention_layer(&vb, "mid_block", 0, stage, cfg, next_index)?;
        let second = ResnetBlock::new(vb.pp("resnets.1"), rcfg)?;
        Ok(Self {
            first,
            layers: vec![(attn, second)],
        })
    }

    pub fn transformers(&self) -> impl Iterator<Item = &Transformer2D> {
        self.layers.iter().map(|(a, _)| a)
    }

    pub fn forward(
        &self,
        x: &Tensor,
        temb: &Tensor,
        context: &Tensor,
        hook: Option<&dyn UNetHook>,
    ) -> Result<Tensor> {
        let mut h = self.first.forward(x, Some(temb))?;
        for (attn, resnet) in &self.layers {
            h = attn.forward(&h, context, hook)?;
            h = resnet.forward(&h, Some(temb))?;
        }
        Ok(h)
    }
}

pub struct UpBlock {
    resnets: Vec<ResnetBlock>,
    attentions: Vec<Transformer2D>,
    upsample: Option<Upsample>,
}

impl UpBlock {
    /// `prev_channels`: width of the incoming hidden state; `skip_in_channels`: width of the
    /// deepest skip this block consumes last.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        vb: VarBuilder,
        path: &str,
        kind: UpKind,
        stage: &StageConfig,
        prev_channels: usize,
        skip_in_channels: usize,
        temb: usize,
        add_upsample: bool,
        cfg: &UNetConfig,
        next_index: &mut usize,
    ) -> Result<Self> {
        let c = stage.channels;
        let layers = stage.layers + 1;
        let mut resnets = Vec::new();
        let mut attentions = Vec::new();
        for j in 0..layers {
            let skip = if j + 1 == layers { skip_in_channels } else { c };
            let cin = if j == 0 { prev_channels } else { c };
            let rcfg = resnet_config(cfg, cin + skip, c, temb, 1.0);
            resnets.push(ResnetBlock::new(vb.pp(format!("resnets.{j}")), rcfg)?);
            if kind == UpKind::CrossAttn {
                attentions.push(attention_layer(&vb, path, j, stage, cfg, next_index)?);
            }
        }
        let upsample = add_upsample
            .then(|| Upsample::new(vb.pp("upsamplers.0"), c))
            .transpose()?;
        Ok(Self {
            resnets,
            attentions,
            upsample,
        })
    }

    pub fn num_skips(&self) -> usize {
        self.resnets.len()
    }

    pub fn transformers(&self) -> impl Iterator<Item = &Transformer2D> {
        self.attentions.iter()
    }

    /// `skips` are this block's skip states in the order they were produced; they are consumed
    /// from the last.
    pub fn forward(
        &self,
        x: &Tensor,
        mut skips: Vec<Tensor>,
        temb: &Tensor,
        context: &Tensor,
        hook: Option<&dyn UNetHook>,
        upsample_size: Option<(usize, usize)>,
    ) -> Result<Tensor> {
        let mut h = x.clone();
        for (j, resnet) in self.resnets.iter().enumerate() {
            let skip = skips.pop().expect("one skip per resnet");
            h = resnet.forward(&Tensor::cat(&[&h, &skip], 1)?, Some(temb))?;
            if let Some(attn) = self.attentions.get(j) {
                h = attn.forward(&h, context, hook)?;
            }
        }
        match &self.upsample {
            Some(up) => up.forward(&h, upsample_size),
            None => Ok(h),
        }
    }
}
