//! Finite-difference gradient checks in f64 on tiny configs: the engine must be trainable
//! through the erasure adapter (the cross-attention hook), the context, the text encoder and the
//! VAE decoder.

use candle_core::{DType, Device, Result, Tensor, TensorId, Var};
use std::collections::{HashMap, HashSet};

use candle_nn::{VarBuilder, VarMap};
use erasure_studio::adapter::{AdapterConfig, ErasureAdapter, SafeDelta};
use erasure_studio::engine::diffusion::noise::NoiseStream;
use erasure_studio::engine::models::clip::text::{ClipTextConfig, ClipTextModel};
use erasure_studio::engine::models::unet::config::UNetConfigFile;
use erasure_studio::engine::models::unet::{UNet, UNetConfig};
use erasure_studio::engine::models::vae::{AutoencoderKl, VaeConfig};
use erasure_studio::train::init::seeded_var_builder;

const DEV: Device = Device::Cpu;
const MAX_REL_ERR: f64 = 1e-5;
const STEP: f64 = 1e-5;

/// Random values everywhere (including norm weights and zero-initialised biases), so no path is
/// trivially zero. Models are built with seeded initialisation, so every run checks the same
/// point.
fn randomize(vars: &VarMap, seed: u64) {
    let mut rng = NoiseStream::new(seed);
    let mut all = vars
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect::<Vec<_>>();
    all.sort_by(|a, b| a.0.cmp(&b.0));
    for (_, var) in all {
        let t = var.as_tensor();
        let fan_in = if t.rank() >= 2 {
            t.elem_count() / t.dim(0).unwrap()
        } else {
            1
        };
        let noise = (randn(&mut rng, t.dims()) * (0.3 / (fan_in as f64).sqrt())).unwrap();
        var.set(&(t + noise).unwrap()).unwrap();
    }
}

/// Relative L2 error between analytic gradients and central differences at `coords` of `var`.
fn check_var(name: &str, var: &Var, coords: &[usize], loss: &dyn Fn() -> Result<Tensor>) {
    let grads = loss().unwrap().backward().unwrap();
    let analytic = grads
        .get(var.as_tensor())
        .unwrap_or_else(|| panic!("{name}: no gradient"))
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let base = var
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let shape = var.as_tensor().shape().clone();
    let (mut diff, mut norm) = (0.0, 0.0);
    for &i in coords {
        let eval = |delta: f64| {
            let mut v = base.clone();
            v[i] += delta;
            var.set(&Tensor::from_vec(v, shape.clone(), &DEV).unwrap())
                .unwrap();
            loss().unwrap().to_scalar::<f64>().unwrap()
        };
        let fd = (eval(STEP) - eval(-STEP)) / (2.0 * STEP);
        diff += (fd - analytic[i]).powi(2);
        norm += analytic[i].powi(2);
    }
    var.set(&Tensor::from_vec(base, shape, &DEV).unwrap())
        .unwrap();
    let rel = (diff / norm).sqrt();
    println!(
        "{name}: relative error {rel:.2e} over {} coordinates (‖g‖ = {:.3e})",
        coords.len(),
        norm.sqrt()
    );
    assert!(
        norm > 0.0,
        "{name}: gradient is zero at every checked coordinate"
    );
    assert!(rel <= MAX_REL_ERR, "{name}: relative error {rel:.3e}");
}

/// Seeded N(0, 1) values in f64 (candle's CPU generator cannot be seeded).
fn randn(rng: &mut NoiseStream, shape: &[usize]) -> Tensor {
    rng.tensor(shape, &DEV)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
}

fn var(rng: &mut NoiseStream, shape: &[usize], scale: f64) -> Var {
    Var::from_tensor(&(randn(rng, shape) * scale).unwrap()).unwrap()
}

fn coords(len: usize, count: usize) -> Vec<usize> {
    (0..count).map(|i| (i * 7919 + 13) % len).collect()
}

/// A fixed random projection of the output, so the loss depends on every element.
fn projection_loss(out: &Tensor, weights: &Tensor) -> Result<Tensor> {
    (out * weights)?.sum_all()
}

