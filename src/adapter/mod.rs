//! The erasure adapter: in every UNet cross-attention layer, a LoRA on `to_k` / `to_v` for the
//! leading context tokens and a Safe Adapter (own key/value projections) for the last m tokens.
//!
//! The Safe Adapter's projections are stored as the base weights plus a trainable delta, and
//! the adapter is applied as an addition to the base model's keys and values:
//! `K = to_k(c) + s·[LoRA_k(c''); Δ_k(c')]` (and the same for V). With zero LoRA up-projections
//! and zero deltas, as initialised, sampling through [`ErasureAdapter::detached`] gives images
//! bit-identical to the base model's. (Through the adapter itself, whose tensors record a graph
//! for training, the engine takes its differentiable attention kernels instead of the fused ones,
//! which round differently: outputs then agree to about 1e-6.)

mod file;
pub mod info;
mod io;
pub mod lora;
pub mod low_rank;
pub mod stack;

use candle_core::{D, DType, Device, Result, Tensor, bail};
use candle_nn::{Init, VarBuilder, VarMap};
use serde::{Deserialize, Serialize};

use crate::engine::models::unet::{CrossAttnLayer, UNet, UNetHook};
use crate::train::init::seeded_var_builder;
use info::AdapterInfo;

/// How the Safe Adapter's delta on the base key/value projections is parametrised.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", deny_unknown_fields)]
pub enum SafeDelta {
    /// A full `[inner_dim, context_dim]` matrix per projection. (A struct variant, so that
    /// serde refuses stray keys such as a `rank` next to it.)
    Full {},
    /// `up · down` of the given rank.
    LowRank { rank: usize },
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdapterConfig {
    /// LoRA rank on `to_k` / `to_v` for the leading tokens.
    pub lora_rank: usize,
    /// LoRA scale numerator: the update is `(alpha / rank) · up · down`.
    pub lora_alpha: f64,
    /// m: the last m context tokens go through the Safe Adapter.
    pub tail_tokens: usize,
    pub safe_delta: SafeDelta,
}

impl Default for AdapterConfig {
    fn default() -> Self {
        Self {
            lora_rank: 4,
            lora_alpha: 4.0,
            tail_tokens: 4,
            safe_delta: SafeDelta::Full {},
        }
    }
}

/// A low-rank update `scale · up · down` (`down` [rank, in], `up` [out, rank], `up` starts at 0).
struct LowRank {
    down: Tensor,
    up: Tensor,
    scale: f64,
}

impl LowRank {
    fn new(vb: VarBuilder, (inp, out, rank): (usize, usize, usize), scale: f64) -> Result<Self> {
        let down = vb.get_with_hints(
            (rank, inp),
            "down",
            Init::Randn {
                mean: 0.0,
                stdev: 1.0 / rank as f64,
            },
        )?;
        let up = vb.get_with_hints((out, rank), "up", Init::Const(0.0))?;
        Ok(Self { down, up, scale })
    }

    fn detached(&self) -> Self {
        Self {
            down: self.down.detach(),
            up: self.up.detach(),
            scale: self.scale,
        }
    }

    /// `x · (scale · up · down)ᵀ` for `x` [B, L, in].
    fn apply(&self, x: &Tensor) -> Result<Tensor> {
        x.broadcast_matmul(&self.down.t()?)?
            .broadcast_matmul(&self.up.t()?)?
            * self.scale
    }
}

/// A delta on a projection: full matrix or low rank.
enum Delta {
    Full(Tensor),
    LowRank(LowRank),
}

impl Delta {
    fn new(vb: VarBuilder, (inp, out): (usize, usize), kind: SafeDelta) -> Result<Self> {
        Ok(match kind {
            SafeDelta::Full {} => {
                Self::Full(vb.get_with_hints((out, inp), "delta", Init::Const(0.0))?)
            }
            SafeDelta::LowRank { rank } => Self::LowRank(LowRank::new(vb, (inp, out, rank), 1.0)?),
        })
    }

    fn detached(&self) -> Self {
        match self {
            Self::Full(w) => Self::Full(w.detach()),
            Self::LowRank(lr) => Self::LowRank(lr.detached()),
        }
    }

    fn apply(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Full(w) => x.broadcast_matmul(&w.t()?),
            Self::LowRank(lr) => lr.apply(x),
        }
    }
}

/// One cross-attention layer's adapter, for keys or values.
struct Projection {
    lora: LowRank,
    safe: Delta,
}

