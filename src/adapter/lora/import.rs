//! Reading LoRA files made anywhere: a loaded file adds `strength · scale · up · down` to the
//! UNet layers it names, through [`UNetHook`].

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::{Context, bail};
use candle_core::{DType, Device, Result as CandleResult, Tensor};

use super::{LoraFormat, Part};
use crate::engine::models::unet::{AdaptableLayer, CrossAttnLayer, UNet, UNetHook};

/// One layer's update `scale · up · down`, `down` [rank, in], `up` [out, rank].
struct LayerLora {
    down: Tensor,
    up: Tensor,
    scale: f64,
    /// The layer is a 1×1 convolution, whose input and output are [B, C, H, W].
    conv: bool,
}

impl LayerLora {
    fn apply(&self, x: &Tensor, strength: f64) -> CandleResult<Tensor> {
        let project = |t: &Tensor| -> CandleResult<Tensor> {
            t.broadcast_matmul(&self.down.t()?)?
                .broadcast_matmul(&self.up.t()?)?
                * (self.scale * strength)
        };
        if self.conv {
            // Channels last, project, channels first again.
            project(&x.permute((0, 2, 3, 1))?.contiguous()?)?
                .permute((0, 3, 1, 2))?
                .contiguous()
        } else {
            project(x)
        }
    }
}

/// A LoRA file applied to a UNet.
pub struct LoraAdapter {
    format: LoraFormat,
    /// By diffusers module path.
    layers: HashMap<String, LayerLora>,
    /// Modules the file updates that this engine does not (a text encoder, layers outside the
    /// transformers), by the file's own name.
    skipped: Vec<String>,
    strength: f64,
}

/// The parts of one module's update as a file stores them.
#[derive(Default)]
struct Parts {
    down: Option<Tensor>,
    up: Option<Tensor>,
    alpha: Option<f64>,
}

impl LoraAdapter {
    /// Reads a kohya or PEFT LoRA file for `unet`; tensors go to `device` in `dtype`.
    pub fn load(path: &Path, unet: &UNet, dtype: DType, device: &Device) -> anyhow::Result<Self> {
        let (bytes, metadata) = crate::adapter::io::read(path, "LoRA file")?;
        let tensors = candle_core::safetensors::load_buffer(&bytes, device)?;
        Self::from_tensors(tensors, &metadata, unet, dtype)
            .with_context(|| format!("LoRA file {}", path.display()))
    }

