//! Concept erasure by reinforcement learning: the erasure adapter is a policy over stochastic
//! DDIM trajectories, trained with DDPO and PPO clipping on a concept-erasing reward.

pub mod evaluate;
pub mod export;
pub mod ppo;
pub mod preset;
pub mod rollout;
pub mod session;
pub mod setup;
pub mod trainer;
