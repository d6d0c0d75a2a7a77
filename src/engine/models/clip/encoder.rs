//! The transformer encoder CLIP's text and vision towers share (transformers' `CLIPEncoder`).

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::engine::nn::linear::Linear;
use serde::Deserialize;

use crate::engine::nn::attention::attention;
use crate::engine::nn::quick_gelu::quick_gelu;
use crate::engine::nn::{LayerNorm, linear};

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
    pub fn apply(self, x: &Tensor) -> Result<Tensor> {
        match self {
            Activation::QuickGelu => quick_gelu(x),
            Activation::Gelu => x.gelu_erf(),
            Activation::GeluTanh => x.gelu(),
        }
    }
}

/// Sizes of an encoder.
#[derive(Debug, Clone, Copy)]
pub struct EncoderShape {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub layers: usize,
    pub heads: usize,
    pub act: Activation,
    pub eps: f64,
}

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
    fn new(vb: VarBuilder, cfg: &EncoderShape) -> Result<Self> {
        let d = cfg.hidden_size;
        let attn = vb.pp("self_attn");
        Ok(Self {
            q: linear(attn.pp("q_proj"), d, d, true)?,
            k: linear(attn.pp("k_proj"), d, d, true)?,
            v: linear(attn.pp("v_proj"), d, d, true)?,
            out: linear(attn.pp("out_proj"), d, d, true)?,
            norm1: LayerNorm::new(vb.pp("layer_norm1"), d, cfg.eps)?,
            fc1: linear(vb.pp("mlp.fc1"), d, cfg.intermediate_size, true)?,
            fc2: linear(vb.pp("mlp.fc2"), cfg.intermediate_size, d, true)?,
            norm2: LayerNorm::new(vb.pp("layer_norm2"), d, cfg.eps)?,
            heads: cfg.heads,
            act: cfg.act,
        })
    }

    fn forward(&self, x: &Tensor, causal: bool) -> Result<Tensor> {
        let h = self.norm1.forward(x)?;
        let attn = attention(
            &self.q.forward(&h)?,
            &self.k.forward(&h)?,
            &self.v.forward(&h)?,
            self.heads,
            causal,
        )?;
        let x = (x + self.out.forward(&attn)?)?;
        let h = self.norm2.forward(&x)?;
        let h = self.fc2.forward(&self.act.apply(&self.fc1.forward(&h)?)?)?;
        x + h
    }
}

/// A stack of pre-norm transformer layers (`encoder.layers.{i}`).
pub struct ClipEncoder {
    layers: Vec<EncoderLayer>,
}

impl ClipEncoder {
    /// `vb` points at the `encoder` module.
    pub fn new(vb: VarBuilder, shape: &EncoderShape) -> Result<Self> {
        let layers = (0..shape.layers)
            .map(|i| EncoderLayer::new(vb.pp(format!("layers.{i}")), shape))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { layers })
    }

    /// `x` [B, L, D]; `causal` hides later tokens from each token (text encoders).
    pub fn forward(&self, x: &Tensor, causal: bool) -> Result<Tensor> {
        let mut x = x.clone();
        for layer in &self.layers {
            x = layer.forward(&x, causal)?;
        }
        Ok(x)
    }
}
