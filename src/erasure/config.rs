//! The trainer's settings as a preset holds them: DDPO's hyper-parameters and how images are
//! sampled, each validated with errors that name the field.

use anyhow::bail;
use serde::{Deserialize, Serialize};

use crate::engine::diffusion::pipeline::{GenerateRequest, Sampling};

/// DDPO's hyper-parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DdpoConfig {
    pub epochs: usize,
    /// Trajectories sampled (and later scored again) together; the PPO ratio is exact only when
    /// a batch is rescored as it was sampled, so this is also the training batch.
    pub batch_size: usize,
    pub batches_per_epoch: usize,
    /// Each drawn prompt is sampled this many times per epoch.
    pub samples_per_prompt: usize,
    /// What rewards are normalised against to make advantages.
    pub baseline: Baseline,
    /// Passes over each epoch's samples.
    pub inner_epochs: usize,
    /// Share of the denoising steps, counted from the noisiest, that training may pick from.
    /// What an image shows is decided in the first steps; later steps only refine it, so
    /// their log-probabilities add noise to the gradient and little else. 1 keeps every step
    /// (as DDPO does).
    pub early_steps: f64,
    /// Share of those steps trained on per inner epoch, drawn at random.
    pub timestep_fraction: f64,
    /// Optimiser steps per inner epoch; the backward passes in between accumulate.
    pub updates_per_inner_epoch: usize,
    /// PPO clip range ε on the probability ratio.
    pub clip_range: f64,
    /// Advantages are clamped to ±this.
    pub advantage_clip: f64,
    pub learning_rate: f64,
    pub weight_decay: f64,
    pub max_grad_norm: f64,
    /// Weight of the preservation term: the mean squared difference between the adapter's
    /// guided noise predictions and the original model's along the original model's
    /// trajectories on neighbour and neutral prompts, added to every update. 0 trains on the
    /// reward alone, as the paper does.
    pub preservation_weight: f64,
    /// Trajectories the original model samples each epoch from the preservation prompts, to
    /// hold the adapter to.
    pub preservation_samples: usize,
    /// Weight of the anchor term: the mean squared difference between the adapter's noise
    /// prediction on the epoch's target trajectories and the original model's for the same
    /// prompt with the concept words taken out, pushed `anchor_guidance` further from the
    /// concept; added to every update. It gives each update a dense pull towards erasure: the
    /// policy gradient alone is a noisy estimate (one random direction per sample) that needs
    /// far more samples than a CPU run affords. 0 trains on the reward alone, as the paper does.
    pub anchor_weight: f64,
    /// Negative guidance of the anchor term's target, `v(anchor) − g·(v(prompt) − v(anchor))`:
    /// 0 maps the concept onto the prompt without it, higher values push further away.
    pub anchor_guidance: f64,
    pub seed: u64,
}

impl Default for DdpoConfig {
    fn default() -> Self {
        Self {
            epochs: 40,
            batch_size: 8,
            batches_per_epoch: 2,
            samples_per_prompt: 4,
            baseline: Baseline::Prompt,
            inner_epochs: 1,
            early_steps: 1.0,
            timestep_fraction: 0.5,
            updates_per_inner_epoch: 2,
            clip_range: 1e-4,
            advantage_clip: 5.0,
            learning_rate: 3e-4,
            weight_decay: 1e-4,
            max_grad_norm: 1.0,
            preservation_weight: 0.0,
            preservation_samples: 8,
            anchor_weight: 0.0,
            anchor_guidance: 0.0,
            seed: 0,
        }
    }
}

