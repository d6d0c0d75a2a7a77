//! Evaluation of an adapter on prompts and seeds that training never saw: how often the judge
//! still finds the concept on held-out target prompts, and how well neutral and neighbour
//! prompts keep what the original model drew.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use super::preset::spread;
use super::preset::{Preset, PromptKind};
use super::render::{image_size, render};
use super::seeds;
use super::setup::Scorers;
use crate::adapter::ErasureAdapter;
use crate::adapter::info::AdapterInfo;
use crate::adapter::stack::{AdapterStack, LoadedAdapter};
use crate::engine::StableDiffusion;
use crate::engine::models::unet::UNetHook;
use crate::images;
use crate::reward::clip::ClipScorer;
use crate::reward::judge::{Judge, Reading};
use crate::stats::mean_std;

/// Prompts per sampling batch (each with every seed).
const PROMPTS_PER_BATCH: usize = 4;
/// Prompts of each set shown in the comparison grid.
const GRID_PROMPTS: usize = 6;

/// One prompt set's results.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SetReport {
    /// `target` (held-out), `neighbours` or `neutral`.
    pub set: String,
    pub prompts: Vec<String>,
    pub images: usize,
    /// First seed of this set's images; image i of the set used `first_seed + i`.
    pub first_seed: u64,
    /// Share of images in which the judge finds the concept.
    pub concept_rate_original: f64,
    pub concept_rate_erased: f64,
    /// Per attribute, the share of images showing what the prompt asked for (over images whose
    /// prompt names the attribute; absent when none does).
    pub accuracy_original: BTreeMap<String, f64>,
    pub accuracy_erased: BTreeMap<String, f64>,
    /// Per attribute, the share of images that read as the original at the same seed does.
    pub agreement: BTreeMap<String, f64>,
    /// Mean cosine similarity of CLIP image features, erased vs original at the same seed.
    pub clip_image_similarity: f64,
    /// Mean PSNR (dB) of the erased image against the original at the same seed.
    pub psnr_db: f64,
    /// What the judge read in every image, to see which prompts an adapter gets wrong.
    #[serde(default)]
    pub readings: Vec<ImageReadings>,
}

/// The judge's readings of one evaluation image, drawn by the original model and with the
/// adapter at the same seed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageReadings {
    pub prompt: String,
    pub seed: u64,
    /// Attribute name → value read.
    pub original: BTreeMap<String, String>,
    pub erased: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub preset: String,
    pub concept: String,
    pub model: String,
    pub adapter: String,
    pub judge: String,
    pub reward_detector: String,
    pub seeds_per_prompt: usize,
    pub steps: usize,
    pub guidance_scale: f64,
    pub image_size: usize,
    pub sets: Vec<SetReport>,
    pub seconds: f64,
}

impl Report {
    /// The concept rates per prompt set, as an adapter file records them.
    pub fn rates(&self) -> serde_json::Value {
        let sets: serde_json::Map<String, serde_json::Value> = self
            .sets
            .iter()
            .map(|s| {
                let rates = serde_json::json!({
                    "images": s.images,
                    "concept_rate_original": s.concept_rate_original,
                    "concept_rate_erased": s.concept_rate_erased,
                });
                (s.set.clone(), rates)
            })
            .collect();
        serde_json::json!({
            "judge": self.judge,
            "seeds_per_prompt": self.seeds_per_prompt,
            "steps": self.steps,
            "sets": sets,
        })
    }

    /// A few lines for the terminal.
    pub fn summary(&self) -> String {
        let mut out = format!(
            "{} on {} ({} seeds per prompt, judge: {})\n",
            self.preset, self.model, self.seeds_per_prompt, self.judge
        );
        for s in &self.sets {
            out.push_str(&format!(
                "  {:<10} {:>4} images  concept {:5.1}% → {:5.1}%  CLIP sim {:.3}  PSNR {:.1} dB\n",
                s.set,
                s.images,
                100.0 * s.concept_rate_original,
                100.0 * s.concept_rate_erased,
                s.clip_image_similarity,
                s.psnr_db
            ));
            for (attr, orig) in &s.accuracy_original {
                out.push_str(&format!(
                    "      {attr:<10} accuracy {:5.1}% → {:5.1}%  agreement {:5.1}%\n",
                    100.0 * orig,
                    100.0 * s.accuracy_erased[attr],
                    100.0 * s.agreement[attr]
                ));
            }
        }
        out
    }
}

