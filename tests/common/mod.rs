//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("fixtures")
}

/// The tiny random-weight SD-1-style fixture model, f32 on the CPU.
pub fn tiny_sd1() -> erasure_studio::engine::StableDiffusion {
    use erasure_studio::engine::ModelSource;
    let source = ModelSource::folder(&fixtures().join("tiny-sd1")).unwrap();
    erasure_studio::engine::StableDiffusion::load(&source, &Device::Cpu, candle_core::DType::F32)
        .unwrap()
}

pub fn load(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// ‖a − b‖ / ‖b‖ over all elements, in f64.
pub fn rel_l2(a: &Tensor, b: &Tensor) -> f64 {
    erasure_studio::parity::relative_l2(a, b).unwrap()
}

/// The largest absolute element of an f32 tensor.
pub fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Runs the CLI and asserts it succeeded, showing its stderr otherwise.
pub fn run_cli(cmd: &mut std::process::Command) -> std::process::Output {
    let output = cmd.output().unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// A fresh temporary directory under the target folder (removed by the caller or left for
/// inspection on failure).
pub fn temp_dir(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}
