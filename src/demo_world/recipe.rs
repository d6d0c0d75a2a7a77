//! `demo-world train`: builds the whole demo model from scratch into a diffusers pipeline
//! folder. Stages run in order — tokenizer, CLIP, VAE, latents, UNet, VAE decoder, the CLIP's
//! image tower on generated images — and each is skipped when
//! its output exists, so a rerun after an interruption resumes where it stopped (mid-stage from
//! the stage's checkpoint under `checkpoints/`).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use serde::Serialize;

use super::architecture;
use super::clip_generated::{self, GeneratedTraining};
use super::clip_training::{self, ClipTraining, IMAGE_MEAN, IMAGE_STD};
use super::unet_training::{self, LatentDataset, UNetTraining};
use super::vae_training::{self, VaePhase, VaeTraining};
use super::vocab;
use crate::engine::ModelSource;
use crate::engine::StableDiffusion;
use crate::engine::diffusion::ddim::SchedulerConfig;
use crate::engine::models::clip::ClipModel;
use crate::engine::models::tokenizer::ClipTokenizer;
use crate::train::init::seeded_var_builder;
use crate::train::run::{report_every, seconds_recorded};

/// Everything that decides the trained model.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Recipe {
    /// Captions the tokenizer's merges are learned from.
    pub vocab_captions: usize,
    pub clip: ClipTraining,
    pub vae: VaeTraining,
    /// Fine-tuning of the VAE decoder alone, after the UNet (whose latents it leaves unchanged).
    pub vae_decoder: VaeTraining,
    /// Scenes encoded once for UNet training, and the seed they are drawn from.
    pub dataset: usize,
    pub dataset_seed: u64,
    pub unet: UNetTraining,
    /// The CLIP image tower's training on images the finished generator drew (the text tower
    /// stays as it is): every attribute alike, then with the object weighted, on images drawn
    /// as the erasure trainer draws them.
    pub clip_generated: GeneratedTraining,
    pub clip_objects: GeneratedTraining,
    /// Print a progress line every this many steps.
    pub report_every: usize,
    /// Held-out scenes for each stage's figures (CLIP zero-shot accuracy, VAE PSNR).
    pub evaluation_images: usize,
}

impl Recipe {
    /// The recipe of the shipped demo model.
    pub fn standard(seed: u64) -> Self {
        Self {
            vocab_captions: 5000,
            clip: ClipTraining {
                steps: 1000,
                batch: 96,
                lr: 2e-3,
                seed,
            },
            vae: VaeTraining {
                steps: 1500,
                batch: 8,
                crop: 32,
                lr: 1e-3,
                seed: seed + 1,
            },
            vae_decoder: VaeTraining {
                steps: 1000,
                batch: 8,
                crop: 32,
                lr: 5e-4,
                seed: seed + 4,
            },
            dataset: 16000,
            dataset_seed: seed + 3,
            unet: UNetTraining {
                steps: 6000,
                batch: 16,
                lr: 8e-4,
                caption_dropout: 0.1,
                ema_decay: 0.999,
                seed: seed + 2,
            },
            clip_generated: GeneratedTraining {
                images: 2048,
                stochastic_share: 0.0,
                object_weight: 1.0,
                training: ClipTraining {
                    steps: 600,
                    batch: 64,
                    lr: 1e-3,
                    seed: seed + 6,
                },
            },
            clip_objects: GeneratedTraining {
                images: 4096,
                stochastic_share: 0.5,
                object_weight: 4.0,
                training: ClipTraining {
                    steps: 1500,
                    batch: 64,
                    lr: 5e-4,
                    seed: seed + 8,
                },
            },
            report_every: 50,
            evaluation_images: 512,
        }
    }

    /// A recipe of a few steps per stage, for tests of the machinery.
    pub fn micro(seed: u64) -> Self {
        let mut r = Self::standard(seed);
        r.vocab_captions = 500;
        r.clip.steps = 3;
        r.clip.batch = 8;
        r.vae.steps = 3;
        r.vae.batch = 2;
        r.vae_decoder.steps = 3;
        r.vae_decoder.batch = 2;
        r.dataset = 16;
        r.evaluation_images = 8;
        r.unet.steps = 3;
        r.unet.batch = 4;
        for stage in [&mut r.clip_generated, &mut r.clip_objects] {
            stage.images = 8;
            stage.training.steps = 3;
            stage.training.batch = 4;
        }
        r.report_every = 1;
        r
    }
}

/// Time and result of each stage, written to `training_log.json`.
#[derive(Debug, Default, Serialize, serde::Deserialize)]
pub struct TrainingLog {
    /// The recipe the folder is being built with; a rerun must use the same.
    pub recipe: Option<serde_json::Value>,
    pub stages: BTreeMap<String, StageLog>,
}

