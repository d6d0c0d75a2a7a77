//! What the user fills in before a job starts: the persisted settings, the custom concept form,
//! and the run's parameters (a working copy of the chosen preset).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::worker::SampleSettings;
use crate::engine::diffusion::pipeline::Sampling;
use crate::erasure::export::ExportFormat;
use crate::erasure::preset::{self, ConceptKind, Preset};

/// The preset choice that opens the custom concept form.
pub const CUSTOM: &str = "custom concept";

/// The central area's tabs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Tab {
    Curves,
    Gallery,
    Prompt,
    Img2Img,
    Evaluation,
    Adapters,
}

impl Tab {
    pub const ALL: [Tab; 6] = [
        Tab::Curves,
        Tab::Gallery,
        Tab::Prompt,
        Tab::Img2Img,
        Tab::Evaluation,
        Tab::Adapters,
    ];

    pub fn title(self) -> &'static str {
        match self {
            Tab::Curves => "Curves",
            Tab::Gallery => "Gallery",
            Tab::Prompt => "Prompt",
            Tab::Img2Img => "img2img",
            Tab::Evaluation => "Evaluation",
            Tab::Adapters => "Adapters",
        }
    }
}

/// Kept between launches.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Settings {
    /// `demo`, a folder or a cached repo id.
    pub model: String,
    /// A preset name, or [`CUSTOM`].
    pub preset: String,
    /// New runs go into numbered folders here.
    pub runs_dir: PathBuf,
    pub tab: Tab,
    pub custom: ConceptForm,
    pub left_panel_width: f32,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            model: "demo".into(),
            preset: "demo-star".into(),
            runs_dir: PathBuf::from("runs"),
            tab: Tab::Curves,
            custom: ConceptForm::default(),
            left_panel_width: 300.0,
        }
    }
}

/// A concept without a preset: its words and prompt sets; the hyper-parameters come from a base
/// preset for the same model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ConceptForm {
    /// The concept's name, also the first word filtered from prompts.
    pub concept: String,
    pub kind: ConceptKind,
    /// More words to filter, comma-separated.
    pub extra_words: String,
    /// One prompt per line.
    pub targets: String,
    pub neighbours: String,
    pub neutral: String,
    pub anchor: String,
}

impl Default for ConceptForm {
    fn default() -> Self {
        Self {
            concept: "heart".into(),
            kind: ConceptKind::Object,
            extra_words: String::new(),
            targets: "a red solid heart on a white background\n\
                      a blue striped heart on a black background\n\
                      a green heart\n\
                      a yellow dotted heart on a gray background"
                .into(),
            neighbours: "a red solid circle on a white background\n\
                         a blue striped square on a black background"
                .into(),
            neutral: "a green shape on a gray background".into(),
            anchor: "a shape".into(),
        }
    }
}

fn lines(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect()
}

impl ConceptForm {
    /// The form over `base`'s hyper-parameters, detector texts and judge.
    pub fn to_preset(&self, base: &Preset) -> anyhow::Result<Preset> {
        let concept = self.concept.trim();
        if concept.is_empty() {
            anyhow::bail!("the custom concept needs a name (the word to erase)");
        }
        let mut preset = base.clone();
        preset.name = format!("custom-{}", concept.replace(' ', "-"));
        preset.concept = concept.to_string();
        preset.kind = self.kind;
        preset.description = format!("Custom concept `{concept}`, made in the studio");
        preset.prompts.target = lines(&self.targets);
        preset.prompts.neighbours = lines(&self.neighbours);
        preset.prompts.neutral = lines(&self.neutral);
        preset.prompts.variables.clear();
        preset.prompts.anchor = self.anchor.trim().to_string();
        preset.prompts.filter_words = std::iter::once(concept.to_string())
            .chain(
                self.extra_words
                    .split(',')
                    .map(str::trim)
                    .filter(|w| !w.is_empty())
                    .map(String::from),
            )
            .collect();
        preset.validate()?;
        Ok(preset)
    }
}

