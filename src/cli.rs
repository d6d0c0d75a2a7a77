//! Command-line interface: every job headless.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, bail};
use candle_core::{DType, Device, Tensor};
use clap::{Parser, Subcommand};

use erasure_studio::adapter::stack::{AdapterSpec, AdapterStack};
use erasure_studio::bench;
use erasure_studio::demo_world::judge::{self, JudgeConfig};
use erasure_studio::demo_world::quality::{self, QualitySettings};
use erasure_studio::demo_world::recipe::{self, Recipe, format_accuracy};
use erasure_studio::demo_world::{Caption, Scene};
use erasure_studio::engine::model::{ModelSource, StableDiffusion};
use erasure_studio::engine::pipeline::{GenerateRequest, SampleHooks, img2img, txt2img};
use erasure_studio::erasure::setup;
use erasure_studio::images;
use erasure_studio::parity;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

#[derive(Parser)]
#[command(
    name = "erasure-studio",
    version,
    about = "Concept erasure for Stable Diffusion models",
    long_about = "Concept erasure for Stable Diffusion models. With no command, opens the studio \
                  window on the demo model (or the model of the last session)."
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Commands>,
}

#[derive(clap::Args)]
struct DeviceArgs {
    /// Compute device: `cpu`, or `cuda` / `cuda:N` in a build with the `cuda` feature.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Weight and activation precision: f32, f16 or bf16 (half precision needs a GPU).
    #[arg(long, default_value = "f32")]
    dtype: String,
}

