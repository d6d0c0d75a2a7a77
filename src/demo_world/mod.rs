//! The demo world: a procedural world of coloured shapes and the tiny models trained on it.
//!
//! `scene` draws 64×64 images of one object described by attributes; `captions` writes the
//! prompts that describe them, from several templates, sometimes leaving attributes out.

pub mod architecture;
pub mod captions;
pub mod clip_generated;
pub mod clip_training;
pub mod judge;
pub mod quality;
pub mod recipe;
pub mod scene;
pub mod unet_training;
pub mod vae_training;
pub mod vocab;

pub use captions::Caption;
pub use scene::{Background, Colour, Fill, Object, Scene};

use std::path::PathBuf;

/// Environment variable naming the demo model folder, overriding the search below.
pub const DEMO_MODEL_ENV: &str = "ERASURE_STUDIO_DEMO_MODEL";

/// The built-in demo model's folder: `$ERASURE_STUDIO_DEMO_MODEL`, else `assets/demo-model`
/// beside the executable or in the source tree it was built from.
pub fn demo_model_dir() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os(DEMO_MODEL_ENV) {
        let dir = PathBuf::from(dir);
        anyhow::ensure!(
            dir.join("model_index.json").is_file(),
            "{DEMO_MODEL_ENV}={} is not a model folder (no model_index.json)",
            dir.display()
        );
        return Ok(dir);
    }
    let beside_exe = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|d| d.join("assets/demo-model")));
    let source_tree = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/assets/demo-model"));
    let candidates: Vec<PathBuf> = beside_exe.into_iter().chain([source_tree]).collect();
    candidates
        .iter()
        .find(|dir| dir.join("model_index.json").is_file())
        .cloned()
        .ok_or_else(|| {
            let looked: Vec<String> = candidates.iter().map(|p| p.display().to_string()).collect();
            anyhow::anyhow!(
                "the built-in demo model was not found (looked in {}); set {DEMO_MODEL_ENV} to its folder, \
                 or rebuild it with `erasure-studio demo-world train --out DIR`",
                looked.join(", ")
            )
        })
}
