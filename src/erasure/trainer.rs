//! The DDPO epoch: sample stochastic trajectories through the adapter, score the final images
//! with the concept-erasing reward, normalise rewards into advantages (per prompt or over the
//! epoch), then take PPO steps on a random subset of each trajectory's early denoising steps.
//!
//! Everything random in epoch `e` is drawn from `(seed, e)`, so a run resumed from the
//! checkpoint after epoch `e` continues exactly as the uninterrupted run would (for the same
//! thread count, which decides how sums are split).

use std::path::Path;
use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor};
use rand::Rng;
use rand::seq::SliceRandom;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use super::ppo::{advantages, clipped_loss};
use super::preset::SamplingSpec;
use super::rollout::{self, Trajectories};
use crate::adapter::{AdapterConfig, ErasureAdapter};
use crate::engine::StableDiffusion;
use crate::engine::diffusion::pipeline::{Conditioning, GenerateRequest, decode_images};
use crate::reward::cer::{
    CerWeights, ErasureReward, RewardComponents, filter_words, replace_words,
};
use crate::stats::mean_std;
use crate::train::run::{sorted_params, step_rng};
use crate::train::{AdamW, AdamWConfig, StepOutcome, checkpoint};

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
        let checks = [
            (self.epochs > 0, "ddpo.epochs", "must be at least 1"),
            (self.batch_size > 0, "ddpo.batch_size", "must be at least 1"),
            (
                self.batches_per_epoch > 0,
                "ddpo.batches_per_epoch",
                "must be at least 1",
            ),
            (
                self.samples_per_prompt > 0
                    && (self.batch_size * self.batches_per_epoch) % self.samples_per_prompt == 0,
                "ddpo.samples_per_prompt",
                "must be at least 1 and divide batch_size × batches_per_epoch",
            ),
            (
                self.baseline == Baseline::Batch || self.samples_per_prompt >= 2,
                "ddpo.samples_per_prompt",
                "must be at least 2 with baseline = \"prompt\" (one sample has no spread to normalise by)",
            ),
            (
                self.inner_epochs > 0,
                "ddpo.inner_epochs",
                "must be at least 1",
            ),
            (
                self.early_steps > 0.0 && self.early_steps <= 1.0,
                "ddpo.early_steps",
                "must be in (0, 1]",
            ),
            (
                self.timestep_fraction > 0.0 && self.timestep_fraction <= 1.0,
                "ddpo.timestep_fraction",
                "must be in (0, 1]",
            ),
            (
                self.updates_per_inner_epoch > 0,
                "ddpo.updates_per_inner_epoch",
                "must be at least 1",
            ),
            (
                self.clip_range > 0.0 && self.clip_range.is_finite(),
                "ddpo.clip_range",
                "must be a positive number",
            ),
            (
                self.advantage_clip > 0.0,
                "ddpo.advantage_clip",
                "must be > 0",
            ),
            (
                self.learning_rate > 0.0 && self.learning_rate.is_finite(),
                "ddpo.learning_rate",
                "must be a positive number",
            ),
            (
                self.weight_decay >= 0.0 && self.weight_decay.is_finite(),
                "ddpo.weight_decay",
                "must be a number ≥ 0",
            ),
            (
                self.max_grad_norm > 0.0 && self.max_grad_norm.is_finite(),
                "ddpo.max_grad_norm",
                "must be a positive number",
            ),
            (
                self.preservation_weight >= 0.0 && self.preservation_weight.is_finite(),
                "ddpo.preservation_weight",
                "must be a number ≥ 0",
            ),
            (
                self.preservation_samples > 0,
                "ddpo.preservation_samples",
                "must be at least 1",
            ),
            (
                self.anchor_weight >= 0.0 && self.anchor_weight.is_finite(),
                "ddpo.anchor_weight",
                "must be a number ≥ 0",
            ),
            (
                self.anchor_guidance >= 0.0 && self.anchor_guidance.is_finite(),
                "ddpo.anchor_guidance",
                "must be a number ≥ 0",
            ),
        ];
        for (ok, field, what) in checks {
            if !ok {
                anyhow::bail!("field `{field}` {what}");
            }
        }
        Ok(())
    }

    fn samples_per_epoch(&self) -> usize {
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

/// λ1·r_erase + λ2·r_align per image, before standardisation.
fn unnormalised_total(rewards: &RewardComponents, weights: &CerWeights) -> Vec<f64> {
    rewards
        .erase
        .iter()
        .zip(&rewards.align)
        .map(|(e, a)| weights.lambda_erase * e + weights.lambda_align * a)
        .collect()
}

/// Mean and standard deviation over an epoch's samples.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Spread {
    pub mean: f64,
    pub std: f64,
}

