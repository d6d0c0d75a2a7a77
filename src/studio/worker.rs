//! The studio's worker thread. It owns every model and runs every job the UI asks for (loading,
//! training, sampling, evaluation, adapter files); the UI thread only sends [`Command`]s and
//! draws state built from the [`Event`]s that come back.
//!
//! A training run blocks the worker for its whole length, so pausing and cancelling go through a
//! shared flag the run polls between batches, not through the command queue: commands sent during
//! a run wait until it stops.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::thread::JoinHandle;

use anyhow::{Context, bail};
use candle_core::{DType, Device, Tensor};
use crossbeam_channel::{Receiver, Sender};

use crate::adapter::ErasureAdapter;
use crate::engine::StableDiffusion;
use crate::engine::diffusion::pipeline::{
    GenerateRequest, SampleHooks, Sampling, img2img, output_size, txt2img,
};
use crate::engine::models::unet::UNetHook;
use crate::erasure::evaluate::{self, Report};
use crate::erasure::export::{ExportComparison, ExportFormat};
use crate::erasure::metrics::EpochMetrics;
use crate::erasure::preset::{self, Preset};
use crate::erasure::session::{Preview, RunDir, RunEnd, RunObserver, RunOptions};
use crate::erasure::workbench::{ExportJob, ExportProgress, Workbench};
use crate::images;

/// An RGB image ready for the screen.
#[derive(Debug, Clone, PartialEq)]
pub struct Picture {
    pub width: usize,
    pub height: usize,
    /// Row-major RGB bytes.
    pub rgb: Vec<u8>,
}

impl Picture {
    /// One picture per image of `images` [N, 3, H, W] in [0, 1].
    pub fn from_batch(images: &Tensor) -> anyhow::Result<Vec<Picture>> {
        (0..images.dim(0)?)
            .map(|i| {
                let grid = images::grid(&images.narrow(0, i, 1)?, 1)?;
                Ok(Picture::from(&grid))
            })
            .collect()
    }
}

impl From<&image::RgbImage> for Picture {
    fn from(img: &image::RgbImage) -> Self {
        Self {
            width: img.width() as usize,
            height: img.height() as usize,
            rgb: img.as_raw().clone(),
        }
    }
}

/// The same prompt and seed drawn by the original model and with the adapter.
#[derive(Debug, Clone, PartialEq)]
pub struct Comparison {
    pub prompt: String,
    pub original: Picture,
    /// None when no adapter is loaded.
    pub erased: Option<Picture>,
}

/// Sampling settings of the prompt box and the img2img tab.
#[derive(Debug, Clone, PartialEq)]
pub struct SampleSettings {
    pub prompt: String,
    pub seed: u64,
    pub steps: usize,
    pub guidance_scale: f64,
}

/// What the UI asks the worker to do.
#[derive(Debug, Clone)]
pub enum Command {
    /// `demo`, a diffusers folder or a repo id in the Hugging Face cache.
    LoadModel {
        spec: String,
    },
    /// A new run of `preset` (its model must be the loaded one) in the folder `out`.
    StartRun {
        preset: Box<Preset>,
        out: PathBuf,
        preview_every: usize,
    },
    /// Continues a paused or interrupted run from its checkpoint.
    ResumeRun {
        run: PathBuf,
        preview_every: usize,
    },
    /// Draws the prompt with the original model and with the current adapter.
    Render(SampleSettings),
    /// Repaints `image` (a file) at `strength` with both models.
    Img2Img {
        image: PathBuf,
        strength: f64,
        settings: SampleSettings,
    },
    /// Evaluates the adapter of a finished run, writing the report into the run folder.
    Evaluate {
        run: PathBuf,
    },
    /// Makes the adapter in `path` the current one.
    LoadAdapter {
        path: PathBuf,
    },
    /// Saves the current adapter to `path` in `format`; a LoRA export is then measured against
    /// the full adapter on the held-out target prompts of the adapter's preset.
    ExportAdapter {
        path: PathBuf,
        format: ExportFormat,
        fold_rank: Option<usize>,
    },
    SetStrength(f64),
}

