//! The CLIP scorer's last stages: its image tower learns the world's attributes on images the
//! finished generator drew.
//!
//! The contrastive stage sees only rendered scenes, and contrastive batches rarely need the
//! object to tell captions apart. The CLIP then reads colours and backgrounds perfectly but
//! shapes poorly, and worse still on generated images, which are softer than renders: its star
//! score separated generated stars from other shapes with an AUC of 0.80. As the reward of the
//! demo presets it was easy to game. These stages train each attribute's zero-shot choice ("a
//! star", "a red shape", …) on generated images labelled by their prompts, with the text tower
//! frozen: that tower is the demo model's text encoder, which the UNet was trained on. The last
//! one weighs the object more and draws half its images with η = 1, as the erasure trainer does.

use candle_core::{DType, Tensor};
use candle_nn::VarMap;
use rand::Rng;
use serde::Serialize;

use super::Caption;
use super::clip_training::{ClipTraining, MAX_LOGIT_SCALE, attribute_text_features, pixel_values};
use super::judge::Attributes;
use super::scene::Scene;
use crate::engine::StableDiffusion;
use crate::engine::diffusion::pipeline::{GenerateRequest, SampleHooks, Sampling, txt2img};
use crate::engine::models::clip::{ClipModel, unit_length};
use crate::engine::models::tokenizer::ClipTokenizer;
use crate::train::run::{self, Progress, Run, Schedule, sorted_params, step_rng};
use crate::train::{AdamW, AdamWConfig};

/// Images generated per batch.
const GENERATION_BATCH: usize = 32;
/// DDIM steps of the generated images: those of the demo presets' training samples.
pub const SAMPLING_STEPS: usize = 10;

/// One fine-tuning of the image tower on images the finished generator drew.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct GeneratedTraining {
    /// Images drawn for it.
    pub images: usize,
    /// Share of them drawn with DDIM η = 1, as the erasure trainer samples; the rest with η = 0.
    pub stochastic_share: f64,
    /// Weight of the object's cross-entropy; the other attributes weigh 1.
    pub object_weight: f64,
    pub training: ClipTraining,
}

/// Generated images and the attributes their prompts asked for.
pub struct GeneratedSet {
    /// [N, 3, H, W] in [0, 1].
    pub images: Tensor,
    /// Class index per attribute head, per image.
    pub labels: Vec<[usize; 4]>,
}

/// Draws `count` images from `sd`, each prompted with the full caption of random attributes,
/// with [`SAMPLING_STEPS`] steps and guidance 5 as the demo presets sample in training: the
/// first `1 - stochastic_share` of them deterministically (DDIM η = 0), the rest with η = 1.
pub fn generate(
    sd: &StableDiffusion,
    count: usize,
    stochastic_share: f64,
    seed: u64,
) -> anyhow::Result<GeneratedSet> {
    let mut rng = step_rng(seed, 0);
    let scenes: Vec<Scene> = (0..count).map(|_| Scene::sample(&mut rng)).collect();
    let deterministic = count - (count as f64 * stochastic_share).round() as usize;
    let mut images = Vec::with_capacity(count.div_ceil(GENERATION_BATCH) + 1);
    for (first, eta) in [(0, 0.0), (deterministic, 1.0)] {
        let part = if eta == 0.0 {
            &scenes[..deterministic]
        } else {
            &scenes[deterministic..]
        };
        for (i, chunk) in part.chunks(GENERATION_BATCH).enumerate() {
            let prompts = chunk.iter().map(|s| Caption::full(s).text).collect();
            let sampling = Sampling {
                steps: SAMPLING_STEPS,
                guidance_scale: 5.0,
            };
            let request = GenerateRequest::new(prompts, (64, 64), sampling)
                // Image k uses this + k: far from the seeds anything else draws with.
                .seed(seed.wrapping_mul(1 << 20) + (first + i * GENERATION_BATCH) as u64)
                .eta(eta);
            images.push(txt2img(sd, &request, SampleHooks::default())?.1);
        }
    }
    Ok(GeneratedSet {
        images: Tensor::cat(&images, 0)?,
        labels: scenes
            .iter()
            .map(|s| Attributes::from(s).indices())
            .collect(),
    })
}

/// Fine-tunes the image tower, its projection and the temperature of `model` (variables `vars`)
/// on `set`: the weighted sum over attributes of the cross-entropy of the zero-shot choice.
/// Resumes from `checkpoint` when it exists; `name` names the run in progress lines.
#[allow(clippy::too_many_arguments)]
pub fn train_image_tower(
    model: &ClipModel,
    vars: &VarMap,
    tokenizer: &ClipTokenizer,
    set: &GeneratedSet,
    stage: &GeneratedTraining,
    name: &'static str,
    checkpoint: Option<&std::path::Path>,
    report: impl FnMut(&Progress),
) -> anyhow::Result<Vec<f64>> {
    let settings = &stage.training;
    let device = set.images.device().clone();
    let mut params = sorted_params(vars);
    params.retain(|(name, _)| {
        name.starts_with("vision_model.")
            || name.starts_with("visual_projection.")
            || name == "logit_scale"
    });
    let mut opt = AdamW::new(
        params,
        AdamWConfig {
            lr: settings.lr,
            weight_decay: 0.1,
            ..Default::default()
        },
    )?;
    let texts = attribute_text_features(model, tokenizer, &device)?;
    let run = Run {
        name,
        schedule: Schedule::warmup_cosine(settings.steps, settings.lr),
        checkpoint,
        checkpoint_every: 200,
    };
    let count = set.labels.len();
    run::train(
        &run,
        &mut opt,
        |step| {
            let mut rng = step_rng(settings.seed, step);
            let picks: Vec<usize> = (0..settings.batch)
                .map(|_| rng.random_range(0..count))
                .collect();
            let index = Tensor::new(picks.iter().map(|&i| i as u32).collect::<Vec<_>>(), &device)?;
            let images = set.images.index_select(&index, 0)?;
            let image = unit_length(&model.image_embeds(&pixel_values(&images)?)?)?;
            let scale = model.logit_scale()?.clamp(0.0, MAX_LOGIT_SCALE)?;
            let mut loss = Tensor::zeros((), DType::F32, &device)?;
            for (head, head_texts) in texts.iter().enumerate() {
                let labels: Vec<u32> = picks.iter().map(|&i| set.labels[i][head] as u32).collect();
                let logits = image.matmul(&head_texts.t()?)?.broadcast_mul(&scale)?;
                let ce = candle_nn::loss::cross_entropy(&logits, &Tensor::new(labels, &device)?)?;
                let weight = if head == 0 { stage.object_weight } else { 1.0 };
                loss = (loss + (ce * weight)?)?;
            }
            Ok(loss)
        },
        report,
    )
}
