//! Down- and up-sampling layers (`Downsample2D`, `Upsample2D`) shared by UNet and VAE.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::engine::nn::conv::Conv2d;
use crate::engine::nn::conv2d;

/// Stride-2 3×3 convolution. `padding` zeros go on every side; with `padding == 0` one zero row
/// and column go on the bottom and right only (the VAE encoder's asymmetric padding).
///
/// Padding is applied explicitly and rows or columns no window reads are trimmed, so the
/// convolution always divides evenly: candle's conv backward gets the input-gradient shape wrong
/// when height and width leave different remainders.
pub struct Downsample {
    conv: Conv2d,
    padding: usize,
}

const KERNEL: usize = 3;
const STRIDE: usize = 2;

impl Downsample {
    pub fn new(vb: VarBuilder, channels: usize, padding: usize) -> Result<Self> {
        Ok(Self {
            conv: conv2d(vb.pp("conv"), channels, channels, KERNEL, STRIDE, 0)?,
            padding,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (before, after) = match self.padding {
            0 => (0, 1),
            p => (p, p),
        };
        let mut x = x.clone();
        for dim in [2, 3] {
            x = x.pad_with_zeros(dim, before, after)?;
            let len = x.dim(dim)?;
            if len < KERNEL {
                candle_core::bail!("input too small to down-sample: {len} after padding");
            }
            let unread = (len - KERNEL) % STRIDE;
            if unread > 0 {
                x = x.narrow(dim, 0, len - unread)?;
            }
        }
        self.conv.forward(&x)
    }
}

/// Nearest-neighbour up-sampling to an explicit size, then a 3×3 convolution.
pub struct Upsample {
    conv: Conv2d,
}

impl Upsample {
    pub fn new(vb: VarBuilder, channels: usize) -> Result<Self> {
        Ok(Self {
            conv: conv2d(vb.pp("conv"), channels, channels, 3, 1, 1)?,
        })
    }

    /// `size` is the target (height, width); `None` doubles both.
    pub fn forward(&self, x: &Tensor, size: Option<(usize, usize)>) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let (th, tw) = size.unwrap_or((2 * h, 2 * w));
        self.conv.forward(&upsample_nearest(x, th, tw)?)
    }
}

/// Nearest-neighbour resize of [B, C, H, W] to any size, as torch's `interpolate(mode="nearest")`
/// (source index ⌊i·in/out⌋). Built on `index_select`, whose backward handles every ratio
/// (candle's `upsample_nearest2d` backward only handles integer factors). Without a graph to
/// record, integer factors take candle's one-pass resize, which picks the same source pixels.
pub fn upsample_nearest(x: &Tensor, height: usize, width: usize) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    if !x.track_op() && height % h == 0 && width % w == 0 {
        return x.upsample_nearest2d(height, width);
    }
    let index = |from: usize, to: usize| -> Result<Tensor> {
        let idx: Vec<u32> = (0..to)
            .map(|i| ((i * from) / to).min(from - 1) as u32)
            .collect();
        Tensor::from_vec(idx, to, x.device())
    };
    x.index_select(&index(h, height)?, 2)?
        .index_select(&index(w, width)?, 3)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn nearest_resize_matches_torch_indexing() {
        let x = Tensor::arange(0f32, 6.0, &Device::Cpu)
            .unwrap()
            .reshape((1, 1, 2, 3))
            .unwrap();
        // Integer factors: the graph-recording path (index_select) and the one-pass path agree.
        let values = |t: Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let tracked = candle_core::Var::from_tensor(&x).unwrap();
        let doubled = values(upsample_nearest(&x, 4, 6).unwrap());
        assert_eq!(
            doubled,
            values(upsample_nearest(tracked.as_tensor(), 4, 6).unwrap())
        );
        assert_eq!(doubled[..6], [0., 0., 1., 1., 2., 2.]);
        // torch: index ⌊i·3/5⌋ = 0, 0, 1, 1, 2.
        let odd = upsample_nearest(&x, 2, 5).unwrap();
        assert_eq!(
            odd.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            [0., 0., 1., 1., 2., 3., 3., 4., 4., 5.]
        );
    }
}
