//! Trajectories for policy-gradient training: stochastic DDIM sampling through the adapter (or
//! the original model), every latent kept, with each step's guided noise prediction and
//! log-probability under the policy that sampled it.
//!
//! Sampling goes through the adapter itself (not [`ErasureAdapter::detached`]), so the engine
//! runs the same differentiable kernels as when the trainer scores the stored steps again:
//! before any update, recomputing the batch as sampled gives the stored log-probabilities bit
//! for bit and the PPO ratio starts at exactly 1 (the fused inference kernels round differently,
//! which a clip range of 1e-4 would notice).

use candle_core::{Result, Tensor};

use crate::adapter::ErasureAdapter;
use crate::engine::StableDiffusion;
use crate::engine::diffusion::ddim::{Ddim, Transition};
use crate::engine::diffusion::noise::BatchNoise;
use crate::engine::diffusion::pipeline::{Conditioning, GenerateRequest, latent_shape};
use crate::engine::models::unet::UNetHook;

/// One batch of sampled trajectories.
pub struct Trajectories {
    pub request: GenerateRequest,
    pub ddim: Ddim,
    /// The prompts' conditioning, and the negative prompt's with guidance.
    pub conditioning: Conditioning,
    /// x_T, …, x_0: one more than the steps, each [B, C, h, w].
    pub latents: Vec<Tensor>,
    /// Per-dimension log p(x_{t−1} | x_t) of each step, [B], under the policy that sampled it.
    pub log_probs: Vec<Tensor>,
    /// Each step's guided model output under that policy, [B, C, h, w].
    pub outputs: Vec<Tensor>,
}

impl Trajectories {
    /// The clean latents x_0 [B, C, h, w].
    pub fn final_latents(&self) -> &Tensor {
        self.latents
            .last()
            .expect("a trajectory has its initial latents")
    }

    pub fn steps(&self) -> usize {
        self.log_probs.len()
    }
}

/// Samples `request` (its η must be > 0: a deterministic step has no density) through `adapter`,
/// or through the original model when it is `None`.
pub fn sample(
    sd: &StableDiffusion,
    adapter: Option<&ErasureAdapter>,
    request: &GenerateRequest,
) -> anyhow::Result<Trajectories> {
    Ok(sample_until(sd, adapter, request, &|| false)?.expect("never stopped"))
}

/// [`sample`], polling `stop` before every denoising step: `None` once it returns true, so a
/// stop request waits for one UNet call, not a whole batch.
pub fn sample_until(
    sd: &StableDiffusion,
    adapter: Option<&ErasureAdapter>,
    request: &GenerateRequest,
    stop: &(dyn Fn() -> bool + Sync),
) -> anyhow::Result<Option<Trajectories>> {
    if request.eta <= 0.0 {
        anyhow::bail!(
            "policy-gradient sampling needs DDIM η > 0, got {}",
            request.eta
        );
    }
    let ddim = Ddim::new(&sd.scheduler, request.steps)?;
    let conditioning = Conditioning::encode(
        sd,
        &request.prompts,
        &request.negative_prompt,
        request.guidance_scale,
    )?;
    let shape = latent_shape(sd, request.width, request.height)?;
    let mut noise = BatchNoise::new(request.seed, request.prompts.len());
    let mut x = (noise.tensor(&shape, &sd.device)? * ddim.init_noise_sigma())?;
    let mut latents = vec![x.clone()];
    let mut log_probs = Vec::with_capacity(request.steps);
    let mut outputs = Vec::with_capacity(request.steps);
    let hook = adapter.map(|a| a as &dyn UNetHook);
    for &t in ddim.timesteps() {
        if stop() {
            return Ok(None);
        }
        let out = conditioning.predict(&sd.unet, &x, t, hook)?.detach();
        outputs.push(out.clone());
        let step_noise = noise.tensor(&shape, &sd.device)?;
        let step = ddim.step(&out, t, &x, request.eta, Some(&step_noise))?;
        let log_prob = per_dimension_log_prob(&step.transition, &step.prev_sample)?
            .expect("η > 0 gives every step a density");
        log_probs.push(log_prob.detach());
        x = step.prev_sample.detach();
        latents.push(x.clone());
    }
    Ok(Some(Trajectories {
        request: request.clone(),
        ddim,
        conditioning,
        latents,
        log_probs,
        outputs,
    }))
}

