//! CLIP as a scorer: zero-shot probabilities over texts (a concept detector) and image–text
//! similarity (the alignment reward), from a transformers `CLIPModel` folder.

use std::path::Path;

use anyhow::Context;
use candle_core::{D, DType, Device, Tensor};
use image::imageops::FilterType;
use serde::Deserialize;

use crate::engine::models::clip::text::ids_tensor;
use crate::engine::models::clip::{ClipModel, unit_length};
use crate::engine::models::tokenizer::ClipTokenizer;

/// The parts of `preprocessor_config.json` that decide the image tower's input.
#[derive(Debug, Clone, Deserialize)]
pub struct Preprocessor {
    #[serde(default)]
    size: Option<ShortestEdge>,
    crop_size: CropSize,
    image_mean: [f64; 3],
    image_std: [f64; 3],
}

#[derive(Debug, Clone, Copy, Deserialize)]
struct ShortestEdge {
    shortest_edge: usize,
}

#[derive(Debug, Clone, Copy, Deserialize)]
struct CropSize {
    height: usize,
    width: usize,
}

impl Preprocessor {
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        crate::engine::io::config::read_json(path)
    }

    /// Images [B, 3, H, W] in [0, 1] → normalised pixels for the image tower, prepared as
    /// transformers' `CLIPImageProcessor` does: the shortest side resized (bicubic) to
    /// `size.shortest_edge`, then a centre crop of `crop_size`.
    pub fn pixel_values(&self, images: &Tensor) -> anyhow::Result<Tensor> {
        let (_, _, h, w) = images.dims4()?;
        let crop = self.crop_size;
        let images = if (h, w) == (crop.height, crop.width) {
            images.clone()
        } else {
            let edge = self
                .size
                .map_or(crop.height.min(crop.width), |s| s.shortest_edge);
            // As transformers: the long side scales by the same factor, rounded down.
            let (rh, rw) = if h <= w {
                (edge, w * edge / h)
            } else {
                (h * edge / w, edge)
            };
            if rh < crop.height || rw < crop.width {
                anyhow::bail!(
                    "preprocessor_config.json: shortest_edge {edge} is smaller than the {}×{} crop",
                    crop.width,
                    crop.height
                );
            }
            let resized = crate::images::resize(images, rh, rw, FilterType::CatmullRom)?;
            resized
                .narrow(2, (rh - crop.height) / 2, crop.height)?
                .narrow(3, (rw - crop.width) / 2, crop.width)?
        };
        let column = |v: [f64; 3]| {
            Tensor::new(&v.map(|x| x as f32), images.device())?
                .to_dtype(images.dtype())?
                .reshape((1, 3, 1, 1))
        };
        let normalised = images
            .broadcast_sub(&column(self.image_mean)?)?
            .broadcast_div(&column(self.image_std)?)?;
        Ok(normalised)
    }
}

/// A CLIP model with its tokenizer and image preprocessing.
pub struct ClipScorer {
    model: ClipModel,
    tokenizer: ClipTokenizer,
    preprocessor: Preprocessor,
    device: Device,
}

impl ClipScorer {
    /// Loads a `CLIPModel` folder; its tokenizer files are in the folder or, as in the demo
    /// model, in a sibling `tokenizer/` folder.
    pub fn load(dir: &Path, device: &Device) -> anyhow::Result<Self> {
        let model = ClipModel::load(dir, device, DType::F32)?;
        let sibling = dir.parent().map(|p| p.join("tokenizer"));
        let tokenizer = ClipTokenizer::from_dir(dir)
            .or_else(|e| match &sibling {
                Some(s) if s.is_dir() => ClipTokenizer::from_dir(s),
                _ => Err(e),
            })
            .with_context(|| {
                format!(
                    "{}: no CLIP tokenizer here or in ../tokenizer",
                    dir.display()
                )
            })?;
        let preprocessor = Preprocessor::load(&dir.join("preprocessor_config.json"))?;
        Ok(Self {
            model,
            tokenizer,
            preprocessor,
            device: device.clone(),
        })
    }

    /// Unit-length text features [T, P].
    pub fn text_features(&self, texts: &[String]) -> anyhow::Result<Tensor> {
        let ids: Vec<Vec<u32>> = texts.iter().map(|t| self.tokenizer.encode(t)).collect();
        Ok(unit_length(
            &self.model.text_embeds(&ids_tensor(&ids, &self.device)?)?,
        )?)
    }

    /// Unit-length image features [B, P] of images [B, 3, H, W] in [0, 1].
    pub fn image_features(&self, images: &Tensor) -> anyhow::Result<Tensor> {
        let pixels = self
            .preprocessor
            .pixel_values(&images.to_dtype(DType::F32)?)?;
        Ok(unit_length(&self.model.image_embeds(&pixels)?)?)
    }

    /// For each image, the probability of each text [B, T]: softmax over the texts of CLIP's
    /// scaled cosine similarities.
    pub fn zero_shot(&self, images: &Tensor, texts: &[String]) -> anyhow::Result<Tensor> {
        let logits = self
            .image_features(images)?
            .matmul(&self.text_features(texts)?.t()?)?
            .broadcast_mul(&self.model.logit_scale()?)?;
        // Scores are rewards, not trained through: the fused softmax is fine here.
        Ok(candle_nn::ops::softmax_last_dim(&logits)?)
    }

    /// Cosine similarity [B] of image b to text b.
    pub fn similarity(&self, images: &Tensor, texts: &[String]) -> anyhow::Result<Tensor> {
        let pairs = (self.image_features(images)? * self.text_features(texts)?)?;
        Ok(pairs.sum(D::Minus1)?)
    }
}