impl DdpoConfig {
    pub fn validate(&self) -> anyhow::Result<()> {
        require(self.epochs > 0, "ddpo.epochs", "must be at least 1")?;
        require(self.batch_size > 0, "ddpo.batch_size", "must be at least 1")?;
        require(
            self.batches_per_epoch > 0,
            "ddpo.batches_per_epoch",
            "must be at least 1",
        )?;
        require(
            self.samples_per_prompt > 0
                && (self.batch_size * self.batches_per_epoch) % self.samples_per_prompt == 0,
            "ddpo.samples_per_prompt",
            "must be at least 1 and divide batch_size × batches_per_epoch",
        )?;
        require(
            self.baseline == Baseline::Batch || self.samples_per_prompt >= 2,
            "ddpo.samples_per_prompt",
            "must be at least 2 with baseline = \"prompt\" (one sample has no spread to normalise by)",
        )?;
        require(
            self.inner_epochs > 0,
            "ddpo.inner_epochs",
            "must be at least 1",
        )?;
        require(
            self.early_steps > 0.0 && self.early_steps <= 1.0,
            "ddpo.early_steps",
            "must be in (0, 1]",
        )?;
        require(
            self.timestep_fraction > 0.0 && self.timestep_fraction <= 1.0,
            "ddpo.timestep_fraction",
            "must be in (0, 1]",
        )?;
        require(
            self.updates_per_inner_epoch > 0,
            "ddpo.updates_per_inner_epoch",
            "must be at least 1",
        )?;
        require(
            self.clip_range > 0.0 && self.clip_range.is_finite(),
            "ddpo.clip_range",
            "must be a positive number",
        )?;
        require(
            self.advantage_clip > 0.0,
            "ddpo.advantage_clip",
            "must be > 0",
        )?;
        require(
            self.learning_rate > 0.0 && self.learning_rate.is_finite(),
            "ddpo.learning_rate",
            "must be a positive number",
        )?;
        require(
            self.weight_decay >= 0.0 && self.weight_decay.is_finite(),
            "ddpo.weight_decay",
            "must be a number ≥ 0",
        )?;
        require(
            self.max_grad_norm > 0.0 && self.max_grad_norm.is_finite(),
            "ddpo.max_grad_norm",
            "must be a positive number",
        )?;
        require(
            self.preservation_weight >= 0.0 && self.preservation_weight.is_finite(),
            "ddpo.preservation_weight",
            "must be a number ≥ 0",
        )?;
        require(
            self.preservation_samples > 0,
            "ddpo.preservation_samples",
            "must be at least 1",
        )?;
        require(
            self.anchor_weight >= 0.0 && self.anchor_weight.is_finite(),
            "ddpo.anchor_weight",
            "must be a number ≥ 0",
        )?;
        require(
            self.anchor_guidance >= 0.0 && self.anchor_guidance.is_finite(),
            "ddpo.anchor_guidance",
            "must be a number ≥ 0",
        )?;
        Ok(())
    }

    pub(crate) fn samples_per_epoch(&self) -> usize {
        self.batch_size * self.batches_per_epoch
    }
}

/// How advantages are normalised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Baseline {
    /// Over the samples of the same prompt (DDPO's per-prompt statistics), so easy and hard
    /// prompts weigh alike.
    Prompt,
    /// Over the whole epoch. Better when the detector saturates: a prompt whose samples all
    /// show the concept then gets advantages near zero instead of its noise scaled up to ±1.
    Batch,
}

/// How images are sampled, in training and evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SamplingSpec {
    pub steps: usize,
    pub guidance_scale: f64,
    /// DDIM η of training trajectories (> 0); evaluation samples deterministically.
    pub eta: f64,
    pub negative_prompt: String,
    /// Image side in pixels; the model's native size when absent.
    pub size: Option<usize>,
}

impl Default for SamplingSpec {
    fn default() -> Self {
        Self {
            steps: 20,
            guidance_scale: 7.5,
            eta: 1.0,
            negative_prompt: String::new(),
            size: None,
        }
    }
}

impl SamplingSpec {
    /// A deterministic request for `prompts` at `size`×`size` pixels in `steps` steps, with
    /// this guidance and negative prompt.
    pub fn request(&self, prompts: Vec<String>, size: usize, steps: usize) -> GenerateRequest {
        let sampling = Sampling {
            steps,
            guidance_scale: self.guidance_scale,
        };
        GenerateRequest::new(prompts, (size, size), sampling).negative(&self.negative_prompt)
    }
}

/// Fails with the field's name and what it must be, unless `ok`: the one way settings are
/// checked.
pub(crate) fn require(ok: bool, field: &str, what: &str) -> anyhow::Result<()> {
    if ok {
        Ok(())
    } else {
        bail!("field `{field}` {what}")
    }
}
