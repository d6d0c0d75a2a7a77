//! The DDPO epoch: sample stochastic trajectories through the adapter, score the final images
//! with the concept-erasing reward, normalise rewards into advantages (per prompt or over the
//! epoch), then take PPO steps on a random subset of each trajectory's early denoising steps.
//!
//! Everything random in epoch `e` is drawn from `(seed, e)`, so a run resumed from the
//! checkpoint after epoch `e` continues exactly as the uninterrupted run would (for the same
//! thread count, which decides how sums are split).

mod grads;
mod sampling;
mod terms;
mod update;

use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Tensor};
use rand::Rng;

use super::config::{Baseline, DdpoConfig, SamplingSpec, require};
use super::metrics::{EpochMetrics, Spread, finite_rewards, unnormalised_total};
use super::ppo::advantages;
use super::rollout::Trajectories;
use crate::adapter::{AdapterConfig, ErasureAdapter};
use crate::engine::StableDiffusion;
use crate::engine::diffusion::pipeline::GenerateRequest;
use crate::reward::cer::ErasureReward;
use crate::train::run::{sorted_params, step_rng};
use crate::train::{AdamW, AdamWConfig, checkpoint};

pub use terms::anchor_prompts;

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
    /// What the epochs in progress had to leave out (a pass, an update, a term), in words,
    /// until the caller takes them.
    notices: Vec<String>,
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
        require(
            config.preservation_weight == 0.0 || !prompts.preservation.is_empty(),
            "ddpo.preservation_weight",
            "is above 0 but there are no neighbour or neutral prompts to train on; add some, or \
             set it to 0",
        )?;
        require(
            config.anchor_weight == 0.0 || !reward.concept_words.is_empty(),
            "ddpo.anchor_weight",
            "is above 0 but `prompts.filter_words` is empty, so the anchor prompt would be the \
             target prompt itself; name the concept's words, or set it to 0",
        )?;
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
            notices: Vec::new(),
        })
    }

    pub fn adapter(&self) -> &ErasureAdapter {
        &self.adapter
    }

    pub fn epochs_done(&self) -> usize {
        self.epochs_done
    }

    /// What the epochs run since the last call had to leave out, in words, oldest first.
    pub fn take_notices(&mut self) -> Vec<String> {
        std::mem::take(&mut self.notices)
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
                // Reported with the epoch's metrics (`skipped_reason`).
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
