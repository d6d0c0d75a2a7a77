//! Winograd F(2×2, 3×3): a 3×3, stride-1, padding-1 convolution with 4 multiplies per output
//! pixel and channel pair instead of 9 (Lavin & Gray, 2015). Each 2×2 block of outputs is
//! computed from a 4×4 input tile: the tiles and the kernels are transformed, multiplied
//! element-wise over the 16 tile positions — 16 GEMMs over the channels — and transformed
//! back. Used for the forward pass on large maps (a VAE decoder's top layers), where the
//! im2col GEMM is the whole cost; its result differs from im2col's by rounding only.

use gemm::Parallelism;
use rayon::prelude::*;

use super::cpu_kernels::{Real, matmul_into_rows};

/// Tile rows per block: the transformed tiles of a block stay in cache between the GEMMs.
const TILES_PER_BLOCK: usize = 2048;

/// The sizes of one convolution: input `[batch, c_in, h, w]`, kernel `[c_out, c_in, 3, 3]`.
#[derive(Debug, Clone, Copy)]
pub struct Shape3x3 {
    pub batch: usize,
    pub c_in: usize,
    pub h: usize,
    pub w: usize,
    pub c_out: usize,
}

/// The output `[batch, c_out, h, w]` of the convolution of `x` with `kernel` (no bias).
pub fn conv3x3<T: Real>(s: Shape3x3, x: &[T], kernel: &[T], parallelism: Parallelism) -> Vec<T> {
    let u = transform_kernels(s, kernel);
    let (tiles_h, tiles_w) = (s.h.div_ceil(2), s.w.div_ceil(2));
    let rows_per_block = TILES_PER_BLOCK.div_ceil(tiles_w).max(1);
    let block_tiles = rows_per_block.min(tiles_h) * tiles_w;
    let mut out = vec![T::zero(); s.batch * s.c_out * s.h * s.w];
    // Every block overwrites the part of these it uses, so they are allocated once.
    let mut v_buffer = vec![T::zero(); s.c_in * 16 * block_tiles];
    let mut m_buffer = vec![T::zero(); s.c_out * 16 * block_tiles];
    for (image, out) in x
        .chunks_exact(s.c_in * s.h * s.w)
        .zip(out.chunks_exact_mut(s.c_out * s.h * s.w))
    {
        for first_row in (0..tiles_h).step_by(rows_per_block) {
            let rows = first_row..(first_row + rows_per_block).min(tiles_h);
            let tiles = rows.len() * tiles_w;
            let v = &mut v_buffer[..s.c_in * 16 * tiles];
            transform_tiles(s, image, rows.clone(), v);
            // m[c_out][ξ][tile] = Σ_c u[c_out][c][ξ] · v[c][ξ][tile], one GEMM per ξ.
            let m = &mut m_buffer[..s.c_out * 16 * tiles];
            for xi in 0..16 {
                unsafe {
                    matmul_into_rows(
                        (s.c_out, tiles, s.c_in),
                        (m.as_mut_ptr().add(xi * tiles), 16 * tiles),
                        false,
                        (u.as_ptr().add(xi), s.c_in * 16, 16),
                        (v.as_ptr().add(xi * tiles), 16 * tiles, 1),
                        parallelism,
                    )
                }
            }
            untransform(s, m, rows, out);
        }
    }
    out
}

/// `G g Gᵀ` of every 3×3 kernel, as `u[c_out][c_in][16]`.
fn transform_kernels<T: Real>(s: Shape3x3, kernel: &[T]) -> Vec<T> {
    // G = [1 0 0; ½ ½ ½; ½ −½ ½; 0 0 1] applied to three values.
    let half = T::from_f64(0.5);
    let g_times = |a: T, b: T, c: T| [a, (a + b + c) * half, (a - b + c) * half, c];
    let mut u = vec![T::zero(); s.c_out * s.c_in * 16];
    for (g, u) in kernel.chunks_exact(9).zip(u.chunks_exact_mut(16)) {
        // G g, 4×3: G applied to each column of g.
        let columns: [[T; 4]; 3] = std::array::from_fn(|j| g_times(g[j], g[3 + j], g[6 + j]));
        // (G g) Gᵀ: G applied to each row of G g.
        for (i, row) in u.chunks_exact_mut(4).enumerate() {
            row.copy_from_slice(&g_times(columns[0][i], columns[1][i], columns[2][i]));
        }
    }
    u
}

