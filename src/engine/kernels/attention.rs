//! The fused attention op on the CPU (f32 / f64): a block of query rows at a time, scores kept
//! in the cache and recomputed in the backward pass, heads read in place in the [B, L, H·d]
//! layout. `nn::attention` decides when it runs.

use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Result, Shape, Tensor, bail};
use gemm::Parallelism;
use rayon::prelude::*;

use super::matmul::{inner_parallelism, matmul};
use super::packed_gemm::{Kernels, NR, Packable};
use super::{LANES, Real, SharedMut, contiguous, with_cpu_slice, with_floats};

/// The sizes of one attention call.
#[derive(Debug, Clone, Copy)]
struct Dims {
    batch: usize,
    q_len: usize,
    kv_len: usize,
    heads: usize,
    head_dim: usize,
    causal: bool,
}

impl Dims {
    fn new(q: &Shape, k: &Shape, v: &Shape, heads: usize, causal: bool) -> Result<Self> {
        let (batch, q_len, width) = q.dims3()?;
        let (kb, kv_len, kw) = k.dims3()?;
        if (kb, kw) != (batch, width) || v.dims3()? != (kb, kv_len, kw) {
            bail!("attention: q {q:?}, k {k:?} and v {v:?} do not fit together");
        }
        if heads == 0 || width % heads != 0 {
            bail!("attention: a width of {width} cannot be split into {heads} heads");
        }
        Ok(Self {
            batch,
            q_len,
            kv_len,
            heads,
            head_dim: width / heads,
            causal,
        })
    }

    fn width(&self) -> usize {
        self.heads * self.head_dim
    }

    fn scale(&self) -> f64 {
        1.0 / (self.head_dim as f64).sqrt()
    }

    /// Query rows per block: a block's scores take about 2 MiB of f32. Each block's products
    /// repack the head's keys and values, so blocks must be tall enough to pay for that: at 16
    /// rows (4096 keys, SD at 512 px) the repacking cost about 40 % of the attention's time.
    /// The block size does not change the results: each query row is computed on its own.
    fn block_rows(&self) -> usize {
        ((1 << 19) / self.kv_len.max(1))
            .clamp(16, 256)
            .min(self.q_len.max(1))
    }

    /// Offset of head `h`'s first element in image `b` of a [B, L, H·d] tensor.
    fn head_offset(&self, b: usize, len: usize, h: usize) -> usize {
        b * len * self.width() + h * self.head_dim
    }
}

pub(crate) struct FusedAttention {
    pub(crate) heads: usize,
    pub(crate) causal: bool,
}

impl CustomOp3 for FusedAttention {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dims = Dims::new(l1.shape(), l2.shape(), l3.shape(), self.heads, self.causal)?;
        let out = with_floats!((s1, s2, s3), |q, k, v| forward(
            &dims,
            contiguous(q, l1)?,
            contiguous(k, l2)?,
            contiguous(v, l3)?
        ));
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dims = Dims::new(q.shape(), k.shape(), v.shape(), self.heads, self.causal)?;
        let grad = grad.contiguous()?;
        let (dq, dk, dv) = match q.dtype() {
            DType::F32 => backward_tensors::<f32>(&dims, q, k, v, &grad)?,
            DType::F64 => backward_tensors::<f64>(&dims, q, k, v, &grad)?,
            other => bail!("fused attention has no {other:?} backward"),
        };
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

/// [`softmax_rows`] compiled for the best instruction set the CPU has (a closure would not be
/// inlined into pulp's target-feature function, and would run as baseline SSE2 code).
struct Softmax<'a, T> {
    scores: &'a mut [T],
    cols: usize,
    scale: T,
    first_row: usize,
    causal: bool,
}

impl<T: Real> pulp::WithSimd for Softmax<'_, T> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) {
        softmax_rows(
            self.scores,
            self.cols,
            self.scale,
            self.first_row,
            self.causal,
        )
    }
}

/// [`softmax_grad_rows`] compiled for the best instruction set the CPU has.
struct SoftmaxGrad<'a, T> {
    probs: &'a [T],
    dprobs: &'a mut [T],
    cols: usize,
    scale: T,
}

impl<T: Real> pulp::WithSimd for SoftmaxGrad<'_, T> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) {
        softmax_grad_rows(self.probs, self.dprobs, self.cols, self.scale)
    }
}

