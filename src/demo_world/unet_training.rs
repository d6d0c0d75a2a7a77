//! Training of the demo UNet: the standard diffusion loss on VAE latents of world scenes,
//! conditioned on the frozen text encoder, with caption dropout so classifier-free guidance
//! works, and min-SNR loss weighting, which speeds convergence.
//!
//! The demo model predicts v (as Stable Diffusion 2 does), not ε: with ε the loss barely depends
//! on the clean image at high noise (its weight there is √SNR ≈ 0.07), so a short training never
//! learns what the prompt says about the whole frame — a first demo model drew every background
//! from the initial noise, whatever the prompt. v puts the clean image in the target there.

use std::path::Path;

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use rand::Rng;

use super::captions::Caption;
use super::scene::{Scene, render_batch};
use super::vae_training::to_vae_range;
use crate::engine::diffusion::ddim::{PredictionType, SchedulerConfig};
use crate::engine::diffusion::noise::NoiseStream;
use crate::engine::models::clip::text::{ClipTextModel, ids_tensor};
use crate::engine::models::tokenizer::ClipTokenizer;
use crate::engine::models::unet::{UNet, UNetConfig};
use crate::engine::models::vae::AutoencoderKl;
use crate::train::init::seeded_var_builder;
use crate::train::run::{self, Progress, Run, Schedule, sorted_params, step_rng};
use crate::train::{AdamW, AdamWConfig};

/// Min-SNR-γ weighting (Hang et al. 2023): high-SNR timesteps stop dominating the loss.
const MIN_SNR_GAMMA: f64 = 5.0;

/// The regression target for a prediction type and its min-SNR-γ weight at ᾱ: (coefficient of
/// the clean latents, coefficient of the noise, weight).
fn target(prediction: PredictionType, alpha_bar: f64) -> anyhow::Result<(f64, f64, f64)> {
    let snr = alpha_bar / (1.0 - alpha_bar);
    Ok(match prediction {
        PredictionType::Epsilon => (0.0, 1.0, MIN_SNR_GAMMA.min(snr) / snr),
        PredictionType::VPrediction => (
            -(1.0 - alpha_bar).sqrt(),
            alpha_bar.sqrt(),
            MIN_SNR_GAMMA.min(snr) / (snr + 1.0),
        ),
        PredictionType::Sample => anyhow::bail!("the demo trainer predicts ε or v, not samples"),
    })
}

#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct UNetTraining {
    pub steps: usize,
    pub batch: usize,
    pub lr: f64,
    /// Fraction of captions replaced by the empty prompt.
    pub caption_dropout: f64,
    /// The shipped weights are this exponential moving average of the iterates.
    pub ema_decay: f64,
    pub seed: u64,
}

/// Scenes and their scaled VAE latents, encoded once: the UNet never needs the pixels.
pub struct LatentDataset {
    pub scenes: Vec<Scene>,
    /// [N, C, h, w], multiplied by the VAE's scaling factor.
    pub latents: Tensor,
}

impl LatentDataset {
    /// Draws `count` scenes from `seed` and encodes them (posterior means).
    pub fn encode(
        vae: &AutoencoderKl,
        count: usize,
        seed: u64,
        device: &Device,
    ) -> anyhow::Result<Self> {
        let scenes = Self::scenes(count, seed);
        let latents = scenes
            .chunks(64)
            .map(|chunk| {
                let images = to_vae_range(&render_batch(chunk, device)?)?;
                vae.scale(&vae.encode(&images)?.mean)
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            scenes,
            latents: Tensor::cat(&latents, 0)?,
        })
    }

    fn scenes(count: usize, seed: u64) -> Vec<Scene> {
        let mut rng = step_rng(seed, 0);
        (0..count).map(|_| Scene::sample(&mut rng)).collect()
    }

    /// Saves the latents; the scenes are redrawn from `seed` on load.
    pub fn save(&self, path: &Path, seed: u64) -> anyhow::Result<()> {
        let tensors =
            std::collections::HashMap::from([("latents".to_string(), self.latents.clone())]);
        let meta = std::collections::HashMap::from([("seed".to_string(), seed.to_string())]);
        crate::fs::atomically(path, |tmp| {
            Ok(safetensors::serialize_to_file(&tensors, Some(meta), tmp)?)
        })
    }

