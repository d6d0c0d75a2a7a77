//! Sampling pipelines: txt2img and img2img with classifier-free guidance and DDIM.

use std::path::Path;

use anyhow::{Context, bail};
use candle_core::{DType, Result, Tensor};

use crate::engine::StableDiffusion;
use crate::engine::diffusion::ddim::Ddim;
use crate::engine::diffusion::noise::BatchNoise;
use crate::engine::models::clip::text::ids_tensor;
use crate::engine::models::unet::{UNet, UNetHook};

/// What to generate. Item `i` of the batch uses seed `seed + i`, so any image can be reproduced
/// alone.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub prompts: Vec<String>,
    pub negative_prompt: String,
    pub seed: u64,
    pub steps: usize,
    pub guidance_scale: f64,
    pub width: usize,
    pub height: usize,
    /// DDIM η: 0 is deterministic, 1 is DDPM-like.
    pub eta: f64,
}

impl GenerateRequest {
    /// `prompts` at `width`×`height` pixels, denoised as `sampling` says; seed 0, no negative
    /// prompt and deterministic (η = 0) until set otherwise.
    pub fn new(prompts: Vec<String>, (width, height): (usize, usize), sampling: Sampling) -> Self {
        Self {
            prompts,
            negative_prompt: String::new(),
            seed: 0,
            steps: sampling.steps,
            guidance_scale: sampling.guidance_scale,
            width,
            height,
            eta: 0.0,
        }
    }

    /// Image `i` uses `seed + i`.
    pub fn seed(self, seed: u64) -> Self {
        Self { seed, ..self }
    }

    pub fn negative(self, negative_prompt: impl Into<String>) -> Self {
        Self {
            negative_prompt: negative_prompt.into(),
            ..self
        }
    }

    pub fn eta(self, eta: f64) -> Self {
        Self { eta, ..self }
    }
}

/// How many DDIM steps an image takes and how strongly it is guided towards its prompt.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sampling {
    pub steps: usize,
    pub guidance_scale: f64,
}

impl Sampling {
    /// What the built-in demo model was measured at.
    pub const DEMO: Self = Self {
        steps: 25,
        guidance_scale: 5.0,
    };
    /// The usual settings for Stable Diffusion models.
    pub const STABLE_DIFFUSION: Self = Self {
        steps: 30,
        guidance_scale: 7.5,
    };

    /// The defaults for the model named `spec` (as `--model` and presets name models), when
    /// the user gives none.
    pub fn defaults_for(spec: &str) -> Self {
        if spec == "demo" {
            Self::DEMO
        } else {
            Self::STABLE_DIFFUSION
        }
    }
}

/// The requested size; else the init image's size (img2img), else the model's native size, as
/// diffusers' pipelines choose. Sizes without a request are rounded down to what the VAE allows.
pub fn output_size(
    sd: &StableDiffusion,
    width: Option<usize>,
    height: Option<usize>,
    init_image: Option<&Path>,
) -> anyhow::Result<(usize, usize)> {
    let f = sd.vae.config().downscale();
    let (default_w, default_h) = match (init_image, sd.native_size()) {
        (Some(path), _) => {
            let (w, h) = crate::images::image_size(path)?;
            (w / f * f, h / f * f)
        }
        (None, Some((h, w))) => (w, h),
        (None, None) if width.is_some() && height.is_some() => (0, 0),
        (None, None) => {
            bail!(
                "the model's unet/config.json gives no sample_size: give the image size \
                 (--width and --height)"
            )
        }
    };
    Ok((width.unwrap_or(default_w), height.unwrap_or(default_h)))
}

/// Text conditioning for a batch: `cond` [B, L, D] and, with guidance, `uncond` [B, L, D].
pub struct Conditioning {
    pub cond: Tensor,
    pub uncond: Option<Tensor>,
    pub guidance_scale: f64,
}

