//! An erasure run on disk. `RUN/` holds the resolved preset (`preset.toml`, its `model` the one
//! actually used), `metrics.jsonl` (one line per finished epoch), before/after sample grids in
//! `samples/`, the resumable `checkpoint.safetensors`, and at the end `adapter.safetensors`.
//! Every file is written atomically; a run stopped at any point resumes from its checkpoint.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use candle_core::Tensor;

use super::metrics::EpochMetrics;
use super::preset::{Preset, PromptKind, spread};
use super::render::{image_size, render};
use super::seeds;
use super::setup::Scorers;
use super::trainer::{ErasureTrainer, TrainingPrompts};
use crate::adapter::ErasureAdapter;
use crate::adapter::info::AdapterInfo;
use crate::engine::StableDiffusion;
use crate::fs::write_atomic;
use crate::images;
use crate::reward::cer::ErasureReward;
use crate::train::run::{SECONDS_KEY, seconds_in};

/// Columns of the preview grids: held-out target prompts, then neighbours, then neutral ones.
const PREVIEW_TARGETS: usize = 4;
const PREVIEW_OTHERS: usize = 2;

/// The files of a run folder.
#[derive(Debug, Clone)]
pub struct RunDir {
    pub root: PathBuf,
}

impl RunDir {
    pub fn new(root: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
        }
    }
    pub fn preset(&self) -> PathBuf {
        self.root.join("preset.toml")
    }
    pub fn metrics(&self) -> PathBuf {
        self.root.join("metrics.jsonl")
    }
    pub fn checkpoint(&self) -> PathBuf {
        self.root.join("checkpoint.safetensors")
    }
    pub fn adapter(&self) -> PathBuf {
        self.root.join("adapter.safetensors")
    }
    /// The run's trained adapter, or an error that says how to finish the run.
    pub fn finished_adapter(&self) -> anyhow::Result<PathBuf> {
        let adapter = self.adapter();
        if !adapter.is_file() {
            bail!(
                "{} has no adapter.safetensors yet: the run has not finished (continue it with \
                 `erasure-studio erase --resume {}`, or Resume in the studio)",
                self.root.display(),
                self.root.display()
            );
        }
        Ok(adapter)
    }
    pub fn samples(&self) -> PathBuf {
        self.root.join("samples")
    }

    /// The preset the run was started with.
    pub fn load_preset(&self) -> anyhow::Result<Preset> {
        if !self.preset().is_file() {
            bail!(
                "{} is not an erasure run folder (no preset.toml); start a run with \
                 `erasure-studio erase --preset P --out DIR`",
                self.root.display()
            );
        }
        Preset::load(&self.preset())
    }

    /// The metrics of the finished epochs.
    pub fn read_metrics(&self) -> anyhow::Result<Vec<EpochMetrics>> {
        let path = self.metrics();
        if !path.exists() {
            return Ok(Vec::new());
        }
        std::fs::read_to_string(&path)?
            .lines()
            .filter(|l| !l.trim().is_empty())
            .enumerate()
            .map(|(i, line)| {
                serde_json::from_str(line)
                    .with_context(|| format!("{} line {}", path.display(), i + 1))
            })
            .collect()
    }

    fn write_metrics(&self, metrics: &[EpochMetrics]) -> anyhow::Result<()> {
        let mut text = String::new();
        for m in metrics {
            text.push_str(&serde_json::to_string(m)?);
            text.push('\n');
        }
        write_atomic(&self.metrics(), text.as_bytes())
    }
}

/// A before/after preview, handed to the observer once its grid is written.
pub struct Preview<'a> {
    /// The grid PNG: the original model's images above, the adapter's below.
    pub path: &'a Path,
    /// Epochs done when it was drawn.
    pub epoch: usize,
    /// One per column, same seed per column.
    pub prompts: &'a [String],
    /// [N, 3, H, W] in [0, 1], one image per prompt.
    pub original: &'a Tensor,
    pub erased: &'a Tensor,
    /// The adapter as it drew `erased`.
    pub adapter: &'a ErasureAdapter,
}

/// What an erase call reports per epoch and at the end.
pub trait RunObserver {
    fn epoch(&mut self, metrics: &EpochMetrics, total_epochs: usize);
    /// A preview grid was written.
    fn preview(&mut self, _preview: &Preview) {}
    /// Something the run did that the user should know about (resuming, a skipped update),
    /// in words.
    fn notice(&mut self, _message: &str) {}
}

