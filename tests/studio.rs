//! The studio, headless (egui_kittest): the demo model loads on the worker, a short run trains
//! while curves and erased samples appear, cancel stops it with a checkpoint, the adapter
//! exports and loads back, and closing mid-training saves a checkpoint first.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use candle_core::Device;
use eframe::egui;
use egui_kittest::Harness;
use egui_kittest::kittest::Queryable;
use erasure_studio::adapter::lora::LoraFormat;
use erasure_studio::erasure::export::ExportFormat;
use erasure_studio::erasure::session::RunDir;
use erasure_studio::studio::app::StudioApp;
use erasure_studio::studio::forms::{Settings, Tab};
use erasure_studio::studio::state::RunStatus;

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("studio-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn studio(runs: &Path) -> Harness<'static, StudioApp> {
    let settings = Settings {
        runs_dir: runs.to_path_buf(),
        ..Settings::default()
    };
    let mut h = Harness::builder()
        .with_size(egui::vec2(1280.0, 820.0))
        .build_eframe(|cc| StudioApp::new(&cc.egui_ctx, Device::Cpu, settings));
    step_until(&mut h, "the demo model to load", |app| {
        app.state.model.is_some()
    });
    h
}

/// Steps frames until `done` holds (the worker keeps asking for repaints, so `run()` would give
/// up), failing with the studio's messages after two minutes.
fn step_until(h: &mut Harness<StudioApp>, what: &str, done: impl Fn(&StudioApp) -> bool) {
    step_until_within(h, what, Duration::from_secs(120), done)
}

fn step_until_within(
    h: &mut Harness<StudioApp>,
    what: &str,
    limit: Duration,
    done: impl Fn(&StudioApp) -> bool,
) {
    let started = Instant::now();
    while !done(h.state()) {
        assert!(
            started.elapsed() < limit,
            "timed out waiting for {what}; messages: {:?}",
            h.state().state.messages
        );
        h.step();
        std::thread::sleep(Duration::from_millis(20));
    }
    h.step();
}

/// A run small enough for a test: two prompts of two samples per epoch.
fn make_run_tiny(app: &mut StudioApp, epochs: usize) {
    let form = app.run_form.as_mut().expect("the demo-star preset loads");
    let ddpo = &mut form.preset.ddpo;
    ddpo.epochs = epochs;
    ddpo.batch_size = 2;
    ddpo.batches_per_epoch = 1;
    ddpo.samples_per_prompt = 2;
    ddpo.preservation_samples = 2;
    form.preview_every = 1;
}

fn click(h: &mut Harness<StudioApp>, label: &str) {
    h.get_by_label(label).click();
    h.step();
    h.step();
}

fn show_tab(h: &mut Harness<StudioApp>, tab: Tab) {
    h.state_mut().settings.tab = tab;
    h.step();
}

fn errors(app: &StudioApp) -> Vec<String> {
    app.state
        .messages
        .iter()
        .filter(|m| m.is_error)
        .map(|m| m.text.clone())
        .collect()
}

