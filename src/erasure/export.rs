//! Exporting a run's adapter, and measuring what a LoRA export keeps of the erasure.

use std::path::Path;
use std::str::FromStr;

use anyhow::Context;
use candle_core::DType;
use serde::{Deserialize, Serialize};

use super::evaluate::{Report, target_concept_rate};
use super::preset::{Preset, PromptKind, spread};
use crate::adapter::ErasureAdapter;
use crate::adapter::lora::LoraAdapter;
use crate::adapter::lora::{LoraExport, LoraFormat};
use crate::engine::StableDiffusion;
use crate::reward::judge::Judge;

/// The file formats an adapter exports to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportFormat {
    /// This project's own file: the whole adapter, Safe Adapter included.
    Native,
    /// A LoRA other tools load: kohya (A1111, ComfyUI, diffusers) or PEFT (diffusers).
    Lora(LoraFormat),
}

impl FromStr for ExportFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "native" => Ok(Self::Native),
            "kohya" => Ok(Self::Lora(LoraFormat::Kohya)),
            "peft" => Ok(Self::Lora(LoraFormat::Peft)),
            _ => Err(format!("unknown format `{s}`: use native, kohya or peft")),
        }
    }
}

/// Writes `adapter` (trained on `sd`) to `out` in `format`; `fold_rank` folds a rank-k
/// approximation of the Safe Adapter into a LoRA export.
pub fn write(
    adapter: &ErasureAdapter,
    sd: &StableDiffusion,
    format: ExportFormat,
    fold_rank: Option<usize>,
    title: &str,
    out: &Path,
) -> anyhow::Result<()> {
    let format = match format {
        ExportFormat::Native => return adapter.save(out, sd, adapter.info()),
        ExportFormat::Lora(format) => format,
    };
    if fold_rank == Some(0) {
        anyhow::bail!("the Safe Adapter fold rank must be at least 1 (or leave it out)");
    }
    let export = LoraExport {
        format,
        fold_rank,
        title: title.to_string(),
    };
    adapter
        .export_lora(sd, &export, out)
        .with_context(|| format!("cannot write {}", out.display()))
}

/// The title a LoRA export carries (in other tools' model lists): the concept and preset of
/// `preset` when known, else those the adapter file records.
pub fn title(adapter: &ErasureAdapter, preset: Option<&Preset>) -> String {
    let info = adapter.info();
    let concept = preset.map(|p| &p.concept).or(info.concept.as_ref());
    let preset = preset.map(|p| &p.name).or(info.preset.as_ref());
    match (concept, preset) {
        (Some(concept), Some(preset)) => format!("{concept} erased ({preset})"),
        (Some(concept), None) => format!("{concept} erased"),
        (None, _) => "erasure".to_string(),
    }
}

/// How often the judge finds the concept on the held-out target prompts: originally, with the
/// full adapter, and with an exported file, all at the same prompts and seeds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ExportComparison {
    pub images: usize,
    pub original: f64,
    pub full: f64,
    pub exported: f64,
}

impl ExportComparison {
    /// Whether the export removes at least half of what the full adapter removes.
    pub fn keeps_most(&self) -> bool {
        self.original - self.exported >= 0.5 * (self.original - self.full)
    }

    pub fn summary(&self) -> String {
        format!(
            "concept found on {} held-out target images: {:.1} % originally, {:.1} % with the \
             full adapter, {:.1} % with the exported file",
            self.images,
            100.0 * self.original,
            100.0 * self.full,
            100.0 * self.exported
        )
    }
}

/// Measures the exported LoRA at `exported` against the full `adapter`. The original and
/// full-adapter rates come from `report` (the run's evaluation) when it was made with the
/// preset's evaluation settings; otherwise they are measured too.
pub fn compare(
    sd: &StableDiffusion,
    judge: &dyn Judge,
    preset: &Preset,
    adapter: &ErasureAdapter,
    exported: &Path,
    report: Option<&Report>,
    progress: &mut dyn FnMut(usize, usize),
) -> anyhow::Result<ExportComparison> {
    let lora = LoraAdapter::load(exported, &sd.unet, DType::F32, &sd.device)?;
    let spec = &preset.evaluation;
    let prompts = spread(&preset.split(PromptKind::Target)?.1, spec.max_prompts);
    let images = prompts.len() * spec.seeds_per_prompt;
    let reported = report
        .filter(|r| r.seeds_per_prompt == spec.seeds_per_prompt && r.steps == spec.steps)
        .and_then(|r| {
            r.sets
                .iter()
                .find(|s| s.set == "target" && s.prompts == prompts)
        });
    let exported_rate = target_concept_rate(sd, preset, judge, Some(&lora), &mut *progress)?;
    let (original, full) = match reported {
        Some(t) => (t.concept_rate_original, t.concept_rate_erased),
        None => {
            let detached = adapter.detached();
            (
                target_concept_rate(sd, preset, judge, None, &mut *progress)?,
                target_concept_rate(sd, preset, judge, Some(&detached), progress)?,
            )
        }
    };
    Ok(ExportComparison {
        images,
        original,
        full,
        exported: exported_rate,
    })
}

#[cfg(test)]
mod tests {
    use super::ExportComparison;

    #[test]
    fn an_export_keeps_most_when_it_removes_half_of_what_the_full_adapter_removes() {
        let rates = |exported| ExportComparison {
            images: 32,
            original: 0.7,
            full: 0.1,
            exported,
        };
        assert!(rates(0.1).keeps_most() && rates(0.39).keeps_most());
        assert!(!rates(0.41).keeps_most() && !rates(0.72).keeps_most());
    }
}
