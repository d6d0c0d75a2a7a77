//! diffusers' `Transformer2DModel` and `BasicTransformerBlock`, with the cross-attention hook.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::engine::nn::linear::Linear;

use crate::engine::nn::attention::attention;
use crate::engine::nn::conv::Conv2d;
use crate::engine::nn::geglu::geglu;
use crate::engine::nn::{GroupNorm, LayerNorm, conv2d, group_norm, linear};

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

    /// Keys and values for `context` with `hook`'s updates added: its update to this layer's
    /// keys and values, and to the outputs of `to_k` and `to_v` as layers.
    pub fn key_value(
        &self,
        context: &Tensor,
        hook: Option<&dyn UNetHook>,
    ) -> Result<(Tensor, Tensor)> {
        let (mut k, mut v) = self.base_key_value(context)?;
        let Some(hook) = hook else {
            return Ok((k, v));
        };
        if let Some((dk, dv)) = hook.key_value_update(self, context)? {
            (k, v) = ((k + dk)?, (v + dv)?);
        }
        if let Some(dk) = hook.layer_update(&format!("{}.to_k", self.path), context)? {
            k = (k + dk)?;
        }
        if let Some(dv) = hook.layer_update(&format!("{}.to_v", self.path), context)? {
            v = (v + dv)?;
        }
        Ok((k, v))
    }
}

/// What an adapter adds to the UNet's attention: to the keys and values of every cross-attention
/// layer, and to the output of any linear layer of the transformer blocks. Updates are added to
/// the base model's results, so several hooks stack by adding theirs.
pub trait UNetHook: Send + Sync {
    /// The update to `layer`'s keys and values for `context` [B, L, D] (both [B, L, inner_dim]),
    /// or `None` to keep the base ones.
    fn key_value_update(
        &self,
        layer: &CrossAttnLayer,
        context: &Tensor,
    ) -> Result<Option<(Tensor, Tensor)>>;

    /// The update to the output of the layer at `path` (a diffusers module path such as
    /// `mid_block.attentions.0.transformer_blocks.0.attn1.to_q`) for its input `x`, or `None`.
    /// The layers are the transformers' linear layers ([B, L, in] in, [B, L, out] out) and their
    /// `proj_in` / `proj_out`, which are 1×1 convolutions in SD 1.x ([B, C, H, W] in and out).
    /// Cross-attention `to_k` / `to_v` are layers too, beside
    /// [`key_value_update`](Self::key_value_update).
    fn layer_update(&self, _path: &str, _x: &Tensor) -> Result<Option<Tensor>> {
        Ok(None)
    }
}

/// A layer a [`UNetHook`] can add to, as LoRA files name them.
#[derive(Debug, Clone, PartialEq)]
pub struct AdaptableLayer {
    /// diffusers module path, e.g. `up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k`.
    pub path: String,
    pub in_dim: usize,
    pub out_dim: usize,
    /// A 1×1 convolution (SD 1.x `proj_in` / `proj_out`) rather than a linear layer.
    pub conv: bool,
}

impl AdaptableLayer {
    /// `weight` is [out, in, 1, 1] for a 1×1 convolution.
    fn of_conv(path: String, weight: &Tensor) -> Self {
        let dims = weight.dims();
        Self {
            path,
            in_dim: dims[1],
            out_dim: dims[0],
            conv: true,
        }
    }

    fn of_linear(path: String, linear: &Linear) -> Self {
        let (out_dim, in_dim) = linear.dims();
        Self {
            path,
            in_dim,
            out_dim,
            conv: false,
        }
    }
}

/// A layer that knows its module path, so a hook can add to its output.
struct Hooked<M> {
    layer: M,
    path: String,
}

impl<M: Module> Hooked<M> {
    fn forward(&self, x: &Tensor, hook: Option<&dyn UNetHook>) -> Result<Tensor> {
        let base = self.layer.forward(x)?;
        match hook
            .map(|h| h.layer_update(&self.path, x))
            .transpose()?
            .flatten()
        {
            Some(update) => base + update,
            None => Ok(base),
        }
    }
}

type HookedLinear = Hooked<Linear>;

impl HookedLinear {
    fn new(
        vb: &VarBuilder,
        path: &str,
        name: &str,
        dims: (usize, usize),
        bias: bool,
    ) -> Result<Self> {
        Ok(Self {
            layer: linear(vb.pp(name), dims.0, dims.1, bias)?,
            path: format!("{path}.{name}"),
        })
    }

    fn describe(&self) -> AdaptableLayer {
        AdaptableLayer::of_linear(self.path.clone(), &self.layer)
    }
}

struct SelfAttention {
    to_q: HookedLinear,
    to_k: HookedLinear,
    to_v: HookedLinear,
    to_out: HookedLinear,
    heads: usize,
}

impl SelfAttention {
    fn new(vb: VarBuilder, path: &str, dim: usize, heads: usize) -> Result<Self> {
        let square = (dim, dim);
        Ok(Self {
            to_q: HookedLinear::new(&vb, path, "to_q", square, false)?,
            to_k: HookedLinear::new(&vb, path, "to_k", square, false)?,
            to_v: HookedLinear::new(&vb, path, "to_v", square, false)?,
            to_out: HookedLinear::new(&vb, path, "to_out.0", square, true)?,
            heads,
        })
    }

    fn forward(&self, x: &Tensor, hook: Option<&dyn UNetHook>) -> Result<Tensor> {
        let q = self.to_q.forward(x, hook)?;
        let k = self.to_k.forward(x, hook)?;
        let v = self.to_v.forward(x, hook)?;
        self.to_out
            .forward(&attention(&q, &k, &v, self.heads, false)?, hook)
    }
}