/// Turns each row of `scores` (`cols` wide) into softmax(scale · row) in place, the first row
/// being query `first_row` (for the causal mask); returns nothing, rows sum to one.
#[inline(always)]
fn softmax_rows<T: Real>(scores: &mut [T], cols: usize, scale: T, first_row: usize, causal: bool) {
    for (i, row) in scores.chunks_exact_mut(cols).enumerate() {
        let visible = if causal {
            (first_row + i + 1).min(cols)
        } else {
            cols
        };
        let (row, hidden) = row.split_at_mut(visible);
        hidden.fill(T::zero());
        let max = row_max(row);
        let mut lanes = [T::zero(); LANES];
        let mut chunks = row.chunks_exact_mut(LANES);
        for chunk in &mut chunks {
            for (x, lane) in chunk.iter_mut().zip(&mut lanes) {
                *x = T::exp_nonpositive((*x - max) * scale);
                *lane += *x;
            }
        }
        let mut sum = lanes.iter().fold(T::zero(), |a, &b| a + b);
        for x in chunks.into_remainder() {
            *x = T::exp_nonpositive((*x - max) * scale);
            sum += *x;
        }
        let inv = T::one() / sum;
        for x in row.iter_mut() {
            *x *= inv;
        }
    }
}

#[inline(always)]
fn row_max<T: Real>(row: &[T]) -> T {
    let mut lanes = [T::neg_infinity(); LANES];
    let mut chunks = row.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (&x, lane) in chunk.iter().zip(&mut lanes) {
            *lane = if x > *lane { x } else { *lane };
        }
    }
    let tail = chunks.remainder().iter();
    lanes
        .iter()
        .chain(tail)
        .fold(T::neg_infinity(), |a, &b| if b > a { b } else { a })
}

/// `scores[rows × Lk] = softmax(scale · Q_block · K_hᵀ)` for the `rows` queries from `first`.
///
/// # Safety
/// `q` and `k` must hold the [B, L, H·d] tensors `dims` describes.
#[allow(clippy::too_many_arguments)]
unsafe fn block_probabilities<T: Real>(
    dims: &Dims,
    (q, k): (&[T], &[T]),
    (b, h): (usize, usize),
    (first, rows): (usize, usize),
    scores: &mut Vec<T>,
    par: Parallelism,
) {
    let (c, d, lk) = (dims.width(), dims.head_dim, dims.kv_len);
    scores.resize(rows * lk, T::zero());
    let q_block = q[dims.head_offset(b, dims.q_len, h) + first * c..].as_ptr();
    let k_head = k[dims.head_offset(b, lk, h)..].as_ptr();
    unsafe {
        matmul(
            (rows, lk, d),
            scores.as_mut_ptr(),
            false,
            (q_block, c, 1),
            (k_head, 1, c),
            par,
        );
    }
    let scale = T::from_f64(dims.scale());
    pulp::Arch::new().dispatch(Softmax {
        scores,
        cols: lk,
        scale,
        first_row: first,
        causal: dims.causal,
    });
}

/// The attention output [B, Lq, H·d]: by [`forward_tiled`] where there are microkernels for
/// `T`, else by [`forward_gemm`].
fn forward<T: Real + Packable>(dims: &Dims, q: &[T], k: &[T], v: &[T]) -> Vec<T> {
    match T::kernels() {
        Some(kernels) => forward_tiled(dims, kernels, q, k, v),
        None => forward_gemm(dims, q, k, v),
    }
}

