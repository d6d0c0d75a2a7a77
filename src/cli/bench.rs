//! `bench`: the engine timed at SD-1.5 size with random weights, one child process per case.

use std::process::Command;

use anyhow::{Context, bail};
use erasure_studio::bench;

use super::args::DeviceArg;

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Print one JSON object per line.
    #[arg(long)]
    json: bool,
    /// Timed runs per case after one warm-up (at least).
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// More timed runs until they add up to this many seconds, for short cases.
    #[arg(long, default_value_t = 2.0)]
    min_seconds: f64,
    /// Comma-separated case names (default: all).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    #[command(flatten)]
    device: DeviceArg,
    /// Print the case names, one per line, and run nothing.
    #[arg(long)]
    list: bool,
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    let BenchArgs {
        json,
        repeats,
        min_seconds,
        only,
        device,
        list,
    } = args;
    if list {
        bench::CASES.iter().for_each(|case| println!("{case}"));
        return Ok(());
    }
    let cases: Vec<String> = if only.is_empty() {
        bench::CASES.iter().map(|s| s.to_string()).collect()
    } else {
        only
    };
    let timing = bench::Timing {
        repeats,
        min_seconds,
    };
    for case in &cases {
        // Each case runs in its own process when there are several, so peak RSS is per case.
        let result = if cases.len() == 1 {
            bench::run_case(case, timing, &device.open()?, &|line| eprintln!("{line}"))?
        } else {
            run_case_in_child(case, timing, &device.device)?
        };
        if json {
            println!("{}", serde_json::to_string(&result)?);
        } else {
            println!(
                "{:<22} median {:>8.3} s of {:>3} runs   peak RSS {:>8.0} MiB",
                result.name, result.median_s, result.runs, result.peak_rss_mib
            );
        }
    }
    Ok(())
}

fn run_case_in_child(
    case: &str,
    timing: bench::Timing,
    device: &str,
) -> anyhow::Result<bench::BenchResult> {
    let exe = std::env::current_exe()?;
    let output = Command::new(exe)
        .args(["bench", "--json", "--only", case, "--device", device])
        .args(["--repeats", &timing.repeats.to_string()])
        .args(["--min-seconds", &timing.min_seconds.to_string()])
        .output()
        .context("starting a bench child process")?;
    if !output.status.success() {
        bail!(
            "bench case {case} failed ({}; a kill by signal usually means out of memory): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let line = String::from_utf8(output.stdout)?;
    serde_json::from_str(line.trim()).with_context(|| format!("bench case {case} printed {line}"))
}
