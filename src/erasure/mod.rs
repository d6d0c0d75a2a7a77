//! Concept erasure by reinforcement learning: the erasure adapter is a policy over stochastic
//! DDIM trajectories, trained with DDPO and PPO clipping on a concept-erasing reward.
//!
//! - `preset` (with `config`): what to erase and how, read and validated from a TOML file.
//! - `workbench`: a loaded model with its scorers; every use case (erase, evaluate, export)
//!   runs on one, from the CLI and the studio alike.
//! - `session`: a run folder and the epoch loop over it; `trainer` (with `rollout`, `ppo`)
//!   is one DDPO epoch; `metrics` what it reports.
//! - `evaluate` and `export`: measuring a trained adapter and writing it for other tools.
//! - `setup`: presets' names turned into loaded parts (models, detectors, judges);
//!   `render` and `seeds`: the deterministic renders and seed ranges everything shares.

pub mod config;
pub mod evaluate;
pub mod export;
pub mod metrics;
pub mod ppo;
pub mod preset;
pub mod render;
pub mod rollout;
pub mod seeds;
pub mod session;
pub mod setup;
pub mod trainer;
pub mod workbench;