/// What an evaluation compares and with what.
pub struct Evaluation<'a> {
    pub sd: &'a StableDiffusion,
    pub preset: &'a Preset,
    /// The adapter under evaluation, ready for sampling (a detached [`ErasureAdapter`] or any
    /// other hook).
    pub adapter: &'a dyn UNetHook,
    pub judge: &'a dyn Judge,
    pub clip: &'a ClipScorer,
    pub reward_detector: String,
    pub adapter_name: String,
}

impl Evaluation<'_> {
    /// Generates every set with and without the adapter, grades both, and writes the
    /// comparison grid to `grid_path`. `progress(done, total)` counts images.
    pub fn run(
        &self,
        grid_path: &Path,
        progress: &mut dyn FnMut(usize, usize),
    ) -> anyhow::Result<Report> {
        let started = Instant::now();
        let spec = &self.preset.evaluation;
        let held_out = |set| Ok::<_, anyhow::Error>(self.preset.split(set)?.1);
        let sets = [
            ("target", held_out(PromptKind::Target)?),
            ("neighbours", held_out(PromptKind::Neighbours)?),
            ("neutral", held_out(PromptKind::Neutral)?),
        ];
        let sets: Vec<(&str, Vec<String>)> = sets
            .into_iter()
            .filter(|(_, p)| !p.is_empty())
            .map(|(name, p)| (name, spread(&p, spec.max_prompts)))
            .collect();
        let total: usize = sets
            .iter()
            .map(|(_, p)| 2 * p.len() * spec.seeds_per_prompt)
            .sum();
        let mut done = 0;
        let mut first_seed = seeds::EVALUATION;
        let mut reports = Vec::new();
        let mut grid_rows = Vec::new();
        for (name, prompts) in &sets {
            let per_image = with_seeds(prompts, spec.seeds_per_prompt);
            let graded = self.grade_set(&per_image, first_seed, &mut |n| {
                done += n;
                progress(done, total);
            })?;
            grid_rows.push(pad_row(&graded.shown_original, GRID_PROMPTS)?);
            grid_rows.push(pad_row(&graded.shown_erased, GRID_PROMPTS)?);
            reports.push(self.report(name, prompts, &per_image, first_seed, &graded));
            first_seed += per_image.len() as u64;
        }
        images::save_png(
            &images::grid(&Tensor::cat(&grid_rows, 0)?, GRID_PROMPTS)?,
            grid_path,
        )?;
        Ok(Report {
            preset: self.preset.name.clone(),
            concept: self.preset.concept.clone(),
            model: self.preset.model.clone(),
            adapter: self.adapter_name.clone(),
            judge: self.judge.describe(),
            reward_detector: self.reward_detector.clone(),
            seeds_per_prompt: spec.seeds_per_prompt,
            steps: spec.steps,
            guidance_scale: self.preset.sampling.guidance_scale,
            image_size: image_size(self.preset, self.sd)?,
            sets: reports,
            seconds: started.elapsed().as_secs_f64(),
        })
    }

    /// Generates `per_image` (image i with seed `first_seed + i`) with and without the adapter,
    /// a batch at a time, and grades each batch before the next (memory stays bounded).
    fn grade_set(
        &self,
        per_image: &[String],
        first_seed: u64,
        count: &mut dyn FnMut(usize),
    ) -> anyhow::Result<GradedSet> {
        let seeds = self.preset.evaluation.seeds_per_prompt;
        let batch = PROMPTS_PER_BATCH * seeds;
        let (mut readings_original, mut readings_erased) = (Vec::new(), Vec::new());
        let (mut clip_similarity, mut psnr_db) = (Vec::new(), Vec::new());
        let (mut shown_original, mut shown_erased) = (Vec::new(), Vec::new());
        for (b, chunk) in per_image.chunks(batch).enumerate() {
            let seed = first_seed + (b * batch) as u64;
            let original = render(self.sd, self.preset, chunk, seed, None)?;
            count(chunk.len());
            let erased = render(self.sd, self.preset, chunk, seed, Some(self.adapter))?;
            count(chunk.len());
            readings_original.extend(self.judge.read(&original)?);
            readings_erased.extend(self.judge.read(&erased)?);
            let similarity: Vec<f32> = (self.clip.image_features(&original)?
                * self.clip.image_features(&erased)?)?
            .sum(1)?
            .to_vec1()?;
            clip_similarity.extend(similarity.iter().map(|&s| f64::from(s)));
            psnr_db.extend(psnr(&original, &erased)?);
            // The first seed of each prompt, for the grid.
            for i in (0..chunk.len()).step_by(seeds) {
                if b * batch + i < GRID_PROMPTS * seeds {
                    shown_original.push(original.get(i)?);
                    shown_erased.push(erased.get(i)?);
                }
            }
        }
        Ok(GradedSet {
            original: readings_original,
            erased: readings_erased,
            clip_similarity,
            psnr: psnr_db,
            shown_original: Tensor::stack(&shown_original, 0)?,
            shown_erased: Tensor::stack(&shown_erased, 0)?,
        })
    }

    fn report(
        &self,
        set: &str,
        prompts: &[String],
        per_image: &[String],
        first_seed: u64,
        graded: &GradedSet,
    ) -> SetReport {
        let (read_orig, read_erased) = (&graded.original, &graded.erased);
        let names = self.judge.attribute_names();
        let requested: Vec<Vec<Option<String>>> =
            per_image.iter().map(|p| self.judge.requested(p)).collect();
        let rate = |r: &[Reading]| r.iter().filter(|x| x.concept).count() as f64 / r.len() as f64;
        let named = |r: &Reading| -> BTreeMap<String, String> {
            names.iter().cloned().zip(r.attributes.clone()).collect()
        };
        let mut accuracy_original = BTreeMap::new();
        let mut accuracy_erased = BTreeMap::new();
        let mut agreement = BTreeMap::new();
        for (a, name) in names.iter().enumerate() {
            let agree = read_orig
                .iter()
                .zip(read_erased)
                .filter(|(o, e)| o.attributes[a] == e.attributes[a])
                .count();
            agreement.insert(name.clone(), agree as f64 / read_orig.len() as f64);
            let asked: Vec<(usize, &String)> = requested
                .iter()
                .enumerate()
                .filter_map(|(i, r)| r[a].as_ref().map(|v| (i, v)))
                .collect();
            if asked.is_empty() {
                continue;
            }
            let hits = |r: &[Reading]| {
                asked
                    .iter()
                    .filter(|(i, v)| &r[*i].attributes[a] == *v)
                    .count() as f64
                    / asked.len() as f64
            };
            accuracy_original.insert(name.clone(), hits(read_orig));
            accuracy_erased.insert(name.clone(), hits(read_erased));
        }
        SetReport {
            set: set.to_string(),
            prompts: prompts.to_vec(),
            images: per_image.len(),
            first_seed,
            concept_rate_original: rate(read_orig),
            concept_rate_erased: rate(read_erased),
            accuracy_original,
            accuracy_erased,
            agreement,
            clip_image_similarity: mean_std(&graded.clip_similarity).0,
            psnr_db: mean_std(&graded.psnr).0,
            readings: per_image
                .iter()
                .enumerate()
                .map(|(i, prompt)| ImageReadings {
                    prompt: prompt.clone(),
                    seed: first_seed + i as u64,
                    original: named(&read_orig[i]),
                    erased: named(&read_erased[i]),
                })
                .collect(),
        }
    }
}

