//! The `erase`, `eval` and `export` commands: erasure runs from a preset, headless.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::{Context, bail};
use erasure_studio::adapter::ErasureAdapter;
use erasure_studio::erasure::export::{self, ExportFormat};
use erasure_studio::erasure::session::{self, Preview, RunEnd, RunObserver, RunOptions};
use erasure_studio::erasure::trainer::EpochMetrics;
use erasure_studio::erasure::{evaluate, preset, setup};

#[derive(clap::Args)]
pub struct EraseArgs {
    /// A preset name (see `presets/`) or a preset file.
    #[arg(long, required_unless_present = "resume")]
    preset: Option<String>,
    /// The model to erase from (default: the preset's): `demo`, a diffusers folder, or a repo
    /// id in the Hugging Face cache.
    #[arg(long, conflicts_with = "resume")]
    model: Option<String>,
    /// The run folder to create.
    #[arg(long, required_unless_present = "resume", conflicts_with = "resume")]
    out: Option<PathBuf>,
    /// Continue the run in this folder from its last checkpoint.
    #[arg(long, conflicts_with = "preset")]
    resume: Option<PathBuf>,
    /// Train this many epochs instead of the preset's (new runs only).
    #[arg(long, conflicts_with = "resume")]
    epochs: Option<usize>,
    /// Write a before/after sample grid every this many epochs.
    #[arg(long, default_value_t = 5)]
    preview_every: usize,
    /// Compute device: `cpu`, or `cuda` / `cuda:N` in a build with the `cuda` feature.
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

struct PrintProgress;

impl RunObserver for PrintProgress {
    fn epoch(&mut self, m: &EpochMetrics, total: usize) {
        let skipped = m
            .skipped_reason
            .as_deref()
            .map(|r| format!("  SKIPPED: {r}"))
            .unwrap_or_default();
        println!(
            "epoch {}/{total}  P(concept) {:.3}±{:.3}  erase {:.3}  align {:.3}  loss {:+.4}  clip {:.2}  kl {:.1e}  |g| {:.3}  {:.1} s{skipped}",
            m.epoch,
            m.p_concept.mean,
            m.p_concept.std,
            m.reward_erase.mean,
            m.reward_align.mean,
            m.loss,
            m.clip_fraction,
            m.approx_kl,
            m.grad_norm,
            m.seconds
        );
    }

    fn preview(&mut self, preview: &Preview) {
        println!("  wrote {}", preview.path.display());
    }
}

/// Ctrl-C asks the run to stop; it saves a checkpoint and returns.
fn stop_flag() -> anyhow::Result<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(false));
    let handler_flag = flag.clone();
    ctrlc::set_handler(move || {
        if handler_flag.swap(true, Ordering::SeqCst) {
            // Checkpoints are written atomically, so quitting now loses only the epoch in
            // progress.
            eprintln!("\nstopped without waiting");
            std::process::exit(130);
        }
        eprintln!("\nstopping: saving a checkpoint (Ctrl-C again quits at once)");
    })?;
    Ok(flag)
}

pub fn erase(args: EraseArgs, device: &candle_core::Device) -> anyhow::Result<()> {
    let flag = stop_flag()?;
    let stop = || flag.load(Ordering::SeqCst);
    let options = RunOptions {
        preview_every: args.preview_every,
    };
    let mut observer = PrintProgress;
    let (end, run) = match (&args.resume, &args.preset, &args.out) {
        (Some(run), _, _) => (
            session::resume(run, device, options, &stop, &mut observer)?,
            run.clone(),
        ),
        (None, Some(name), Some(out)) => {
            let mut preset = preset::find(name)?;
            if let Some(epochs) = args.epochs {
                if epochs == 0 {
                    bail!("--epochs must be at least 1");
                }
                preset.ddpo.epochs = epochs;
            }
            (
                session::start(
                    preset,
                    args.model.as_deref(),
                    out,
                    device,
                    options,
                    &stop,
                    &mut observer,
                )?,
                out.clone(),
            )
        }
        _ => bail!("give --preset and --out for a new run, or --resume RUN"),
    };
    match end {
        RunEnd::Finished { adapter, seconds } => println!(
            "finished in {:.1} min; adapter: {}\nevaluate it with: erasure-studio eval --run {}",
            seconds / 60.0,
            adapter.display(),
            run.display()
        ),
        RunEnd::Stopped { epochs_done } => println!(
            "stopped after epoch {epochs_done}; continue with: erasure-studio erase --resume {}",
            run.display()
        ),
    }
    Ok(())
}

/// How many images an evaluation draws, when not the preset's.
#[derive(clap::Args)]
struct EvaluationSize {
    /// Seeds per prompt instead of the preset's.
    #[arg(long)]
    seeds_per_prompt: Option<usize>,
    /// At most this many prompts per set instead of the preset's.
    #[arg(long)]
    max_prompts: Option<usize>,
}

impl EvaluationSize {
    fn apply(&self, preset: &mut preset::Preset) {
        if let Some(n) = self.seeds_per_prompt {
            preset.evaluation.seeds_per_prompt = n;
        }
        if let Some(n) = self.max_prompts {
            preset.evaluation.max_prompts = n;
        }
    }
}