impl Conditioning {
    /// Encodes prompts and the negative prompt. Guidance applies only above 1, as in diffusers.
    pub fn encode(
        sd: &StableDiffusion,
        prompts: &[String],
        negative: &str,
        guidance_scale: f64,
    ) -> Result<Self> {
        let encode = |texts: Vec<&str>| -> Result<Tensor> {
            let ids: Vec<Vec<u32>> = texts.iter().map(|t| sd.tokenizer.encode(t)).collect();
            sd.text_encoder.forward(&ids_tensor(&ids, &sd.device)?)
        };
        let cond = encode(prompts.iter().map(String::as_str).collect())?;
        let uncond = (guidance_scale > 1.0)
            .then(|| encode(vec![negative; prompts.len()]))
            .transpose()?;
        Ok(Self {
            cond,
            uncond,
            guidance_scale,
        })
    }

    /// The conditioning of batch items `items` (a u32 index tensor).
    pub fn select(&self, items: &Tensor) -> Result<Self> {
        Ok(Self {
            cond: self.cond.index_select(items, 0)?,
            uncond: self
                .uncond
                .as_ref()
                .map(|u| u.index_select(items, 0))
                .transpose()?,
            guidance_scale: self.guidance_scale,
        })
    }

    /// The guided model output for latents `x` [B, …] at timestep `t`.
    pub fn predict(
        &self,
        unet: &UNet,
        x: &Tensor,
        t: usize,
        hook: Option<&dyn UNetHook>,
    ) -> Result<Tensor> {
        let model_dtype = self.cond.dtype();
        let out_dtype = x.dtype();
        let b = x.dim(0)?;
        let ts = Tensor::full(t as u32, b, x.device())?;
        let x_in = x.to_dtype(model_dtype)?;
        match &self.uncond {
            None => unet
                .forward(&x_in, &ts, &self.cond, hook)?
                .to_dtype(out_dtype),
            Some(uncond) => {
                let both = Tensor::cat(&[&x_in, &x_in], 0)?;
                let context = Tensor::cat(&[uncond, &self.cond], 0)?;
                let ts2 = Tensor::cat(&[&ts, &ts], 0)?;
                let out = unet
                    .forward(&both, &ts2, &context, hook)?
                    .to_dtype(out_dtype)?;
                let (u, c) = (out.narrow(0, 0, b)?, out.narrow(0, b, b)?);
                &u + ((c - &u)? * self.guidance_scale)?
            }
        }
    }
}

/// What a caller can plug into sampling: an adapter on the UNet and a progress callback.
#[derive(Default, Clone, Copy)]
pub struct SampleHooks<'a> {
    pub adapter: Option<&'a dyn UNetHook>,
    /// Called after each denoising step with (steps done, steps in all).
    pub on_step: Option<&'a dyn Fn(usize, usize)>,
}

/// DDIM sampling with a model, its conditioning and optional hooks.
pub struct Denoiser<'a> {
    pub unet: &'a UNet,
    pub ddim: &'a Ddim,
    pub conditioning: &'a Conditioning,
    /// DDIM η: 0 is deterministic, 1 is DDPM-like.
    pub eta: f64,
    pub hooks: SampleHooks<'a>,
}

impl Denoiser<'_> {
    /// Steps `latents` through `timesteps`; `noise` supplies the η > 0 step noise.
    pub fn run(
        &self,
        timesteps: &[usize],
        mut latents: Tensor,
        noise: &mut BatchNoise,
    ) -> Result<Tensor> {
        let item_shape = latents.dims()[1..].to_vec();
        for (i, &t) in timesteps.iter().enumerate() {
            let out = self
                .conditioning
                .predict(self.unet, &latents, t, self.hooks.adapter)?;
            let step_noise = (self.eta > 0.0)
                .then(|| noise.tensor(&item_shape, latents.device()))
                .transpose()?;
            latents = self
                .ddim
                .step(&out, t, &latents, self.eta, step_noise.as_ref())?
                .prev_sample;
            if let Some(on_step) = self.hooks.on_step {
                on_step(i + 1, timesteps.len());
            }
        }
        Ok(latents)
    }
}

/// The latent shape [C, h, w] of a `width`×`height` image for `sd`.
pub fn latent_shape(
    sd: &StableDiffusion,
    width: usize,
    height: usize,
) -> anyhow::Result<[usize; 3]> {
    let f = sd.vae.config().downscale();
    if width == 0 || height == 0 || width % f != 0 || height % f != 0 {
        bail!(
            "width and height must be positive multiples of {f} for this model, got {width}×{height}"
        );
    }
    Ok([sd.unet.config().in_channels, height / f, width / f])
}