/// Every trainable tensor got a non-zero gradient.
fn assert_all_vars_get_gradients(what: &str, vars: &VarMap, loss: &Tensor) {
    let grads = loss.backward().unwrap();
    let data = vars.data().lock().unwrap();
    let mut missing = Vec::new();
    for (name, var) in data.iter() {
        let ok = grads.get(var.as_tensor()).is_some_and(|g| {
            g.abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
                > 0.0
        });
        if !ok {
            missing.push(name.clone());
        }
    }
    missing.sort();
    assert!(missing.is_empty(), "{what}: no gradient for {missing:?}");
}

fn tiny_unet(vars: &VarMap, json: &str) -> UNet {
    let file: UNetConfigFile = serde_json::from_str(json).unwrap();
    let vb = seeded_var_builder(vars, 0, DType::F64, &DEV);
    UNet::new(vb, &UNetConfig::from_file(&file).unwrap()).unwrap()
}

const TINY_UNET: &str = r#"{"block_out_channels": [8, 16], "layers_per_block": 1, "norm_num_groups": 4,
  "cross_attention_dim": 12, "attention_head_dim": 2,
  "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"]}"#;

const TINY_UNET_LINEAR: &str = r#"{"block_out_channels": [8, 16], "layers_per_block": 1, "norm_num_groups": 4,
  "cross_attention_dim": 12, "attention_head_dim": [2, 4], "use_linear_projection": true,
  "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]}"#;

/// The trainer's case: the base UNet frozen (plain tensors, as loaded from a file), gradients
/// to the adapter, the context and the input sample.
fn check_unet(json: &str, side: (usize, usize), safe_delta: SafeDelta) {
    let vars = VarMap::new();
    tiny_unet(&vars, json);
    randomize(&vars, 1);
    let frozen: HashMap<String, Tensor> = vars
        .data()
        .lock()
        .unwrap()
        .iter()
        .map(|(name, var)| (name.clone(), var.as_tensor().detach()))
        .collect();
    let file: UNetConfigFile = serde_json::from_str(json).unwrap();
    let vb = VarBuilder::from_tensors(frozen.clone(), DType::F64, &DEV);
    let unet = UNet::new(vb, &UNetConfig::from_file(&file).unwrap()).unwrap();
    let config = AdapterConfig {
        lora_rank: 2,
        lora_alpha: 3.0,
        tail_tokens: 2,
        safe_delta,
    };
    let adapter = ErasureAdapter::new(&unet, config, 4, DType::F64, &DEV).unwrap();
    randomize(adapter.vars(), 5);
    let mut rng = NoiseStream::new(11);
    let (ctx_len, ctx_dim) = (6, 12);
    let sample = var(&mut rng, &[2, 4, side.0, side.1], 1.0);
    let context = var(&mut rng, &[2, ctx_len, ctx_dim], 1.0);
    let t = Tensor::new(&[10u32, 700], &DEV).unwrap();
    let proj = randn(&mut rng, sample.dims());
    let loss = || {
        projection_loss(
            &unet.forward(sample.as_tensor(), &t, context.as_tensor(), Some(&adapter))?,
            &proj,
        )
    };
    // Every adapter variable of the first and last cross-attention layers.
    let layers = unet.cross_attn_layers();
    let checked = [&layers[0].path, &layers[layers.len() - 1].path];
    let adapter_vars = adapter.vars().data().lock().unwrap().clone();
    let mut names: Vec<_> = adapter_vars
        .keys()
        .filter(|n| checked.iter().any(|p| n.starts_with(p.as_str())))
        .collect();
    names.sort();
    assert!(names.len() >= 8, "{names:?}");
    for name in names {
        let var = &adapter_vars[name];
        check_var(name, var, &coords(var.as_tensor().elem_count(), 8), &loss);
    }
    check_var(
        "context",
        &context,
        &coords(2 * ctx_len * ctx_dim, 16),
        &loss,
    );
    check_var(
        "sample",
        &sample,
        &coords(sample.as_tensor().elem_count(), 16),
        &loss,
    );
    // The backward pass computes no gradient for the frozen weights: nothing the store holds
    // beyond the variables' gradients (leftovers for constants candle differentiates anyway,
    // such as padding) is shaped like a weight, or a transposed one.
    let grads = loss().unwrap().backward().unwrap();
    let mut var_ids: HashSet<TensorId> =
        adapter_vars.values().map(|v| v.as_tensor().id()).collect();
    var_ids.extend([sample.as_tensor().id(), context.as_tensor().id()]);
    let mut weight_shapes: HashSet<Vec<usize>> = HashSet::new();
    for weight in frozen.values() {
        let dims = weight.dims().to_vec();
        weight_shapes.insert(dims.iter().rev().copied().collect());
        weight_shapes.insert(dims);
    }
    let weight_like: Vec<_> = grads
        .get_ids()
        .filter(|id| !var_ids.contains(id))
        .map(|&id| grads.get_id(id).unwrap().dims().to_vec())
        .filter(|dims| weight_shapes.contains(dims))
        .collect();
    assert!(
        weight_like.is_empty(),
        "gradients shaped like frozen weights: {weight_like:?}"
    );
    assert_all_vars_get_gradients("adapter", adapter.vars(), &loss().unwrap());
}

