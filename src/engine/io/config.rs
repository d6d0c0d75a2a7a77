//! Reading diffusers / transformers `config.json` files.

use std::path::Path;

use anyhow::{Context, bail};
use serde::Deserialize;
use serde::de::DeserializeOwned;

/// Parses a JSON config; every error names the file. Unknown keys are ignored (configs carry
/// many keys that do not affect inference); unknown *values* of known keys are errors.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> anyhow::Result<T> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{}: invalid config", path.display()))
}

/// A config value that is either one value for every block or a list with one per block.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum PerBlock<T> {
    One(T),
    Each(Vec<T>),
}

impl<T: Clone> PerBlock<T> {
    /// One value per block; a list must have exactly `blocks` entries.
    pub fn per_block(&self, blocks: usize, field: &str) -> anyhow::Result<Vec<T>> {
        match self {
            PerBlock::One(v) => Ok(vec![v.clone(); blocks]),
            PerBlock::Each(list) if list.len() == blocks => Ok(list.clone()),
            PerBlock::Each(list) => bail!(
                "`{field}` has {} entries but the model has {blocks} blocks",
                list.len()
            ),
        }
    }
}

/// diffusers treats `swish` and `silu` as the same activation; nothing else is supported.
pub fn require_silu(field: &str, value: &str) -> anyhow::Result<()> {
    if value != "silu" && value != "swish" {
        bail!("`{field}` = {value:?} is not supported (only \"silu\" is)");
    }
    Ok(())
}

/// Fails with the field name when an option the engine does not implement is set.
pub fn require_default<T: PartialEq + std::fmt::Debug>(
    field: &str,
    value: &T,
    default: &T,
) -> anyhow::Result<()> {
    if value != default {
        bail!("`{field}` = {value:?} is not supported (only {default:?} is)");
    }
    Ok(())
}
