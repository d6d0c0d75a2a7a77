//! Sizes of the demo model's networks, written as the config files diffusers and transformers
//! use, so the trained model is a Stable Diffusion folder the normal loader reads.
//!
//! The sizes are set by two budgets: the whole model trains in well under 90 minutes on two CPU
//! cores, and four images (25 guided steps) render in a few seconds.

use serde_json::{Value, json};

use crate::engine::models::clip::ClipModelConfig;
use crate::engine::models::unet::UNetConfig;
use crate::engine::models::unet::config::UNetConfigFile;
use crate::engine::models::vae::VaeConfig;

/// Token sequence length (with start and end tokens): world prompts take at most 12.
pub const TOKEN_LENGTH: usize = 24;
/// Width of the text tower, and so of the UNet's cross-attention context.
pub const TEXT_WIDTH: usize = 64;
/// Latent side: 64-pixel images, down-sampled 4× by the VAE.
pub const LATENT_SIZE: usize = 16;

/// `model_index.json` of the pipeline folder.
pub fn model_index() -> Value {
    json!({
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.42.1",
        "feature_extractor": [null, null],
        "requires_safety_checker": false,
        "safety_checker": [null, null],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    })
}

/// Stable Diffusion's noise schedule, with v-prediction (see `unet_training` for why).
pub fn scheduler() -> Value {
    json!({
        "_class_name": "DDIMScheduler",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000,
        "clip_sample": false,
        "set_alpha_to_one": false,
        "steps_offset": 1,
        "prediction_type": "v_prediction",
    })
}

/// transformers' `CLIPTextConfig` of the text tower (also the pipeline's text encoder).
pub fn text_config(vocab_size: usize) -> Value {
    json!({
        "architectures": ["CLIPTextModel"],
        "model_type": "clip_text_model",
        "vocab_size": vocab_size,
        "hidden_size": TEXT_WIDTH,
        "intermediate_size": 4 * TEXT_WIDTH,
        "num_hidden_layers": 3,
        "num_attention_heads": 4,
        "max_position_embeddings": TOKEN_LENGTH,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "bos_token_id": vocab_size - 2,
        "eos_token_id": vocab_size - 1,
        "pad_token_id": vocab_size - 1,
    })
}

/// transformers' `CLIPConfig`: the text tower above and a ViT on 8×8 patches.
pub fn clip_config(vocab_size: usize) -> Value {
    json!({
        "architectures": ["CLIPModel"],
        "model_type": "clip",
        "projection_dim": 64,
        "logit_scale_init_value": 2.6592,
        "text_config": text_config(vocab_size),
        "vision_config": {
            "model_type": "clip_vision_model",
            "hidden_size": 64,
            "intermediate_size": 256,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "num_channels": 3,
            "image_size": 64,
            "patch_size": 8,
            "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-5,
        },
    })
}

/// diffusers' `AutoencoderKL`: three stages (4× down-sampling), no attention, so it trains on
/// crops and runs on any size.
pub fn vae_config(scaling_factor: f64) -> Value {
    json!({
        "_class_name": "AutoencoderKL",
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
        "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
        "block_out_channels": [32, 64, 64],
        "layers_per_block": 1,
        "act_fn": "silu",
        "latent_channels": 4,
        "norm_num_groups": 8,
        "sample_size": 64,
        "scaling_factor": scaling_factor,
        "mid_block_add_attention": false,
    })
}

/// diffusers' `UNet2DConditionModel` on 16×16×4 latents: two cross-attention stages and a
/// cross-attention middle block.
pub fn unet_config() -> Value {
    json!({
        "_class_name": "UNet2DConditionModel",
        "sample_size": LATENT_SIZE,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "block_out_channels": [64, 96, 128],
        "layers_per_block": 1,
        "attention_head_dim": 4,
        "cross_attention_dim": TEXT_WIDTH,
        "norm_num_groups": 16,
        "act_fn": "silu",
    })
}

/// The configs above as the engine's typed configs (also checks they are loadable).
pub fn parsed_clip(vocab_size: usize) -> anyhow::Result<ClipModelConfig> {
    Ok(serde_json::from_value(clip_config(vocab_size))?)
}

pub fn parsed_vae(scaling_factor: f64) -> anyhow::Result<VaeConfig> {
    Ok(serde_json::from_value(vae_config(scaling_factor))?)
}

pub fn parsed_unet() -> anyhow::Result<UNetConfig> {
    let file: UNetConfigFile = serde_json::from_value(unet_config())?;
    UNetConfig::from_file(&file)
}
