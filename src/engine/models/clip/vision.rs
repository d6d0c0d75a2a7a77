//! CLIP image tower (transformers' `CLIPVisionModel`): a ViT over square patches.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use super::encoder::{Activation, ClipEncoder, EncoderShape};
use crate::engine::nn::LayerNorm;
use crate::engine::nn::conv::Conv2d;

/// transformers' `CLIPVisionConfig`, with its defaults.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct ClipVisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_channels: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub hidden_act: Activation,
    pub layer_norm_eps: f64,
}

impl Default for ClipVisionConfig {
    fn default() -> Self {
        Self {
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            num_channels: 3,
            image_size: 224,
            patch_size: 32,
            hidden_act: Activation::QuickGelu,
            layer_norm_eps: 1e-5,
        }
    }
}

impl ClipVisionConfig {
    pub fn encoder_shape(&self) -> EncoderShape {
        EncoderShape {
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            layers: self.num_hidden_layers,
            heads: self.num_attention_heads,
            act: self.hidden_act,
            eps: self.layer_norm_eps,
        }
    }

    fn patches(&self) -> usize {
        (self.image_size / self.patch_size).pow(2)
    }
}

pub struct ClipVisionModel {
    class_embedding: Tensor,
    patch_embedding: Conv2d,
    position_embedding: Tensor,
    pre_norm: LayerNorm,
    encoder: ClipEncoder,
    post_norm: LayerNorm,
    config: ClipVisionConfig,
}

impl ClipVisionModel {
    /// `vb` points at the checkpoint root; names are looked up under `vision_model.`.
    pub fn new(vb: VarBuilder, config: &ClipVisionConfig) -> Result<Self> {
        let vb = vb.pp("vision_model");
        let emb = vb.pp("embeddings");
        let d = config.hidden_size;
        if config.image_size % config.patch_size != 0 {
            candle_core::bail!(
                "image_size {} is not a multiple of patch_size {}",
                config.image_size,
                config.patch_size
            );
        }
        let small = candle_nn::Init::Randn {
            mean: 0.0,
            stdev: 0.02,
        };
        Ok(Self {
            class_embedding: emb.get_with_hints(d, "class_embedding", small)?,
            patch_embedding: Conv2d::load(
                emb.pp("patch_embedding"),
                (config.num_channels, d, config.patch_size),
                config.patch_size,
                0,
                false,
            )?,
            position_embedding: emb.pp("position_embedding").get_with_hints(
                (config.patches() + 1, d),
                "weight",
                small,
            )?,
            // "pre_layrnorm" is transformers' spelling.
            pre_norm: LayerNorm::new(vb.pp("pre_layrnorm"), d, config.layer_norm_eps)?,
            encoder: ClipEncoder::new(vb.pp("encoder"), &config.encoder_shape())?,
            post_norm: LayerNorm::new(vb.pp("post_layernorm"), d, config.layer_norm_eps)?,
            config: config.clone(),
        })
    }

    pub fn config(&self) -> &ClipVisionConfig {
        &self.config
    }

    /// Normalised pixels [B, C, S, S] (S = image_size) → pooled output [B, D] (the class token
    /// after the final norm).
    pub fn forward(&self, pixel_values: &Tensor) -> Result<Tensor> {
        let (b, _, h, w) = pixel_values.dims4()?;
        let s = self.config.image_size;
        if (h, w) != (s, s) {
            candle_core::bail!("the image tower takes {s}×{s} images, got {h}×{w}");
        }
        let d = self.config.hidden_size;
        let patches = self
            .patch_embedding
            .forward(pixel_values)?
            .flatten_from(2)?
            .transpose(1, 2)?;
        let class = self.class_embedding.reshape((1, 1, d))?.expand((b, 1, d))?;
        let tokens =
            Tensor::cat(&[&class, &patches], 1)?.broadcast_add(&self.position_embedding)?;
        let hidden = self
            .encoder
            .forward(&self.pre_norm.forward(&tokens)?, false)?;
        self.post_norm.forward(&hidden.narrow(1, 0, 1)?.squeeze(1)?)
    }
}
