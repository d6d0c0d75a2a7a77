//! End-to-end sampling on the tiny fixture model: seeds, batches, guidance, img2img, the CLI.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{fixtures, rel_l2, temp_dir, tiny_sd1};
use erasure_studio::engine::diffusion::pipeline::{GenerateRequest, SampleHooks, img2img, txt2img};
use erasure_studio::engine::{ModelSource, StableDiffusion};

fn request(prompts: &[&str], seed: u64, eta: f64) -> GenerateRequest {
    GenerateRequest {
        prompts: prompts.iter().map(|p| p.to_string()).collect(),
        negative_prompt: String::new(),
        seed,
        steps: 4,
        guidance_scale: 5.0,
        width: 32,
        height: 24,
        eta,
    }
}

#[test]
fn seeds_reproduce_and_batch_items_match_single_runs() {
    let sd = tiny_sd1();
    for eta in [0.0, 1.0] {
        let generate = |prompts: &[&str], seed: u64| {
            txt2img(&sd, &request(prompts, seed, eta), SampleHooks::default()).unwrap()
        };
        let (batch, images) = generate(&["a cat", "a dog"], 7);
        assert_eq!(images.dims(), &[2, 3, 24, 32]);
        let (again, _) = generate(&["a cat", "a dog"], 7);
        assert_eq!(
            rel_l2(&batch, &again),
            0.0,
            "eta {eta}: same seed, same latents"
        );
        // Item 1 of the batch is seed 8 on its own.
        let (single, _) = generate(&["a dog"], 8);
        let err = rel_l2(&batch.narrow(0, 1, 1).unwrap(), &single);
        assert!(err < 1e-5, "eta {eta}: batch item vs single run {err}");
        let (other, _) = generate(&["a cat", "a dog"], 9);
        assert!(
            rel_l2(&batch, &other) > 1e-2,
            "eta {eta}: another seed must change the result"
        );
    }
}

#[test]
fn guidance_and_prompts_change_the_result() {
    let sd = tiny_sd1();
    let (cat, images) = txt2img(&sd, &request(&["a cat"], 1, 0.0), SampleHooks::default()).unwrap();
    let values = images.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(values.iter().all(|v| (0.0..=1.0).contains(v)));
    let (dog, _) = txt2img(&sd, &request(&["a dog"], 1, 0.0), SampleHooks::default()).unwrap();
    assert!(rel_l2(&cat, &dog) > 1e-4);
    let mut unguided = request(&["a cat"], 1, 0.0);
    unguided.guidance_scale = 1.0;
    let (plain, _) = txt2img(&sd, &unguided, SampleHooks::default()).unwrap();
    assert!(rel_l2(&cat, &plain) > 1e-4);
    let mut bad = request(&["a cat"], 1, 0.0);
    bad.width = 31;
    let err = txt2img(&sd, &bad, SampleHooks::default())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("multiples of 2"), "{err}");
}

#[test]
fn img2img_keeps_low_strength_close_to_the_init_image() {
    let sd = tiny_sd1();
    let req = request(&["a cat"], 3, 0.0);
    let init = Tensor::rand(0f32, 1.0, (1, 3, 24, 32), &Device::Cpu).unwrap();
    let (low, _) = img2img(&sd, &req, &init, 0.25, SampleHooks::default()).unwrap();
    let (high, _) = img2img(&sd, &req, &init, 1.0, SampleHooks::default()).unwrap();
    assert_eq!(low.dims(), &[1, 4, 12, 16]);
    // The encoded init image, for reference.
    let encoded = sd
        .vae
        .scale(
            &sd.vae
                .encode(&((init * 2.0).unwrap() - 1.0).unwrap())
                .unwrap()
                .mean,
        )
        .unwrap();
    assert!(rel_l2(&low, &encoded) < rel_l2(&high, &encoded));
    let err = img2img(
        &sd,
        &req,
        &Tensor::zeros((1, 3, 24, 32), DType::F32, &Device::Cpu).unwrap(),
        0.1,
        SampleHooks::default(),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("no denoising step"), "{err}");
}