    /// A LoRA from a file's tensors and metadata.
    pub fn from_tensors(
        tensors: HashMap<String, Tensor>,
        metadata: &HashMap<String, String>,
        unet: &UNet,
        dtype: DType,
    ) -> anyhow::Result<Self> {
        let Some(format) = LoraFormat::detect(tensors.keys().map(String::as_str)) else {
            bail!(
                "no LoRA tensors found (expected kohya `lora_unet_…lora_down.weight` or PEFT \
                 `unet.….lora_A.weight` names)"
            );
        };
        let targets = unet.adaptable_layers();
        let by_kohya_name: HashMap<String, &AdaptableLayer> = targets
            .iter()
            .map(|l| (LoraFormat::Kohya.module_name(&l.path), l))
            .collect();
        let by_path: HashMap<&str, &AdaptableLayer> =
            targets.iter().map(|l| (l.path.as_str(), l)).collect();
        let peft = PeftAlphas::from_metadata(metadata)?;

        let mut parts: BTreeMap<String, Parts> = BTreeMap::new();
        let mut skipped = Vec::new();
        for (name, tensor) in tensors {
            let Some((module, part)) = format.split_name(&name) else {
                bail!(
                    "tensor `{name}` is not a LoRA down/up weight or alpha; only plain LoRA is \
                     supported (not LyCORIS LoHa/LoKr or DoRA)"
                );
            };
            let layer = match format {
                LoraFormat::Kohya => by_kohya_name.get(module).copied(),
                LoraFormat::Peft => by_path.get(strip_peft_prefix(module)).copied(),
            };
            let Some(layer) = layer else {
                skipped.push(module.to_string());
                continue;
            };
            let entry = parts.entry(layer.path.clone()).or_default();
            match part {
                Part::Down => entry.down = Some(tensor.to_dtype(dtype)?),
                Part::Up => entry.up = Some(tensor.to_dtype(dtype)?),
                Part::Alpha => {
                    entry.alpha = Some(tensor.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?[0])
                }
            }
        }
        skipped.sort();
        skipped.dedup();
        if parts.is_empty() {
            bail!(
                "none of its modules is a layer of this UNet (it updates {}); it was made for \
                 another kind of model",
                skipped
                    .iter()
                    .take(3)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        let mut layers = HashMap::new();
        for (path, p) in parts {
            let layer = by_path[path.as_str()];
            let (Some(down), Some(up)) = (p.down, p.up) else {
                bail!("module `{path}` has only one of its down and up weights");
            };
            let down = as_matrix(down, layer.conv, &path, "down")?;
            let up = as_matrix(up, layer.conv, &path, "up")?;
            let (rank, in_dim) = down.dims2()?;
            let (out_dim, up_rank) = up.dims2()?;
            if (in_dim, out_dim) != (layer.in_dim, layer.out_dim) || up_rank != rank {
                bail!(
                    "module `{path}` maps {in_dim} → {out_dim} (rank {rank}, up rank {up_rank}); \
                     this model's layer maps {} → {}: the file was made for another model",
                    layer.in_dim,
                    layer.out_dim
                );
            }
            let alpha = match format {
                LoraFormat::Kohya => p.alpha.unwrap_or(rank as f64),
                LoraFormat::Peft => peft.alpha(&path, rank),
            };
            let scale = match format {
                LoraFormat::Peft if peft.rslora => alpha / (rank as f64).sqrt(),
                _ => alpha / rank as f64,
            };
            let conv = layer.conv;
            layers.insert(
                path,
                LayerLora {
                    down,
                    up,
                    scale,
                    conv,
                },
            );
        }
        Ok(Self {
            format,
            layers,
            skipped,
            strength: 1.0,
        })
    }

    pub fn format(&self) -> LoraFormat {
        self.format
    }

    /// How many UNet layers the file updates.
    pub fn layer_count(&self) -> usize {
        self.layers.len()
    }

    /// Modules in the file that are not applied (a text encoder, layers outside the
    /// transformers), by the file's names.
    pub fn skipped(&self) -> &[String] {
        &self.skipped
    }

    pub fn strength(&self) -> f64 {
        self.strength
    }

    /// Scales the update (1 = as the file has it, 0 = off).
    pub fn set_strength(&mut self, strength: f64) {
        self.strength = strength;
    }
}

impl UNetHook for LoraAdapter {
    fn key_value_update(
        &self,
        _layer: &CrossAttnLayer,
        _context: &Tensor,
    ) -> CandleResult<Option<(Tensor, Tensor)>> {
        Ok(None)
    }

    fn layer_update(&self, path: &str, x: &Tensor) -> CandleResult<Option<Tensor>> {
        if self.strength == 0.0 {
            return Ok(None);
        }
        self.layers
            .get(path)
            .map(|l| l.apply(x, self.strength))
            .transpose()
    }
}

/// A PEFT module name without the prefix of the model it belongs to.
fn strip_peft_prefix(module: &str) -> &str {
    ["unet.", "base_model.model."]
        .iter()
        .find_map(|p| module.strip_prefix(p))
        .unwrap_or(module)
}

/// A down or up weight as a matrix: 1×1 convolution weights lose their two unit dimensions.
fn as_matrix(t: Tensor, conv: bool, path: &str, which: &str) -> anyhow::Result<Tensor> {
    match (t.dims(), conv) {
        ([_, _], false) => Ok(t),
        ([a, b, 1, 1], true) => Ok(t.reshape((*a, *b))?),
        (dims, _) => bail!(
            "module `{path}`: the {which} weight has shape {dims:?}, which does not fit a {}",
            if conv {
                "1×1 convolution"
            } else {
                "linear layer"
            }
        ),
    }
}

/// The alphas of a PEFT file, from diffusers' `lora_adapter_metadata` (keys `unet.lora_alpha`,
/// `unet.alpha_pattern`, `unet.use_rslora`); without it every module's alpha is its rank.
#[derive(Default)]
struct PeftAlphas {
    alpha: Option<f64>,
    /// Module-name suffix → alpha.
    pattern: Vec<(String, f64)>,
    rslora: bool,
}

impl PeftAlphas {
    fn from_metadata(metadata: &HashMap<String, String>) -> anyhow::Result<Self> {
        let Some(json) = metadata.get("lora_adapter_metadata") else {
            return Ok(Self::default());
        };
        let config: serde_json::Map<String, serde_json::Value> = serde_json::from_str(json)
            .context("metadata `lora_adapter_metadata` is not a JSON object")?;
        let get = |key: &str| config.get(&format!("unet.{key}")).or(config.get(key));
        let pattern = get("alpha_pattern")
            .and_then(|p| p.as_object())
            .map(|p| {
                p.iter()
                    .filter_map(|(k, v)| Some((k.clone(), v.as_f64()?)))
                    .collect()
            })
            .unwrap_or_default();
        Ok(Self {
            alpha: get("lora_alpha").and_then(|a| a.as_f64()),
            pattern,
            rslora: get("use_rslora").and_then(|r| r.as_bool()) == Some(true),
        })
    }

    fn alpha(&self, path: &str, rank: usize) -> f64 {
        self.pattern
            .iter()
            .find(|(suffix, _)| path.ends_with(suffix.as_str()))
            .map(|(_, a)| *a)
            .or(self.alpha)
            .unwrap_or(rank as f64)
    }
}