/// `Bᵀ d B` of the 4×4 input tiles (zero outside the image) of tile rows `rows` into
/// `v[c_in][16][tile]`, channels in parallel.
fn transform_tiles<T: Real>(s: Shape3x3, image: &[T], rows: std::ops::Range<usize>, v: &mut [T]) {
    let tiles = v.len() / (16 * s.c_in);
    v.par_chunks_mut(16 * tiles)
        .zip(image.par_chunks(s.h * s.w))
        .for_each(|(v, channel)| {
            pulp::Arch::new().dispatch(InputTransform {
                s,
                channel,
                rows: rows.clone(),
                v,
            })
        });
}

/// One channel's input transform, a whole tile row at a time so that every step runs along
/// contiguous slices (compiled for the best instruction set the CPU has).
struct InputTransform<'a, T> {
    s: Shape3x3,
    channel: &'a [T],
    rows: std::ops::Range<usize>,
    /// `[16][tiles]` of this channel.
    v: &'a mut [T],
}

impl<T: Real> pulp::WithSimd for InputTransform<'_, T> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) {
        let Self {
            s,
            channel,
            rows,
            v,
        } = self;
        let tiles_w = s.w.div_ceil(2);
        let tiles = v.len() / 16;
        let lane = tiles_w + 1;
        // The 4 input rows of a tile row, their columns split by parity: `even[r][k]` is
        // column 2k − 1 and `odd[r][k]` column 2k, so tile k spans even[k], odd[k], even[k+1],
        // odd[k+1]; zero outside the image.
        let (mut even, mut odd) = (vec![T::zero(); 4 * lane], vec![T::zero(); 4 * lane]);
        // Bᵀ d on those rows, per parity.
        let (mut b_even, mut b_odd) = (vec![T::zero(); 4 * lane], vec![T::zero(); 4 * lane]);
        for (block_row, ty) in rows.enumerate() {
            for (r, (even, odd)) in even
                .chunks_exact_mut(lane)
                .zip(odd.chunks_exact_mut(lane))
                .enumerate()
            {
                let y = (2 * ty + r).checked_sub(1).filter(|&y| y < s.h);
                split_columns(y.map(|y| &channel[y * s.w..][..s.w]), even, odd);
            }
            // Bᵀ = [1 0 −1 0; 0 1 1 0; 0 −1 1 0; 0 1 0 −1].
            for (d, bd) in [(&even, &mut b_even), (&odd, &mut b_odd)] {
                let [d0, d1, d2, d3] = four_rows(d, lane, 0, lane);
                let [b0, b1, b2, b3] = four_rows_mut(bd, lane, 0, lane);
                let ins = d0.iter().zip(d1).zip(d2).zip(d3);
                let outs = b0.iter_mut().zip(b1.iter_mut()).zip(b2.iter_mut()).zip(b3);
                for ((((b0, b1), b2), b3), (((&d0, &d1), &d2), &d3)) in outs.zip(ins) {
                    *b0 = d0 - d2;
                    *b1 = d1 + d2;
                    *b2 = d2 - d1;
                    *b3 = d1 - d3;
                }
            }
            // (Bᵀ d) B along each row, written to the 16 positions' rows of `v`.
            let first_tile = block_row * tiles_w;
            for (i, positions) in v.chunks_exact_mut(4 * tiles).enumerate() {
                let (e0, e1) = (
                    &b_even[i * lane..][..tiles_w],
                    &b_even[i * lane + 1..][..tiles_w],
                );
                let (o0, o1) = (
                    &b_odd[i * lane..][..tiles_w],
                    &b_odd[i * lane + 1..][..tiles_w],
                );
                let [v0, v1, v2, v3] = four_rows_mut(positions, tiles, first_tile, tiles_w);
                let ins = e0.iter().zip(e1).zip(o0).zip(o1);
                let outs = v0.iter_mut().zip(v1.iter_mut()).zip(v2.iter_mut()).zip(v3);
                for ((((v0, v1), v2), v3), (((&e0, &e1), &o0), &o1)) in outs.zip(ins) {
                    *v0 = e0 - e1;
                    *v1 = o0 + e1;
                    *v2 = e1 - o0;
                    *v3 = o0 - o1;
                }
            }
        }
    }
}

