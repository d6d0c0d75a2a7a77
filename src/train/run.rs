//! The loop every trainer shares: learning-rate schedule, optimiser step, progress, and periodic
//! checkpoints that a rerun resumes from.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use candle_core::{Tensor, Var};
use candle_nn::VarMap;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::{AdamW, StepOutcome, checkpoint};

/// Linear warm-up to `peak_lr`, then cosine decay to a tenth of it at `steps`.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    pub steps: usize,
    pub peak_lr: f64,
    pub warmup: usize,
}

impl Schedule {
    /// The trainers' schedule: warm-up over the first 5 % of `steps`.
    pub fn warmup_cosine(steps: usize, peak_lr: f64) -> Self {
        Self {
            steps,
            peak_lr,
            warmup: (steps / 20).max(1),
        }
    }

    pub fn lr(&self, step: usize) -> f64 {
        if step < self.warmup {
            return self.peak_lr * (step + 1) as f64 / self.warmup as f64;
        }
        let span = self.steps.saturating_sub(self.warmup).max(1) as f64;
        let progress = ((step - self.warmup) as f64 / span).min(1.0);
        let floor = 0.1 * self.peak_lr;
        floor + (self.peak_lr - floor) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
    }
}

/// One training run: its schedule and where it checkpoints.
pub struct Run<'a> {
    /// Shown in progress lines.
    pub name: &'a str,
    pub schedule: Schedule,
    /// Resumed from when present; rewritten every `checkpoint_every` steps and at the end.
    pub checkpoint: Option<&'a Path>,
    pub checkpoint_every: usize,
}

/// Where a run stands, reported after every step.
#[derive(Debug, Clone, Copy)]
pub struct Progress<'a> {
    pub name: &'a str,
    pub step: usize,
    pub steps: usize,
    pub loss: f64,
    pub lr: f64,
    /// Seconds per step so far in this process.
    pub seconds_per_step: f64,
    /// The step's gradient was not finite, so its update was skipped.
    pub update_skipped: bool,
}

impl Progress<'_> {
    /// A one-line summary: step, loss, rate and time left.
    pub fn line(&self, smoothed_loss: f64) -> String {
        let left = (self.steps - self.step - 1) as f64 * self.seconds_per_step;
        format!(
            "{} step {}/{} loss {:.4} lr {:.2e} {:.2} s/step, {:.0} min left",
            self.name,
            self.step + 1,
            self.steps,
            smoothed_loss,
            self.lr,
            self.seconds_per_step,
            left / 60.0
        )
    }
}

/// The trainable variables of `vars`, sorted by name so optimiser state lines up across runs.
pub fn sorted_params(vars: &VarMap) -> Vec<(String, Var)> {
    let data = vars.data().lock().expect("var map lock");
    let mut params: Vec<_> = data.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    params.sort_by(|a, b| a.0.cmp(&b.0));
    params
}

/// The random stream of one step: data drawn from it is the same whether or not the run was
/// interrupted and resumed.
pub fn step_rng(seed: u64, step: usize) -> ChaCha8Rng {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(step as u64);
    rng
}

/// Checkpoint metadata: seconds spent training up to the checkpoint, over every process.
pub const SECONDS_KEY: &str = "seconds";

/// Seconds of training a checkpoint at `path` records (0 without one): what a resumed stage
/// adds to its own time.
pub fn seconds_recorded(path: &Path) -> anyhow::Result<f64> {
    if !path.exists() {
        return Ok(0.0);
    }
    Ok(seconds_in(&checkpoint::read_metadata(path)?))
}

pub fn seconds_in(metadata: &std::collections::HashMap<String, String>) -> f64 {
    metadata
        .get(SECONDS_KEY)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0.0)
}

