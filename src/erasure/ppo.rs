//! DDPO's policy-gradient pieces: per-prompt advantage normalisation and the clipped PPO loss.

use std::collections::HashMap;

use candle_core::{DType, Result, Tensor};

use crate::stats::mean_std;

/// Rewards normalised per prompt, `(r − mean) / (std + 1e-8)`, over the samples that share the
/// prompt, so easy and hard prompts weigh alike; prompts with fewer than `min_count` samples use
/// the whole batch's mean and std. Clamped to ±`clip`.
pub fn advantages(
    prompts: &[String],
    rewards: &[f64],
    min_count: usize,
    clip: f64,
) -> anyhow::Result<Vec<f64>> {
    if prompts.len() != rewards.len() {
        anyhow::bail!("{} prompts but {} rewards", prompts.len(), rewards.len());
    }
    if let Some(i) = rewards.iter().position(|r| !r.is_finite()) {
        anyhow::bail!("reward {i} (prompt \"{}\") is {}", prompts[i], rewards[i]);
    }
    let batch = mean_std(rewards);
    let mut groups: HashMap<&str, Vec<f64>> = HashMap::new();
    for (p, &r) in prompts.iter().zip(rewards) {
        groups.entry(p.as_str()).or_default().push(r);
    }
    let per_prompt: HashMap<&str, (f64, f64)> = groups
        .iter()
        .map(|(p, rs)| {
            (
                *p,
                if rs.len() >= min_count {
                    mean_std(rs)
                } else {
                    batch
                },
            )
        })
        .collect();
    Ok(prompts
        .iter()
        .zip(rewards)
        .map(|(p, r)| {
            let (mean, std) = per_prompt[p.as_str()];
            ((r - mean) / (std + 1e-8)).clamp(-clip, clip)
        })
        .collect())
}

/// What one PPO loss evaluation saw.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PpoStats {
    /// Share of items whose ratio left [1 − ε, 1 + ε].
    pub clip_fraction: f64,
    /// ½·mean((log p_new − log p_old)²), DDPO's estimate of the policy's KL drift.
    pub approx_kl: f64,
}

/// `mean(max(−A·ρ, −A·clip(ρ, 1 − ε, 1 + ε)))` with `ρ = exp(log p_new − log p_old)`; all
/// inputs [B]; gradients flow through `new_log_prob` only.
pub fn clipped_loss(
    new_log_prob: &Tensor,
    old_log_prob: &Tensor,
    advantages: &Tensor,
    clip_range: f64,
) -> Result<(Tensor, PpoStats)> {
    let log_ratio = (new_log_prob - old_log_prob.detach())?;
    let ratio = log_ratio.exp()?;
    let advantages = advantages.detach().to_dtype(ratio.dtype())?;
    let unclipped = (advantages.neg()? * &ratio)?;
    let clipped = (advantages.neg()? * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)?)?;
    let loss = unclipped.maximum(&clipped)?.mean_all()?;
    let log_ratio = log_ratio.detach().to_dtype(DType::F64)?;
    let outside = ((log_ratio.exp()? - 1.0)?.abs()?.gt(clip_range)?).to_dtype(DType::F64)?;
    let stats = PpoStats {
        clip_fraction: outside.mean_all()?.to_scalar()?,
        approx_kl: (log_ratio.sqr()?.mean_all()? * 0.5)?.to_scalar()?,
    };
    Ok((loss, stats))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn advantages_normalise_per_prompt_and_fall_back_to_the_batch() {
        let prompts = strings(&["a", "a", "b", "b", "c"]);
        let rewards = [1.0, 3.0, 10.0, 14.0, 5.0];
        let adv = advantages(&prompts, &rewards, 2, 5.0).unwrap();
        // "a": mean 2, std 1; "b": mean 12, std 2; "c" alone: batch mean 6.6, std √22.64.
        let expected = [-1.0, 1.0, -1.0, 1.0, (5.0 - 6.6) / 22.64f64.sqrt()];
        for (got, want) in adv.iter().zip(expected) {
            assert!((got - want).abs() < 1e-6, "{adv:?}");
        }
        let clamped = advantages(&prompts, &rewards, 2, 0.5).unwrap();
        assert_eq!(clamped[..4], [-0.5, 0.5, -0.5, 0.5]);
        let err = advantages(&prompts, &[1.0, f64::NAN, 0.0, 0.0, 0.0], 2, 5.0).unwrap_err();
        assert!(err.to_string().contains("reward 1"), "{err}");
    }

    fn loss_of(new: &[f64], old: &[f64], adv: &[f64], eps: f64) -> (Tensor, PpoStats, Var) {
        let dev = Device::Cpu;
        let new = Var::new(new, &dev).unwrap();
        let old = Tensor::new(old, &dev).unwrap();
        let adv = Tensor::new(adv, &dev).unwrap();
        let (loss, stats) = clipped_loss(new.as_tensor(), &old, &adv, eps).unwrap();
        (loss, stats, new)
    }

    #[test]
    fn clipped_loss_matches_the_ppo_formula_and_its_gradient() {
        let old = [0.0, 0.0, 0.0, 0.0, 0.0, 0.0];
        // Ratios inside and outside [1 − ε, 1 + ε], advantages of both signs.
        let new = [0.02, 0.3, -0.3, 0.3, -0.3, -0.01];
        let adv = [1.5, 2.0, 2.0, -1.0, -1.0, -0.5];
        let eps = 0.1;
        let (loss, stats, var) = loss_of(&new, &old, &adv, eps);
        let per_item = |n: f64, o: f64, a: f64| {
            let rho = (n - o).exp();
            (-a * rho).max(-a * rho.clamp(1.0 - eps, 1.0 + eps))
        };
        let expected: f64 = (0..6)
            .map(|i| per_item(new[i], old[i], adv[i]))
            .sum::<f64>()
            / 6.0;
        let got = loss.to_scalar::<f64>().unwrap();
        assert!((got - expected).abs() < 1e-12, "{got} vs {expected}");
        assert!((stats.clip_fraction - 4.0 / 6.0).abs() < 1e-12);
        let kl = new.iter().map(|n| n * n).sum::<f64>() / 6.0 * 0.5;
        assert!((stats.approx_kl - kl).abs() < 1e-12);

        // Gradient against central differences (no item sits on a kink).
        let grads = loss.backward().unwrap();
        let g = grads
            .get(var.as_tensor())
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        for i in 0..6 {
            let h = 1e-6;
            let at = |d: f64| {
                let mut v = new;
                v[i] += d;
                loss_of(&v, &old, &adv, eps).0.to_scalar::<f64>().unwrap()
            };
            let fd = (at(h) - at(-h)) / (2.0 * h);
            assert!((g[i] - fd).abs() < 1e-8, "item {i}: {} vs {fd}", g[i]);
        }
        // Clipped items whose clipped branch wins get no gradient: ratio e^0.3 with A > 0,
        // e^−0.3 with A < 0.
        assert_eq!(g[1], 0.0);
        assert_eq!(g[4], 0.0);
        assert!(g[0] != 0.0 && g[2] != 0.0 && g[3] != 0.0 && g[5] != 0.0);
    }
}
