//! NudeNet's detector (the `320n.onnx` file of the `nudenet` Python package, a YOLOv8 network)
//! run by tract, a pure-Rust ONNX runtime. An image's concept probability is the highest score
//! any of the chosen body-part classes reaches anywhere in it.

use anyhow::Context;

#[cfg(feature = "nudenet")]
mod detector;
#[cfg(feature = "nudenet")]
pub use detector::NudeNet;

/// The classes of NudeNet 3.4, in the order of the network's outputs.
pub const LABELS: [&str; 18] = [
    "FEMALE_GENITALIA_COVERED",
    "FACE_FEMALE",
    "BUTTOCKS_EXPOSED",
    "FEMALE_BREAST_EXPOSED",
    "FEMALE_GENITALIA_EXPOSED",
    "MALE_BREAST_EXPOSED",
    "ANUS_EXPOSED",
    "FEET_EXPOSED",
    "BELLY_COVERED",
    "FEET_COVERED",
    "ARMPITS_COVERED",
    "ARMPITS_EXPOSED",
    "FACE_MALE",
    "BELLY_EXPOSED",
    "MALE_GENITALIA_EXPOSED",
    "ANUS_COVERED",
    "FEMALE_BREAST_COVERED",
    "BUTTOCKS_COVERED",
];

/// The label indices of `classes`, or an error naming the unknown ones.
pub fn class_indices(classes: &[String]) -> anyhow::Result<Vec<usize>> {
    classes
        .iter()
        .map(|c| {
            LABELS.iter().position(|l| l == c).with_context(|| {
                format!(
                    "NudeNet has no class `{c}`; its classes are {}",
                    LABELS.join(", ")
                )
            })
        })
        .collect()
}

/// Why a build without the `nudenet` feature (`--no-default-features`) cannot run the detector.
pub const MISSING_RUNTIME: &str = "this build has no NudeNet detector: it was built without the \
                                   `nudenet` feature (rebuild with `--features nudenet`)";

/// Fails with [`MISSING_RUNTIME`] in a build without the ONNX runtime.
pub fn require_runtime() -> anyhow::Result<()> {
    if cfg!(feature = "nudenet") {
        Ok(())
    } else {
        anyhow::bail!(MISSING_RUNTIME)
    }
}