/// The forward pass one tile of queries at a time, with the queries on the microkernels'
/// vector lanes throughout: the tile's scores are computed transposed, `Sᵀ = K_h · Q_tileᵀ`
/// (`[Lk][tile]`), so that the softmax runs down the columns with no horizontal reductions,
/// and `O_tile = P · V_h` reads `Sᵀ` as it lies. Each head's keys and values are packed once
/// for the microkernels' broadcast side and shared by all its tiles, where `gemm` would repack
/// them for every block of queries (a sixth of the time at 4096 tokens). The softmax is
/// normalised at the end, on the output rows.
fn forward_tiled<T: Real + Packable>(
    dims: &Dims,
    kernels: &Kernels<T>,
    q: &[T],
    k: &[T],
    v: &[T],
) -> Vec<T> {
    let (c, d, lk) = (dims.width(), dims.head_dim, dims.kv_len);
    let tile = kernels.rows();
    let heads: Vec<PackedHead<T>> = (0..dims.batch * dims.heads)
        .into_par_iter()
        .map(|bh| {
            let base = dims.head_offset(bh / dims.heads, lk, bh % dims.heads);
            PackedHead::new(&k[base..], &v[base..], (lk, d, c))
        })
        .collect();
    let mut out = vec![T::zero(); dims.batch * dims.q_len * c];
    let blocks = dims.q_len.div_ceil(tile);
    let dst = SharedMut(out.as_mut_ptr());
    let scale = T::from_f64(dims.scale());
    (0..heads.len() * blocks).into_par_iter().for_each_init(
        || TileScratch::new(tile, d, lk),
        |scratch, task| {
            let (bh, block) = (task / blocks, task % blocks);
            let head = &heads[bh];
            let first = block * tile;
            let rows = tile.min(dims.q_len - first);
            let q_base = dims.head_offset(bh / dims.heads, dims.q_len, bh % dims.heads) + first * c;
            // Qᵀ of the tile, `[d][tile]`.
            for (r, query) in q[q_base..].chunks(c).take(rows).enumerate() {
                for (i, &value) in query[..d].iter().enumerate() {
                    scratch.queries[i * tile + r] = value;
                }
            }
            for (group, key) in (0..lk).step_by(NR).enumerate() {
                // SAFETY: `scores` holds lk × tile elements, `queries` d × tile, the group's
                // keys d × NR.
                unsafe {
                    kernels.tile(
                        (rows, NR.min(lk - key), d),
                        (scratch.scores[key * tile..].as_mut_ptr(), tile),
                        (scratch.queries.as_ptr(), tile),
                        (head.keys(group).as_ptr(), NR, 1),
                        false,
                    );
                }
            }
            pulp::Arch::new().dispatch(ColumnSoftmax {
                scores: &mut scratch.scores,
                sums: &mut scratch.sums,
                tile,
                scale,
                first_query: first,
                causal: dims.causal,
            });
            for key in (0..lk).step_by(KEYS_PER_STEP) {
                let keys = KEYS_PER_STEP.min(lk - key);
                for (group, col) in (0..d).step_by(NR).enumerate() {
                    // SAFETY: `output` holds d × tile elements, `scores` lk × tile, the
                    // group's values lk × NR.
                    unsafe {
                        kernels.tile(
                            (rows, NR.min(d - col), keys),
                            (scratch.output[col * tile..].as_mut_ptr(), tile),
                            (scratch.scores[key * tile..].as_ptr(), tile),
                            (head.values(group)[key * NR..].as_ptr(), NR, 1),
                            key > 0,
                        );
                    }
                }
            }
            for r in 0..rows {
                let inv = T::one() / scratch.sums[r];
                // SAFETY: each task writes its own rows of its own head.
                let row = unsafe { std::slice::from_raw_parts_mut(dst.at(q_base + r * c), d) };
                for (i, o) in row.iter_mut().enumerate() {
                    *o = scratch.output[i * tile + r] * inv;
                }
            }
        },
    );
    out
}

/// Keys per microkernel call of `P · V`: a step's scores (`[keys][tile]`) stay in L1 while
/// the calls for every group of output columns read them.
const KEYS_PER_STEP: usize = 128;

/// One head's keys and values in the order the microkernels broadcast them: groups of `NR`
/// keys, each `[d][NR]`, and groups of `NR` value columns, each `[Lk][NR]` (the last group of
/// each padded with zeros).
struct PackedHead<T> {
    keys: Vec<T>,
    values: Vec<T>,
    lk: usize,
    d: usize,
}

impl<T: Real> PackedHead<T> {
    /// From the head's `lk` rows of keys and values, `d` wide and `stride` apart.
    fn new(k: &[T], v: &[T], (lk, d, stride): (usize, usize, usize)) -> Self {
        let mut keys = vec![T::zero(); lk.div_ceil(NR) * NR * d];
        let mut values = vec![T::zero(); d.div_ceil(NR) * NR * lk];
        for key in 0..lk {
            let (k_row, v_row) = (&k[key * stride..][..d], &v[key * stride..][..d]);
            let group = &mut keys[key / NR * NR * d..][..NR * d];
            for (i, &value) in k_row.iter().enumerate() {
                group[i * NR + key % NR] = value;
            }
            for (i, &value) in v_row.iter().enumerate() {
                values[(i / NR * lk + key) * NR + i % NR] = value;
            }
        }
        Self {
            keys,
            values,
            lk,
            d,
        }
    }

