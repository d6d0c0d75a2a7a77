//! The demo world's judge: a small CNN trained on the generator to read an image's object,
//! colour, fill and background. It never sees the diffusion model's output in training, so it
//! can grade that output (and, later, erasures) independently of the CLIP reward.

use std::path::Path;

use anyhow::Context;
use candle_core::{D, DType, Device, Module, Result, Tensor};
use candle_nn::{VarBuilder, VarMap};

use crate::engine::nn::linear::Linear;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::Caption;
use super::scene::{Background, Colour, Fill, Object, Scene, render_batch};
use crate::engine::nn::conv::Conv2d;
use crate::engine::nn::{GroupNorm, conv2d, group_norm, linear};
use crate::reward::cer::ConceptDetector;
use crate::reward::judge::{Judge, Reading};
use crate::train::init::seeded_var_builder;
use crate::train::run::sorted_params;
use crate::train::{AdamW, AdamWConfig, StepOutcome};

/// Sizes of the judge network.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct JudgeConfig {
    /// Channels of the stride-2 stem (64 → 32 pixels), then of each stride-2 stage.
    pub channels: Vec<usize>,
    pub groups: usize,
}

impl Default for JudgeConfig {
    fn default() -> Self {
        Self {
            channels: vec![24, 32, 64, 96],
            groups: 8,
        }
    }
}

/// One predicted (or true) set of attributes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attributes {
    pub object: Object,
    pub colour: Colour,
    pub fill: Fill,
    pub background: Background,
}

impl From<&Scene> for Attributes {
    fn from(s: &Scene) -> Self {
        Self {
            object: s.object,
            colour: s.colour,
            fill: s.fill,
            background: s.background,
        }
    }
}

struct Stage {
    down: Conv2d,
    norm1: GroupNorm,
    conv: Conv2d,
    norm2: GroupNorm,
}

pub struct JudgeNet {
    stem: Conv2d,
    stages: Vec<Stage>,
    heads: [Linear; 4],
    config: JudgeConfig,
}

/// Classes per head, in the order object, colour, fill, background.
const HEAD_SIZES: [usize; 4] = [5, 6, 4, 3];

/// The judge's heads by attribute name, in head order.
pub const ATTRIBUTE_NAMES: [&str; 4] = ["object", "colour", "fill", "background"];

impl Attributes {
    /// The class index of each head, in head order.
    pub fn indices(&self) -> [usize; 4] {
        [
            self.object.index(),
            self.colour.index(),
            self.fill.index(),
            self.background.index(),
        ]
    }
}

/// The (head, class) that `attribute` = `value` names, as in ("object", "star").
pub fn attribute_value(attribute: &str, value: &str) -> anyhow::Result<(usize, usize)> {
    let class = match attribute {
        "object" => Object::from_word(value).map(Object::index),
        "colour" => Colour::from_word(value).map(Colour::index),
        "fill" => Fill::from_word(value).map(Fill::index),
        "background" => Background::from_word(value).map(Background::index),
        _ => anyhow::bail!(
            "the demo judge has no attribute `{attribute}`; it reads {}",
            ATTRIBUTE_NAMES.join(", ")
        ),
    };
    let head = ATTRIBUTE_NAMES
        .iter()
        .position(|n| *n == attribute)
        .expect("matched above");
    class
        .map(|c| (head, c))
        .with_context(|| format!("the demo world has no {attribute} `{value}`"))
}

impl JudgeNet {
    pub fn new(vb: VarBuilder, config: &JudgeConfig) -> Result<Self> {
        let c0 = config.channels[0];
        let mut stages = Vec::new();
        let mut cin = c0;
        for (i, &c) in config.channels.iter().skip(1).enumerate() {
            let s = vb.pp(format!("stages.{i}"));
            stages.push(Stage {
                down: conv2d(s.pp("down"), cin, c, 3, 2, 1)?,
                norm1: group_norm(s.pp("norm1"), config.groups, c, 1e-5)?,
                conv: conv2d(s.pp("conv"), c, c, 3, 1, 1)?,
                norm2: group_norm(s.pp("norm2"), config.groups, c, 1e-5)?,
            });
            cin = c;
        }
        // Average- and max-pooled features feed every head.
        let features = 2 * cin;
        let head = |i: usize| linear(vb.pp(format!("heads.{i}")), features, HEAD_SIZES[i], true);
        Ok(Self {
            stem: conv2d(vb.pp("stem"), 3, c0, 3, 2, 1)?,
            stages,
            heads: [head(0)?, head(1)?, head(2)?, head(3)?],
            config: config.clone(),
        })
    }

    pub fn config(&self) -> &JudgeConfig {
        &self.config
    }

    /// Images [B, 3, H, W] in [0, 1] → logits per head.
    pub fn logits(&self, images: &Tensor) -> Result<[Tensor; 4]> {
        let mut h = self.stem.forward(&((images * 2.0)? - 1.0)?)?.silu()?;
        for s in &self.stages {
            h = s.norm1.forward_silu(&s.down.forward(&h)?)?;
            h = (s.norm2.forward_silu(&s.conv.forward(&h)?)? + &h)?;
        }
        let flat = h.flatten_from(2)?;
        let pooled = Tensor::cat(&[flat.mean(D::Minus1)?, flat.max(D::Minus1)?], 1)?;
        Ok([
            self.heads[0].forward(&pooled)?,
            self.heads[1].forward(&pooled)?,
            self.heads[2].forward(&pooled)?,
            self.heads[3].forward(&pooled)?,
        ])
    }

