//! Loading from folders, fp16 variants and the Hugging Face cache; bad input gives clear errors.

mod common;

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use common::{fixtures, rel_l2, temp_dir};
use erasure_studio::engine::ModelSource;

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// A writable copy of the tiny SD 1.x fixture.
fn model_copy(name: &str) -> std::path::PathBuf {
    let dir = temp_dir(name).join("model");
    copy_dir(&fixtures().join("tiny-sd1"), &dir);
    dir
}

fn error_of<T>(r: anyhow::Result<T>) -> String {
    match r {
        Ok(_) => panic!("expected an error"),
        Err(e) => format!("{e:#}"),
    }
}

fn unet_out(source: &ModelSource) -> Tensor {
    let unet = source.unet(&Device::Cpu, DType::F32).unwrap();
    let sample = Tensor::ones((1, 4, 8, 8), DType::F32, &Device::Cpu).unwrap();
    let ctx = Tensor::ones((1, 77, 32), DType::F32, &Device::Cpu).unwrap();
    let t = Tensor::new(&[100u32], &Device::Cpu).unwrap();
    unet.forward(&sample, &t, &ctx, None).unwrap()
}

#[test]
fn missing_folders_are_named() {
    let err = error_of(ModelSource::resolve("/nonexistent/model"));
    assert!(
        err.contains("/nonexistent/model") && err.contains("not found"),
        "{err}"
    );
    let dir = model_copy("missing-unet");
    std::fs::remove_dir_all(dir.join("unet")).unwrap();
    let source = ModelSource::folder(&dir).unwrap();
    let err = error_of(source.unet(&Device::Cpu, DType::F32));
    assert!(err.contains("no `unet/` folder"), "{err}");
}

