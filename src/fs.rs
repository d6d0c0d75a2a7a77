//! File writes that never leave half a file behind.

use std::path::{Path, PathBuf};

use anyhow::Context;

/// Lets `write` fill a temporary file beside `path`, then renames it over `path`, so readers see
/// the old file or the whole new one, never a partial write.
pub fn atomically(
    path: &Path,
    write: impl FnOnce(&Path) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".partial");
    let tmp = PathBuf::from(tmp);
    write(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

/// Writes `bytes` to `path` atomically.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    atomically(path, |tmp| Ok(std::fs::write(tmp, bytes)?))
}