#[derive(Subcommand)]
enum Commands {
    /// Open the studio window (the default with no command).
    Studio {
        /// Compute device: `cpu`, or `cuda` / `cuda:N` in a build with the `cuda` feature.
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// Generate images from a prompt (txt2img, or img2img with --init-image).
    Generate {
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
        device: DeviceArgs,
    },
    /// Run model components on fixed inputs (the parity contract; see README).
    Parity {
        #[arg(long)]
        model: String,
        #[arg(long)]
        inputs: PathBuf,
        #[arg(long)]
        out: PathBuf,
        /// An adapter applied to the UNet, `FILE[:strength]`; repeat to stack several.
        #[arg(long = "adapter")]
        adapters: Vec<AdapterSpec>,
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// The demo world: procedural images of coloured shapes.
    DemoWorld {
        #[command(subcommand)]
        command: DemoWorldCommand,
    },
    /// Train an erasure adapter from a preset into a run folder (or continue one).
    Erase(crate::erasure_cli::EraseArgs),
    /// Evaluate an erasure on held-out prompts and seeds: erasure rate and preservation.
    Eval(crate::erasure_cli::EvalArgs),
    /// Export a run's adapter: the native file, or a kohya / PEFT LoRA for other tools.
    Export(crate::erasure_cli::ExportArgs),
    /// Time the engine at SD-1.5 size with random weights.
    Bench {
        /// Print one JSON object per line.
        #[arg(long)]
        json: bool,
        /// Timed runs per case after one warm-up (at least).
        #[arg(long, default_value_t = 3)]
        repeats: usize,
        /// More timed runs until they add up to this many seconds, for short cases.
        #[arg(long, default_value_t = 2.0)]
        min_seconds: f64,
        /// Comma-separated case names (default: all).
        #[arg(long, value_delimiter = ',')]
        only: Vec<String>,
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Print the case names, one per line, and run nothing.
        #[arg(long)]
        list: bool,
    },
}

#[derive(Subcommand)]
enum DemoWorldCommand {
    /// Render random scenes of the world as a grid, and print their captions.
    Preview {
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long, default_value_t = 16)]
        count: usize,
        #[arg(long)]
        out: PathBuf,
    },
    /// Build the whole demo model from scratch into a diffusers folder (resumes when rerun).
    Train {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// A few steps per stage: checks the machinery in a minute, the model is useless.
        #[arg(long)]
        micro: bool,
    },
    /// Render a grid: one row per prompt, one column per seed.
    Sample {
        /// A prompt (repeat for more rows).
        #[arg(long = "prompt", required = true)]
        prompts: Vec<String>,
        /// Model folder (default: the built-in demo model).
        #[arg(long)]
        model: Option<String>,
        /// Images per prompt; column j uses seed + j.
        #[arg(long, default_value_t = 4)]
        per_prompt: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[arg(long, default_value_t = 25)]
        steps: usize,
        #[arg(long, default_value_t = 5.0)]
        guidance: f64,
        #[arg(long)]
        out: PathBuf,
    },
    /// Measure a demo model with the judge: every attribute combination, held-out seeds.
    Evaluate {
        /// Model folder (default: the built-in demo model).
        #[arg(long)]
        model: Option<String>,
        /// Judge folder (default: `judge/` in the model folder).
        #[arg(long)]
        judge: Option<PathBuf>,
        /// Images per combination (360 combinations).
        #[arg(long, default_value_t = 2)]
        per_combination: usize,
        /// Also write the report here as JSON.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Train the judge (attribute classifier) on the generator and report its accuracy.
    TrainJudge {
        #[arg(long, default_value_t = 1500)]
        steps: usize,
        #[arg(long, default_value_t = 32)]
        batch: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Folder for config.json and model.safetensors.
        #[arg(long)]
        out: PathBuf,
    },
}

pub fn run() -> anyhow::Result<()> {
    let command = Cli::parse().command.unwrap_or(Commands::Studio {
        device: "cpu".into(),
    });
    match command {
        // The window stays on the main thread; its worker runs each job on the pool.
        Commands::Studio { device } => erasure_studio::studio::app::run(parse_device(&device)?),
        command => erasure_studio::threads::on_pool(|| run_command(command)),
    }
}

/// Every command but the studio's.
fn run_command(command: Commands) -> anyhow::Result<()> {
    match command {
        Commands::Studio { .. } => unreachable!("the studio runs on the main thread"),
        Commands::Generate {
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
            device,
        } => {
            let (dev, dtype) = (parse_device(&device.device)?, parse_dtype(&device.dtype)?);
            if dev.is_cpu() && dtype == DType::BF16 {
                bail!(
                    "bf16 is not supported on the CPU (candle's CPU convolutions lack it); use f32"
                );
            }
            let started = Instant::now();
            let demo = matches!(model.as_deref(), None | Some("demo"));
            let source = resolve_model(model.as_deref())?;
            let sd = StableDiffusion::load(&source, &dev, dtype)?;
            // The demo model was measured at 25 steps and guidance 5; SD models at the usual 30 / 7.5.
            let steps = steps.unwrap_or(if demo { 25 } else { 30 });
            let guidance = guidance.unwrap_or(if demo { 5.0 } else { 7.5 });
            eprintln!(
                "loaded {} in {:.1} s",
                source.root().display(),
                started.elapsed().as_secs_f64()
            );
            let stack = AdapterStack::load(&adapters, &sd.unet, dtype, &dev)?;
            for (spec, adapter) in adapters.iter().zip(&stack.adapters) {
                eprintln!("{}: {}", spec.path.display(), adapter.describe());
            }
            let (width, height) = image_size(&sd, width, height, init_image.as_deref())?;
            let req = GenerateRequest {
                prompts: vec![prompt; batch.max(1)],
                negative_prompt: negative,
                seed,
                steps,
                guidance_scale: guidance,
                width,
                height,
                eta,
            };
            let progress = |done: usize, total: usize| eprint!("\rstep {done}/{total}");
            let hooks = SampleHooks {
                adapter: stack.as_hook(),
                on_step: Some(&progress),
            };
            let (_, imgs) =
                match init_image {
                    Some(path) => {
                        let init = images::load_image(&path, req.width, req.height, &dev)?
                            .repeat((req.prompts.len(), 1, 1, 1))?;
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
        }
        Commands::Erase(args) => {
            let device = parse_device(&args.device)?;
            crate::erasure_cli::erase(args, &device)?
        }
        Commands::Eval(args) => {
            let device = parse_device(&args.device)?;
            crate::erasure_cli::eval(args, &device)?
        }
        Commands::Export(args) => {
            let device = parse_device(&args.device)?;
            crate::erasure_cli::export(args, &device)?
        }
        Commands::DemoWorld {
            command: DemoWorldCommand::Preview { seed, count, out },
        } => {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let scenes: Vec<Scene> = (0..count.max(1)).map(|_| Scene::sample(&mut rng)).collect();
            for (i, scene) in scenes.iter().enumerate() {
                println!("{i:>3}: {}", Caption::sample(scene, &mut rng).text);
            }
            let cols = (scenes.len() as f64).sqrt().ceil() as usize;
            images::save_png(&images::scene_grid(&scenes, cols), &out)?;
            println!("wrote {}", out.display());
        }
        Commands::DemoWorld {
            command:
                DemoWorldCommand::Sample {
                    prompts,
                    model,
                    per_prompt,
                    seed,
                    steps,
                    guidance,
                    out,
                },
        } => {
            let sd =
                StableDiffusion::load(&resolve_model(model.as_deref())?, &Device::Cpu, DType::F32)?;
            let (width, height) = image_size(&sd, None, None, None)?;
            let per_prompt = per_prompt.max(1);
            let mut rows = Vec::new();
            for prompt in &prompts {
                let req = GenerateRequest {
                    prompts: vec![prompt.clone(); per_prompt],
                    negative_prompt: String::new(),
                    seed,
                    steps,
                    guidance_scale: guidance,
                    width,
                    height,
                    eta: 0.0,
                };
                rows.push(txt2img(&sd, &req, SampleHooks::default())?.1);
                eprintln!("{prompt}");
            }
            images::save_png(&images::grid(&Tensor::cat(&rows, 0)?, per_prompt)?, &out)?;
            println!("wrote {}", out.display());
        }
        Commands::DemoWorld {
            command:
                DemoWorldCommand::Evaluate {
                    model,
                    judge,
                    per_combination,
                    out,
                },
        } => {
            let source = resolve_model(model.as_deref())?;
            let sd = StableDiffusion::load(&source, &Device::Cpu, DType::F32)?;
            let judge_dir = judge.unwrap_or_else(|| source.root().join("judge"));
            let judge = judge::Judge::load(&judge_dir, &Device::Cpu)?;
            let settings = QualitySettings {
                per_combination,
                ..Default::default()
            };
            let report = quality::measure(&sd, &judge, &settings, |done, total| {
                eprint!("\rgenerated and judged {done}/{total}")
            })?;
            eprintln!();
            println!(
                "{} images ({} steps, guidance {}): {}; all four right {:.1} %",
                report.images,
                settings.steps,
                settings.guidance_scale,
                format_accuracy(&report.generated),
                100.0 * report.all_correct
            );
            println!(
                "judge on 1024 generator images: {}",
                format_accuracy(&report.judge_on_generator)
            );
            if let Some(out) = out {
                erasure_studio::fs::write_atomic(
                    &out,
                    serde_json::to_string_pretty(&report)?.as_bytes(),
                )?;
            }
        }
        Commands::DemoWorld {
            command: DemoWorldCommand::Train { out, seed, micro },
        } => {
            let started = Instant::now();
            let recipe = if micro {
                Recipe::micro(seed)
            } else {
                Recipe::standard(seed)
            };
            let log = recipe::build(&recipe, &out, &Device::Cpu)?;
            for (name, stage) in &log.stages {
                eprintln!(
                    "{name}: {:.0} s, final loss {:?}, {:?}",
                    stage.seconds, stage.final_loss, stage.figures
                );
            }
            println!(
                "wrote the demo model to {} ({:.0} s in this run)",
                out.display(),
                started.elapsed().as_secs_f64()
            );
        }
        Commands::DemoWorld {
            command:
                DemoWorldCommand::TrainJudge {
                    steps,
                    batch,
                    seed,
                    out,
                },
        } => {
            let started = Instant::now();
            let config = JudgeConfig::default();
            let (judge, vars) =
                judge::train(&config, steps, batch, seed, &Device::Cpu, |step, loss| {
                    if step % 50 == 0 || step + 1 == steps {
                        eprintln!(
                            "step {step:>5}/{steps}  loss {loss:.4}  {:.0} s",
                            started.elapsed().as_secs_f64()
                        );
                    }
                })?;
            std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            erasure_studio::fs::write_atomic(
                &out.join("config.json"),
                serde_json::to_string_pretty(&config)?.as_bytes(),
            )?;
            erasure_studio::fs::atomically(&out.join("model.safetensors"), |tmp| {
                Ok(vars.save(tmp)?)
            })?;
            // Held-out scenes: a seed the training stream never uses.
            let acc = judge::accuracy(&judge, 1024, seed.wrapping_add(1 << 32), &Device::Cpu)?;
            println!(
                "judge accuracy on 1024 held-out scenes: object {:.1} %, colour {:.1} %, fill {:.1} %, background {:.1} % ({:.0} s)",
                acc[0] * 100.0,
                acc[1] * 100.0,
                acc[2] * 100.0,
                acc[3] * 100.0,
                started.elapsed().as_secs_f64()
            );
        }
        Commands::Parity {
            model,
            inputs,
            out,
            adapters,
            device,
        } => {
            let source = ModelSource::resolve(&model)?;
            let names = parity::run(&source, &inputs, &out, &adapters, &parse_device(&device)?)?;
            println!("wrote {} ({})", out.display(), names.join(", "));
        }
        Commands::Bench {
            json,
            repeats,
            min_seconds,
            only,
            device,
            list,
        } => {
            if list {
                bench::CASES.iter().for_each(|case| println!("{case}"));
                return Ok(());
            }
            let cases: Vec<String> = if only.is_empty() {
                bench::CASES.iter().map(|s| s.to_string()).collect()
            } else {
                only
            };
            let timing = bench::Timing {
                repeats,
                min_seconds,
            };
            for case in &cases {
                // Each case runs in its own process when there are several, so peak RSS is per case.
                let result = if cases.len() == 1 {
                    bench::run_case(case, timing, &parse_device(&device)?)?
                } else {
                    run_case_in_child(case, timing, &device)?
                };
                if json {
                    println!("{}", serde_json::to_string(&result)?);
                } else {
                    println!(
                        "{:<22} median {:>8.3} s of {:>3} runs   peak RSS {:>8.0} MiB",
                        result.name, result.median_s, result.runs, result.peak_rss_mib
                    );
                }
            }
        }
    }
    Ok(())
}

/// The requested size; else the init image's size (img2img), else the model's native size, as
/// diffusers' pipelines choose. Sizes without a request are rounded down to what the VAE allows.
fn image_size(
    sd: &StableDiffusion,
    width: Option<usize>,
    height: Option<usize>,
    init_image: Option<&Path>,
) -> anyhow::Result<(usize, usize)> {
    let f = sd.vae.config().downscale();
    let (default_w, default_h) = match (init_image, sd.native_size()) {
        (Some(path), _) => {
            let (w, h) = images::image_size(path)?;
            (w / f * f, h / f * f)
        }
        (None, Some((h, w))) => (w, h),
        (None, None) if width.is_some() && height.is_some() => (0, 0),
        (None, None) => {
            bail!("the model's unet/config.json gives no sample_size: pass --width and --height")
        }
    };
    Ok((width.unwrap_or(default_w), height.unwrap_or(default_h)))
}

/// `--model`: a folder or cached repo id; none (or `demo`) means the built-in demo model.
fn resolve_model(spec: Option<&str>) -> anyhow::Result<ModelSource> {
    setup::model_source(spec.unwrap_or("demo"))
}

fn run_case_in_child(
    case: &str,
    timing: bench::Timing,
    device: &str,
) -> anyhow::Result<bench::BenchResult> {
    let exe = std::env::current_exe()?;
    let output = Command::new(exe)
        .args(["bench", "--json", "--only", case, "--device", device])
        .args(["--repeats", &timing.repeats.to_string()])
        .args(["--min-seconds", &timing.min_seconds.to_string()])
        .output()
        .context("starting a bench child process")?;
    if !output.status.success() {
        bail!(
            "bench case {case} failed ({}; a kill by signal usually means out of memory): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let line = String::from_utf8(output.stdout)?;
    serde_json::from_str(line.trim()).with_context(|| format!("bench case {case} printed {line}"))
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
