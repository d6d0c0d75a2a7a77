//! Winograd F(2×2, 3×3): a 3×3, stride-1, padding-1 convolution with 4 multiplies per output
//! pixel and channel pair instead of 9 (Lavin & Gray, 2015). Each 2×2 block of outputs is
//! computed from a 4×4 input tile: the tiles and the kernels are transformed, multiplied
//! element-wise over the 16 tile positions — 16 GEMMs over the channels — and transformed
//! back. Used on large maps (a VAE decoder's top layers, the SD UNet's 32×32 and 64×64 levels)
//! for the forward pass and the input gradient, where the im2col GEMM is the whole cost; its
//! result differs from im2col's by rounding only.

use gemm::Parallelism;
use rayon::prelude::*;

use super::Real;
use super::matmul::{MatRef, matmul_into_rows};

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
    let u = transform_kernels(s.c_out, s.c_in, kernel);
    let plane = s.c_out * s.c_in;
    // Position ξ's kernels as a `[c_out × c_in]` matrix: its plane, row-major.
    convolve(
        s,
        x,
        |xi| (u[xi * plane..].as_ptr(), s.c_in, 1),
        parallelism,
    )
}

/// The input gradient `[batch, c_in, h, w]` of [`conv3x3`] from the output gradient `dy`
/// `[batch, c_out, h, w]`: the convolution of `dy` with the kernels flipped and with input and
/// output channels swapped. Flipping a kernel swaps the first and last rows and columns of its
/// transform (`G J = P G`, `P` exchanging rows 0 and 3), so the same transformed kernels serve,
/// read transposed from the mirrored position.
pub fn conv3x3_input_grad<T: Real>(
    s: Shape3x3,
    dy: &[T],
    kernel: &[T],
    parallelism: Parallelism,
) -> Vec<T> {
    let u = transform_kernels(s.c_out, s.c_in, kernel);
    let plane = s.c_out * s.c_in;
    let mirror = |i: usize| [3, 1, 2, 0][i];
    let transposed = Shape3x3 {
        c_in: s.c_out,
        c_out: s.c_in,
        ..s
    };
    convolve(
        transposed,
        dy,
        |xi| {
            let flipped = 4 * mirror(xi / 4) + mirror(xi % 4);
            (u[flipped * plane..].as_ptr(), 1, s.c_in)
        },
        parallelism,
    )
}