/// Each prompt once per seed, in order: evaluation image i is `result[i]` at seed
/// `first_seed + i`.
fn with_seeds(prompts: &[String], seeds: usize) -> Vec<String> {
    prompts
        .iter()
        .flat_map(|p| std::iter::repeat_n(p.clone(), seeds))
        .collect()
}

/// How often `judge` finds the concept in images of the held-out target prompts drawn with
/// `adapter`: the same prompts and seeds as the target set of [`Evaluation::run`], so the rate
/// compares with a report's `concept_rate_erased`. `progress(done, total)` counts images.
pub fn target_concept_rate(
    sd: &StableDiffusion,
    preset: &Preset,
    judge: &dyn Judge,
    adapter: Option<&dyn UNetHook>,
    progress: &mut dyn FnMut(usize, usize),
) -> anyhow::Result<f64> {
    let spec = &preset.evaluation;
    let prompts = spread(&preset.split(PromptKind::Target)?.1, spec.max_prompts);
    let per_image = with_seeds(&prompts, spec.seeds_per_prompt);
    let batch = PROMPTS_PER_BATCH * spec.seeds_per_prompt;
    let mut found = 0;
    for (b, chunk) in per_image.chunks(batch).enumerate() {
        let images = render(
            sd,
            preset,
            chunk,
            seeds::EVALUATION + (b * batch) as u64,
            adapter,
        )?;
        found += judge.read(&images)?.iter().filter(|r| r.concept).count();
        progress(
            (b * batch + chunk.len()).min(per_image.len()),
            per_image.len(),
        );
    }
    Ok(found as f64 / per_image.len().max(1) as f64)
}