#[test]
fn unet_gradients_through_hook_and_context_match_finite_differences() {
    check_unet(TINY_UNET, (8, 8), SafeDelta::Full {});
}

#[test]
fn unet_linear_projection_odd_size_gradients_match_finite_differences() {
    check_unet(TINY_UNET_LINEAR, (6, 5), SafeDelta::LowRank { rank: 3 });
}

#[test]
fn unet_weight_gradients_match_finite_differences() {
    let vars = VarMap::new();
    let unet = tiny_unet(&vars, TINY_UNET);
    randomize(&vars, 2);
    let mut rng = NoiseStream::new(12);
    let sample = randn(&mut rng, &[1, 4, 8, 8]);
    let context = randn(&mut rng, &[1, 5, 12]);
    let t = Tensor::new(&[300u32], &DEV).unwrap();
    let proj = randn(&mut rng, sample.dims());
    let loss = || projection_loss(&unet.forward(&sample, &t, &context, None)?, &proj);
    let data = vars.data().lock().unwrap().clone();
    for name in [
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight",
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight",
        "down_blocks.0.attentions.0.transformer_blocks.0.norm1.weight",
        "down_blocks.0.attentions.0.norm.weight",
        "up_blocks.1.resnets.0.conv1.weight",
        "time_embedding.linear_1.weight",
    ] {
        let var = &data[name];
        check_var(name, var, &coords(var.as_tensor().elem_count(), 8), &loss);
    }
}

#[test]
fn text_encoder_gradients_match_finite_differences() {
    let cfg: ClipTextConfig = serde_json::from_str(
        r#"{"vocab_size": 50, "hidden_size": 12, "intermediate_size": 20, "num_hidden_layers": 2,
            "num_attention_heads": 3, "max_position_embeddings": 9, "hidden_act": "gelu"}"#,
    )
    .unwrap();
    let vars = VarMap::new();
    let model = ClipTextModel::new(seeded_var_builder(&vars, 0, DType::F64, &DEV), &cfg).unwrap();
    randomize(&vars, 3);
    let mut rng = NoiseStream::new(13);
    let ids = Tensor::new(
        &[
            [48u32, 3, 7, 9, 49, 49, 49, 49, 49],
            [48, 11, 49, 49, 49, 49, 49, 49, 49],
        ],
        &DEV,
    )
    .unwrap();
    let proj = randn(&mut rng, &[2, 9, 12]);
    let loss = || projection_loss(&model.forward(&ids)?, &proj);
    let data = vars.data().lock().unwrap().clone();
    for name in [
        "text_model.embeddings.token_embedding.weight",
        "text_model.embeddings.position_embedding.weight",
        "text_model.encoder.layers.0.self_attn.q_proj.weight",
        "text_model.encoder.layers.1.layer_norm1.weight",
        "text_model.encoder.layers.1.mlp.fc1.weight",
        "text_model.final_layer_norm.bias",
    ] {
        let var = &data[name];
        check_var(name, var, &coords(var.as_tensor().elem_count(), 10), &loss);
    }
    drop(data);
    assert_all_vars_get_gradients("text encoder", &vars, &loss().unwrap());
}

