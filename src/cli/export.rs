//! `export`: a run's adapter as the native file or a kohya / PEFT LoRA, with what a LoRA keeps
//! of the erasure measured next to the full adapter.

use std::path::{Path, PathBuf};

use anyhow::bail;
use candle_core::DType;
use erasure_studio::adapter::ErasureAdapter;
use erasure_studio::erasure::evaluate;
use erasure_studio::erasure::export::ExportFormat;
use erasure_studio::erasure::session::RunDir;
use erasure_studio::erasure::workbench::{ExportJob, ExportProgress, Workbench};

use super::args::{DeviceArg, EvaluationSize};

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
    #[command(flatten)]
    device: DeviceArg,
}

pub fn run(args: ExportArgs) -> anyhow::Result<()> {
    let device = &args.device.open()?;
    if args.format == ExportFormat::Native && args.fold_rank.is_some() {
        bail!(
            "--fold-rank applies to LoRA exports (kohya, peft); a native file keeps the whole adapter"
        );
    }
    let dir = RunDir::new(&args.run);
    let adapter_path = dir.finished_adapter()?;
    let mut preset = dir.load_preset()?;
    args.evaluation.apply(&mut preset);
    preset.validate()?;
    let mut workbench = Workbench::load(&preset.model, device)?;
    let sd = workbench.sd();
    let adapter = ErasureAdapter::load(&adapter_path, &sd.unet, DType::F32, &sd.device)?;
    let report = evaluate::read_report(&args.run);
    let job = ExportJob {
        format: args.format,
        fold_rank: args.fold_rank,
        out: &args.out,
        compare_on: (!args.no_compare).then_some((&preset, report.as_ref())),
    };
    let mut progress = PrintProgress {
        out: &args.out,
        tail_tokens: adapter.config().tail_tokens,
    };
    let Some(comparison) = workbench.export(&adapter, &job, &mut progress)? else {
        return Ok(());
    };
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

/// Says what was written and why a LoRA export is measured, then counts the images drawn.
struct PrintProgress<'a> {
    out: &'a Path,
    tail_tokens: usize,
}

impl ExportProgress for PrintProgress<'_> {
    fn written(&mut self, measuring: bool) {
        println!("wrote {}", self.out.display());
        if measuring {
            println!(
                "a LoRA cannot hold the Safe Adapter (it acts on the last {} tokens only); \
                 measuring what the export keeps of the erasure on the held-out target prompts…",
                self.tail_tokens
            );
        }
    }

    fn images(&mut self, done: usize, total: usize) {
        eprint!("\r{done}/{total} images");
    }
}