/// How a run call ended.
#[derive(Debug, Clone, PartialEq)]
pub enum RunEnd {
    /// Every epoch done; the adapter is written.
    Finished { adapter: PathBuf, seconds: f64 },
    /// Stopped on request after `epochs_done` epochs; the checkpoint holds them.
    Stopped { epochs_done: usize },
}

/// Options that are not part of the preset (they change no result).
#[derive(Debug, Clone, Copy)]
pub struct RunOptions {
    /// Write a before/after grid every this many epochs (and at the end).
    pub preview_every: usize,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self { preview_every: 5 }
    }
}

/// Starts a new run of `preset` in `out` (which must not hold a run already) on `sd`, a model
/// loaded from `preset.model`, scored by `scorers` (built on `sd`).
pub fn start(
    sd: &StableDiffusion,
    scorers: &mut Scorers,
    preset: Preset,
    out: &Path,
    options: RunOptions,
    stop: &(dyn Fn() -> bool + Sync),
    observer: &mut dyn RunObserver,
) -> anyhow::Result<RunEnd> {
    ensure_no_run(out)?;
    preset.validate()?;
    let dir = RunDir::new(out);
    std::fs::create_dir_all(dir.samples())
        .with_context(|| format!("cannot create run folder {}", out.display()))?;
    write_atomic(&dir.preset(), preset.to_toml()?.as_bytes())?;
    execute(&dir, &preset, sd, scorers, options, stop, observer)
}

/// Refuses a folder that already holds a run: a new run never overwrites one.
pub fn ensure_no_run(out: &Path) -> anyhow::Result<()> {
    if RunDir::new(out).preset().exists() {
        bail!(
            "{} already holds a run; continue it with `--resume {}` or choose another --out",
            out.display(),
            out.display()
        );
    }
    Ok(())
}

/// Continues the run in `run` from its checkpoint, on `sd` (a model loaded from the run's
/// `preset.model`) and its `scorers`.
pub fn resume(
    sd: &StableDiffusion,
    scorers: &mut Scorers,
    run: &Path,
    options: RunOptions,
    stop: &(dyn Fn() -> bool + Sync),
    observer: &mut dyn RunObserver,
) -> anyhow::Result<RunEnd> {
    let dir = RunDir::new(run);
    let preset = dir.load_preset()?;
    execute(&dir, &preset, sd, scorers, options, stop, observer)
}

/// The prompts of the preview grids' columns.
pub fn preview_prompts(preset: &Preset) -> anyhow::Result<Vec<String>> {
    let held_out = |set| Ok::<_, anyhow::Error>(preset.split(set)?.1);
    let mut prompts = spread(&held_out(PromptKind::Target)?, PREVIEW_TARGETS);
    prompts.extend(spread(&held_out(PromptKind::Neighbours)?, PREVIEW_OTHERS));
    prompts.extend(spread(&held_out(PromptKind::Neutral)?, PREVIEW_OTHERS));
    Ok(prompts)
}

/// A fresh trainer for `preset` on `sd`, scored by `reward` (the preset's own).
pub fn new_trainer<'a>(
    preset: &Preset,
    sd: &'a StableDiffusion,
    reward: &'a ErasureReward,
) -> anyhow::Result<ErasureTrainer<'a>> {
    let prompts = TrainingPrompts {
        target: preset.split(PromptKind::Target)?.0,
        preservation: preset.preservation_prompts()?,
        anchor_substitutes: preset.prompts.anchor_substitutes.clone(),
    };
    ErasureTrainer::new(
        sd,
        reward,
        prompts,
        preset.sampling.clone(),
        image_size(preset, sd)?,
        preset.adapter,
        preset.ddpo.clone(),
    )
}

