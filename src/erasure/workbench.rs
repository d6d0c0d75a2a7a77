//! A loaded model and the scorers built on it: what every erasure use case runs on. The CLI
//! loads one per command, the studio's worker keeps one while a model is loaded; both call the
//! same methods, so a run, an evaluation or an export behaves the same from either.

use std::path::Path;

use anyhow::{Context, bail};
use candle_core::Device;

use super::evaluate::{self, Report};
use super::export::{self, ExportComparison, ExportFormat};
use super::preset::Preset;
use super::session::{self, RunDir, RunEnd, RunObserver, RunOptions};
use super::setup::{self, Scorers};
use crate::adapter::ErasureAdapter;
use crate::engine::StableDiffusion;

pub struct Workbench {
    /// The name the model was loaded by (`demo`, a folder, a repo id), as presets name it.
    spec: String,
    sd: StableDiffusion,
    scorers: Scorers,
}

/// What an export reports as it goes.
pub trait ExportProgress {
    /// The file is written; a measurement of what it keeps follows when `measuring`.
    fn written(&mut self, _measuring: bool) {}
    /// Images drawn for the measurement so far, of `total`.
    fn images(&mut self, done: usize, total: usize);
}

/// An export, and what to measure a LoRA export on.
pub struct ExportJob<'a> {
    pub format: ExportFormat,
    /// Fold a rank-k approximation of the Safe Adapter into a LoRA export.
    pub fold_rank: Option<usize>,
    pub out: &'a Path,
    /// The preset whose held-out target prompts a LoRA export is measured on (with the run's
    /// evaluation, whose rates are reused when it matches); `None` measures nothing.
    pub compare_on: Option<(&'a Preset, Option<&'a Report>)>,
}

impl Workbench {
    /// Loads the model named `spec` (`demo`, a diffusers folder or a cached repo id) in f32.
    pub fn load(spec: &str, device: &Device) -> anyhow::Result<Self> {
        let sd = setup::load_model(spec, device)?;
        let scorers = Scorers::new(sd.source.root(), device);
        Ok(Self {
            spec: spec.to_string(),
            sd,
            scorers,
        })
    }

    pub fn sd(&self) -> &StableDiffusion {
        &self.sd
    }

    /// Fails unless `model`, the model a preset or run names, is the one loaded.
    pub fn ensure_serves(&self, model: &str) -> anyhow::Result<()> {
        if model != self.spec {
            bail!(
                "this run is for model `{model}` but `{}` is loaded; load `{model}` first",
                self.spec
            );
        }
        Ok(())
    }

    /// Trains `preset` (whose model must be the loaded one) in the new run folder `out`.
    pub fn start_run(
        &mut self,
        preset: Preset,
        out: &Path,
        options: RunOptions,
        stop: &(dyn Fn() -> bool + Sync),
        observer: &mut dyn RunObserver,
    ) -> anyhow::Result<RunEnd> {
        self.ensure_serves(&preset.model)?;
        session::start(
            &self.sd,
            &mut self.scorers,
            preset,
            out,
            options,
            stop,
            observer,
        )
    }

    /// Continues the run in `run` (for the loaded model) from its checkpoint.
    pub fn resume_run(
        &mut self,
        run: &Path,
        options: RunOptions,
        stop: &(dyn Fn() -> bool + Sync),
        observer: &mut dyn RunObserver,
    ) -> anyhow::Result<RunEnd> {
        self.ensure_serves(&RunDir::new(run).load_preset()?.model)?;
        session::resume(&self.sd, &mut self.scorers, run, options, stop, observer)
    }

    /// Evaluates the adapter file at `adapter` with `preset` (for the loaded model), writing
    /// the report and comparison grid into `out`; `record` also writes the concept rates into
    /// a native adapter file.
    pub fn evaluate(
        &mut self,
        preset: &Preset,
        adapter: &Path,
        out: &Path,
        record: bool,
        progress: &mut dyn FnMut(usize, usize),
    ) -> anyhow::Result<Report> {
        self.ensure_serves(&preset.model)?;
        std::fs::create_dir_all(out)
            .with_context(|| format!("cannot create output folder {}", out.display()))?;
        evaluate::evaluate_adapter(
            &self.sd,
            &mut self.scorers,
            preset,
            adapter,
            out,
            record,
            progress,
        )
    }

    /// Evaluates a run's finished adapter into the run folder, recording the rates in it.
    pub fn evaluate_run(
        &mut self,
        run: &Path,
        progress: &mut dyn FnMut(usize, usize),
    ) -> anyhow::Result<Report> {
        let dir = RunDir::new(run);
        let preset = dir.load_preset()?;
        let adapter = dir.finished_adapter()?;
        self.evaluate(&preset, &adapter, run, true, progress)
    }

    /// Writes `adapter` as `job` asks; for a LoRA export with a preset to measure on, how much
    /// of the erasure the exported file keeps next to the full adapter.
    pub fn export(
        &mut self,
        adapter: &ErasureAdapter,
        job: &ExportJob,
        progress: &mut dyn ExportProgress,
    ) -> anyhow::Result<Option<ExportComparison>> {
        let title = export::title(adapter, job.compare_on.map(|(preset, _)| preset));
        export::write(
            adapter,
            &self.sd,
            job.format,
            job.fold_rank,
            &title,
            job.out,
        )?;
        let compare_on = job
            .compare_on
            .filter(|_| job.format != ExportFormat::Native);
        progress.written(compare_on.is_some());
        let Some((preset, report)) = compare_on else {
            return Ok(None);
        };
        let judge = self.scorers.judge(preset)?;
        export::compare(
            &self.sd,
            judge.as_ref(),
            preset,
            adapter,
            job.out,
            report,
            &mut |done, total| progress.images(done, total),
        )
        .map(Some)
    }
}
