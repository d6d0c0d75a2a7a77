//! The PPO passes over an epoch's samples and the updates they make.

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor};
use rand::Rng;
use rand::seq::SliceRandom;
use rayon::prelude::*;

use super::terms::WeightedTerm;
use super::{EpochData, ErasureTrainer};
use crate::erasure::metrics::EpochMetrics;
use crate::erasure::ppo::{PpoStats, clipped_loss};
use crate::erasure::rollout;
use crate::stats::mean_std;
use crate::train::StepOutcome;

impl ErasureTrainer<'_> {
    /// The PPO passes over an epoch's batches, each update with its preservation pass. Returns
    /// false if `stop` interrupted them; the weights and optimiser are then put back as they
    /// were before the epoch.
    pub(super) fn train_on(
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
                            self.notices.push(format!(
                                "PPO loss is {value} at step {}; pass skipped",
                                pass.0
                            ));
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
                        self.notices
                            .push("non-finite gradient; update skipped".into());
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

    /// The PPO passes `(step, batch)`, all at once on the pool's threads (the caller hands
    /// [`Self::side_by_side`] of them). Each pass's arithmetic does not depend on which thread
    /// runs it, and the caller adds the gradients in pass order, so the result is the same as
    /// one pass after another.
    pub(super) fn ppo_passes(
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
}

/// One PPO pass: the loss, its statistics, and its gradients unless the loss is not finite.
pub(super) struct PassOutcome {
    value: f64,
    stats: PpoStats,
    grads: Option<GradStore>,
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
    fn passes_split_into_groups_of_nearly_equal_length() {
        let items: Vec<usize> = (0..10).collect();
        let lens: Vec<usize> = split_evenly(&items, 3).iter().map(|g| g.len()).collect();
        assert_eq!(lens, [3, 3, 4]);
        assert_eq!(split_evenly(&items, 1)[0], &items[..]);
        assert_eq!(split_evenly(&items, 3).concat(), items);
    }
}