#[derive(Debug, Default, Serialize, serde::Deserialize)]
pub struct StageLog {
    pub seconds: f64,
    pub final_loss: Option<f64>,
    pub figures: BTreeMap<String, f64>,
}

const LOG_FILE: &str = "training_log.json";

/// What a finished stage reports besides its time.
#[derive(Default)]
struct StageResult {
    final_loss: Option<f64>,
    figures: BTreeMap<String, f64>,
}

impl TrainingLog {
    /// Runs `stage` unless the log records `name` as done (a stage is logged only after its
    /// files are written), and records its result and time, counting the training time of
    /// earlier processes that its `checkpoint` records.
    fn run_stage(
        &mut self,
        path: &Path,
        name: &str,
        checkpoint: Option<&Path>,
        stage: impl FnOnce() -> anyhow::Result<StageResult>,
    ) -> anyhow::Result<()> {
        if self.stages.contains_key(name) {
            return Ok(());
        }
        let earlier = checkpoint.map_or(Ok(0.0), seconds_recorded)?;
        let started = Instant::now();
        let result = stage()?;
        let stage = StageLog {
            seconds: earlier + started.elapsed().as_secs_f64(),
            final_loss: result.final_loss,
            figures: result.figures,
        };
        self.stages.insert(name.to_string(), stage);
        crate::fs::write_atomic(path, serde_json::to_string_pretty(self)?.as_bytes())
    }
}

