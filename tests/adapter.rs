//! The erasure adapter on the tiny fixture model: untrained it changes nothing, bit for bit;
//! LoRA acts on the leading tokens and the Safe Adapter on the tail only; strength scales it;
//! it acts on the unconditional branch too; gradients reach every adapter variable.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{fixtures, max_abs, tiny_sd1};
use erasure_studio::adapter::info::{AdapterInfo, fingerprint};
use erasure_studio::adapter::{AdapterConfig, ErasureAdapter, SafeDelta};
use erasure_studio::engine::diffusion::noise::NoiseStream;
use erasure_studio::engine::diffusion::pipeline::{GenerateRequest, SampleHooks, txt2img};
use erasure_studio::engine::models::clip::text::ids_tensor;
use erasure_studio::engine::{ModelSource, StableDiffusion};

fn request() -> GenerateRequest {
    GenerateRequest {
        prompts: vec!["a red striped star".into(), "a blue circle".into()],
        negative_prompt: String::new(),
        seed: 3,
        steps: 3,
        guidance_scale: 5.0,
        width: 32,
        height: 32,
        eta: 1.0,
    }
}

/// Fills every adapter variable whose name contains `part` with random values.
fn randomize(adapter: &ErasureAdapter, part: &str, seed: u64) {
    let mut rng = NoiseStream::new(seed);
    let data = adapter.vars().data().lock().unwrap();
    let mut names: Vec<_> = data.keys().filter(|n| n.contains(part)).cloned().collect();
    names.sort();
    assert!(!names.is_empty(), "no adapter variable matches `{part}`");
    for name in names {
        let var = &data[&name];
        let noise = (rng.tensor(var.dims(), &Device::Cpu).unwrap() * 0.1).unwrap();
        var.set(&noise).unwrap();
    }
}

fn tiny_sd2_unet() -> erasure_studio::engine::models::unet::UNet {
    ModelSource::folder(&fixtures().join("tiny-sd2"))
        .unwrap()
        .unet(&Device::Cpu, DType::F32)
        .unwrap()
}

/// A safetensors file's tensors and metadata.
fn read_with_metadata(
    path: &std::path::Path,
) -> (
    std::collections::HashMap<String, Tensor>,
    std::collections::HashMap<String, String>,
) {
    let bytes = std::fs::read(path).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let metadata = header.metadata().clone().unwrap_or_default();
    let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).unwrap();
    (tensors, metadata)
}

fn configs() -> [AdapterConfig; 2] {
    [
        AdapterConfig::default(),
        AdapterConfig {
            lora_rank: 2,
            lora_alpha: 1.0,
            tail_tokens: 6,
            safe_delta: SafeDelta::LowRank { rank: 3 },
        },
    ]
}