#[test]
fn vae_decoder_gradients_match_finite_differences() {
    let cfg: VaeConfig = serde_json::from_str(
        r#"{"block_out_channels": [8, 16], "layers_per_block": 1, "norm_num_groups": 4, "latent_channels": 4,
            "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D"],
            "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"]}"#,
    )
    .unwrap();
    let vars = VarMap::new();
    let vae = AutoencoderKl::new(seeded_var_builder(&vars, 0, DType::F64, &DEV), &cfg).unwrap();
    randomize(&vars, 4);
    let mut rng = NoiseStream::new(14);
    let latents = var(&mut rng, &[1, 4, 4, 3], 1.0);
    let proj = randn(&mut rng, &[1, 3, 8, 6]);
    let loss = || projection_loss(&vae.decode(latents.as_tensor())?, &proj);
    check_var("latents", &latents, &coords(48, 16), &loss);
    let data = vars.data().lock().unwrap().clone();
    for name in [
        "decoder.mid_block.attentions.0.to_q.weight",
        "decoder.mid_block.attentions.0.group_norm.weight",
        "decoder.up_blocks.0.upsamplers.0.conv.weight",
        "decoder.conv_in.weight",
    ] {
        let var = &data[name];
        check_var(name, var, &coords(var.as_tensor().elem_count(), 8), &loss);
    }
    // Only the decoder is on this loss's path; every decoder tensor must get a gradient.
    let grads = loss().unwrap().backward().unwrap();
    for (name, var) in data
        .iter()
        .filter(|(n, _)| n.starts_with("decoder.") || n.starts_with("post_quant"))
    {
        assert!(
            grads.get(var.as_tensor()).is_some(),
            "vae decoder: no gradient for {name}"
        );
    }
}

#[test]
fn clip_model_gradients_match_finite_differences() {
    use erasure_studio::engine::models::clip::{ClipModel, ClipModelConfig};
    let cfg: ClipModelConfig = serde_json::from_str(
        r#"{"text_config": {"vocab_size": 30, "hidden_size": 12, "intermediate_size": 16,
              "num_hidden_layers": 1, "num_attention_heads": 3, "max_position_embeddings": 6},
            "vision_config": {"hidden_size": 12, "intermediate_size": 16, "num_hidden_layers": 1,
              "num_attention_heads": 2, "image_size": 8, "patch_size": 4},
            "projection_dim": 5}"#,
    )
    .unwrap();
    let vars = VarMap::new();
    let clip = ClipModel::new(seeded_var_builder(&vars, 0, DType::F64, &DEV), &cfg).unwrap();
    randomize(&vars, 5);
    let mut rng = NoiseStream::new(15);
    let pixels = randn(&mut rng, &[2, 3, 8, 8]);
    // Legacy eos id 2: pooling takes each row's highest id (29 here).
    let ids = Tensor::new(&[[1u32, 5, 7, 29, 29, 29], [1, 29, 29, 29, 29, 29]], &DEV).unwrap();
    let (wi, wt) = (randn(&mut rng, &[2, 5]), randn(&mut rng, &[2, 5]));
    let loss = || {
        let image = projection_loss(&clip.image_embeds(&pixels)?, &wi)?;
        image + projection_loss(&clip.text_embeds(&ids)?, &wt)?
    };
    let data = vars.data().lock().unwrap().clone();
    for name in [
        "vision_model.embeddings.patch_embedding.weight",
        "vision_model.embeddings.class_embedding",
        "vision_model.pre_layrnorm.weight",
        "visual_projection.weight",
        "text_model.embeddings.token_embedding.weight",
        "text_projection.weight",
    ] {
        let var = &data[name];
        check_var(name, var, &coords(var.as_tensor().elem_count(), 8), &loss);
    }
    drop(data);
    // logit_scale only enters contrastive losses, not the embeddings.
    let grads = loss().unwrap().backward().unwrap();
    let data = vars.data().lock().unwrap();
    let mut missing: Vec<&String> = data
        .iter()
        .filter(|(name, var)| *name != "logit_scale" && grads.get(var.as_tensor()).is_none())
        .map(|(name, _)| name)
        .collect();
    missing.sort();
    assert!(missing.is_empty(), "no gradient for {missing:?}");
}

