//! The detector network run by tract.

use std::path::{Path, PathBuf};

use super::{LABELS, class_indices};
use anyhow::bail;
use candle_core::{DType, Tensor};
use image::imageops::FilterType;
use tract_onnx::prelude::{
    Datum, Framework, InferenceFact, InferenceModelExt, TypedModel, TypedRunnableModel, tvec,
};

/// The network's input side in pixels.
const INPUT_SIZE: usize = 320;
/// Box coordinates come before the class scores in each output column.
const BOX_VALUES: usize = 4;

type Plan = TypedRunnableModel<TypedModel>;

pub struct NudeNet {
    plan: Plan,
    classes: Vec<usize>,
    path: PathBuf,
}

impl NudeNet {
    /// Loads the ONNX file at `path`; the concept is any of `classes`.
    pub fn load(path: &Path, classes: &[String]) -> anyhow::Result<Self> {
        let classes = class_indices(classes)?;
        if !path.is_file() {
            bail!(
                "NudeNet model {} not found: it is `nudenet/320n.onnx` inside the `nudenet` Python \
                 package (`pip download nudenet --no-deps`, then unzip the wheel); give its path",
                path.display()
            );
        }
        // The file annotates intermediate tensors with symbolic shapes in expressions tract
        // cannot parse (`floor(height/2 - 1/2) + 1`); they are hints only, so they are dropped
        // and tract infers every shape from the fixed input size.
        let onnx = tract_onnx::onnx().with_ignore_output_shapes(true);
        let model: TypedModel = onnx
            .proto_model_for_path(path)
            .and_then(|mut proto| {
                if let Some(graph) = proto.graph.as_mut() {
                    graph.value_info.clear();
                }
                onnx.model_for_proto_model(&proto)
            })
            .and_then(|m| {
                m.with_input_fact(
                    0,
                    InferenceFact::dt_shape(f32::datum_type(), [1, 3, INPUT_SIZE, INPUT_SIZE]),
                )
            })
            .and_then(|m| m.into_optimized())
            .map_err(|e| anyhow::anyhow!("{}: not a NudeNet ONNX model ({e})", path.display()))?;
        let plan = model
            .into_runnable()
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        Ok(Self {
            plan,
            classes,
            path: path.to_path_buf(),
        })
    }

    /// The highest score of the chosen classes in each image [B, 3, H, W] in [0, 1]. Images are
    /// padded to a square at the bottom and right, then resized to 320×320, as the package does
    /// (it resizes without antialiasing; this resize antialiases).
    pub fn scores(&self, images: &Tensor) -> anyhow::Result<Vec<f64>> {
        let (b, _, h, w) = images.dims4()?;
        let side = h.max(w);
        let square = images
            .to_dtype(DType::F32)?
            .pad_with_zeros(2, 0, side - h)?
            .pad_with_zeros(3, 0, side - w)?;
        let input = crate::images::resize(&square, INPUT_SIZE, INPUT_SIZE, FilterType::Triangle)?;
        let mut scores = Vec::with_capacity(b);
        for i in 0..b {
            let output = self.network_output(&input.get(i)?.flatten_all()?.to_vec1::<f32>()?)?;
            let anchors = output.len() / (BOX_VALUES + LABELS.len());
            let best = self
                .classes
                .iter()
                .flat_map(|&c| &output[(BOX_VALUES + c) * anchors..(BOX_VALUES + c + 1) * anchors])
                .fold(0.0f32, |m, &v| m.max(v));
            scores.push(f64::from(best));
        }
        Ok(scores)
    }

    /// The network's raw output for one preprocessed image (`pixels`: [3, 320, 320] in [0, 1],
    /// RGB): [4 + 18, anchors] row-major, box coordinates then each class's score per anchor.
    pub fn network_output(&self, pixels: &[f32]) -> anyhow::Result<Vec<f32>> {
        let tensor =
            tract_onnx::prelude::Tensor::from_shape(&[1, 3, INPUT_SIZE, INPUT_SIZE], pixels)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
        let outputs = self
            .plan
            .run(tvec!(tensor.into()))
            .map_err(|e| anyhow::anyhow!("running NudeNet {}: {e}", self.path.display()))?;
        let out = outputs[0]
            .to_array_view::<f32>()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let shape = out.shape();
        if shape.len() != 3 || shape[0] != 1 || shape[1] != BOX_VALUES + LABELS.len() {
            bail!(
                "{}: output shape {shape:?}, expected [1, {}, anchors]; not NudeNet 3.4's detector",
                self.path.display(),
                BOX_VALUES + LABELS.len()
            );
        }
        Ok(out.iter().copied().collect())
    }
}

impl crate::reward::cer::ConceptDetector for NudeNet {
    fn concept_probability(&self, images: &Tensor) -> anyhow::Result<Vec<f64>> {
        self.scores(images)
    }
}