    /// The most likely attributes of each image.
    pub fn predict(&self, images: &Tensor) -> Result<Vec<Attributes>> {
        let logits = self.logits(images)?;
        let best: Vec<Vec<u32>> = logits
            .iter()
            .map(|l| l.argmax(D::Minus1)?.to_vec1::<u32>())
            .collect::<Result<_>>()?;
        Ok((0..images.dim(0)?)
            .map(|i| Attributes {
                object: Object::ALL[best[0][i] as usize],
                colour: Colour::ALL[best[1][i] as usize],
                fill: Fill::ALL[best[2][i] as usize],
                background: Background::ALL[best[3][i] as usize],
            })
            .collect())
    }

    pub fn load(dir: &Path, device: &Device) -> anyhow::Result<Self> {
        let config: JudgeConfig = crate::engine::io::config::read_json(&dir.join("config.json"))?;
        let files = [dir.join("model.safetensors")];
        let vb = crate::engine::io::weights::WeightFiles::open(&files, &[])?
            .into_var_builder(DType::F32, device);
        Self::new(vb, &config).with_context(|| format!("loading judge {}", dir.display()))
    }
}

fn labels(scenes: &[Scene], device: &Device) -> Result<[Tensor; 4]> {
    let column = |f: &dyn Fn(&Scene) -> usize| {
        let v: Vec<u32> = scenes.iter().map(|s| f(s) as u32).collect();
        Tensor::from_vec(v, scenes.len(), device)
    };
    Ok([
        column(&|s| s.object.index())?,
        column(&|s| s.colour.index())?,
        column(&|s| s.fill.index())?,
        column(&|s| s.background.index())?,
    ])
}

/// Per-head accuracy of `judge` on `count` scenes drawn from `seed`: [object, colour, fill,
/// background].
pub fn accuracy(judge: &JudgeNet, count: usize, seed: u64, device: &Device) -> Result<[f64; 4]> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut correct = [0usize; 4];
    for start in (0..count).step_by(64) {
        let scenes: Vec<Scene> = (start..count.min(start + 64))
            .map(|_| Scene::sample(&mut rng))
            .collect();
        for (pred, scene) in judge
            .predict(&render_batch(&scenes, device)?)?
            .iter()
            .zip(&scenes)
        {
            let truth = Attributes::from(scene);
            correct[0] += usize::from(pred.object == truth.object);
            correct[1] += usize::from(pred.colour == truth.colour);
            correct[2] += usize::from(pred.fill == truth.fill);
            correct[3] += usize::from(pred.background == truth.background);
        }
    }
    Ok(correct.map(|c| c as f64 / count as f64))
}

/// Trains a judge from scratch on freshly drawn scenes; `on_step(step, loss, update_skipped)`
/// reports progress (`update_skipped`: the step's gradient was not finite).
pub fn train(
    config: &JudgeConfig,
    steps: usize,
    batch: usize,
    seed: u64,
    device: &Device,
    mut on_step: impl FnMut(usize, f64, bool),
) -> anyhow::Result<(JudgeNet, VarMap)> {
    let vars = VarMap::new();
    let judge = JudgeNet::new(seeded_var_builder(&vars, seed, DType::F32, device), config)?;
    let mut opt = AdamW::new(
        sorted_params(&vars),
        AdamWConfig {
            lr: 2e-3,
            weight_decay: 1e-4,
            ..Default::default()
        },
    )?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for step in 0..steps {
        let scenes: Vec<Scene> = (0..batch).map(|_| Scene::sample(&mut rng)).collect();
        let logits = judge.logits(&render_batch(&scenes, device)?)?;
        let targets = labels(&scenes, device)?;
        let mut loss = Tensor::zeros((), DType::F32, device)?;
        for (l, t) in logits.iter().zip(&targets) {
            loss = (loss + candle_nn::loss::cross_entropy(l, t)?)?;
        }
        let value = loss.to_scalar::<f32>()? as f64;
        let skipped = opt.step(&loss.backward()?)? == StepOutcome::SkippedNonFinite;
        on_step(step, value, skipped);
    }
    Ok((judge, vars))
}

/// The demo judge network: reads object, colour, fill and background; the concept is one
/// attribute taking one value.
pub struct DemoJudge {
    net: JudgeNet,
    head: usize,
    class: usize,
    value: String,
}

impl DemoJudge {
    pub fn new(net: JudgeNet, attribute: &str, value: &str) -> anyhow::Result<Self> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn micro_training_lowers_the_loss() {
        let config = JudgeConfig {
            channels: vec![8, 8, 8],
            groups: 4,
        };
        let mut losses = Vec::new();
        train(&config, 30, 16, 0, &Device::Cpu, |_, l, _| losses.push(l)).unwrap();
        // Same seed, same run.
        let mut again = Vec::new();
        train(&config, 30, 16, 0, &Device::Cpu, |_, l, _| again.push(l)).unwrap();
        assert_eq!(losses, again);
        let first: f64 = losses[..5].iter().sum::<f64>() / 5.0;
        let last: f64 = losses[25..].iter().sum::<f64>() / 5.0;
        assert!(last < 0.8 * first, "loss {first:.3} → {last:.3}");
    }
}
