//! diffusers' `Transformer2DModel` and `BasicTransformerBlock`, with the cross-attention hook.

use candle_core::{Module, Result, Tensor};
use candle_nn::{Linear, VarBuilder};

use crate::engine::conv::Conv2d;
use crate::engine::nn::{GroupNorm, LayerNorm, attention, conv2d, group_norm, linear};

/// One cross-attention (`attn2`) layer as an adapter sees it.
#[derive(Clone)]
pub struct CrossAttnLayer {
    /// Position in the UNet's module order (down blocks, mid block, up blocks).
    pub index: usize,
    /// diffusers module path, e.g. `down_blocks.0.attentions.1.transformer_blocks.0.attn2`.
    pub path: String,
    pub to_k: Linear,
    pub to_v: Linear,
    pub heads: usize,
    /// Width of queries, keys and values (channels of the block).
    pub inner_dim: usize,
    /// Width of the text context.
    pub context_dim: usize,
}

impl CrossAttnLayer {
    /// The base model's keys and values for `context` [B, L, D].
    pub fn base_key_value(&self, context: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok((self.to_k.forward(context)?, self.to_v.forward(context)?))
    }
}

/// Replaces how a cross-attention layer turns the text context into keys and values.
///
/// The returned tensors are [B, Lk, inner_dim]; `Lk` may differ from the context length, so an
/// adapter can project token ranges separately and concatenate them.
pub trait CrossAttnHook: Send + Sync {
    fn key_value(&self, layer: &CrossAttnLayer, context: &Tensor) -> Result<(Tensor, Tensor)>;
}

struct SelfAttention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
}

