//! Exporting an erasure adapter as a LoRA other tools load: kohya (A1111, ComfyUI, diffusers)
//! or PEFT (diffusers' own `save_lora_weights` layout).
//!
//! A LoRA updates a layer for every context token; the Safe Adapter's delta acts on the last
//! few tokens only, so no LoRA file can hold it exactly. An export holds the LoRA branch (which
//! is exact for the leading tokens) and, when asked, a rank-k approximation of the Safe Adapter's
//! delta applied to every token, which keeps more of the erasure at some cost elsewhere.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{D, DType, Device, Tensor};
use serde::Serialize;

use super::{LoraFormat, Part};
use crate::adapter::{Delta, ErasureAdapter, low_rank};
use crate::engine::StableDiffusion;
use crate::engine::diffusion::ddim::PredictionType;

/// How to export.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraExport {
    pub format: LoraFormat,
    /// Rank of the Safe Adapter approximation folded into each update; `None` exports the
    /// LoRA branch alone.
    pub fold_rank: Option<usize>,
    /// Shown as the file's title in hosts that read it (the concept, say).
    pub title: String,
}

/// One module's update as exported: `(alpha / rank) · up · down`.
struct ModuleUpdate {
    path: String,
    down: Tensor,
    up: Tensor,
    alpha: f64,
}

/// Which family a model is, in kohya's and modelspec's words.
struct Family {
    ss_base_model_version: &'static str,
    architecture: &'static str,
}

fn family(sd: &StableDiffusion) -> Family {
    let context = sd
        .unet
        .cross_attn_layers()
        .first()
        .map_or(0, |l| l.context_dim);
    let v_prediction = sd.scheduler.prediction_type == PredictionType::VPrediction;
    match (context, v_prediction) {
        (768, _) => Family {
            ss_base_model_version: "sd_v1",
            architecture: "stable-diffusion-v1/lora",
        },
        (1024, true) => Family {
            ss_base_model_version: "sd_v2_768_v",
            architecture: "stable-diffusion-v2-768-v/lora",
        },
        (1024, false) => Family {
            ss_base_model_version: "sd_v2",
            architecture: "stable-diffusion-v2-512/lora",
        },
        _ => Family {
            ss_base_model_version: "custom",
            architecture: "custom/lora",
        },
    }
}

impl ErasureAdapter {
    /// Every `to_k` / `to_v` update as the export holds it, on the CPU in f32.
    fn export_updates(
        &self,
        sd: &StableDiffusion,
        fold_rank: Option<usize>,
    ) -> anyhow::Result<Vec<ModuleUpdate>> {
        let cpu = |t: &Tensor| t.to_device(&Device::Cpu)?.to_dtype(DType::F32);
        let mut updates = Vec::new();
        for (index, (layer, attn)) in self
            .layers
            .iter()
            .zip(sd.unet.cross_attn_layers())
            .enumerate()
        {
            let path = &attn.path;
            for (name, projection) in [("to_k", &layer.key), ("to_v", &layer.value)] {
                let lora = &projection.lora;
                let (down, up, alpha) = match fold_rank {
                    None => (cpu(&lora.down)?, cpu(&lora.up)?, self.config.lora_alpha),
                    Some(k) => {
                        // One LoRA of rank r + k at scale 1: [scale·up | U] · [down; V].
                        let (safe_up, safe_down) = match &projection.safe {
                            Delta::Full(w) => low_rank::truncated(&cpu(w)?, k, index as u64)?,
                            Delta::LowRank(lr) => (cpu(&lr.up)?, cpu(&lr.down)?),
                        };
                        let up =
                            Tensor::cat(&[(cpu(&lora.up)? * lora.scale)?, safe_up], D::Minus1)?;
                        let down = Tensor::cat(&[cpu(&lora.down)?, safe_down], 0)?;
                        let folded_rank = down.dim(0)?;
                        (down, up, folded_rank as f64)
                    }
                };
                updates.push(ModuleUpdate {
                    path: format!("{path}.{name}"),
                    down,
                    up,
                    alpha,
                });
            }
        }
        Ok(updates)
    }

