//! The demo model's training code on micro configurations: every trainer lowers its loss, and
//! the whole recipe writes a folder the normal loader reads, resuming instead of redoing work.

mod common;

use candle_core::{DType, Device};
use candle_nn::VarMap;
use erasure_studio::demo_world::architecture;
use erasure_studio::demo_world::clip_training::{self, ClipTraining};
use erasure_studio::demo_world::recipe::{self, Recipe};
use erasure_studio::demo_world::unet_training::{self, LatentDataset, UNetTraining};
use erasure_studio::demo_world::vae_training::{self, VaePhase, VaeTraining};
use erasure_studio::demo_world::vocab::write_tokenizer;
use erasure_studio::engine::diffusion::ddim::SchedulerConfig;
use erasure_studio::engine::diffusion::pipeline::{GenerateRequest, SampleHooks, txt2img};
use erasure_studio::engine::models::clip::text::ClipTextModel;
use erasure_studio::engine::models::tokenizer::ClipTokenizer;
use erasure_studio::engine::models::unet::UNetConfig;
use erasure_studio::engine::models::unet::config::UNetConfigFile;
use erasure_studio::engine::models::vae::AutoencoderKl;
use erasure_studio::engine::{ModelSource, StableDiffusion};
use erasure_studio::train::init::seeded_var_builder;

/// Mean of the first and of the last `n` losses.
fn ends(losses: &[f64], n: usize) -> (f64, f64) {
    let mean = |s: &[f64]| s.iter().sum::<f64>() / s.len() as f64;
    (mean(&losses[..n]), mean(&losses[losses.len() - n..]))
}

fn tokenizer(name: &str) -> ClipTokenizer {
    let dir = common::temp_dir(name);
    write_tokenizer(&dir, 500, 0, architecture::TOKEN_LENGTH).unwrap();
    ClipTokenizer::from_dir(&dir).unwrap()
}

#[test]
fn clip_training_lowers_the_contrastive_loss() {
    let tok = tokenizer("clip-tok");
    let config = architecture::parsed_clip(tok.eos_id() as usize + 1).unwrap();
    let settings = ClipTraining {
        steps: 40,
        batch: 16,
        lr: 2e-3,
        seed: 0,
    };
    let (_, _, losses) =
        clip_training::train(&config, &tok, &settings, None, &Device::Cpu, |_| {}).unwrap();
    let (first, last) = ends(&losses, 5);
    assert!(last < 0.85 * first, "loss {first:.3} → {last:.3}");
}

#[test]
fn vae_training_lowers_the_reconstruction_loss() {
    let settings = VaeTraining {
        steps: 40,
        batch: 2,
        crop: 16,
        lr: 2e-3,
        seed: 0,
    };
    let config = architecture::parsed_vae(1.0).unwrap();
    let (_, _, losses) = vae_training::train(
        &config,
        &VaePhase::Full,
        &settings,
        None,
        &Device::Cpu,
        |_| {},
    )
    .unwrap();
    let (first, last) = ends(&losses, 5);
    assert!(last < 0.7 * first, "loss {first:.3} → {last:.3}");
}

#[test]
fn unet_training_lowers_the_diffusion_loss() {
    let dev = Device::Cpu;
    let tok = tokenizer("unet-tok");
    let vars = VarMap::new();
    let text = ClipTextModel::new(
        seeded_var_builder(&vars, 1, DType::F32, &dev),
        &architecture::parsed_clip(tok.eos_id() as usize + 1)
            .unwrap()
            .text_config,
    )
    .unwrap();
    let vae = AutoencoderKl::new(
        seeded_var_builder(&VarMap::new(), 2, DType::F32, &dev),
        &architecture::parsed_vae(1.0).unwrap(),
    )
    .unwrap();
    let data = LatentDataset::encode(&vae, 8, 3, &dev).unwrap();
    let file: UNetConfigFile = serde_json::from_value(serde_json::json!({
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "block_out_channels": [16, 32],
        "layers_per_block": 1,
        "attention_head_dim": 2,
        "cross_attention_dim": architecture::TEXT_WIDTH,
        "norm_num_groups": 8,
    }))
    .unwrap();
    let scheduler: SchedulerConfig = serde_json::from_value(architecture::scheduler()).unwrap();
    let settings = UNetTraining {
        steps: 40,
        batch: 8,
        lr: 2e-3,
        caption_dropout: 0.1,
        ema_decay: 0.9,
        seed: 4,
    };
    let (_, _, losses) = unet_training::train(
        &UNetConfig::from_file(&file).unwrap(),
        &text,
        &tok,
        &scheduler,
        &data,
        &settings,
        None,
        &dev,
        |_| {},
    )
    .unwrap();
    let (first, last) = ends(&losses, 8);
    assert!(last < 0.9 * first, "loss {first:.3} → {last:.3}");
}

#[test]
fn micro_recipe_writes_a_loadable_model_and_resumes() {
    let out = common::temp_dir("micro-recipe");
    let log = recipe::build(&Recipe::micro(0), &out, &Device::Cpu, &|_| {}).unwrap();
    assert_eq!(
        log.stages.keys().collect::<Vec<_>>(),
        [
            "clip",
            "clip_generated",
            "clip_objects",
            "latents",
            "tokenizer",
            "unet",
            "vae",
            "vae_decoder"
        ]
    );
    // The last stage changed the CLIP's image tower only: its text tower is still the text
    // encoder's.
    let clip = common::load(&out.join("clip/model.safetensors"));
    let text_encoder = common::load(&out.join("text_encoder/model.safetensors"));
    for (name, tensor) in &text_encoder {
        assert_eq!(
            common::max_abs(&(tensor - &clip[name]).unwrap()),
            0.0,
            "{name}"
        );
    }
    // Loaded like any Stable Diffusion folder, it generates.
    let sd = StableDiffusion::load(
        &ModelSource::folder(&out).unwrap(),
        &Device::Cpu,
        DType::F32,
    )
    .unwrap();
    let req = GenerateRequest {
        prompts: vec!["a red star".into()],
        negative_prompt: String::new(),
        seed: 0,
        steps: 2,
        guidance_scale: 5.0,
        width: 64,
        height: 64,
        eta: 0.0,
    };
    let (_, images) = txt2img(&sd, &req, SampleHooks::default()).unwrap();
    assert_eq!(images.dims(), [1, 3, 64, 64]);
    // A rerun finds every stage done and trains nothing.
    let unet_file = out.join("unet/diffusion_pytorch_model.safetensors");
    let written = std::fs::metadata(&unet_file).unwrap().modified().unwrap();
    let again = recipe::build(&Recipe::micro(0), &out, &Device::Cpu, &|_| {}).unwrap();
    assert_eq!(
        std::fs::metadata(&unet_file).unwrap().modified().unwrap(),
        written
    );
    assert_eq!(again.stages["unet"].seconds, log.stages["unet"].seconds);
    // Resuming with another recipe is refused rather than mixing two models.
    let err = recipe::build(&Recipe::micro(1), &out, &Device::Cpu, &|_| {}).unwrap_err();
    assert!(format!("{err:#}").contains("another recipe"), "{err:#}");
    std::fs::remove_dir_all(&out).unwrap();
}