/// The convolution of `x` with the transformed kernels whose position-`ξ` matrix
/// `[c_out × c_in]` is `kernels(ξ)`.
fn convolve<T: Real>(
    s: Shape3x3,
    x: &[T],
    kernels: impl Fn(usize) -> MatRef<T>,
    parallelism: Parallelism,
) -> Vec<T> {
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
            // m[c_out][ξ][tile] = Σ_c u_ξ[c_out][c] · v[c][ξ][tile], one GEMM per ξ.
            let m = &mut m_buffer[..s.c_out * 16 * tiles];
            for xi in 0..16 {
                unsafe {
                    matmul_into_rows(
                        (s.c_out, tiles, s.c_in),
                        (m.as_mut_ptr().add(xi * tiles), 16 * tiles),
                        false,
                        kernels(xi),
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

/// Output channels per task of the kernel transform.
const KERNEL_ROWS_PER_TASK: usize = 16;

/// Kernels transformed together, their values spread into one slice per kernel position so
/// that the transform runs along contiguous slices.
const KERNELS_PER_STEP: usize = 64;

/// `G g Gᵀ` of every 3×3 kernel of `kernel` `[c_out][c_in][3][3]`, as `u[16][c_out][c_in]`:
/// one row-major matrix per tile position, the layout gemm packs fastest (a third faster
/// than the kernels' own order on 640 channels).
fn transform_kernels<T: Real>(c_out: usize, c_in: usize, kernel: &[T]) -> Vec<T> {
    let plane = c_out * c_in;
    let chunk = KERNEL_ROWS_PER_TASK * c_in;
    let mut u = vec![T::zero(); 16 * plane];
    // Each task writes the same rows of all 16 planes.
    let mut tasks: Vec<Vec<&mut [T]>> = (0..c_out.div_ceil(KERNEL_ROWS_PER_TASK))
        .map(|_| Vec::with_capacity(16))
        .collect();
    for plane in u.chunks_exact_mut(plane) {
        for (task, rows) in tasks.iter_mut().zip(plane.chunks_mut(chunk)) {
            task.push(rows);
        }
    }
    tasks
        .into_par_iter()
        .zip(kernel.par_chunks(9 * chunk))
        .for_each(|(planes, kernels)| {
            pulp::Arch::new().dispatch(KernelTransform { kernels, planes })
        });
    u
}

/// The transform of consecutive kernels `[n][3][3]` into 16 slices of `n`, one per position
/// (compiled for the best instruction set the CPU has).
struct KernelTransform<'a, T> {
    kernels: &'a [T],
    planes: Vec<&'a mut [T]>,
}

impl<T: Real> pulp::WithSimd for KernelTransform<'_, T> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) {
        let Self {
            kernels,
            mut planes,
        } = self;
        let half = T::from_f64(0.5);
        // G = [1 0 0; ½ ½ ½; ½ −½ ½; 0 0 1] applied to three slices, into four.
        let g_times = |[a, b, c]: [&[T]; 3], [o0, o1, o2, o3]: [&mut [T]; 4]| {
            let ins = a.iter().zip(b).zip(c);
            let outs = o0.iter_mut().zip(o1.iter_mut()).zip(o2.iter_mut()).zip(o3);
            for ((((o0, o1), o2), o3), ((&a, &b), &c)) in outs.zip(ins) {
                *o0 = a;
                *o1 = (a + b + c) * half;
                *o2 = (a - b + c) * half;
                *o3 = c;
            }
        };
        let n = KERNELS_PER_STEP;
        // g[p][k]: value p of kernel k; gg[3i + j][k]: row i, column j of G g.
        let (mut g, mut gg) = (vec![T::zero(); 9 * n], vec![T::zero(); 12 * n]);
        for (step, block) in kernels.chunks(9 * n).enumerate() {
            let len = block.len() / 9;
            for (k, values) in block.chunks_exact(9).enumerate() {
                for (p, &value) in values.iter().enumerate() {
                    g[p * n + k] = value;
                }
            }
            let g_at = |p: usize| &g[p * n..][..len];
            // G g: G applied to each column j of g (its values j, 3 + j and 6 + j), into
            // column j of G g.
            for j in 0..3 {
                let mut rows = gg
                    .chunks_exact_mut(n)
                    .skip(j)
                    .step_by(3)
                    .map(|r| &mut r[..len]);
                let out = std::array::from_fn(|_| rows.next().expect("four rows"));
                g_times([g_at(j), g_at(3 + j), g_at(6 + j)], out);
            }
            // (G g) Gᵀ: G applied to each row i of G g, into positions 4i..4i + 4.
            let first = step * n;
            for i in 0..4 {
                let row = |j: usize| &gg[(3 * i + j) * n..][..len];
                let mut outs = planes[4 * i..4 * i + 4]
                    .iter_mut()
                    .map(|p| &mut p[first..first + len]);
                let out = std::array::from_fn(|_| outs.next().expect("four positions"));
                g_times([row(0), row(1), row(2)], out);
            }
        }
    }
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

    /// The kernels of the convolution that carries the output gradient back to the input:
    /// flipped, input and output channels swapped.
    fn flipped_transposed(s: Shape3x3, k: &[f64]) -> Vec<f64> {
        let mut flipped = vec![0.0; k.len()];
        for o in 0..s.c_out {
            for c in 0..s.c_in {
                for p in 0..9 {
                    flipped[(c * s.c_out + o) * 9 + 8 - p] = k[(o * s.c_in + c) * 9 + p];
                }
            }
        }
        flipped
    }

    /// Uniform values in [−½, ½) from a fixed xorshift stream.
    fn values(len: usize, seed: u64) -> Vec<f64> {
        let mut state = seed;
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 11) as f64 / (1u64 << 53) as f64 - 0.5
            })
            .collect()
    }

    fn relative_error(got: &[f64], reference: &[f64]) -> f64 {
        let err: f64 = got
            .iter()
            .zip(reference)
            .map(|(a, b)| (a - b).powi(2))
            .sum();
        let norm: f64 = reference.iter().map(|b| b * b).sum();
        (err / norm).sqrt()
    }

    fn to_f32(v: &[f64]) -> Vec<f32> {
        v.iter().map(|&v| v as f32).collect()
    }

    fn to_f64(v: Vec<f32>) -> Vec<f64> {
        v.into_iter().map(f64::from).collect()
    }

    /// Odd sides (partial tiles), several blocks of tile rows, a batch of two, and different
    /// input and output channel counts.
    const SHAPE: Shape3x3 = Shape3x3 {
        batch: 2,
        c_in: 3,
        h: 9,
        w: 2 * TILES_PER_BLOCK / 3 + 2,
        c_out: 2,
    };

    /// The transform in blocks of kernels equals `G g Gᵀ` written out for each kernel, on
    /// counts that leave partial blocks and a shorter last task.
    #[test]
    fn kernel_transform_matches_its_definition() {
        let (c_out, c_in) = (20, 9);
        let k = values(c_out * c_in * 9, 0x9e37_79b9);
        let u = transform_kernels(c_out, c_in, &k);
        let g = [
            [1.0, 0.0, 0.0],
            [0.5, 0.5, 0.5],
            [0.5, -0.5, 0.5],
            [0.0, 0.0, 1.0],
        ];
        for (index, kernel) in k.chunks_exact(9).enumerate() {
            for (i, j) in (0..4).flat_map(|i| (0..4).map(move |j| (i, j))) {
                let mut expected = 0.0;
                for (a, b) in (0..3).flat_map(|a| (0..3).map(move |b| (a, b))) {
                    expected += g[i][a] * kernel[3 * a + b] * g[j][b];
                }
                let got = u[(4 * i + j) * c_out * c_in + index];
                assert!((got - expected).abs() < 1e-15, "kernel {index} ({i}, {j})");
            }
        }
    }

    /// Winograd equals the direct convolution to rounding in f64 and to f32 precision in
    /// f32.
    #[test]
    fn winograd_matches_the_direct_convolution() {
        let s = SHAPE;
        let x = values(s.batch * s.c_in * s.h * s.w, 0x2545_f491);
        let k = values(s.c_out * s.c_in * 9, 0x9e37_79b9);
        let reference = direct(s, &x, &k);
        let wide = conv3x3(s, &x, &k, Parallelism::None);
        assert!(relative_error(&wide, &reference) < 1e-14);
        let narrow = to_f64(conv3x3(s, &to_f32(&x), &to_f32(&k), Parallelism::None));
        let err = relative_error(&narrow, &reference);
        assert!(err < 1e-6, "f32: {err:e}");
    }

    /// The input gradient equals the direct convolution of the output gradient with the
    /// flipped, transposed kernels, to rounding in f64 and f32 precision in f32.
    #[test]
    fn winograd_input_gradient_matches_the_transposed_convolution() {
        let s = SHAPE;
        let dy = values(s.batch * s.c_out * s.h * s.w, 0x2545_f491);
        let k = values(s.c_out * s.c_in * 9, 0x9e37_79b9);
        let transposed = Shape3x3 {
            c_in: s.c_out,
            c_out: s.c_in,
            ..s
        };
        let reference = direct(transposed, &dy, &flipped_transposed(s, &k));
        let wide = conv3x3_input_grad(s, &dy, &k, Parallelism::None);
        assert!(relative_error(&wide, &reference) < 1e-14);
        let narrow = to_f64(conv3x3_input_grad(
            s,
            &to_f32(&dy),
            &to_f32(&k),
            Parallelism::None,
        ));
        let err = relative_error(&narrow, &reference);
        assert!(err < 1e-6, "f32: {err:e}");
    }

    /// `Σ r · conv(x)` against central differences along x, at a few inputs including
    /// the borders and the partial last tile: the input gradient is that sum's gradient.
    #[test]
    fn winograd_input_gradient_matches_finite_differences() {
        let s = Shape3x3 {
            batch: 1,
            c_in: 2,
            h: 5,
            w: 7,
            c_out: 3,
        };
        let x = values(s.c_in * s.h * s.w, 0x2545_f491);
        let k = values(s.c_out * s.c_in * 9, 0x9e37_79b9);
        let r = values(s.c_out * s.h * s.w, 0x1234_5678);
        let loss = |x: &[f64]| -> f64 {
            let y = conv3x3(s, x, &k, Parallelism::None);
            y.iter().zip(&r).map(|(a, b)| a * b).sum()
        };
        let grad = conv3x3_input_grad(s, &r, &k, Parallelism::None);
        let h = 1e-4;
        for i in [0, 6, 17, 34, 35, 52, 69] {
            let (mut plus, mut minus) = (x.clone(), x.clone());
            plus[i] += h;
            minus[i] -= h;
            let numeric = (loss(&plus) - loss(&minus)) / (2.0 * h);
            assert!(
                (numeric - grad[i]).abs() < 1e-9,
                "input {i}: analytic {} numeric {numeric}",
                grad[i]
            );
        }
    }
}
