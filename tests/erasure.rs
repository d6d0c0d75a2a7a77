//! The erasure trainer end to end on the demo model: presets, a micro DDPO run whose reward
//! rises, resuming after an interruption (in process and by Ctrl-C to the CLI), and evaluation.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::{DType, Device};
use erasure_studio::adapter::ErasureAdapter;
use erasure_studio::adapter::info::AdapterInfo;
use erasure_studio::adapter::lora::{LoraAdapter, LoraFormat};
use erasure_studio::demo_world::judge::{DemoJudge, JudgeNet};
use erasure_studio::engine::StableDiffusion;
use erasure_studio::engine::diffusion::pipeline::{Conditioning, GenerateRequest};
use erasure_studio::erasure::config::{Baseline, DdpoConfig};
use erasure_studio::erasure::evaluate;
use erasure_studio::erasure::metrics::EpochMetrics;
use erasure_studio::erasure::preset::{self, Preset, PromptKind, presets_dir};
use erasure_studio::erasure::render::render;
use erasure_studio::erasure::rollout::{
    Trajectories, sample, step_anchor_distance, step_output_drift,
};
use erasure_studio::erasure::seeds;
use erasure_studio::erasure::session::{RunDir, RunEnd, RunObserver, RunOptions};
use erasure_studio::erasure::setup;
use erasure_studio::erasure::trainer::{ErasureTrainer, TrainingPrompts, anchor_prompts};
use erasure_studio::erasure::workbench::Workbench;
use erasure_studio::reward::cer::{CerWeights, ErasureReward};
use erasure_studio::reward::clip::ClipScorer;
use erasure_studio::reward::judge::Judge;

/// The demo-star preset cut down to seconds: 3 denoising steps (2 trained), 2 × 2 samples per
/// epoch.
fn micro_preset(epochs: usize) -> Preset {
    let mut p = preset::find("demo-star").unwrap();
    p.sampling.steps = 3;
    p.evaluation.steps = 3;
    p.evaluation.seeds_per_prompt = 2;
    p.evaluation.max_prompts = 2;
    p.ddpo = DdpoConfig {
        epochs,
        batch_size: 2,
        batches_per_epoch: 2,
        samples_per_prompt: 2,
        timestep_fraction: 0.5,
        updates_per_inner_epoch: 2,
        learning_rate: 1e-2,
        ..DdpoConfig::default()
    };
    p.validate().unwrap();
    p
}

#[test]
fn every_prompt_set_holds_out_the_same_share_and_a_lone_prompt_is_held_out() {
    let mut preset = micro_preset(1);
    preset.prompts.neutral = vec!["a {colour} shape".into()];
    preset
        .prompts
        .variables
        .insert("colour".into(), vec!["red".into()]);
    let (train, held_out) = preset.split(PromptKind::Neutral).unwrap();
    assert!(train.is_empty());
    assert_eq!(held_out, ["a red shape"]);
    let (train, held_out) = preset.split(PromptKind::Neighbours).unwrap();
    // 6 colours × 4 fills × 4 other shapes × 3 backgrounds, a quarter held out.
    assert_eq!((train.len(), held_out.len()), (216, 72));
    // Preservation trains on the neighbours' training part only (the neutral one is empty).
    assert_eq!(preset.preservation_prompts().unwrap(), train);
    // The split does not depend on the run's seed.
    preset.ddpo.seed = 7;
    assert_eq!(preset.split(PromptKind::Neighbours).unwrap().1, held_out);
}

struct Quiet;
impl RunObserver for Quiet {
    fn epoch(&mut self, _: &EpochMetrics, _: usize) {}
}

#[test]
fn shipped_presets_parse_and_hold_out_prompts() {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(presets_dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "toml") {
            continue;
        }
        let preset = Preset::load(&path).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
        assert_eq!(
            Some(preset.name.as_str()),
            path.file_stem().and_then(|s| s.to_str()),
            "a preset is named after its file"
        );
        for kind in [
            PromptKind::Target,
            PromptKind::Neighbours,
            PromptKind::Neutral,
        ] {
            let (train, held_out) = preset.split(kind).unwrap();
            assert!(
                held_out.len() * 3 >= train.len() / 2,
                "{} {kind:?}",
                preset.name
            );
            assert!(!held_out.is_empty(), "{} {kind:?}", preset.name);
            assert!(train.iter().all(|p| !held_out.contains(p)));
        }
        // Round trip: what a run records reads back the same.
        assert_eq!(Preset::parse(&preset.to_toml().unwrap()).unwrap(), preset);
        names.push(preset.name);
    }
    names.sort();
    for wanted in [
        "church",
        "demo-star",
        "demo-striped",
        "nudity",
        "parachute",
        "van-gogh",
    ] {
        assert!(
            names.iter().any(|n| n == wanted),
            "{wanted} missing: {names:?}"
        );
    }
}

