//! A whole Stable Diffusion model: every component of a model source, loaded on one device in
//! one dtype.

use anyhow::Context;
use candle_core::{DType, Device};

use super::clip::text::{self, ClipTextConfig, ClipTextModel};
use super::tokenizer::ClipTokenizer;
use super::unet::{UNet, UNetConfig};
use super::vae::{self, AutoencoderKl, VaeConfig};
use crate::engine::ModelSource;
use crate::engine::diffusion::ddim::SchedulerConfig;
use crate::engine::io::weights::component_weights;

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

/// The components of a model source, each from its sub-folder.
impl ModelSource {
    pub fn tokenizer(&self) -> anyhow::Result<ClipTokenizer> {
        ClipTokenizer::from_dir(&self.component("tokenizer")?)
    }

    pub fn scheduler_config(&self) -> anyhow::Result<SchedulerConfig> {
        SchedulerConfig::load(&self.component("scheduler")?.join("scheduler_config.json"))
    }

    pub fn text_encoder(&self, device: &Device, dtype: DType) -> anyhow::Result<ClipTextModel> {
        let dir = self.component("text_encoder")?;
        let config = ClipTextConfig::load(&dir.join("config.json"))?;
        let vb = component_weights(&dir, "model", text::WEIGHT_ALIASES, device, dtype)?;
        ClipTextModel::new(vb, &config).with_context(|| format!("loading {}", dir.display()))
    }

    pub fn unet(&self, device: &Device, dtype: DType) -> anyhow::Result<UNet> {
        let dir = self.component("unet")?;
        let config = UNetConfig::load(&dir.join("config.json"))?;
        let vb = component_weights(&dir, "diffusion_pytorch_model", &[], device, dtype)?;
        UNet::new(vb, &config).with_context(|| format!("loading {}", dir.display()))
    }

    pub fn vae(&self, device: &Device, dtype: DType) -> anyhow::Result<AutoencoderKl> {
        let dir = self.component("vae")?;
        let config = VaeConfig::load(&dir.join("config.json"))?;
        let vb = component_weights(
            &dir,
            "diffusion_pytorch_model",
            vae::WEIGHT_ALIASES,
            device,
            dtype,
        )?;
        AutoencoderKl::new(vb, &config).with_context(|| format!("loading {}", dir.display()))
    }
}
