//! Erasure Studio: concept erasure for Stable Diffusion models.
//!
//! `engine` is a differentiable Stable Diffusion implementation in candle with a hook in every
//! cross-attention layer, which `adapter` (the erasure adapter) plugs into; `reward` scores
//! images; `erasure` trains the adapter by reinforcement learning and measures and exports it;
//! `studio` (feature `studio`) is the desktop app; `demo_world` is the built-in demo model's
//! world; `parity` and `bench` are headless jobs the CLI exposes. ARCHITECTURE.md maps it all.

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
