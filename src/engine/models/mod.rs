//! The networks of a Stable Diffusion model and the tokenizer, in diffusers' layout and names.

pub mod clip;
pub mod stable_diffusion;
pub mod tokenizer;
pub mod unet;
pub mod vae;

pub use stable_diffusion::StableDiffusion;