/// log p(x_{t−1} | x_t) divided by the latent's size, as DDPO does. The full log-density
/// moves by hundreds when the mean shifts a little, so every PPO ratio would leave any sensible
/// clip range after the first update; per dimension, the clip range means the same at every
/// image size.
fn per_dimension_log_prob(transition: &Transition, x_prev: &Tensor) -> Result<Option<Tensor>> {
    let per_item = x_prev.elem_count() / x_prev.dim(0)?;
    transition
        .log_prob(x_prev)?
        .map(|lp| lp / per_item as f64)
        .transpose()
}

/// Per-dimension log p(x_{t−1} | x_t) [items] of the stored step `step` for batch `items`, under the adapter
/// as it is now, with gradients to its variables. Before any update it equals the stored value
/// bit for bit when `items` is the whole batch in order; another composition changes the GEMM
/// tiling and with it the last bits (about 1e-7 relative).
pub fn step_log_prob(
    sd: &StableDiffusion,
    adapter: &ErasureAdapter,
    traj: &Trajectories,
    step: usize,
    items: &Tensor,
) -> Result<Tensor> {
    let (x, out) = adapter_output(sd, adapter, traj, step, items)?;
    let t = traj.ddim.timesteps()[step];
    let transition = traj.ddim.transition(&out, t, &x, traj.request.eta)?;
    let x_prev = traj.latents[step + 1].index_select(items, 0)?;
    match per_dimension_log_prob(&transition, &x_prev)? {
        Some(log_prob) => Ok(log_prob),
        None => candle_core::bail!("step {step} of the trajectory is deterministic"),
    }
}

/// Mean squared difference [items] between the adapter's guided noise prediction and the stored
/// one of the policy that sampled the trajectory, at the stored step `step`. It is that step's KL
/// divergence scaled by 2σ²/c², c being how much the noise prediction moves the mean: the
/// weighting of the plain diffusion loss, which keeps the last, nearly deterministic steps
/// (σ → 0) from swamping the rest.
pub fn step_output_drift(
    sd: &StableDiffusion,
    adapter: &ErasureAdapter,
    traj: &Trajectories,
    step: usize,
    items: &Tensor,
) -> Result<Tensor> {
    let (_, out) = adapter_output(sd, adapter, traj, step, items)?;
    let shift = (out - traj.outputs[step].index_select(items, 0)?)?;
    shift.sqr()?.flatten_from(1)?.mean(1)
}

/// Mean squared difference [items] between the adapter's noise prediction for the prompt at the
/// stored step `step` and where the original model points once the concept is taken out:
/// `v(anchor) − g·(v(prompt) − v(anchor))`, `anchor` being the prompt without the concept words
/// (its text conditioning [items, L, D]) and `g` the negative guidance that pushes further away
/// from the concept (ESD's). Unguided, on the prompt's branch only, so the unconditional branch,
/// which every prompt shares, is left to the preservation term.
pub fn step_anchor_distance(
    sd: &StableDiffusion,
    adapter: &ErasureAdapter,
    traj: &Trajectories,
    step: usize,
    items: &Tensor,
    anchor: &Tensor,
    negative_guidance: f64,
) -> Result<Tensor> {
    let t = traj.ddim.timesteps()[step];
    let x = traj.latents[step].index_select(items, 0)?;
    let unguided = |cond: Tensor| Conditioning {
        cond,
        uncond: None,
        guidance_scale: 1.0,
    };
    let prompt = unguided(traj.conditioning.cond.index_select(items, 0)?);
    let anchored = unguided(anchor.clone())
        .predict(&sd.unet, &x, t, None)?
        .detach();
    // Without negative guidance the prompt's own prediction drops out: spare its UNet call.
    let target = if negative_guidance == 0.0 {
        anchored
    } else {
        let original = prompt.predict(&sd.unet, &x, t, None)?.detach();
        (&anchored - ((original - &anchored)? * negative_guidance)?)?
    };
    let out = prompt.predict(&sd.unet, &x, t, Some(adapter))?;
    (out - target)?.sqr()?.flatten_from(1)?.mean(1)
}

/// The stored x_t of step `step` for batch `items`, and the adapter's guided output there, with
/// gradients to its variables.
fn adapter_output(
    sd: &StableDiffusion,
    adapter: &ErasureAdapter,
    traj: &Trajectories,
    step: usize,
    items: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let t = traj.ddim.timesteps()[step];
    let x = traj.latents[step].index_select(items, 0)?;
    let conditioning = traj.conditioning.select(items)?;
    let out = conditioning.predict(&sd.unet, &x, t, Some(adapter))?;
    Ok((x, out))
}
