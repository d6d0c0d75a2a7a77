//! Trajectories for the policy-gradient trainer on the tiny fixture model: the stored
//! log-probabilities are what the trainer recomputes before any update (bit for bit on the batch
//! as sampled, to float rounding on a minibatch), they move when the adapter does, and gradients
//! reach the adapter.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{max_abs, tiny_sd1};
use erasure_studio::adapter::{AdapterConfig, ErasureAdapter};
use erasure_studio::engine::StableDiffusion;
use erasure_studio::engine::diffusion::noise::NoiseStream;
use erasure_studio::engine::diffusion::pipeline::GenerateRequest;
use erasure_studio::erasure::rollout::{sample, step_log_prob};

fn request(eta: f64) -> GenerateRequest {
    GenerateRequest {
        prompts: vec!["a red star".into(), "a blue circle".into(), "a cat".into()],
        negative_prompt: String::new(),
        seed: 7,
        steps: 4,
        guidance_scale: 4.0,
        width: 32,
        height: 32,
        eta,
    }
}

fn fresh_adapter(sd: &StableDiffusion) -> ErasureAdapter {
    ErasureAdapter::new(
        &sd.unet,
        AdapterConfig::default(),
        1,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap()
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    max_abs(&(a - b).unwrap())
}

#[test]
fn recomputed_log_probs_match_the_stored_ones_until_the_adapter_moves() {
    let sd = tiny_sd1();
    let adapter = fresh_adapter(&sd);
    let traj = sample(&sd, Some(&adapter), &request(1.0)).unwrap();
    assert_eq!(traj.steps(), 4);
    assert_eq!(traj.latents.len(), 5);
    assert_eq!(traj.final_latents().dims(), &[3, 4, 16, 16]);
    let all = Tensor::new(&[0u32, 1, 2], &Device::Cpu).unwrap();
    let pair = Tensor::new(&[2u32, 0], &Device::Cpu).unwrap();
    for step in 0..traj.steps() {
        let stored = &traj.log_probs[step];
        let again = step_log_prob(&sd, &adapter, &traj, step, &all).unwrap();
        assert_eq!(
            max_abs_diff(&again, stored),
            0.0,
            "step {step}, whole batch"
        );
        // Another batch composition changes GEMM tiling, hence the last bits.
        let some = step_log_prob(&sd, &adapter, &traj, step, &pair).unwrap();
        let expected = stored.index_select(&pair, 0).unwrap();
        let scale = expected
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let diff = max_abs_diff(&some, &expected);
        assert!(
            diff <= 1e-6 * scale,
            "step {step}, minibatch: {diff} of {scale}"
        );
    }

    // Move the adapter: the log-probabilities change and carry gradients to it.
    let mut rng = NoiseStream::new(3);
    for var in adapter.vars().data().lock().unwrap().values() {
        let noise = (rng.tensor(var.dims(), &Device::Cpu).unwrap() * 0.05).unwrap();
        var.set(&(var.as_tensor() + noise).unwrap()).unwrap();
    }
    let moved = step_log_prob(&sd, &adapter, &traj, 1, &all).unwrap();
    assert!(max_abs_diff(&moved, &traj.log_probs[1]) > 1e-5);
    let grads = moved.sum_all().unwrap().backward().unwrap();
    let data = adapter.vars().data().lock().unwrap();
    let with_grad = data
        .values()
        .filter(|v| grads.get(v.as_tensor()).is_some())
        .count();
    assert_eq!(with_grad, data.len());
}

#[test]
fn deterministic_sampling_is_refused_with_a_reason() {
    let sd = tiny_sd1();
    let adapter = fresh_adapter(&sd);
    let err = sample(&sd, Some(&adapter), &request(0.0)).err().unwrap();
    assert!(format!("{err}").contains("η > 0"), "{err}");
}
