//! Contrastive training of the demo CLIP on the world, and its zero-shot accuracy.
//!
//! World captions often leave attributes out, so one caption can describe several images of a
//! batch: the targets spread evenly over every match instead of assuming only the diagonal
//! pairs belong together.

use candle_core::{D, DType, Device, Tensor};
use candle_nn::VarMap;

use super::captions::Caption;
use super::judge::Attributes;
use super::scene::{Background, Colour, Fill, Object, Scene, render_batch};
use crate::engine::models::clip::text::ids_tensor;
use crate::engine::models::clip::{ClipModel, ClipModelConfig, unit_length};
use crate::engine::models::tokenizer::ClipTokenizer;
use crate::train::init::seeded_var_builder;
use crate::train::run::{self, Progress, Run, Schedule, sorted_params, step_rng};
use crate::train::{AdamW, AdamWConfig};

/// Pixel normalisation of the demo CLIP's image tower (`preprocessor_config.json`): [0, 1] is
/// mapped to [-1, 1].
pub const IMAGE_MEAN: f64 = 0.5;
pub const IMAGE_STD: f64 = 0.5;
/// CLIP caps the learned temperature at 100.
pub(crate) const MAX_LOGIT_SCALE: f64 = 100.0;

/// Images [B, 3, 64, 64] in [0, 1] → the image tower's input.
pub fn pixel_values(images: &Tensor) -> candle_core::Result<Tensor> {
    (images - IMAGE_MEAN)? / IMAGE_STD
}

#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct ClipTraining {
    pub steps: usize,
    pub batch: usize,
    pub lr: f64,
    pub seed: u64,
}

/// Trains a CLIP of `config` from scratch (or resumes `run`'s checkpoint).
pub fn train(
    config: &ClipModelConfig,
    tokenizer: &ClipTokenizer,
    settings: &ClipTraining,
    checkpoint: Option<&std::path::Path>,
    device: &Device,
    report: impl FnMut(&Progress),
) -> anyhow::Result<(ClipModel, VarMap, Vec<f64>)> {
    let vars = VarMap::new();
    let model = ClipModel::new(
        seeded_var_builder(&vars, settings.seed, DType::F32, device),
        config,
    )?;
    let mut opt = AdamW::new(
        sorted_params(&vars),
        AdamWConfig {
            lr: settings.lr,
            weight_decay: 0.1,
            ..Default::default()
        },
    )?;
    let run = Run {
        name: "clip",
        schedule: Schedule::warmup_cosine(settings.steps, settings.lr),
        checkpoint,
        checkpoint_every: 200,
    };
    let losses = run::train(
        &run,
        &mut opt,
        |step| {
            let mut rng = step_rng(settings.seed, step);
            let scenes: Vec<Scene> = (0..settings.batch)
                .map(|_| Scene::sample(&mut rng))
                .collect();
            let captions: Vec<Caption> = scenes
                .iter()
                .map(|s| Caption::sample(s, &mut rng))
                .collect();
            Ok(contrastive_loss(
                &model, tokenizer, &scenes, &captions, device,
            )?)
        },
        report,
    )?;
    Ok((model, vars, losses))
}

/// Symmetric cross-entropy between text–image similarities and the match targets.
fn contrastive_loss(
    model: &ClipModel,
    tokenizer: &ClipTokenizer,
    scenes: &[Scene],
    captions: &[Caption],
    device: &Device,
) -> candle_core::Result<Tensor> {
    let n = scenes.len();
    let ids: Vec<Vec<u32>> = captions.iter().map(|c| tokenizer.encode(&c.text)).collect();
    let text = unit_length(&model.text_embeds(&ids_tensor(&ids, device)?)?)?;
    let image = unit_length(&model.image_embeds(&pixel_values(&render_batch(scenes, device)?)?)?)?;
    let scale = model.logit_scale()?.clamp(0.0, MAX_LOGIT_SCALE)?;
    let logits = text.matmul(&image.t()?)?.broadcast_mul(&scale)?;
    let matches: Vec<f32> = captions
        .iter()
        .flat_map(|c| {
            scenes
                .iter()
                .map(move |s| f32::from(u8::from(c.describes(s))))
        })
        .collect();
    let matches = Tensor::from_vec(matches, (n, n), device)?;
    let to_images = matches.broadcast_div(&matches.sum_keepdim(1)?)?;
    let to_texts = matches.t()?.broadcast_div(&matches.t()?.sum_keepdim(1)?)?;
    let text_loss = soft_cross_entropy(&logits, &to_images)?;
    let image_loss = soft_cross_entropy(&logits.t()?, &to_texts)?;
    (text_loss + image_loss)? / 2.0
}

