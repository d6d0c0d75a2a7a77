//! The side panel (model, concept, training controls), the status bar and the message area.

use std::path::PathBuf;

use eframe::egui;

use super::app::StudioApp;
use super::forms::{CUSTOM, base_preset_for};
use super::state::{RunStatus, StudioState};
use super::worker::{Command, Interrupt};
use crate::erasure::preset::{self, ConceptKind};
use crate::erasure::session::RunDir;

pub fn status_bar(ui: &mut egui::Ui, app: &StudioApp) {
    ui.horizontal(|ui| {
        ui.heading("Erasure Studio");
        ui.separator();
        match &app.state.model {
            Some(m) => ui.label(format!("Model: {}", m.description)),
            None => ui.label("No model loaded"),
        };
        ui.separator();
        match &app.state.busy {
            Some(job) => {
                ui.spinner();
                ui.label(job)
            }
            None => ui.label("Idle"),
        };
    });
}

pub fn messages(ui: &mut egui::Ui, state: &mut StudioState) {
    ui.horizontal(|ui| {
        ui.strong("Messages");
        if ui.small_button("Clear").clicked() {
            state.messages.clear();
        }
    });
    egui::ScrollArea::vertical()
        .stick_to_bottom(true)
        .auto_shrink([false; 2])
        .show(ui, |ui| {
            for m in &state.messages {
                if m.is_error {
                    ui.colored_label(ui.visuals().error_fg_color, format!("Error: {}", m.text));
                } else {
                    ui.label(&m.text);
                }
            }
        });
}

pub fn side_panel(ui: &mut egui::Ui, app: &mut StudioApp) {
    egui::CollapsingHeader::new("Model")
        .default_open(true)
        .show(ui, |ui| model_section(ui, app));
    egui::CollapsingHeader::new("Concept")
        .default_open(true)
        .show(ui, |ui| concept_section(ui, app));
    egui::CollapsingHeader::new("Training")
        .default_open(true)
        .show(ui, |ui| training_section(ui, app));
}

fn model_section(ui: &mut egui::Ui, app: &mut StudioApp) {
    egui::ComboBox::from_label("Model")
        .selected_text(app.settings.model.clone())
        .show_ui(ui, |ui| {
            ui.selectable_value(&mut app.settings.model, "demo".into(), "demo (built in)");
            for repo in &app.cached_models {
                ui.selectable_value(&mut app.settings.model, repo.clone(), repo);
            }
        });
    ui.horizontal(|ui| {
        let label = ui.label("Folder or repo id");
        ui.text_edit_singleline(&mut app.settings.model)
            .labelled_by(label.id);
    });
    ui.horizontal(|ui| {
        if ui.button("Browse…").clicked()
            && let Some(dir) = rfd::FileDialog::new().pick_folder()
        {
            app.settings.model = dir.display().to_string();
        }
        let loaded = app.state.model.as_ref().map(|m| m.spec.as_str());
        let can_load = !app.state.is_training() && loaded != Some(app.settings.model.as_str());
        if ui
            .add_enabled(can_load, egui::Button::new("Load model"))
            .clicked()
        {
            app.worker.send(Command::LoadModel {
                spec: app.settings.model.clone(),
            });
        }
    });
    if app.cached_models.is_empty() {
        ui.small("No Stable Diffusion pipelines in the Hugging Face cache.");
    }
}

