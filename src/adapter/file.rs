//! The native adapter file: one safetensors file with every adapter variable under its name and,
//! in the metadata, the format tag, the adapter config, the cross-attention layer paths it was
//! made for and its [`AdapterInfo`] (base model, concept, method, training and evaluation), so
//! loading into a different model fails with a message that names the right one.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::{Context, bail};
use candle_core::{DType, Device, Tensor};

use super::info::{self, AdapterInfo, BaseModel};
use super::{AdapterConfig, ErasureAdapter};
use crate::engine::StableDiffusion;
use crate::engine::models::unet::UNet;

const FORMAT_KEY: &str = "format";
const FORMAT: &str = "erasure-studio-adapter/2";
/// Files of the first version lack the [`AdapterInfo`] keys; they load all the same.
const FORMATS_READ: [&str; 2] = ["erasure-studio-adapter/1", FORMAT];
const CONFIG_KEY: &str = "adapter_config";
const LAYERS_KEY: &str = "cross_attn_layers";
const BASE_MODEL_KEY: &str = "base_model";
const CONCEPT_KEY: &str = "concept";
const PRESET_KEY: &str = "preset";
const METHOD_KEY: &str = "method";
const TRAINING_KEY: &str = "training";
const EVALUATION_KEY: &str = "evaluation";

/// `info` as metadata entries: strings as they are, the rest as JSON.
fn info_entries(info: &AdapterInfo) -> anyhow::Result<Vec<(String, String)>> {
    let json = |v: &Option<serde_json::Value>| v.as_ref().map(|v| v.to_string());
    let entries = [
        (
            BASE_MODEL_KEY,
            info.base_model
                .as_ref()
                .map(serde_json::to_string)
                .transpose()?,
        ),
        (CONCEPT_KEY, info.concept.clone()),
        (PRESET_KEY, info.preset.clone()),
        (METHOD_KEY, info.method.clone()),
        (TRAINING_KEY, json(&info.training)),
        (EVALUATION_KEY, json(&info.evaluation)),
    ];
    Ok(entries
        .into_iter()
        .filter_map(|(k, v)| Some((k.to_string(), v?)))
        .collect())
}

fn info_from(metadata: &HashMap<String, String>, path: &Path) -> anyhow::Result<AdapterInfo> {
    let json = |key: &str| -> anyhow::Result<Option<serde_json::Value>> {
        metadata
            .get(key)
            .map(|v| serde_json::from_str(v))
            .transpose()
            .with_context(|| format!("{}: metadata `{key}` is not JSON", path.display()))
    };
    let base_model: Option<BaseModel> = metadata
        .get(BASE_MODEL_KEY)
        .map(|v| serde_json::from_str(v))
        .transpose()
        .with_context(|| format!("{}: metadata `{BASE_MODEL_KEY}`", path.display()))?;
    Ok(AdapterInfo {
        base_model,
        concept: metadata.get(CONCEPT_KEY).cloned(),
        preset: metadata.get(PRESET_KEY).cloned(),
        method: metadata.get(METHOD_KEY).cloned(),
        training: json(TRAINING_KEY)?,
        evaluation: json(EVALUATION_KEY)?,
    })
}

fn layer_paths(unet: &UNet) -> Vec<String> {
    unet.cross_attn_layers()
        .into_iter()
        .map(|l| l.path.clone())
        .collect()
}

/// The metadata of a safetensors file, read from its header alone.
fn read_metadata(path: &Path) -> anyhow::Result<HashMap<String, String>> {
    use std::io::Read;
    let mut file = std::fs::File::open(path)
        .with_context(|| format!("cannot read adapter file {}", path.display()))?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len)
        .with_context(|| format!("{}: not a safetensors file (too short)", path.display()))?;
    let len = u64::from_le_bytes(len);
    if len > 100 << 20 {
        bail!(
            "{}: not a safetensors file (header of {len} bytes)",
            path.display()
        );
    }
    let mut header = vec![0u8; len as usize];
    file.read_exact(&mut header).with_context(|| {
        format!(
            "{}: not a safetensors file (header cut short)",
            path.display()
        )
    })?;
    let header: serde_json::Value = serde_json::from_slice(&header).with_context(|| {
        format!(
            "{}: not a safetensors file (header is not JSON)",
            path.display()
        )
    })?;
    Ok(header
        .get("__metadata__")
        .and_then(|m| serde_json::from_value(m.clone()).ok())
        .unwrap_or_default())
}