/// Latents (as the UNet sees them) → images in [0, 1], [B, 3, H, W], f32.
pub fn decode_images(sd: &StableDiffusion, latents: &Tensor) -> Result<Tensor> {
    let z = sd.vae.unscale(&latents.to_dtype(sd.dtype)?)?;
    let image = sd.vae.decode(&z)?.to_dtype(DType::F32)?;
    ((image / 2.0)? + 0.5)?.clamp(0.0, 1.0)
}

/// Text to image: final latents and decoded images.
pub fn txt2img(
    sd: &StableDiffusion,
    req: &GenerateRequest,
    hooks: SampleHooks,
) -> anyhow::Result<(Tensor, Tensor)> {
    let shape = latent_shape(sd, req.width, req.height)?;
    let mut run = SamplingRun::new(sd, req)?;
    let latents = (run.noise.tensor(&shape, &sd.device)? * run.ddim.init_noise_sigma())?;
    let timesteps = run.ddim.timesteps().to_vec();
    run.finish(sd, req, hooks, &timesteps, latents)
}

/// Image to image: `init` [B, 3, H, W] in [0, 1] is encoded, noised to the timestep `strength`
/// selects, then denoised with the prompts (diffusers' `StableDiffusionImg2ImgPipeline`).
pub fn img2img(
    sd: &StableDiffusion,
    req: &GenerateRequest,
    init: &Tensor,
    strength: f64,
    hooks: SampleHooks,
) -> anyhow::Result<(Tensor, Tensor)> {
    if !(0.0..=1.0).contains(&strength) {
        bail!("strength must be in [0, 1], got {strength}");
    }
    latent_shape(sd, req.width, req.height)?;
    let mut run = SamplingRun::new(sd, req)?;
    let init_steps = ((req.steps as f64 * strength) as usize).min(req.steps);
    let timesteps = run.ddim.timesteps()[req.steps - init_steps..].to_vec();
    let Some(&first) = timesteps.first() else {
        bail!(
            "strength {strength} with {} steps leaves no denoising step; raise strength or steps",
            req.steps
        );
    };
    let image = ((init.to_dtype(sd.dtype)? * 2.0)? - 1.0)?;
    let posterior = sd.vae.encode(&image).context("encoding the init image")?;
    let item_shape = posterior.mean.dims()[1..].to_vec();
    let sample_noise = run.noise.tensor(&item_shape, &sd.device)?;
    let sampled = posterior.sample(&sample_noise.to_dtype(sd.dtype)?)?;
    let init_latents = sd.vae.scale(&sampled)?.to_dtype(DType::F32)?;
    let start_noise = run.noise.tensor(&item_shape, &sd.device)?;
    let latents = run.ddim.add_noise(&init_latents, &start_noise, first)?;
    run.finish(sd, req, hooks, &timesteps, latents)
}

/// What txt2img and img2img share: the scheduler, the encoded prompts and the seeded noise.
struct SamplingRun {
    ddim: Ddim,
    conditioning: Conditioning,
    noise: BatchNoise,
}

impl SamplingRun {
    fn new(sd: &StableDiffusion, req: &GenerateRequest) -> anyhow::Result<Self> {
        Ok(Self {
            ddim: Ddim::new(&sd.scheduler, req.steps)?,
            conditioning: Conditioning::encode(
                sd,
                &req.prompts,
                &req.negative_prompt,
                req.guidance_scale,
            )?,
            noise: BatchNoise::new(req.seed, req.prompts.len()),
        })
    }

    /// Denoises `latents` through `timesteps`, then decodes: (final latents, images).
    fn finish(
        mut self,
        sd: &StableDiffusion,
        req: &GenerateRequest,
        hooks: SampleHooks,
        timesteps: &[usize],
        latents: Tensor,
    ) -> anyhow::Result<(Tensor, Tensor)> {
        let denoiser = Denoiser {
            unet: &sd.unet,
            ddim: &self.ddim,
            conditioning: &self.conditioning,
            eta: req.eta,
            hooks,
        };
        let latents = denoiser.run(timesteps, latents, &mut self.noise)?;
        let images = decode_images(sd, &latents)?;
        Ok((latents, images))
    }
}
