//! The component runner: `erasure-studio parity --model DIR --inputs IN --out OUT`.
//!
//! A stable contract shared with checks outside the test suite: for every group of inputs found
//! in IN it writes the matching outputs to OUT (see the README for the names).

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, bail};
use candle_core::{DType, Device, Tensor};

use crate::adapter::stack::{AdapterSpec, AdapterStack};
use crate::engine::ModelSource;
use crate::engine::diffusion::ddim::Ddim;
use crate::engine::diffusion::noise::BatchNoise;
use crate::engine::diffusion::pipeline::{Conditioning, Denoiser, SampleHooks};
use crate::engine::models::clip::ClipModel;
use crate::engine::models::unet::UNet;

/// Runs every input group present in `inputs` and writes the outputs atomically to `out`.
/// Returns the names of the written tensors.
/// `adapters` apply to every UNet evaluation (the `unet.*` and `pipeline.*` groups).
pub fn run(
    model: &ModelSource,
    inputs: &Path,
    out: &Path,
    adapters: &[AdapterSpec],
    device: &Device,
) -> anyhow::Result<Vec<String>> {
    let (tensors, metadata) = read_inputs(inputs)?;
    let get = |name: &str| -> anyhow::Result<Tensor> {
        tensors
            .get(name)
            .with_context(|| format!("{}: input `{name}` is missing", inputs.display()))?
            .to_device(device)
            .map_err(Into::into)
    };
    let has = |prefix: &str| tensors.keys().any(|k| k.starts_with(prefix));
    let mut outputs: HashMap<String, Tensor> = HashMap::new();

    if let Some(prompts) = metadata.get("prompts") {
        let prompts: Vec<String> = serde_json::from_str(prompts).with_context(|| {
            format!(
                "{}: metadata `prompts` must be a JSON array of strings",
                inputs.display()
            )
        })?;
        let tokenizer = model.tokenizer()?;
        let ids: Vec<i64> = prompts
            .iter()
            .flat_map(|p| tokenizer.encode(p))
            .map(i64::from)
            .collect();
        let n = prompts.len();
        outputs.insert(
            "tokenizer.input_ids".into(),
            Tensor::from_vec(ids, (n, tokenizer.max_length()), &Device::Cpu)?,
        );
    }
    let dtype = DType::F32;
    if has("text_encoder.") {
        let encoder = model.text_encoder(device, dtype)?;
        let hidden = encoder.forward(&get("text_encoder.input_ids")?)?;
        outputs.insert("text_encoder.last_hidden_state".into(), hidden);
    }
    // The UNet is loaded once, with the adapters, by whichever group needs it first.
    let unet_cell = std::cell::OnceCell::new();
    let unet = || -> anyhow::Result<&(UNet, AdapterStack)> {
        if let Some(loaded) = unet_cell.get() {
            return Ok(loaded);
        }
        let unet = model.unet(device, dtype)?;
        let stack = AdapterStack::load(adapters, &unet, dtype, device)?;
        Ok(unet_cell.get_or_init(|| (unet, stack)))
    };
    if has("unet.") {
        let (unet, stack) = unet()?;
        let out = unet.forward(
            &get("unet.sample")?.to_dtype(dtype)?,
            &get("unet.timesteps")?,
            &get("unet.encoder_hidden_states")?.to_dtype(dtype)?,
            stack.as_hook(),
        )?;
        outputs.insert("unet.out".into(), out);
    }
    if has("vae.") {
        let vae = model.vae(device, dtype)?;
        let latents = get("vae.latents")?.to_dtype(dtype)?;
        outputs.insert("vae.image".into(), vae.decode(&vae.unscale(&latents)?)?);
    }
    if has("pipeline.") {
        let encoder = model.text_encoder(device, dtype)?;
        let (unet, stack) = unet()?;
        let scheduler = model.scheduler_config()?.for_sd_pipeline();
        let steps = scalar(&get("pipeline.steps")?)? as usize;
        let guidance_scale = scalar(&get("pipeline.guidance_scale")?)?;
        let conditioning = Conditioning {
            cond: encoder.forward(&get("pipeline.input_ids")?)?,
            uncond: (guidance_scale > 1.0)
                .then(|| -> anyhow::Result<Tensor> {
                    Ok(encoder.forward(&get("pipeline.uncond_input_ids")?)?)
                })
                .transpose()?,
            guidance_scale,
        };
        let ddim = Ddim::new(&scheduler, steps)?;
        let init = (get("pipeline.init_latents")?.to_dtype(DType::F32)? * ddim.init_noise_sigma())?;
        // η = 0: deterministic, so the noise stream is never drawn from.
        let mut unused_noise = BatchNoise::new(0, init.dim(0)?);
        let denoiser = Denoiser {
            unet,
            ddim: &ddim,
            conditioning: &conditioning,
            eta: 0.0,
            hooks: SampleHooks {
                adapter: stack.as_hook(),
                on_step: None,
            },
        };
        let latents = denoiser.run(ddim.timesteps(), init, &mut unused_noise)?;
        outputs.insert("pipeline.latents".into(), latents);
    }
    if has("clip.") {
        let clip = ClipModel::load(model.root(), device, dtype)?;
        if tensors.contains_key("clip.pixel_values") {
            let pixels = get("clip.pixel_values")?.to_dtype(dtype)?;
            outputs.insert("clip.image_embeds".into(), clip.image_embeds(&pixels)?);
        }
        if tensors.contains_key("clip.input_ids") {
            let ids = get("clip.input_ids")?;
            outputs.insert("clip.text_embeds".into(), clip.text_embeds(&ids)?);
        }
    }
    if outputs.is_empty() {
        bail!(
            "{}: no input group found (expected metadata `prompts` or tensors named text_encoder.*, unet.*, vae.*, pipeline.*, clip.*)",
            inputs.display()
        );
    }
    let outputs: HashMap<String, Tensor> = outputs
        .into_iter()
        .map(|(k, v)| {
            let v = if v.dtype() == DType::I64 {
                v
            } else {
                v.to_dtype(DType::F32)?
            };
            Ok((k, v.to_device(&Device::Cpu)?))
        })
        .collect::<anyhow::Result<_>>()?;
    write_atomic(&outputs, out)?;
    let mut names: Vec<String> = outputs.into_keys().collect();
    names.sort();
    Ok(names)
}

