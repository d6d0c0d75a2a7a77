//! Image files ↔ tensors: PNG grids out, init images in.

use std::path::Path;

use anyhow::{Context, bail};
use candle_core::{DType, Device, Tensor};
use image::{RgbImage, imageops::FilterType};

/// Images [B, 3, H, W] in [0, 1] → one RGB image with the batch in a row-major grid.
pub fn grid(images: &Tensor, columns: usize) -> anyhow::Result<RgbImage> {
    let (b, c, h, w) = images.dims4()?;
    if c != 3 {
        bail!("expected 3 channels, got {c}");
    }
    let cols = columns.clamp(1, b.max(1));
    let rows = b.div_ceil(cols);
    let bytes = (images.to_dtype(DType::F32)?.clamp(0.0, 1.0)? * 255.0)?
        .round()?
        .to_dtype(DType::U8)?
        .permute((0, 2, 3, 1))?
        .flatten_all()?
        .to_vec1::<u8>()?;
    let mut out = RgbImage::new((cols * w) as u32, (rows * h) as u32);
    for i in 0..b {
        let (ox, oy) = ((i % cols) * w, (i / cols) * h);
        for y in 0..h {
            for x in 0..w {
                let p = ((i * h + y) * w + x) * 3;
                out.put_pixel(
                    (ox + x) as u32,
                    (oy + y) as u32,
                    image::Rgb([bytes[p], bytes[p + 1], bytes[p + 2]]),
                );
            }
        }
    }
    Ok(out)
}

/// Writes a PNG atomically (see `fs::atomically`).
pub fn save_png(img: &RgbImage, path: &Path) -> anyhow::Result<()> {
    crate::fs::atomically(path, |tmp| {
        Ok(img.save_with_format(tmp, image::ImageFormat::Png)?)
    })
}

/// Width and height of an image file.
pub fn image_size(path: &Path) -> anyhow::Result<(usize, usize)> {
    let (w, h) = image::image_dimensions(path)
        .with_context(|| format!("cannot read image {}", path.display()))?;
    Ok((w as usize, h as usize))
}

/// Loads an image, resized to `width`×`height`, as [1, 3, H, W] in [0, 1].
pub fn load_image(
    path: &Path,
    width: usize,
    height: usize,
    device: &Device,
) -> anyhow::Result<Tensor> {
    let img = image::open(path)
        .with_context(|| format!("cannot read image {}", path.display()))?
        .to_rgb8();
    let img = if img.dimensions() == (width as u32, height as u32) {
        img
    } else {
        image::imageops::resize(&img, width as u32, height as u32, FilterType::Lanczos3)
    };
    Ok(to_tensor(&img, device)?.unsqueeze(0)?)
}

/// An RGB image → [3, H, W] f32 in [0, 1].
pub fn to_tensor(img: &RgbImage, device: &Device) -> candle_core::Result<Tensor> {
    let (w, h) = img.dimensions();
    let data: Vec<f32> = img.as_raw().iter().map(|&v| f32::from(v) / 255.0).collect();
    Tensor::from_vec(data, (h as usize, w as usize, 3), device)?
        .permute((2, 0, 1))?
        .contiguous()
}

/// Resamples images [B, 3, H, W] in [0, 1] to `height`×`width` with `filter` (antialiased when
/// shrinking, as PIL's resize is), in f32 without rounding to 8 bits.
pub fn resize(
    images: &Tensor,
    height: usize,
    width: usize,
    filter: FilterType,
) -> anyhow::Result<Tensor> {
    let (b, c, h, w) = images.dims4()?;
    if c != 3 {
        bail!("expected 3 channels, got {c}");
    }
    if (h, w) == (height, width) {
        return Ok(images.clone());
    }
    let pixels = images
        .to_dtype(DType::F32)?
        .permute((0, 2, 3, 1))?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let mut out = Vec::with_capacity(b * height * width * 3);
    for item in pixels.chunks_exact(h * w * 3) {
        let img = image::Rgb32FImage::from_raw(w as u32, h as u32, item.to_vec())
            .expect("buffer matches the image size");
        let resized = image::imageops::resize(&img, width as u32, height as u32, filter);
        out.extend(resized.into_raw());
    }
    Ok(
        Tensor::from_vec(out, (b, height, width, 3), images.device())?
            .permute((0, 3, 1, 2))?
            .contiguous()?
            .to_dtype(images.dtype())?,
    )
}