#[test]
fn train_watch_cancel_export_and_load_back() {
    let runs = temp_dir("flow");
    let mut h = studio(&runs);
    assert!(
        h.state()
            .state
            .model
            .as_ref()
            .unwrap()
            .description
            .contains("CPU"),
        "the loaded model and its device are shown"
    );
    h.query_by_label_contains("Model: demo")
        .expect("status bar names the model");

    make_run_tiny(h.state_mut(), 50);
    let run_dir = PathBuf::from(&h.state().run_form.as_ref().unwrap().out);
    click(&mut h, "Start");
    step_until(&mut h, "two epochs and a preview", |app| {
        app.state.run.as_ref().is_some_and(|r| r.metrics.len() >= 2)
            && !app.state.previews.is_empty()
    });
    assert!(errors(h.state()).is_empty(), "{:?}", errors(h.state()));

    // Curves: a point per epoch; gallery: original and erased side by side.
    show_tab(&mut h, Tab::Curves);
    h.get_by_label("Rewards");
    show_tab(&mut h, Tab::Gallery);
    h.get_by_label_contains("After epoch");
    let previews = &h.state().state.previews;
    assert!(previews.iter().all(|c| c.erased.is_some()));
    assert!(previews.iter().any(|c| c.prompt.contains("star")));
    assert!(
        !h.query_all_by_label_contains("erased: ")
            .collect::<Vec<_>>()
            .is_empty()
    );

    // Cancel stops the run at the next batch, with a checkpoint.
    let asked = Instant::now();
    click(&mut h, "Cancel");
    step_until(&mut h, "the run to stop", |app| {
        app.state.run.as_ref().unwrap().status == RunStatus::Cancelled
    });
    eprintln!("cancel took {:.2} s", asked.elapsed().as_secs_f64());
    let done = h.state().state.run.as_ref().unwrap().epochs_done();
    assert!(done < 50, "the run stopped early");
    assert!(RunDir::new(&run_dir).checkpoint().is_file());
    assert!(
        h.state().state.adapter.is_some(),
        "the run's adapter is current"
    );

    // Export, then load the file back.
    show_tab(&mut h, Tab::Adapters);
    let exported = runs.join("exported.safetensors");
    h.state_mut().samples.export_path = exported.display().to_string();
    click(&mut h, "Export");
    step_until(&mut h, "the export", |app| {
        app.state.busy.is_none() && exported.is_file()
    });
    h.state_mut().samples.adapter_path = exported.display().to_string();
    click(&mut h, "Load adapter");
    let name = exported.display().to_string();
    step_until(&mut h, "the adapter to load", |app| {
        app.state
            .adapter
            .as_ref()
            .is_some_and(|a| a.contains(&name))
    });

    // The prompt box draws with both models; the loaded adapter changes a star prompt.
    show_tab(&mut h, Tab::Prompt);
    click(&mut h, "Render");
    step_until(&mut h, "the render", |app| app.state.rendered.is_some());
    let rendered = h.state().state.rendered.clone().unwrap();
    let erased = rendered.erased.expect("an adapter is loaded");
    assert_eq!(rendered.original.rgb.len(), erased.rgb.len());
    assert_ne!(
        rendered.original.rgb, erased.rgb,
        "the adapter changes the image"
    );
    assert!(errors(h.state()).is_empty(), "{:?}", errors(h.state()));
}

#[test]
fn closing_mid_training_saves_a_checkpoint_first() {
    let runs = temp_dir("close");
    let mut h = studio(&runs);
    make_run_tiny(h.state_mut(), 50);
    let run_dir = PathBuf::from(&h.state().run_form.as_ref().unwrap().out);
    click(&mut h, "Start");
    step_until(&mut h, "the first epoch", |app| {
        app.state
            .run
            .as_ref()
            .is_some_and(|r| !r.metrics.is_empty())
    });
    h.input_mut()
        .viewports
        .entry(egui::ViewportId::ROOT)
        .or_default()
        .events
        .push(egui::ViewportEvent::Close);
    h.step();
    let root = &h.output().viewport_output[&egui::ViewportId::ROOT];
    assert!(
        root.commands.contains(&egui::ViewportCommand::CancelClose),
        "the window stays open while the run saves"
    );
    step_until(&mut h, "the run to pause", |app| !app.state.is_training());
    let root = &h.output().viewport_output[&egui::ViewportId::ROOT];
    assert!(root.commands.contains(&egui::ViewportCommand::Close));
    let metrics = RunDir::new(&run_dir).read_metrics().unwrap();
    assert!(!metrics.is_empty() && metrics.len() < 50);
    assert!(RunDir::new(&run_dir).checkpoint().is_file());
}

#[test]
fn a_worker_error_is_shown_not_fatal() {
    let runs = temp_dir("error");
    let mut h = studio(&runs);
    show_tab(&mut h, Tab::Adapters);
    h.state_mut().samples.adapter_path = runs.join("missing.safetensors").display().to_string();
    click(&mut h, "Load adapter");
    step_until(&mut h, "the error", |app| !errors(app).is_empty());
    h.get_by_label_contains("missing.safetensors");
    // The worker still serves requests.
    show_tab(&mut h, Tab::Prompt);
    click(&mut h, "Render");
    step_until(&mut h, "the render", |app| app.state.rendered.is_some());
}

