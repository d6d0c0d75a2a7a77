//! Seeded standard-normal noise, independent of the device, so a seed gives the same image on
//! CPU and GPU and every batch item can be reproduced on its own.

use candle_core::{Device, Result, Shape, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

/// A stream of N(0, 1) samples from one seed.
pub struct NoiseStream {
    rng: ChaCha8Rng,
}

impl NoiseStream {
    pub fn new(seed: u64) -> Self {
        Self {
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }

    /// The next `shape.elem_count()` samples as an f32 tensor.
    pub fn tensor<S: Into<Shape>>(&mut self, shape: S, device: &Device) -> Result<Tensor> {
        let shape = shape.into();
        let values: Vec<f32> = (0..shape.elem_count())
            .map(|_| StandardNormal.sample(&mut self.rng))
            .collect();
        Tensor::from_vec(values, shape, device)
    }
}

/// One stream per batch item (seed, seed + 1, …), stacked along the batch dimension.
pub struct BatchNoise {
    streams: Vec<NoiseStream>,
}

impl BatchNoise {
    pub fn new(seed: u64, batch: usize) -> Self {
        Self {
            streams: (0..batch as u64)
                .map(|i| NoiseStream::new(seed.wrapping_add(i)))
                .collect(),
        }
    }

    /// Noise [B, …item_shape].
    pub fn tensor(&mut self, item_shape: &[usize], device: &Device) -> Result<Tensor> {
        let items = self
            .streams
            .iter_mut()
            .map(|s| s.tensor(item_shape, device))
            .collect::<Result<Vec<_>>>()?;
        Tensor::stack(&items, 0)
    }
}