    /// Key group `g`, `[d][NR]`.
    fn keys(&self, g: usize) -> &[T] {
        &self.keys[g * NR * self.d..][..NR * self.d]
    }

    /// Value column group `g`, `[Lk][NR]`.
    fn values(&self, g: usize) -> &[T] {
        &self.values[g * NR * self.lk..][..NR * self.lk]
    }
}

/// One task's buffers for [`forward_tiled`].
struct TileScratch<T> {
    /// Qᵀ, `[d][tile]`.
    queries: Vec<T>,
    /// Sᵀ, then the unnormalised probabilities, `[Lk][tile]`.
    scores: Vec<T>,
    /// Each query's sum of probabilities, `[tile]`.
    sums: Vec<T>,
    /// Oᵀ before normalisation, `[d][tile]`.
    output: Vec<T>,
}

impl<T: Real> TileScratch<T> {
    fn new(tile: usize, d: usize, lk: usize) -> Self {
        Self {
            queries: vec![T::zero(); d * tile],
            scores: vec![T::zero(); lk * tile],
            sums: vec![T::zero(); tile],
            output: vec![T::zero(); d * tile],
        }
    }
}

/// `e^(scale · (s − max))` down each column of `Sᵀ` (`[Lk][tile]`, one query per column), the
/// column sums into `sums`; keys a causal query may not see get 0.
struct ColumnSoftmax<'a, T> {
    scores: &'a mut [T],
    sums: &'a mut [T],
    tile: usize,
    scale: T,
    first_query: usize,
    causal: bool,
}

impl<T: Real> pulp::WithSimd for ColumnSoftmax<'_, T> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) {
        let Self {
            scores,
            sums,
            tile,
            scale,
            first_query,
            causal,
        } = self;
        // Key `key` is hidden from the tile's first `hidden(key)` queries (query
        // `first_query + r` sees keys up to itself when causal).
        let hidden = |key: usize| {
            if causal {
                key.saturating_sub(first_query).min(tile)
            } else {
                0
            }
        };
        let mut max = vec![T::neg_infinity(); tile];
        for (key, row) in scores.chunks_exact(tile).enumerate() {
            let from = hidden(key);
            for (m, &s) in max[from..].iter_mut().zip(&row[from..]) {
                *m = if s > *m { s } else { *m };
            }
        }
        sums.fill(T::zero());
        for (key, row) in scores.chunks_exact_mut(tile).enumerate() {
            let from = hidden(key);
            row[..from].fill(T::zero());
            let visible = row[from..]
                .iter_mut()
                .zip(&mut sums[from..])
                .zip(&max[from..]);
            for ((s, sum), &m) in visible {
                *s = T::exp_nonpositive((*s - m) * scale);
                *sum += *s;
            }
        }
    }
}

/// The forward pass with `gemm` for the products, a block of queries at a time (CPUs without
/// the microkernels [`forward_tiled`] drives).
fn forward_gemm<T: Real>(dims: &Dims, q: &[T], k: &[T], v: &[T]) -> Vec<T> {
    let (c, d, lk) = (dims.width(), dims.head_dim, dims.kv_len);
    let mut out = vec![T::zero(); dims.batch * dims.q_len * c];
    let rows = dims.block_rows();
    let blocks = dims.q_len.div_ceil(rows.max(1));
    let tasks = dims.batch * dims.heads * blocks;
    let par = inner_parallelism(tasks);
    let dst = SharedMut(out.as_mut_ptr());
    (0..tasks).into_par_iter().for_each_init(
        || (Vec::new(), vec![T::zero(); rows * d]),
        |(scores, block_out), task| {
            let (bh, block) = (task / blocks, task % blocks);
            let (b, h) = (bh / dims.heads, bh % dims.heads);
            let first = block * rows;
            let n = rows.min(dims.q_len - first);
            let v_head = v[dims.head_offset(b, lk, h)..].as_ptr();
            // SAFETY: the slices hold the tensors `dims` describes; each task writes its own
            // rows of its own head.
            unsafe {
                block_probabilities(dims, (q, k), (b, h), (first, n), scores, par);
                matmul(
                    (n, d, lk),
                    block_out.as_mut_ptr(),
                    false,
                    (scores.as_ptr(), lk, 1),
                    (v_head, c, 1),
                    par,
                );
                let base = dims.head_offset(b, dims.q_len, h) + first * c;
                for (i, row) in block_out[..n * d].chunks_exact(d).enumerate() {
                    let at = dst.at(base + i * c);
                    std::ptr::copy_nonoverlapping(row.as_ptr(), at, d);
                }
            }
        },
    );
    out
}

