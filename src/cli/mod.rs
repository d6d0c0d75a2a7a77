//! Command-line interface: every job headless, one file per command.

mod args;
mod bench;
mod demo_world;
mod erase;
mod eval;
mod export;
mod generate;
mod parity;

use clap::{Parser, Subcommand};
use erasure_studio::threads::on_pool;

#[derive(Parser)]
#[command(
    name = "erasure-studio",
    version,
    about = "Concept erasure for Stable Diffusion models",
    long_about = "Concept erasure for Stable Diffusion models. With no command, opens the studio \
                  window on the demo model (or the model of the last session)."
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Commands>,
}

#[derive(Subcommand)]
enum Commands {
    /// Open the studio window (the default with no command).
    #[cfg(feature = "studio")]
    Studio(args::DeviceArg),
    /// Generate images from a prompt (txt2img, or img2img with --init-image).
    Generate(generate::GenerateArgs),
    /// Run model components on fixed inputs (the parity contract; see README).
    Parity(parity::ParityArgs),
    /// The demo world: procedural images of coloured shapes.
    DemoWorld {
        #[command(subcommand)]
        command: demo_world::DemoWorldCommand,
    },
    /// Train an erasure adapter from a preset into a run folder (or continue one).
    Erase(erase::EraseArgs),
    /// Evaluate an erasure on held-out prompts and seeds: erasure rate and preservation.
    Eval(eval::EvalArgs),
    /// Export a run's adapter: the native file, or a kohya / PEFT LoRA for other tools.
    Export(export::ExportArgs),
    /// Time the engine at SD-1.5 size with random weights.
    Bench(bench::BenchArgs),
}

pub fn run() -> anyhow::Result<()> {
    let Some(command) = Cli::parse().command else {
        return run_without_command();
    };
    match command {
        // The window stays on the main thread; its worker runs each job on the pool. Every
        // other command runs on the pool itself.
        #[cfg(feature = "studio")]
        Commands::Studio(device) => erasure_studio::studio::app::run(device.open()?),
        Commands::Generate(args) => on_pool(|| generate::run(args)),
        Commands::Parity(args) => on_pool(|| parity::run(args)),
        Commands::DemoWorld { command } => on_pool(|| demo_world::run(command)),
        Commands::Erase(args) => on_pool(|| erase::run(args)),
        Commands::Eval(args) => on_pool(|| eval::run(args)),
        Commands::Export(args) => on_pool(|| export::run(args)),
        Commands::Bench(args) => on_pool(|| bench::run(args)),
    }
}

/// No command opens the studio on the CPU.
#[cfg(feature = "studio")]
fn run_without_command() -> anyhow::Result<()> {
    erasure_studio::studio::app::run(candle_core::Device::Cpu)
}

/// A build without the studio has nothing to open: say so, with the commands it has.
#[cfg(not(feature = "studio"))]
fn run_without_command() -> anyhow::Result<()> {
    use clap::CommandFactory;
    Cli::command().print_help()?;
    anyhow::bail!("this build has no studio (built without the `studio` feature): give a command")
}
