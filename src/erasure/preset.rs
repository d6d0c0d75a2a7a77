//! Erasure presets: what to erase (concept, prompts, words), how to reward and judge it, and the
//! hyper-parameters, read from a TOML file. Unknown keys and bad values are refused with the
//! field's name, so a typo never silently falls back to a default.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use super::config::{DdpoConfig, SamplingSpec, require};
use super::seeds;
use crate::adapter::{AdapterConfig, SafeDelta};
use crate::reward::cer::CerWeights;

/// What kind of concept a preset erases; it decides nothing in training, but tells the studio
/// and the report what the numbers mean.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConceptKind {
    Object,
    Style,
    Nudity,
    Custom,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Preset {
    pub name: String,
    pub concept: String,
    pub kind: ConceptKind,
    #[serde(default)]
    pub description: String,
    /// The model it is made for: `demo`, a diffusers folder, or a Hugging Face repo id.
    pub model: String,
    pub prompts: PromptSet,
    pub reward: RewardSpec,
    /// Grades evaluations; should differ from the reward's detector where another exists.
    pub judge: DetectorSpec,
    #[serde(default)]
    pub adapter: AdapterConfig,
    #[serde(default)]
    pub sampling: SamplingSpec,
    #[serde(default)]
    pub ddpo: DdpoConfig,
    #[serde(default)]
    pub evaluation: EvaluationSpec,
}

/// Prompt templates: `{name}` is replaced by every value of `variables.name`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PromptSet {
    /// Prompts that ask for the concept: trained on, and (the held-out part) evaluated on.
    pub target: Vec<String>,
    /// Prompts without the concept whose images must not change.
    #[serde(default)]
    pub neutral: Vec<String>,
    /// Prompts for concepts close to the erased one, which must survive the erasure.
    #[serde(default)]
    pub neighbours: Vec<String>,
    #[serde(default)]
    pub variables: BTreeMap<String, Vec<String>>,
    /// Removed from a prompt before scoring how well an image still follows it.
    pub filter_words: Vec<String>,
    /// What an erased image should show instead, scored for alignment.
    pub anchor: String,
    /// Words that stand in for the concept's words in the anchor term's prompt, one per sample
    /// in turn (for a style, the other styles); without them the concept's words are dropped.
    #[serde(default)]
    pub anchor_substitutes: Vec<String>,
    /// Share of each expanded set (target, neighbours, neutral) kept out of training for
    /// evaluation.
    #[serde(default = "default_held_out")]
    pub held_out: f64,
}

/// Up to `n` of `items`, drawn by a fixed shuffle (a stride would alias with the order in which
/// templates expand), kept in their original order.
pub fn spread(items: &[String], n: usize) -> Vec<String> {
    if items.len() <= n {
        return items.to_vec();
    }
    let mut picked: Vec<usize> = (0..items.len()).collect();
    picked.shuffle(&mut seeds::prompt_shuffle());
    picked.truncate(n);
    picked.sort_unstable();
    picked.into_iter().map(|i| items[i].clone()).collect()
}

fn default_held_out() -> f64 {
    0.25
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewardSpec {
    pub detector: DetectorSpec,
    /// The CLIP model scoring alignment: `model` (the model's own `clip/` folder, as the demo
    /// model ships), a CLIPModel folder, or a repo id in the Hugging Face cache.
    pub clip: String,
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    #[serde(default = "default_beta")]
    pub beta: f64,
    #[serde(default = "one")]
    pub lambda_erase: f64,
    #[serde(default = "one")]
    pub lambda_align: f64,
}

fn default_alpha() -> f64 {
    CerWeights::default().alpha
}
fn default_beta() -> f64 {
    CerWeights::default().beta
}
fn one() -> f64 {
    1.0
}

impl RewardSpec {
    pub fn weights(&self) -> CerWeights {
        CerWeights {
            alpha: self.alpha,
            beta: self.beta,
            lambda_erase: self.lambda_erase,
            lambda_align: self.lambda_align,
        }
    }
}

/// A detector of the concept, for the reward or as the judge.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum DetectorSpec {
    /// CLIP zero-shot: probability mass on `concept_texts` against `neutral_texts`.
    Clip {
        /// As [`RewardSpec::clip`].
        model: String,
        concept_texts: Vec<String>,
        neutral_texts: Vec<String>,
        #[serde(default = "half")]
        threshold: f64,
    },
    /// NudeNet's ONNX detector; the concept is present when any of `classes` scores above
    /// the threshold.
    Nudenet {
        /// The `.onnx` file (from the `nudenet` Python package).
        model: PathBuf,
        classes: Vec<String>,
        #[serde(default = "half")]
        threshold: f64,
    },
    /// The demo model's judge network: the concept is `attribute` (object, colour, fill or
    /// background) taking `value`.
    DemoJudge { attribute: String, value: String },
}

