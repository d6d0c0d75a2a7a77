//! `erase`: trains an erasure adapter from a preset into a run folder, or continues one.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::bail;
use erasure_studio::erasure::metrics::EpochMetrics;
use erasure_studio::erasure::preset;
use erasure_studio::erasure::session::{self, Preview, RunDir, RunEnd, RunObserver, RunOptions};
use erasure_studio::erasure::workbench::Workbench;

use super::args::DeviceArg;

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
    #[command(flatten)]
    device: DeviceArg,
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

    fn notice(&mut self, message: &str) {
        eprintln!("{message}");
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

pub fn run(args: EraseArgs) -> anyhow::Result<()> {
    let device = &args.device.open()?;
    let flag = stop_flag()?;
    let stop = || flag.load(Ordering::SeqCst);
    let options = RunOptions {
        preview_every: args.preview_every,
    };
    let mut observer = PrintProgress;
    let (end, run) = match (&args.resume, &args.preset, &args.out) {
        (Some(run), _, _) => {
            let preset = RunDir::new(run).load_preset()?;
            let mut workbench = Workbench::load(&preset.model, device)?;
            (
                workbench.resume_run(run, options, &stop, &mut observer)?,
                run.clone(),
            )
        }
        (None, Some(name), Some(out)) => {
            let mut preset = preset::find(name)?;
            if let Some(model) = &args.model {
                preset.model = model.clone();
            }
            if let Some(epochs) = args.epochs {
                if epochs == 0 {
                    bail!("--epochs must be at least 1");
                }
                preset.ddpo.epochs = epochs;
            }
            // Refused before the model loads, which takes a while.
            session::ensure_no_run(out)?;
            let mut workbench = Workbench::load(&preset.model, device)?;
            (
                workbench.start_run(preset, out, options, &stop, &mut observer)?,
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
