//! Sampling: the DDIM scheduler, seeded noise and the txt2img / img2img pipelines.

pub mod ddim;
pub mod noise;
pub mod pipeline;