/// A prompt set's readings and per-image comparisons, and the images shown in the grid.
struct GradedSet {
    original: Vec<Reading>,
    erased: Vec<Reading>,
    clip_similarity: Vec<f64>,
    psnr: Vec<f64>,
    shown_original: Tensor,
    shown_erased: Tensor,
}

/// The PSNR (dB) of each image of `b` against the same image of `a` (both in [0, 1]).
fn psnr(a: &Tensor, b: &Tensor) -> anyhow::Result<Vec<f64>> {
    let mse: Vec<f32> = (a - b)?.sqr()?.flatten_from(1)?.mean(1)?.to_vec1()?;
    Ok(mse
        .iter()
        .map(|&m| -10.0 * f64::from(m).max(1e-10).log10())
        .collect())
}

/// Pads a row of images with black ones up to `columns`, so every set starts a grid row.
fn pad_row(images: &Tensor, columns: usize) -> candle_core::Result<Tensor> {
    let (n, c, h, w) = images.dims4()?;
    if n >= columns {
        return Ok(images.clone());
    }
    let pad = Tensor::zeros((columns - n, c, h, w), images.dtype(), images.device())?;
    Tensor::cat(&[images, &pad], 0)
}

/// The report an evaluation wrote into `folder`, if there is a readable one.
pub fn read_report(folder: &Path) -> Option<Report> {
    let bytes = std::fs::read(folder.join(REPORT_FILE)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// File names an evaluation writes into its output folder.
pub const REPORT_FILE: &str = "report.json";
pub const GRID_FILE: &str = "comparison.png";

/// Evaluates the adapter at `adapter_path` (a native file or a LoRA) on `sd`, the model the
/// preset names, with the preset's judge from `scorers`, writing `report.json` and
/// `comparison.png` into `out`. With `record`, a native adapter file also gets the concept
/// rates in its metadata (rewritten atomically).
pub fn evaluate_adapter(
    sd: &StableDiffusion,
    scorers: &mut Scorers,
    preset: &Preset,
    adapter_path: &Path,
    out: &Path,
    record: bool,
    progress: &mut dyn FnMut(usize, usize),
) -> anyhow::Result<Report> {
    let device = &sd.device;
    let (reward, reward_detector) = scorers.reward(preset)?;
    let judge = scorers.judge(preset)?;
    let adapter = LoadedAdapter::load(adapter_path, &sd.unet, DType::F32, device)?;
    let stack = AdapterStack {
        adapters: vec![adapter],
    };
    let evaluation = Evaluation {
        sd,
        preset,
        adapter: &stack,
        judge: judge.as_ref(),
        clip: &reward.clip,
        reward_detector,
        adapter_name: adapter_path.display().to_string(),
    };
    let report = evaluation.run(&out.join(GRID_FILE), progress)?;
    crate::fs::write_atomic(
        &out.join(REPORT_FILE),
        serde_json::to_string_pretty(&report)?.as_bytes(),
    )?;
    if record && ErasureAdapter::is_native_file(adapter_path)? {
        let native = ErasureAdapter::load(adapter_path, &sd.unet, DType::F32, device)?;
        let info = AdapterInfo {
            evaluation: Some(report.rates()),
            ..native.info().clone()
        };
        native.save(adapter_path, sd, &info)?;
    }
    Ok(report)
}
