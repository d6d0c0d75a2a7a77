//! `unet/config.json` of diffusers' `UNet2DConditionModel`, resolved into per-block settings.

use std::path::Path;

use anyhow::{Context, bail};
use serde::Deserialize;
use serde_json::Value;

use crate::engine::io::config::{PerBlock, read_json, require_default, require_silu};

/// The raw config, with diffusers' defaults for missing keys.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct UNetConfigFile {
    /// Native latent size: one side, or [height, width].
    pub sample_size: Option<PerBlock<usize>>,
    pub in_channels: usize,
    pub out_channels: usize,
    pub center_input_sample: bool,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
    pub down_block_types: Vec<String>,
    pub mid_block_type: Option<String>,
    pub up_block_types: Vec<String>,
    pub only_cross_attention: PerBlock<bool>,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: PerBlock<usize>,
    pub downsample_padding: usize,
    pub mid_block_scale_factor: f64,
    pub act_fn: String,
    pub norm_num_groups: Option<usize>,
    pub norm_eps: f64,
    pub cross_attention_dim: PerBlock<usize>,
    pub transformer_layers_per_block: PerBlock<usize>,
    pub attention_head_dim: PerBlock<usize>,
    /// diffusers refuses any value here (the head count lives in `attention_head_dim`).
    pub num_attention_heads: Value,
    pub dual_cross_attention: bool,
    pub use_linear_projection: bool,
    pub upcast_attention: bool,
    pub resnet_time_scale_shift: String,
    pub time_embedding_type: String,
    pub conv_in_kernel: usize,
    pub conv_out_kernel: usize,
    pub attention_type: String,
    // Options the engine does not implement: they must stay unset.
    pub class_embed_type: Value,
    pub addition_embed_type: Value,
    pub encoder_hid_dim: Value,
    pub time_cond_proj_dim: Value,
    pub time_embedding_dim: Value,
    pub time_embedding_act_fn: Value,
    pub timestep_post_act: Value,
    pub num_class_embeds: Value,
    pub resnet_skip_time_act: bool,
    pub cross_attention_norm: Value,
    pub reverse_transformer_layers_per_block: Value,
}