struct CrossAttention {
    to_q: HookedLinear,
    to_out: HookedLinear,
    layer: CrossAttnLayer,
}

impl CrossAttention {
    fn forward(&self, x: &Tensor, context: &Tensor, hook: Option<&dyn UNetHook>) -> Result<Tensor> {
        let q = self.to_q.forward(x, hook)?;
        let (k, v) = self.layer.key_value(context, hook)?;
        self.to_out
            .forward(&attention(&q, &k, &v, self.layer.heads, false)?, hook)
    }
}

struct TransformerBlock {
    norm1: LayerNorm,
    attn1: SelfAttention,
    norm2: LayerNorm,
    attn2: CrossAttention,
    norm3: LayerNorm,
    ff_in: HookedLinear,
    ff_out: HookedLinear,
}

impl TransformerBlock {
    /// `path` is the block's diffusers module path; `index` numbers its cross-attention layer.
    fn new(
        vb: VarBuilder,
        dim: usize,
        heads: usize,
        context_dim: usize,
        path: &str,
        index: usize,
    ) -> Result<Self> {
        let ff_inner = 4 * dim;
        let a2 = vb.pp("attn2");
        let attn2_path = format!("{path}.attn2");
        let layer = CrossAttnLayer {
            index,
            path: attn2_path.clone(),
            to_k: linear(a2.pp("to_k"), context_dim, dim, false)?,
            to_v: linear(a2.pp("to_v"), context_dim, dim, false)?,
            heads,
            inner_dim: dim,
            context_dim,
        };
        Ok(Self {
            norm1: LayerNorm::new(vb.pp("norm1"), dim, 1e-5)?,
            attn1: SelfAttention::new(vb.pp("attn1"), &format!("{path}.attn1"), dim, heads)?,
            norm2: LayerNorm::new(vb.pp("norm2"), dim, 1e-5)?,
            attn2: CrossAttention {
                to_q: HookedLinear::new(&a2, &attn2_path, "to_q", (dim, dim), false)?,
                to_out: HookedLinear::new(&a2, &attn2_path, "to_out.0", (dim, dim), true)?,
                layer,
            },
            norm3: LayerNorm::new(vb.pp("norm3"), dim, 1e-5)?,
            ff_in: HookedLinear::new(&vb, path, "ff.net.0.proj", (dim, 2 * ff_inner), true)?,
            ff_out: HookedLinear::new(&vb, path, "ff.net.2", (ff_inner, dim), true)?,
        })
    }

    fn forward(&self, x: &Tensor, context: &Tensor, hook: Option<&dyn UNetHook>) -> Result<Tensor> {
        let x = (self.attn1.forward(&self.norm1.forward(x)?, hook)? + x)?;
        let x = (self
            .attn2
            .forward(&self.norm2.forward(&x)?, context, hook)?
            + &x)?;
        let h = self.ff_in.forward(&self.norm3.forward(&x)?, hook)?;
        let gated = geglu(&h)?;
        self.ff_out.forward(&gated, hook)? + x
    }
}

/// `proj_in` / `proj_out`: 1×1 convolutions (SD 1.x) or linear layers (SD 2.x).
enum Projection {
    Conv(Hooked<Conv2d>),
    Linear(HookedLinear),
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
                Projection::Linear(HookedLinear::new(&vb, path, name, (c, c), true)?)
            } else {
                Projection::Conv(Hooked {
                    layer: conv2d(vb.pp(name), c, c, 1, 1, 0)?,
                    path: format!("{path}.{name}"),
                })
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
                    &block_path,
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

    /// Every layer a hook can add to: the projections, and each block's attention and
    /// feed-forward linears.
    pub fn adaptable_layers(&self) -> Vec<AdaptableLayer> {
        let projection = |p: &Projection| -> AdaptableLayer {
            match p {
                Projection::Linear(l) => l.describe(),
                Projection::Conv(c) => AdaptableLayer::of_conv(c.path.clone(), c.layer.weight()),
            }
        };
        let mut layers = vec![projection(&self.proj_in)];
        for b in &self.blocks {
            let a1 = &b.attn1;
            let a2 = &b.attn2;
            layers.extend(
                [&a1.to_q, &a1.to_k, &a1.to_v, &a1.to_out, &a2.to_q].map(HookedLinear::describe),
            );
            for (name, linear) in [("to_k", &a2.layer.to_k), ("to_v", &a2.layer.to_v)] {
                let path = format!("{}.{name}", a2.layer.path);
                layers.push(AdaptableLayer::of_linear(path, linear));
            }
            layers.extend([&a2.to_out, &b.ff_in, &b.ff_out].map(HookedLinear::describe));
        }
        layers.push(projection(&self.proj_out));
        layers
    }

    pub fn forward(
        &self,
        x: &Tensor,
        context: &Tensor,
        hook: Option<&dyn UNetHook>,
    ) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let normed = self.norm.forward(x)?;
        let to_tokens = |t: &Tensor| t.reshape((b, c, h * w))?.transpose(1, 2)?.contiguous();
        let mut tokens = match &self.proj_in {
            Projection::Conv(conv) => to_tokens(&conv.forward(&normed, hook)?)?,
            Projection::Linear(lin) => lin.forward(&to_tokens(&normed)?, hook)?,
        };
        for block in &self.blocks {
            tokens = block.forward(&tokens, context, hook)?;
        }
        let to_image = |t: &Tensor| t.transpose(1, 2)?.reshape((b, c, h, w));
        let out = match &self.proj_out {
            Projection::Conv(conv) => conv.forward(&to_image(&tokens)?, hook)?,
            Projection::Linear(lin) => to_image(&lin.forward(&tokens, hook)?)?,
        };
        out + x
    }
}
