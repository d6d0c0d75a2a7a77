//! Stable Diffusion in candle: tokenizer, CLIP text encoder, UNet, VAE, DDIM and pipelines.
//!
//! Every op on a gradient path has a backward in candle (see `nn` for the replacements of
//! candle's fused ops that silently drop gradients, and `conv` and `channel`
//! for ops whose candle backward is too slow to train with; `linear` for frozen layers whose
//! weights need no gradient).

pub mod attention;
pub mod channel;
pub mod clip_encoder;
pub mod clip_model;
pub mod clip_text;
pub mod clip_vision;
pub mod config;
pub mod conv;
mod cpu_kernels;
pub mod ddim;
pub mod geglu;
pub mod group_norm;
pub mod layer_norm;
pub mod linear;
pub mod model;
pub mod nn;
pub mod noise;
mod packed_gemm;
pub mod pipeline;
pub mod quick_gelu;
pub mod resnet;
pub mod sampling;
pub mod tokenizer;
pub mod unet;
pub mod vae;
pub mod weights;
pub mod winograd;

pub use model::{ModelSource, StableDiffusion};
