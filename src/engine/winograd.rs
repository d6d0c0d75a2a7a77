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
    let mut out = vec![T::zero(); s.batch * s.c_out * s.h * s.w];
    for (image, out) in x
        .chunks_exact(s.c_in * s.h * s.w)
        .zip(out.chunks_exact_mut(s.c_out * s.h * s.w))
    {
        for first_row in (0..tiles_h).step_by(rows_per_block) {
            let rows = first_row..(first_row + rows_per_block).min(tiles_h);
            let tiles = rows.len() * tiles_w;
            let v = transform_tiles(s, image, rows.clone(), tiles);
            // m[c_out][ξ][tile] = Σ_c u[c_out][c][ξ] · v[c][ξ][tile], one GEMM per ξ.
            let mut m = vec![T::zero(); s.c_out * 16 * tiles];
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
            untransform(s, &m, rows, tiles, out);
        }
    }
    out
}

/// `G g Gᵀ` of every 3×3 kernel, as `u[c_out][c_in][16]`.
fn transform_kernels<T: Real>(s: Shape3x3, kernel: &[T]) -> Vec<T> {
    let half = T::from_f64(0.5);
    let mut u = vec![T::zero(); s.c_out * s.c_in * 16];
    for (g, u) in kernel.chunks_exact(9).zip(u.chunks_exact_mut(16)) {
        // G g: 4×3, G = [1 0 0; ½ ½ ½; ½ −½ ½; 0 0 1].
        let mut gg = [[T::zero(); 3]; 4];
        for j in 0..3 {
            let (a, b, c) = (g[j], g[3 + j], g[6 + j]);
            gg[0][j] = a;
            gg[1][j] = (a + b + c) * half;
            gg[2][j] = (a - b + c) * half;
            gg[3][j] = c;
        }
        for (i, row) in gg.iter().enumerate() {
            let [a, b, c] = *row;
            u[i * 4] = a;
            u[i * 4 + 1] = (a + b + c) * half;
            u[i * 4 + 2] = (a - b + c) * half;
            u[i * 4 + 3] = c;
        }
    }
    u
}

/// The (tile row, tile column) of every tile in tile rows `rows`, in block order.
fn tile_positions(
    rows: std::ops::Range<usize>,
    tiles_w: usize,
) -> impl Iterator<Item = (usize, usize)> {
    rows.flat_map(move |ty| (0..tiles_w).map(move |tx| (ty, tx)))
}

/// `Bᵀ d B` of the 4×4 input tiles (zero outside the image) of tile rows `rows`, as
/// `v[c_in][16][tile]`, channels in parallel.
fn transform_tiles<T: Real>(
    s: Shape3x3,
    image: &[T],
    rows: std::ops::Range<usize>,
    tiles: usize,
) -> Vec<T> {
    let tiles_w = s.w.div_ceil(2);
    let mut v = vec![T::zero(); s.c_in * 16 * tiles];
    v.par_chunks_mut(16 * tiles)
        .zip(image.par_chunks(s.h * s.w))
        .for_each(|(v, channel)| {
            let at = |y: isize, x: isize| {
                if y < 0 || x < 0 || y >= s.h as isize || x >= s.w as isize {
                    T::zero()
                } else {
                    channel[y as usize * s.w + x as usize]
                }
            };
            for (t, (ty, tx)) in tile_positions(rows.clone(), tiles_w).enumerate() {
                let (y0, x0) = (2 * ty as isize - 1, 2 * tx as isize - 1);
                let inside = y0 >= 0 && x0 >= 0 && y0 + 4 <= s.h as isize && x0 + 4 <= s.w as isize;
                let d: [[T; 4]; 4] = if inside {
                    // Most tiles: four plain row reads, no padding checks.
                    let start = y0 as usize * s.w + x0 as usize;
                    std::array::from_fn(|i| {
                        let row = &channel[start + i * s.w..][..4];
                        [row[0], row[1], row[2], row[3]]
                    })
                } else {
                    std::array::from_fn(|i| {
                        std::array::from_fn(|j| at(y0 + i as isize, x0 + j as isize))
                    })
                };
                // Bᵀ = [1 0 −1 0; 0 1 1 0; 0 −1 1 0; 0 1 0 −1], on the rows then the columns.
                let mut bd = [[T::zero(); 4]; 4];
                for j in 0..4 {
                    bd[0][j] = d[0][j] - d[2][j];
                    bd[1][j] = d[1][j] + d[2][j];
                    bd[2][j] = d[2][j] - d[1][j];
                    bd[3][j] = d[1][j] - d[3][j];
                }
                for (i, row) in bd.iter().enumerate() {
                    let [a, b, c, e] = *row;
                    v[(i * 4) * tiles + t] = a - c;
                    v[(i * 4 + 1) * tiles + t] = b + c;
                    v[(i * 4 + 2) * tiles + t] = c - b;
                    v[(i * 4 + 3) * tiles + t] = b - e;
                }
            }
        });
    v
}

/// `Aᵀ m A` of every tile into its 2×2 output block, output channels in parallel.
fn untransform<T: Real>(
    s: Shape3x3,
    m: &[T],
    rows: std::ops::Range<usize>,
    tiles: usize,
    out: &mut [T],
) {
    let tiles_w = s.w.div_ceil(2);
    out.par_chunks_mut(s.h * s.w)
        .zip(m.par_chunks(16 * tiles))
        .for_each(|(out, m)| {
            for (t, (ty, tx)) in tile_positions(rows.clone(), tiles_w).enumerate() {
                let e = |i: usize| m[i * tiles + t];
                // Aᵀ = [1 1 1 0; 0 1 −1 −1], on the rows then the columns.
                let am = [
                    std::array::from_fn::<T, 4, _>(|j| e(j) + e(4 + j) + e(8 + j)),
                    std::array::from_fn::<T, 4, _>(|j| e(4 + j) - e(8 + j) - e(12 + j)),
                ];
                for (i, row) in am.iter().enumerate() {
                    let y = 2 * ty + i;
                    if y >= s.h {
                        continue;
                    }
                    let [a, b, c, d] = *row;
                    let pair = [a + b + c, b - c - d];
                    for (j, &value) in pair.iter().enumerate() {
                        let x = 2 * tx + j;
                        if x < s.w {
                            out[y * s.w + x] = value;
                        }
                    }
                }
            }
        });
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
            w: 2 * TILES_PER_BLOCK / 3 + 1,
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
