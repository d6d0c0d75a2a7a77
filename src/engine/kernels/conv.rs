//! The convolution op on the CPU: im2col + GEMM per image (Winograd for large 3×3 layers),
//! forward and backward. `nn::conv` decides when it runs.

use std::ops::Range;

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor, WithDType, bail};
use gemm::Parallelism;
use rayon::prelude::*;

use super::channel::add_bias_in_place;
use super::matmul::{matmul, matmul_into_rows};
use super::winograd::{Shape3x3, conv3x3, conv3x3_input_grad};
use super::{Real, contiguous, with_cpu_slice, with_floats};

/// The sizes of one convolution: input `[batch, c_in, h, w]`, kernel `[c_out, c_in, kh, kw]`.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    batch: usize,
    c_in: usize,
    h: usize,
    w: usize,
    c_out: usize,
    kh: usize,
    kw: usize,
    stride: usize,
    padding: usize,
    out_h: usize,
    out_w: usize,
}

impl Geometry {
    fn new(
        input: (usize, usize, usize, usize),
        kernel: (usize, usize, usize, usize),
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        let (batch, c_in, h, w) = input;
        let (c_out, k_in, kh, kw) = kernel;
        if k_in != c_in {
            bail!("conv2d: kernel expects {k_in} input channels, the input has {c_in}");
        }
        if stride == 0 || h + 2 * padding < kh || w + 2 * padding < kw {
            bail!(
                "conv2d: a {kh}×{kw} kernel (stride {stride}, padding {padding}) does not fit a {h}×{w} input"
            );
        }
        Ok(Self {
            batch,
            c_in,
            h,
            w,
            c_out,
            kh,
            kw,
            stride,
            padding,
            out_h: (h + 2 * padding - kh) / stride + 1,
            out_w: (w + 2 * padding - kw) / stride + 1,
        })
    }

    /// Rows of the im2col matrix: one per (input channel, kernel row, kernel column).
    fn patch_len(&self) -> usize {
        self.c_in * self.kh * self.kw
    }

    fn out_pixels(&self) -> usize {
        self.out_h * self.out_w
    }

    fn in_len(&self) -> usize {
        self.c_in * self.h * self.w
    }

    fn out_len(&self) -> usize {
        self.c_out * self.out_pixels()
    }