/// The studio with a model loaded and a finished run's worth of synthetic events, so every
/// screen has fixed content: 12 epochs of falling concept probability and previews of rendered
/// scenes.
fn studio_with_fixed_content() -> Harness<'static, StudioApp> {
    use erasure_studio::demo_world::Scene;
    use erasure_studio::demo_world::scene::render_batch;
    use erasure_studio::erasure::metrics::{EpochMetrics, Spread};
    use erasure_studio::studio::worker::{Comparison, Event, Picture};
    use rand::SeedableRng;

    // A fixed folder name: the run form shows it.
    let runs = std::env::temp_dir().join("studio-snapshots");
    let mut h = studio(&runs);
    let spread = |mean: f64, std: f64| Spread { mean, std };
    let metrics: Vec<EpochMetrics> = (1..=12)
        .map(|epoch| {
            let p = 0.8 * (-(epoch as f64) / 5.0).exp() + 0.05;
            serde_json::from_value(serde_json::json!({
                "epoch": epoch,
                "p_concept": spread(p, 0.1),
                "reward_erase": spread(1.0 - 3.0 * p, 0.3),
                "reward_align": spread(0.8 - 0.01 * epoch as f64, 0.05),
                "reward_total": spread(0.0, 1.0),
                "reward_unnormalised": spread(1.8 - 3.0 * p, 0.3),
                "loss": 0.0, "clip_fraction": 0.4, "approx_kl": 1e-6, "grad_norm": 0.003,
                "updates": 2, "skipped_updates": 0, "skipped_losses": 0, "skipped_reason": null,
                "seconds_sampling": 4.0, "seconds_reward": 0.1, "seconds_training": 5.0,
                "seconds": 9.1
            }))
            .unwrap()
        })
        .collect();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    let scenes: Vec<Scene> = (0..8).map(|_| Scene::sample(&mut rng)).collect();
    let pictures = Picture::from_batch(&render_batch(&scenes, &Device::Cpu).unwrap()).unwrap();
    let comparisons = pictures
        .chunks(2)
        .zip(scenes.chunks(2))
        .map(|(pair, pair_scenes)| Comparison {
            prompt: erasure_studio::demo_world::Caption::full(&pair_scenes[0]).text,
            original: pair[0].clone(),
            erased: Some(pair[1].clone()),
        })
        .collect();
    let app = h.state_mut();
    for event in [
        Event::RunStarted {
            run: runs.join("demo-star-1"),
            total_epochs: 12,
            history: metrics,
        },
        Event::Preview {
            epoch: 12,
            comparisons,
        },
        Event::RunFinished {
            run: runs.join("demo-star-1"),
            adapter: runs.join("demo-star-1/adapter.safetensors"),
            seconds: 110.0,
        },
    ] {
        app.state.apply(event);
    }
    app.state.messages.clear();
    h.step();
    h
}

#[test]
fn snapshots_of_the_main_screens() {
    let mut h = studio_with_fixed_content();
    for (tab, name) in [
        (Tab::Curves, "studio-curves"),
        (Tab::Gallery, "studio-gallery"),
        (Tab::Adapters, "studio-adapters"),
    ] {
        show_tab(&mut h, tab);
        h.step();
        h.snapshot(name);
    }
    h.state_mut().settings.preset = erasure_studio::studio::forms::CUSTOM.into();
    h.step();
    h.step();
    h.snapshot("studio-custom-concept");
}

/// The whole path with the preset's own settings: erase "star" from the demo model in the
/// studio, writing the README's screenshots (`docs/studio-curves.png`, `docs/studio-gallery.png`)
/// 24 epochs in, as the erasure takes hold; then finish, evaluate and export. Run by hand:
/// `cargo test --release --test studio -- --ignored readme_screenshots`.
#[test]
#[ignore = "a full demo-star erasure and its evaluation (about 20 minutes in release)"]
fn readme_screenshots_and_a_full_erasure() {
    let runs = temp_dir("full");
    let mut h = studio(&runs);
    h.state_mut().run_form.as_mut().unwrap().preview_every = 4;
    click(&mut h, "Start");
    let limit = Duration::from_secs(40 * 60);
    let epochs_done = |app: &StudioApp| app.state.run.as_ref().map_or(0, |r| r.metrics.len());
    step_until_within(&mut h, "24 epochs", limit, |app| epochs_done(app) >= 24);
    let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs");
    std::fs::create_dir_all(&docs).unwrap();
    for (tab, name) in [
        (Tab::Curves, "studio-curves"),
        (Tab::Gallery, "studio-gallery"),
    ] {
        show_tab(&mut h, tab);
        h.step();
        let image = h.render().expect("a wgpu adapter renders the frame");
        image.save(docs.join(format!("{name}.png"))).unwrap();
    }
    step_until_within(&mut h, "the run to finish", limit, |app| {
        app.state
            .run
            .as_ref()
            .is_some_and(|r| r.status == RunStatus::Finished)
    });
    assert_eq!(epochs_done(h.state()), 40);

    show_tab(&mut h, Tab::Evaluation);
    click(&mut h, "Evaluate");
    step_until_within(&mut h, "the report", limit, |app| {
        app.state.evaluation.is_some()
    });
    let report = &h.state().state.evaluation.as_ref().unwrap().report;
    let target = &report.sets[0];
    eprintln!(
        "held-out stars {:.1} % -> {:.1} %; accuracy {:?} -> {:?}",
        100.0 * target.concept_rate_original,
        100.0 * target.concept_rate_erased,
        target.accuracy_original,
        target.accuracy_erased
    );
    assert!(target.concept_rate_original >= 0.9 && target.concept_rate_erased <= 0.1);

    show_tab(&mut h, Tab::Adapters);
    let exported = runs.join("demo-star.safetensors");
    h.state_mut().samples.export_path = exported.display().to_string();
    click(&mut h, "Export");
    step_until(&mut h, "the export", |app| {
        app.state.busy.is_none() && exported.is_file()
    });
    assert!(errors(h.state()).is_empty(), "{:?}", errors(h.state()));
}

