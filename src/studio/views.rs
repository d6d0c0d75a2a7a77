//! The central tabs: reward curves, the before/after gallery, the prompt box, img2img, the
//! evaluation report and the adapter files.

use std::path::PathBuf;

use eframe::egui;
use egui_plot::{FilledArea, Legend, Line, Plot, PlotPoints};

use super::app::StudioApp;
use super::state::{RunStatus, StudioState};
use super::worker::{Command, Comparison};
use crate::adapter::lora::LoraFormat;
use crate::erasure::export::ExportFormat;
use crate::erasure::metrics::{EpochMetrics, Spread};

/// Side of a picture on screen.
const PICTURE: f32 = 128.0;

pub fn curves(ui: &mut egui::Ui, state: &StudioState) {
    let Some(run) = &state.run else {
        ui.label("Start a run to see its reward curves here.");
        return;
    };
    let metrics = &run.metrics;
    let height = (ui.available_height() / 2.0 - 30.0).max(120.0);
    ui.strong("Concept probability (the reward's detector)");
    Plot::new("p-concept")
        .height(height)
        .legend(Legend::default())
        .include_y(0.0)
        .include_y(1.0)
        .x_axis_label("epoch")
        .show(ui, |plot| {
            spread_series(plot, "P(concept)", metrics, |m| Some(m.p_concept))
        });
    ui.strong("Rewards");
    Plot::new("rewards")
        .height(height)
        .legend(Legend::default())
        .x_axis_label("epoch")
        .show(ui, |plot| {
            spread_series(plot, "total (λ-weighted)", metrics, |m| {
                m.reward_unnormalised
            });
            spread_series(plot, "erase", metrics, |m| Some(m.reward_erase));
            spread_series(plot, "alignment", metrics, |m| Some(m.reward_align));
        });
}

/// The mean per epoch as a line over a band of ± one standard deviation.
fn spread_series(
    plot: &mut egui_plot::PlotUi,
    name: &str,
    metrics: &[EpochMetrics],
    pick: impl Fn(&EpochMetrics) -> Option<Spread>,
) {
    let points: Vec<(f64, Spread)> = metrics
        .iter()
        .filter_map(|m| pick(m).map(|s| (m.epoch as f64, s)))
        .filter(|(_, s)| s.mean.is_finite() && s.std.is_finite())
        .collect();
    if points.is_empty() {
        return;
    }
    let xs: Vec<f64> = points.iter().map(|p| p.0).collect();
    let lower: Vec<f64> = points.iter().map(|p| p.1.mean - p.1.std).collect();
    let upper: Vec<f64> = points.iter().map(|p| p.1.mean + p.1.std).collect();
    plot.add(FilledArea::new(format!("{name} ±σ"), &xs, &lower, &upper));
    let line: PlotPoints = points.iter().map(|p| [p.0, p.1.mean]).collect();
    plot.line(Line::new(name, line).width(2.0));
}

pub fn gallery(ui: &mut egui::Ui, app: &mut StudioApp) {
    let state = &app.state;
    if state.previews.is_empty() {
        ui.label(
            "Before/after samples appear here while a run trains: held-out target prompts, \
             then neighbour and neutral prompts, the same seed in both columns.",
        );
        return;
    }
    let live = state
        .run
        .as_ref()
        .is_some_and(|r| r.status == RunStatus::Training);
    ui.label(format!(
        "After epoch {}{}",
        state.preview_epoch,
        if live {
            " (refreshed while training)"
        } else {
            ""
        }
    ));
    let stamp = state.previews_stamp;
    let previews = state.previews.clone();
    egui::ScrollArea::vertical().show(ui, |ui| {
        egui::Grid::new("gallery")
            .num_columns(3)
            .striped(true)
            .show(ui, |ui| {
                ui.strong("Prompt");
                ui.strong("Original");
                ui.strong("Erased");
                ui.end_row();
                for (i, c) in previews.iter().enumerate() {
                    comparison_row(ui, app, &format!("preview-{i}"), stamp, c);
                }
            });
    });
}

fn comparison_row(ui: &mut egui::Ui, app: &mut StudioApp, key: &str, stamp: u64, c: &Comparison) {
    ui.label(&c.prompt);
    let original = app
        .textures
        .get(ui.ctx(), &format!("{key}-original"), stamp, &c.original);
    ui.add(egui::Image::new((
        original.id(),
        egui::vec2(PICTURE, PICTURE),
    )))
    .on_hover_text(format!("original: {}", c.prompt));
    match &c.erased {
        Some(erased) => {
            let erased = app
                .textures
                .get(ui.ctx(), &format!("{key}-erased"), stamp, erased);
            ui.add(egui::Image::new((
                erased.id(),
                egui::vec2(PICTURE, PICTURE),
            )))
            .on_hover_text(format!("erased: {}", c.prompt));
        }
        None => {
            ui.label("no adapter loaded");
        }
    }
    ui.end_row();
}