    /// A 1×1, stride-1, unpadded convolution: the image already is its im2col matrix.
    fn is_pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == 1 && self.padding == 0
    }

    /// For kernel offset `k` along an axis of `size` inputs: the input index of output `o`, or
    /// `None` in the padding.
    fn source(&self, o: usize, k: usize, size: usize) -> Option<usize> {
        (o * self.stride + k)
            .checked_sub(self.padding)
            .filter(|&i| i < size)
    }

    /// For kernel column `kx`: the outputs of a row that read the input (the rest read
    /// padding), and the input column of the first of them.
    fn valid_columns(&self, kx: usize) -> (Range<usize>, usize) {
        let s = self.stride;
        let first = self.padding.saturating_sub(kx).div_ceil(s);
        let end = (self.w + self.padding)
            .checked_sub(kx)
            .map_or(0, |reach| reach.div_ceil(s))
            .min(self.out_w);
        let first = first.min(end);
        (first..end, (first * s + kx).saturating_sub(self.padding))
    }

    /// The im2col matrix `[patch_len, rows.len() × out_w]` of one image's output rows `rows`,
    /// with its row stride: the image itself for a pointwise convolution (rows a channel
    /// apart), otherwise built in `scratch` (reused across calls).
    fn columns<'a, T: WithDType>(
        &self,
        image: &'a [T],
        rows: Range<usize>,
        scratch: &'a mut Vec<T>,
    ) -> (&'a [T], usize) {
        if self.is_pointwise() {
            return (&image[rows.start * self.out_w..], self.out_pixels());
        }
        let block_pixels = rows.len() * self.out_w;
        scratch.resize(self.patch_len() * block_pixels, T::zero());
        self.im2col(image, rows, scratch);
        (scratch, block_pixels)
    }

    /// The output rows of the blocks the forward pass builds an im2col matrix for and
    /// multiplies in turn, each block's matrix about `block_bytes`: the GEMM then
    /// reads a matrix im2col has just written to cache, not one evicted to memory (a demo
    /// decode: 14–27 % less time). gemm packs the kernel again for every block, so a kernel
    /// larger than a block (Stable Diffusion's 320–1280 channels) keeps one block, as does a
    /// pointwise convolution, which reads its image in place.
    ///
    /// Every block is at least [`MIN_BLOCK_PIXELS`] wide: gemm blocks the inner dimension
    /// differently for products of at most 64 rows and 64 columns, and wider blocks give the
    /// same result, bit for bit, as one GEMM over the whole image.
    fn forward_row_blocks<T>(
        &self,
        block_bytes: usize,
    ) -> impl Iterator<Item = Range<usize>> + use<T> {
        let patch_bytes = self.patch_len() * std::mem::size_of::<T>();
        let rows =
            (block_bytes / (patch_bytes * self.out_w)).max(MIN_BLOCK_PIXELS.div_ceil(self.out_w));
        let kernel_bytes = self.c_out * patch_bytes;
        let out_h = self.out_h;
        let blocks = if self.is_pointwise() || kernel_bytes > block_bytes {
            1
        } else {
            (out_h / rows).max(1)
        };
        // Rows shared out evenly: no block is left narrower than `rows`.
        (0..blocks).map(move |i| i * out_h / blocks..(i + 1) * out_h / blocks)
    }

    /// The shape to hand Winograd's 3×3 convolution, for the convolutions that take it.
    fn winograd_shape(&self) -> Option<Shape3x3> {
        let pixels = self.h * self.w;
        let wide = self.c_in.min(self.c_out) >= WINOGRAD_MIN_CHANNELS;
        let large = pixels >= WINOGRAD_MIN_PIXELS || (wide && pixels >= WINOGRAD_MIN_PIXELS_WIDE);
        ((self.kh, self.kw, self.stride, self.padding) == (3, 3, 1, 1) && large).then_some(
            Shape3x3 {
                batch: self.batch,
                c_in: self.c_in,
                h: self.h,
                w: self.w,
                c_out: self.c_out,
            },
        )
    }

    /// A stride-1 convolution whose output is the input's size (a 3×3 kernel with padding 1):
    /// each im2col row is then its input channel shifted by a constant, one contiguous run.
    fn keeps_size(&self) -> bool {
        self.stride == 1 && self.out_h == self.h && self.out_w == self.w
    }

    /// For a size-keeping convolution: how far im2col row `(ky, kx)` reads ahead of its
    /// output in the flattened channel (negative: behind), the column shift alone, and the
    /// part of the row `[out_pixels]` the contiguous run covers (the rest is padding).
    fn shifted_run(&self, ky: usize, kx: usize) -> (isize, isize, Range<usize>) {
        let (w, len) = (self.w as isize, (self.h * self.w) as isize);
        let shift_x = kx as isize - self.padding as isize;
        let offset = (ky as isize - self.padding as isize) * w + shift_x;
        let start = (-offset).clamp(0, len) as usize;
        let end = (len - offset).clamp(0, len) as usize;
        (offset, shift_x, start..end.max(start))
    }

    /// The columns of an output row that a column shift of `shift_x` takes into the padding.
    fn border_columns(&self, shift_x: isize) -> Range<usize> {
        let w = self.w;
        if shift_x < 0 {
            0..(shift_x.unsigned_abs()).min(w)
        } else {
            w - (shift_x as usize).min(w)..w
        }
    }

    /// Zeroes the columns of every output row in `col_row` that a column shift of `shift_x`
    /// takes into the padding: a column or two per row, stored one by one (a `fill` per row
    /// calls memset for each, a tenth of a small decoder's time).
    fn zero_border<T: WithDType>(&self, col_row: &mut [T], shift_x: isize) {
        if shift_x == 0 {
            return;
        }
        for x in self.border_columns(shift_x) {
            col_row
                .iter_mut()
                .skip(x)
                .step_by(self.w)
                .for_each(|v| *v = T::zero());
        }
    }

    /// im2col of output rows `rows` of one image `[c_in, h, w]` into `cols`
    /// `[patch_len, rows.len() × out_w]`.
    fn im2col<T: WithDType>(&self, image: &[T], rows: Range<usize>, cols: &mut [T]) {
        if self.keeps_size() {
            self.im2col_shifted(image, rows, cols)
        } else {
            self.im2col_by_rows(image, rows, cols)
        }
    }

    /// [`im2col`](Self::im2col) of a size-keeping convolution: a contiguous run per row of
    /// `cols`, then the wrapped border columns zeroed (copying output row by output row took
    /// three calls per row, which dominated at the small sizes of the demo model).
    fn im2col_shifted<T: WithDType>(&self, image: &[T], rows: Range<usize>, cols: &mut [T]) {
        let channel_len = self.h * self.w;
        // The block's pixels, in the flattened output (a size-keeping output row is `w` long).
        let (first, end) = (rows.start * self.w, rows.end * self.w);
        for (row, col_row) in cols.chunks_exact_mut(end - first).enumerate() {
            let (c, ky, kx) = self.patch_row(row);
            let channel = &image[c * channel_len..(c + 1) * channel_len];
            let (offset, shift_x, run) = self.shifted_run(ky, kx);
            let run = run.start.clamp(first, end) - first..run.end.clamp(first, end) - first;
            col_row[..run.start].fill(T::zero());
            col_row[run.end..].fill(T::zero());
            if !run.is_empty() {
                let source = ((first + run.start) as isize + offset) as usize;
                col_row[run.clone()].copy_from_slice(&channel[source..source + run.len()]);
            }
            // The run wraps around the row ends, where the kernel reads padding.
            self.zero_border(col_row, shift_x);
        }
    }

    /// [`im2col`](Self::im2col) of any convolution, output row by output row.
    fn im2col_by_rows<T: WithDType>(&self, image: &[T], rows: Range<usize>, cols: &mut [T]) {
        let block_pixels = rows.len() * self.out_w;
        for (row, col_row) in cols.chunks_exact_mut(block_pixels).enumerate() {
            let (c, ky, kx) = self.patch_row(row);
            let channel = &image[c * self.h * self.w..(c + 1) * self.h * self.w];
            let (valid, ix0) = self.valid_columns(kx);
            for (oy, out_row) in rows.clone().zip(col_row.chunks_exact_mut(self.out_w)) {
                let iy = self.source(oy, ky, self.h).filter(|_| !valid.is_empty());
                let Some(iy) = iy else {
                    out_row.fill(T::zero());
                    continue;
                };
                let in_row = &channel[iy * self.w..(iy + 1) * self.w];
                out_row[..valid.start].fill(T::zero());
                out_row[valid.end..].fill(T::zero());
                let dst = &mut out_row[valid.clone()];
                if self.stride == 1 {
                    dst.copy_from_slice(&in_row[ix0..ix0 + dst.len()]);
                } else {
                    for (d, &v) in dst
                        .iter_mut()
                        .zip(in_row[ix0..].iter().step_by(self.stride))
                    {
                        *d = v;
                    }
                }
            }
        }
    }

    /// The adjoint of [`im2col`](Self::im2col): adds `cols` back onto one image's gradient.
    /// `cols` is scratch: the size-keeping path zeroes its padding entries on the way.
    fn col2im<T: WithDType>(&self, cols: &mut [T], image: &mut [T]) {
        if self.keeps_size() {
            self.col2im_shifted(cols, image)
        } else {
            self.col2im_by_rows(cols, image)
        }
    }

    fn col2im_shifted<T: WithDType>(&self, cols: &mut [T], image: &mut [T]) {
        let (pixels, channel_len) = (self.out_pixels(), self.h * self.w);
        for (row, col_row) in cols.chunks_exact_mut(pixels).enumerate() {
            let (c, ky, kx) = self.patch_row(row);
            let channel = &mut image[c * channel_len..(c + 1) * channel_len];
            let (offset, shift_x, run) = self.shifted_run(ky, kx);
            if run.is_empty() {
                continue;
            }
            // Zeroed, the wrapped border entries add nothing where the run lands on them.
            self.zero_border(col_row, shift_x);
            let target = (run.start as isize + offset) as usize;
            for (t, &v) in channel[target..target + run.len()]
                .iter_mut()
                .zip(&col_row[run])
            {
                *t += v;
            }
        }
    }

    fn col2im_by_rows<T: WithDType>(&self, cols: &[T], image: &mut [T]) {
        let pixels = self.out_pixels();
        for (row, col_row) in cols.chunks_exact(pixels).enumerate() {
            let (c, ky, kx) = self.patch_row(row);
            let channel = &mut image[c * self.h * self.w..(c + 1) * self.h * self.w];
            let (valid, ix0) = self.valid_columns(kx);
            for (oy, out_row) in col_row.chunks_exact(self.out_w).enumerate() {
                let iy = self.source(oy, ky, self.h).filter(|_| !valid.is_empty());
                let Some(iy) = iy else {
                    continue;
                };
                let in_row = &mut channel[iy * self.w..(iy + 1) * self.w];
                let targets = in_row[ix0..].iter_mut().step_by(self.stride);
                for (t, &v) in targets.zip(&out_row[valid.clone()]) {
                    *t += v;
                }
            }
        }
    }

    fn patch_row(&self, row: usize) -> (usize, usize, usize) {
        let taps = self.kh * self.kw;
        (row / taps, (row % taps) / self.kw, row % self.kw)
    }
}

