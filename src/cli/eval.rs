//! `eval`: an erasure measured on held-out prompts and seeds.

use std::path::PathBuf;

use anyhow::bail;
use erasure_studio::erasure::workbench::Workbench;
use erasure_studio::erasure::{evaluate, preset, session};

use super::args::{DeviceArg, EvaluationSize};

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
    #[command(flatten)]
    device: DeviceArg,
}

pub fn run(args: EvalArgs) -> anyhow::Result<()> {
    let device = &args.device.open()?;
    let (mut preset, adapter_path, out) = match (&args.run, &args.adapter) {
        (Some(run), _) => {
            let dir = session::RunDir::new(run);
            let adapter = dir.finished_adapter()?;
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
    let mut workbench = Workbench::load(&preset.model, device)?;
    // A run's own adapter file records its evaluation; a file given by path is left as it is.
    let record = args.run.is_some();
    let report = workbench.evaluate(&preset, &adapter_path, &out, record, &mut |d, t| {
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
