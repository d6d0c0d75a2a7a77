//! The auxiliary terms added to every update: the anchor term (ESD-like: the prediction on a
//! target trajectory pulled towards the original model's without the concept) and the
//! preservation term (the adapter held to the original model on other prompts).

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor};
use rand::Rng;

use super::{EpochData, ErasureTrainer};
use crate::engine::diffusion::pipeline::Conditioning;
use crate::erasure::metrics::EpochMetrics;
use crate::erasure::rollout::{self, Trajectories};
use crate::reward::cer::{filter_words, replace_words};

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

impl ErasureTrainer<'_> {
    /// The text conditioning of `prompts` with the concept words replaced by the substitutes in
    /// turn (or dropped), for the anchor term.
    pub(super) fn anchor_conditioning(&self, prompts: &[String]) -> candle_core::Result<Tensor> {
        let anchored = anchor_prompts(
            prompts,
            &self.reward.concept_words,
            &self.prompts.anchor_substitutes,
        );
        Ok(Conditioning::encode(self.sd, &anchored, "", 1.0)?.cond)
    }

    /// The preservation term at one random step of the reference trajectories, with gradients
    /// to the adapter.
    pub(super) fn preservation_pass(
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
    pub(super) fn add_term(
        &mut self,
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
            self.notices.push(format!(
                "{} is {scalar}; left out of this update",
                term.name
            ));
            metrics.skipped_losses += 1;
        }
        Ok(())
    }

    /// The anchor term over every batch of the epoch, each at a random step, with gradients to
    /// the adapter.
    pub(super) fn anchor_pass(
        &self,
        data: &EpochData,
        rng: &mut impl Rng,
    ) -> candle_core::Result<Tensor> {
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
}

/// An auxiliary loss added to every update, by the name the log gives it.
pub(super) struct WeightedTerm {
    pub(super) name: &'static str,
    pub(super) weight: f64,
}