/// How to spread a per-image loop over the thread pool: across images when there are enough,
/// otherwise inside each GEMM.
fn gemm_parallelism(batch: usize) -> Option<Parallelism> {
    let threads = rayon::current_num_threads();
    (batch < threads).then_some(Parallelism::Rayon(threads))
}

/// Runs `f(image index, output chunk, GEMM parallelism, scratch)` over `out` split into
/// `batch` chunks, in parallel across images when there are at least as many as threads. The
/// scratch buffer is the thread's [kept scratch](take_scratch), reused from image to image and
/// from call to call.
fn for_each_image<T: Send + 'static>(
    out: &mut [T],
    batch: usize,
    f: impl Fn(usize, &mut [T], Parallelism, &mut Vec<T>) + Sync,
) {
    let chunk = out.len() / batch.max(1);
    if chunk == 0 {
        return;
    }
    match gemm_parallelism(batch) {
        Some(inner) => {
            let mut scratch = KeptScratch(take_scratch());
            for (b, o) in out.chunks_exact_mut(chunk).enumerate() {
                f(b, o, inner, &mut scratch.0);
            }
        }
        None => out.par_chunks_exact_mut(chunk).enumerate().for_each_init(
            || KeptScratch(take_scratch()),
            |scratch, (b, o)| f(b, o, Parallelism::None, &mut scratch.0),
        ),
    }
}

