//! What a native adapter file says about itself: the base model it was trained on (family, name
//! and a fingerprint of the weights it adapts), the concept and preset, the method, and
//! summaries of its training and evaluation.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::engine::models::unet::UNet;

/// The model an adapter was trained on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BaseModel {
    /// `sd1` (768-wide text context), `sd2` (1024) or `custom`; adapters never cross families.
    pub family: String,
    /// The model's name: a Hugging Face repo id, or its folder's name.
    pub name: String,
    /// FNV-1a hash of the cross-attention key and value weights, the ones the adapter adapts:
    /// equal for the same weights, different for a fine-tune of the same family.
    pub fingerprint: String,
}

impl BaseModel {
    /// `unet`, loaded from the model folder `root`.
    pub fn of(unet: &UNet, root: &Path) -> candle_core::Result<Self> {
        Ok(Self {
            family: family(unet).to_string(),
            name: model_name(root),
            fingerprint: fingerprint(unet)?,
        })
    }
}

/// The family of a UNet, from the width of the text context it attends to.
pub fn family(unet: &UNet) -> &'static str {
    match unet.cross_attn_layers().first().map(|l| l.context_dim) {
        Some(768) => "sd1",
        Some(1024) => "sd2",
        _ => "custom",
    }
}

/// A model folder's name: `org/name` for a snapshot in the Hugging Face cache
/// (`…/models--org--name/snapshots/<hash>`), else the folder's own name.
pub fn model_name(root: &Path) -> String {
    root.ancestors()
        .filter_map(|p| p.file_name()?.to_str())
        .find_map(|name| name.strip_prefix("models--"))
        .map(|repo| repo.replacen("--", "/", 1))
        .or_else(|| Some(root.file_name()?.to_string_lossy().into_owned()))
        .unwrap_or_else(|| root.display().to_string())
}

/// FNV-1a (64-bit) over the f32 little-endian bytes of every cross-attention layer's `to_k` and
/// `to_v` weights, in layer order, as 16 hex digits.
pub fn fingerprint(unet: &UNet) -> candle_core::Result<String> {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0100_0000_01b3;
    let mut hash = OFFSET;
    for layer in unet.cross_attn_layers() {
        for weight in [layer.to_k.weight()?, layer.to_v.weight()?] {
            let values: Vec<f32> = weight
                .to_dtype(candle_core::DType::F32)?
                .flatten_all()?
                .to_vec1()?;
            for byte in values.iter().flat_map(|v| v.to_le_bytes()) {
                hash = (hash ^ u64::from(byte)).wrapping_mul(PRIME);
            }
        }
    }
    Ok(format!("{hash:016x}"))
}

/// Everything a native adapter file records besides its tensors and config.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AdapterInfo {
    /// Filled in when the file is written; absent in files of format version 1.
    pub base_model: Option<BaseModel>,
    pub concept: Option<String>,
    pub preset: Option<String>,
    /// How it was trained, in words.
    pub method: Option<String>,
    /// A summary of the training run (epochs, time, reward at the start and the end).
    pub training: Option<serde_json::Value>,
    /// The evaluation's concept rates per prompt set, once `eval` has run.
    pub evaluation: Option<serde_json::Value>,
}