/// The gradients of q, k and v for the output gradient `dout`, each [B, L, H·d].
fn backward<T: Real>(dims: &Dims, q: &[T], k: &[T], v: &[T], dout: &[T]) -> [Vec<T>; 3] {
    let (c, d, lk) = (dims.width(), dims.head_dim, dims.kv_len);
    let mut dq = vec![T::zero(); q.len()];
    let mut dk = vec![T::zero(); k.len()];
    let mut dv = vec![T::zero(); v.len()];
    let rows = dims.block_rows();
    let tasks = dims.batch * dims.heads;
    let par = inner_parallelism(tasks);
    let (dq_at, dk_at, dv_at) = (
        SharedMut(dq.as_mut_ptr()),
        SharedMut(dk.as_mut_ptr()),
        SharedMut(dv.as_mut_ptr()),
    );
    let scale = T::from_f64(dims.scale());
    // One task per (image, head): it owns that head's columns of dq, dk and dv.
    (0..tasks).into_par_iter().for_each(|bh| {
        let (b, h) = (bh / dims.heads, bh % dims.heads);
        let (q_base, kv_base) = (
            dims.head_offset(b, dims.q_len, h),
            dims.head_offset(b, lk, h),
        );
        let (mut probs, mut dscores) = (Vec::new(), vec![T::zero(); rows * lk]);
        let mut dk_head = vec![T::zero(); lk * d];
        let mut dv_head = vec![T::zero(); lk * d];
        let mut dq_block = vec![T::zero(); rows * d];
        for first in (0..dims.q_len).step_by(rows) {
            let n = rows.min(dims.q_len - first);
            let q_block = q[q_base + first * c..].as_ptr();
            let dout_block = dout[q_base + first * c..].as_ptr();
            // SAFETY: the slices hold the tensors `dims` describes; this task writes only its
            // own head's columns.
            unsafe {
                block_probabilities(dims, (q, k), (b, h), (first, n), &mut probs, par);
                // dV_h += Pᵀ · dO
                matmul(
                    (lk, d, n),
                    dv_head.as_mut_ptr(),
                    true,
                    (probs.as_ptr(), 1, lk),
                    (dout_block, c, 1),
                    par,
                );
                // dP = dO · V_hᵀ
                matmul(
                    (n, lk, d),
                    dscores.as_mut_ptr(),
                    false,
                    (dout_block, c, 1),
                    (v[kv_base..].as_ptr(), 1, c),
                    par,
                );
                pulp::Arch::new().dispatch(SoftmaxGrad {
                    probs: &probs[..n * lk],
                    dprobs: &mut dscores[..n * lk],
                    cols: lk,
                    scale,
                });
                // dQ = dS · K_h
                matmul(
                    (n, d, lk),
                    dq_block.as_mut_ptr(),
                    false,
                    (dscores.as_ptr(), lk, 1),
                    (k[kv_base..].as_ptr(), c, 1),
                    par,
                );
                // dK_h += dSᵀ · Q
                matmul(
                    (lk, d, n),
                    dk_head.as_mut_ptr(),
                    true,
                    (dscores.as_ptr(), 1, lk),
                    (q_block, c, 1),
                    par,
                );
                for (i, row) in dq_block[..n * d].chunks_exact(d).enumerate() {
                    let at = dq_at.at(q_base + (first + i) * c);
                    std::ptr::copy_nonoverlapping(row.as_ptr(), at, d);
                }
            }
        }
        for (j, (dk_row, dv_row)) in dk_head
            .chunks_exact(d)
            .zip(dv_head.chunks_exact(d))
            .enumerate()
        {
            // SAFETY: as above.
            unsafe {
                let at = kv_base + j * c;
                std::ptr::copy_nonoverlapping(dk_row.as_ptr(), dk_at.at(at), d);
                std::ptr::copy_nonoverlapping(dv_row.as_ptr(), dv_at.at(at), d);
            }
        }
    });
    [dq, dk, dv]
}