fn half() -> f64 {
    0.5
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EvaluationSpec {
    /// Seeds per prompt; evaluation seeds start at 2^40, beyond any training seed.
    pub seeds_per_prompt: usize,
    /// At most this many prompts of each set (held-out target, neutral, neighbours), picked by
    /// a fixed shuffle.
    pub max_prompts: usize,
    /// Denoising steps (deterministic DDIM).
    pub steps: usize,
}

impl Default for EvaluationSpec {
    fn default() -> Self {
        Self {
            seeds_per_prompt: 4,
            max_prompts: 64,
            steps: 25,
        }
    }
}

impl Preset {
    /// Reads and checks a preset file.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read preset {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("preset {}", path.display()))
    }

    /// Parses and checks preset TOML.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let preset: Self = toml::from_str(text).map_err(|e| anyhow::anyhow!("{e}"))?;
        preset.validate()?;
        Ok(preset)
    }

    /// The preset as TOML, as a run records it.
    pub fn to_toml(&self) -> anyhow::Result<String> {
        Ok(toml::to_string_pretty(self)?)
    }

    /// Checks what serde cannot: non-empty lists, ranges, and that every template's
    /// placeholders have values.
    pub fn validate(&self) -> anyhow::Result<()> {
        let p = &self.prompts;
        require(!self.name.trim().is_empty(), "name", "must not be empty")?;
        require(
            !self.concept.trim().is_empty(),
            "concept",
            "must not be empty",
        )?;
        require(
            !p.target.is_empty(),
            "prompts.target",
            "needs at least one prompt",
        )?;
        require(
            !p.filter_words.is_empty(),
            "prompts.filter_words",
            "needs at least one word (usually the concept's name)",
        )?;
        require(
            (0.0..1.0).contains(&p.held_out),
            "prompts.held_out",
            "must be in [0, 1)",
        )?;
        require(
            p.anchor_substitutes.iter().all(|s| !s.trim().is_empty()),
            "prompts.anchor_substitutes",
            "must not hold an empty word (leave the list empty to drop the concept's words)",
        )?;
        for (field, list) in [
            ("prompts.target", &p.target),
            ("prompts.neutral", &p.neutral),
            ("prompts.neighbours", &p.neighbours),
        ] {
            expand(list, &p.variables).with_context(|| format!("field `{field}`"))?;
        }
        let (train, held_out) = self.split(PromptKind::Target)?;
        require(
            !train.is_empty() && !held_out.is_empty(),
            "prompts.held_out",
            &format!(
                "leaves {} training and {} held-out prompts; both need at least one",
                train.len(),
                held_out.len()
            ),
        )?;
        validate_detector(&self.reward.detector, "reward.detector")?;
        validate_detector(&self.judge, "judge")?;
        let r = &self.reward;
        for (field, value) in [
            ("reward.alpha", r.alpha),
            ("reward.beta", r.beta),
            ("reward.lambda_erase", r.lambda_erase),
            ("reward.lambda_align", r.lambda_align),
        ] {
            require(value.is_finite(), field, "must be a finite number")?;
        }
        let s = &self.sampling;
        require(s.steps > 0, "sampling.steps", "must be at least 1")?;
        require(
            s.size.is_none_or(|size| size > 0),
            "sampling.size",
            "must be a positive number of pixels",
        )?;
        require(
            s.eta > 0.0 && s.eta <= 1.0,
            "sampling.eta",
            "must be in (0, 1]: policy gradients need stochastic steps",
        )?;
        require(
            s.guidance_scale >= 0.0 && s.guidance_scale.is_finite(),
            "sampling.guidance_scale",
            "must be a number ≥ 0",
        )?;
        let a = &self.adapter;
        require(a.lora_rank > 0, "adapter.lora_rank", "must be at least 1")?;
        require(
            a.lora_alpha > 0.0 && a.lora_alpha.is_finite(),
            "adapter.lora_alpha",
            "must be a positive number",
        )?;
        require(
            a.tail_tokens > 0,
            "adapter.tail_tokens",
            "must be at least 1",
        )?;
        if let SafeDelta::LowRank { rank } = a.safe_delta {
            require(rank > 0, "adapter.safe_delta.rank", "must be at least 1")?;
        }
        self.ddpo.validate()?;
        let e = &self.evaluation;
        require(
            e.seeds_per_prompt > 0,
            "evaluation.seeds_per_prompt",
            "must be at least 1",
        )?;
        require(
            e.max_prompts > 0,
            "evaluation.max_prompts",
            "must be at least 1",
        )?;
        require(e.steps > 0, "evaluation.steps", "must be at least 1")?;
        Ok(())
    }

    /// A set's expanded prompts split into (training, held out): a fixed shuffle, whatever the
    /// run's seed, so every run of a preset holds out the same prompts. A non-empty set with
    /// `held_out` > 0 holds out at least one prompt, so evaluation always has some; a set of
    /// one is held out whole.
    pub fn split(&self, set: PromptKind) -> anyhow::Result<(Vec<String>, Vec<String>)> {
        let p = &self.prompts;
        let templates = match set {
            PromptKind::Target => &p.target,
            PromptKind::Neighbours => &p.neighbours,
            PromptKind::Neutral => &p.neutral,
        };
        let mut all = expand(templates, &p.variables)?;
        all.shuffle(&mut seeds::prompt_shuffle());
        let n = all.len();
        let held = if n == 0 || p.held_out == 0.0 {
            0
        } else {
            ((n as f64 * p.held_out).round() as usize).clamp(1, (n - 1).max(1))
        };
        let train = all.split_off(held);
        Ok((train, all))
    }

    /// The training parts of the neighbour and neutral sets: what the adapter must leave alone.
    pub fn preservation_prompts(&self) -> anyhow::Result<Vec<String>> {
        let (mut prompts, _) = self.split(PromptKind::Neighbours)?;
        prompts.extend(self.split(PromptKind::Neutral)?.0);
        Ok(prompts)
    }
}