#[test]
fn an_untrained_adapter_leaves_generations_bit_identical() {
    let sd = tiny_sd1();
    let (_, base) = txt2img(&sd, &request(), SampleHooks::default()).unwrap();
    for config in configs() {
        let adapter = ErasureAdapter::new(&sd.unet, config, 0, DType::F32, &Device::Cpu).unwrap();
        let sampling = adapter.detached();
        let hooks = SampleHooks {
            adapter: Some(&sampling),
            ..Default::default()
        };
        let (_, adapted) = txt2img(&sd, &request(), hooks).unwrap();
        let (a, b) = (
            adapted.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            base.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        assert!(
            a == b,
            "{config:?}: an untrained adapter changed the images"
        );
    }
}

/// Keys and values of every layer for a prompt context, with and without the adapter.
fn key_values(
    sd: &StableDiffusion,
    adapter: &ErasureAdapter,
    context: &Tensor,
) -> Vec<[(Tensor, Tensor); 2]> {
    sd.unet
        .cross_attn_layers()
        .into_iter()
        .map(|layer| {
            [
                layer.base_key_value(context).unwrap(),
                layer.key_value(context, Some(adapter)).unwrap(),
            ]
        })
        .collect()
}

#[test]
fn lora_moves_the_leading_tokens_and_the_safe_adapter_the_tail() {
    let sd = tiny_sd1();
    let ids = sd.tokenizer.encode("a red striped star");
    let context = sd
        .text_encoder
        .forward(&ids_tensor(&[ids], &Device::Cpu).unwrap())
        .unwrap();
    let len = context.dim(1).unwrap();
    for config in configs() {
        let m = config.tail_tokens;
        for (part, moved) in [("lora", 0..len - m), ("safe", len - m..len)] {
            let mut adapter =
                ErasureAdapter::new(&sd.unet, config, 0, DType::F32, &Device::Cpu).unwrap();
            randomize(&adapter, part, 5);
            for [(k0, v0), (k1, v1)] in key_values(&sd, &adapter, &context) {
                for (base, adapted) in [(&k0, &k1), (&v0, &v1)] {
                    let diff = (adapted - base).unwrap();
                    let outside = if moved.start == 0 {
                        diff.narrow(1, moved.end, len - moved.end).unwrap()
                    } else {
                        diff.narrow(1, 0, moved.start).unwrap()
                    };
                    let inside = diff.narrow(1, moved.start, moved.len()).unwrap();
                    assert_eq!(max_abs(&outside), 0.0, "{part} moved other tokens");
                    assert!(max_abs(&inside) > 1e-4, "{part} did not move its tokens");
                }
            }
            // Strength scales the update linearly; 0 is the base model exactly.
            let full = key_values(&sd, &adapter, &context);
            adapter.set_strength(0.5);
            let half = key_values(&sd, &adapter, &context);
            adapter.set_strength(0.0);
            let off = key_values(&sd, &adapter, &context);
            for ((f, h), o) in full.iter().zip(&half).zip(&off) {
                let (base_k, full_k, half_k, off_k) = (&f[0].0, &f[1].0, &h[1].0, &o[1].0);
                assert_eq!(max_abs(&(off_k - base_k).unwrap()), 0.0);
                let expected = ((full_k - base_k).unwrap() * 0.5).unwrap();
                let got = (half_k - base_k).unwrap();
                assert!(max_abs(&(got - expected).unwrap()) < 1e-5);
            }
        }
    }
}

#[test]
fn a_trained_adapter_acts_on_both_guidance_branches_and_receives_gradients() {
    let sd = tiny_sd1();
    let adapter = ErasureAdapter::new(
        &sd.unet,
        AdapterConfig::default(),
        0,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    randomize(&adapter, "", 9);
    let empty = sd.tokenizer.encode("");
    let uncond = sd
        .text_encoder
        .forward(&ids_tensor(&[empty], &Device::Cpu).unwrap())
        .unwrap();
    let latents = NoiseStream::new(1)
        .tensor((1, 4, 4, 4), &Device::Cpu)
        .unwrap();
    let t = Tensor::new(&[500u32], &Device::Cpu).unwrap();
    let base = sd.unet.forward(&latents, &t, &uncond, None).unwrap();
    let adapted = sd
        .unet
        .forward(&latents, &t, &uncond, Some(&adapter))
        .unwrap();
    assert!(max_abs(&(adapted.clone() - base).unwrap()) > 1e-5);

    let grads = adapted
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let data = adapter.vars().data().lock().unwrap();
    for (name, var) in data.iter() {
        let g = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("{name}: no gradient"));
        assert!(max_abs(g) > 0.0, "{name}: zero gradient");
    }
}

#[test]
fn adapter_files_round_trip_and_refuse_other_models() {
    let sd = tiny_sd1();
    let config = AdapterConfig {
        safe_delta: SafeDelta::LowRank { rank: 2 },
        ..Default::default()
    };
    let adapter = ErasureAdapter::new(&sd.unet, config, 0, DType::F32, &Device::Cpu).unwrap();
    randomize(&adapter, "", 11);
    let dir = common::temp_dir("adapter-file");
    let path = dir.join("adapter.safetensors");
    let info = AdapterInfo {
        concept: Some("star".into()),
        training: Some(serde_json::json!({ "epochs": 3 })),
        ..AdapterInfo::default()
    };
    adapter.save(&path, &sd, &info).unwrap();
    let loaded = ErasureAdapter::load(&path, &sd.unet, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(loaded.config(), adapter.config());
    // The file names its base model, with a fingerprint of the weights it adapts.
    let base = loaded.info().base_model.clone().expect("a base model");
    assert_eq!(
        (base.family.as_str(), base.name.as_str()),
        ("custom", "tiny-sd1")
    );
    assert_eq!(base.fingerprint, fingerprint(&sd.unet).unwrap());
    assert_eq!(base.fingerprint.len(), 16);
    assert_ne!(base.fingerprint, fingerprint(&tiny_sd2_unet()).unwrap());
    assert_eq!(
        (loaded.info().concept.as_deref(), &loaded.info().training),
        (Some("star"), &info.training)
    );
    assert_eq!(&ErasureAdapter::read_info(&path).unwrap(), loaded.info());
    let (a, b) = (
        adapter.vars().data().lock().unwrap(),
        loaded.vars().data().lock().unwrap(),
    );
    assert_eq!(a.len(), b.len());
    for (name, var) in a.iter() {
        let diff = (var.as_tensor() - b[name].as_tensor()).unwrap();
        assert_eq!(max_abs(&diff), 0.0, "{name}");
    }

    // Another model (the demo model has other cross-attention layers).
    let demo = ModelSource::folder(&erasure_studio::engine::io::source::demo_model_dir().unwrap())
        .unwrap()
        .unet(&Device::Cpu, DType::F32)
        .unwrap();
    let load_error = |file: &std::path::Path, unet| {
        let err = ErasureAdapter::load(file, unet, DType::F32, &Device::Cpu).err();
        format!("{:#}", err.expect("a refusal"))
    };
    let err = load_error(&path, &demo);
    assert!(
        err.contains("made for a UNet") && err.contains("belongs to tiny-sd1"),
        "{err}"
    );
    // A file that says it belongs to another family is refused with that family named.
    let other_family = dir.join("sd2.safetensors");
    let (tensors, mut metadata) = read_with_metadata(&path);
    let mut base: serde_json::Value = serde_json::from_str(&metadata["base_model"]).unwrap();
    base["family"] = "sd2".into();
    metadata.insert("base_model".into(), base.to_string());
    safetensors::serialize_to_file(&tensors, Some(metadata), &other_family).unwrap();
    let err = load_error(&other_family, &sd.unet);
    assert!(
        err.contains("trained on tiny-sd1 (a sd2 model)") && err.contains("custom"),
        "{err}"
    );
    // A safetensors file that is not an adapter.
    let weights = fixtures().join("tiny-sd1/unet/diffusion_pytorch_model.safetensors");
    let err = load_error(&weights, &sd.unet);
    assert!(err.contains("not an Erasure Studio adapter"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