/// The most scratch memory a thread keeps between convolutions: enough for a small model's
/// im2col matrices, whose allocation and zeroing on every call took a tenth of a demo decode;
/// a large model's are allocated per call, where the GEMM dwarfs that.
const KEPT_SCRATCH_BYTES: usize = 16 << 20;

thread_local! {
    static KEPT_SCRATCH: std::cell::RefCell<Option<Box<dyn std::any::Any>>> =
        const { std::cell::RefCell::new(None) };
}

/// The thread's kept scratch buffer of element type `T` (empty if it has none). It is taken
/// out, not borrowed, so a task that rayon runs on this thread while the GEMM waits gets a
/// buffer of its own.
fn take_scratch<T: 'static>() -> Vec<T> {
    KEPT_SCRATCH
        .with(|kept| kept.borrow_mut().take())
        .and_then(|any| any.downcast::<Vec<T>>().ok())
        .map_or_else(Vec::new, |v| *v)
}

/// Gives a scratch buffer back to the thread it is dropped on, if it is small enough to keep.
struct KeptScratch<T: 'static>(Vec<T>);

impl<T: 'static> Drop for KeptScratch<T> {
    fn drop(&mut self) {
        let buffer = std::mem::take(&mut self.0);
        if buffer.capacity() * std::mem::size_of::<T>() <= KEPT_SCRATCH_BYTES {
            KEPT_SCRATCH.with(|kept| *kept.borrow_mut() = Some(Box::new(buffer)));
        }
    }
}