/// The three prompt sets of a preset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PromptKind {
    Target,
    Neighbours,
    Neutral,
}

/// Preset files shipped in `presets/` (beside the crate, or `ERASURE_STUDIO_PRESETS`).
pub fn presets_dir() -> PathBuf {
    std::env::var_os("ERASURE_STUDIO_PRESETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("presets"))
}

/// A preset by file path, or by name from [`presets_dir`].
pub fn find(spec: &str) -> anyhow::Result<Preset> {
    let path = Path::new(spec);
    if path.is_file() {
        return Preset::load(path);
    }
    let named = presets_dir().join(format!("{spec}.toml"));
    if named.is_file() {
        return Preset::load(&named);
    }
    bail!(
        "no preset `{spec}`: not a file, and not one of the presets in {} ({})",
        presets_dir().display(),
        names().join(", ")
    )
}

/// The names of the presets in [`presets_dir`], sorted.
pub fn names() -> Vec<String> {
    std::fs::read_dir(presets_dir())
        .map(|entries| {
            let mut names: Vec<String> = entries
                .filter_map(|e| e.ok())
                .filter_map(|e| {
                    let name = e.file_name().to_string_lossy().into_owned();
                    name.strip_suffix(".toml").map(str::to_string)
                })
                .collect();
            names.sort();
            names
        })
        .unwrap_or_default()
}

fn validate_detector(spec: &DetectorSpec, field: &str) -> anyhow::Result<()> {
    match spec {
        DetectorSpec::Clip {
            concept_texts,
            neutral_texts,
            threshold,
            ..
        } => {
            require(
                !concept_texts.is_empty(),
                &format!("{field}.concept_texts"),
                "needs at least one text",
            )?;
            require(
                !neutral_texts.is_empty(),
                &format!("{field}.neutral_texts"),
                "needs at least one text",
            )?;
            require(
                (0.0..=1.0).contains(threshold),
                &format!("{field}.threshold"),
                "must be in [0, 1]",
            )
        }
        DetectorSpec::Nudenet {
            classes, threshold, ..
        } => {
            require(
                !classes.is_empty(),
                &format!("{field}.classes"),
                "needs at least one NudeNet class",
            )?;
            crate::reward::nudenet::require_runtime()
                .with_context(|| format!("field `{field}.kind` = \"nudenet\""))?;
            crate::reward::nudenet::class_indices(classes)
                .with_context(|| format!("field `{field}.classes`"))?;
            require(
                (0.0..=1.0).contains(threshold),
                &format!("{field}.threshold"),
                "must be in [0, 1]",
            )
        }
        DetectorSpec::DemoJudge { attribute, value } => {
            crate::demo_world::judge::attribute_value(attribute, value)
                .with_context(|| format!("field `{field}`"))?;
            Ok(())
        }
    }
}

/// Every template with every combination of its placeholders' values, in order, duplicates
/// dropped.
pub fn expand(
    templates: &[String],
    variables: &BTreeMap<String, Vec<String>>,
) -> anyhow::Result<Vec<String>> {
    let mut out: Vec<String> = Vec::new();
    for template in templates {
        let mut partial = vec![template.clone()];
        for name in placeholders(template)? {
            let Some(values) = variables.get(&name) else {
                bail!(
                    "template \"{template}\" uses {{{name}}} but `prompts.variables` has no `{name}`"
                );
            };
            if values.is_empty() {
                bail!("`prompts.variables.{name}` is empty");
            }
            partial = partial
                .iter()
                .flat_map(|p| values.iter().map(|v| p.replace(&format!("{{{name}}}"), v)))
                .collect();
        }
        for p in partial {
            if !out.contains(&p) {
                out.push(p);
            }
        }
    }
    Ok(out)
}

/// The distinct `{name}` placeholders of a template, in order of first use.
fn placeholders(template: &str) -> anyhow::Result<Vec<String>> {
    let mut names = Vec::new();
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        let after = &rest[open + 1..];
        let Some(close) = after.find('}') else {
            bail!("template \"{template}\" has a `{{` without a closing `}}`");
        };
        let name = &after[..close];
        if name.is_empty() || !name.chars().all(|c| c.is_alphanumeric() || c == '_') {
            bail!("template \"{template}\" has a bad placeholder {{{name}}}");
        }
        if !names.iter().any(|n| n == name) {
            names.push(name.to_string());
        }
        rest = &after[close + 1..];
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_expand_over_every_value_combination() {
        let vars = BTreeMap::from([
            ("c".to_string(), vec!["red".to_string(), "blue".to_string()]),
            ("b".to_string(), vec!["white".to_string()]),
        ]);
        let got = expand(
            &[
                "a {c} star on {b}".to_string(),
                "a {c} {c} star".to_string(),
                "plain".to_string(),
                "plain".to_string(),
            ],
            &vars,
        )
        .unwrap();
        assert_eq!(
            got,
            [
                "a red star on white",
                "a blue star on white",
                "a red red star",
                "a blue blue star",
                "plain"
            ]
        );
        let err = expand(&["a {x}".to_string()], &vars).unwrap_err();
        assert!(err.to_string().contains("{x}"), "{err}");
        let err = expand(&["a {c".to_string()], &vars).unwrap_err();
        assert!(err.to_string().contains("closing"), "{err}");
    }
}