#[test]
fn bad_presets_are_refused_with_the_field_named() {
    let good = std::fs::read_to_string(presets_dir().join("demo-star.toml")).unwrap();
    assert!(Preset::parse(&good).is_ok());
    let cases = [
        // A typo in a key is not silently ignored.
        ("[prompts]", "[prompts]\ntargets = [\"x\"]", "targets"),
        ("eta = 1.0", "eta = 0.0", "sampling.eta"),
        ("epochs = 40", "epochs = \"forty\"", "epochs"),
        (
            "anchor_weight = 1.0",
            "anchor_weight = -1.0",
            "ddpo.anchor_weight",
        ),
        (
            "samples_per_prompt = 4",
            "samples_per_prompt = 5",
            "ddpo.samples_per_prompt",
        ),
        ("value = \"star\"", "value = \"hexagon\"", "hexagon"),
        ("attribute = \"object\"", "attribute = \"size\"", "size"),
        ("kind = \"demo-judge\"", "kind = \"oracle\"", "oracle"),
        ("held_out = 0.25", "held_out = 1.5", "prompts.held_out"),
        ("lora_rank = 4", "lora_rank = 0", "adapter.lora_rank"),
        (
            "filter_words = [\"star\"]",
            "filter_words = []",
            "prompts.filter_words",
        ),
        (
            "filter_words = [\"star\"]",
            "filter_words = [\"star\"]\nanchor_substitutes = [\"heart\", \" \"]",
            "prompts.anchor_substitutes",
        ),
    ];
    for (from, to, expected) in cases {
        assert!(good.contains(from), "{from}");
        let bad = good.replacen(from, to, 1);
        let err = format!("{:#}", Preset::parse(&bad).unwrap_err());
        assert!(err.contains(expected), "{to}: {err}");
    }
    let missing_variable = good.replace("a_colour = [", "unused = [\"a\"]\nnot_a_colour = [");
    let err = format!("{:#}", Preset::parse(&missing_variable).unwrap_err());
    assert!(
        err.contains("{a_colour}") && err.contains("prompts.target"),
        "{err}"
    );
}

#[test]
fn anchor_prompts_take_the_substitutes_in_turn_or_drop_the_concept() {
    let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let prompts = strings(&["a red striped star", "striped, blue", "a green circle"]);
    let words = strings(&["striped"]);
    assert_eq!(
        anchor_prompts(&prompts, &words, &strings(&["solid", "dotted"])),
        ["a red solid star", "dotted, blue", "a green circle"]
    );
    assert_eq!(
        anchor_prompts(&prompts, &words, &[]),
        ["a red star", "blue", "a green circle"]
    );
}

/// The demo judge reading black backgrounds, from the demo model at `root`.
fn black_background_judge(root: &Path) -> DemoJudge {
    let net = JudgeNet::load(&root.join("judge"), &Device::Cpu).unwrap();
    DemoJudge::new(net, "background", "black").unwrap()
}

/// A reward for black backgrounds through the demo judge (α = −1, β = 2, no alignment term):
/// a task a few DDPO epochs can learn on any prompt that leaves the background open.
fn black_background_reward(root: &Path) -> ErasureReward {
    ErasureReward {
        detector: Box::new(black_background_judge(root)),
        clip: Arc::new(ClipScorer::load(&root.join("clip"), &Device::Cpu).unwrap()),
        concept_words: vec![],
        anchor: String::new(),
        weights: CerWeights {
            alpha: -1.0,
            beta: 2.0,
            lambda_erase: 1.0,
            lambda_align: 0.0,
        },
    }
}