/// The PPO loss plus the preservation term of one stored denoising step, through the UNet and
/// the adapter, in f64 on the
/// tiny fixture model: its gradient on the adapter's variables against central differences.
#[test]
fn ppo_and_preservation_gradients_through_the_adapter_match_finite_differences() {
    use erasure_studio::engine::diffusion::ddim::Ddim;
    use erasure_studio::engine::diffusion::pipeline::{Conditioning, GenerateRequest};
    use erasure_studio::engine::{ModelSource, StableDiffusion};
    use erasure_studio::erasure::ppo::clipped_loss;
    use erasure_studio::erasure::rollout::{Trajectories, step_log_prob, step_output_drift};

    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-sd1");
    let sd = StableDiffusion::load(&ModelSource::folder(&root).unwrap(), &DEV, DType::F64).unwrap();
    let config = AdapterConfig {
        lora_rank: 2,
        lora_alpha: 2.0,
        tail_tokens: 3,
        safe_delta: SafeDelta::LowRank { rank: 2 },
    };
    let adapter = ErasureAdapter::new(&sd.unet, config, 3, DType::F64, &DEV).unwrap();
    randomize(adapter.vars(), 8);
    let request = GenerateRequest {
        prompts: vec!["a red star".into(), "a cat".into(), "a blue circle".into()],
        negative_prompt: String::new(),
        seed: 0,
        steps: 4,
        guidance_scale: 3.0,
        width: 16,
        height: 16,
        eta: 1.0,
    };
    // The text encoder's fused layer norm has no f64 kernel: encode in f32, then widen.
    let sd32 =
        StableDiffusion::load(&ModelSource::folder(&root).unwrap(), &DEV, DType::F32).unwrap();
    let encoded = Conditioning::encode(
        &sd32,
        &request.prompts,
        &request.negative_prompt,
        request.guidance_scale,
    )
    .unwrap();
    let conditioning = Conditioning {
        cond: encoded.cond.to_dtype(DType::F64).unwrap(),
        uncond: encoded.uncond.map(|u| u.to_dtype(DType::F64).unwrap()),
        guidance_scale: encoded.guidance_scale,
    };
    let mut rng = NoiseStream::new(21);
    // Latents as variables: the loaded UNet's weights record no graph, and only a tracked
    // input takes the engine's differentiable (f64-capable) kernels from the first layer on.
    let latents: Vec<Tensor> = (0..=request.steps)
        .map(|_| var(&mut rng, &[3, 4, 2, 2], 1.0).as_tensor().clone())
        .collect();
    let items = Tensor::new(&[0u32, 1, 2], &DEV).unwrap();
    let mut traj = Trajectories {
        request: request.clone(),
        ddim: Ddim::new(&sd.scheduler, request.steps).unwrap(),
        conditioning,
        latents,
        log_probs: Vec::new(),
        outputs: (0..request.steps)
            .map(|_| var(&mut rng, &[3, 4, 2, 2], 1.0).as_tensor().clone())
            .collect(),
    };
    let step = 1;
    // Old log-probabilities a little off the current ones, so the ratios differ from 1 but stay
    // inside the clip range (the loss has kinks at its edges).
    let current = step_log_prob(&sd, &adapter, &traj, step, &items)
        .unwrap()
        .detach();
    let offsets = Tensor::new(&[0.05, -0.03, 0.08], &DEV).unwrap();
    traj.log_probs = vec![(current + offsets).unwrap(); request.steps];
    let advantages = Tensor::new(&[1.2, -0.7, 0.4], &DEV).unwrap();
    // The PPO loss plus the preservation term against stored (random) outputs.
    let loss = || {
        let new = step_log_prob(&sd, &adapter, &traj, step, &items)?;
        let ppo = clipped_loss(&new, &traj.log_probs[step], &advantages, 0.2)?.0;
        ppo + step_output_drift(&sd, &adapter, &traj, step, &items)?.mean(0)?
    };
    let layers = sd.unet.cross_attn_layers();
    let last = &layers[layers.len() - 1].path;
    let vars = adapter.vars().data().lock().unwrap().clone();
    let mut names: Vec<_> = vars
        .keys()
        .filter(|n| n.starts_with(last.as_str()))
        .collect();
    names.sort();
    assert_eq!(names.len(), 8, "{names:?}");
    for name in names {
        let var = &vars[name];
        check_var(name, var, &coords(var.as_tensor().elem_count(), 6), &loss);
    }
}
