//! Quality of a demo model as the judge sees it: generations for every attribute combination
//! from held-out seeds, read back by the judge (which never saw the UNet's output).

use serde::Serialize;

use super::captions::Caption;
use super::judge::{self, Attributes, JudgeNet};
use super::scene::{Background, Colour, Fill, Object, Scene};
use crate::engine::StableDiffusion;
use crate::engine::diffusion::pipeline::{GenerateRequest, SampleHooks, Sampling, txt2img};
use crate::train::run::step_rng;

/// How generations are made for the measurement.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct QualitySettings {
    /// Images per (object, colour, fill, background) combination.
    pub per_combination: usize,
    pub steps: usize,
    pub guidance_scale: f64,
    /// First seed; far from any seed used in training.
    pub seed: u64,
    /// Images generated at once.
    pub batch: usize,
}

impl Default for QualitySettings {
    fn default() -> Self {
        Self {
            per_combination: 2,
            steps: 25,
            guidance_scale: 5.0,
            seed: 1_000_000,
            batch: 24,
        }
    }
}

/// Per-attribute accuracy [object, colour, fill, background].
pub type Accuracy = [f64; 4];

#[derive(Debug, Clone, Serialize)]
pub struct QualityReport {
    pub settings: QualitySettings,
    pub images: usize,
    /// The judge on the model's generations.
    pub generated: Accuracy,
    /// Generations whose four attributes are all right.
    pub all_correct: f64,
    /// The judge on images straight from the generator (its own accuracy).
    pub judge_on_generator: Accuracy,
    pub seconds: f64,
}

/// Every (object, colour, fill, background) combination, in a fixed order.
pub fn combinations() -> Vec<Attributes> {
    let mut all = Vec::new();
    for &object in Object::ALL {
        for &colour in Colour::ALL {
            for &fill in Fill::ALL {
                for &background in Background::ALL {
                    all.push(Attributes {
                        object,
                        colour,
                        fill,
                        background,
                    });
                }
            }
        }
    }
    all
}

/// The canonical prompt for a combination ("a red striped star on a black background").
pub fn prompt(a: &Attributes) -> String {
    let mut rng = step_rng(0, 0);
    let scene = Scene::with_attributes(a.object, a.colour, a.fill, a.background, &mut rng);
    Caption::full(&scene).text
}

/// Generates `per_combination` images of every combination and judges them; `progress(done,
/// total)` is called after each batch.
pub fn measure(
    sd: &StableDiffusion,
    judge: &JudgeNet,
    settings: &QualitySettings,
    mut progress: impl FnMut(usize, usize),
) -> anyhow::Result<QualityReport> {
    let started = std::time::Instant::now();
    let wanted: Vec<Attributes> = combinations()
        .into_iter()
        .flat_map(|a| std::iter::repeat_n(a, settings.per_combination))
        .collect();
    let size = sd.native_size().map_or(64, |(h, _)| h);
    let mut hits = [0usize; 4];
    let mut all_correct = 0;
    for (b, chunk) in wanted.chunks(settings.batch.max(1)).enumerate() {
        let sampling = Sampling {
            steps: settings.steps,
            guidance_scale: settings.guidance_scale,
        };
        let req = GenerateRequest::new(chunk.iter().map(prompt).collect(), (size, size), sampling)
            .seed(settings.seed + (b * settings.batch) as u64);
        let (_, images) = txt2img(sd, &req, SampleHooks::default())?;
        for (got, want) in judge.predict(&images)?.iter().zip(chunk) {
            let right = [
                got.object == want.object,
                got.colour == want.colour,
                got.fill == want.fill,
                got.background == want.background,
            ];
            for (h, r) in hits.iter_mut().zip(right) {
                *h += usize::from(r);
            }
            all_correct += usize::from(right.iter().all(|&r| r));
        }
        progress(((b + 1) * settings.batch).min(wanted.len()), wanted.len());
    }
    let n = wanted.len() as f64;
    Ok(QualityReport {
        settings: *settings,
        images: wanted.len(),
        generated: hits.map(|h| h as f64 / n),
        all_correct: all_correct as f64 / n,
        judge_on_generator: judge::accuracy(judge, 1024, settings.seed, &sd.device)?,
        seconds: started.elapsed().as_secs_f64(),
    })
}
