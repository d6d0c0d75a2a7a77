//! Reading models from disk: configs, weight files and model sources.

pub mod config;
pub mod hf_cache;
pub mod source;
pub mod weights;
