//! `cargo bench --bench studio`: how the studio's UI thread fares while the demo model trains.
//! Prints one JSON line per measure: frame times (each one UI pass, headless) while idle and
//! while a demo-star run trains on the worker, and how long a cancel takes to stop the run.
//! Targets: frames under 50 ms while training, cancel within 1 s.

use std::time::{Duration, Instant};

use candle_core::Device;
use eframe::egui;
use egui_kittest::Harness;
use egui_kittest::kittest::Queryable;
use erasure_studio::studio::app::StudioApp;
use erasure_studio::studio::forms::{Settings, Tab};

fn frame_times(h: &mut Harness<StudioApp>, for_how_long: Duration) -> Vec<f64> {
    let started = Instant::now();
    let mut times = Vec::new();
    while started.elapsed() < for_how_long {
        let t = Instant::now();
        h.step();
        times.push(t.elapsed().as_secs_f64() * 1e3);
        // About 60 frames a second, as a window would ask for.
        std::thread::sleep(Duration::from_millis(16));
    }
    times.sort_by(f64::total_cmp);
    times
}

fn report(name: &str, sorted_ms: &[f64]) {
    let pick = |q: f64| sorted_ms[((sorted_ms.len() - 1) as f64 * q).round() as usize];
    println!(
        "{{\"name\": \"{name}\", \"frames\": {}, \"p50_ms\": {:.2}, \"p95_ms\": {:.2}, \"max_ms\": {:.2}}}",
        sorted_ms.len(),
        pick(0.5),
        pick(0.95),
        pick(1.0)
    );
}

fn main() {
    let runs = std::env::temp_dir().join(format!("studio-bench-{}", std::process::id()));
    let settings = Settings {
        runs_dir: runs.clone(),
        tab: Tab::Curves,
        ..Settings::default()
    };
    let mut h = Harness::builder()
        .with_size(egui::vec2(1280.0, 820.0))
        .build_eframe(|cc| StudioApp::new(&cc.egui_ctx, Device::Cpu, settings));
    while h.state().state.model.is_none() {
        h.step();
        std::thread::sleep(Duration::from_millis(20));
    }
    report(
        "studio_frame_idle",
        &frame_times(&mut h, Duration::from_secs(3)),
    );

    h.get_by_label("Start").click();
    h.step();
    while h
        .state()
        .state
        .run
        .as_ref()
        .is_none_or(|r| r.metrics.is_empty())
    {
        h.step();
        std::thread::sleep(Duration::from_millis(16));
    }
    report(
        "studio_frame_training",
        &frame_times(&mut h, Duration::from_secs(20)),
    );

    let asked = Instant::now();
    h.get_by_label("Cancel").click();
    while h.state().state.is_training() {
        h.step();
        std::thread::sleep(Duration::from_millis(5));
    }
    println!(
        "{{\"name\": \"studio_cancel\", \"seconds\": {:.3}}}",
        asked.elapsed().as_secs_f64()
    );
    let _ = std::fs::remove_dir_all(&runs);
}
