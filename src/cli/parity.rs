//! `parity`: model components run on fixed inputs (the contract checked against diffusers).

use std::path::PathBuf;

use erasure_studio::adapter::stack::AdapterSpec;
use erasure_studio::engine::ModelSource;
use erasure_studio::parity;

use super::args::DeviceArg;

#[derive(clap::Args)]
pub struct ParityArgs {
    #[arg(long)]
    model: String,
    #[arg(long)]
    inputs: PathBuf,
    #[arg(long)]
    out: PathBuf,
    /// An adapter applied to the UNet, `FILE[:strength]`; repeat to stack several.
    #[arg(long = "adapter")]
    adapters: Vec<AdapterSpec>,
    #[command(flatten)]
    device: DeviceArg,
}

pub fn run(args: ParityArgs) -> anyhow::Result<()> {
    let source = ModelSource::resolve(&args.model)?;
    let device = args.device.open()?;
    let names = parity::run(&source, &args.inputs, &args.out, &args.adapters, &device)?;
    println!("wrote {} ({})", args.out.display(), names.join(", "));
    Ok(())
}