#[test]
fn cli_generates_txt2img_and_img2img_pngs() {
    let dir = temp_dir("cli-generate");
    let model = fixtures().join("tiny-sd1");
    let run = |extra: &[&str], out: &str| {
        common::run_cli(
            std::process::Command::new(env!("CARGO_BIN_EXE_erasure-studio"))
                .arg("generate")
                .arg("--model")
                .arg(&model)
                .args([
                    "--prompt",
                    "a red star",
                    "--steps",
                    "3",
                    "--batch",
                    "4",
                    "--width",
                    "16",
                    "--height",
                    "16",
                ])
                .args(extra)
                .arg("--out")
                .arg(dir.join(out)),
        );
        image::open(dir.join(out)).unwrap().to_rgb8()
    };
    let grid = run(&[], "t2i.png");
    assert_eq!(
        grid.dimensions(),
        (32, 32),
        "four 16×16 images in a 2×2 grid"
    );
    let init = dir.join("t2i.png");
    let i2i = run(
        &["--init-image", init.to_str().unwrap(), "--strength", "0.5"],
        "i2i.png",
    );
    assert_eq!(i2i.dimensions(), (32, 32));
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_erasure-studio"))
        .args([
            "generate",
            "--model",
            "/definitely/missing",
            "--prompt",
            "x",
            "--out",
            "x.png",
        ])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("/definitely/missing") && !stderr.contains("panicked"),
        "{stderr}"
    );
}

#[test]
fn cli_parity_runner_writes_the_contract_outputs() {
    let dir = temp_dir("cli-parity");
    let out = dir.join("out.safetensors");
    common::run_cli(
        std::process::Command::new(env!("CARGO_BIN_EXE_erasure-studio"))
            .arg("parity")
            .arg("--model")
            .arg(fixtures().join("tiny-sd2"))
            .arg("--inputs")
            .arg(fixtures().join("parity").join("sd2-inputs.safetensors"))
            .arg("--out")
            .arg(&out),
    );
    let written = common::load(&out);
    let expected = common::load(&fixtures().join("parity").join("sd2-expected.safetensors"));
    for name in expected.keys() {
        assert!(written.contains_key(name), "missing {name}");
    }
    assert!(rel_l2(&written["unet.out"], &expected["unet.out"]) < 1e-4);
}

#[test]
fn half_precision_weights_track_f32() {
    let source = ModelSource::folder(&fixtures().join("tiny-sd1")).unwrap();
    let half = StableDiffusion::load(&source, &Device::Cpu, DType::F16).unwrap();
    let req = request(&["a cat"], 2, 0.0);
    let (latents_f16, images) = txt2img(&half, &req, SampleHooks::default()).unwrap();
    assert_eq!(images.dtype(), DType::F32);
    let (latents_f32, _) = txt2img(&tiny_sd1(), &req, SampleHooks::default()).unwrap();
    let err = rel_l2(&latents_f16, &latents_f32);
    assert!(
        err > 0.0 && err < 2e-2,
        "f16 vs f32 latents: relative error {err}"
    );
}

#[test]
fn progress_is_reported_once_per_step() {
    let sd = tiny_sd1();
    let calls = std::cell::RefCell::new(Vec::new());
    let record = |done: usize, total: usize| calls.borrow_mut().push((done, total));
    let hooks = SampleHooks {
        adapter: None,
        on_step: Some(&record),
    };
    txt2img(&sd, &request(&["a cat"], 0, 0.0), hooks).unwrap();
    assert_eq!(*calls.borrow(), vec![(1, 4), (2, 4), (3, 4), (4, 4)]);
}

/// `bench --json` keeps its contract: one JSON object per case and line, with the case's name,
/// a positive median and the process's peak RSS (each case in a process of its own). A case of
/// milliseconds is timed until its runs add up to `--min-seconds`.
#[test]
fn cli_bench_prints_one_json_object_per_case() {
    let cases = ["demo_unet_fwd_b8", "demo_vae_decode_b4"];
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_erasure-studio"))
        .args([
            "bench",
            "--json",
            "--repeats",
            "1",
            "--min-seconds",
            "0.3",
            "--only",
            &cases.join(","),
        ])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8(output.stdout).unwrap();
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), cases.len(), "{stdout}");
    for (line, case) in lines.iter().zip(cases) {
        assert_eq!(line["name"], case);
        assert!(line["median_s"].as_f64().unwrap() > 0.0, "{line}");
        assert!(line["peak_rss_mib"].as_f64().unwrap() > 1.0, "{line}");
        let (runs, median) = (
            line["runs"].as_f64().unwrap(),
            line["median_s"].as_f64().unwrap(),
        );
        // One run is enough only if it alone took the 0.3 s.
        assert!(runs >= 2.0 || median >= 0.3, "{line}");
    }
    // `--list` names every case (bench/compare.py takes them from it) and runs none.
    let listed = std::process::Command::new(env!("CARGO_BIN_EXE_erasure-studio"))
        .args(["bench", "--list"])
        .output()
        .unwrap();
    let listed = String::from_utf8(listed.stdout).unwrap();
    assert_eq!(
        listed.lines().collect::<Vec<_>>(),
        erasure_studio::bench::CASES
    );
}