impl Spread {
    fn of(values: &[f64]) -> Self {
        let (mean, std) = mean_std(values);
        Self { mean, std }
    }
}

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochMetrics {
    /// 1-based: the epoch just finished.
    pub epoch: usize,
    pub p_concept: Spread,
    pub reward_erase: Spread,
    pub reward_align: Spread,
    pub reward_total: Spread,
    /// λ1·r_erase + λ2·r_align before the batch standardisation, whose mean (unlike the
    /// standardised total's) moves as training goes; absent in runs from before it was logged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reward_unnormalised: Option<Spread>,
    /// Mean PPO loss over the backward passes taken; NaN (JSON `null`) when none was.
    #[serde(deserialize_with = "nan_if_null")]
    pub loss: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub clip_fraction: f64,
    #[serde(deserialize_with = "nan_if_null")]
    pub approx_kl: f64,
    /// Mean preservation term (unweighted) before each update: how far the adapter's noise
    /// predictions moved from the original model's on the preservation prompts; absent without
    /// a preservation term.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preservation_drift: Option<f64>,
    /// Mean anchor term (unweighted) before each update: how far the adapter's predictions on
    /// the target trajectories are from the concept-free target; absent without an anchor term.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anchor_distance: Option<f64>,
    /// Mean gradient norm (before clipping) of the applied updates.
    #[serde(deserialize_with = "nan_if_null")]
    pub grad_norm: f64,
    pub updates: usize,
    /// Updates dropped because a gradient was not finite or every loss of their group was not.
    pub skipped_updates: usize,
    /// Backward passes dropped because their loss was not finite.
    pub skipped_losses: usize,
    /// Why the epoch took no training step at all (a non-finite reward), if it did not.
    pub skipped_reason: Option<String>,
    pub seconds_sampling: f64,
    pub seconds_reward: f64,
    pub seconds_training: f64,
    pub seconds: f64,
}

/// JSON has no NaN: serde_json writes it as `null`, which reads back as NaN here, so the
/// metrics of an epoch that took no update survive a resume.
fn nan_if_null<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(deserializer)?.unwrap_or(f64::NAN))
}

/// What a run trains on.
pub struct TrainingPrompts {
    /// Prompts asking for the concept, sampled and rewarded.
    pub target: Vec<String>,
    /// Prompts whose images must not change (neighbours and neutral), held to the original
    /// model by the preservation term.
    pub preservation: Vec<String>,
    /// Stand-ins for the concept's words in the anchor term's prompts, used in turn; empty to
    /// drop the words.
    pub anchor_substitutes: Vec<String>,
}

/// The anchor term's prompts: each of `prompts` with the concept's `words` replaced by the
/// `substitutes` in turn, or dropped when there are none.
pub fn anchor_prompts(prompts: &[String], words: &[String], substitutes: &[String]) -> Vec<String> {
    prompts
        .iter()
        .enumerate()
        .map(|(i, p)| match substitutes.len() {
            0 => filter_words(p, words),
            n => replace_words(p, words, &substitutes[i % n]),
        })
        .collect()
}

/// A DDPO run in memory: the adapter, its optimiser and the epochs done.
pub struct ErasureTrainer<'a> {
    sd: &'a StableDiffusion,
    reward: &'a ErasureReward,
    prompts: TrainingPrompts,
    sampling: SamplingSpec,
    size: usize,
    config: DdpoConfig,
    adapter: ErasureAdapter,
    opt: AdamW,
    epochs_done: usize,
}

