//! Scaled dot-product attention over pre-projected `q` [B, Lq, H·d], `k` / `v` [B, Lk, H·d].
//!
//! On the CPU in f32 / f64 one fused op computes it a block of query rows at a time: a block's
//! scores stay in the cache, and the backward pass recomputes them instead of keeping them, so
//! memory is O(L·C) rather than O(H·L²) per layer (a 64×64-latent SD step keeps several GiB of
//! scores otherwise). Heads are read and written in place in the [B, L, H·d] layout, so no
//! transposed copies are made either. Other devices and dtypes compose candle ops, in row
//! chunks that bound the score matrix.

use candle_core::{D, Device, Result, Tensor};

use super::{compute_dtype, softmax_last_dim};
use crate::engine::kernels;
use crate::engine::kernels::attention::FusedAttention;

/// Attention of `q` over `k` / `v` with `heads` heads; `causal` hides later keys from each
/// query (CLIP's text encoder).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, causal: bool) -> Result<Tensor> {
    if kernels::supports(q.device(), q.dtype()) {
        let op = FusedAttention { heads, causal };
        q.contiguous()?
            .apply_op3(&k.contiguous()?, &v.contiguous()?, op)
    } else {
        chunked_attention(q, k, v, heads, causal, MAX_SCORE_BYTES)
    }
}

/// Largest score matrix one call of the composed (non-CPU) attention materialises; longer
/// queries are processed in row chunks.
const MAX_SCORE_BYTES: usize = 256 << 20;

/// Attention from candle ops, for devices and dtypes without the fused op. Scores and softmax
/// run in f32 for half-precision inputs (diffusers' `upcast_attention` and `upcast_softmax`).
pub(crate) fn chunked_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    causal: bool,
    max_score_bytes: usize,
) -> Result<Tensor> {
    let (b, lq, inner) = q.dims3()?;
    let lk = k.dim(1)?;
    let head_dim = inner / heads;
    let dtype = q.dtype();
    let work = compute_dtype(dtype);
    let split = |t: &Tensor, len: usize| -> Result<Tensor> {
        t.reshape((b, len, heads, head_dim))?
            .transpose(1, 2)?
            .reshape((b * heads, len, head_dim))?
            .to_dtype(work)
    };
    let q = split(q, lq)?;
    let k_t = split(k, lk)?.t()?;
    let v = split(v, lk)?;
    let mask = causal
        .then(|| causal_mask(lq, lk, q.device())?.to_dtype(work))
        .transpose()?;
    let scale = 1.0 / (head_dim as f64).sqrt();
    let row_bytes = b * heads * lk * work.size_in_bytes();
    let rows = (max_score_bytes / row_bytes.max(1)).clamp(1, lq);
    let chunks = (0..lq)
        .step_by(rows)
        .map(|start| {
            let len = rows.min(lq - start);
            let q_rows = if len == lq {
                q.clone()
            } else {
                q.narrow(1, start, len)?.contiguous()?
            };
            let mut scores = (q_rows.matmul(&k_t)? * scale)?;
            if let Some(mask) = &mask {
                scores = scores.broadcast_add(&mask.narrow(0, start, len)?)?;
            }
            softmax_last_dim(&scores)?.matmul(&v)
        })
        .collect::<Result<Vec<_>>>()?;
    let out = if chunks.len() == 1 {
        chunks.into_iter().next().expect("one chunk")
    } else {
        Tensor::cat(&chunks, D::Minus2)?
    };
    out.reshape((b, heads, lq, head_dim))?
        .transpose(1, 2)?
        .reshape((b, lq, inner))?
        .to_dtype(dtype)
}

/// Additive mask that hides later keys: 0 on and below the diagonal, −∞ above.
fn causal_mask(q_len: usize, kv_len: usize, device: &Device) -> Result<Tensor> {
    let values: Vec<f32> = (0..q_len)
        .flat_map(|i| (0..kv_len).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(values, (q_len, kv_len), device)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::diffusion::noise::NoiseStream;
    use crate::engine::kernels::test_support::{projected_grads, random, rel_diff};
    use candle_core::{DType, Var};

    /// The fused op and the composed one agree, values and gradients, causal or not, with
    /// several query blocks and a key length that is no multiple of the reduction lanes.
    #[test]
    fn fused_attention_matches_composed_ops() {
        let mut rng = NoiseStream::new(4);
        for (dtype, tolerance) in [(DType::F64, 1e-12), (DType::F32, 1e-5)] {
            for causal in [false, true] {
                let (b, lq, lk, heads, width) = (2, 300, if causal { 300 } else { 37 }, 3, 12);
                let q = Var::from_tensor(&random(&mut rng, (b, lq, width), dtype)).unwrap();
                let k = Var::from_tensor(&random(&mut rng, (b, lk, width), dtype)).unwrap();
                let v = Var::from_tensor(&random(&mut rng, (b, lk, width), dtype)).unwrap();
                let upstream = random(&mut rng, (b, lq, width), dtype);
                let run = |fused: bool| {
                    let (q, k, v) = (q.as_tensor(), k.as_tensor(), v.as_tensor());
                    let out = if fused {
                        attention(q, k, v, heads, causal).unwrap()
                    } else {
                        chunked_attention(q, k, v, heads, causal, 1 << 12).unwrap()
                    };
                    let grads = projected_grads(&out, &upstream);
                    let g = |t: &Tensor| grads.get(t).unwrap().clone();
                    [out, g(q), g(k), g(v)]
                };
                let (fused, composed) = (run(true), run(false));
                for (what, (f, c)) in ["output", "dq", "dk", "dv"]
                    .iter()
                    .zip(fused.iter().zip(&composed))
                {
                    let diff = rel_diff(f, c);
                    assert!(
                        diff < tolerance,
                        "{dtype:?} causal {causal}: {what} differs by {diff:e}"
                    );
                }
            }
        }
    }
}