/// A micro DDPO run on a task it can learn in a minute: the demo judge's P(black background) is
/// rewarded on prompts that leave the background open (α = −1, β = 2), so the share of black
/// backgrounds at fixed seeds must rise.
#[test]
fn a_micro_ddpo_run_raises_the_reward_and_repeats_exactly() {
    let device = Device::Cpu;
    let sd = setup::load_model("demo", &device).unwrap();
    let root = sd.source.root().to_path_buf();
    let reward = black_background_reward(&root);
    let mut preset = micro_preset(8);
    preset.sampling.steps = 10;
    preset.evaluation.steps = 10;
    preset.ddpo.batch_size = 8;
    preset.ddpo.batches_per_epoch = 2;
    preset.ddpo.samples_per_prompt = 4;
    preset.ddpo.baseline = Baseline::Batch;
    preset.ddpo.early_steps = 0.5;
    preset.ddpo.timestep_fraction = 1.0;
    preset.ddpo.learning_rate = 3e-2;
    let prompts: Vec<String> = [
        "a red solid circle",
        "a blue solid square",
        "a green striped heart",
        "a yellow dotted triangle",
    ]
    .map(String::from)
    .to_vec();
    let trainer = || {
        ErasureTrainer::new(
            &sd,
            &reward,
            TrainingPrompts {
                target: prompts.clone(),
                preservation: vec![],
                anchor_substitutes: vec![],
            },
            preset.sampling.clone(),
            64,
            preset.adapter,
            preset.ddpo.clone(),
        )
        .unwrap()
    };
    // The share of black backgrounds at 16 fixed seeds, sampled deterministically: the reward
    // without the luck of the training samples.
    let judge = black_background_judge(&root);
    let fixed: Vec<String> = prompts
        .iter()
        .flat_map(|p| std::iter::repeat_n(p.clone(), 4))
        .collect();
    let black_share = |t: &ErasureTrainer| {
        let adapter = t.adapter().detached();
        let images = render(&sd, &preset, &fixed, seeds::PREVIEW, Some(&adapter)).unwrap();
        let readings = judge.read(&images).unwrap();
        readings.iter().filter(|r| r.concept).count() as f64 / readings.len() as f64
    };
    let mut t = trainer();
    let before = black_share(&t);
    let metrics: Vec<EpochMetrics> = (0..8)
        .map(|_| t.run_epoch(&|| false).unwrap().unwrap())
        .collect();
    let after = black_share(&t);
    let sampled: Vec<f64> = metrics.iter().map(|m| m.p_concept.mean).collect();
    println!("black backgrounds at fixed seeds {before:.3} → {after:.3}; sampled {sampled:.3?}");
    for m in &metrics {
        assert!(m.updates == 2 && m.skipped_updates == 0 && m.skipped_losses == 0);
        assert!(m.loss.is_finite() && m.approx_kl.is_finite());
    }
    // Two more black backgrounds of 16 at least (measured 2 → 4 on the machine of stop 15).
    assert!(after >= before + 0.125, "{before:.3} → {after:.3}");
    // Same seed, same run.
    let mut again = trainer();
    for m in &metrics[..2] {
        let a = again.run_epoch(&|| false).unwrap().unwrap();
        assert_eq!(
            (a.reward_total, a.p_concept, a.loss),
            (m.reward_total, m.p_concept, m.loss)
        );
    }
}

/// Stochastic trajectories (η = 1) of the original model for `prompts` at 64 px, with the
/// preset's steps and guidance.
fn original_trajectories(
    sd: &StableDiffusion,
    preset: &Preset,
    prompts: &[String],
    seed: u64,
) -> Trajectories {
    let request = GenerateRequest {
        prompts: prompts.to_vec(),
        negative_prompt: String::new(),
        seed,
        steps: preset.sampling.steps,
        guidance_scale: preset.sampling.guidance_scale,
        width: 64,
        height: 64,
        eta: 1.0,
    };
    sample(sd, None, &request).unwrap()
}

/// A per-item measure [items] of each step of `traj`, averaged over the items and summed over
/// the steps.
fn sum_over_steps(
    traj: &Trajectories,
    per_step: impl Fn(usize) -> candle_core::Result<candle_core::Tensor>,
) -> f32 {
    (0..traj.steps())
        .map(|step| {
            per_step(step)
                .unwrap()
                .mean_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        })
        .sum()
}

