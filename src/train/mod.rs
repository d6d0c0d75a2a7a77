//! Training machinery shared by every trainer: the optimiser and resumable checkpoints.

pub mod adamw;
pub mod checkpoint;
pub mod init;
pub mod run;

pub use adamw::{AdamW, AdamWConfig, StepOutcome};