/// `dS = P ⊙ (dP − rowsum(P ⊙ dP)) · scale`, in place of `dP`, row by row.
#[inline(always)]
fn softmax_grad_rows<T: Real>(probs: &[T], dprobs: &mut [T], cols: usize, scale: T) {
    for (p, dp) in probs.chunks_exact(cols).zip(dprobs.chunks_exact_mut(cols)) {
        let mut lanes = [T::zero(); LANES];
        let mut chunks = p.chunks_exact(LANES).zip(dp.chunks_exact(LANES));
        for (pc, dc) in &mut chunks {
            for ((&a, &b), lane) in pc.iter().zip(dc).zip(&mut lanes) {
                *lane += a * b;
            }
        }
        let done = cols / LANES * LANES;
        let mut dot = lanes.iter().fold(T::zero(), |a, &b| a + b);
        for (&a, &b) in p[done..].iter().zip(&dp[done..]) {
            dot += a * b;
        }
        for (&a, b) in p.iter().zip(dp.iter_mut()) {
            *b = a * (*b - dot) * scale;
        }
    }
}

fn backward_tensors<T: Real>(
    dims: &Dims,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    dout: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let [dq, dk, dv] = with_cpu_slice::<T, _>(q, |q| {
        with_cpu_slice::<T, _>(k, |k| {
            with_cpu_slice::<T, _>(v, |v| {
                with_cpu_slice::<T, _>(dout, |dout| Ok(backward(dims, q, k, v, dout)))
            })
        })
    })?;
    let cpu = &Device::Cpu;
    Ok((
        Tensor::from_vec(dq, q.shape(), cpu)?,
        Tensor::from_vec(dk, k.shape(), cpu)?,
        Tensor::from_vec(dv, v.shape(), cpu)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::diffusion::noise::NoiseStream;
    use crate::engine::kernels::test_support::{random, rel_diff};
    use crate::engine::nn::attention::chunked_attention;

    /// Both forward paths (the microkernel tiles and the `gemm` fallback for CPUs without
    /// them) agree with the composed ops, over ragged query tiles, key groups and column
    /// groups (head sizes below and above the microkernels' width), causal or not.
    #[test]
    fn both_forward_paths_match_composed_ops() {
        let mut rng = NoiseStream::new(9);
        for (b, lq, lk, heads, width) in [(2, 130, 77, 2, 8), (1, 70, 70, 3, 39)] {
            for causal in [false, true] {
                let lk = if causal { lq } else { lk };
                let q = random(&mut rng, (b, lq, width), DType::F64);
                let k = random(&mut rng, (b, lk, width), DType::F64);
                let v = random(&mut rng, (b, lk, width), DType::F64);
                let want = chunked_attention(&q, &k, &v, heads, causal, 1 << 12).unwrap();
                let dims = Dims::new(q.shape(), k.shape(), v.shape(), heads, causal).unwrap();
                let paths = with_cpu_slice::<f64, _>(&q, |q| {
                    with_cpu_slice::<f64, _>(&k, |k| {
                        with_cpu_slice::<f64, _>(&v, |v| {
                            let mut paths = vec![("gemm", forward_gemm(&dims, q, k, v))];
                            // The tiles need this CPU's microkernels (x86-64 with FMA).
                            if let Some(kernels) = f64::kernels() {
                                paths.push(("tiled", forward_tiled(&dims, kernels, q, k, v)));
                            }
                            Ok(paths)
                        })
                    })
                })
                .unwrap();
                for (path, out) in paths {
                    let out = Tensor::from_vec(out, q.shape(), &Device::Cpu).unwrap();
                    let diff = rel_diff(&out, &want);
                    assert!(
                        diff < 1e-12,
                        "{path}, causal {causal}, width {width}: {diff:e}"
                    );
                }
            }
        }
    }
}
