//! CLIP text encoder (transformers' `CLIPTextModel`), any size, quick_gelu or gelu.

use std::path::Path;

use anyhow::bail;
use candle_core::{Device, Module, Result, Tensor};
use candle_nn::{Embedding, Linear, VarBuilder};
use serde::Deserialize;

use super::nn::{LayerNorm, attention, linear};

#[derive(Debug, Clone, Deserialize)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default = "default_positions")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_act")]
    pub hidden_act: Activation,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
}

fn default_positions() -> usize {
    77
}
fn default_act() -> Activation {
    Activation::QuickGelu
}
fn default_eps() -> f64 {
    1e-5
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
pub enum Activation {
    #[serde(rename = "quick_gelu")]
    QuickGelu,
    #[serde(rename = "gelu")]
    Gelu,
    #[serde(rename = "gelu_new", alias = "gelu_pytorch_tanh")]
    GeluTanh,
}

impl Activation {
    fn apply(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Activation::QuickGelu => x * candle_nn::ops::sigmoid(&(x * 1.702)?)?,
            Activation::Gelu => x.gelu_erf(),
            Activation::GeluTanh => x.gelu(),
        }
    }
}

impl ClipTextConfig {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let cfg: Self = super::config::read_json(path)?;
        if cfg.num_attention_heads == 0 || cfg.hidden_size % cfg.num_attention_heads != 0 {
            bail!(
                "{}: hidden_size {} is not divisible by num_attention_heads {}",
                path.display(),
                cfg.hidden_size,
                cfg.num_attention_heads
            );
        }
        Ok(cfg)
    }
}

/// Checkpoint prefixes: SD repos and older transformers store `text_model.…`, transformers 5
/// stores names without it.
pub const WEIGHT_ALIASES: &[(&str, &str)] = &[("text_model.", "")];

struct EncoderLayer {
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    norm1: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    norm2: LayerNorm,
    heads: usize,
    act: Activation,
}

impl EncoderLayer {
    fn new(vb: VarBuilder, cfg: &ClipTextConfig) -> Result<Self> {
        let d = cfg.hidden_size;
        let attn = vb.pp("self_attn");
        Ok(Self {
            q: linear(attn.pp("q_proj"), d, d, true)?,
            k: linear(attn.pp("k_proj"), d, d, true)?,
            v: linear(attn.pp("v_proj"), d, d, true)?,
            out: linear(attn.pp("out_proj"), d, d, true)?,
            norm1: LayerNorm::new(vb.pp("layer_norm1"), d, cfg.layer_norm_eps)?,
            fc1: linear(vb.pp("mlp.fc1"), d, cfg.intermediate_size, true)?,
            fc2: linear(vb.pp("mlp.fc2"), cfg.intermediate_size, d, true)?,
            norm2: LayerNorm::new(vb.pp("layer_norm2"), d, cfg.layer_norm_eps)?,
            heads: cfg.num_attention_heads,
            act: cfg.hidden_act,
        })
    }

    fn forward(&self, x: &Tensor, causal_mask: &Tensor) -> Result<Tensor> {
        let h = self.norm1.forward(x)?;
        let attn = attention(
            &self.q.forward(&h)?,
            &self.k.forward(&h)?,
            &self.v.forward(&h)?,
            self.heads,
            Some(causal_mask),
        )?;
        let x = (x + self.out.forward(&attn)?)?;
        let h = self.norm2.forward(&x)?;
        let h = self.fc2.forward(&self.act.apply(&self.fc1.forward(&h)?)?)?;
        x + h
    }
}

pub struct ClipTextModel {
    token_embedding: Embedding,
    position_embedding: Tensor,
    layers: Vec<EncoderLayer>,
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
        let layers = (0..config.num_hidden_layers)
            .map(|i| EncoderLayer::new(vb.pp(format!("encoder.layers.{i}")), config))
            .collect::<Result<Vec<_>>>()?;
        let final_norm = LayerNorm::new(vb.pp("final_layer_norm"), d, config.layer_norm_eps)?;
        Ok(Self {
            token_embedding,
            position_embedding,
            layers,
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
        let mut x = tokens.broadcast_add(&positions)?;
        let mask = causal_mask(len, x.device())?;
        for layer in &self.layers {
            x = layer.forward(&x, &mask)?;
        }
        self.final_norm.forward(&x)
    }
}

/// Additive mask that hides later tokens: 0 on and below the diagonal, −∞ above.
fn causal_mask(len: usize, device: &Device) -> Result<Tensor> {
    let values: Vec<f32> = (0..len)
        .flat_map(|i| (0..len).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(values, (len, len), device)
}

/// Embeds prompts already tokenized to equal length.
pub fn ids_tensor(ids: &[Vec<u32>], device: &Device) -> Result<Tensor> {
    let len = ids.first().map_or(0, Vec::len);
    let flat: Vec<u32> = ids.iter().flatten().copied().collect();
    Tensor::from_vec(flat, (ids.len(), len), device)
}