/// Checkpoint metadata key for the epochs a checkpoint has done.
const EPOCH_KEY: &str = "epochs_done";

impl<'a> ErasureTrainer<'a> {
    /// A fresh adapter for `sd`, to be trained on `prompts` at `size`×`size` pixels.
    pub fn new(
        sd: &'a StableDiffusion,
        reward: &'a ErasureReward,
        prompts: TrainingPrompts,
        sampling: SamplingSpec,
        size: usize,
        adapter_config: AdapterConfig,
        config: DdpoConfig,
    ) -> anyhow::Result<Self> {
        config.validate()?;
        if prompts.target.is_empty() {
            anyhow::bail!(
                "no target prompts to train on: every one is held out for evaluation; add \
                 prompts or lower `prompts.held_out`"
            );
        }
        if config.preservation_weight > 0.0 && prompts.preservation.is_empty() {
            anyhow::bail!(
                "field `ddpo.preservation_weight` is above 0 but there are no neighbour or \
                 neutral prompts to train on; add some, or set it to 0"
            );
        }
        if config.anchor_weight > 0.0 && reward.concept_words.is_empty() {
            anyhow::bail!(
                "field `ddpo.anchor_weight` is above 0 but `prompts.filter_words` is empty, so \
                 the anchor prompt would be the target prompt itself; name the concept's words, \
                 or set it to 0"
            );
        }
        let adapter = ErasureAdapter::new(
            &sd.unet,
            adapter_config,
            config.seed,
            DType::F32,
            &sd.device,
        )?;
        let opt = AdamW::new(
            sorted_params(adapter.vars()),
            AdamWConfig {
                lr: config.learning_rate,
                weight_decay: config.weight_decay,
                max_grad_norm: Some(config.max_grad_norm),
                ..Default::default()
            },
        )?;
        Ok(Self {
            sd,
            reward,
            prompts,
            sampling,
            size,
            config,
            adapter,
            opt,
            epochs_done: 0,
        })
    }

    pub fn adapter(&self) -> &ErasureAdapter {
        &self.adapter
    }

    pub fn epochs_done(&self) -> usize {
        self.epochs_done
    }

    /// Saves adapter, optimiser state and epochs done. Refuses to write non-finite weights.
    pub fn save_checkpoint(
        &self,
        path: &Path,
        mut metadata: std::collections::BTreeMap<String, String>,
    ) -> anyhow::Result<()> {
        self.ensure_finite()?;
        metadata.insert(EPOCH_KEY.into(), self.epochs_done.to_string());
        checkpoint::save(path, &self.opt, &metadata)
    }

