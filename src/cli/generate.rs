//! `generate`: txt2img or img2img from a prompt, with any stack of adapters.

use std::path::PathBuf;
use std::time::Instant;

use erasure_studio::adapter::stack::{AdapterSpec, AdapterStack};
use erasure_studio::engine::diffusion::pipeline::{
    GenerateRequest, SampleHooks, Sampling, img2img, output_size, txt2img,
};
use erasure_studio::engine::{ModelSource, StableDiffusion};
use erasure_studio::images;

use super::args::PrecisionArgs;

#[derive(clap::Args)]
pub struct GenerateArgs {
    /// A diffusers model folder, a Hugging Face repo id found in the local cache, or `demo`
    /// (the built-in demo model, also the default).
    #[arg(long)]
    model: Option<String>,
    #[arg(long)]
    prompt: String,
    #[arg(long, default_value = "")]
    negative: String,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Denoising steps (default: 25 with the demo model, else 30).
    #[arg(long)]
    steps: Option<usize>,
    /// Classifier-free guidance scale (default: 5 with the demo model, else 7.5).
    #[arg(long)]
    guidance: Option<f64>,
    /// Image width in pixels (default: the init image's size, else the model's native size).
    #[arg(long)]
    width: Option<usize>,
    #[arg(long)]
    height: Option<usize>,
    /// Number of images; image i uses seed + i.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// DDIM η (0: deterministic).
    #[arg(long, default_value_t = 0.0)]
    eta: f64,
    /// Start from this image (img2img).
    #[arg(long)]
    init_image: Option<PathBuf>,
    /// How much of the init image to repaint, 0–1 (img2img).
    #[arg(long, default_value_t = 0.75)]
    strength: f64,
    /// An adapter to apply, `FILE[:strength]` (strength 1 by default): a native adapter or
    /// a kohya / PEFT LoRA. Repeat to stack several.
    #[arg(long = "adapter")]
    adapters: Vec<AdapterSpec>,
    /// Output PNG (the batch as a grid).
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    precision: PrecisionArgs,
}

pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let GenerateArgs {
        model,
        prompt,
        negative,
        seed,
        steps,
        guidance,
        width,
        height,
        batch,
        eta,
        init_image,
        strength,
        adapters,
        out,
        precision,
    } = args;
    let (dev, dtype) = precision.open()?;
    let started = Instant::now();
    let model = model.as_deref().unwrap_or("demo");
    let source = ModelSource::named(model)?;
    let sd = StableDiffusion::load(&source, &dev, dtype)?;
    let defaults = Sampling::defaults_for(model);
    let sampling = Sampling {
        steps: steps.unwrap_or(defaults.steps),
        guidance_scale: guidance.unwrap_or(defaults.guidance_scale),
    };
    eprintln!(
        "loaded {} in {:.1} s",
        source.root().display(),
        started.elapsed().as_secs_f64()
    );
    let stack = AdapterStack::load(&adapters, &sd.unet, dtype, &dev)?;
    for (spec, adapter) in adapters.iter().zip(&stack.adapters) {
        eprintln!("{}: {}", spec.path.display(), adapter.describe());
    }
    let (width, height) = output_size(&sd, width, height, init_image.as_deref())?;
    let req = GenerateRequest::new(vec![prompt; batch.max(1)], (width, height), sampling)
        .negative(negative)
        .seed(seed)
        .eta(eta);
    let progress = |done: usize, total: usize| eprint!("\rstep {done}/{total}");
    let hooks = SampleHooks {
        adapter: stack.as_hook(),
        on_step: Some(&progress),
    };
    let (_, imgs) = match init_image {
        Some(path) => {
            let init = images::load_image(&path, req.width, req.height, &dev)?.repeat((
                req.prompts.len(),
                1,
                1,
                1,
            ))?;
            img2img(&sd, &req, &init, strength, hooks)?
        }
        None => txt2img(&sd, &req, hooks)?,
    };
    let cols = (req.prompts.len() as f64).sqrt().ceil() as usize;
    images::save_png(&images::grid(&imgs, cols)?, &out)?;
    eprintln!();
    println!(
        "wrote {} ({:.1} s)",
        out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
