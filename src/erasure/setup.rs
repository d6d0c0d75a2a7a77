//! Turns a preset into loaded parts: the model, the reward (detector + alignment CLIP) and the
//! evaluation judge. Model and CLIP names resolve the same way everywhere: `demo`, a folder, or
//! a repo id in the Hugging Face cache.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use candle_core::{DType, Device};

use super::preset::{DetectorSpec, Preset};
use crate::demo_world::judge::{DemoJudge, JudgeNet};
use crate::engine::io::hf_cache::hf_cache_snapshot;
use crate::engine::{ModelSource, StableDiffusion};
use crate::reward::cer::{ClipDetector, ConceptDetector, ErasureReward};
use crate::reward::clip::ClipScorer;
use crate::reward::judge::{Judge, ThresholdJudge};

/// Loads the model named by `spec` in f32.
pub fn load_model(spec: &str, device: &Device) -> anyhow::Result<StableDiffusion> {
    StableDiffusion::load(&ModelSource::named(spec)?, device, DType::F32)
        .with_context(|| format!("loading model `{spec}`"))
}

/// The folder a CLIP name points at: `model` is the model's own `clip/` folder.
fn clip_folder(spec: &str, model_root: &Path) -> anyhow::Result<PathBuf> {
    if spec == "model" {
        let dir = model_root.join("clip");
        if !dir.is_dir() {
            bail!(
                "the preset asks for the model's own CLIP (`model`), but {} has no clip/ folder; \
                 name a CLIP model folder or a cached repo id such as openai/clip-vit-large-patch14",
                model_root.display()
            );
        }
        return Ok(dir);
    }
    let path = Path::new(spec);
    if path.is_dir() {
        return Ok(path.to_path_buf());
    }
    if let Some(snapshot) = hf_cache_snapshot(spec)? {
        return Ok(snapshot);
    }
    bail!(
        "CLIP model `{spec}` is neither a folder nor a repo in the Hugging Face cache; \
         download it with `huggingface-cli download {spec}` on a machine with internet access"
    )
}

/// Builds the reward and the judge a preset describes for a model in `model_root`, loading each
/// CLIP model once however many parts use it.
pub struct Scorers {
    model_root: PathBuf,
    device: Device,
    clips: HashMap<PathBuf, Arc<ClipScorer>>,
}

impl Scorers {
    pub fn new(model_root: &Path, device: &Device) -> Self {
        Self {
            model_root: model_root.to_path_buf(),
            device: device.clone(),
            clips: HashMap::new(),
        }
    }

    fn clip(&mut self, spec: &str) -> anyhow::Result<Arc<ClipScorer>> {
        let dir = clip_folder(spec, &self.model_root)?;
        if let Some(clip) = self.clips.get(&dir) {
            return Ok(clip.clone());
        }
        let clip = Arc::new(
            ClipScorer::load(&dir, &self.device)
                .with_context(|| format!("loading CLIP model {}", dir.display()))?,
        );
        self.clips.insert(dir, clip.clone());
        Ok(clip)
    }

    /// A detector and its description for reports.
    fn detector(
        &mut self,
        spec: &DetectorSpec,
    ) -> anyhow::Result<(Box<dyn ConceptDetector>, String)> {
        Ok(match spec {
            DetectorSpec::Clip {
                model,
                concept_texts,
                neutral_texts,
                ..
            } => (
                Box::new(ClipDetector {
                    clip: self.clip(model)?,
                    concept_texts: concept_texts.clone(),
                    neutral_texts: neutral_texts.clone(),
                }),
                format!("CLIP zero-shot ({model}) on {concept_texts:?} against {neutral_texts:?}"),
            ),
            DetectorSpec::Nudenet { model, classes, .. } => (
                nudenet_detector(model, classes)?,
                format!("NudeNet ({}) on {classes:?}", model.display()),
            ),
            DetectorSpec::DemoJudge { attribute, value } => (
                Box::new(demo_judge(
                    &self.model_root,
                    &self.device,
                    attribute,
                    value,
                )?),
                format!("demo judge ({attribute} = {value})"),
            ),
        })
    }

    /// The preset's reward, and its detector's description.
    pub fn reward(&mut self, preset: &Preset) -> anyhow::Result<(ErasureReward, String)> {
        let (detector, name) = self
            .detector(&preset.reward.detector)
            .context("field `reward.detector`")?;
        let reward = ErasureReward {
            detector,
            clip: self
                .clip(&preset.reward.clip)
                .context("field `reward.clip`")?,
            concept_words: preset.prompts.filter_words.clone(),
            anchor: preset.prompts.anchor.clone(),
            weights: preset.reward.weights(),
        };
        Ok((reward, name))
    }

    /// The preset's evaluation judge.
    pub fn judge(&mut self, preset: &Preset) -> anyhow::Result<Box<dyn Judge>> {
        Ok(match &preset.judge {
            DetectorSpec::DemoJudge { attribute, value } => Box::new(
                demo_judge(&self.model_root, &self.device, attribute, value)
                    .context("field `judge`")?,
            ),
            spec @ (DetectorSpec::Clip { threshold, .. }
            | DetectorSpec::Nudenet { threshold, .. }) => {
                let (detector, name) = self.detector(spec).context("field `judge`")?;
                Box::new(ThresholdJudge {
                    detector,
                    threshold: *threshold,
                    name,
                })
            }
        })
    }
}

fn demo_judge(
    model_root: &Path,
    device: &Device,
    attribute: &str,
    value: &str,
) -> anyhow::Result<DemoJudge> {
    let dir = model_root.join("judge");
    if !dir.is_dir() {
        bail!(
            "the preset uses the demo judge, but {} has no judge/ folder: demo presets need the demo model",
            model_root.display()
        );
    }
    DemoJudge::new(JudgeNet::load(&dir, device)?, attribute, value)
}

#[cfg(feature = "nudenet")]
fn nudenet_detector(model: &Path, classes: &[String]) -> anyhow::Result<Box<dyn ConceptDetector>> {
    Ok(Box::new(crate::reward::nudenet::NudeNet::load(
        model, classes,
    )?))
}

#[cfg(not(feature = "nudenet"))]
fn nudenet_detector(_: &Path, _: &[String]) -> anyhow::Result<Box<dyn ConceptDetector>> {
    bail!(crate::reward::nudenet::MISSING_RUNTIME)
}
