//! CLIP text encoder (transformers' `CLIPTextModel`), any size, quick_gelu or gelu.

use std::path::Path;

use anyhow::{Context, bail};
use candle_core::{Device, Module, Result, Tensor};
use candle_nn::{Embedding, VarBuilder};
use serde::Deserialize;

use super::encoder::{Activation, ClipEncoder, EncoderShape};
use crate::engine::nn::LayerNorm;

/// transformers' `CLIPTextConfig`, with its defaults for missing keys.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    pub hidden_act: Activation,
    pub layer_norm_eps: f64,
    /// 2 (the legacy default) means "the highest id marks the end", as in transformers.
    pub eos_token_id: u32,
}

impl Default for ClipTextConfig {
    fn default() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 512,
            intermediate_size: 2048,
            num_hidden_layers: 12,
            num_attention_heads: 8,
            max_position_embeddings: 77,
            hidden_act: Activation::QuickGelu,
            layer_norm_eps: 1e-5,
            eos_token_id: 2,
        }
    }
}

impl ClipTextConfig {
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

    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let cfg: Self = crate::engine::io::config::read_json(path)?;
        cfg.validate()
            .with_context(|| format!("{}: invalid text encoder config", path.display()))?;
        Ok(cfg)
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        if self.num_attention_heads == 0 || self.hidden_size % self.num_attention_heads != 0 {
            bail!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                self.hidden_size,
                self.num_attention_heads
            );
        }
        Ok(())
    }
}

/// Checkpoint prefixes: SD repos and older transformers store `text_model.…`, transformers 5
/// stores names without it.
pub const WEIGHT_ALIASES: &[(&str, &str)] = &[("text_model.", "")];

pub struct ClipTextModel {
    token_embedding: Embedding,
    position_embedding: Tensor,
    encoder: ClipEncoder,
    final_norm: LayerNorm,
    config: ClipTextConfig,
}

impl ClipTextModel {
    /// `vb` points at the checkpoint root; names are looked up under `text_model.`.
    pub fn new(vb: VarBuilder, config: &ClipTextConfig) -> Result<Self> {
        let vb = vb.pp("text_model");
        let emb = vb.pp("embeddings");
        let d = config.hidden_size;
        let token_embedding =
            candle_nn::embedding(config.vocab_size, d, emb.pp("token_embedding"))?;
        let position_embedding = emb.pp("position_embedding").get_with_hints(
            (config.max_position_embeddings, d),
            "weight",
            candle_nn::Init::Randn {
                mean: 0.0,
                stdev: 0.01,
            },
        )?;
        let encoder = ClipEncoder::new(vb.pp("encoder"), &config.encoder_shape())?;
        let final_norm = LayerNorm::new(vb.pp("final_layer_norm"), d, config.layer_norm_eps)?;
        Ok(Self {
            token_embedding,
            position_embedding,
            encoder,
            final_norm,
            config: config.clone(),
        })
    }

    pub fn config(&self) -> &ClipTextConfig {
        &self.config
    }

    /// `input_ids` [B, L] (any integer dtype) → last hidden state [B, L, D] after the final norm.
    pub fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (_, len) = input_ids.dims2()?;
        if len > self.config.max_position_embeddings {
            candle_core::bail!(
                "{len} tokens exceed the text encoder's {} positions",
                self.config.max_position_embeddings
            );
        }
        let ids = input_ids.to_dtype(candle_core::DType::U32)?;
        let tokens = self.token_embedding.forward(&ids)?;
        let positions = self.position_embedding.narrow(0, 0, len)?;
        let x = tokens.broadcast_add(&positions)?;
        self.final_norm.forward(&self.encoder.forward(&x, true)?)
    }
}

impl ClipTextModel {
    /// The hidden state at each prompt's end token [B, D] (transformers' `pooler_output`): the
    /// first `eos_token_id`, or with the legacy id 2 the first occurrence of the highest id.
    pub fn pooled(&self, hidden: &Tensor, input_ids: &Tensor) -> Result<Tensor> {
        let ids = input_ids
            .to_dtype(candle_core::DType::I64)?
            .to_vec2::<i64>()?;
        let eos = i64::from(self.config.eos_token_id);
        let positions: Vec<u32> = ids
            .iter()
            .map(|row| {
                let target = if eos == 2 {
                    row.iter().copied().max().unwrap_or(0)
                } else {
                    eos
                };
                row.iter()
                    .position(|&id| id == target)
                    .unwrap_or(row.len() - 1) as u32
            })
            .collect();
        let d = hidden.dim(2)?;
        let index = Tensor::from_vec(positions, (ids.len(), 1, 1), hidden.device())?
            .expand((ids.len(), 1, d))?
            .contiguous()?;
        hidden.gather(&index, 1)?.squeeze(1)
    }
}

/// Embeds prompts already tokenized to equal length.
pub fn ids_tensor(ids: &[Vec<u32>], device: &Device) -> Result<Tensor> {
    let len = ids.first().map_or(0, Vec::len);
    let flat: Vec<u32> = ids.iter().flatten().copied().collect();
    Tensor::from_vec(flat, (ids.len(), len), device)
}
