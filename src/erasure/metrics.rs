//! What an epoch reports: one line of `metrics.jsonl`.

use serde::{Deserialize, Serialize};

use crate::reward::cer::{CerWeights, RewardComponents};
use crate::stats::mean_std;

/// λ1·r_erase + λ2·r_align per image, before standardisation.
pub(crate) fn unnormalised_total(rewards: &RewardComponents, weights: &CerWeights) -> Vec<f64> {
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
    pub(crate) fn of(values: &[f64]) -> Self {
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

/// The first non-finite reward of an epoch, named, if there is one.
pub(crate) fn finite_rewards(r: &RewardComponents) -> Result<(), String> {
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
}