    /// Restores a checkpoint written by [`save_checkpoint`](Self::save_checkpoint); returns its
    /// metadata.
    pub fn load_checkpoint(
        &mut self,
        path: &Path,
    ) -> anyhow::Result<std::collections::HashMap<String, String>> {
        let metadata = checkpoint::load(path, &mut self.opt)?;
        self.epochs_done = metadata
            .get(EPOCH_KEY)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "{}: no `{EPOCH_KEY}` in the metadata; not an erasure checkpoint \
                     (move it away to start the run afresh)",
                    path.display()
                )
            })?;
        Ok(metadata)
    }

    /// Errors if any adapter weight is NaN or infinite, so such weights are never saved.
    pub fn ensure_finite(&self) -> anyhow::Result<()> {
        for (name, var) in self.opt.params() {
            let sum = var
                .as_tensor()
                .to_dtype(DType::F64)?
                .abs()?
                .sum_all()?
                .to_scalar::<f64>()?;
            if !sum.is_finite() {
                anyhow::bail!(
                    "adapter weight `{name}` is not finite; refusing to save it. Lower \
                     `ddpo.learning_rate` and resume from the last checkpoint"
                );
            }
        }
        Ok(())
    }

    /// One DDPO epoch. `stop` is polled between denoising steps and rounds of backward passes;
    /// when it returns true the epoch is abandoned, the adapter left as it was before it, and
    /// `None` returned.
    pub fn run_epoch(
        &mut self,
        stop: &(dyn Fn() -> bool + Sync),
    ) -> anyhow::Result<Option<EpochMetrics>> {
        let started = Instant::now();
        let c = self.config.clone();
        let mut rng = step_rng(c.seed, self.epochs_done);
        let epoch_prompts = self.draw_prompts(&mut rng);

        // The seeds are drawn in the order the batches used to be sampled one after another.
        let requests: Vec<GenerateRequest> = epoch_prompts
            .chunks(c.batch_size)
            .map(|prompts| self.request(prompts.to_vec(), &mut rng))
            .collect();
        let reference_request = (c.preservation_weight > 0.0).then(|| {
            let pool = &self.prompts.preservation;
            let prompts = (0..c.preservation_samples)
                .map(|_| pool[rng.random_range(0..pool.len())].clone())
                .collect();
            self.request(prompts, &mut rng)
        });
        if stop() {
            return Ok(None);
        }
        let Some(sampled) =
            self.sample_side_by_side(&requests, reference_request.as_ref(), stop)?
        else {
            return Ok(None);
        };
        let (mut batches, mut images) = (vec![], vec![]);
        let mut sampled = sampled.into_iter();
        for (trajectories, decoded) in sampled.by_ref().take(requests.len()) {
            images.push(decoded.expect("adapter batches are decoded"));
            batches.push(trajectories);
        }
        let reference = sampled.next().map(|(trajectories, _)| trajectories);
        let anchors = if c.anchor_weight > 0.0 {
            batches
                .iter()
                .map(|b| self.anchor_conditioning(&b.request.prompts))
                .collect::<candle_core::Result<_>>()?
        } else {
            vec![]
        };
        let seconds_sampling = started.elapsed().as_secs_f64();

        let reward_started = Instant::now();
        let rewards = self
            .reward
            .score(&Tensor::cat(&images, 0)?, &epoch_prompts)?;
        let seconds_reward = reward_started.elapsed().as_secs_f64();

        let mut metrics = EpochMetrics {
            epoch: self.epochs_done + 1,
            p_concept: Spread::of(&rewards.p_concept),
            reward_erase: Spread::of(&rewards.erase),
            reward_align: Spread::of(&rewards.align),
            reward_total: Spread::of(&rewards.total),
            reward_unnormalised: Some(Spread::of(&unnormalised_total(
                &rewards,
                &self.reward.weights,
            ))),
            loss: f64::NAN,
            clip_fraction: f64::NAN,
            approx_kl: f64::NAN,
            preservation_drift: None,
            anchor_distance: None,
            grad_norm: f64::NAN,
            updates: 0,
            skipped_updates: 0,
            skipped_losses: 0,
            skipped_reason: None,
            seconds_sampling,
            seconds_reward,
            seconds_training: 0.0,
            seconds: 0.0,
        };
        let training_started = Instant::now();
        match finite_rewards(&rewards) {
            Err(reason) => {
                eprintln!(
                    "epoch {}: {reason}; no update this epoch",
                    self.epochs_done + 1
                );
                metrics.skipped_reason = Some(reason);
            }
            Ok(()) => {
                let min_group = match c.baseline {
                    Baseline::Prompt => c.samples_per_prompt,
                    // No prompt has this many samples, so each uses the epoch's statistics.
                    Baseline::Batch => usize::MAX,
                };
                let adv = advantages(&epoch_prompts, &rewards.total, min_group, c.advantage_clip)?;
                let data = EpochData {
                    batches: &batches,
                    advantages: &adv,
                    reference: reference.as_ref(),
                    anchors: &anchors,
                };
                if !self.train_on(&data, &mut rng, &mut metrics, stop)? {
                    return Ok(None);
                }
            }
        }
        metrics.seconds_training = training_started.elapsed().as_secs_f64();
        metrics.seconds = started.elapsed().as_secs_f64();
        self.epochs_done += 1;
        Ok(Some(metrics))
    }

    /// The text conditioning of `prompts` with the concept words replaced by the substitutes in
    /// turn (or dropped), for the anchor term.
    fn anchor_conditioning(&self, prompts: &[String]) -> candle_core::Result<Tensor> {
        let anchored = anchor_prompts(
            prompts,
            &self.reward.concept_words,
            &self.prompts.anchor_substitutes,
        );
        Ok(Conditioning::encode(self.sd, &anchored, "", 1.0)?.cond)
    }

    /// A sampling request for `prompts` with the run's settings and a seed from `rng`.
    fn request(&self, prompts: Vec<String>, rng: &mut impl Rng) -> GenerateRequest {
        GenerateRequest {
            prompts,
            negative_prompt: self.sampling.negative_prompt.clone(),
            // Item i uses seed + i: training seeds stay below 2^32 + batch size, far from the
            // evaluation (2^40) and preview (2^41) seeds.
            seed: u64::from(rng.random::<u32>()),
            steps: self.sampling.steps,
            guidance_scale: self.sampling.guidance_scale,
            width: self.size,
            height: self.size,
            eta: self.sampling.eta,
        }
    }

    /// The epoch's prompts, each repeated `samples_per_prompt` times, adjacent: distinct
    /// prompts while the training set has enough, then drawn again.
    fn draw_prompts(&self, rng: &mut impl Rng) -> Vec<String> {
        let c = &self.config;
        let distinct = c.samples_per_epoch() / c.samples_per_prompt;
        let targets = &self.prompts.target;
        let mut order: Vec<usize> = Vec::with_capacity(distinct);
        while order.len() < distinct {
            let mut all: Vec<usize> = (0..targets.len()).collect();
            all.shuffle(rng);
            order.extend(all.into_iter().take(distinct - order.len()));
        }
        order
            .into_iter()
            .flat_map(|i| std::iter::repeat_n(targets[i].clone(), c.samples_per_prompt))
            .collect()
    }

    /// The PPO passes over an epoch's batches, each update with its preservation pass. Returns
    /// false if `stop` interrupted them; the weights and optimiser are then put back as they
    /// were before the epoch.
    fn train_on(
        &mut self,
        data: &EpochData,
        rng: &mut impl Rng,
        metrics: &mut EpochMetrics,
        stop: &(dyn Fn() -> bool + Sync),
    ) -> anyhow::Result<bool> {
        let c = self.config.clone();
        let batches = data.batches;
        let eligible = ((self.sampling.steps as f64 * c.early_steps).ceil() as usize)
            .clamp(1, self.sampling.steps);
        let trained_steps =
            ((eligible as f64 * c.timestep_fraction).ceil() as usize).clamp(1, eligible);
        let (mut losses, mut clip_fractions, mut kls, mut norms) = (vec![], vec![], vec![], vec![]);
        let (mut drifts, mut anchor_distances) = (vec![], vec![]);
        let snapshot = self.snapshot()?;
        for _ in 0..c.inner_epochs {
            let mut order: Vec<usize> = (0..eligible).collect();
            order.shuffle(rng);
            // Every (timestep, batch) pair is one backward pass.
            let passes: Vec<(usize, usize)> = order[..trained_steps]
                .iter()
                .flat_map(|&step| (0..batches.len()).map(move |b| (step, b)))
                .collect();
            let groups = c.updates_per_inner_epoch.min(passes.len());
            for group in split_evenly(&passes, groups) {
                let mut accumulated = GradStore::default();
                let mut taken = 0;
                for together in group.chunks(self.side_by_side()) {
                    if stop() {
                        self.restore(snapshot)?;
                        return Ok(false);
                    }
                    for (pass, outcome) in together.iter().zip(self.ppo_passes(data, together)) {
                        let PassOutcome {
                            value,
                            stats,
                            grads,
                        } = outcome?;
                        let Some(grads) = grads else {
                            eprintln!("PPO loss is {value} at step {}; pass skipped", pass.0);
                            metrics.skipped_losses += 1;
                            continue;
                        };
                        losses.push(value);
                        clip_fractions.push(stats.clip_fraction);
                        kls.push(stats.approx_kl);
                        self.accumulate(&mut accumulated, &grads)?;
                        taken += 1;
                    }
                }
                if taken == 0 {
                    metrics.skipped_updates += 1;
                    continue;
                }
                // The mean over the passes taken.
                self.scale(&mut accumulated, 1.0 / taken as f64)?;
                if !data.anchors.is_empty() {
                    let distance = self.anchor_pass(data, rng)?;
                    let term = WeightedTerm {
                        name: "anchor term",
                        weight: c.anchor_weight,
                    };
                    self.add_term(
                        &mut accumulated,
                        term,
                        distance,
                        &mut anchor_distances,
                        metrics,
                    )?;
                }
                if let Some(reference) = data.reference {
                    let drift = self.preservation_pass(reference, rng)?;
                    let term = WeightedTerm {
                        name: "preservation term",
                        weight: c.preservation_weight,
                    };
                    self.add_term(&mut accumulated, term, drift, &mut drifts, metrics)?;
                }
                match self.opt.step(&accumulated)? {
                    StepOutcome::Applied { grad_norm } => {
                        metrics.updates += 1;
                        norms.push(grad_norm);
                    }
                    StepOutcome::SkippedNonFinite => {
                        eprintln!("non-finite gradient; update skipped");
                        metrics.skipped_updates += 1;
                    }
                }
            }
        }
        let mean = |v: &[f64]| {
            if v.is_empty() {
                f64::NAN
            } else {
                mean_std(v).0
            }
        };
        metrics.loss = mean(&losses);
        metrics.clip_fraction = mean(&clip_fractions);
        metrics.approx_kl = mean(&kls);
        metrics.preservation_drift = (!drifts.is_empty()).then(|| mean(&drifts));
        metrics.anchor_distance = (!anchor_distances.is_empty()).then(|| mean(&anchor_distances));
        metrics.grad_norm = mean(&norms);
        Ok(true)
    }

    /// The epoch's batches through the adapter (with their decoded images) and the reference
    /// batch through the original model, [`Self::side_by_side`] at a time, in that order;
    /// `None` if `stop` interrupted them. Each batch's sampling depends only on its request.
    fn sample_side_by_side(
        &self,
        requests: &[GenerateRequest],
        reference: Option<&GenerateRequest>,
        stop: &(dyn Fn() -> bool + Sync),
    ) -> anyhow::Result<Option<Vec<SampledBatch>>> {
        let (sd, adapter) = (self.sd, &self.adapter);
        let jobs: Vec<(Option<&ErasureAdapter>, &GenerateRequest)> = requests
            .iter()
            .map(|r| (Some(adapter), r))
            .chain(reference.map(|r| (None, r)))
            .collect();
        let mut all = Vec::with_capacity(jobs.len());
        for together in jobs.chunks(self.side_by_side()) {
            let sampled: Vec<anyhow::Result<Option<SampledBatch>>> = together
                .par_iter()
                .map(|&(adapter, request)| {
                    let Some(trajectories) = rollout::sample_until(sd, adapter, request, stop)?
                    else {
                        return Ok(None);
                    };
                    let images = adapter
                        .is_some()
                        .then(|| decode_images(sd, trajectories.final_latents()))
                        .transpose()?;
                    Ok(Some((trajectories, images)))
                })
                .collect();
            for batch in sampled {
                match batch? {
                    Some(batch) => all.push(batch),
                    None => return Ok(None),
                }
            }
        }
        Ok(Some(all))
    }

    /// How many batches or passes run at once. A small model at a small size is a chain of
    /// ops too small to keep every core busy, so whole batches and passes run side by side,
    /// one per thread up to [`MAX_SIDE_BY_SIDE`] (each holds its own graph in memory); a
    /// model large enough to fill the cores (and whose graphs take gigabytes) runs one at a
    /// time.
    fn side_by_side(&self) -> usize {
        if self.size <= SIDE_BY_SIDE_MAX_PIXELS {
            rayon::current_num_threads().clamp(1, MAX_SIDE_BY_SIDE)
        } else {
            1
        }
    }

    /// The PPO passes `(step, batch)`, all at once on the pool's threads (the caller hands
    /// [`Self::side_by_side`] of them). Each pass's arithmetic does not depend on which thread
    /// runs it, and the caller adds the gradients in pass order, so the result is the same as
    /// one pass after another.
    fn ppo_passes(
        &self,
        data: &EpochData,
        passes: &[(usize, usize)],
    ) -> Vec<candle_core::Result<PassOutcome>> {
        let (sd, adapter) = (self.sd, &self.adapter);
        let (batch_size, clip_range) = (self.config.batch_size, self.config.clip_range);
        passes
            .par_iter()
            .map(|&(step, b)| {
                let traj = &data.batches[b];
                let n = traj.request.prompts.len();
                let items = Tensor::arange(0u32, n as u32, &sd.device)?;
                let offset = b * batch_size;
                let batch_adv = Tensor::new(&data.advantages[offset..offset + n], &sd.device)?;
                let new = rollout::step_log_prob(sd, adapter, traj, step, &items)?;
                let (loss, stats) =
                    clipped_loss(&new, &traj.log_probs[step], &batch_adv, clip_range)?;
                let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
                let grads = value.is_finite().then(|| loss.backward()).transpose()?;
                Ok(PassOutcome {
                    value,
                    stats,
                    grads,
                })
            })
            .collect()
    }

    /// The preservation term at one random step of the reference trajectories, with gradients
    /// to the adapter.
    fn preservation_pass(
        &self,
        reference: &Trajectories,
        rng: &mut impl Rng,
    ) -> candle_core::Result<Tensor> {
        let step = rng.random_range(0..reference.steps());
        let n = reference.request.prompts.len() as u32;
        let items = Tensor::arange(0u32, n, &self.sd.device)?;
        rollout::step_output_drift(self.sd, &self.adapter, reference, step, &items)?.mean(0)
    }

    /// Records an auxiliary term's value in `log` and adds its weighted gradient to
    /// `accumulated`; a non-finite value is left out of the update and counted as skipped.
    fn add_term(
        &self,
        accumulated: &mut GradStore,
        term: WeightedTerm,
        value: Tensor,
        log: &mut Vec<f64>,
        metrics: &mut EpochMetrics,
    ) -> anyhow::Result<()> {
        let scalar = value.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        log.push(scalar);
        if scalar.is_finite() {
            self.accumulate(accumulated, &(value * term.weight)?.backward()?)?;
        } else {
            eprintln!("{} is {scalar}; left out of this update", term.name);
            metrics.skipped_losses += 1;
        }
        Ok(())
    }

    /// The anchor term over every batch of the epoch, each at a random step, with gradients to
    /// the adapter.
    fn anchor_pass(&self, data: &EpochData, rng: &mut impl Rng) -> candle_core::Result<Tensor> {
        let mut distances = Vec::with_capacity(data.batches.len());
        for (traj, anchor) in data.batches.iter().zip(data.anchors) {
            let step = rng.random_range(0..traj.steps());
            let n = traj.request.prompts.len() as u32;
            let items = Tensor::arange(0u32, n, &self.sd.device)?;
            distances.push(rollout::step_anchor_distance(
                self.sd,
                &self.adapter,
                traj,
                step,
                &items,
                anchor,
                self.config.anchor_guidance,
            )?);
        }
        Tensor::cat(&distances, 0)?.mean(0)
    }

    /// A copy of the weights and optimiser state, to undo a partly trained epoch.
    fn snapshot(&self) -> candle_core::Result<Snapshot> {
        Ok(Snapshot {
            weights: self
                .opt
                .params()
                .map(|(_, var)| var.as_tensor().copy())
                .collect::<candle_core::Result<_>>()?,
            state: self.opt.state(),
            steps: self.opt.steps(),
        })
    }

    fn restore(&mut self, snapshot: Snapshot) -> candle_core::Result<()> {
        for ((_, var), saved) in self.opt.params().zip(&snapshot.weights) {
            var.set(saved)?;
        }
        self.opt.restore(&snapshot.state, snapshot.steps)
    }

    fn scale(&self, grads: &mut GradStore, factor: f64) -> candle_core::Result<()> {
        for (_, var) in self.opt.params() {
            if let Some(g) = grads.remove(var.as_tensor()) {
                grads.insert(var.as_tensor(), (g * factor)?);
            }
        }
        Ok(())
    }

    /// Adds the adapter variables' gradients in `grads` to `into` (other tensors' gradients,
    /// which a backward pass also returns, are dropped).
    fn accumulate(&self, into: &mut GradStore, grads: &GradStore) -> candle_core::Result<()> {
        for (_, var) in self.opt.params() {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            let sum = match into.get(var.as_tensor()) {
                Some(prev) => (prev + g)?,
                None => g.detach(),
            };
            into.insert(var.as_tensor(), sum);
        }
        Ok(())
    }
}

