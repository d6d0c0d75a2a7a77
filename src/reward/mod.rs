//! Rewards for erasure: concept detectors and image–text alignment.

pub mod cer;
pub mod clip;
pub mod judge;
pub mod nudenet;