/// Runs every stage of `recipe` that the log in `out` does not record as done, telling `say`
/// how each goes.
pub fn build(
    recipe: &Recipe,
    out: &Path,
    device: &Device,
    say: &dyn Fn(&str),
) -> anyhow::Result<TrainingLog> {
    let work = out.join("checkpoints");
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let log_path = out.join(LOG_FILE);
    let mut log: TrainingLog = if log_path.exists() {
        crate::engine::io::config::read_json(&log_path)?
    } else {
        TrainingLog::default()
    };
    let wanted = serde_json::to_value(recipe)?;
    match &log.recipe {
        Some(started) if *started != wanted => anyhow::bail!(
            "{} was started with another recipe (seed or settings differ); \
             resume it with the same options, or build into a new folder",
            out.display()
        ),
        Some(_) => {}
        None => {
            log.recipe = Some(wanted);
            crate::fs::write_atomic(&log_path, serde_json::to_string_pretty(&log)?.as_bytes())?;
        }
    }
    write_json(&out.join("model_index.json"), &architecture::model_index())?;
    write_json(
        &out.join("scheduler/scheduler_config.json"),
        &architecture::scheduler(),
    )?;

    let tokenizer_dir = out.join("tokenizer");
    log.run_stage(&log_path, "tokenizer", None, || {
        say(&format!(
            "tokenizer: learning merges from {} captions",
            recipe.vocab_captions
        ));
        vocab::write_tokenizer(
            &tokenizer_dir,
            recipe.vocab_captions,
            recipe.clip.seed,
            architecture::TOKEN_LENGTH,
        )?;
        Ok(StageResult::default())
    })?;
    let tokenizer = ClipTokenizer::from_dir(&tokenizer_dir)?;
    let vocab_size = tokenizer.eos_id() as usize + 1;

    let checkpoint = work.join("clip.safetensors");
    log.run_stage(&log_path, "clip", Some(&checkpoint), || {
        let config = architecture::parsed_clip(vocab_size)?;
        let (model, vars, losses) = clip_training::train(
            &config,
            &tokenizer,
            &recipe.clip,
            Some(&checkpoint),
            device,
            report_every(recipe.report_every, say),
        )?;
        let accuracy = zero_shot_on_renders(&model, &tokenizer, recipe, device)?;
        say(&format!(
            "clip: zero-shot accuracy {}",
            format_accuracy(&accuracy)
        ));
        write_json(
            &out.join("text_encoder/config.json"),
            &architecture::text_config(vocab_size),
        )?;
        save_vars(
            &vars,
            "text_model.",
            &out.join("text_encoder/model.safetensors"),
        )?;
        write_json(
            &out.join("clip/config.json"),
            &architecture::clip_config(vocab_size),
        )?;
        write_json(
            &out.join("clip/preprocessor_config.json"),
            &serde_json::json!({
                "image_processor_type": "CLIPImageProcessor",
                "size": {"shortest_edge": 64},
                "crop_size": {"height": 64, "width": 64},
                "do_normalize": true,
                "image_mean": [IMAGE_MEAN, IMAGE_MEAN, IMAGE_MEAN],
                "image_std": [IMAGE_STD, IMAGE_STD, IMAGE_STD],
            }),
        )?;
        save_vars(&vars, "", &out.join("clip/model.safetensors"))?;
        Ok(StageResult {
            final_loss: tail_mean(&losses),
            figures: accuracy_figures("zero_shot", &accuracy),
        })
    })?;

    let vae_weights = out.join("vae/diffusion_pytorch_model.safetensors");
    let checkpoint = work.join("vae.safetensors");
    log.run_stage(&log_path, "vae", Some(&checkpoint), || {
        let (vae, vars, losses) = vae_training::train(
            &architecture::parsed_vae(1.0)?,
            &VaePhase::Full,
            &recipe.vae,
            Some(&checkpoint),
            device,
            report_every(recipe.report_every, say),
        )?;
        // Stable Diffusion's convention: latents × scaling_factor have unit variance.
        let sample = LatentDataset::encode(
            &vae,
            recipe.evaluation_images,
            recipe.vae.seed + 100,
            device,
        )?;
        let scaling_factor = 1.0
            / sample
                .latents
                .flatten_all()?
                .var(0)?
                .sqrt()?
                .to_scalar::<f32>()? as f64;
        let psnr = vae_training::reconstruction_psnr(&vae, recipe.evaluation_images, 98, device)?;
        say(&format!(
            "vae: reconstruction PSNR {psnr:.1} dB, scaling factor {scaling_factor:.4}"
        ));
        write_json(
            &out.join("vae/config.json"),
            &architecture::vae_config(scaling_factor),
        )?;
        save_vars(&vars, "", &vae_weights)?;
        Ok(StageResult {
            final_loss: tail_mean(&losses),
            figures: BTreeMap::from([
                ("psnr_db".to_string(), psnr),
                ("scaling_factor".to_string(), scaling_factor),
            ]),
        })
    })?;

    let latents_path = work.join("latents.safetensors");
    log.run_stage(&log_path, "latents", None, || {
        say(&format!("latents: encoding {} scenes", recipe.dataset));
        let vae = ModelSource::folder(out)?.vae(device, DType::F32)?;
        LatentDataset::encode(&vae, recipe.dataset, recipe.dataset_seed, device)?
            .save(&latents_path, recipe.dataset_seed)?;
        Ok(StageResult::default())
    })?;

    let checkpoint = work.join("unet.safetensors");
    log.run_stage(&log_path, "unet", Some(&checkpoint), || {
        let source = ModelSource::folder(out)?;
        let data = LatentDataset::load(&latents_path, recipe.dataset_seed, device)?;
        let text_encoder = source.text_encoder(device, DType::F32)?;
        let scheduler: SchedulerConfig = serde_json::from_value(architecture::scheduler())?;
        let (_, vars, losses) = unet_training::train(
            &architecture::parsed_unet()?,
            &text_encoder,
            &tokenizer,
            &scheduler,
            &data,
            &recipe.unet,
            Some(&checkpoint),
            device,
            report_every(recipe.report_every, say),
        )?;
        write_json(&out.join("unet/config.json"), &architecture::unet_config())?;
        save_vars(
            &vars,
            "",
            &out.join("unet/diffusion_pytorch_model.safetensors"),
        )?;
        Ok(StageResult {
            final_loss: tail_mean(&losses),
            ..Default::default()
        })
    })?;

    let checkpoint = work.join("vae_decoder.safetensors");
    log.run_stage(&log_path, "vae_decoder", Some(&checkpoint), || {
        let source = ModelSource::folder(out)?;
        let config = source.vae(device, DType::F32)?.config().clone();
        let (vae, vars, losses) = vae_training::train(
            &config,
            &VaePhase::DecoderOnly {
                weights: &vae_weights,
            },
            &recipe.vae_decoder,
            Some(&checkpoint),
            device,
            report_every(recipe.report_every, say),
        )?;
        let psnr = vae_training::reconstruction_psnr(&vae, recipe.evaluation_images, 98, device)?;
        say(&format!("vae decoder: reconstruction PSNR {psnr:.1} dB"));
        save_vars(&vars, "", &vae_weights)?;
        Ok(StageResult {
            final_loss: tail_mean(&losses),
            figures: BTreeMap::from([("psnr_db".to_string(), psnr)]),
        })
    })?;

    for (name, stage) in [
        ("clip_generated", &recipe.clip_generated),
        ("clip_objects", &recipe.clip_objects),
    ] {
        let checkpoint = work.join(format!("{name}.safetensors"));
        log.run_stage(&log_path, name, Some(&checkpoint), || {
            let build = Build {
                recipe,
                out,
                device,
                say,
            };
            clip_generated_stage(build, name, stage, &tokenizer, &checkpoint)
        })?;
    }

    Ok(log)
}

