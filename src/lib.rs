//! Erasure Studio: concept erasure for Stable Diffusion models.
//!
//! The `engine` module is a differentiable Stable Diffusion implementation in candle with a hook
//! in every cross-attention layer, which `adapter` (the erasure adapter) plugs into; `erasure`
//! trains it by reinforcement learning; `parity` and `bench` are the headless jobs the CLI
//! exposes.

pub mod adapter;
pub mod allocator;
pub mod bench;
pub mod demo_world;
pub mod engine;
pub mod erasure;
pub mod fs;
pub mod images;
pub mod parity;
pub mod reward;
pub mod stats;
#[cfg(feature = "studio")]
pub mod studio;
pub mod threads;
pub mod train;