impl Default for UNetConfigFile {
    fn default() -> Self {
        Self {
            sample_size: None,
            in_channels: 4,
            out_channels: 4,
            center_input_sample: false,
            flip_sin_to_cos: true,
            freq_shift: 0.0,
            down_block_types: [
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "DownBlock2D",
            ]
            .map(String::from)
            .to_vec(),
            mid_block_type: Some("UNetMidBlock2DCrossAttn".into()),
            up_block_types: [
                "UpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
            ]
            .map(String::from)
            .to_vec(),
            only_cross_attention: PerBlock::One(false),
            block_out_channels: vec![320, 640, 1280, 1280],
            layers_per_block: PerBlock::One(2),
            downsample_padding: 1,
            mid_block_scale_factor: 1.0,
            act_fn: "silu".into(),
            norm_num_groups: Some(32),
            norm_eps: 1e-5,
            cross_attention_dim: PerBlock::One(1280),
            transformer_layers_per_block: PerBlock::One(1),
            attention_head_dim: PerBlock::One(8),
            num_attention_heads: Value::Null,
            dual_cross_attention: false,
            use_linear_projection: false,
            upcast_attention: false,
            resnet_time_scale_shift: "default".into(),
            time_embedding_type: "positional".into(),
            conv_in_kernel: 3,
            conv_out_kernel: 3,
            attention_type: "default".into(),
            class_embed_type: Value::Null,
            addition_embed_type: Value::Null,
            encoder_hid_dim: Value::Null,
            time_cond_proj_dim: Value::Null,
            time_embedding_dim: Value::Null,
            time_embedding_act_fn: Value::Null,
            timestep_post_act: Value::Null,
            num_class_embeds: Value::Null,
            resnet_skip_time_act: false,
            cross_attention_norm: Value::Null,
            reverse_transformer_layers_per_block: Value::Null,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum DownKind {
    CrossAttn,
    Plain,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum UpKind {
    CrossAttn,
    Plain,
}

/// Settings of one down (or, mirrored, up) stage.
#[derive(Debug, Clone)]
pub struct StageConfig {
    pub channels: usize,
    pub layers: usize,
    pub heads: usize,
    pub transformer_layers: usize,
    pub context_dim: usize,
}

/// A validated config: everything the model constructor needs, per block.
#[derive(Debug, Clone)]
pub struct UNetConfig {
    /// Native latent (height, width), when the config gives one.
    pub sample_size: Option<(usize, usize)>,
    pub in_channels: usize,
    pub out_channels: usize,
    pub center_input_sample: bool,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
    pub down: Vec<(DownKind, StageConfig)>,
    /// Up stages in execution order (deepest first).
    pub up: Vec<(UpKind, StageConfig)>,
    pub has_mid_block: bool,
    pub downsample_padding: usize,
    pub mid_block_scale_factor: f64,
    pub groups: usize,
    pub eps: f64,
    pub linear_projection: bool,
    pub conv_in_kernel: usize,
    pub conv_out_kernel: usize,
}

impl UNetConfig {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let file: UNetConfigFile = read_json(path)?;
        Self::from_file(&file)
            .with_context(|| format!("{}: unsupported UNet config", path.display()))
    }

    pub fn from_file(f: &UNetConfigFile) -> anyhow::Result<Self> {
        require_silu("act_fn", &f.act_fn)?;
        require_default(
            "time_embedding_type",
            &f.time_embedding_type.as_str(),
            &"positional",
        )?;
        require_default(
            "resnet_time_scale_shift",
            &f.resnet_time_scale_shift.as_str(),
            &"default",
        )?;
        require_default("attention_type", &f.attention_type.as_str(), &"default")?;
        require_default("dual_cross_attention", &f.dual_cross_attention, &false)?;
        require_default("resnet_skip_time_act", &f.resnet_skip_time_act, &false)?;
        for (field, value) in [
            ("class_embed_type", &f.class_embed_type),
            ("addition_embed_type", &f.addition_embed_type),
            ("encoder_hid_dim", &f.encoder_hid_dim),
            ("time_cond_proj_dim", &f.time_cond_proj_dim),
            ("time_embedding_dim", &f.time_embedding_dim),
            ("time_embedding_act_fn", &f.time_embedding_act_fn),
            ("timestep_post_act", &f.timestep_post_act),
            ("num_class_embeds", &f.num_class_embeds),
            ("cross_attention_norm", &f.cross_attention_norm),
            (
                "reverse_transformer_layers_per_block",
                &f.reverse_transformer_layers_per_block,
            ),
        ] {
            require_default(field, value, &Value::Null)?;
        }
        let n = f.down_block_types.len();
        if n == 0 || f.block_out_channels.len() != n || f.up_block_types.len() != n {
            bail!(
                "down_block_types ({}), up_block_types ({}) and block_out_channels ({}) must have the same, non-zero length",
                n,
                f.up_block_types.len(),
                f.block_out_channels.len()
            );
        }
        if f.only_cross_attention
            .per_block(n, "only_cross_attention")?
            .iter()
            .any(|&b| b)
        {
            bail!("`only_cross_attention` = true is not supported");
        }
        for (field, k) in [
            ("conv_in_kernel", f.conv_in_kernel),
            ("conv_out_kernel", f.conv_out_kernel),
        ] {
            if k % 2 == 0 {
                bail!("`{field}` = {k} must be odd");
            }
        }
        let layers = f.layers_per_block.per_block(n, "layers_per_block")?;
        // diffusers names the head *count* `attention_head_dim` in SD configs.
        let heads = f.attention_head_dim.per_block(n, "attention_head_dim")?;
        let transformer_layers = f
            .transformer_layers_per_block
            .per_block(n, "transformer_layers_per_block")?;
        let context = f.cross_attention_dim.per_block(n, "cross_attention_dim")?;
        let stage = |i: usize| StageConfig {
            channels: f.block_out_channels[i],
            layers: layers[i],
            heads: heads[i],
            transformer_layers: transformer_layers[i],
            context_dim: context[i],
        };
        let down = f
            .down_block_types
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let kind = match block_name(t) {
                    "CrossAttnDownBlock2D" => DownKind::CrossAttn,
                    "DownBlock2D" => DownKind::Plain,
                    other => bail!("down block type `{other}` is not supported (CrossAttnDownBlock2D, DownBlock2D)"),
                };
                Ok((kind, stage(i)))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let up = f
            .up_block_types
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let kind = match block_name(t) {
                    "CrossAttnUpBlock2D" => UpKind::CrossAttn,
                    "UpBlock2D" => UpKind::Plain,
                    other => bail!(
                        "up block type `{other}` is not supported (CrossAttnUpBlock2D, UpBlock2D)"
                    ),
                };
                Ok((kind, stage(n - 1 - i)))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let has_mid_block = match f.mid_block_type.as_deref() {
            Some("UNetMidBlock2DCrossAttn") => true,
            None => false,
            Some(other) => {
                bail!("mid_block_type `{other}` is not supported (UNetMidBlock2DCrossAttn)")
            }
        };
        let sample_size = f
            .sample_size
            .as_ref()
            .map(|s| s.per_block(2, "sample_size").map(|hw| (hw[0], hw[1])))
            .transpose()?;
        Ok(Self {
            sample_size,
            in_channels: f.in_channels,
            out_channels: f.out_channels,
            center_input_sample: f.center_input_sample,
            flip_sin_to_cos: f.flip_sin_to_cos,
            freq_shift: f.freq_shift,
            down,
            up,
            has_mid_block,
            downsample_padding: f.downsample_padding,
            mid_block_scale_factor: f.mid_block_scale_factor,
            groups: f
                .norm_num_groups
                .context("`norm_num_groups` = null is not supported")?,
            eps: f.norm_eps,
            linear_projection: f.use_linear_projection,
            conv_in_kernel: f.conv_in_kernel,
            conv_out_kernel: f.conv_out_kernel,
        })
    }
}

/// diffusers accepts legacy block names with a `UNetRes` prefix for the same blocks.
fn block_name(name: &str) -> &str {
    name.strip_prefix("UNetRes").unwrap_or(name)
}
