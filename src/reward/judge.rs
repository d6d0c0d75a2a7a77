//! Judges grade images for evaluation: whether the concept is there, and what other attributes
//! an image shows, so erased images can be compared with the original model's. A judge should
//! not be the reward's detector, or the evaluation would grade the policy on the very signal it
//! learned to please.

use candle_core::Tensor;

use super::cer::ConceptDetector;

/// What a judge read in one image.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    pub concept: bool,
    /// One value per [`Judge::attribute_names`].
    pub attributes: Vec<String>,
}

pub trait Judge {
    /// What the report records as the judge, with its threshold.
    fn describe(&self) -> String;
    /// The attributes each reading carries.
    fn attribute_names(&self) -> Vec<String>;
    /// Reads images [B, 3, H, W] in [0, 1].
    fn read(&self, images: &Tensor) -> anyhow::Result<Vec<Reading>>;
    /// The attribute values `prompt` asks for, where the judge can tell (one per attribute).
    fn requested(&self, _prompt: &str) -> Vec<Option<String>> {
        vec![None; self.attribute_names().len()]
    }
}

/// Any concept detector with a threshold: reads only whether the concept is present.
pub struct ThresholdJudge {
    pub detector: Box<dyn ConceptDetector>,
    pub threshold: f64,
    pub name: String,
}

impl Judge for ThresholdJudge {
    fn describe(&self) -> String {
        format!(
            "{}: concept present when its probability is above {}",
            self.name, self.threshold
        )
    }

    fn attribute_names(&self) -> Vec<String> {
        vec!["concept".into()]
    }

    fn read(&self, images: &Tensor) -> anyhow::Result<Vec<Reading>> {
        Ok(self
            .detector
            .concept_probability(images)?
            .into_iter()
            .map(|p| Reading {
                concept: p > self.threshold,
                attributes: vec![if p > self.threshold { "yes" } else { "no" }.into()],
            })
            .collect())
    }
}
