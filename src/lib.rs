//! Erasure Studio: concept erasure for Stable Diffusion models.
//!
//! The `engine` module is a differentiable Stable Diffusion implementation in candle with a hook
//! in every cross-attention layer; `parity` and `bench` are the headless jobs the CLI exposes.

pub mod allocator;
pub mod bench;
pub mod demo_world;
pub mod engine;
pub mod fs;
pub mod images;
pub mod parity;
pub mod train;