/// What the worker reports.
#[derive(Debug, Clone)]
pub enum Event {
    /// A job started; `None` when the worker is idle again.
    Busy(Option<String>),
    ModelLoaded {
        spec: String,
        description: String,
        /// The steps and guidance the model is drawn with unless the user says otherwise.
        sampling: Sampling,
    },
    /// A run began (or resumed with `history` already done).
    RunStarted {
        run: PathBuf,
        total_epochs: usize,
        history: Vec<EpochMetrics>,
    },
    Epoch {
        metrics: Box<EpochMetrics>,
        total_epochs: usize,
    },
    Preview {
        epoch: usize,
        comparisons: Vec<Comparison>,
    },
    /// Stopped on request: paused (resumable) or cancelled.
    RunStopped {
        run: PathBuf,
        epochs_done: usize,
        cancelled: bool,
    },
    RunFinished {
        run: PathBuf,
        adapter: PathBuf,
        seconds: f64,
    },
    Rendered(Comparison),
    /// Progress of an evaluation, in images.
    EvaluationProgress {
        done: usize,
        total: usize,
    },
    Evaluated {
        report: Box<Report>,
        grid: Picture,
    },
    /// The adapter the erased pictures use changed: a file, a run's latest state, or none.
    AdapterChanged(Option<String>),
    AdapterExported {
        path: PathBuf,
        /// What a LoRA export keeps of the erasure; `None` for a native file, or when no
        /// preset is known to measure it on.
        comparison: Option<ExportComparison>,
    },
    /// Something a job did that the user should know about (resuming, a skipped update).
    Notice(String),
    /// A job failed; the worker carries on.
    Error(String),
}

/// Asked of a running job through [`WorkerHandle::interrupt`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interrupt {
    None = 0,
    /// Stop with a checkpoint, to resume later.
    Pause = 1,
    /// Stop with a checkpoint and forget the run.
    Cancel = 2,
}

