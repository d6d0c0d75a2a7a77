//! The concept-erasing reward (CER): `λ1·norm(r_erase) + λ2·norm(r_align)`, where
//! `r_erase = α·P(no concept) + β·P(concept)` comes from a concept detector and `r_align` is the
//! CLIP similarity of the image to the prompt with the concept words filtered out plus its
//! similarity to an anchor text. Without the alignment term a policy learns to fool the
//! detector with images that no longer show the prompt. `norm` standardises over the batch.

use std::sync::Arc;

use candle_core::Tensor;

use super::clip::ClipScorer;
use crate::stats::mean_std;

/// Says how likely each image shows the concept.
pub trait ConceptDetector {
    /// P(concept) per image, for images [B, 3, H, W] in [0, 1].
    fn concept_probability(&self, images: &Tensor) -> anyhow::Result<Vec<f64>>;
}

/// CLIP zero-shot: the probability mass on the concept texts against neutral texts.
pub struct ClipDetector {
    pub clip: Arc<ClipScorer>,
    pub concept_texts: Vec<String>,
    pub neutral_texts: Vec<String>,
}

impl ConceptDetector for ClipDetector {
    fn concept_probability(&self, images: &Tensor) -> anyhow::Result<Vec<f64>> {
        if self.concept_texts.is_empty() || self.neutral_texts.is_empty() {
            anyhow::bail!("a CLIP concept detector needs concept texts and neutral texts");
        }
        let texts: Vec<String> = self
            .concept_texts
            .iter()
            .chain(&self.neutral_texts)
            .cloned()
            .collect();
        let probs = self.clip.zero_shot(images, &texts)?;
        let concept = probs.narrow(1, 0, self.concept_texts.len())?.sum(1)?;
        Ok(concept.to_dtype(candle_core::DType::F64)?.to_vec1()?)
    }
}

/// α, β, λ1, λ2 of the reward (the paper's defaults: 1, −2, 1, 1).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct CerWeights {
    pub alpha: f64,
    pub beta: f64,
    pub lambda_erase: f64,
    pub lambda_align: f64,
}

impl Default for CerWeights {
    fn default() -> Self {
        Self {
            alpha: 1.0,
            beta: -2.0,
            lambda_erase: 1.0,
            lambda_align: 1.0,
        }
    }
}

/// Every component, per image, so each can be logged on its own.
#[derive(Debug, Clone, PartialEq)]
pub struct RewardComponents {
    pub p_concept: Vec<f64>,
    pub erase: Vec<f64>,
    pub align: Vec<f64>,
    pub total: Vec<f64>,
}

/// `prompt` without the words in `words` (whole words, any case; punctuation next to a removed
/// word goes with it), spaces collapsed.
pub fn filter_words(prompt: &str, words: &[String]) -> String {
    replace_words(prompt, words, "")
}

/// `prompt` with each of the words in `words` (whole words, any case) replaced by
/// `substitute`, keeping the punctuation around it; an empty `substitute` removes the word and
/// its punctuation. Spaces are collapsed.
pub fn replace_words(prompt: &str, words: &[String], substitute: &str) -> String {
    let targets: Vec<String> = words.iter().map(|w| w.to_lowercase()).collect();
    prompt
        .split_whitespace()
        .filter_map(|token| {
            let bare = token.trim_matches(|c: char| !c.is_alphanumeric());
            if !targets.contains(&bare.to_lowercase()) {
                Some(token.to_string())
            } else if substitute.is_empty() {
                None
            } else {
                // `bare` is a slice of `token`, so the text around it is the punctuation.
                let start = bare.as_ptr() as usize - token.as_ptr() as usize;
                let end = start + bare.len();
                Some(format!("{}{substitute}{}", &token[..start], &token[end..]))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Everything the reward needs besides the images: the detector, the CLIP model scoring
/// alignment, the words to filter, the anchor and the weights.
pub struct ErasureReward {
    pub detector: Box<dyn ConceptDetector>,
    pub clip: Arc<ClipScorer>,
    pub concept_words: Vec<String>,
    pub anchor: String,
    pub weights: CerWeights,
}

impl ErasureReward {
    /// The reward of `images` generated from `prompts`.
    pub fn score(&self, images: &Tensor, prompts: &[String]) -> anyhow::Result<RewardComponents> {
        concept_erasing_reward(
            self.detector.as_ref(),
            &self.clip,
            images,
            prompts,
            &self.concept_words,
            &self.anchor,
            &self.weights,
        )
    }
}

/// The CER of images generated from `prompts`. A non-finite detector output is passed through
/// (it makes the batch's standardised totals non-finite), for the trainer to skip the update.
pub fn concept_erasing_reward(
    detector: &dyn ConceptDetector,
    clip: &ClipScorer,
    images: &Tensor,
    prompts: &[String],
    concept_words: &[String],
    anchor: &str,
    weights: &CerWeights,
) -> anyhow::Result<RewardComponents> {
    let p_concept = detector.concept_probability(images)?;
    let erase: Vec<f64> = p_concept
        .iter()
        .map(|p| weights.alpha * (1.0 - p) + weights.beta * p)
        .collect();
    let filtered: Vec<String> = prompts
        .iter()
        .map(|p| filter_words(p, concept_words))
        .collect();
    let anchors = vec![anchor.to_string(); prompts.len()];
    let to_prompt = clip.similarity(images, &filtered)?;
    let to_anchor = clip.similarity(images, &anchors)?;
    let align: Vec<f64> = (to_prompt + to_anchor)?
        .to_dtype(candle_core::DType::F64)?
        .to_vec1()?;
    let (erase_n, align_n) = (standardise(&erase), standardise(&align));
    let total = erase_n
        .iter()
        .zip(&align_n)
        .map(|(e, a)| weights.lambda_erase * e + weights.lambda_align * a)
        .collect();
    Ok(RewardComponents {
        p_concept,
        erase,
        align,
        total,
    })
}

/// `(x − mean) / (std + 1e-8)` over the batch.
fn standardise(values: &[f64]) -> Vec<f64> {
    let (mean, std) = mean_std(values);
    values.iter().map(|v| (v - mean) / (std + 1e-8)).collect()
}