/// Runs `run`, resuming from its checkpoint when one exists. `loss_at(step)` builds the loss
/// for a step (its data must depend only on the step, so a resumed run sees what an
/// uninterrupted one would). Returns the losses of the steps taken in this call.
pub fn train(
    run: &Run,
    opt: &mut AdamW,
    mut loss_at: impl FnMut(usize) -> anyhow::Result<Tensor>,
    mut report: impl FnMut(&Progress),
) -> anyhow::Result<Vec<f64>> {
    let mut seconds_before = 0.0;
    if let Some(path) = run.checkpoint.filter(|p| p.exists()) {
        seconds_before = seconds_in(&checkpoint::load(path, opt)?);
    }
    let first = opt.steps() as usize;
    let mut metadata = BTreeMap::from([("run".to_string(), run.name.to_string())]);
    let started = Instant::now();
    let mut losses = Vec::new();
    for step in first..run.schedule.steps {
        let lr = run.schedule.lr(step);
        opt.set_lr(lr);
        let loss = loss_at(step)?;
        let value = loss.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
        let update_skipped = opt.step(&loss.backward()?)? == StepOutcome::SkippedNonFinite;
        losses.push(value);
        let done = step + 1;
        if let Some(path) = run.checkpoint
            && (done % run.checkpoint_every.max(1) == 0 || done == run.schedule.steps)
        {
            let seconds = seconds_before + started.elapsed().as_secs_f64();
            metadata.insert(SECONDS_KEY.to_string(), seconds.to_string());
            checkpoint::save(path, opt, &metadata)?;
        }
        report(&Progress {
            name: run.name,
            step,
            steps: run.schedule.steps,
            loss: value,
            lr,
            seconds_per_step: started.elapsed().as_secs_f64() / (done - first) as f64,
            update_skipped,
        });
    }
    Ok(losses)
}

/// A progress reporter that tells `say` a line every `every` steps, with the loss averaged over
/// them, and every skipped update.
pub fn report_every(every: usize, say: &dyn Fn(&str)) -> impl FnMut(&Progress) + '_ {
    let mut window = Vec::new();
    move |p: &Progress| {
        if p.update_skipped {
            say(&format!(
                "{} step {}: non-finite gradient, update skipped",
                p.name, p.step
            ));
        }
        window.push(p.loss);
        if window.len() >= every || p.step + 1 == p.steps {
            let mean = window.iter().sum::<f64>() / window.len() as f64;
            say(&p.line(mean));
            window.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_then_decays_to_a_tenth() {
        let s = Schedule {
            steps: 100,
            peak_lr: 1.0,
            warmup: 10,
        };
        assert!((s.lr(0) - 0.1).abs() < 1e-12);
        assert!((s.lr(9) - 1.0).abs() < 1e-12);
        assert!((s.lr(10) - 1.0).abs() < 1e-12);
        assert!((s.lr(100) - 0.1).abs() < 1e-12);
        assert!(s.lr(50) < s.lr(30) && s.lr(50) > 0.1);
    }

    /// A run stopped after 3 of 6 steps and resumed: the checkpoint's recorded seconds cover
    /// both processes.
    #[test]
    fn resumed_runs_add_up_their_training_seconds() {
        use crate::train::AdamWConfig;
        let dir = std::env::temp_dir().join(format!("run-seconds-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ckpt.safetensors");
        assert_eq!(seconds_recorded(&path).unwrap(), 0.0);
        let mut recorded = Vec::new();
        for steps in [3, 6] {
            let w = Var::new(&[1.0f64, -2.0], &candle_core::Device::Cpu).unwrap();
            let mut opt =
                AdamW::new(vec![("w".into(), w.clone())], AdamWConfig::default()).unwrap();
            let run = Run {
                name: "test",
                schedule: Schedule::warmup_cosine(steps, 0.1),
                checkpoint: Some(&path),
                checkpoint_every: 1,
            };
            let losses = train(
                &run,
                &mut opt,
                |_| Ok(w.as_tensor().sqr()?.sum_all()?),
                |_| {},
            )
            .unwrap();
            assert_eq!(losses.len(), 3);
            recorded.push(seconds_recorded(&path).unwrap());
        }
        assert!(
            0.0 < recorded[0] && recorded[0] < recorded[1],
            "{recorded:?}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