/// The preservation term holds the adapter to the original model on the preservation prompts:
/// after the same three epochs of a reward that pulls the whole image, the adapter's noise
/// predictions there have moved far less with the term than without it.
#[test]
fn the_preservation_term_keeps_preservation_prompts_close_to_the_original() {
    let device = Device::Cpu;
    let sd = setup::load_model("demo", &device).unwrap();
    let reward = black_background_reward(sd.source.root());
    let mut preset = micro_preset(3);
    preset.sampling.steps = 5;
    preset.ddpo.batch_size = 4;
    preset.ddpo.preservation_samples = 4;
    let preservation: Vec<String> = ["a red solid heart", "a blue striped circle"]
        .map(String::from)
        .to_vec();
    let reference = original_trajectories(&sd, &preset, &preservation, 77);
    let drift_after_training = |weight: f64| {
        let mut config = preset.ddpo.clone();
        config.preservation_weight = weight;
        let prompts = TrainingPrompts {
            target: vec!["a red solid square".into(), "a green dotted star".into()],
            preservation: preservation.clone(),
            anchor_substitutes: vec![],
        };
        let sampling = preset.sampling.clone();
        let mut t =
            ErasureTrainer::new(&sd, &reward, prompts, sampling, 64, preset.adapter, config)
                .unwrap();
        for _ in 0..3 {
            let m = t.run_epoch(&|| false).unwrap().unwrap();
            assert_eq!(m.preservation_drift.is_some(), weight > 0.0);
        }
        let items = candle_core::Tensor::new(&[0u32, 1], &device).unwrap();
        sum_over_steps(&reference, |step| {
            step_output_drift(&sd, t.adapter(), &reference, step, &items)
        })
    };
    let free = drift_after_training(0.0);
    let held = drift_after_training(10.0);
    println!("drift on preservation prompts: {free:.4} without the term, {held:.4} with it");
    assert!(free > 0.0 && held < free / 2.0, "{free} vs {held}");
}

/// The anchor term pulls the adapter's predictions on target prompts towards the original
/// model's for the prompt without the concept: after the same three epochs, on trajectories the
/// original model sampled, the distance to that target has fallen far more with the term than
/// without it. Without filter words there is no anchor prompt, and the trainer says so.
#[test]
fn the_anchor_term_pulls_target_prompts_towards_the_concept_free_prediction() {
    // Some negative guidance, so the target is more than the anchor prompt's prediction.
    const GUIDANCE: f64 = 0.5;
    let device = Device::Cpu;
    let sd = setup::load_model("demo", &device).unwrap();
    let mut preset = micro_preset(3);
    preset.sampling.steps = 5;
    preset.ddpo.batch_size = 4;
    let (reward, _) = setup::Scorers::new(sd.source.root(), &device)
        .reward(&preset)
        .unwrap();
    let target: Vec<String> = [
        "a red solid star on a white background",
        "a blue striped star",
    ]
    .map(String::from)
    .to_vec();
    let reference = original_trajectories(&sd, &preset, &target, 78);
    let anchored = ["a red solid on a white background", "a blue striped"].map(String::from);
    let anchor = Conditioning::encode(&sd, &anchored, "", 1.0).unwrap().cond;
    let items = candle_core::Tensor::new(&[0u32, 1], &device).unwrap();
    // Anchored on the prompt itself, an untrained adapter already sits on the target, with or
    // without negative guidance (up to the rounding of the adapter's unfused kernels; trained
    // distances below are around 0.1 per step).
    let untrained = ErasureAdapter::new(&sd.unet, preset.adapter, 0, DType::F32, &device).unwrap();
    for g in [0.0, GUIDANCE] {
        let own = &reference.conditioning.cond;
        let d = step_anchor_distance(&sd, &untrained, &reference, 0, &items, own, g).unwrap();
        let d = d.to_vec1::<f32>().unwrap();
        assert!(d.iter().all(|&v| v < 1e-10), "g = {g}: {d:?}");
    }
    let distance = |adapter: &ErasureAdapter| {
        sum_over_steps(&reference, |step| {
            step_anchor_distance(&sd, adapter, &reference, step, &items, &anchor, GUIDANCE)
        })
    };
    fn trainer<'a>(
        sd: &'a StableDiffusion,
        reward: &'a ErasureReward,
        preset: &Preset,
        target: &[String],
        anchor_weight: f64,
    ) -> anyhow::Result<ErasureTrainer<'a>> {
        let mut config = preset.ddpo.clone();
        config.anchor_weight = anchor_weight;
        config.anchor_guidance = GUIDANCE;
        let prompts = TrainingPrompts {
            target: target.to_vec(),
            preservation: vec![],
            anchor_substitutes: vec![],
        };
        let sampling = preset.sampling.clone();
        ErasureTrainer::new(sd, reward, prompts, sampling, 64, preset.adapter, config)
    }
    let distance_after_training = |weight: f64| {
        let mut t = trainer(&sd, &reward, &preset, &target, weight).unwrap();
        let before = distance(t.adapter());
        for _ in 0..3 {
            let m = t.run_epoch(&|| false).unwrap().unwrap();
            assert_eq!(m.anchor_distance.is_some(), weight > 0.0);
        }
        (before, distance(t.adapter()))
    };
    let (start, free) = distance_after_training(0.0);
    let (_, pulled) = distance_after_training(10.0);
    println!(
        "anchor distance {start:.4} at the start, {free:.4} without the term, {pulled:.4} with it"
    );
    assert!(
        pulled < 0.5 * start && pulled < 0.5 * free,
        "{start} / {free} / {pulled}"
    );

    let no_words = black_background_reward(sd.source.root());
    let err = trainer(&sd, &no_words, &preset, &target, 1.0)
        .err()
        .expect("no filter words");
    assert!(err.to_string().contains("prompts.filter_words"), "{err}");
}