#[test]
fn truncated_and_corrupt_weights_name_the_file() {
    let dir = model_copy("truncated");
    let file = dir.join("unet").join("diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
    let source = ModelSource::folder(&dir).unwrap();
    let err = error_of(source.unet(&Device::Cpu, DType::F32));
    assert!(
        err.contains("diffusion_pytorch_model.safetensors") && err.contains("truncated"),
        "{err}"
    );
    std::fs::write(&file, b"not a safetensors file at all").unwrap();
    let err = error_of(source.unet(&Device::Cpu, DType::F32));
    assert!(err.contains("diffusion_pytorch_model.safetensors"), "{err}");
}

#[test]
fn wrong_shapes_and_missing_tensors_name_file_and_tensor() {
    let dir = model_copy("wrong-shape");
    let file = dir.join("vae").join("diffusion_pytorch_model.safetensors");
    let mut tensors = candle_core::safetensors::load(&file, &Device::Cpu).unwrap();
    let name = "decoder.conv_in.weight";
    tensors.insert(
        name.into(),
        Tensor::zeros((3, 3), DType::F32, &Device::Cpu).unwrap(),
    );
    tensors.remove("decoder.conv_out.bias");
    candle_core::safetensors::save(&tensors, &file).unwrap();
    let source = ModelSource::folder(&dir).unwrap();
    let err = error_of(source.vae(&Device::Cpu, DType::F32));
    assert!(
        err.contains(name) && err.contains("shape") && err.contains("vae"),
        "{err}"
    );
    tensors.remove(name);
    candle_core::safetensors::save(&tensors, &file).unwrap();
    let err = error_of(source.vae(&Device::Cpu, DType::F32));
    assert!(err.contains(name) && err.contains("not found"), "{err}");
}

#[test]
fn unknown_config_values_are_named() {
    let dir = model_copy("bad-config");
    let path = dir.join("unet").join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    cfg["down_block_types"][0] = "SimpleCrossAttnDownBlock2D".into();
    std::fs::write(&path, cfg.to_string()).unwrap();
    let source = ModelSource::folder(&dir).unwrap();
    let err = error_of(source.unet(&Device::Cpu, DType::F32));
    assert!(
        err.contains("config.json") && err.contains("SimpleCrossAttnDownBlock2D"),
        "{err}"
    );
    cfg["down_block_types"][0] = "CrossAttnDownBlock2D".into();
    cfg["class_embed_type"] = "timestep".into();
    std::fs::write(&path, cfg.to_string()).unwrap();
    let err = error_of(source.unet(&Device::Cpu, DType::F32));
    assert!(err.contains("class_embed_type"), "{err}");
}

#[test]
fn fp16_variant_and_sharded_weights_load() {
    let reference = unet_out(&ModelSource::folder(&fixtures().join("tiny-sd1")).unwrap());
    let dir = model_copy("fp16");
    let unet_dir = dir.join("unet");
    let full = unet_dir.join("diffusion_pytorch_model.safetensors");
    let tensors = candle_core::safetensors::load(&full, &Device::Cpu).unwrap();
    let half: std::collections::HashMap<_, _> = tensors
        .iter()
        .map(|(k, v)| (k.clone(), v.to_dtype(DType::F16).unwrap()))
        .collect();
    candle_core::safetensors::save(
        &half,
        unet_dir.join("diffusion_pytorch_model.fp16.safetensors"),
    )
    .unwrap();
    std::fs::remove_file(&full).unwrap();
    let from_half = unet_out(&ModelSource::folder(&dir).unwrap());
    let err = rel_l2(&from_half, &reference);
    assert!(
        err < 1e-2 && err > 0.0,
        "fp16 weights: relative error {err}"
    );

    // Sharded: two files and an index, as diffusers writes large models.
    std::fs::remove_file(unet_dir.join("diffusion_pytorch_model.fp16.safetensors")).unwrap();
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let (first, second) = names.split_at(names.len() / 2);
    let mut weight_map = serde_json::Map::new();
    for (part, file) in [
        (first, "diffusion_pytorch_model-00001-of-00002.safetensors"),
        (second, "diffusion_pytorch_model-00002-of-00002.safetensors"),
    ] {
        let shard: std::collections::HashMap<_, _> = part
            .iter()
            .map(|k| ((*k).clone(), tensors[*k].clone()))
            .collect();
        candle_core::safetensors::save(&shard, unet_dir.join(file)).unwrap();
        for k in part {
            weight_map.insert((*k).clone(), file.into());
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(
        unet_dir.join("diffusion_pytorch_model.safetensors.index.json"),
        index.to_string(),
    )
    .unwrap();
    let sharded = unet_out(&ModelSource::folder(&dir).unwrap());
    assert_eq!(rel_l2(&sharded, &reference), 0.0);
}

#[test]
fn pickle_weights_get_a_conversion_hint() {
    let dir = model_copy("pickle");
    let unet = dir.join("unet");
    std::fs::rename(
        unet.join("diffusion_pytorch_model.safetensors"),
        unet.join("diffusion_pytorch_model.bin"),
    )
    .unwrap();
    let err = error_of(
        ModelSource::folder(&dir)
            .unwrap()
            .unet(&Device::Cpu, DType::F32),
    );
    assert!(err.contains(".bin") && err.contains("safetensors"), "{err}");
}

#[test]
fn hugging_face_cache_snapshot_is_found_through_refs_main() {
    let root = temp_dir("hf-cache");
    let repo = root.join("models--tiny-org--tiny-sd1");
    let hash = "0123456789abcdef0123456789abcdef01234567";
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs").join("main"), hash).unwrap();
    let snapshot = repo.join("snapshots").join(hash);
    // Snapshots are symlinks into blobs/ in a real cache.
    std::fs::create_dir_all(repo.join("snapshots")).unwrap();
    std::os::unix::fs::symlink(fixtures().join("tiny-sd1"), &snapshot).unwrap();
    let found = hf_cache_snapshot_in(&root, "tiny-org/tiny-sd1");
    assert_eq!(found.as_deref(), Some(snapshot.as_path()));
    assert!(hf_cache_snapshot_in(&root, "tiny-org/other").is_none());
    // The studio's model list finds it by scanning the cache; a repo without a pipeline is left out.
    let other = root.join("models--tiny-org--not-a-pipeline");
    std::fs::create_dir_all(other.join("snapshots/x")).unwrap();
    std::fs::create_dir_all(other.join("refs")).unwrap();
    std::fs::write(other.join("refs/main"), "x").unwrap();
    assert_eq!(
        erasure_studio::engine::io::hf_cache::hf_cached_pipelines(&[root.to_path_buf()]),
        vec!["tiny-org/tiny-sd1".to_string()]
    );
    // Through the CLI, with HF_HUB_CACHE set for the child only.
    let out = temp_dir("hf-cli").join("x.png");
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_erasure-studio"))
        .args([
            "generate",
            "--model",
            "tiny-org/tiny-sd1",
            "--prompt",
            "a cat",
            "--steps",
            "2",
        ])
        .arg("--out")
        .arg(&out)
        .env("HF_HUB_CACHE", &root)
        .status()
        .unwrap();
    assert!(status.success());
    assert!(out.is_file());
}

fn hf_cache_snapshot_in(root: &Path, repo: &str) -> Option<std::path::PathBuf> {
    erasure_studio::engine::io::hf_cache::hf_cache_snapshot_under(&[root.to_path_buf()], repo)
        .unwrap()
}

#[test]
fn legacy_checkpoint_names_load() {
    // transformers ≥ 5 drops the `text_model.` prefix; older diffusers VAEs use query/key/value.
    let dir = model_copy("legacy-names");
    let te = dir.join("text_encoder").join("model.safetensors");
    let tensors = candle_core::safetensors::load(&te, &Device::Cpu).unwrap();
    let renamed: std::collections::HashMap<_, _> = tensors
        .into_iter()
        .map(|(k, v)| (k.strip_prefix("text_model.").unwrap_or(&k).to_string(), v))
        .collect();
    candle_core::safetensors::save(&renamed, &te).unwrap();
    let vae = dir.join("vae").join("diffusion_pytorch_model.safetensors");
    let tensors = candle_core::safetensors::load(&vae, &Device::Cpu).unwrap();
    let renamed: std::collections::HashMap<_, _> = tensors
        .into_iter()
        .map(|(k, v)| {
            let k = k
                .replace(".to_q.", ".query.")
                .replace(".to_k.", ".key.")
                .replace(".to_v.", ".value.")
                .replace(".to_out.0.", ".proj_attn.");
            (k, v)
        })
        .collect();
    candle_core::safetensors::save(&renamed, &vae).unwrap();
    let source = ModelSource::folder(&dir).unwrap();
    source.text_encoder(&Device::Cpu, DType::F32).unwrap();
    source.vae(&Device::Cpu, DType::F32).unwrap();
}

#[test]
fn generate_without_a_model_uses_the_demo_model_folder() {
    let out = temp_dir("demo-default").join("x.png");
    let generate = |demo_dir: &Path| {
        std::process::Command::new(env!("CARGO_BIN_EXE_erasure-studio"))
            .args(["generate", "--prompt", "a red star", "--steps", "2"])
            .arg("--out")
            .arg(&out)
            .env("ERASURE_STUDIO_DEMO_MODEL", demo_dir)
            .output()
            .unwrap()
    };
    assert!(generate(&fixtures().join("tiny-sd1")).status.success());
    assert!(out.is_file());
    // A folder that is not a model is named in the error, with the variable that chose it.
    let empty = temp_dir("demo-empty");
    let failed = generate(&empty);
    assert!(!failed.status.success());
    let err = String::from_utf8_lossy(&failed.stderr);
    assert!(
        err.contains("ERASURE_STUDIO_DEMO_MODEL") && err.contains("not a model folder"),
        "{err}"
    );
}