fn scalar(t: &Tensor) -> anyhow::Result<f64> {
    t.to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1::<f64>()?
        .first()
        .copied()
        .context("empty scalar input")
}

/// ‖a − b‖ / ‖b‖ over all elements, computed in f64.
pub fn relative_l2(a: &Tensor, b: &Tensor) -> candle_core::Result<f64> {
    if a.dims() != b.dims() {
        candle_core::bail!("shapes differ: {:?} vs {:?}", a.dims(), b.dims());
    }
    let a = a.to_dtype(DType::F64)?;
    let b = b.to_dtype(DType::F64)?;
    let diff = (&a - &b)?.sqr()?.sum_all()?.to_scalar::<f64>()?;
    let norm = b.sqr()?.sum_all()?.to_scalar::<f64>()?;
    Ok((diff / norm.max(f64::MIN_POSITIVE)).sqrt())
}

type Inputs = (HashMap<String, Tensor>, HashMap<String, String>);

fn read_inputs(path: &Path) -> anyhow::Result<Inputs> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| anyhow::anyhow!("{}: not a valid safetensors file ({e:?})", path.display()))?;
    let metadata = meta.metadata().clone().unwrap_or_default();
    let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
        .with_context(|| format!("reading tensors of {}", path.display()))?;
    Ok((tensors, metadata))
}

/// Saves tensors atomically (see `fs::atomically`).
pub fn write_atomic(tensors: &HashMap<String, Tensor>, path: &Path) -> anyhow::Result<()> {
    crate::fs::atomically(path, |tmp| {
        Ok(candle_core::safetensors::save(tensors, tmp)?)
    })
}