fn adapter_tensors(path: &Path) -> Vec<(String, Vec<f32>)> {
    let mut all: Vec<(String, Vec<f32>)> = common::load(path)
        .into_iter()
        .map(|(k, v)| (k, v.flatten_all().unwrap().to_vec1::<f32>().unwrap()))
        .collect();
    all.sort_by(|a, b| a.0.cmp(&b.0));
    all
}

#[test]
fn an_interrupted_run_resumes_to_the_same_adapter() {
    let device = Device::Cpu;
    let root = common::temp_dir("erasure-resume");
    let options = RunOptions { preview_every: 2 };
    let straight = root.join("straight");
    let mut workbench = Workbench::load("demo", &device).unwrap();
    let end = workbench
        .start_run(micro_preset(3), &straight, options, &|| false, &mut Quiet)
        .unwrap();
    assert!(matches!(end, RunEnd::Finished { .. }), "{end:?}");
    let dir = RunDir::new(&straight);
    let metrics = dir.read_metrics().unwrap();
    assert_eq!(
        metrics.iter().map(|m| m.epoch).collect::<Vec<_>>(),
        [1, 2, 3]
    );
    for file in [
        "original.png",
        "epoch-0002.png",
        "epoch-0003.png",
        "prompts.txt",
    ] {
        assert!(dir.samples().join(file).is_file(), "{file}");
    }
    // The adapter file records what made it.
    let info = ErasureAdapter::read_info(&dir.adapter()).unwrap();
    assert_eq!(
        (info.concept.as_deref(), info.preset.as_deref()),
        (Some("star"), Some("demo-star"))
    );
    assert_eq!(info.base_model.unwrap().name, "demo-model");
    assert!(info.method.unwrap().contains("DDPO"));
    assert_eq!(info.training.unwrap()["epochs"], 3);
    assert!(
        workbench
            .start_run(micro_preset(3), &straight, options, &|| false, &mut Quiet)
            .unwrap_err()
            .to_string()
            .contains("--resume")
    );

    // Stopped in the middle of epoch 2's training passes: epoch 2 is discarded, the
    // checkpoint holds epoch 1, and the resumed run redoes epoch 2 from the same state.
    let interrupted = root.join("interrupted");
    let polls = AtomicUsize::new(0);
    // Per epoch: one poll before sampling and one before each of the 2 batches' 3 denoising
    // steps, one before each round of backward passes (2 updates of 2 passes, as many passes
    // at once as the pool has threads), one after the epoch. The poll that stops comes after
    // epoch 2's first update.
    let rounds_per_update = 2usize.div_ceil(rayon::current_num_threads());
    let polls_per_epoch = 7 + 2 * rounds_per_update + 1;
    let stop_mid_epoch_2 = || {
        let poll = polls.fetch_add(1, Ordering::SeqCst) + 1;
        poll == polls_per_epoch + 7 + rounds_per_update + 1
    };
    let end = workbench
        .start_run(
            micro_preset(3),
            &interrupted,
            options,
            &stop_mid_epoch_2,
            &mut Quiet,
        )
        .unwrap();
    assert_eq!(end, RunEnd::Stopped { epochs_done: 1 });
    let dir = RunDir::new(&interrupted);
    assert!(!dir.adapter().exists());
    assert_eq!(dir.read_metrics().unwrap().len(), 1);
    let end = workbench
        .resume_run(&interrupted, options, &|| false, &mut Quiet)
        .unwrap();
    assert!(matches!(end, RunEnd::Finished { .. }), "{end:?}");
    assert_eq!(
        adapter_tensors(&dir.adapter()),
        adapter_tensors(&RunDir::new(&straight).adapter()),
        "resumed and uninterrupted runs differ"
    );
    let resumed_metrics = dir.read_metrics().unwrap();
    assert_eq!(resumed_metrics.len(), 3);
    for (a, b) in resumed_metrics.iter().zip(&metrics) {
        assert_eq!(
            (a.epoch, a.p_concept, a.loss),
            (b.epoch, b.p_concept, b.loss)
        );
    }

    // Evaluation of the finished run writes a report with its seeds and a grid.
    let preset = dir.load_preset().unwrap();
    let report = workbench
        .evaluate(&preset, &dir.adapter(), &interrupted, false, &mut |_, _| {})
        .unwrap();
    assert_eq!(report.sets.len(), 3);
    assert_eq!(report.sets[0].set, "target");
    assert_eq!(report.sets[0].first_seed, seeds::EVALUATION);
    for set in &report.sets {
        assert_eq!(set.images, 2 * set.prompts.len());
        assert!((0.0..=1.0).contains(&set.concept_rate_erased));
        // One reading per image, at consecutive seeds, each prompt once per seed in a row.
        assert_eq!(set.readings.len(), set.images);
        for (i, r) in set.readings.iter().enumerate() {
            assert_eq!(r.seed, set.first_seed + i as u64);
            assert_eq!(r.prompt, set.prompts[i / report.seeds_per_prompt]);
        }
    }
    // The demo model draws the star it is asked for (the trained steps are too few to erase).
    assert_eq!(report.sets[0].accuracy_original["object"], 1.0);
    let target = &report.sets[0];
    let stars = target
        .readings
        .iter()
        .filter(|r| r.original["object"] == "star")
        .count();
    assert_eq!(
        stars, target.images,
        "the object accuracy is the readings' share"
    );
    assert!(interrupted.join(evaluate::GRID_FILE).is_file());
    let written: evaluate::Report =
        serde_json::from_slice(&std::fs::read(interrupted.join(evaluate::REPORT_FILE)).unwrap())
            .unwrap();
    assert_eq!(written.sets.len(), report.sets.len());
    for (w, r) in written.sets.iter().zip(&report.sets) {
        assert_eq!(
            (&w.prompts, w.first_seed, w.images),
            (&r.prompts, r.first_seed, r.images)
        );
        assert_eq!(w.concept_rate_erased, r.concept_rate_erased);
    }
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn an_untrained_adapter_evaluates_as_the_original_model() {
    let device = Device::Cpu;
    let root = common::temp_dir("erasure-identity");
    let preset = micro_preset(1);
    let mut workbench = Workbench::load("demo", &device).unwrap();
    let sd = workbench.sd();
    let adapter = ErasureAdapter::new(&sd.unet, preset.adapter, 0, DType::F32, &device).unwrap();
    let path = root.join("fresh.safetensors");
    adapter.save(&path, sd, &AdapterInfo::default()).unwrap();
    let report = workbench
        .evaluate(&preset, &path, &root, true, &mut |_, _| {})
        .unwrap();
    // The file now records the concept rates it was evaluated at.
    let recorded = ErasureAdapter::read_info(&path)
        .unwrap()
        .evaluation
        .unwrap();
    assert_eq!(recorded, report.rates());
    for set in &report.sets {
        assert_eq!(set.concept_rate_erased, set.concept_rate_original);
        assert_eq!(set.accuracy_erased, set.accuracy_original);
        assert!(
            set.agreement.values().all(|&a| a == 1.0),
            "{:?}",
            set.agreement
        );
        assert!(set.psnr_db >= 99.0, "identical images: {}", set.psnr_db);
        assert!((set.clip_image_similarity - 1.0).abs() < 1e-5);
    }
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn ctrl_c_stops_the_cli_with_a_checkpoint_and_resume_finishes() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};

    let root = common::temp_dir("erasure-cli");
    let preset_file = root.join("micro.toml");
    std::fs::write(&preset_file, micro_preset(3).to_toml().unwrap()).unwrap();
    let run = root.join("run");
    let exe = env!("CARGO_BIN_EXE_erasure-studio");
    let mut child = Command::new(exe)
        .args(["erase", "--preset"])
        .arg(&preset_file)
        .arg("--out")
        .arg(&run)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    assert!(first.starts_with("epoch 1/3"), "{first}");
    // SAFETY: signalling our own child process.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGINT) }, 0);
    let rest: Vec<String> = lines.map(|l| l.unwrap()).collect();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?} {rest:?}");
    let stopped = rest
        .iter()
        .find(|l| l.starts_with("stopped after epoch"))
        .unwrap();
    assert!(stopped.contains("--resume"), "{stopped}");
    let dir = RunDir::new(&run);
    assert!(dir.checkpoint().is_file() && !dir.adapter().exists());
    let done = dir.read_metrics().unwrap().len();
    assert!((1..3).contains(&done), "{done} epochs before the stop");

    let output = common::run_cli(Command::new(exe).args(["erase", "--resume"]).arg(&run));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("finished"), "{stdout}");
    assert_eq!(dir.read_metrics().unwrap().len(), 3);
    assert!(dir.adapter().is_file());

    // The finished run exports as a PEFT LoRA, with what it keeps of the erasure measured on
    // the micro preset's held-out target prompts.
    let exported = root.join("peft.safetensors");
    let output = common::run_cli(
        Command::new(exe)
            .args(["export", "--format", "peft", "--run"])
            .arg(&run)
            .arg("--out")
            .arg(&exported),
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("with the full adapter") && stdout.contains("with the exported file"),
        "{stdout}"
    );
    let sd = setup::load_model("demo", &Device::Cpu).unwrap();
    let lora = LoraAdapter::load(&exported, &sd.unet, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(lora.format(), LoraFormat::Peft);
    assert_eq!(lora.layer_count(), 2 * sd.unet.cross_attn_layers().len());
    std::fs::remove_dir_all(&root).unwrap();
}

