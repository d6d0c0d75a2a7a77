//! `erasure-studio bench`: engine timings at Stable Diffusion 1.5 size with random weights made
//! in memory. `bench/torch_reference.py` times the same cases with PyTorch + diffusers, so the
//! two can be compared on one machine in one session. The `demo_*` cases time the demo model's
//! sizes (the last one the shipped model itself).

use std::time::Instant;

use anyhow::{Context, bail};
use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};

use crate::adapter::{AdapterConfig, ErasureAdapter};
use crate::demo_world::architecture;
use crate::engine::diffusion::pipeline::{GenerateRequest, SampleHooks, Sampling, txt2img};
use crate::engine::models::clip::text::{ClipTextConfig, ClipTextModel};
use crate::engine::models::unet::config::UNetConfigFile;
use crate::engine::models::unet::{UNet, UNetConfig};
use crate::engine::models::vae::{AutoencoderKl, VaeConfig};
use crate::engine::{ModelSource, StableDiffusion};
use crate::erasure::setup::Scorers;
use crate::erasure::{preset, session};

/// Every case, in the order they run.
pub const CASES: &[&str] = &[
    "text_encoder_b2",
    "unet_fwd_32_b2",
    "unet_fwd_64_b2",
    "unet_train_frozen_32_b1",
    "unet_train_frozen_64_b1",
    "vae_decode_32_b1",
    "vae_decode_64_b1",
    "demo_unet_fwd_b8",
    "demo_vae_decode_b4",
    "demo_txt2img_b4",
    "ddpo_epoch_demo",
];

const SD15_UNET: &str = r#"{"block_out_channels": [320, 640, 1280, 1280], "cross_attention_dim": 768,
  "attention_head_dim": 8, "layers_per_block": 2, "norm_num_groups": 32}"#;
const SD15_VAE: &str = r#"{"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2,
  "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
  "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
  "latent_channels": 4, "norm_num_groups": 32}"#;
const VIT_L_TEXT: &str = r#"{"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072,
  "num_hidden_layers": 12, "num_attention_heads": 12, "hidden_act": "quick_gelu"}"#;

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct BenchResult {
    pub name: String,
    pub median_s: f64,
    pub peak_rss_mib: f64,
    /// Timed runs the median was taken over.
    pub runs: usize,
}

/// How long a case is timed: at least `repeats` runs, and more until the timed runs add up to
/// `min_seconds`, so a case of a few milliseconds gets enough runs for a stable median.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    pub repeats: usize,
    pub min_seconds: f64,
}

/// Random weights as plain tensors, like weights loaded from a file: no gradient tracking, so a
/// forward pass frees its activations as it goes.
struct RandomWeights;