fn concept_section(ui: &mut egui::Ui, app: &mut StudioApp) {
    let mut names = preset::names();
    names.push(CUSTOM.to_string());
    egui::ComboBox::from_label("Preset")
        .selected_text(app.settings.preset.clone())
        .show_ui(ui, |ui| {
            for name in names {
                ui.selectable_value(&mut app.settings.preset, name.clone(), name);
            }
        });
    if app.settings.preset != CUSTOM {
        if let Some(form) = &app.run_form {
            ui.small(&form.preset.description);
        }
        return;
    }
    ui.small(format!(
        "Hyper-parameters, detector and judge come from `{}`.",
        base_preset_for(&app.settings.model)
    ));
    let before = app.settings.custom.clone();
    let form = &mut app.settings.custom;
    egui::Grid::new("custom-concept")
        .num_columns(2)
        .show(ui, |ui| {
            let label = ui.label("Concept");
            ui.text_edit_singleline(&mut form.concept)
                .labelled_by(label.id);
            ui.end_row();
            ui.label("Kind");
            egui::ComboBox::from_id_salt("concept-kind")
                .selected_text(format!("{:?}", form.kind))
                .show_ui(ui, |ui| {
                    for kind in [
                        ConceptKind::Object,
                        ConceptKind::Style,
                        ConceptKind::Nudity,
                        ConceptKind::Custom,
                    ] {
                        ui.selectable_value(&mut form.kind, kind, format!("{kind:?}"));
                    }
                })
                .response
                .on_hover_text("Kind");
            ui.end_row();
            let label = ui.label("More words to filter");
            ui.text_edit_singleline(&mut form.extra_words)
                .labelled_by(label.id);
            ui.end_row();
            let label = ui.label("Anchor text");
            ui.text_edit_singleline(&mut form.anchor)
                .labelled_by(label.id);
            ui.end_row();
        });
    for (title, text) in [
        ("Target prompts (one per line)", &mut form.targets),
        ("Neighbour prompts", &mut form.neighbours),
        ("Neutral prompts", &mut form.neutral),
    ] {
        let label = ui.label(title);
        ui.add(egui::TextEdit::multiline(text).desired_rows(3))
            .labelled_by(label.id);
    }
    if *form != before {
        // The run form rebuilds from the edited concept.
        app.run_form = None;
    }
}

fn training_section(ui: &mut egui::Ui, app: &mut StudioApp) {
    if let Some(error) = &app.form_error {
        ui.colored_label(ui.visuals().error_fg_color, error);
    }
    let training = app.state.is_training();
    let paused_run = app
        .state
        .run
        .as_ref()
        .filter(|r| r.status == RunStatus::Paused)
        .map(|r| r.dir.clone());
    if let Some(form) = &mut app.run_form {
        ui.add_enabled_ui(!training, |ui| {
            egui::Grid::new("training").num_columns(2).show(ui, |ui| {
                let label = ui.label("Epochs");
                ui.add(egui::DragValue::new(&mut form.preset.ddpo.epochs).range(1..=10_000))
                    .labelled_by(label.id);
                ui.end_row();
                let label = ui.label("Learning rate");
                ui.add(
                    egui::DragValue::new(&mut form.preset.ddpo.learning_rate)
                        .range(1e-6..=1.0)
                        .speed(1e-4)
                        .custom_formatter(|v, _| format!("{v:.1e}")),
                )
                .labelled_by(label.id);
                ui.end_row();
                let label = ui.label("Run folder");
                ui.text_edit_singleline(&mut form.out).labelled_by(label.id);
                ui.end_row();
            });
            egui::CollapsingHeader::new("Advanced")
                .default_open(false)
                .show(ui, |ui| advanced(ui, form));
        });
    }
    ui.horizontal(|ui| {
        let model_ready = app.state.model.as_ref().map(|m| &m.spec) == Some(&app.settings.model);
        let can_start = !training && model_ready && app.run_form.is_some();
        if ui
            .add_enabled(can_start, egui::Button::new("Start"))
            .clicked()
            && let Some(form) = &app.run_form
        {
            start_or_resume(app, form.out.clone());
        }
        if ui
            .add_enabled(training, egui::Button::new("Pause"))
            .clicked()
        {
            app.interrupt(Interrupt::Pause);
        }
        if ui
            .add_enabled(
                !training && paused_run.is_some(),
                egui::Button::new("Resume"),
            )
            .clicked()
            && let (Some(run), Some(form)) = (paused_run, &app.run_form)
        {
            app.worker.send(Command::ResumeRun {
                run,
                preview_every: form.preview_every,
            });
        }
        let cancellable = training
            || app
                .state
                .run
                .as_ref()
                .is_some_and(|r| r.status == RunStatus::Paused);
        if ui
            .add_enabled(cancellable, egui::Button::new("Cancel"))
            .clicked()
        {
            cancel(app);
        }
    });
    progress(ui, &app.state);
}

