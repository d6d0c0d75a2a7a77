//! Arguments several commands share, flattened into each.

use anyhow::{Context, bail};
use candle_core::{DType, Device};

/// `--device`: where the models run.
#[derive(clap::Args, Clone)]
pub struct DeviceArg {
    /// Compute device: `cpu`, or `cuda` / `cuda:N` in a build with the `cuda` feature.
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

impl DeviceArg {
    /// Opens the device; the error names the flag and what it accepts.
    pub fn open(&self) -> anyhow::Result<Device> {
        parse_device(&self.device).context("--device")
    }
}

/// `--device` and `--dtype`: where the models run and at which precision.
#[derive(clap::Args)]
pub struct PrecisionArgs {
    #[command(flatten)]
    pub device: DeviceArg,
    /// Weight and activation precision: f32, f16 or bf16 (half precision needs a GPU).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
}

impl PrecisionArgs {
    /// The device and a precision it supports.
    pub fn open(&self) -> anyhow::Result<(Device, DType)> {
        let device = self.device.open()?;
        let dtype = parse_dtype(&self.dtype).context("--dtype")?;
        if device.is_cpu() && dtype == DType::BF16 {
            bail!("bf16 is not supported on the CPU (candle's CPU convolutions lack it); use f32");
        }
        Ok((device, dtype))
    }
}

/// How many images an evaluation draws, when not the preset's.
#[derive(clap::Args)]
pub struct EvaluationSize {
    /// Seeds per prompt instead of the preset's.
    #[arg(long)]
    seeds_per_prompt: Option<usize>,
    /// At most this many prompts per set instead of the preset's.
    #[arg(long)]
    max_prompts: Option<usize>,
}

impl EvaluationSize {
    pub fn apply(&self, preset: &mut erasure_studio::erasure::preset::Preset) {
        if let Some(n) = self.seeds_per_prompt {
            preset.evaluation.seeds_per_prompt = n;
        }
        if let Some(n) = self.max_prompts {
            preset.evaluation.max_prompts = n;
        }
    }
}

fn parse_device(spec: &str) -> anyhow::Result<Device> {
    match spec {
        "cpu" => Ok(Device::Cpu),
        s if s == "cuda" || s.starts_with("cuda:") => {
            let ordinal = s.strip_prefix("cuda:").map_or(Ok(0), str::parse)?;
            Device::new_cuda(ordinal).with_context(|| {
                format!(
                    "cannot open {s}; CUDA needs a build with `--features cuda` and an NVIDIA GPU"
                )
            })
        }
        other => bail!("unknown device `{other}` (cpu, cuda, cuda:N)"),
    }
}

fn parse_dtype(spec: &str) -> anyhow::Result<DType> {
    match spec {
        "f32" => Ok(DType::F32),
        "f16" => Ok(DType::F16),
        "bf16" => Ok(DType::BF16),
        other => bail!("unknown dtype `{other}` (f32, f16, bf16)"),
    }
}