/// Image row `row` (or zeros, above or below the image) split into `even[k]` = column 2k − 1
/// and `odd[k]` = column 2k, zero outside the image.
#[inline(always)]
fn split_columns<T: Real>(row: Option<&[T]>, even: &mut [T], odd: &mut [T]) {
    even.fill(T::zero());
    odd.fill(T::zero());
    let Some(row) = row else { return };
    let pairs = row.chunks_exact(2);
    if let [last] = pairs.remainder() {
        odd[row.len() / 2] = *last;
    }
    for ((pair, o), e) in pairs.zip(odd.iter_mut()).zip(&mut even[1..]) {
        *o = pair[0];
        *e = pair[1];
    }
}

/// `buf[r·stride + start..][..len]` for rows r = 0..4.
#[inline(always)]
fn four_rows<T>(buf: &[T], stride: usize, start: usize, len: usize) -> [&[T]; 4] {
    std::array::from_fn(|r| &buf[r * stride + start..][..len])
}

/// `buf[r·stride + start..][..len]` for rows r = 0..4, mutably.
#[inline(always)]
fn four_rows_mut<T>(buf: &mut [T], stride: usize, start: usize, len: usize) -> [&mut [T]; 4] {
    let mut rows = buf.chunks_exact_mut(stride).map(|r| &mut r[start..][..len]);
    std::array::from_fn(|_| rows.next().expect("four rows"))
}

/// `Aᵀ m A` of every tile into its 2×2 output block, output channels in parallel.
fn untransform<T: Real>(s: Shape3x3, m: &[T], rows: std::ops::Range<usize>, out: &mut [T]) {
    let tiles = m.len() / (16 * s.c_out);
    out.par_chunks_mut(s.h * s.w)
        .zip(m.par_chunks(16 * tiles))
        .for_each(|(out, m)| {
            pulp::Arch::new().dispatch(OutputTransform {
                s,
                m,
                rows: rows.clone(),
                out,
            })
        });
}

/// One output channel's transform back, a whole tile row at a time (compiled for the best
/// instruction set the CPU has).
struct OutputTransform<'a, T> {
    s: Shape3x3,
    /// `[16][tiles]` of this channel.
    m: &'a [T],
    rows: std::ops::Range<usize>,
    /// `[h][w]` of this channel.
    out: &'a mut [T],
}

impl<T: Real> pulp::WithSimd for OutputTransform<'_, T> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) {
        let Self { s, m, rows, out } = self;
        let tiles_w = s.w.div_ceil(2);
        let tiles = m.len() / 16;
        // Aᵀ m of a tile row, per column j of m: its first row in `top[j]`, its second in
        // `bottom[j]`.
        let (mut top, mut bottom) = (vec![T::zero(); 4 * tiles_w], vec![T::zero(); 4 * tiles_w]);
        for (block_row, ty) in rows.enumerate() {
            let e = |xi: usize| &m[xi * tiles + block_row * tiles_w..][..tiles_w];
            let columns = top
                .chunks_exact_mut(tiles_w)
                .zip(bottom.chunks_exact_mut(tiles_w));
            // Aᵀ = [1 1 1 0; 0 1 −1 −1].
            for (j, (top, bottom)) in columns.enumerate() {
                let rows = e(j).iter().zip(e(4 + j)).zip(e(8 + j)).zip(e(12 + j));
                for ((t, b), (((&m0, &m1), &m2), &m3)) in top.iter_mut().zip(bottom).zip(rows) {
                    *t = m0 + m1 + m2;
                    *b = m1 - m2 - m3;
                }
            }
            let y = 2 * ty;
            untransform_row(&top, tiles_w, &mut out[y * s.w..][..s.w]);
            if y + 1 < s.h {
                untransform_row(&bottom, tiles_w, &mut out[(y + 1) * s.w..][..s.w]);
            }
        }
    }
}