/// The preset a model's custom concepts borrow their settings from.
pub fn base_preset_for(model: &str) -> &'static str {
    if model == "demo" {
        "demo-star"
    } else {
        "parachute"
    }
}

/// The run about to start: a working copy of the chosen preset that the training controls edit.
#[derive(Debug, Clone)]
pub struct RunForm {
    pub preset: Preset,
    /// What `preset` was loaded from: the preset name (or [`CUSTOM`]) and model.
    pub source: (String, String),
    pub preview_every: usize,
    /// The run folder, typed or picked.
    pub out: String,
}

impl RunForm {
    /// The form for `settings`' preset on `settings`' model.
    pub fn new(settings: &Settings) -> anyhow::Result<Self> {
        let mut preset = if settings.preset == CUSTOM {
            settings
                .custom
                .to_preset(&preset::find(base_preset_for(&settings.model))?)?
        } else {
            preset::find(&settings.preset)?
        };
        preset.model = settings.model.clone();
        Ok(Self {
            out: next_run_dir(&settings.runs_dir, &preset.name)
                .display()
                .to_string(),
            preset,
            source: (settings.preset.clone(), settings.model.clone()),
            preview_every: 1,
        })
    }

    /// Whether the form still shows `settings`' choice.
    pub fn matches(&self, settings: &Settings) -> bool {
        self.source == (settings.preset.clone(), settings.model.clone())
    }
}

/// The first `runs_dir/NAME-N` that does not exist yet.
pub fn next_run_dir(runs_dir: &Path, name: &str) -> PathBuf {
    (1..)
        .map(|n| runs_dir.join(format!("{name}-{n}")))
        .find(|p| !p.exists())
        .expect("some run number is free")
}

/// The prompt box, img2img and adapter fields.
#[derive(Debug, Clone)]
pub struct SampleForm {
    pub sample: SampleSettings,
    pub init_image: String,
    pub strength: f64,
    pub adapter_path: String,
    pub export_path: String,
    pub export_format: ExportFormat,
    /// Rank of the Safe Adapter approximation folded into a LoRA export; 0 leaves it out.
    pub fold_rank: usize,
    pub adapter_strength: f64,
    pub evaluate_run: String,
}

impl Default for SampleForm {
    fn default() -> Self {
        Self {
            sample: SampleSettings {
                prompt: "a red solid star on a white background".into(),
                seed: 0,
                steps: Sampling::DEMO.steps,
                guidance_scale: Sampling::DEMO.guidance_scale,
            },
            init_image: String::new(),
            strength: 0.6,
            adapter_path: String::new(),
            export_path: "erasure-adapter.safetensors".into(),
            export_format: ExportFormat::Native,
            fold_rank: 0,
            adapter_strength: 1.0,
            evaluate_run: String::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn custom_concept_becomes_a_valid_preset() {
        let base = preset::find("demo-star").unwrap();
        let form = ConceptForm {
            extra_words: "hearts, ".into(),
            ..ConceptForm::default()
        };
        let p = form.to_preset(&base).unwrap();
        assert_eq!(p.concept, "heart");
        assert_eq!(p.prompts.filter_words, ["heart", "hearts"]);
        assert_eq!(p.prompts.target.len(), 4);
        assert_eq!(p.ddpo, base.ddpo);
        let empty = ConceptForm {
            targets: "\n  \n".into(),
            ..ConceptForm::default()
        };
        let err = format!("{:#}", empty.to_preset(&base).unwrap_err());
        assert!(err.contains("target"), "{err}");
    }

    #[test]
    fn run_folders_are_numbered() {
        let dir = std::env::temp_dir().join(format!("studio-runs-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("demo-star-1")).unwrap();
        assert_eq!(next_run_dir(&dir, "demo-star"), dir.join("demo-star-2"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