/// The convolution itself: `(input, kernel) → output (+ bias)`.
pub(crate) struct Im2ColConv {
    pub(crate) stride: usize,
    pub(crate) padding: usize,
    /// Kept for the backward pass: with stride > 1 the output does not determine it.
    pub(crate) input_hw: (usize, usize),
    /// A frozen per-channel bias, added to the output in place (a separate op would allocate
    /// and zero another output: a twentieth of the demo decoder's time).
    pub(crate) bias: Option<Tensor>,
}

impl CustomOp2 for Im2ColConv {
    fn name(&self) -> &'static str {
        "im2col-conv2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = Geometry::new(
            l1.shape().dims4()?,
            l2.shape().dims4()?,
            self.stride,
            self.padding,
        )?;
        let out = with_floats!((s1, s2), |x, k| {
            let mut out = conv_forward(&g, contiguous(x, l1)?, contiguous(k, l2)?);
            if let Some(bias) = &self.bias {
                let shape = Shape::from((g.batch, g.c_out, g.out_h, g.out_w));
                with_cpu_slice(bias, |b| add_bias_in_place(&mut out, &shape, b, 1))?;
            }
            out
        });
        Ok((out, Shape::from((g.batch, g.c_out, g.out_h, g.out_w))))
    }

    fn bwd(
        &self,
        input: &Tensor,
        kernel: &Tensor,
        _output: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // Only what the graph needs: a frozen kernel (the base model under an adapter) or an
        // input that is no function of a variable (the first layer) gets no gradient.
        let grad = grad.contiguous()?;
        let input_grad = input
            .track_op()
            .then(|| grad.apply_op2_no_bwd(kernel, &InputGrad { conv: self }))
            .transpose()?;
        let kernel_grad = kernel
            .track_op()
            .then(|| {
                let op = KernelGrad {
                    conv: self,
                    kernel_hw: (kernel.dim(2)?, kernel.dim(3)?),
                };
                input.apply_op2_no_bwd(&grad, &op)
            })
            .transpose()?;
        Ok((input_grad, kernel_grad))
    }
}

/// Maps of at least this many pixels go through Winograd's 3×3 convolution whatever their
/// channels (the top of a VAE decoder).
const WINOGRAD_MIN_PIXELS: usize = 128 * 128;

/// Smaller maps down to [`WINOGRAD_MIN_PIXELS_WIDE`] take Winograd when both sides have at
/// least this many channels (the SD UNet's and VAE's 320–1280): its tile transforms cost
/// per channel, the multiplies it saves per channel pair, so with fewer channels it gains
/// little, and the demo model (64–128 channels) keeps im2col and its measured numbers.
const WINOGRAD_MIN_CHANNELS: usize = 256;

/// See [`WINOGRAD_MIN_CHANNELS`]: below 32×32 pixels the kernels' transform, done on every
/// call, costs more than the multiplies saved.
const WINOGRAD_MIN_PIXELS_WIDE: usize = 32 * 32;

/// The largest im2col block of the forward pass: half of a 1 MiB L2 cache, so that the block
/// stays there between im2col and the GEMM.
const FORWARD_BLOCK_BYTES: usize = 512 << 10;

/// The narrowest im2col block of the forward pass, in output pixels: well above the 64
/// columns where gemm's blocking changes, and a whole 16×16 map (a demo UNet's largest), so a
/// block never holds too few columns to keep the GEMM busy.
const MIN_BLOCK_PIXELS: usize = 256;

fn conv_forward<T: Real>(g: &Geometry, x: &[T], k: &[T]) -> Vec<T> {
    match g.winograd_shape() {
        Some(shape) => conv3x3(shape, x, k, winograd_parallelism()),
        None => im2col_forward(g, x, k, FORWARD_BLOCK_BYTES),
    }
}