fn sample_fields(ui: &mut egui::Ui, app: &mut StudioApp) {
    let s = &mut app.samples.sample;
    egui::Grid::new("sample-fields")
        .num_columns(2)
        .show(ui, |ui| {
            let label = ui.label("Prompt");
            ui.add(egui::TextEdit::singleline(&mut s.prompt).desired_width(400.0))
                .labelled_by(label.id);
            ui.end_row();
            let label = ui.label("Seed");
            ui.add(egui::DragValue::new(&mut s.seed))
                .labelled_by(label.id);
            ui.end_row();
            let label = ui.label("Steps");
            ui.add(egui::DragValue::new(&mut s.steps).range(1..=200))
                .labelled_by(label.id);
            ui.end_row();
            let label = ui.label("Guidance");
            ui.add(
                egui::DragValue::new(&mut s.guidance_scale)
                    .range(1.0..=30.0)
                    .speed(0.1),
            )
            .labelled_by(label.id);
            ui.end_row();
        });
}

/// The latest render of the prompt box or img2img tab, side by side.
fn rendered(ui: &mut egui::Ui, app: &mut StudioApp) {
    let Some(c) = app.state.rendered.clone() else {
        return;
    };
    let stamp = app.state.rendered_stamp;
    egui::Grid::new("rendered").num_columns(3).show(ui, |ui| {
        ui.strong("Prompt");
        ui.strong("Original");
        ui.strong("Erased");
        ui.end_row();
        comparison_row(ui, app, "rendered", stamp, &c);
    });
}

/// Why the worker cannot draw now, if it cannot.
fn render_blocker(state: &StudioState) -> Option<&'static str> {
    if state.model.is_none() {
        Some("Load a model first.")
    } else if state.is_training() {
        Some("Pause training to draw: the worker is busy with the run.")
    } else {
        None
    }
}

pub fn prompt(ui: &mut egui::Ui, app: &mut StudioApp) {
    ui.label("Draws any prompt with the original model and with the current adapter, same seed.");
    sample_fields(ui, app);
    let blocker = render_blocker(&app.state);
    if ui
        .add_enabled(blocker.is_none(), egui::Button::new("Render"))
        .clicked()
    {
        app.worker.send(Command::Render(app.samples.sample.clone()));
    }
    if let Some(why) = blocker {
        ui.small(why);
    }
    rendered(ui, app);
}

pub fn img2img(ui: &mut egui::Ui, app: &mut StudioApp) {
    ui.label("Repaints an image with both models: how the adapter treats existing pictures.");
    ui.horizontal(|ui| {
        path_field(ui, "Image", &mut app.samples.init_image, || {
            rfd::FileDialog::new()
                .add_filter("images", &["png", "jpg", "jpeg", "webp"])
                .pick_file()
        })
    });
    ui.add(egui::Slider::new(&mut app.samples.strength, 0.0..=1.0).text("Strength"));
    sample_fields(ui, app);
    let blocker = render_blocker(&app.state).or_else(|| {
        app.samples
            .init_image
            .trim()
            .is_empty()
            .then_some("Choose an image.")
    });
    if ui
        .add_enabled(blocker.is_none(), egui::Button::new("Repaint"))
        .clicked()
    {
        app.worker.send(Command::Img2Img {
            image: PathBuf::from(app.samples.init_image.trim()),
            strength: app.samples.strength,
            settings: app.samples.sample.clone(),
        });
    }
    if let Some(why) = blocker {
        ui.small(why);
    }
    rendered(ui, app);
}

pub fn evaluation(ui: &mut egui::Ui, app: &mut StudioApp) {
    if app.samples.evaluate_run.is_empty()
        && let Some(run) = &app.state.run
    {
        app.samples.evaluate_run = run.dir.display().to_string();
    }
    ui.label(
        "Evaluates a finished run on held-out prompts and seeds: the judge's concept rate with \
         the original model and with the adapter, and how well everything else is preserved.",
    );
    ui.horizontal(|ui| {
        let label = ui.label("Run folder");
        ui.text_edit_singleline(&mut app.samples.evaluate_run)
            .labelled_by(label.id);
        let idle = app.state.busy.is_none();
        if ui
            .add_enabled(idle, egui::Button::new("Evaluate"))
            .clicked()
        {
            app.worker.send(Command::Evaluate {
                run: PathBuf::from(app.samples.evaluate_run.trim()),
            });
        }
    });
    if let Some((done, total)) = app.state.evaluation_progress {
        ui.add(
            egui::ProgressBar::new(done as f32 / total.max(1) as f32)
                .text(format!("{done}/{total} images")),
        );
    }
    let Some(eval) = &app.state.evaluation else {
        return;
    };
    let report = eval.report.clone();
    let grid = eval.grid.clone();
    ui.label(format!(
        "{} on {} · judge: {} · {} seeds per prompt, {} steps",
        report.preset, report.model, report.judge, report.seeds_per_prompt, report.steps
    ));
    egui::Grid::new("report").striped(true).show(ui, |ui| {
        for header in [
            "set",
            "images",
            "concept",
            "attribute accuracy",
            "CLIP sim",
            "PSNR",
        ] {
            ui.strong(header);
        }
        ui.end_row();
        for s in &report.sets {
            ui.label(&s.set);
            ui.label(s.images.to_string());
            ui.label(format!(
                "{:.1} % -> {:.1} %",
                100.0 * s.concept_rate_original,
                100.0 * s.concept_rate_erased
            ));
            let accuracy: Vec<String> = s
                .accuracy_original
                .iter()
                .map(|(attr, before)| {
                    format!(
                        "{attr} {:.0} -> {:.0}",
                        100.0 * before,
                        100.0 * s.accuracy_erased.get(attr).copied().unwrap_or(f64::NAN)
                    )
                })
                .collect();
            ui.label(accuracy.join(", "));
            ui.label(format!("{:.3}", s.clip_image_similarity));
            ui.label(format!("{:.1} dB", s.psnr_db));
            ui.end_row();
        }
    });
    let stamp = app.state.evaluation_stamp;
    let texture = app.textures.get(ui.ctx(), "evaluation-grid", stamp, &grid);
    let width = ui.available_width().min(grid.width as f32 * 2.0);
    let height = width * grid.height as f32 / grid.width as f32;
    egui::ScrollArea::vertical().show(ui, |ui| {
        ui.add(egui::Image::new((texture.id(), egui::vec2(width, height))))
            .on_hover_text("comparison grid: original rows above erased rows");
    });
}

