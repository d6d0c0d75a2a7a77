//! Reading and writing the safetensors files adapters live in (native files and LoRAs).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::Context;
use candle_core::Tensor;

/// The bytes of the safetensors file at `path` (a `what`, for messages) and its metadata.
pub(super) fn read(path: &Path, what: &str) -> anyhow::Result<(Vec<u8>, HashMap<String, String>)> {
    let bytes =
        std::fs::read(path).with_context(|| format!("cannot read {what} {}", path.display()))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| anyhow::anyhow!("{}: not a safetensors file ({e:?})", path.display()))?;
    let metadata = header.metadata().clone().unwrap_or_default();
    Ok((bytes, metadata))
}

/// Writes `tensors` and `metadata` to `path` as a safetensors file, atomically.
pub(super) fn write(
    path: &Path,
    tensors: &BTreeMap<String, Tensor>,
    metadata: HashMap<String, String>,
) -> anyhow::Result<()> {
    crate::fs::atomically(path, |tmp| {
        Ok(safetensors::serialize_to_file(
            tensors,
            Some(metadata),
            tmp,
        )?)
    })
}