#[derive(clap::Args)]
pub struct EvalArgs {
    /// A run folder: evaluates its adapter with its preset, writing into the folder.
    #[arg(long, required_unless_present = "adapter")]
    run: Option<PathBuf>,
    /// An adapter file (with --preset and --out) instead of a run.
    #[arg(long, conflicts_with = "run", requires_all = ["preset", "out"])]
    adapter: Option<PathBuf>,
    /// A preset name or file (with --adapter).
    #[arg(long, conflicts_with = "run")]
    preset: Option<String>,
    /// The model (default: the run's or the preset's).
    #[arg(long)]
    model: Option<String>,
    /// Folder for report.json and comparison.png (default: the run folder).
    #[arg(long)]
    out: Option<PathBuf>,
    #[command(flatten)]
    evaluation: EvaluationSize,
    /// Compute device: `cpu`, or `cuda` / `cuda:N` in a build with the `cuda` feature.
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

pub fn eval(args: EvalArgs, device: &candle_core::Device) -> anyhow::Result<()> {
    let (mut preset, adapter_path, out) = match (&args.run, &args.adapter) {
        (Some(run), _) => {
            let dir = session::RunDir::new(run);
            let adapter = dir.adapter();
            if !adapter.is_file() {
                bail!(
                    "{} has no adapter.safetensors yet: the run has not finished \
                     (continue it with `erasure-studio erase --resume {}`)",
                    run.display(),
                    run.display()
                );
            }
            let out = args.out.clone().unwrap_or_else(|| run.clone());
            (dir.load_preset()?, adapter, out)
        }
        (None, Some(adapter)) => {
            let preset = preset::find(args.preset.as_deref().expect("clap requires it"))?;
            let out = args.out.clone().expect("clap requires it");
            (preset, adapter.clone(), out)
        }
        (None, None) => bail!("give --run RUN, or --adapter FILE --preset P --out DIR"),
    };
    if let Some(model) = &args.model {
        preset.model = model.clone();
    }
    args.evaluation.apply(&mut preset);
    preset.validate()?;
    std::fs::create_dir_all(&out)
        .with_context(|| format!("cannot create output folder {}", out.display()))?;
    // A run's own adapter file records its evaluation; a file given by path is left as it is.
    let record = args.run.is_some();
    let report =
        evaluate::evaluate_adapter(&preset, &adapter_path, &out, record, device, &mut |d, t| {
            eprint!("\r{d}/{t} images")
        })?;
    eprintln!();
    print!("{}", report.summary());
    println!(
        "wrote {} and {}",
        out.join(evaluate::REPORT_FILE).display(),
        out.join(evaluate::GRID_FILE).display()
    );
    Ok(())
}

#[derive(clap::Args)]
pub struct ExportArgs {
    /// The run folder whose finished adapter to export.
    #[arg(long)]
    run: PathBuf,
    /// `native` (the whole adapter), `kohya` or `peft` (LoRA files other tools load).
    #[arg(long)]
    format: ExportFormat,
    /// The file to write (`.safetensors`).
    #[arg(long)]
    out: PathBuf,
    /// Fold a rank-K approximation of the Safe Adapter into a LoRA export (applied to every
    /// token, which a LoRA cannot avoid); without it the LoRA branch alone is exported.
    #[arg(long)]
    fold_rank: Option<usize>,
    /// Skip measuring the exported LoRA's erasure rate next to the full adapter's.
    #[arg(long)]
    no_compare: bool,
    #[command(flatten)]
    evaluation: EvaluationSize,
    /// Compute device: `cpu`, or `cuda` / `cuda:N` in a build with the `cuda` feature.
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

pub fn export(args: ExportArgs, device: &candle_core::Device) -> anyhow::Result<()> {
    let dir = session::RunDir::new(&args.run);
    let adapter_path = dir.adapter();
    if !adapter_path.is_file() {
        bail!(
            "{} has no adapter.safetensors yet: the run has not finished (continue it with \
             `erasure-studio erase --resume {}`)",
            args.run.display(),
            args.run.display()
        );
    }
    let mut preset = dir.load_preset()?;
    args.evaluation.apply(&mut preset);
    preset.validate()?;
    let sd = setup::load_model(&preset.model, device)?;
    let adapter = ErasureAdapter::load(&adapter_path, &sd.unet, candle_core::DType::F32, device)?;
    if args.format == ExportFormat::Native && args.fold_rank.is_some() {
        bail!(
            "--fold-rank applies to LoRA exports (kohya, peft); a native file keeps the whole adapter"
        );
    }
    let title = format!("{} erased ({})", preset.concept, preset.name);
    export::write(
        &adapter,
        &sd,
        args.format,
        args.fold_rank,
        &title,
        &args.out,
    )?;
    println!("wrote {}", args.out.display());
    if args.format == ExportFormat::Native || args.no_compare {
        return Ok(());
    }
    println!(
        "a LoRA cannot hold the Safe Adapter (it acts on the last {} tokens only); measuring \
         what the export keeps of the erasure on the held-out target prompts…",
        adapter.config().tail_tokens
    );
    let report = evaluate::read_report(&args.run);
    let comparison = export::compare(
        &sd,
        &preset,
        &adapter,
        &args.out,
        report.as_ref(),
        &mut |d, t| eprint!("\r{d}/{t} images"),
    )?;
    eprintln!();
    println!("{}", comparison.summary());
    if !comparison.keeps_most() && args.fold_rank.is_none() {
        println!(
            "the export keeps little of the erasure, which the Safe Adapter does most of: fold \
             it in with --fold-rank (8 is a good start)"
        );
    }
    Ok(())
}