/// A labelled path the user can type, with a Browse… button that opens `dialog` (which may
/// return nothing: no portal, or cancelled) and puts its choice in the field.
pub(super) fn path_field(
    ui: &mut egui::Ui,
    label: &str,
    path: &mut String,
    dialog: impl FnOnce() -> Option<PathBuf>,
) {
    let label = ui.label(label);
    ui.text_edit_singleline(path).labelled_by(label.id);
    if ui.button("Browse…").clicked()
        && let Some(chosen) = dialog()
    {
        *path = chosen.display().to_string();
    }
}

pub fn adapters(ui: &mut egui::Ui, app: &mut StudioApp) {
    match &app.state.adapter {
        Some(description) => ui.label(format!("Current adapter: {description}")),
        None => ui.label("No adapter yet: train one or load a file."),
    };
    let idle = app.state.busy.is_none();
    ui.separator();
    ui.strong("Export the current adapter");
    ui.horizontal(|ui| {
        path_field(ui, "Export to", &mut app.samples.export_path, || {
            rfd::FileDialog::new()
                .add_filter("safetensors", &["safetensors"])
                .set_file_name("erasure-adapter.safetensors")
                .save_file()
        });
        let can_export = idle && app.state.adapter.is_some();
        if ui
            .add_enabled(can_export, egui::Button::new("Export"))
            .clicked()
        {
            let rank = app.samples.fold_rank;
            app.worker.send(Command::ExportAdapter {
                path: PathBuf::from(app.samples.export_path.trim()),
                format: app.samples.export_format,
                fold_rank: (rank > 0).then_some(rank),
            });
        }
    });
    ui.horizontal(|ui| {
        let format = &mut app.samples.export_format;
        ui.radio_value(format, ExportFormat::Native, "Native (whole adapter)");
        let (kohya, peft) = (LoraFormat::Kohya, LoraFormat::Peft);
        ui.radio_value(
            format,
            ExportFormat::Lora(kohya),
            "kohya LoRA (A1111, ComfyUI)",
        );
        ui.radio_value(format, ExportFormat::Lora(peft), "PEFT LoRA (diffusers)");
    });
    if app.samples.export_format != ExportFormat::Native {
        ui.horizontal(|ui| {
            ui.label("Fold in the Safe Adapter at rank (0: leave it out)");
            ui.add(egui::DragValue::new(&mut app.samples.fold_rank).range(0..=256));
        });
        ui.small(
            "A LoRA acts on every prompt token, so it cannot hold the Safe Adapter, which acts on \
             the last few. After exporting, the studio measures how often the concept still \
             appears with the exported file next to the full adapter (held-out target prompts).",
        );
    }
    ui.separator();
    ui.strong("Load an adapter file");
    ui.horizontal(|ui| {
        path_field(ui, "Adapter file", &mut app.samples.adapter_path, || {
            rfd::FileDialog::new()
                .add_filter("safetensors", &["safetensors"])
                .pick_file()
        });
        let can_load = idle && app.state.model.is_some();
        if ui
            .add_enabled(can_load, egui::Button::new("Load adapter"))
            .clicked()
        {
            app.worker.send(Command::LoadAdapter {
                path: PathBuf::from(app.samples.adapter_path.trim()),
            });
        }
    });
    ui.separator();
    let slider = ui.add_enabled(
        app.state.adapter.is_some(),
        egui::Slider::new(&mut app.samples.adapter_strength, 0.0..=1.5).text("Adapter strength"),
    );
    if slider.changed() {
        app.worker
            .send(Command::SetStrength(app.samples.adapter_strength));
    }
    ui.small(
        "Strength 0 turns the adapter off; 1 is as trained. Render in the Prompt tab to see it.",
    );
}
