//! DDIM against diffusers' reference values, and the step log-probability against an
//! independently computed Gaussian density.

mod common;

use candle_core::{DType, Device, Tensor};
use erasure_studio::engine::diffusion::ddim::{Ddim, SchedulerConfig};
use serde_json::Value;

fn fixture() -> Value {
    let path = common::fixtures().join("parity").join("ddim.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn values(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn tensor(v: &[f64], shape: &[usize]) -> Tensor {
    Tensor::from_vec(v.to_vec(), shape, &Device::Cpu).unwrap()
}

#[test]
fn schedules_and_steps_match_diffusers() {
    let fx = fixture();
    let shape: Vec<usize> = fx["shape"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as usize)
        .collect();
    let sample = tensor(&values(&fx["sample"]), &shape);
    let model_output = tensor(&values(&fx["model_output"]), &shape);
    let noise = tensor(&values(&fx["variance_noise"]), &shape);
    let cases = fx["cases"].as_array().unwrap();
    assert!(cases.len() >= 8);
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let config: SchedulerConfig = serde_json::from_value(case["config"].clone()).unwrap();
        let steps = case["num_inference_steps"].as_u64().unwrap() as usize;
        let ddim = Ddim::new(&config, steps).unwrap();
        let want: Vec<usize> = case["timesteps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(ddim.timesteps(), want.as_slice(), "{name}: timesteps");
        for (idx, value) in case["alphas_cumprod"].as_object().unwrap() {
            let (got, want) = (
                ddim.alpha_cumprod(idx.parse().unwrap()),
                value.as_f64().unwrap(),
            );
            // diffusers keeps the schedule in float32.
            assert!(
                (got - want).abs() <= 1e-6 * want.max(1e-3),
                "{name}: alphas_cumprod[{idx}] {got} vs {want}"
            );
        }
        for step in case["steps"].as_array().unwrap() {
            let t = step["timestep"].as_u64().unwrap() as usize;
            let eta = step["eta"].as_f64().unwrap();
            let out = ddim
                .step(
                    &model_output,
                    t,
                    &sample,
                    eta,
                    (eta > 0.0).then_some(&noise),
                )
                .unwrap();
            let got = out
                .prev_sample
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            for (g, w) in got.iter().zip(values(&step["prev_sample"])) {
                assert!(
                    (g - w).abs() <= 1e-5,
                    "{name}: step at t={t}, eta={eta}: {got:?} vs {w}"
                );
            }
        }
    }
}

#[test]
fn trailing_spacing_gives_exactly_the_requested_steps() {
    let config = SchedulerConfig {
        timestep_spacing: erasure_studio::engine::diffusion::ddim::TimestepSpacing::Trailing,
        ..Default::default()
    };
    // numpy's arange yields one entry too many (−1) for these counts.
    for steps in [61, 96, 103, 121] {
        let ddim = Ddim::new(&config, steps).unwrap();
        assert_eq!(ddim.timesteps().len(), steps);
        assert_eq!(ddim.timesteps()[0], 999);
        assert!(ddim.timesteps().windows(2).all(|w| w[0] > w[1]));
    }
}

#[test]
fn step_log_prob_is_the_gaussian_density_of_the_drawn_sample() {
    let config = SchedulerConfig {
        beta_schedule: erasure_studio::engine::diffusion::ddim::BetaSchedule::ScaledLinear,
        beta_start: 0.00085,
        beta_end: 0.012,
        clip_sample: false,
        set_alpha_to_one: false,
        steps_offset: 1,
        ..Default::default()
    };
    let ddim = Ddim::new(&config, 20).unwrap();
    let dev = Device::Cpu;
    let mut rng = erasure_studio::engine::diffusion::noise::NoiseStream::new(5);
    let sample = rng
        .tensor((2, 4, 3, 3), &dev)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    let eps = rng
        .tensor((2, 4, 3, 3), &dev)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    let noise = rng.tensor((2, 4, 3, 3), &dev).unwrap();
    for &t in &ddim.timesteps()[..3] {
        let step = ddim.step(&eps, t, &sample, 1.0, Some(&noise)).unwrap();
        let log_p = step
            .transition
            .log_prob(&step.prev_sample)
            .unwrap()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        // Independent computation: per element, log N(x; μ, σ²) from the DDIM formulas.
        let a_t = ddim.alpha_cumprod(t);
        let a_prev = ddim.alpha_cumprod(t - 1000 / 20);
        let sigma = ((1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev)).sqrt();
        let x = step
            .prev_sample
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let s = sample.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let e = eps.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let per_item = x.len() / 2;
        for (b, &got) in log_p.iter().enumerate() {
            let mut expected = 0.0;
            for i in b * per_item..(b + 1) * per_item {
                let x0 = (s[i] - (1.0 - a_t).sqrt() * e[i]) / a_t.sqrt();
                let mu = a_prev.sqrt() * x0 + (1.0 - a_prev - sigma * sigma).sqrt() * e[i];
                expected += -(x[i] - mu).powi(2) / (2.0 * sigma * sigma)
                    - sigma.ln()
                    - 0.5 * (2.0 * std::f64::consts::PI).ln();
            }
            assert!(
                (got - expected).abs() <= 1e-9 * expected.abs().max(1.0),
                "t={t}: {got} vs {expected}"
            );
        }
        // A sample away from the mean is less likely than the mean itself.
        let at_mean = step
            .transition
            .log_prob(&step.transition.mean)
            .unwrap()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        assert!(at_mean[0] > log_p[0]);
    }
    // Deterministic steps have no density.
    let det = ddim
        .step(&eps, ddim.timesteps()[0], &sample, 0.0, None)
        .unwrap();
    assert!(det.transition.log_prob(&det.prev_sample).unwrap().is_none());
}

#[test]
fn unsupported_scheduler_settings_are_named() {
    let dir = common::temp_dir("bad-scheduler");
    let path = dir.join("scheduler_config.json");
    for (json, needle) in [
        (r#"{"beta_schedule": "sigmoid"}"#, "sigmoid"),
        (r#"{"prediction_type": "flow"}"#, "flow"),
        (r#"{"thresholding": true}"#, "thresholding"),
        (r#"{"timestep_spacing": "karras"}"#, "karras"),
    ] {
        std::fs::write(&path, json).unwrap();
        let err = format!("{:#}", SchedulerConfig::load(&path).unwrap_err());
        assert!(
            err.contains("scheduler_config.json") && err.contains(needle),
            "{json}: {err}"
        );
    }
    let err = Ddim::new(&SchedulerConfig::default(), 0)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("inference steps"), "{err}");
}