impl Projection {
    fn new(vb: VarBuilder, layer: &CrossAttnLayer, config: &AdapterConfig) -> Result<Self> {
        let dims = (layer.context_dim, layer.inner_dim);
        let scale = config.lora_alpha / config.lora_rank as f64;
        Ok(Self {
            lora: LowRank::new(vb.pp("lora"), (dims.0, dims.1, config.lora_rank), scale)?,
            safe: Delta::new(vb.pp("safe"), dims, config.safe_delta)?,
        })
    }

    fn detached(&self) -> Self {
        Self {
            lora: self.lora.detached(),
            safe: self.safe.detached(),
        }
    }

    /// What the adapter adds to the base projection of `context` [B, L, D]: LoRA on the
    /// leading tokens, the Safe Adapter's delta on the last `tail` ones.
    fn update(&self, context: &Tensor, tail: usize) -> Result<Tensor> {
        let len = context.dim(1)?;
        let head = context.narrow(1, 0, len - tail)?;
        let last = context.narrow(1, len - tail, tail)?;
        Tensor::cat(&[self.lora.apply(&head)?, self.safe.apply(&last)?], 1)
    }
}

struct LayerAdapter {
    key: Projection,
    value: Projection,
}

/// The erasure adapter for one UNet: its trainable variables and the cross-attention hook.
pub struct ErasureAdapter {
    config: AdapterConfig,
    vars: VarMap,
    /// By cross-attention layer index.
    layers: Vec<LayerAdapter>,
    /// Multiplies every update; 0 turns the adapter off.
    strength: f64,
    /// What its file records (base model, concept, training…); empty for a fresh adapter.
    info: AdapterInfo,
}

impl ErasureAdapter {
    /// A fresh adapter for every cross-attention layer of `unet`: LoRA down-projections drawn
    /// from `seed`, everything that reaches the output zero.
    pub fn new(
        unet: &UNet,
        config: AdapterConfig,
        seed: u64,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        if config.lora_rank == 0 {
            bail!("the adapter's LoRA rank must be at least 1");
        }
        if let SafeDelta::LowRank { rank: 0 } = config.safe_delta {
            bail!("a low-rank Safe Adapter delta needs a rank of at least 1");
        }
        let vars = VarMap::new();
        let vb = seeded_var_builder(&vars, seed, dtype, device);
        let layers = unet
            .cross_attn_layers()
            .into_iter()
            .map(|layer| {
                let vb = vb.pp(&layer.path);
                Ok(LayerAdapter {
                    key: Projection::new(vb.pp("to_k"), layer, &config)?,
                    value: Projection::new(vb.pp("to_v"), layer, &config)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            config,
            vars,
            layers,
            strength: 1.0,
            info: AdapterInfo::default(),
        })
    }

    pub fn config(&self) -> &AdapterConfig {
        &self.config
    }

    /// The trainable variables, by name (`<attn2 path>.to_k.lora.down`, …).
    pub fn vars(&self) -> &VarMap {
        &self.vars
    }

    pub fn strength(&self) -> f64 {
        self.strength
    }

    /// Scales every update (1 = as trained, 0 = off).
    pub fn set_strength(&mut self, strength: f64) {
        self.strength = strength;
    }

    /// The adapter as it stands, for sampling: same values, no gradient graph, so the engine
    /// runs its fused inference kernels. Cheap (tensors share storage); take a fresh one after
    /// the variables change.
    pub fn detached(&self) -> Self {
        Self {
            config: self.config,
            vars: self.vars.clone(),
            layers: self
                .layers
                .iter()
                .map(|l| LayerAdapter {
                    key: l.key.detached(),
                    value: l.value.detached(),
                })
                .collect(),
            strength: self.strength,
            info: self.info.clone(),
        }
    }

    /// What the adapter's file recorded about it (empty for an adapter trained in memory).
    pub fn info(&self) -> &AdapterInfo {
        &self.info
    }
}

impl UNetHook for ErasureAdapter {
    fn key_value_update(
        &self,
        layer: &CrossAttnLayer,
        context: &Tensor,
    ) -> Result<Option<(Tensor, Tensor)>> {
        if self.strength == 0.0 {
            return Ok(None);
        }
        let tail = self.config.tail_tokens;
        let len = context.dim(D::Minus2)?;
        if tail > len {
            bail!(
                "the Safe Adapter covers the last {tail} tokens but the prompt context has {len}"
            );
        }
        let Some(adapter) = self.layers.get(layer.index) else {
            bail!(
                "the adapter has {} cross-attention layers; this UNet has layer {} ({})",
                self.layers.len(),
                layer.index,
                layer.path
            );
        };
        let dk = (adapter.key.update(context, tail)? * self.strength)?;
        let dv = (adapter.value.update(context, tail)? * self.strength)?;
        Ok(Some((dk, dv)))
    }
}