#[test]
fn a_finished_run_is_evaluated_in_the_studio() {
    let runs = temp_dir("evaluate");
    let mut h = studio(&runs);
    make_run_tiny(h.state_mut(), 1);
    let evaluation = &mut h.state_mut().run_form.as_mut().unwrap().preset.evaluation;
    evaluation.seeds_per_prompt = 1;
    evaluation.max_prompts = 2;
    evaluation.steps = 4;
    click(&mut h, "Start");
    step_until(&mut h, "the run to finish", |app| {
        app.state
            .run
            .as_ref()
            .is_some_and(|r| r.status == RunStatus::Finished)
    });
    show_tab(&mut h, Tab::Evaluation);
    click(&mut h, "Evaluate");
    step_until(&mut h, "the report", |app| app.state.evaluation.is_some());
    let report = &h.state().state.evaluation.as_ref().unwrap().report;
    assert_eq!(
        report
            .sets
            .iter()
            .map(|s| s.set.as_str())
            .collect::<Vec<_>>(),
        ["target", "neighbours", "neutral"]
    );
    h.get_by_label("target");
    h.get_by_label_contains("comparison grid");

    // A kohya export is measured against the full adapter on the same prompts and seeds.
    show_tab(&mut h, Tab::Adapters);
    let exported = runs.join("kohya.safetensors");
    h.state_mut().samples.export_path = exported.display().to_string();
    h.state_mut().samples.export_format = ExportFormat::Lora(LoraFormat::Kohya);
    h.step();
    h.get_by_label_contains("cannot hold the Safe Adapter");
    click(&mut h, "Export");
    let compared = |app: &StudioApp| {
        app.state
            .messages
            .iter()
            .any(|m| m.text.contains("with the exported file"))
    };
    step_until(&mut h, "the export and its comparison", |app| {
        app.state.busy.is_none() && (compared(app) || !errors(app).is_empty())
    });
    assert!(errors(h.state()).is_empty(), "{:?}", errors(h.state()));
    assert!(exported.is_file());
}

/// An in-memory stand-in for eframe's settings file.
#[derive(Default)]
struct MemoryStorage(std::collections::HashMap<String, String>);

impl eframe::Storage for MemoryStorage {
    fn get_string(&self, key: &str) -> Option<String> {
        self.0.get(key).cloned()
    }
    fn set_string(&mut self, key: &str, value: String) {
        self.0.insert(key.to_string(), value);
    }
    fn remove_string(&mut self, key: &str) {
        self.0.remove(key);
    }
    fn flush(&mut self) {}
}

#[test]
fn settings_persist_between_launches() {
    let runs = temp_dir("settings");
    let mut h = studio(&runs);
    let app = h.state_mut();
    app.settings.preset = "demo-striped".into();
    app.settings.tab = Tab::Gallery;
    app.settings.custom.concept = "moon".into();
    let mut storage = MemoryStorage::default();
    eframe::App::save(app, &mut storage);
    let restored: Settings = eframe::get_value(&storage, eframe::APP_KEY).unwrap();
    assert_eq!(restored, app.settings);
}
