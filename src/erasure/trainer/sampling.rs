//! Sampling an epoch: its prompts, their requests and trajectories.

use candle_core::Tensor;
use rand::Rng;
use rand::seq::SliceRandom;
use rayon::prelude::*;

use super::ErasureTrainer;
use crate::adapter::ErasureAdapter;
use crate::engine::diffusion::pipeline::{GenerateRequest, decode_images};
use crate::erasure::rollout::{self, Trajectories};
use crate::erasure::seeds;

impl ErasureTrainer<'_> {
    /// A sampling request for `prompts` with the run's settings and a seed from `rng`.
    pub(super) fn request(&self, prompts: Vec<String>, rng: &mut impl Rng) -> GenerateRequest {
        self.sampling
            .request(prompts, self.size, self.sampling.steps)
            .seed(seeds::training(rng))
            .eta(self.sampling.eta)
    }

    /// The epoch's prompts, each repeated `samples_per_prompt` times, adjacent: distinct
    /// prompts while the training set has enough, then drawn again.
    pub(super) fn draw_prompts(&self, rng: &mut impl Rng) -> Vec<String> {
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

    /// The epoch's batches through the adapter (with their decoded images) and the reference
    /// batch through the original model, [`Self::side_by_side`] at a time, in that order;
    /// `None` if `stop` interrupted them. Each batch's sampling depends only on its request.
    pub(super) fn sample_side_by_side(
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
    pub(super) fn side_by_side(&self) -> usize {
        if self.size <= SIDE_BY_SIDE_MAX_PIXELS {
            rayon::current_num_threads().clamp(1, MAX_SIDE_BY_SIDE)
        } else {
            1
        }
    }
}

/// Image side (pixels) up to which batches and passes run side by side.
pub(super) const SIDE_BY_SIDE_MAX_PIXELS: usize = 128;
/// At most this many batches or passes at once (each keeps its own graph alive).
pub(super) const MAX_SIDE_BY_SIDE: usize = 4;

/// A sampled batch, with its decoded images when it went through the adapter.
pub(super) type SampledBatch = (Trajectories, Option<Tensor>);