/// The workbench's guards, shared by the CLI and the studio: a run is refused for a model other
/// than the loaded one, before anything is written, and an unfinished run is not evaluated.
#[test]
fn the_workbench_refuses_runs_of_another_model_and_unfinished_runs() {
    let root = common::temp_dir("erasure-guards");
    let mut workbench = Workbench::load("demo", &Device::Cpu).unwrap();
    let mut preset = micro_preset(1);
    preset.model = "some/other-model".into();
    let out = root.join("other");
    let err = workbench
        .start_run(preset, &out, RunOptions::default(), &|| false, &mut Quiet)
        .unwrap_err()
        .to_string();
    assert!(err.contains("load `some/other-model` first"), "{err}");
    assert!(!out.exists(), "a refused run wrote {}", out.display());

    // A run stopped before its first epoch ends holds a preset and no adapter.
    let stopped = root.join("stopped");
    let end = workbench
        .start_run(
            micro_preset(1),
            &stopped,
            RunOptions::default(),
            &|| true,
            &mut Quiet,
        )
        .unwrap();
    assert_eq!(end, RunEnd::Stopped { epochs_done: 0 });
    let err = workbench
        .evaluate_run(&stopped, &mut |_, _| {})
        .unwrap_err()
        .to_string();
    assert!(err.contains("has no adapter.safetensors yet"), "{err}");
    assert!(err.contains("--resume"), "{err}");
    std::fs::remove_dir_all(&root).unwrap();
}
