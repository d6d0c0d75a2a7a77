//! DDIM scheduler (diffusers' `DDIMScheduler`), with the exact log-density of stochastic steps.
//!
//! A step x_t → x_{t−1} with η > 0 draws from N(mean, σ²·I); `DdimStep::log_prob` is the log
//! density of the drawn sample under that Gaussian, which DDPO uses as the policy's log-likelihood.

use std::path::Path;

use anyhow::{Context, bail};
use candle_core::{Result, Tensor};
use serde::Deserialize;

use crate::engine::io::config::{read_json, require_default};

/// `scheduler/scheduler_config.json`, read as `DDIMScheduler.from_config` would: keys of other
/// schedulers are ignored, missing keys take DDIM's defaults.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default)]
pub struct SchedulerConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub trained_betas: Option<Vec<f64>>,
    pub clip_sample: bool,
    pub clip_sample_range: f64,
    pub set_alpha_to_one: bool,
    pub steps_offset: usize,
    pub prediction_type: PredictionType,
    pub thresholding: bool,
    pub timestep_spacing: TimestepSpacing,
    pub rescale_betas_zero_snr: bool,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: BetaSchedule::Linear,
            trained_betas: None,
            clip_sample: true,
            clip_sample_range: 1.0,
            set_alpha_to_one: true,
            steps_offset: 0,
            prediction_type: PredictionType::Epsilon,
            thresholding: false,
            timestep_spacing: TimestepSpacing::Leading,
            rescale_betas_zero_snr: false,
        }
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum BetaSchedule {
    Linear,
    ScaledLinear,
    #[serde(rename = "squaredcos_cap_v2")]
    SquaredcosCapV2,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum PredictionType {
    Epsilon,
    VPrediction,
    Sample,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
#[serde(rename_all = "snake_case")]
pub enum TimestepSpacing {
    Leading,
    Trailing,
    Linspace,
}

impl SchedulerConfig {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let cfg: Self = read_json(path)?;
        cfg.validate()
            .with_context(|| format!("{}: unsupported scheduler config", path.display()))?;
        Ok(cfg)
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        require_default("thresholding", &self.thresholding, &false)?;
        if self.num_train_timesteps < 2 {
            bail!("`num_train_timesteps` must be at least 2");
        }
        if let Some(b) = &self.trained_betas {
            if b.len() != self.num_train_timesteps {
                bail!(
                    "`trained_betas` has {} values for {} training timesteps",
                    b.len(),
                    self.num_train_timesteps
                );
            }
        }
        Ok(())
    }

    /// The config as diffusers' `StableDiffusionPipeline` runs it: its constructor rewrites
    /// legacy configs to `steps_offset = 1` and `clip_sample = false`, and every SD checkpoint
    /// was tuned with those values.
    pub fn for_sd_pipeline(&self) -> Self {
        Self {
            steps_offset: 1,
            clip_sample: false,
            ..self.clone()
        }
    }

    /// Cumulative products ᾱ_t of (1 − β_t) for every training timestep.
    pub fn alphas_cumprod(&self) -> Vec<f64> {
        let t = self.num_train_timesteps;
        let lin = |a: f64, b: f64| -> Vec<f64> {
            (0..t)
                .map(|i| a + (b - a) * i as f64 / (t - 1) as f64)
                .collect()
        };
        let mut betas: Vec<f64> = match (&self.trained_betas, self.beta_schedule) {
            (Some(b), _) => b.clone(),
            (None, BetaSchedule::Linear) => lin(self.beta_start, self.beta_end),
            (None, BetaSchedule::ScaledLinear) => lin(self.beta_start.sqrt(), self.beta_end.sqrt())
                .into_iter()
                .map(|b| b * b)
                .collect(),
            (None, BetaSchedule::SquaredcosCapV2) => {
                let alpha_bar = |x: f64| {
                    ((x + 0.008) / 1.008 * std::f64::consts::FRAC_PI_2)
                        .cos()
                        .powi(2)
                };
                (0..t)
                    .map(|i| {
                        let (t1, t2) = (i as f64 / t as f64, (i + 1) as f64 / t as f64);
                        (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999)
                    })
                    .collect()
            }
        };
        if self.rescale_betas_zero_snr {
            betas = rescale_zero_terminal_snr(&betas);
        }
        betas
            .iter()
            .scan(1.0, |acc, b| {
                *acc *= 1.0 - b;
                Some(*acc)
            })
            .collect()
    }
}

/// Shifts the schedule so the last timestep has zero signal (Lin et al. 2023).
fn rescale_zero_terminal_snr(betas: &[f64]) -> Vec<f64> {
    let mut acc = 1.0;
    let sqrt_bar: Vec<f64> = betas
        .iter()
        .map(|b| {
            acc *= 1.0 - b;
            acc.sqrt()
        })
        .collect();
    let (first, last) = (sqrt_bar[0], *sqrt_bar.last().expect("non-empty"));
    let bar: Vec<f64> = sqrt_bar
        .iter()
        .map(|s| ((s - last) * first / (first - last)).powi(2))
        .collect();
    std::iter::once(1.0 - bar[0])
        .chain(bar.windows(2).map(|w| 1.0 - w[1] / w[0]))
        .collect()
}

/// The Gaussian a DDIM step draws x_{t−1} from.
pub struct Transition {
    pub mean: Tensor,
    /// σ (0 for a deterministic step).
    pub std: f64,
    /// Predicted x_0.
    pub pred_original: Tensor,
}

impl Transition {
    /// Log density [B] of `x` under N(mean, σ²·I), summed over all but the batch dimension.
    /// `None` when σ = 0 (a deterministic step has no density).
    pub fn log_prob(&self, x: &Tensor) -> Result<Option<Tensor>> {
        gaussian_log_prob(x, &self.mean, self.std)
    }
}

/// The result of one DDIM step.
pub struct DdimStep {
    /// x_{t−1}: the mean plus σ·noise (the mean itself when σ = 0).
    pub prev_sample: Tensor,
    /// The Gaussian it was drawn from.
    pub transition: Transition,
}

/// Log density [B] of `x` under N(mean, std²·I), summed over all dimensions after the first.
pub fn gaussian_log_prob(x: &Tensor, mean: &Tensor, std: f64) -> Result<Option<Tensor>> {
    if std <= 0.0 {
        return Ok(None);
    }
    let b = x.dim(0)?;
    let n = x.elem_count() / b;
    let sq = (x - mean)?.sqr()?.reshape((b, n))?.sum(1)?;
    let constant = n as f64 * (std.ln() + 0.5 * (2.0 * std::f64::consts::PI).ln());
    Ok(Some(((sq / (-2.0 * std * std))? - constant)?))
}

pub struct Ddim {
    config: SchedulerConfig,
    alphas_cumprod: Vec<f64>,
    final_alpha_cumprod: f64,
    timesteps: Vec<usize>,
    step_ratio: usize,
}

impl Ddim {
    /// A scheduler set up for `steps` inference steps.
    pub fn new(config: &SchedulerConfig, steps: usize) -> anyhow::Result<Self> {
        config.validate()?;
        let t = config.num_train_timesteps;
        if steps == 0 || steps > t {
            bail!("inference steps must be between 1 and {t}, got {steps}");
        }
        let alphas_cumprod = config.alphas_cumprod();
        let final_alpha_cumprod = if config.set_alpha_to_one {
            1.0
        } else {
            alphas_cumprod[0]
        };
        let timesteps = timesteps(config, steps)?;
        Ok(Self {
            config: config.clone(),
            alphas_cumprod,
            final_alpha_cumprod,
            timesteps,
            step_ratio: t / steps,
        })
    }

    /// Timesteps to visit, from noisiest to cleanest.
    pub fn timesteps(&self) -> &[usize] {
        &self.timesteps
    }

    pub fn config(&self) -> &SchedulerConfig {
        &self.config
    }

    pub fn alpha_cumprod(&self, t: usize) -> f64 {
        self.alphas_cumprod[t]
    }

    /// Standard deviation of the initial noise.
    pub fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn prev_alpha(&self, t: usize) -> f64 {
        match t.checked_sub(self.step_ratio) {
            Some(prev) => self.alphas_cumprod[prev],
            None => self.final_alpha_cumprod,
        }
    }

    /// Noise at training timestep `t`: √ᾱ_t·x_0 + √(1−ᾱ_t)·ε.
    pub fn add_noise(&self, original: &Tensor, noise: &Tensor, t: usize) -> Result<Tensor> {
        let a = self.alphas_cumprod[t];
        (original * a.sqrt())? + (noise * (1.0 - a).sqrt())?
    }

    /// The Gaussian of one step from `sample` (x_t) given the model output at `t`: its mean,
    /// σ = η·√variance and the predicted x_0. A policy-gradient trainer scores stored x_{t−1}
    /// under it.
    pub fn transition(
        &self,
        model_output: &Tensor,
        t: usize,
        sample: &Tensor,
        eta: f64,
    ) -> Result<Transition> {
        let alpha_t = self.alphas_cumprod[t];
        let alpha_prev = self.prev_alpha(t);
        let beta_t = 1.0 - alpha_t;
        let (pred_original, pred_epsilon) = match self.config.prediction_type {
            PredictionType::Epsilon => (
                ((sample - (model_output * beta_t.sqrt())?)? / alpha_t.sqrt())?,
                model_output.clone(),
            ),
            PredictionType::Sample => (
                model_output.clone(),
                ((sample - (model_output * alpha_t.sqrt())?)? / beta_t.sqrt())?,
            ),
            PredictionType::VPrediction => (
                ((sample * alpha_t.sqrt())? - (model_output * beta_t.sqrt())?)?,
                ((model_output * alpha_t.sqrt())? + (sample * beta_t.sqrt())?)?,
            ),
        };
        let pred_original = if self.config.clip_sample {
            let r = self.config.clip_sample_range;
            pred_original.clamp(-r, r)?
        } else {
            pred_original
        };
        let variance = (1.0 - alpha_prev) / beta_t * (1.0 - alpha_t / alpha_prev);
        let std = eta * variance.max(0.0).sqrt();
        let direction = (pred_epsilon * (1.0 - alpha_prev - std * std).max(0.0).sqrt())?;
        let mean = ((&pred_original * alpha_prev.sqrt())? + direction)?;
        Ok(Transition {
            mean,
            std,
            pred_original,
        })
    }

    /// One step from `sample` (x_t) given the model output at `t`. With `eta > 0`,
    /// `noise` (standard normal, the sample's shape) is required and scaled by σ.
    pub fn step(
        &self,
        model_output: &Tensor,
        t: usize,
        sample: &Tensor,
        eta: f64,
        noise: Option<&Tensor>,
    ) -> Result<DdimStep> {
        let transition = self.transition(model_output, t, sample, eta)?;
        let (mean, std) = (&transition.mean, transition.std);
        let prev_sample = match (std > 0.0, noise) {
            (false, _) => mean.clone(),
            (true, Some(noise)) => (mean + (noise.to_dtype(mean.dtype())? * std)?)?,
            (true, None) => candle_core::bail!("a stochastic DDIM step (eta > 0) needs noise"),
        };
        Ok(DdimStep {
            prev_sample,
            transition,
        })
    }
}

/// diffusers' `set_timesteps`, including numpy's rounding (half to even) and `arange` length.
fn timesteps(cfg: &SchedulerConfig, steps: usize) -> anyhow::Result<Vec<usize>> {
    let t = cfg.num_train_timesteps as f64;
    let offset = cfg.steps_offset as f64;
    let values: Vec<f64> = match cfg.timestep_spacing {
        TimestepSpacing::Leading => {
            let ratio = (cfg.num_train_timesteps / steps) as f64;
            (0..steps)
                .rev()
                .map(|i| (i as f64 * ratio).round_ties_even() + offset)
                .collect()
        }
        TimestepSpacing::Trailing => {
            // numpy's arange(T, 0, -ratio): length ⌈T/ratio⌉ and values T + i·δ with
            // δ = (T − ratio) − T, which rounds differently from −ratio on some step counts.
            let ratio = t / steps as f64;
            let delta = (t - ratio) - t;
            // For some step counts that length is steps + 1, the extra entry being −1, which
            // diffusers runs as a bogus step at a wrapped index; it is dropped here.
            let len = ((-t / delta).ceil() as usize).min(steps);
            (0..len)
                .map(|i| (t + i as f64 * delta).round_ties_even() - 1.0)
                .collect()
        }
        TimestepSpacing::Linspace => {
            let stop = t - 1.0;
            let step = if steps > 1 {
                stop / (steps - 1) as f64
            } else {
                0.0
            };
            (0..steps)
                .rev()
                .map(|i| {
                    // numpy's linspace pins the last point to `stop` exactly.
                    let v = if steps > 1 && i + 1 == steps {
                        stop
                    } else {
                        i as f64 * step
                    };
                    v.round_ties_even()
                })
                .collect()
        }
    };
    values
        .into_iter()
        .map(|v| {
            if v < 0.0 || v >= t {
                bail!(
                    "{steps} steps with {:?} spacing give timestep {v}, outside 0..{} (diffusers would \
                     silently wrap it); choose another step count or check steps_offset",
                    cfg.timestep_spacing,
                    cfg.num_train_timesteps
                )
            }
            Ok(v as usize)
        })
        .collect()
}