impl SelfAttention {
    fn new(vb: VarBuilder, dim: usize, heads: usize) -> Result<Self> {
        Ok(Self {
            to_q: linear(vb.pp("to_q"), dim, dim, false)?,
            to_k: linear(vb.pp("to_k"), dim, dim, false)?,
            to_v: linear(vb.pp("to_v"), dim, dim, false)?,
            to_out: linear(vb.pp("to_out.0"), dim, dim, true)?,
            heads,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let q = self.to_q.forward(x)?;
        let k = self.to_k.forward(x)?;
        let v = self.to_v.forward(x)?;
        self.to_out
            .forward(&attention(&q, &k, &v, self.heads, None)?)
    }
}

struct CrossAttention {
    to_q: Linear,
    to_out: Linear,
    layer: CrossAttnLayer,
}

impl CrossAttention {
    fn forward(
        &self,
        x: &Tensor,
        context: &Tensor,
        hook: Option<&dyn CrossAttnHook>,
    ) -> Result<Tensor> {
        let q = self.to_q.forward(x)?;
        let (k, v) = match hook {
            Some(hook) => hook.key_value(&self.layer, context)?,
            None => self.layer.base_key_value(context)?,
        };
        self.to_out
            .forward(&attention(&q, &k, &v, self.layer.heads, None)?)
    }
}

struct TransformerBlock {
    norm1: LayerNorm,
    attn1: SelfAttention,
    norm2: LayerNorm,
    attn2: CrossAttention,
    norm3: LayerNorm,
    ff_in: Linear,
    ff_out: Linear,
}

impl TransformerBlock {
    fn new(
        vb: VarBuilder,
        dim: usize,
        heads: usize,
        context_dim: usize,
        path: String,
        index: usize,
    ) -> Result<Self> {
        let ff_inner = 4 * dim;
        let a2 = vb.pp("attn2");
        let layer = CrossAttnLayer {
            index,
            path,
            to_k: linear(a2.pp("to_k"), context_dim, dim, false)?,
            to_v: linear(a2.pp("to_v"), context_dim, dim, false)?,
            heads,
            inner_dim: dim,
            context_dim,
        };
        Ok(Self {
            norm1: LayerNorm::new(vb.pp("norm1"), dim, 1e-5)?,
            attn1: SelfAttention::new(vb.pp("attn1"), dim, heads)?,
            norm2: LayerNorm::new(vb.pp("norm2"), dim, 1e-5)?,
            attn2: CrossAttention {
                to_q: linear(a2.pp("to_q"), dim, dim, false)?,
                to_out: linear(a2.pp("to_out.0"), dim, dim, true)?,
                layer,
            },
            norm3: LayerNorm::new(vb.pp("norm3"), dim, 1e-5)?,
            ff_in: linear(vb.pp("ff.net.0.proj"), dim, 2 * ff_inner, true)?,
            ff_out: linear(vb.pp("ff.net.2"), ff_inner, dim, true)?,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        context: &Tensor,
        hook: Option<&dyn CrossAttnHook>,
    ) -> Result<Tensor> {
        let x = (self.attn1.forward(&self.norm1.forward(x)?)? + x)?;
        let x = (self
            .attn2
            .forward(&self.norm2.forward(&x)?, context, hook)?
            + &x)?;
        // GEGLU feed-forward: value half times GELU(gate half).
        let h = self.ff_in.forward(&self.norm3.forward(&x)?)?;
        let half = h.dim(2)? / 2;
        let gated = (h.narrow(2, 0, half)? * h.narrow(2, half, half)?.gelu_erf()?)?;
        self.ff_out.forward(&gated)? + x
    }
}

/// `proj_in` / `proj_out`: 1×1 convolutions (SD 1.x) or linear layers (SD 2.x).
enum Projection {
    Conv(Conv2d),
    Linear(Linear),
}

pub struct TransformerConfig {
    pub channels: usize,
    pub heads: usize,
    pub layers: usize,
    pub context_dim: usize,
    pub groups: usize,
    pub linear_projection: bool,
}

pub struct Transformer2D {
    norm: GroupNorm,
    proj_in: Projection,
    blocks: Vec<TransformerBlock>,
    proj_out: Projection,
}

impl Transformer2D {
    /// `path` is this module's diffusers path; `next_index` numbers cross-attention layers.
    pub fn new(
        vb: VarBuilder,
        cfg: &TransformerConfig,
        path: &str,
        next_index: &mut usize,
    ) -> Result<Self> {
        let c = cfg.channels;
        if cfg.heads == 0 || c % cfg.heads != 0 {
            candle_core::bail!(
                "{path}: {c} channels cannot be split into {} attention heads",
                cfg.heads
            );
        }
        let projection = |name: &str| -> Result<Projection> {
            Ok(if cfg.linear_projection {
                Projection::Linear(linear(vb.pp(name), c, c, true)?)
            } else {
                Projection::Conv(conv2d(vb.pp(name), c, c, 1, 1, 0)?)
            })
        };
        let blocks = (0..cfg.layers)
            .map(|i| {
                let block_path = format!("{path}.transformer_blocks.{i}");
                let index = *next_index;
                *next_index += 1;
                TransformerBlock::new(
                    vb.pp(format!("transformer_blocks.{i}")),
                    c,
                    cfg.heads,
                    cfg.context_dim,
                    format!("{block_path}.attn2"),
                    index,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            norm: group_norm(vb.pp("norm"), cfg.groups, c, 1e-6)?,
            proj_in: projection("proj_in")?,
            blocks,
            proj_out: projection("proj_out")?,
        })
    }

    pub fn cross_attn_layers(&self) -> impl Iterator<Item = &CrossAttnLayer> {
        self.blocks.iter().map(|b| &b.attn2.layer)
    }

    pub fn forward(
        &self,
        x: &Tensor,
        context: &Tensor,
        hook: Option<&dyn CrossAttnHook>,
    ) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let normed = self.norm.forward(x)?;
        let to_tokens = |t: &Tensor| t.reshape((b, c, h * w))?.transpose(1, 2)?.contiguous();
        let mut tokens = match &self.proj_in {
            Projection::Conv(conv) => to_tokens(&conv.forward(&normed)?)?,
            Projection::Linear(lin) => lin.forward(&to_tokens(&normed)?)?,
        };
        for block in &self.blocks {
            tokens = block.forward(&tokens, context, hook)?;
        }
        let to_image = |t: &Tensor| t.transpose(1, 2)?.reshape((b, c, h, w));
        let out = match &self.proj_out {
            Projection::Conv(conv) => conv.forward(&to_image(&tokens)?)?,
            Projection::Linear(lin) => to_image(&lin.forward(&tokens)?)?,
        };
        out + x
    }
}
