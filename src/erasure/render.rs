//! Deterministic renders of a preset's prompts, for preview grids and evaluation.

use anyhow::bail;
use candle_core::Tensor;

use super::preset::Preset;
use crate::engine::StableDiffusion;
use crate::engine::diffusion::pipeline::{SampleHooks, txt2img};
use crate::engine::models::unet::UNetHook;

/// The image side a preset samples at on `sd`.
pub fn image_size(preset: &Preset, sd: &StableDiffusion) -> anyhow::Result<usize> {
    match (preset.sampling.size, sd.native_size()) {
        (Some(size), _) => Ok(size),
        (None, Some((h, _))) => Ok(h),
        (None, None) => {
            bail!("the model gives no native image size; set `sampling.size` in the preset")
        }
    }
}

/// Renders `prompts` (one seed each, from `seed`) deterministically, with `hook` if given.
pub fn render(
    sd: &StableDiffusion,
    preset: &Preset,
    prompts: &[String],
    seed: u64,
    hook: Option<&dyn UNetHook>,
) -> anyhow::Result<Tensor> {
    let size = image_size(preset, sd)?;
    let request = preset
        .sampling
        .request(prompts.to_vec(), size, preset.evaluation.steps)
        .seed(seed);
    let hooks = SampleHooks {
        adapter: hook,
        on_step: None,
    };
    Ok(txt2img(sd, &request, hooks)?.1)
}
