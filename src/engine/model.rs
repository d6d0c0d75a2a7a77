//! Finding and loading a Stable Diffusion model in diffusers layout (a folder or the HF cache).

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use candle_core::{DType, Device};
use candle_nn::VarBuilder;

use super::clip_text::{self, ClipTextConfig, ClipTextModel};
use super::ddim::SchedulerConfig;
use super::tokenizer::ClipTokenizer;
use super::unet::{UNet, UNetConfig};
use super::vae::{self, AutoencoderKl, VaeConfig};
use super::weights::{Aliases, WeightFiles};

/// A diffusers model folder (`unet/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`).
#[derive(Debug, Clone)]
pub struct ModelSource {
    root: PathBuf,
}

impl ModelSource {
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

    pub fn tokenizer(&self) -> anyhow::Result<ClipTokenizer> {
        ClipTokenizer::from_dir(&self.component("tokenizer")?)
    }

    pub fn scheduler_config(&self) -> anyhow::Result<SchedulerConfig> {
        SchedulerConfig::load(&self.component("scheduler")?.join("scheduler_config.json"))
    }

    pub fn text_encoder(&self, device: &Device, dtype: DType) -> anyhow::Result<ClipTextModel> {
        let dir = self.component("text_encoder")?;
        let config = ClipTextConfig::load(&dir.join("config.json"))?;
        let vb = weights(&dir, "model", clip_text::WEIGHT_ALIASES, device, dtype)?;
        ClipTextModel::new(vb, &config).with_context(|| format!("loading {}", dir.display()))
    }

    pub fn unet(&self, device: &Device, dtype: DType) -> anyhow::Result<UNet> {
        let dir = self.component("unet")?;
        let config = UNetConfig::load(&dir.join("config.json"))?;
        let vb = weights(&dir, "diffusion_pytorch_model", &[], device, dtype)?;
        UNet::new(vb, &config).with_context(|| format!("loading {}", dir.display()))
    }

    pub fn vae(&self, device: &Device, dtype: DType) -> anyhow::Result<AutoencoderKl> {
        let dir = self.component("vae")?;
        let config = VaeConfig::load(&dir.join("config.json"))?;
        let vb = weights(
            &dir,
            "diffusion_pytorch_model",
            vae::WEIGHT_ALIASES,
            device,
            dtype,
        )?;
        AutoencoderKl::new(vb, &config).with_context(|| format!("loading {}", dir.display()))
    }
}

/// The weight files of a component: `{stem}.safetensors`, else the `.fp16` variant, each either
/// whole or sharded with an `.index.json`.
pub fn weight_files(dir: &Path, stem: &str) -> anyhow::Result<Vec<PathBuf>> {
    for variant in ["", ".fp16"] {
        let single = dir.join(format!("{stem}{variant}.safetensors"));
        if single.is_file() {
            return Ok(vec![single]);
        }
        let index = dir.join(format!("{stem}{variant}.safetensors.index.json"));
        if index.is_file() {
            return sharded_files(&index);
        }
    }
    let pickle = dir.join(format!("{stem}.bin"));
    if pickle.is_file() {
        bail!(
            "{}: only .safetensors weights are supported; convert this PyTorch pickle to safetensors first",
            pickle.display()
        );
    }
    bail!(
        "{}: no weights found (expected {stem}.safetensors or {stem}.fp16.safetensors)",
        dir.display()
    )
}

fn sharded_files(index: &Path) -> anyhow::Result<Vec<PathBuf>> {
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: std::collections::BTreeMap<String, String>,
    }
    let parsed: Index = super::config::read_json(index)?;
    let dir = index.parent().expect("index has a parent");
    let mut files: Vec<PathBuf> = parsed.weight_map.values().map(|f| dir.join(f)).collect();
    files.sort();
    files.dedup();
    Ok(files)
}

fn weights(
    dir: &Path,
    stem: &str,
    aliases: Aliases,
    device: &Device,
    dtype: DType,
) -> anyhow::Result<VarBuilder<'static>> {
    let files = weight_files(dir, stem)?;
    Ok(WeightFiles::open(&files, aliases)?.into_var_builder(dtype, device))
}

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

/// Every component of a model, loaded on one device in one dtype.
pub struct StableDiffusion {
    pub source: ModelSource,
    pub tokenizer: ClipTokenizer,
    pub text_encoder: ClipTextModel,
    pub unet: UNet,
    pub vae: AutoencoderKl,
    /// The scheduler config with the pipeline's corrections applied (see `for_sd_pipeline`).
    pub scheduler: SchedulerConfig,
    pub device: Device,
    pub dtype: DType,
}

impl StableDiffusion {
    pub fn load(source: &ModelSource, device: &Device, dtype: DType) -> anyhow::Result<Self> {
        Ok(Self {
            source: source.clone(),
            tokenizer: source.tokenizer()?,
            text_encoder: source.text_encoder(device, dtype)?,
            unet: source.unet(device, dtype)?,
            vae: source.vae(device, dtype)?,
            scheduler: source.scheduler_config()?.for_sd_pipeline(),
            device: device.clone(),
            dtype,
        })
    }

    /// The image size (height, width) in pixels the UNet was trained at, if its config says.
    pub fn native_size(&self) -> Option<(usize, usize)> {
        let f = self.vae.config().downscale();
        self.unet.config().sample_size.map(|(h, w)| (h * f, w * f))
    }
}
