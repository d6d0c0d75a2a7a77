//! Stable Diffusion in candle: tokenizer, CLIP, UNet, VAE, DDIM and pipelines, differentiable
//! wherever training needs it.
//!
//! - `models`: the networks (CLIP text and vision, UNet with a hook in every cross-attention
//!   layer, VAE) and the tokenizer, assembled into [`StableDiffusion`].
//! - `nn`: the layers they are built from; each runs an engine kernel or candle's ops.
//! - `kernels`: the engine's CPU kernels (custom ops with forward and backward passes).
//! - `diffusion`: the DDIM scheduler, seeded noise and the txt2img / img2img pipelines.
//! - `io`: configs, weight files and model sources (folders, the Hugging Face cache, the demo).

pub mod diffusion;
pub mod io;
mod kernels;
pub mod models;
pub mod nn;

pub use io::source::ModelSource;
pub use models::StableDiffusion;
