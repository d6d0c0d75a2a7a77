//! `export`: a run's adapter as the native file or a kohya / PEFT LoRA, with what a LoRA keeps
//! of the erasure measured next to the full adapter.

use std::path::PathBuf;

use anyhow::bail;
use erasure_studio::adapter::ErasureAdapter;
use erasure_studio::erasure::export::{self, ExportFormat};
use erasure_studio::erasure::{evaluate, session, setup};

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