/// Winograd threads inside each of its GEMMs, image after image.
fn winograd_parallelism() -> Parallelism {
    gemm_parallelism(1).unwrap_or(Parallelism::None)
}

/// The forward pass by im2col and GEMM, in blocks of output rows whose im2col matrices take
/// about `block_bytes`.
fn im2col_forward<T: Real>(g: &Geometry, x: &[T], k: &[T], block_bytes: usize) -> Vec<T> {
    let mut out = vec![T::zero(); g.batch * g.out_len()];
    let (patch, pixels) = (g.patch_len(), g.out_pixels());
    for_each_image(&mut out, g.batch, |b, out_b, par, scratch: &mut Vec<T>| {
        let image = &x[b * g.in_len()..(b + 1) * g.in_len()];
        for rows in g.forward_row_blocks::<T>(block_bytes) {
            let block_pixels = rows.len() * g.out_w;
            let first = rows.start * g.out_w;
            let (cols, cols_stride) = g.columns(image, rows, scratch);
            // out_b[c_out × block] = kernel[c_out × patch] · cols[patch × block]
            unsafe {
                matmul_into_rows(
                    (g.c_out, block_pixels, patch),
                    (out_b.as_mut_ptr().add(first), pixels),
                    false,
                    (k.as_ptr(), patch, 1),
                    (cols.as_ptr(), cols_stride, 1),
                    par,
                )
            }
        }
    });
    out
}

/// `(output gradient, kernel) → input gradient`.
struct InputGrad<'a> {
    conv: &'a Im2ColConv,
}

impl CustomOp2 for InputGrad<'_> {
    fn name(&self) -> &'static str {
        "im2col-conv2d-input-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (batch, _, _, _) = l1.shape().dims4()?;
        let kernel = l2.shape().dims4()?;
        let (h, w) = self.conv.input_hw;
        let g = Geometry::new(
            (batch, kernel.1, h, w),
            kernel,
            self.conv.stride,
            self.conv.padding,
        )?;
        let out = with_floats!((s1, s2), |dy, k| input_grad(
            &g,
            contiguous(dy, l1)?,
            contiguous(k, l2)?
        ));
        Ok((out, Shape::from((g.batch, g.c_in, g.h, g.w))))
    }
}

fn input_grad<T: Real>(g: &Geometry, dy: &[T], k: &[T]) -> Vec<T> {
    if let Some(shape) = g.winograd_shape() {
        return conv3x3_input_grad(shape, dy, k, winograd_parallelism());
    }
    let mut dx = vec![T::zero(); g.batch * g.in_len()];
    let (patch, pixels) = (g.patch_len(), g.out_pixels());
    for_each_image(&mut dx, g.batch, |b, dx_b, par, scratch: &mut Vec<T>| {
        let dy_b = &dy[b * g.out_len()..(b + 1) * g.out_len()];
        let dcols = if g.is_pointwise() {
            dx_b.as_mut_ptr()
        } else {
            scratch.resize(patch * pixels, T::zero());
            scratch.as_mut_ptr()
        };
        // dcols[patch × pixels] = kernelᵀ[patch × c_out] · dy[c_out × pixels]
        unsafe {
            matmul(
                (patch, pixels, g.c_out),
                dcols,
                false,
                (k.as_ptr(), 1, patch),
                (dy_b.as_ptr(), pixels, 1),
                par,
            )
        }
        if !g.is_pointwise() {
            g.col2im(scratch, dx_b);
        }
    });
    dx
}

/// `(input, output gradient) → kernel gradient`.
struct KernelGrad<'a> {
    conv: &'a Im2ColConv,
    kernel_hw: (usize, usize),
}

impl CustomOp2 for KernelGrad<'_> {
    fn name(&self) -> &'static str {
        "im2col-conv2d-kernel-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let input = l1.shape().dims4()?;
        let (_, c_out, _, _) = l2.shape().dims4()?;
        let (kh, kw) = self.kernel_hw;
        let g = Geometry::new(
            input,
            (c_out, input.1, kh, kw),
            self.conv.stride,
            self.conv.padding,
        )?;
        let out = with_floats!((s1, s2), |x, dy| kernel_grad(
            &g,
            contiguous(x, l1)?,
            contiguous(dy, l2)?
        ));
        Ok((out, Shape::from((g.c_out, g.c_in, g.kh, g.kw))))
    }
}