fn execute(
    dir: &RunDir,
    preset: &Preset,
    sd: &StableDiffusion,
    scorers: &mut Scorers,
    options: RunOptions,
    stop: &(dyn Fn() -> bool + Sync),
    observer: &mut dyn RunObserver,
) -> anyhow::Result<RunEnd> {
    let (reward, _) = scorers.reward(preset)?;
    let mut trainer = new_trainer(preset, sd, &reward)?;
    let mut earlier_seconds = 0.0;
    if dir.checkpoint().exists() {
        earlier_seconds = seconds_in(&trainer.load_checkpoint(&dir.checkpoint())?);
        observer.notice(&format!(
            "resuming {} after epoch {}",
            dir.root.display(),
            trainer.epochs_done()
        ));
    }
    // Epochs after the checkpoint were interrupted before it was written: they run again.
    let mut metrics: Vec<EpochMetrics> = dir
        .read_metrics()?
        .into_iter()
        .filter(|m| m.epoch <= trainer.epochs_done())
        .collect();
    dir.write_metrics(&metrics)?;

    let preview = preview_prompts(preset)?;
    let original_grid = dir.samples().join("original.png");
    let originals = render(sd, preset, &preview, seeds::PREVIEW, None)?;
    if !original_grid.exists() {
        images::save_png(&images::grid(&originals, preview.len())?, &original_grid)?;
    }
    let listing = dir.samples().join("prompts.txt");
    if !listing.exists() {
        write_atomic(&listing, (preview.join("\n") + "\n").as_bytes())?;
    }

    let started = Instant::now();
    let seconds = || earlier_seconds + started.elapsed().as_secs_f64();
    let save = |trainer: &ErasureTrainer, seconds: f64| {
        let meta = BTreeMap::from([(SECONDS_KEY.to_string(), format!("{seconds:.3}"))]);
        trainer.save_checkpoint(&dir.checkpoint(), meta)
    };
    let total = preset.ddpo.epochs;
    while trainer.epochs_done() < total {
        let epoch = trainer.run_epoch(stop);
        // Told even when the epoch failed: they may say why.
        for notice in trainer.take_notices() {
            observer.notice(&notice);
        }
        let Some(m) = epoch? else {
            save(&trainer, seconds())?;
            return Ok(RunEnd::Stopped {
                epochs_done: trainer.epochs_done(),
            });
        };
        metrics.push(m.clone());
        // Metrics first: a kill between the two writes leaves an extra line, which resuming
        // drops, rather than a missing one.
        dir.write_metrics(&metrics)?;
        save(&trainer, seconds())?;
        observer.epoch(&m, total);
        let done = trainer.epochs_done();
        // A preview takes a while to draw: skipped when a stop is waiting (the run's end still
        // draws one).
        if (done % options.preview_every.max(1) == 0 && !stop()) || done == total {
            let path = dir.samples().join(format!("epoch-{done:04}.png"));
            let adapter = trainer.adapter().detached();
            let erased = render(sd, preset, &preview, seeds::PREVIEW, Some(&adapter))?;
            let both = Tensor::cat(&[&originals, &erased], 0)?;
            images::save_png(&images::grid(&both, preview.len())?, &path)?;
            observer.preview(&Preview {
                path: &path,
                epoch: done,
                prompts: &preview,
                original: &originals,
                erased: &erased,
                adapter: &adapter,
            });
        }
        if done < total && stop() {
            return Ok(RunEnd::Stopped { epochs_done: done });
        }
    }
    trainer.ensure_finite()?;
    let info = AdapterInfo {
        concept: Some(preset.concept.clone()),
        preset: Some(preset.name.clone()),
        method: Some(method(preset)),
        training: Some(training_summary(&metrics, seconds())),
        ..AdapterInfo::default()
    };
    trainer.adapter().save(&dir.adapter(), sd, &info)?;
    Ok(RunEnd::Finished {
        adapter: dir.adapter(),
        seconds: seconds(),
    })
}

/// How a preset trains, in words, for the adapter file.
fn method(preset: &Preset) -> String {
    let (a, d, r) = (&preset.adapter, &preset.ddpo, &preset.reward);
    let mut text = format!(
        "Safe Adapter on the last {} context tokens and LoRA (rank {}, alpha {}) on every \
         cross-attention to_k / to_v, trained by DDPO with PPO clipping (clip range {}) on the \
         concept-erasing reward (alpha {}, beta {}, lambda_erase {}, lambda_align {})",
        a.tail_tokens,
        a.lora_rank,
        a.lora_alpha,
        d.clip_range,
        r.alpha,
        r.beta,
        r.lambda_erase,
        r.lambda_align
    );
    if d.anchor_weight > 0.0 {
        text += &format!(
            ", an anchor term (weight {}, negative guidance {})",
            d.anchor_weight, d.anchor_guidance
        );
    }
    if d.preservation_weight > 0.0 {
        text += &format!(", a preservation term (weight {})", d.preservation_weight);
    }
    text
}

/// The run in a few figures, for the adapter file.
fn training_summary(metrics: &[EpochMetrics], seconds: f64) -> serde_json::Value {
    let first = metrics.first();
    let last = metrics.last();
    serde_json::json!({
        "epochs": metrics.len(),
        "seconds": seconds,
        "p_concept_first_epoch": first.map(|m| m.p_concept.mean),
        "p_concept_last_epoch": last.map(|m| m.p_concept.mean),
        "reward_first_epoch": first.map(|m| m.reward_total.mean),
        "reward_last_epoch": last.map(|m| m.reward_total.mean),
    })
}
