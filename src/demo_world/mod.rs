//! The demo world: a procedural world of coloured shapes and the tiny models trained on it.
//!
//! `scene` draws 64×64 images of one object described by attributes; `captions` writes the
//! prompts that describe them, from several templates, sometimes leaving attributes out.

pub mod architecture;
pub mod captions;
pub mod clip_generated;
pub mod clip_training;
pub mod judge;
pub mod quality;
pub mod recipe;
pub mod scene;
pub mod unet_training;
pub mod vae_training;
pub mod vocab;

pub use captions::Caption;
pub use scene::{Background, Colour, Fill, Object, Scene};