/// Starts a run in `out`, or resumes the run already there (one interrupted in an earlier
/// session).
fn start_or_resume(app: &mut StudioApp, out: String) {
    let Some(form) = &app.run_form else { return };
    let out = PathBuf::from(out);
    let command = if RunDir::new(&out).preset().exists() {
        Command::ResumeRun {
            run: out,
            preview_every: form.preview_every,
        }
    } else {
        Command::StartRun {
            preset: Box::new(form.preset.clone()),
            out,
            preview_every: form.preview_every,
        }
    };
    app.worker.send(command);
    // The next run gets a fresh folder.
    app.run_form = None;
}

fn cancel(app: &mut StudioApp) {
    if app.state.is_training() {
        app.interrupt(Interrupt::Cancel);
    } else if let Some(run) = &mut app.state.run {
        run.status = RunStatus::Cancelled;
    }
}

fn advanced(ui: &mut egui::Ui, form: &mut super::forms::RunForm) {
    let ddpo = &mut form.preset.ddpo;
    let adapter = &mut form.preset.adapter;
    egui::Grid::new("advanced").num_columns(2).show(ui, |ui| {
        let count = |ui: &mut egui::Ui, name: &str, value: &mut usize, max: usize| {
            let label = ui.label(name);
            ui.add(egui::DragValue::new(value).range(1..=max))
                .labelled_by(label.id);
            ui.end_row();
        };
        count(ui, "Prompts per batch", &mut ddpo.batch_size, 256);
        count(ui, "Batches per epoch", &mut ddpo.batches_per_epoch, 256);
        count(ui, "Samples per prompt", &mut ddpo.samples_per_prompt, 64);
        count(ui, "Inner epochs", &mut ddpo.inner_epochs, 16);
        count(ui, "LoRA rank", &mut adapter.lora_rank, 256);
        count(ui, "Tail tokens", &mut adapter.tail_tokens, 77);
        count(ui, "Preview every (epochs)", &mut form.preview_every, 1000);
        let real = |ui: &mut egui::Ui, name: &str, value: &mut f64, max: f64, speed: f64| {
            let label = ui.label(name);
            ui.add(egui::DragValue::new(value).range(0.0..=max).speed(speed))
                .labelled_by(label.id);
            ui.end_row();
        };
        real(ui, "PPO clip range", &mut ddpo.clip_range, 1.0, 1e-5);
        real(
            ui,
            "Max gradient norm",
            &mut ddpo.max_grad_norm,
            100.0,
            0.01,
        );
        real(
            ui,
            "Preservation weight",
            &mut ddpo.preservation_weight,
            100.0,
            0.01,
        );
        real(ui, "Anchor weight", &mut ddpo.anchor_weight, 100.0, 0.01);
        real(ui, "Anchor guidance", &mut ddpo.anchor_guidance, 10.0, 0.01);
        real(ui, "DDIM η", &mut form.preset.sampling.eta, 1.0, 0.01);
        let label = ui.label("Sampling steps");
        ui.add(egui::DragValue::new(&mut form.preset.sampling.steps).range(2..=200))
            .labelled_by(label.id);
        ui.end_row();
        let label = ui.label("Seed");
        ui.add(egui::DragValue::new(&mut ddpo.seed))
            .labelled_by(label.id);
        ui.end_row();
    });
}

fn progress(ui: &mut egui::Ui, state: &StudioState) {
    let Some(run) = &state.run else { return };
    let done = run.epochs_done();
    let fraction = done as f32 / run.total_epochs.max(1) as f32;
    let eta = run
        .eta_seconds()
        .map(|s| format!(" · ETA {}", format_duration(s)))
        .unwrap_or_default();
    let status = match run.status {
        RunStatus::Training => "training",
        RunStatus::Stopping => "saving checkpoint",
        RunStatus::Paused => "paused",
        RunStatus::Cancelled => "cancelled",
        RunStatus::Finished => "finished",
    };
    ui.add(
        egui::ProgressBar::new(fraction)
            .text(format!("epoch {done}/{} · {status}{eta}", run.total_epochs)),
    );
    ui.small(run.dir.display().to_string());
}

fn format_duration(seconds: f64) -> String {
    let s = seconds.round() as u64;
    if s >= 3600 {
        format!("{} h {:02} min", s / 3600, (s % 3600) / 60)
    } else if s >= 60 {
        format!("{} min {:02} s", s / 60, s % 60)
    } else {
        format!("{s} s")
    }
}
