//! `demo-world`: the procedural world of coloured shapes, and building the demo model from it.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use clap::Subcommand;
use erasure_studio::demo_world::judge::{self, JudgeConfig};
use erasure_studio::demo_world::quality::{self, QualitySettings};
use erasure_studio::demo_world::recipe::{self, Recipe, format_accuracy};
use erasure_studio::demo_world::{Caption, Scene, scene};
use erasure_studio::engine::diffusion::pipeline::{
    GenerateRequest, SampleHooks, Sampling, output_size, txt2img,
};
use erasure_studio::engine::{ModelSource, StableDiffusion};
use erasure_studio::{fs, images};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

#[derive(Subcommand)]
pub enum DemoWorldCommand {
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

pub fn run(command: DemoWorldCommand) -> anyhow::Result<()> {
    match command {
        DemoWorldCommand::Preview { seed, count, out } => {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let scenes: Vec<Scene> = (0..count.max(1)).map(|_| Scene::sample(&mut rng)).collect();
            for (i, scene) in scenes.iter().enumerate() {
                println!("{i:>3}: {}", Caption::sample(scene, &mut rng).text);
            }
            let cols = (scenes.len() as f64).sqrt().ceil() as usize;
            images::save_png(&scene::grid(&scenes, cols), &out)?;
            println!("wrote {}", out.display());
        }
        DemoWorldCommand::Sample {
            prompts,
            model,
            per_prompt,
            seed,
            steps,
            guidance,
            out,
        } => {
            let sd = StableDiffusion::load(&demo_or(model.as_deref())?, &Device::Cpu, DType::F32)?;
            let (width, height) = output_size(&sd, None, None, None)?;
            let per_prompt = per_prompt.max(1);
            let mut rows = Vec::new();
            for prompt in &prompts {
                let sampling = Sampling {
                    steps,
                    guidance_scale: guidance,
                };
                let req = GenerateRequest::new(
                    vec![prompt.clone(); per_prompt],
                    (width, height),
                    sampling,
                )
                .seed(seed);
                rows.push(txt2img(&sd, &req, SampleHooks::default())?.1);
                eprintln!("{prompt}");
            }
            images::save_png(&images::grid(&Tensor::cat(&rows, 0)?, per_prompt)?, &out)?;
            println!("wrote {}", out.display());
        }
        DemoWorldCommand::Evaluate {
            model,
            judge,
            per_combination,
            out,
        } => {
            let source = demo_or(model.as_deref())?;
            let sd = StableDiffusion::load(&source, &Device::Cpu, DType::F32)?;
            let judge_dir = judge.unwrap_or_else(|| source.root().join("judge"));
            let judge = judge::JudgeNet::load(&judge_dir, &Device::Cpu)?;
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
                fs::write_atomic(&out, serde_json::to_string_pretty(&report)?.as_bytes())?;
            }
        }
        DemoWorldCommand::Train { out, seed, micro } => {
            let started = Instant::now();
            let recipe = if micro {
                Recipe::micro(seed)
            } else {
                Recipe::standard(seed)
            };
            let log = recipe::build(&recipe, &out, &Device::Cpu, &|line| eprintln!("{line}"))?;
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
        DemoWorldCommand::TrainJudge {
            steps,
            batch,
            seed,
            out,
        } => {
            let started = Instant::now();
            let config = JudgeConfig::default();
            let (judge, vars) = judge::train(
                &config,
                steps,
                batch,
                seed,
                &Device::Cpu,
                |step, loss, skipped| {
                    if skipped {
                        eprintln!("judge step {step}: non-finite gradient, update skipped");
                    }
                    if step % 50 == 0 || step + 1 == steps {
                        eprintln!(
                            "step {step:>5}/{steps}  loss {loss:.4}  {:.0} s",
                            started.elapsed().as_secs_f64()
                        );
                    }
                },
            )?;
            std::fs::create_dir_all(&out).with_context(|| format!("creating {}", out.display()))?;
            fs::write_atomic(
                &out.join("config.json"),
                serde_json::to_string_pretty(&config)?.as_bytes(),
            )?;
            fs::atomically(&out.join("model.safetensors"), |tmp| Ok(vars.save(tmp)?))?;
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
    }
    Ok(())
}

/// `--model`: a folder, by default the built-in demo model.
fn demo_or(model: Option<&str>) -> anyhow::Result<ModelSource> {
    ModelSource::named(model.unwrap_or("demo"))
}
