//! A whole CLIP model (transformers' `CLIPModel`): both towers and their projections into the
//! shared embedding space. The demo world's reward and judge, and zero-shot detectors on real
//! models, are built on it.

mod encoder;
pub mod text;
pub mod vision;

use std::path::Path;

use anyhow::Context;
use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;

use serde::Deserialize;

use crate::engine::nn::linear;
use crate::engine::nn::linear::Linear;
use text::{ClipTextConfig, ClipTextModel};
use vision::{ClipVisionConfig, ClipVisionModel};

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct ClipModelConfig {
    pub text_config: ClipTextConfig,
    pub vision_config: ClipVisionConfig,
    pub projection_dim: usize,
    pub logit_scale_init_value: f64,
}

impl Default for ClipModelConfig {
    fn default() -> Self {
        Self {
            text_config: ClipTextConfig::default(),
            vision_config: ClipVisionConfig::default(),
            projection_dim: 512,
            logit_scale_init_value: 2.6592,
        }
    }
}

pub struct ClipModel {
    pub text: ClipTextModel,
    pub vision: ClipVisionModel,
    text_projection: Linear,
    visual_projection: Linear,
    logit_scale: Tensor,
}

impl ClipModel {
    pub fn new(vb: VarBuilder, config: &ClipModelConfig) -> Result<Self> {
        let p = config.projection_dim;
        Ok(Self {
            text: ClipTextModel::new(vb.clone(), &config.text_config)?,
            vision: ClipVisionModel::new(vb.clone(), &config.vision_config)?,
            text_projection: linear(
                vb.pp("text_projection"),
                config.text_config.hidden_size,
                p,
                false,
            )?,
            visual_projection: linear(
                vb.pp("visual_projection"),
                config.vision_config.hidden_size,
                p,
                false,
            )?,
            logit_scale: vb.get_with_hints(
                (),
                "logit_scale",
                candle_nn::Init::Const(config.logit_scale_init_value),
            )?,
        })
    }

    /// Loads `config.json` + `model.safetensors` (or sharded / fp16 variants) from a folder.
    pub fn load(dir: &Path, device: &Device, dtype: DType) -> anyhow::Result<Self> {
        let config: ClipModelConfig =
            crate::engine::io::config::read_json(&dir.join("config.json"))?;
        config
            .text_config
            .validate()
            .with_context(|| format!("{}: text_config", dir.display()))?;
        let files = crate::engine::io::weights::weight_files(dir, "model")?;
        let vb = crate::engine::io::weights::WeightFiles::open(&files, &[])?
            .into_var_builder(dtype, device);
        Self::new(vb, &config).with_context(|| format!("loading CLIP model {}", dir.display()))
    }

    /// Projected text features [B, P] (not normalised), as `get_text_features`.
    pub fn text_embeds(&self, input_ids: &Tensor) -> Result<Tensor> {
        let hidden = self.text.forward(input_ids)?;
        self.text_projection
            .forward(&self.text.pooled(&hidden, input_ids)?)
    }

    /// Projected image features [B, P] (not normalised) for CLIP-normalised pixels, as
    /// `get_image_features`.
    pub fn image_embeds(&self, pixel_values: &Tensor) -> Result<Tensor> {
        self.visual_projection
            .forward(&self.vision.forward(pixel_values)?)
    }

    /// exp(logit_scale): the temperature of image–text similarities.
    pub fn logit_scale(&self) -> Result<Tensor> {
        self.logit_scale.exp()
    }
}

/// Features scaled to unit length along the last dim, for cosine similarities.
pub fn unit_length(x: &Tensor) -> Result<Tensor> {
    x.broadcast_div(&x.sqr()?.sum_keepdim(candle_core::D::Minus1)?.sqrt()?)
}
