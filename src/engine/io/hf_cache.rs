//! The Hugging Face hub cache: its roots, and the snapshots of cached repos (nothing is ever
//! downloaded).

use std::path::PathBuf;

use anyhow::{Context, bail};

/// Hugging Face hub cache roots, in the order huggingface_hub itself checks them.
pub fn hf_cache_roots() -> Vec<PathBuf> {
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(p) = env("HF_HUB_CACHE").or_else(|| env("HUGGINGFACE_HUB_CACHE")) {
        return vec![p];
    }
    if let Some(home) = env("HF_HOME") {
        return vec![home.join("hub")];
    }
    let cache = env("XDG_CACHE_HOME").or_else(|| env("HOME").map(|h| h.join(".cache")));
    cache
        .map(|c| vec![c.join("huggingface").join("hub")])
        .unwrap_or_default()
}

/// The snapshot folder `refs/main` points at for `repo_id` (`org/name`), if it is cached.
pub fn hf_cache_snapshot(repo_id: &str) -> anyhow::Result<Option<PathBuf>> {
    hf_cache_snapshot_under(&hf_cache_roots(), repo_id)
}

/// Repo ids (`org/name`) of the diffusers pipelines (snapshots with a `model_index.json`) in
/// the Hugging Face caches under `roots`, sorted.
pub fn hf_cached_pipelines(roots: &[PathBuf]) -> Vec<String> {
    let mut found = Vec::new();
    for root in roots {
        let Ok(entries) = std::fs::read_dir(root) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(repo_id) = name
                .strip_prefix("models--")
                .map(|r| r.replacen("--", "/", 1))
            else {
                continue;
            };
            let is_pipeline = hf_cache_snapshot_under(std::slice::from_ref(root), &repo_id)
                .ok()
                .flatten()
                .is_some_and(|snapshot| snapshot.join("model_index.json").is_file());
            if is_pipeline {
                found.push(repo_id);
            }
        }
    }
    found.sort();
    found.dedup();
    found
}

/// `hf_cache_snapshot` with explicit cache roots.
pub fn hf_cache_snapshot_under(
    roots: &[PathBuf],
    repo_id: &str,
) -> anyhow::Result<Option<PathBuf>> {
    let parts: Vec<&str> = repo_id.split('/').collect();
    if parts.len() != 2 || parts.iter().any(|p| p.is_empty()) {
        return Ok(None);
    }
    for root in roots {
        let repo = root.join(format!("models--{}--{}", parts[0], parts[1]));
        if !repo.is_dir() {
            continue;
        }
        let refs = repo.join("refs").join("main");
        let hash = std::fs::read_to_string(&refs)
            .with_context(|| format!("{}: cached repo has no refs/main", repo.display()))?;
        let snapshot = repo.join("snapshots").join(hash.trim());
        if !snapshot.is_dir() {
            bail!(
                "{}: refs/main names snapshot {} which is missing; the cache is incomplete",
                repo.display(),
                hash.trim()
            );
        }
        return Ok(Some(snapshot));
    }
    Ok(None)
}
