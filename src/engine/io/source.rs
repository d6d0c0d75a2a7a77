//! Where a model comes from: a diffusers folder, a repo in the Hugging Face cache, or the
//! built-in demo model.

use std::path::{Path, PathBuf};

use anyhow::bail;

use super::hf_cache::{hf_cache_roots, hf_cache_snapshot};

/// A diffusers model folder (`unet/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`).
#[derive(Debug, Clone)]
pub struct ModelSource {
    root: PathBuf,
}

impl ModelSource {
    /// A model by name, as every command and preset names one: `demo` (the built-in demo
    /// model), a diffusers folder, or a repo id in the Hugging Face cache.
    pub fn named(spec: &str) -> anyhow::Result<Self> {
        match spec {
            "demo" => Self::folder(&demo_model_dir()?),
            spec => Self::resolve(spec),
        }
    }

    /// `spec` is a folder, or a Hugging Face repo id (`org/name`) found in the local cache.
    pub fn resolve(spec: &str) -> anyhow::Result<Self> {
        let path = Path::new(spec);
        if path.is_dir() {
            return Self::folder(path);
        }
        let looks_like_repo_id = spec.split('/').count() == 2
            && !spec.starts_with(['/', '.', '~'])
            && !spec.contains('\\');
        if !looks_like_repo_id {
            bail!("model folder {spec} not found");
        }
        if let Some(snapshot) = hf_cache_snapshot(spec)? {
            return Self::folder(&snapshot);
        }
        let roots: Vec<String> = hf_cache_roots()
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        bail!(
            "model `{spec}` not found: it is neither a folder nor a repo id in the Hugging Face cache (looked in {}). \
             Give a diffusers folder, or download the model with `huggingface-cli download {spec}` on a machine with internet access",
            roots.join(", ")
        )
    }

    pub fn folder(root: &Path) -> anyhow::Result<Self> {
        if !root.is_dir() {
            bail!("model folder {} not found", root.display());
        }
        Ok(Self {
            root: root.to_path_buf(),
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// A component's sub-folder; missing ones are an error that says what a model folder holds.
    pub fn component(&self, name: &str) -> anyhow::Result<PathBuf> {
        let dir = self.root.join(name);
        if !dir.is_dir() {
            bail!(
                "{}: no `{name}/` folder; a diffusers Stable Diffusion folder has unet/, vae/, text_encoder/, tokenizer/ and scheduler/",
                self.root.display()
            );
        }
        Ok(dir)
    }
}

/// Environment variable naming the demo model folder, overriding the search below.
pub const DEMO_MODEL_ENV: &str = "ERASURE_STUDIO_DEMO_MODEL";

/// The built-in demo model's folder: `$ERASURE_STUDIO_DEMO_MODEL`, else `assets/demo-model`
/// beside the executable or in the source tree it was built from.
pub fn demo_model_dir() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os(DEMO_MODEL_ENV) {
        let dir = PathBuf::from(dir);
        anyhow::ensure!(
            dir.join("model_index.json").is_file(),
            "{DEMO_MODEL_ENV}={} is not a model folder (no model_index.json)",
            dir.display()
        );
        return Ok(dir);
    }
    let beside_exe = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join("assets/demo-model")));
    let source_tree = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/assets/demo-model"));
    let candidates: Vec<PathBuf> = beside_exe.into_iter().chain([source_tree]).collect();
    candidates
        .iter()
        .find(|dir| dir.join("model_index.json").is_file())
        .cloned()
        .ok_or_else(|| {
            let looked: Vec<String> = candidates.iter().map(|p| p.display().to_string()).collect();
            anyhow::anyhow!(
                "the built-in demo model was not found (looked in {}); set {DEMO_MODEL_ENV} to its folder, \
                 or rebuild it with `erasure-studio demo-world train --out DIR`",
                looked.join(", ")
            )
        })
}