/// The UI's side of the worker.
pub struct WorkerHandle {
    commands: Option<Sender<Command>>,
    events: Receiver<Event>,
    interrupt: Arc<AtomicU8>,
    shutting_down: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl WorkerHandle {
    /// Starts the worker on `device`; `wake` is called after every event (to repaint the UI).
    pub fn spawn(device: Device, wake: impl Fn() + Send + 'static) -> Self {
        let (commands, command_rx) = crossbeam_channel::unbounded();
        let (event_tx, events) = crossbeam_channel::unbounded();
        let interrupt = Arc::new(AtomicU8::new(Interrupt::None as u8));
        let shutting_down = Arc::new(AtomicBool::new(false));
        let worker = Worker {
            device,
            model: None,
            adapter: None,
            adapter_run: None,
            events: EventSink {
                tx: event_tx,
                wake: Box::new(wake),
            },
            interrupt: interrupt.clone(),
            shutting_down: shutting_down.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("studio-worker".into())
            .spawn(move || worker.serve(command_rx))
            .expect("cannot start the worker thread");
        Self {
            commands: Some(commands),
            events,
            interrupt,
            shutting_down,
            thread: Some(thread),
        }
    }

    pub fn send(&self, command: Command) {
        if let Some(tx) = &self.commands {
            // Fails only once the worker has exited, when there is nothing left to do.
            let _ = tx.send(command);
        }
    }

    /// Asks the running job to stop; it saves a checkpoint first.
    pub fn interrupt(&self, what: Interrupt) {
        self.interrupt.store(what as u8, Ordering::SeqCst);
    }

    /// Every event that arrived since the last call.
    pub fn drain(&self) -> Vec<Event> {
        self.events.try_iter().collect()
    }

    /// Stops a running job (saving its checkpoint), drops queued ones, and waits for the worker
    /// to exit.
    pub fn shutdown(&mut self) {
        self.shutting_down.store(true, Ordering::SeqCst);
        self.interrupt(Interrupt::Pause);
        self.commands = None;
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for WorkerHandle {
    fn drop(&mut self) {
        self.shutdown();
    }
}

struct EventSink {
    tx: Sender<Event>,
    wake: Box<dyn Fn() + Send>,
}

impl EventSink {
    fn send(&self, event: Event) {
        let _ = self.tx.send(event);
        (self.wake)();
    }
}

/// Why a job that needs a model cannot run.
const NO_MODEL: &str = "no model is loaded: pick one in the Model panel first";

struct Worker {
    device: Device,
    model: Option<Workbench>,
    adapter: Option<ErasureAdapter>,
    /// The folder of the run the current adapter comes from, if it does.
    adapter_run: Option<PathBuf>,
    events: EventSink,
    interrupt: Arc<AtomicU8>,
    shutting_down: Arc<AtomicBool>,
}

impl Worker {
    fn serve(mut self, commands: Receiver<Command>) {
        while let Ok(command) = commands.recv() {
            if self.shutting_down.load(Ordering::SeqCst) {
                break;
            }
            // A pause or cancel meant for an earlier job must not stop this one.
            self.interrupt
                .store(Interrupt::None as u8, Ordering::SeqCst);
            self.events.send(Event::Busy(Some(describe(&command))));
            if let Err(e) = crate::threads::on_pool(|| self.run(command)) {
                self.events.send(Event::Error(format!("{e:#}")));
            }
            self.events.send(Event::Busy(None));
        }
    }

    fn run(&mut self, command: Command) -> anyhow::Result<()> {
        match command {
            Command::LoadModel { spec } => self.load_model(&spec),
            Command::StartRun {
                preset,
                out,
                preview_every,
            } => self.train(Some(*preset), &out, preview_every),
            Command::ResumeRun { run, preview_every } => self.train(None, &run, preview_every),
            Command::Render(settings) => {
                let comparison = self.render(&settings, None)?;
                self.events.send(Event::Rendered(comparison));
                Ok(())
            }
            Command::Img2Img {
                image,
                strength,
                settings,
            } => {
                let comparison = self.render(&settings, Some((&image, strength)))?;
                self.events.send(Event::Rendered(comparison));
                Ok(())
            }
            Command::Evaluate { run } => self.evaluate(&run),
            Command::LoadAdapter { path } => {
                let sd = self.model()?.sd();
                let adapter = ErasureAdapter::load(&path, &sd.unet, DType::F32, &sd.device)?;
                let description = describe_adapter(&adapter, &path.display().to_string());
                self.adapter = Some(adapter);
                self.adapter_run = None;
                self.events.send(Event::AdapterChanged(Some(description)));
                Ok(())
            }
            Command::ExportAdapter {
                path,
                format,
                fold_rank,
            } => self.export(path, format, fold_rank),
            Command::SetStrength(strength) => {
                if let Some(adapter) = &mut self.adapter {
                    adapter.set_strength(strength);
                }
                Ok(())
            }
        }
    }

    fn model(&self) -> anyhow::Result<&Workbench> {
        self.model.as_ref().context(NO_MODEL)
    }

    fn load_model(&mut self, spec: &str) -> anyhow::Result<()> {
        // Free the old model first: two real models may not fit in memory together.
        self.model = None;
        self.adapter = None;
        self.adapter_run = None;
        let workbench = Workbench::load(spec, &self.device)?;
        let description = describe_model(spec, workbench.sd());
        self.model = Some(workbench);
        self.events.send(Event::ModelLoaded {
            spec: spec.to_string(),
            description,
            sampling: Sampling::defaults_for(spec),
        });
        self.events.send(Event::AdapterChanged(None));
        Ok(())
    }

    fn export(
        &mut self,
        path: PathBuf,
        format: ExportFormat,
        fold_rank: Option<usize>,
    ) -> anyhow::Result<()> {
        let Some(adapter) = &self.adapter else {
            bail!("there is no adapter to export yet: train one or load an adapter file")
        };
        // A LoRA export is measured on the preset and report of the adapter's run, else on the
        // preset its file names.
        let run = self.adapter_run.as_deref();
        let preset = match (format, run, &adapter.info().preset) {
            (ExportFormat::Native, _, _) => None,
            (_, Some(run), _) => Some(RunDir::new(run).load_preset()?),
            (_, None, Some(name)) => preset::find(name).ok(),
            (_, None, None) => None,
        };
        let report = run.and_then(evaluate::read_report);
        let job = ExportJob {
            format,
            fold_rank,
            out: &path,
            compare_on: preset.as_ref().map(|p| (p, report.as_ref())),
        };
        let workbench = self.model.as_mut().context(NO_MODEL)?;
        let comparison = workbench.export(adapter, &job, &mut ForwardImages(&self.events))?;
        self.events
            .send(Event::AdapterExported { path, comparison });
        Ok(())
    }

    /// Starts (`preset` given) or resumes the run in `run`.
    fn train(
        &mut self,
        preset: Option<Preset>,
        run: &Path,
        preview_every: usize,
    ) -> anyhow::Result<()> {
        let dir = RunDir::new(run);
        let (wanted, total_epochs) = match &preset {
            Some(p) => (p.model.clone(), p.ddpo.epochs),
            None => {
                let p = dir.load_preset()?;
                (p.model, p.ddpo.epochs)
            }
        };
        self.model()?.ensure_serves(&wanted)?;
        self.events.send(Event::RunStarted {
            run: run.to_path_buf(),
            total_epochs,
            history: dir.read_metrics().unwrap_or_default(),
        });
        let (interrupt, shutting_down) = (self.interrupt.clone(), self.shutting_down.clone());
        let stop = move || {
            interrupt.load(Ordering::SeqCst) != Interrupt::None as u8
                || shutting_down.load(Ordering::SeqCst)
        };
        let options = RunOptions { preview_every };
        let mut observer = Forward {
            events: &self.events,
            adapter: None,
        };
        let workbench = self.model.as_mut().context(NO_MODEL)?;
        let end = match preset {
            Some(p) => workbench.start_run(p, run, options, &stop, &mut observer),
            None => workbench.resume_run(run, options, &stop, &mut observer),
        };
        if let Some((adapter, epoch)) = observer.adapter.take() {
            let source = format!("{} after epoch {epoch}", run.display());
            self.events
                .send(Event::AdapterChanged(Some(describe_adapter(
                    &adapter, &source,
                ))));
            self.adapter = Some(adapter);
            self.adapter_run = Some(run.to_path_buf());
        }
        match end? {
            RunEnd::Finished { adapter, seconds } => {
                let sd = self.model()?.sd();
                let file = ErasureAdapter::load(&adapter, &sd.unet, DType::F32, &sd.device)?;
                let description = describe_adapter(&file, &adapter.display().to_string());
                self.adapter = Some(file);
                self.adapter_run = Some(run.to_path_buf());
                self.events.send(Event::AdapterChanged(Some(description)));
                self.events.send(Event::RunFinished {
                    run: run.to_path_buf(),
                    adapter,
                    seconds,
                });
            }
            RunEnd::Stopped { epochs_done } => self.events.send(Event::RunStopped {
                run: run.to_path_buf(),
                epochs_done,
                cancelled: self.interrupt.load(Ordering::SeqCst) == Interrupt::Cancel as u8,
            }),
        }
        Ok(())
    }

    fn render(
        &self,
        settings: &SampleSettings,
        init: Option<(&Path, f64)>,
    ) -> anyhow::Result<Comparison> {
        let sd = self.model()?.sd();
        // The size `generate` would draw at: the init image's, else the model's own.
        let size = output_size(sd, None, None, init.map(|(path, _)| path))?;
        let sampling = Sampling {
            steps: settings.steps,
            guidance_scale: settings.guidance_scale,
        };
        let request =
            GenerateRequest::new(vec![settings.prompt.clone()], size, sampling).seed(settings.seed);
        let init = init
            .map(|(path, strength)| {
                anyhow::Ok((
                    images::load_image(path, size.0, size.1, &sd.device)?,
                    strength,
                ))
            })
            .transpose()?;
        let draw = |adapter: Option<&ErasureAdapter>| -> anyhow::Result<Picture> {
            let detached = adapter.map(ErasureAdapter::detached);
            let hooks = SampleHooks {
                adapter: detached.as_ref().map(|a| a as &dyn UNetHook),
                on_step: None,
            };
            let images = match &init {
                Some((image, strength)) => img2img(sd, &request, image, *strength, hooks)?.1,
                None => txt2img(sd, &request, hooks)?.1,
            };
            Ok(Picture::from_batch(&images)?.remove(0))
        };
        Ok(Comparison {
            prompt: settings.prompt.clone(),
            original: draw(None)?,
            erased: self.adapter.as_ref().map(|a| draw(Some(a))).transpose()?,
        })
    }

    fn evaluate(&mut self, run: &Path) -> anyhow::Result<()> {
        let events = &self.events;
        let workbench = self.model.as_mut().context(NO_MODEL)?;
        let report = workbench.evaluate_run(run, &mut |d, t| {
            events.send(Event::EvaluationProgress { done: d, total: t })
        })?;
        let grid = image::open(run.join(evaluate::GRID_FILE))
            .context("reading the evaluation's comparison grid")?
            .to_rgb8();
        self.events.send(Event::Evaluated {
            report: Box::new(report),
            grid: Picture::from(&grid),
        });
        Ok(())
    }
}

/// Counts an export measurement's images as evaluation progress.
struct ForwardImages<'a>(&'a EventSink);

impl ExportProgress for ForwardImages<'_> {
    fn images(&mut self, done: usize, total: usize) {
        self.0.send(Event::EvaluationProgress { done, total });
    }
}

/// Forwards a run's progress as events and keeps the adapter of its latest preview (with the
/// epoch it stands at).
struct Forward<'a> {
    events: &'a EventSink,
    adapter: Option<(ErasureAdapter, usize)>,
}

impl RunObserver for Forward<'_> {
    fn epoch(&mut self, metrics: &EpochMetrics, total_epochs: usize) {
        self.events.send(Event::Epoch {
            metrics: Box::new(metrics.clone()),
            total_epochs,
        });
    }