/// Mean over rows of −Σ target · log softmax(logits).
fn soft_cross_entropy(logits: &Tensor, targets: &Tensor) -> candle_core::Result<Tensor> {
    let log_p = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    (log_p * targets)?.sum(D::Minus1)?.mean_all()?.neg()
}

/// Each attribute's zero-shot prompts, one per value in index order: "a star", "a red shape", "a
/// striped shape", "a shape on a black background".
pub fn attribute_prompts() -> [Vec<String>; 4] {
    [
        Object::ALL
            .iter()
            .map(|o| format!("a {}", o.word()))
            .collect(),
        Colour::ALL
            .iter()
            .map(|c| format!("a {} shape", c.word()))
            .collect(),
        Fill::ALL
            .iter()
            .map(|f| format!("a {} shape", f.word()))
            .collect(),
        Background::ALL
            .iter()
            .map(|b| format!("a shape on a {} background", b.word()))
            .collect(),
    ]
}

/// Unit-length text features of each attribute's [`attribute_prompts`], detached.
pub fn attribute_text_features(
    model: &ClipModel,
    tokenizer: &ClipTokenizer,
    device: &Device,
) -> candle_core::Result<Vec<Tensor>> {
    attribute_prompts()
        .iter()
        .map(|texts| {
            let ids: Vec<Vec<u32>> = texts.iter().map(|t| tokenizer.encode(t)).collect();
            Ok(unit_length(&model.text_embeds(&ids_tensor(&ids, device)?)?)?.detach())
        })
        .collect()
}

/// Zero-shot accuracy [object, colour, fill, background] of `model` on `count` scenes from
/// `seed`: each attribute is read by the best-matching prompt among its values ("a star", "a red
/// shape", "a striped shape", "a shape on a black background").
pub fn zero_shot_accuracy(
    model: &ClipModel,
    tokenizer: &ClipTokenizer,
    count: usize,
    seed: u64,
    device: &Device,
) -> anyhow::Result<[f64; 4]> {
    let mut rng = step_rng(seed, 0);
    let scenes: Vec<Scene> = (0..count).map(|_| Scene::sample(&mut rng)).collect();
    let labels: Vec<[usize; 4]> = scenes
        .iter()
        .map(|s| Attributes::from(s).indices())
        .collect();
    let images = render_batch(&scenes, device)?;
    zero_shot_accuracy_on(model, tokenizer, &images, &labels, device)
}

/// Zero-shot accuracy [object, colour, fill, background] of `model` on `images` [N, 3, H, W] in
/// [0, 1], whose true class indices are `labels`.
pub fn zero_shot_accuracy_on(
    model: &ClipModel,
    tokenizer: &ClipTokenizer,
    images: &Tensor,
    labels: &[[usize; 4]],
    device: &Device,
) -> anyhow::Result<[f64; 4]> {
    let text_features = attribute_text_features(model, tokenizer, device)?;
    let mut correct = [0usize; 4];
    for start in (0..labels.len()).step_by(128) {
        let n = (labels.len() - start).min(128);
        let image =
            unit_length(&model.image_embeds(&pixel_values(&images.narrow(0, start, n)?)?)?)?;
        for (head, text) in text_features.iter().enumerate() {
            let picks = image
                .matmul(&text.t()?)?
                .argmax(D::Minus1)?
                .to_vec1::<u32>()?;
            for (i, pick) in picks.iter().enumerate() {
                correct[head] += usize::from(*pick as usize == labels[start + i][head]);
            }
        }
    }
    Ok(correct.map(|c| c as f64 / labels.len() as f64))
}
