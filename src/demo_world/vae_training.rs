//! Training of the demo VAE on random crops of world images: L1 reconstruction plus a small KL
//! term that keeps the latent posterior well-behaved, as Stable Diffusion's VAE was trained.

use std::path::Path;

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use rand::Rng;

use super::scene::{IMAGE_SIZE, Scene, render_batch};
use crate::engine::diffusion::noise::NoiseStream;
use crate::engine::models::vae::{AutoencoderKl, VaeConfig};
use crate::train::init::seeded_var_builder;
use crate::train::run::{self, Progress, Run, Schedule, sorted_params, step_rng};
use crate::train::{AdamW, AdamWConfig};

const KL_WEIGHT: f64 = 1e-6;

#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct VaeTraining {
    pub steps: usize,
    pub batch: usize,
    /// Side of the square training crops (a multiple of the VAE's down-sampling).
    pub crop: usize,
    pub lr: f64,
    pub seed: u64,
}

/// Images in [0, 1] → the VAE's [-1, 1].
pub fn to_vae_range(images: &Tensor) -> candle_core::Result<Tensor> {
    (images * 2.0)? - 1.0
}

/// What a VAE training run starts from and changes.
pub enum VaePhase<'a> {
    /// The whole VAE, from scratch.
    Full,
    /// Only the decoder, starting from trained weights: the encoder, and so every latent the
    /// UNet was trained on, stays as it is (how Stable Diffusion's ft-MSE VAE was made).
    DecoderOnly { weights: &'a Path },
}

/// Trains a VAE of `config` (or resumes from `checkpoint`).
pub fn train(
    config: &VaeConfig,
    phase: &VaePhase,
    settings: &VaeTraining,
    checkpoint: Option<&Path>,
    device: &Device,
    report: impl FnMut(&Progress),
) -> anyhow::Result<(AutoencoderKl, VarMap, Vec<f64>)> {
    let mut vars = VarMap::new();
    let vae = AutoencoderKl::new(
        seeded_var_builder(&vars, settings.seed, DType::F32, device),
        config,
    )?;
    let mut params = sorted_params(&vars);
    if let VaePhase::DecoderOnly { weights } = phase {
        vars.load(weights)
            .with_context(|| format!("loading VAE weights {}", weights.display()))?;
        params.retain(|(name, _)| {
            name.starts_with("decoder.") || name.starts_with("post_quant_conv.")
        });
    }
    let decoder_only = matches!(phase, VaePhase::DecoderOnly { .. });
    let mut opt = AdamW::new(
        params,
        AdamWConfig {
            lr: settings.lr,
            weight_decay: 0.0,
            ..Default::default()
        },
    )?;
    let run = Run {
        name: if decoder_only { "vae-decoder" } else { "vae" },
        schedule: Schedule::warmup_cosine(settings.steps, settings.lr),
        checkpoint,
        checkpoint_every: 200,
    };
    let align = config.downscale();
    let offsets = (IMAGE_SIZE as usize - settings.crop) / align + 1;
    let losses = run::train(
        &run,
        &mut opt,
        |step| {
            let mut rng = step_rng(settings.seed, step);
            let scenes: Vec<Scene> = (0..settings.batch)
                .map(|_| Scene::sample(&mut rng))
                .collect();
            let images = to_vae_range(&render_batch(&scenes, device)?)?;
            // One crop position per batch, on the latent grid so crops see what full images do.
            let (y, x) = (
                rng.random_range(0..offsets) * align,
                rng.random_range(0..offsets) * align,
            );
            let crops = images
                .narrow(2, y, settings.crop)?
                .narrow(3, x, settings.crop)?;
            let posterior = vae.encode(&crops)?;
            if decoder_only {
                let recon = vae.decode(&posterior.mean.detach())?;
                return Ok((recon - &crops)?.abs()?.mean_all()?);
            }
            let noise = NoiseStream::new(rng.random()).tensor(posterior.mean.shape(), device)?;
            let recon = vae.decode(&posterior.sample(&noise)?)?;
            let l1 = (recon - &crops)?.abs()?.mean_all()?;
            let kl = kl_divergence(&posterior.mean, &posterior.logvar)?;
            Ok((l1 + (kl * KL_WEIGHT)?)?)
        },
        report,
    )?;
    Ok((vae, vars, losses))
}

/// KL(posterior ‖ N(0, 1)), summed over latent elements, averaged over the batch.
fn kl_divergence(mean: &Tensor, logvar: &Tensor) -> candle_core::Result<Tensor> {
    let b = mean.dim(0)? as f64;
    let terms = ((mean.sqr()? + logvar.exp()?)? - logvar)? - 1.0;
    (terms?.sum_all()? * 0.5)? / b
}

/// Mean PSNR (dB) of reconstructions (posterior mean) of `count` full scenes from `seed`.
pub fn reconstruction_psnr(
    vae: &AutoencoderKl,
    count: usize,
    seed: u64,
    device: &Device,
) -> anyhow::Result<f64> {
    let mut rng = step_rng(seed, 0);
    let scenes: Vec<Scene> = (0..count).map(|_| Scene::sample(&mut rng)).collect();
    let mut total = 0.0;
    for chunk in scenes.chunks(16) {
        let images = render_batch(chunk, device)?;
        let recon = vae.decode(&vae.encode(&to_vae_range(&images)?)?.mean)?;
        let recon = ((recon / 2.0)? + 0.5)?.clamp(0.0, 1.0)?;
        let mse = (recon - &images)?
            .sqr()?
            .flatten_from(1)?
            .mean(1)?
            .to_vec1::<f32>()?;
        total += mse
            .iter()
            .map(|&m| -10.0 * f64::from(m.max(1e-10)).log10())
            .sum::<f64>();
    }
    Ok(total / count as f64)
}