    fn preview(&mut self, preview: &Preview) {
        let pictures = Picture::from_batch(preview.original).and_then(|original| {
            Ok(original
                .into_iter()
                .zip(Picture::from_batch(preview.erased)?)
                .zip(preview.prompts)
                .map(|((original, erased), prompt)| Comparison {
                    prompt: prompt.clone(),
                    original,
                    erased: Some(erased),
                })
                .collect())
        });
        match pictures {
            Ok(comparisons) => self.events.send(Event::Preview {
                epoch: preview.epoch,
                comparisons,
            }),
            Err(e) => self
                .events
                .send(Event::Error(format!("showing a preview: {e:#}"))),
        }
        self.adapter = Some((preview.adapter.detached(), preview.epoch));
    }

    fn notice(&mut self, message: &str) {
        self.events.send(Event::Notice(message.to_string()));
    }
}

fn describe(command: &Command) -> String {
    match command {
        Command::LoadModel { spec } => format!("loading model `{spec}`"),
        Command::StartRun { preset, .. } => format!("erasing `{}`", preset.concept),
        Command::ResumeRun { run, .. } => format!("resuming {}", run.display()),
        Command::Render(s) | Command::Img2Img { settings: s, .. } => {
            format!("drawing \"{}\"", s.prompt)
        }
        Command::Evaluate { run } => format!("evaluating {}", run.display()),
        Command::LoadAdapter { path } => format!("loading adapter {}", path.display()),
        Command::ExportAdapter { path, .. } => format!("exporting to {}", path.display()),
        Command::SetStrength(s) => format!("setting adapter strength {s:.2}"),
    }
}

fn describe_model(spec: &str, sd: &StableDiffusion) -> String {
    let size = sd
        .native_size()
        .map(|(h, w)| format!("{w}×{h} px"))
        .unwrap_or_else(|| "size not given".into());
    let device = match &sd.device {
        Device::Cpu => "CPU".to_string(),
        other => format!("{other:?}"),
    };
    format!(
        "{spec}: {} cross-attention layers, {size}, {:?} on {device}",
        sd.unet.cross_attn_layers().len(),
        sd.dtype
    )
}

fn describe_adapter(adapter: &ErasureAdapter, source: &str) -> String {
    let c = adapter.config();
    format!(
        "{source}: LoRA rank {}, {} tail tokens, strength {:.2}",
        c.lora_rank,
        c.tail_tokens,
        adapter.strength()
    )
}