/// What a stage of a build works with.
#[derive(Clone, Copy)]
struct Build<'a> {
    recipe: &'a Recipe,
    /// The model folder being built.
    out: &'a Path,
    device: &'a Device,
    say: &'a dyn Fn(&str),
}

/// Trains the CLIP's image tower in `out` on images the model in `out` draws.
fn clip_generated_stage(
    build: Build,
    name: &'static str,
    stage: &GeneratedTraining,
    tokenizer: &ClipTokenizer,
    checkpoint: &Path,
) -> anyhow::Result<StageResult> {
    let Build {
        recipe,
        out,
        device,
        say,
    } = build;
    let seed = stage.training.seed;
    let sd = StableDiffusion::load(&ModelSource::folder(out)?, device, DType::F32)?;
    say(&format!(
        "{name}: drawing {} training and {} held-out images",
        stage.images, recipe.evaluation_images
    ));
    let set = clip_generated::generate(&sd, stage.images, stage.stochastic_share, seed)?;
    let held_out = clip_generated::generate(
        &sd,
        recipe.evaluation_images,
        stage.stochastic_share,
        seed + 1,
    )?;
    let weights = out.join("clip/model.safetensors");
    let mut vars = VarMap::new();
    let model = ClipModel::new(
        seeded_var_builder(&vars, seed, DType::F32, device),
        &architecture::parsed_clip(tokenizer.eos_id() as usize + 1)?,
    )?;
    vars.load(&weights)
        .with_context(|| format!("loading {}", weights.display()))?;
    let on_held_out = |model: &ClipModel| {
        clip_training::zero_shot_accuracy_on(
            model,
            tokenizer,
            &held_out.images,
            &held_out.labels,
            device,
        )
    };
    let before = on_held_out(&model)?;
    let losses = clip_generated::train_image_tower(
        &model,
        &vars,
        tokenizer,
        &set,
        stage,
        name,
        Some(checkpoint),
        report_every(recipe.report_every, say),
    )?;
    let after = on_held_out(&model)?;
    say(&format!(
        "{name}: zero-shot accuracy on held-out generated images {} → {}",
        format_accuracy(&before),
        format_accuracy(&after)
    ));
    let renders = zero_shot_on_renders(&model, tokenizer, recipe, device)?;
    save_vars(&vars, "", &weights)?;
    let mut figures = accuracy_figures("generated_before", &before);
    figures.extend(accuracy_figures("generated", &after));
    figures.extend(accuracy_figures("zero_shot", &renders));
    Ok(StageResult {
        final_loss: tail_mean(&losses),
        figures,
    })
}

/// "object 98.0 %, colour …" for a [object, colour, fill, background] accuracy.
pub fn format_accuracy(acc: &[f64; 4]) -> String {
    ATTRIBUTES
        .iter()
        .zip(acc)
        .map(|(name, a)| format!("{name} {:.1} %", 100.0 * a))
        .collect::<Vec<_>>()
        .join(", ")
}

const ATTRIBUTES: [&str; 4] = ["object", "colour", "fill", "background"];

fn accuracy_figures(prefix: &str, acc: &[f64; 4]) -> BTreeMap<String, f64> {
    ATTRIBUTES
        .iter()
        .zip(acc)
        .map(|(name, a)| (format!("{prefix}_{name}"), *a))
        .collect()
}

/// Mean of the last (up to) 50 losses; None when the stage was resumed after its last step.
fn tail_mean(losses: &[f64]) -> Option<f64> {
    let tail = &losses[losses.len().saturating_sub(50)..];
    (!tail.is_empty()).then(|| tail.iter().sum::<f64>() / tail.len() as f64)
}

fn write_json(path: &Path, value: &serde_json::Value) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    crate::fs::write_atomic(path, serde_json::to_string_pretty(value)?.as_bytes())
}

/// The CLIP's zero-shot accuracy on the recipe's held-out rendered scenes.
fn zero_shot_on_renders(
    model: &ClipModel,
    tokenizer: &ClipTokenizer,
    recipe: &Recipe,
    device: &Device,
) -> anyhow::Result<[f64; 4]> {
    clip_training::zero_shot_accuracy(model, tokenizer, recipe.evaluation_images, 99, device)
}

/// Writes the variables whose names start with `prefix` (all when empty), atomically.
fn save_vars(vars: &VarMap, prefix: &str, path: &Path) -> anyhow::Result<()> {
    let tensors: BTreeMap<String, Tensor> = vars
        .data()
        .lock()
        .expect("var map lock")
        .iter()
        .filter(|(name, _)| name.starts_with(prefix))
        .map(|(name, var)| (name.clone(), var.as_tensor().detach()))
        .collect();
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    crate::fs::atomically(path, |tmp| {
        Ok(safetensors::serialize_to_file(&tensors, None, tmp)?)
    })
}
