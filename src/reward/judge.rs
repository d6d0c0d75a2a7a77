//! Judges grade images for evaluation: whether the concept is there, and what other attributes
//! an image shows, so erased images can be compared with the original model's. A judge should
//! not be the reward's detector, or the evaluation would grade the policy on the very signal it
//! learned to please.

use candle_core::{D, Tensor};

use super::cer::ConceptDetector;
use crate::demo_world::Caption;
use crate::demo_world::judge::{ATTRIBUTE_NAMES, Judge as DemoJudgeNet, attribute_value};
use crate::demo_world::scene::{Background, Colour, Fill, Object};

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

/// The demo judge network: reads object, colour, fill and background; the concept is one
/// attribute taking one value.
pub struct DemoJudge {
    net: DemoJudgeNet,
    head: usize,
    class: usize,
    value: String,
}

impl DemoJudge {
    pub fn new(net: DemoJudgeNet, attribute: &str, value: &str) -> anyhow::Result<Self> {
        let (head, class) = attribute_value(attribute, value)?;
        Ok(Self {
            net,
            head,
            class,
            value: value.to_string(),
        })
    }
}

impl Judge for DemoJudge {
    fn describe(&self) -> String {
        format!(
            "demo judge network: concept present when its {} head's most likely class is `{}`",
            ATTRIBUTE_NAMES[self.head], self.value
        )
    }

    fn attribute_names(&self) -> Vec<String> {
        ATTRIBUTE_NAMES.iter().map(|s| s.to_string()).collect()
    }

    fn read(&self, images: &Tensor) -> anyhow::Result<Vec<Reading>> {
        Ok(self
            .net
            .predict(images)?
            .into_iter()
            .map(|a| Reading {
                concept: a.indices()[self.head] == self.class,
                attributes: vec![
                    a.object.word().into(),
                    a.colour.word().into(),
                    a.fill.word().into(),
                    a.background.word().into(),
                ],
            })
            .collect())
    }

    fn requested(&self, prompt: &str) -> Vec<Option<String>> {
        let c = Caption::parse(prompt);
        vec![
            c.object.map(|v| Object::word(v).into()),
            c.colour.map(|v| Colour::word(v).into()),
            c.fill.map(|v| Fill::word(v).into()),
            c.background.map(|v| Background::word(v).into()),
        ]
    }
}

impl ConceptDetector for DemoJudge {
    /// The softmax probability of the concept's class on its head.
    fn concept_probability(&self, images: &Tensor) -> anyhow::Result<Vec<f64>> {
        let logits = &self.net.logits(images)?[self.head];
        let probs = candle_nn::ops::softmax(logits, D::Minus1)?;
        Ok(probs
            .narrow(1, self.class, 1)?
            .squeeze(1)?
            .to_dtype(candle_core::DType::F64)?
            .to_vec1()?)
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