    pub fn load(path: &Path, seed: u64, device: &Device) -> anyhow::Result<Self> {
        let latents = candle_core::safetensors::load(path, device)?
            .remove("latents")
            .with_context(|| format!("{}: no `latents` tensor", path.display()))?;
        Ok(Self {
            scenes: Self::scenes(latents.dim(0)?, seed),
            latents,
        })
    }
}

/// Trains a UNet of `config` from scratch (or resumes from `checkpoint`).
#[allow(clippy::too_many_arguments)]
pub fn train(
    config: &UNetConfig,
    text_encoder: &ClipTextModel,
    tokenizer: &ClipTokenizer,
    scheduler: &SchedulerConfig,
    data: &LatentDataset,
    settings: &UNetTraining,
    checkpoint: Option<&Path>,
    device: &Device,
    report: impl FnMut(&Progress),
) -> anyhow::Result<(UNet, VarMap, Vec<f64>)> {
    let vars = VarMap::new();
    let unet = UNet::new(
        seeded_var_builder(&vars, settings.seed, DType::F32, device),
        config,
    )?;
    let mut opt = AdamW::new(
        sorted_params(&vars),
        AdamWConfig {
            lr: settings.lr,
            weight_decay: 0.01,
            ema_decay: Some(settings.ema_decay),
            ..Default::default()
        },
    )?;
    let run = Run {
        name: "unet",
        schedule: Schedule::warmup_cosine(settings.steps, settings.lr),
        checkpoint,
        checkpoint_every: 100,
    };
    let alphas_cumprod = scheduler.alphas_cumprod();
    let targets = alphas_cumprod
        .iter()
        .map(|&a| target(scheduler.prediction_type, a))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let item_shape = data.latents.dims()[1..].to_vec();
    let losses = run::train(
        &run,
        &mut opt,
        |step| {
            let mut rng = step_rng(settings.seed, step);
            let picks: Vec<u32> = (0..settings.batch)
                .map(|_| rng.random_range(0..data.scenes.len()) as u32)
                .collect();
            let texts: Vec<String> = picks
                .iter()
                .map(|&i| {
                    let caption = Caption::sample(&data.scenes[i as usize], &mut rng);
                    if rng.random_bool(settings.caption_dropout) {
                        String::new()
                    } else {
                        caption.text
                    }
                })
                .collect();
            let ids: Vec<Vec<u32>> = texts.iter().map(|t| tokenizer.encode(t)).collect();
            let context = text_encoder.forward(&ids_tensor(&ids, device)?)?.detach();
            let x0 = data
                .latents
                .index_select(&Tensor::new(picks.as_slice(), device)?, 0)?;
            let timesteps: Vec<u32> = (0..settings.batch)
                .map(|_| rng.random_range(0..alphas_cumprod.len()) as u32)
                .collect();
            let mut shape = vec![settings.batch];
            shape.extend(&item_shape);
            let noise = NoiseStream::new(rng.random()).tensor(shape, device)?;
            let column = |f: &dyn Fn(usize) -> f64| {
                let v: Vec<f32> = timesteps.iter().map(|&t| f(t as usize) as f32).collect();
                Tensor::from_vec(v, (settings.batch, 1, 1, 1), device)
            };
            let noisy = (x0.broadcast_mul(&column(&|t| alphas_cumprod[t].sqrt())?)?
                + noise.broadcast_mul(&column(&|t| (1.0 - alphas_cumprod[t]).sqrt())?)?)?;
            let goal = (x0.broadcast_mul(&column(&|t| targets[t].0)?)?
                + noise.broadcast_mul(&column(&|t| targets[t].1)?)?)?;
            let weight = column(&|t| targets[t].2)?;
            let t = Tensor::new(timesteps.as_slice(), device)?;
            let pred = unet.forward(&noisy, &t, &context, None)?;
            let per_item = (pred - goal)?
                .sqr()?
                .mean_keepdim(3)?
                .mean_keepdim(2)?
                .mean_keepdim(1)?;
            Ok(per_item.broadcast_mul(&weight)?.mean_all()?)
        },
        report,
    )?;
    opt.use_averages()?;
    Ok((unet, vars, losses))
}