/// `(Aᵀ m) A` along one output row: `x` holds Aᵀ m's columns 0..4, `tiles_w` long each; tile k
/// writes columns 2k and 2k + 1 (as far as `row` reaches).
#[inline(always)]
fn untransform_row<T: Real>(x: &[T], tiles_w: usize, row: &mut [T]) {
    let [x0, x1, x2, x3] = four_rows(x, tiles_w, 0, tiles_w);
    let mut pairs = row.chunks_exact_mut(2);
    for (pair, (((&a, &b), &c), &d)) in (&mut pairs).zip(x0.iter().zip(x1).zip(x2).zip(x3)) {
        pair[0] = a + b + c;
        pair[1] = b - c - d;
    }
    if let [last] = pairs.into_remainder() {
        let k = tiles_w - 1;
        *last = x0[k] + x1[k] + x2[k];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The direct definition: `out[o][y][x] = Σ_{c,i,j} k[o][c][i][j] · x[c][y+i−1][x+j−1]`.
    fn direct(s: Shape3x3, x: &[f64], k: &[f64]) -> Vec<f64> {
        let mut out = vec![0.0; s.batch * s.c_out * s.h * s.w];
        for b in 0..s.batch {
            for o in 0..s.c_out {
                for y in 0..s.h {
                    for xx in 0..s.w {
                        let mut sum = 0.0;
                        for c in 0..s.c_in {
                            for i in 0..3 {
                                for j in 0..3 {
                                    let (yy, xj) = (y + i, xx + j);
                                    if yy == 0 || xj == 0 || yy > s.h || xj > s.w {
                                        continue;
                                    }
                                    let input = x[((b * s.c_in + c) * s.h + yy - 1) * s.w + xj - 1];
                                    sum += k[((o * s.c_in + c) * 3 + i) * 3 + j] * input;
                                }
                            }
                        }
                        out[((b * s.c_out + o) * s.h + y) * s.w + xx] = sum;
                    }
                }
            }
        }
        out
    }

    /// Winograd equals the direct convolution to rounding in f64 and to f32 precision in
    /// f32, on odd sides (partial tiles), several blocks of tile rows and a batch of two.
    #[test]
    fn winograd_matches_the_direct_convolution() {
        let s = Shape3x3 {
            batch: 2,
            c_in: 3,
            h: 9,
            w: 2 * TILES_PER_BLOCK / 3 + 2,
            c_out: 2,
        };
        let mut state = 0x2545_f491_u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 11) as f64 / (1u64 << 53) as f64 - 0.5
        };
        let x: Vec<f64> = (0..s.batch * s.c_in * s.h * s.w).map(|_| next()).collect();
        let k: Vec<f64> = (0..s.c_out * s.c_in * 9).map(|_| next()).collect();
        let reference = direct(s, &x, &k);
        let relative = |got: &[f64]| {
            let err: f64 = got
                .iter()
                .zip(&reference)
                .map(|(a, b)| (a - b).powi(2))
                .sum();
            let norm: f64 = reference.iter().map(|b| b * b).sum();
            (err / norm).sqrt()
        };
        let wide = conv3x3(s, &x, &k, Parallelism::None);
        assert!(relative(&wide) < 1e-14, "f64: {:e}", relative(&wide));
        let (x32, k32): (Vec<f32>, Vec<f32>) = (
            x.iter().map(|&v| v as f32).collect(),
            k.iter().map(|&v| v as f32).collect(),
        );
        let narrow: Vec<f64> = conv3x3(s, &x32, &k32, Parallelism::None)
            .into_iter()
            .map(f64::from)
            .collect();
        assert!(relative(&narrow) < 1e-6, "f32: {:e}", relative(&narrow));
    }
}