fn kernel_grad<T: WithDType>(g: &Geometry, x: &[T], dy: &[T]) -> Vec<T> {
    let (patch, pixels) = (g.patch_len(), g.out_pixels());
    let kernel_len = g.c_out * patch;
    // One partial sum per thread (or one in all, threading inside the GEMM), added at the end.
    let parts = match gemm_parallelism(g.batch) {
        Some(_) => 1,
        None => rayon::current_num_threads().min(g.batch),
    };
    let mut partial = vec![T::zero(); parts * kernel_len];
    let images_per_part = g.batch.div_ceil(parts);
    for_each_image(
        &mut partial,
        parts,
        |part, acc, par, scratch: &mut Vec<T>| {
            let first = part * images_per_part;
            for (i, b) in (first..(first + images_per_part).min(g.batch)).enumerate() {
                let image = &x[b * g.in_len()..(b + 1) * g.in_len()];
                let (cols, _) = g.columns(image, 0..g.out_h, scratch);
                let dy_b = &dy[b * g.out_len()..(b + 1) * g.out_len()];
                // acc[c_out × patch] += dy[c_out × pixels] · colsᵀ[pixels × patch]
                unsafe {
                    matmul(
                        (g.c_out, patch, pixels),
                        acc.as_mut_ptr(),
                        i > 0,
                        (dy_b.as_ptr(), pixels, 1),
                        (cols.as_ptr(), 1, pixels),
                        par,
                    )
                }
            }
        },
    );
    let (total, rest) = partial.split_at_mut(kernel_len);
    for part in rest.chunks_exact(kernel_len) {
        for (t, &p) in total.iter_mut().zip(part) {
            *t += p;
        }
    }
    partial.truncate(kernel_len);
    partial
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::diffusion::noise::NoiseStream;
    use candle_core::Device;

    /// Shapes where gemm's blocking of the inner dimension would differ between narrow and
    /// wide products (at most 64 output channels, more than 512 patch rows), size-keeping and
    /// not, and rows that do not divide evenly into blocks.
    #[test]
    fn blocked_forward_is_bit_identical_to_one_gemm_per_image() {
        let shapes = [
            // (batch, c_in, h, w, c_out, kernel, stride, padding)
            (2, 64, 32, 32, 64, 3, 1, 1),
            (2, 64, 24, 40, 48, 3, 1, 1),
            (2, 32, 64, 64, 3, 3, 1, 1),
            (1, 64, 90, 66, 64, 3, 2, 1),
            (3, 24, 40, 40, 16, 5, 1, 2),
        ];
        let mut noise = NoiseStream::new(7);
        let mut random = |len: usize| -> Vec<f32> {
            let values = noise.tensor(len, &Device::Cpu).unwrap();
            values.to_vec1().unwrap()
        };
        for (batch, c_in, h, w, c_out, kernel, stride, padding) in shapes {
            let g = Geometry::new(
                (batch, c_in, h, w),
                (c_out, c_in, kernel, kernel),
                stride,
                padding,
            )
            .unwrap();
            let x = random(batch * g.in_len());
            let k = random(c_out * g.patch_len());
            // The smallest budget that still blocks: the kernel's own size.
            let budget = c_out * g.patch_len() * std::mem::size_of::<f32>();
            let blocks = g.forward_row_blocks::<f32>(budget).count();
            assert!(blocks > 1, "{g:?} was not split");
            assert_eq!(g.forward_row_blocks::<f32>(usize::MAX).count(), 1);
            let whole = im2col_forward(&g, &x, &k, usize::MAX);
            let blocked = im2col_forward(&g, &x, &k, budget);
            let differing = whole
                .iter()
                .zip(&blocked)
                .filter(|(a, b)| a.to_bits() != b.to_bits())
                .count();
            assert_eq!(differing, 0, "{g:?} in {blocks} blocks");
        }
    }
}