    /// Writes the adapter to `path` as a LoRA file (atomically).
    pub fn export_lora(
        &self,
        sd: &StableDiffusion,
        export: &LoraExport,
        path: &Path,
    ) -> anyhow::Result<()> {
        let updates = self.export_updates(sd, export.fold_rank)?;
        let rank = updates.first().map_or(0, |u| u.down.dim(0).unwrap_or(0));
        let alpha = updates.first().map_or(0.0, |u| u.alpha);
        let mut tensors = BTreeMap::new();
        let family = family(sd);
        let format = export.format;
        let modules: Vec<String> = updates.iter().map(|u| u.path.clone()).collect();
        for u in updates {
            // kohya keeps each module's alpha beside its weights; PEFT in the metadata.
            if format == LoraFormat::Kohya {
                let alpha = Tensor::new(u.alpha as f32, &Device::Cpu)?;
                tensors.insert(format.tensor_name(&u.path, Part::Alpha), alpha);
            }
            tensors.insert(format.tensor_name(&u.path, Part::Down), u.down);
            tensors.insert(format.tensor_name(&u.path, Part::Up), u.up);
        }
        let metadata = match format {
            LoraFormat::Kohya => kohya_metadata(export, &family, rank, alpha),
            LoraFormat::Peft => peft_metadata(rank, alpha, modules)?,
        };
        crate::adapter::io::write(path, &tensors, metadata)
    }
}

fn kohya_metadata(
    export: &LoraExport,
    family: &Family,
    rank: usize,
    alpha: f64,
) -> HashMap<String, String> {
    let note = match export.fold_rank {
        None => "LoRA branch of an Erasure Studio adapter (the Safe Adapter is left out)".into(),
        Some(k) => format!(
            "LoRA branch of an Erasure Studio adapter with a rank-{k} approximation of its Safe \
             Adapter folded in"
        ),
    };
    HashMap::from(
        [
            ("ss_network_module", "networks.lora".to_string()),
            ("ss_network_dim", rank.to_string()),
            ("ss_network_alpha", alpha.to_string()),
            ("ss_base_model_version", family.ss_base_model_version.into()),
            (
                "ss_v2",
                (family.ss_base_model_version != "sd_v1").to_string(),
            ),
            ("ss_training_comment", note.clone()),
            ("modelspec.sai_model_spec", "1.0.0".into()),
            ("modelspec.architecture", family.architecture.into()),
            ("modelspec.implementation", "diffusers".into()),
            ("modelspec.title", export.title.clone()),
            ("modelspec.description", note),
        ]
        .map(|(k, v)| (k.to_string(), v)),
    )
}

/// diffusers' `lora_adapter_metadata`: the PEFT `LoraConfig` under the `unet.` prefix.
fn peft_metadata(
    rank: usize,
    alpha: f64,
    modules: Vec<String>,
) -> anyhow::Result<HashMap<String, String>> {
    #[derive(Serialize)]
    struct Config {
        #[serde(rename = "unet.r")]
        r: usize,
        #[serde(rename = "unet.lora_alpha")]
        lora_alpha: f64,
        /// Full module paths: names alone (`to_k`) would reach the self-attention too.
        #[serde(rename = "unet.target_modules")]
        target_modules: Vec<String>,
        #[serde(rename = "unet.use_rslora")]
        use_rslora: bool,
        #[serde(rename = "unet.use_dora")]
        use_dora: bool,
        #[serde(rename = "unet.peft_type")]
        peft_type: &'static str,
    }
    let config = Config {
        r: rank,
        lora_alpha: alpha,
        target_modules: modules,
        use_rslora: false,
        use_dora: false,
        peft_type: "LORA",
    };
    Ok(HashMap::from([
        ("format".to_string(), "pt".to_string()),
        (
            "lora_adapter_metadata".to_string(),
            serde_json::to_string(&config)?,
        ),
    ]))
}