impl ErasureAdapter {
    /// Whether `path` is an adapter file written by [`save`](Self::save) (rather than a LoRA).
    pub fn is_native_file(path: &Path) -> anyhow::Result<bool> {
        Ok(read_metadata(path)?
            .get(FORMAT_KEY)
            .is_some_and(|f| FORMATS_READ.contains(&f.as_str())))
    }

    /// What the native adapter file at `path` records about itself.
    pub fn read_info(path: &Path) -> anyhow::Result<AdapterInfo> {
        info_from(&read_metadata(path)?, path)
    }

    /// Writes the adapter, trained on `sd`, to `path` atomically, with `info` (whose base model
    /// is filled in from `sd`).
    pub fn save(
        &self,
        path: &Path,
        sd: &StableDiffusion,
        info: &AdapterInfo,
    ) -> anyhow::Result<()> {
        let unet = &sd.unet;
        let info = AdapterInfo {
            base_model: Some(BaseModel::of(unet, sd.source.root())?),
            ..info.clone()
        };
        let tensors: BTreeMap<String, Tensor> = self
            .vars()
            .data()
            .lock()
            .expect("var map lock")
            .iter()
            .map(|(name, var)| Ok((name.clone(), var.as_tensor().to_device(&Device::Cpu)?)))
            .collect::<candle_core::Result<_>>()?;
        let mut metadata = HashMap::from([
            (FORMAT_KEY.to_string(), FORMAT.to_string()),
            (
                CONFIG_KEY.to_string(),
                serde_json::to_string(self.config())?,
            ),
            (
                LAYERS_KEY.to_string(),
                serde_json::to_string(&layer_paths(unet))?,
            ),
        ]);
        metadata.extend(info_entries(&info)?);
        super::io::write(path, &tensors, metadata)
    }

    /// Reads an adapter written by [`save`](Self::save) for `unet`.
    pub fn load(path: &Path, unet: &UNet, dtype: DType, device: &Device) -> anyhow::Result<Self> {
        let (bytes, metadata) = super::io::read(path, "adapter file")?;
        if !metadata
            .get(FORMAT_KEY)
            .is_some_and(|f| FORMATS_READ.contains(&f.as_str()))
        {
            bail!(
                "{}: not an Erasure Studio adapter (metadata `{FORMAT_KEY}` is not `{FORMAT}`); \
                 a kohya or PEFT LoRA can be applied in generation but not trained further",
                path.display()
            );
        }
        let field = |key: &str| {
            metadata
                .get(key)
                .with_context(|| format!("{}: metadata `{key}` is missing", path.display()))
        };
        let config: AdapterConfig = serde_json::from_str(field(CONFIG_KEY)?)
            .with_context(|| format!("{}: metadata `{CONFIG_KEY}`", path.display()))?;
        let layers: Vec<String> = serde_json::from_str(field(LAYERS_KEY)?)
            .with_context(|| format!("{}: metadata `{LAYERS_KEY}`", path.display()))?;
        let info = info_from(&metadata, path)?;
        let belongs_to = info.base_model.as_ref().map_or(String::new(), |b| {
            format!(" it belongs to {} (a {} model).", b.name, b.family)
        });
        if let Some(base) = &info.base_model {
            let family = info::family(unet);
            if base.family != family {
                bail!(
                    "{}: this adapter was trained on {} (a {} model) and the loaded model is a \
                     {family} model; load {} to use it",
                    path.display(),
                    base.name,
                    base.family,
                    base.name
                );
            }
        }
        if layers != layer_paths(unet) {
            bail!(
                "{}: the adapter was made for a UNet with {} cross-attention layers ({}…); \
                 this model has {};{belongs_to} Load it with the model it was trained on",
                path.display(),
                layers.len(),
                layers.first().map_or("", String::as_str),
                unet.cross_attn_layers().len()
            );
        }
        let mut adapter = Self::new(unet, config, 0, dtype, device)?;
        adapter.info = info;
        let saved = candle_core::safetensors::load_buffer(&bytes, device)?;
        for (name, var) in adapter.vars().data().lock().expect("var map lock").iter() {
            let tensor = saved
                .get(name)
                .with_context(|| format!("{}: tensor `{name}` is missing", path.display()))?;
            if tensor.shape() != var.shape() {
                bail!(
                    "{}: `{name}` has shape {:?}, the model needs {:?};{belongs_to}",
                    path.display(),
                    tensor.dims(),
                    var.dims()
                );
            }
            var.set(&tensor.to_dtype(dtype)?)?;
        }
        Ok(adapter)
    }
}