/// What an epoch trains on once its samples are scored.
struct EpochData<'e> {
    batches: &'e [Trajectories],
    /// One per sample, in batch order.
    advantages: &'e [f64],
    /// The original model's trajectories on preservation prompts, when that term is on.
    reference: Option<&'e Trajectories>,
    /// Per batch, the text conditioning of its prompts without the concept words; empty
    /// without the anchor term.
    anchors: &'e [Tensor],
}

/// Image side (pixels) up to which batches and passes run side by side.
const SIDE_BY_SIDE_MAX_PIXELS: usize = 128;
/// At most this many batches or passes at once (each keeps its own graph alive).
const MAX_SIDE_BY_SIDE: usize = 4;

/// A sampled batch, with its decoded images when it went through the adapter.
type SampledBatch = (Trajectories, Option<Tensor>);

/// One PPO pass: the loss, its statistics, and its gradients unless the loss is not finite.
struct PassOutcome {
    value: f64,
    stats: super::ppo::PpoStats,
    grads: Option<GradStore>,
}

/// An auxiliary loss added to every update, by the name the log gives it.
struct WeightedTerm {
    name: &'static str,
    weight: f64,
}

struct Snapshot {
    weights: Vec<Tensor>,
    state: std::collections::HashMap<String, crate::train::adamw::SlotState>,
    steps: u64,
}

