//! The studio window: pumps the worker's events into [`StudioState`] each frame and lays out the
//! panels. Nothing here runs a model.

use std::time::Duration;

use eframe::egui;

use super::controls;
use super::forms::{RunForm, SampleForm, Settings, Tab};
use super::state::StudioState;
use super::textures::Textures;
use super::views;
use super::worker::{Command, Event, Interrupt, WorkerHandle};
use crate::engine::io::hf_cache::{hf_cache_roots, hf_cached_pipelines};

/// The studio's whole state: what the worker reported, what the user typed, and the textures.
pub struct StudioApp {
    pub worker: WorkerHandle,
    pub state: StudioState,
    pub settings: Settings,
    /// None until the chosen preset loads; `form_error` says why not.
    pub run_form: Option<RunForm>,
    pub form_error: Option<String>,
    pub samples: SampleForm,
    pub textures: Textures,
    /// Stable Diffusion pipelines in the Hugging Face cache, scanned once at start-up rather
    /// than every frame.
    pub cached_models: Vec<String>,
    /// Closing was asked for while training: the run is saving its checkpoint first.
    closing: bool,
}

impl StudioApp {
    /// The studio on `device`, with `settings` (the last session's, or the defaults); starts
    /// loading the model they name.
    pub fn new(ctx: &egui::Context, device: candle_core::Device, settings: Settings) -> Self {
        let repaint = ctx.clone();
        let worker = WorkerHandle::spawn(device, move || repaint.request_repaint());
        worker.send(Command::LoadModel {
            spec: settings.model.clone(),
        });
        let mut app = Self {
            worker,
            state: StudioState::default(),
            settings,
            run_form: None,
            form_error: None,
            samples: SampleForm::default(),
            textures: Textures::default(),
            cached_models: hf_cached_pipelines(&hf_cache_roots()),
            closing: false,
        };
        app.refresh_run_form();
        app
    }

    /// Reloads the run form when the chosen preset or model changed.
    pub fn refresh_run_form(&mut self) {
        if self
            .run_form
            .as_ref()
            .is_some_and(|f| f.matches(&self.settings))
        {
            return;
        }
        match RunForm::new(&self.settings) {
            Ok(form) => {
                self.run_form = Some(form);
                self.form_error = None;
            }
            Err(e) => {
                self.run_form = None;
                self.form_error = Some(format!("{e:#}"));
            }
        }
    }

    /// Folds the worker's events into the state.
    pub fn pump_events(&mut self) {
        for event in self.worker.drain() {
            // A new model starts the prompt box at its own steps and guidance, as `generate` does.
            if let Event::ModelLoaded { sampling, .. } = &event {
                self.samples.sample.steps = sampling.steps;
                self.samples.sample.guidance_scale = sampling.guidance_scale;
            }
            self.state.apply(event);
        }
    }

    /// Pause or cancel the running job; it saves a checkpoint first.
    pub fn interrupt(&mut self, what: Interrupt) {
        self.worker.interrupt(what);
        self.state.stop_requested();
    }

    fn handle_close(&mut self, ui: &egui::Ui) {
        if ui.input(|i| i.viewport().close_requested()) && self.state.is_training() {
            ui.send_viewport_cmd(egui::ViewportCommand::CancelClose);
            if !self.closing {
                self.closing = true;
                self.interrupt(Interrupt::Pause);
            }
        }
        if self.closing && !self.state.is_training() {
            ui.send_viewport_cmd(egui::ViewportCommand::Close);
        }
    }
}

impl eframe::App for StudioApp {
    fn ui(&mut self, ui: &mut egui::Ui, _frame: &mut eframe::Frame) {
        self.pump_events();
        self.handle_close(ui);
        self.refresh_run_form();

        egui::Panel::top("status").show(ui, |ui| controls::status_bar(ui, self));
        egui::Panel::bottom("messages")
            .resizable(true)
            .default_size(90.0)
            .show(ui, |ui| controls::messages(ui, &mut self.state));
        let left = egui::Panel::left("controls")
            .resizable(true)
            .default_size(self.settings.left_panel_width)
            .show(ui, |ui| {
                egui::ScrollArea::vertical().show(ui, |ui| controls::side_panel(ui, self))
            });
        self.settings.left_panel_width = left.response.rect.width();
        egui::CentralPanel::default().show(ui, |ui| {
            ui.horizontal(|ui| {
                for tab in Tab::ALL {
                    ui.selectable_value(&mut self.settings.tab, tab, tab.title());
                }
            });
            ui.separator();
            match self.settings.tab {
                Tab::Curves => views::curves(ui, &self.state),
                Tab::Gallery => views::gallery(ui, self),
                Tab::Prompt => views::prompt(ui, self),
                Tab::Img2Img => views::img2img(ui, self),
                Tab::Evaluation => views::evaluation(ui, self),
                Tab::Adapters => views::adapters(ui, self),
            }
        });
        if self.state.busy.is_some() || self.closing {
            // Keeps the ETA and busy indicator moving between events.
            ui.request_repaint_after(Duration::from_millis(500));
        }
    }

    fn save(&mut self, storage: &mut dyn eframe::Storage) {
        eframe::set_value(storage, eframe::APP_KEY, &self.settings);
    }

    fn on_exit(&mut self, _gl: Option<&eframe::glow::Context>) {
        self.worker.shutdown();
    }
}

/// Opens the studio window on `device` (blocks until it closes).
pub fn run(device: candle_core::Device) -> anyhow::Result<()> {
    let options = eframe::NativeOptions {
        viewport: egui::ViewportBuilder::default()
            .with_title("Erasure Studio")
            .with_app_id("erasure-studio")
            .with_inner_size([1280.0, 820.0])
            .with_min_inner_size([800.0, 500.0]),
        ..Default::default()
    };
    eframe::run_native(
        "Erasure Studio",
        options,
        Box::new(move |cc| {
            let settings = cc
                .storage
                .and_then(|s| eframe::get_value(s, eframe::APP_KEY))
                .unwrap_or_default();
            Ok(Box::new(StudioApp::new(&cc.egui_ctx, device, settings)))
        }),
    )
    .map_err(|e| anyhow::anyhow!("cannot open the studio window: {e}"))
}