impl SimpleBackend for RandomWeights {
    fn get(&self, shape: Shape, _: &str, init: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        Ok(init.var(shape, dtype, dev)?.as_tensor().detach())
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> Result<Tensor> {
        candle_core::bail!("random weights need a shape for `{name}`")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

/// Runs one case after a warm-up as often as `timing` asks; the median wall time. A case whose
/// runs have parts worth seeing (a DDPO epoch's phases) tells `say` about each run.
pub fn run_case(
    name: &str,
    timing: Timing,
    device: &Device,
    say: &dyn Fn(&str),
) -> anyhow::Result<BenchResult> {
    let vb = VarBuilder::from_backend(Box::new(RandomWeights), DType::F32, device.clone());
    let time = |job: &mut dyn FnMut() -> anyhow::Result<()>| measure(name, timing, device, job);
    match name {
        "text_encoder_b2" => {
            let cfg: ClipTextConfig = serde_json::from_str(VIT_L_TEXT)?;
            let model = ClipTextModel::new(vb, &cfg)?;
            let ids = Tensor::zeros((2, 77), DType::U32, device)?;
            time(&mut || {
                model.forward(&ids)?;
                Ok(())
            })
        }
        "unet_fwd_32_b2"
        | "unet_fwd_64_b2"
        | "unet_train_frozen_32_b1"
        | "unet_train_frozen_64_b1" => {
            let file: UNetConfigFile = serde_json::from_str(SD15_UNET)?;
            let unet = UNet::new(vb, &UNetConfig::from_file(&file)?)?;
            let (side, batch) = match name {
                "unet_fwd_32_b2" => (32, 2),
                "unet_fwd_64_b2" => (64, 2),
                "unet_train_frozen_32_b1" => (32, 1),
                _ => (64, 1),
            };
            let sample = Tensor::randn(0f32, 1.0, (batch, 4, side, side), device)?;
            let context = Tensor::randn(0f32, 1.0, (batch, 77, 768), device)?;
            let t = Tensor::full(500u32, batch, device)?;
            if name.starts_with("unet_train") {
                // The trainer's step: the base frozen, gradients only for an erasure adapter on
                // every cross-attention layer.
                let adapter =
                    ErasureAdapter::new(&unet, AdapterConfig::default(), 0, DType::F32, device)?;
                time(&mut || {
                    let out = unet.forward(&sample, &t, &context, Some(&adapter))?;
                    out.sqr()?.mean_all()?.backward()?;
                    Ok(())
                })
            } else {
                time(&mut || {
                    unet.forward(&sample, &t, &context, None)?;
                    Ok(())
                })
            }
        }
        "vae_decode_32_b1" | "vae_decode_64_b1" => {
            let cfg: VaeConfig = serde_json::from_str(SD15_VAE)?;
            let vae = AutoencoderKl::new(vb, &cfg)?;
            let side = if name.ends_with("32_b1") { 32 } else { 64 };
            let latents = Tensor::randn(0f32, 1.0, (1, 4, side, side), device)?;
            time(&mut || {
                vae.decode(&latents)?;
                Ok(())
            })
        }
        // One guided step of four demo images, and their decoding.
        "demo_unet_fwd_b8" => {
            let unet = UNet::new(vb, &architecture::parsed_unet()?)?;
            let side = architecture::LATENT_SIZE;
            let sample = Tensor::randn(0f32, 1.0, (8, 4, side, side), device)?;
            let context = Tensor::randn(
                0f32,
                1.0,
                (8, architecture::TOKEN_LENGTH, architecture::TEXT_WIDTH),
                device,
            )?;
            let t = Tensor::full(500u32, 8, device)?;
            time(&mut || {
                unet.forward(&sample, &t, &context, None)?;
                Ok(())
            })
        }
        "demo_vae_decode_b4" => {
            let vae = AutoencoderKl::new(vb, &architecture::parsed_vae(1.0)?)?;
            let side = architecture::LATENT_SIZE;
            let latents = Tensor::randn(0f32, 1.0, (4, 4, side, side), device)?;
            time(&mut || {
                vae.decode(&latents)?;
                Ok(())
            })
        }
        // What a studio user waits for: four demo images, 25 guided steps, decoded.
        "demo_txt2img_b4" => {
            let sd = demo_model(device)?;
            let prompts = vec!["a red striped star on a black background".into(); 4];
            let req = GenerateRequest::new(prompts, (64, 64), Sampling::DEMO);
            time(&mut || {
                txt2img(&sd, &req, SampleHooks::default())?;
                Ok(())
            })
        }
        // One epoch of the demo-star erasure (sampling, scoring, PPO updates) with the preset's
        // settings; each timed run is the next epoch of one run.
        "ddpo_epoch_demo" => {
            let sd = demo_model(device)?;
            let preset = preset::find("demo-star")?;
            let (reward, _) = Scorers::new(sd.source.root(), device).reward(&preset)?;
            let mut trainer = session::new_trainer(&preset, &sd, &reward)?;
            time(&mut || {
                let m = trainer
                    .run_epoch(&|| false)?
                    .context("the epoch stopped without being asked to")?;
                say(&format!(
                    "epoch {}: sampling {:.2} s, reward {:.2} s, training {:.2} s",
                    m.epoch, m.seconds_sampling, m.seconds_reward, m.seconds_training
                ));
                Ok(())
            })
        }
        other => bail!("unknown bench case `{other}` (cases: {})", CASES.join(", ")),
    }
}

fn demo_model(device: &Device) -> anyhow::Result<StableDiffusion> {
    let source = ModelSource::named("demo")?;
    StableDiffusion::load(&source, device, DType::F32)
}

/// Runs `job` once to warm up, then times it as often as `timing` asks; the median wall time.
fn measure(
    name: &str,
    timing: Timing,
    device: &Device,
    job: &mut dyn FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<BenchResult> {
    job().with_context(|| format!("warm-up of {name}"))?;
    let mut times = Vec::with_capacity(timing.repeats);
    while times.len() < timing.repeats.max(1) || times.iter().sum::<f64>() < timing.min_seconds {
        let start = Instant::now();
        job()?;
        device.synchronize()?;
        times.push(start.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok(BenchResult {
        name: name.to_string(),
        median_s: times[times.len() / 2],
        peak_rss_mib: peak_rss_mib(),
        runs: times.len(),
    })
}

/// The process's peak resident set (VmHWM), in MiB; 0 where /proc is unavailable.
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}