fn finite_rewards(r: &RewardComponents) -> Result<(), String> {
    for (name, values) in [
        ("P(concept)", &r.p_concept),
        ("erase reward", &r.erase),
        ("alignment reward", &r.align),
        ("total reward", &r.total),
    ] {
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return Err(format!("{name} of sample {i} is {}", values[i]));
        }
    }
    Ok(())
}

/// `items` in `groups` consecutive runs whose lengths differ by at most one.
fn split_evenly<T>(items: &[T], groups: usize) -> Vec<&[T]> {
    let mut out = Vec::with_capacity(groups);
    let mut start = 0;
    for g in 0..groups {
        let end = (items.len() * (g + 1)) / groups;
        out.push(&items[start..end]);
        start = end;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_of_an_epoch_without_updates_read_back() {
        let spread = Spread {
            mean: 0.5,
            std: 0.1,
        };
        let m = EpochMetrics {
            epoch: 3,
            p_concept: spread,
            reward_erase: spread,
            reward_align: spread,
            reward_total: spread,
            reward_unnormalised: None,
            loss: f64::NAN,
            clip_fraction: f64::NAN,
            approx_kl: f64::NAN,
            preservation_drift: None,
            anchor_distance: None,
            grad_norm: f64::NAN,
            updates: 0,
            skipped_updates: 0,
            skipped_losses: 0,
            skipped_reason: Some("total reward of sample 2 is NaN".into()),
            seconds_sampling: 1.0,
            seconds_reward: 0.5,
            seconds_training: 0.0,
            seconds: 1.5,
        };
        let line = serde_json::to_string(&m).unwrap();
        assert!(line.contains("\"loss\":null"), "{line}");
        let back: EpochMetrics = serde_json::from_str(&line).unwrap();
        assert!(back.loss.is_nan() && back.approx_kl.is_nan() && back.grad_norm.is_nan());
        assert_eq!((back.epoch, back.skipped_reason), (3, m.skipped_reason));
    }

    #[test]
    fn passes_split_into_groups_of_nearly_equal_length() {
        let items: Vec<usize> = (0..10).collect();
        let lens: Vec<usize> = split_evenly(&items, 3).iter().map(|g| g.len()).collect();
        assert_eq!(lens, [3, 3, 4]);
        assert_eq!(split_evenly(&items, 1)[0], &items[..]);
        assert_eq!(split_evenly(&items, 3).concat(), items);
    }
}
