//! Products against a frozen weight packed once, at load, into the layout `gemm`'s
//! microkernels read: `gemm` packs its vector-side operand (a layer's weight) on every call,
//! and each thread again for the part it multiplies, which cost a short product (a text
//! encoder's 154 tokens) about a seventh of its time. Here the weight is kept packed and
//! `gemm`'s own microkernels are driven over it, so a sum is formed as `gemm` forms it (depth
//! blocks of `gemm`'s size, each summed in order from zero, then added to the output) for
//! every product outside `gemm`'s special cases (one row, a depth of 1 or 2, both sides at
//! most 64), which it sums otherwise.

use candle_core::WithDType;
use gemm::Parallelism;
use gemm_common::cache::kernel_params;
use gemm_common::microkernel::MicroKernelFn;
use rayon::prelude::*;
use std::sync::OnceLock;

use super::SharedMut;
use super::matmul::matmul_into_rows;

/// Columns per panel: a multiple of every microkernel's row count (64 for f32 with AVX-512,
/// 16 with AVX2; half that for f64).
const PANEL: usize = 64;

/// Tokens per microkernel call, the width of every x86 microkernel `gemm` has.
pub const NR: usize = 6;

/// Alignment of the panels: a full microkernel row is one cache line (or several), and a
/// load that straddles two lines costs two.
const ALIGN_BYTES: usize = 64;

/// A `[k × n]` row-major matrix (a frozen layer's `Wᵀ`, `[in, out]`) stored as it is read:
/// block by block of `depth` rows, and in each block panel by panel of `PANEL` columns,
/// `[k / depth][n / PANEL][depth][PANEL]` (the last block may be shorter, the last panel is
/// padded with zeros). A block's panels lie together, so a group of them streams through the
/// cache as one run.
pub struct PackedMatrix<T> {
    k: usize,
    n: usize,
    /// Rows per block: `gemm`'s depth block for this CPU's microkernels.
    depth: usize,
    /// The blocks start `start` elements in, on an `ALIGN_BYTES` boundary.
    storage: Vec<T>,
    start: usize,
}

impl<T: Packable> PackedMatrix<T> {
    /// Packs the row-major `[k × n]` matrix `src`.
    pub fn pack(src: &[T], k: usize, n: usize) -> Self {
        assert_eq!(src.len(), k * n, "a {k} × {n} matrix");
        // `gemm`'s depth block depends on `k` and the caches only (the other sizes need only
        // be non-zero).
        let depth = match T::kernels() {
            Some(kernels) if k > 0 && n > 0 => {
                kernel_params(n, n, k, kernels.rows(), NR, size_of::<T>()).kc
            }
            _ => k.max(1),
        };
        let padded = n.next_multiple_of(PANEL);
        let len = k * padded;
        let (mut storage, start) = aligned_zeros(len);
        let mut rest = &mut storage[start..start + len];
        for first_row in (0..k).step_by(depth) {
            let rows = depth.min(k - first_row);
            let (block, tail) = rest.split_at_mut(rows * padded);
            rest = tail;
            block
                .par_chunks_mut(rows * PANEL)
                .enumerate()
                .for_each(|(panel, dst)| {
                    let first = panel * PANEL;
                    let width = PANEL.min(n - first);
                    for (row, dst) in dst.chunks_exact_mut(PANEL).enumerate() {
                        let start = (first_row + row) * n + first;
                        dst[..width].copy_from_slice(&src[start..start + width]);
                    }
                });
        }
        Self {
            k,
            n,
            depth,
            storage,
            start,
        }
    }

    /// The matrix as it was given, row-major `[k × n]`.
    pub fn unpack(&self) -> Vec<T> {
        let mut out = vec![T::zero(); self.k * self.n];
        if self.n == 0 {
            return out;
        }
        for (row, dst) in out.chunks_exact_mut(self.n).enumerate() {
            for (panel, dst) in dst.chunks_mut(PANEL).enumerate() {
                let start = self.offset(row, panel * PANEL);
                dst.copy_from_slice(&self.data()[start..start + dst.len()]);
            }
        }
        out
    }

    /// `(k, n)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.k, self.n)
    }

    /// The blocks.
    fn data(&self) -> &[T] {
        &self.storage[self.start..]
    }

    /// Element `(row, col)`'s offset in `data`.
    fn offset(&self, row: usize, col: usize) -> usize {
        let (block, row) = (row / self.depth, row % self.depth);
        let first_row = block * self.depth;
        let rows = self.depth.min(self.k - first_row);
        first_row * self.n.next_multiple_of(PANEL)
            + ((col / PANEL) * rows + row) * PANEL
            + col % PANEL
    }
}

impl<T> std::fmt::Debug for PackedMatrix<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackedMatrix({} × {})", self.k, self.n)
    }
}

/// `len` zeros starting `start` elements into the vector, on an `ALIGN_BYTES` boundary.
fn aligned_zeros<T: WithDType>(len: usize) -> (Vec<T>, usize) {
    let slack = ALIGN_BYTES / size_of::<T>();
    let storage = vec![T::zero(); len + slack];
    // `align_offset` may decline to compute an offset; the panels then start unaligned.
    let start = Some(storage.as_ptr().align_offset(ALIGN_BYTES))
        .filter(|&offset| offset <= slack)
        .unwrap_or(0);
    (storage, start)
}

/// The element types `gemm` has microkernels for.
pub trait Packable: WithDType {
    /// This CPU's microkernels for the type, `None` where the products go through `gemm`'s own
    /// driver instead (CPUs other than x86-64, and x86-64 ones without FMA).
    fn kernels() -> Option<&'static Kernels<Self>>;
}

/// One ISA's microkernels for one type: `table[vectors - 1][cols - 1]` computes a tile of
/// `vectors × lanes` rows and `cols ≤ NR` columns.
pub struct Kernels<T: 'static> {
    /// Elements per vector register.
    lanes: usize,
    table: Vec<[MicroKernelFn<T>; NR]>,
}

impl<T: Packable> Kernels<T> {
    /// Rows per full tile.
    pub fn rows(&self) -> usize {
        self.lanes * self.table.len()
    }

    /// One microkernel call: `dst (+)= a · b` for a tile of `rows ≤ self.rows()` rows and
    /// `cols ≤ NR` columns, summed over `depth`. `a` holds the tile's rows side by side, one
    /// depth step every `a_step` elements; `b`'s element `(p, j)` (depth step, column) lies at
    /// `p · b_step + j · b_col`; `dst`'s element `(i, j)` at `i + j · dst_col`. Without
    /// `accumulate` the tile is overwritten.
    ///
    /// # Safety
    /// The pointers must cover the elements the strides describe.
    #[inline]
    pub unsafe fn tile(
        &self,
        (rows, cols, depth): (usize, usize, usize),
        (dst, dst_col): (*mut T, usize),
        (a, a_step): (*const T, usize),
        (b, b_step, b_col): (*const T, usize, usize),
        accumulate: bool,
    ) {
        let kernel = self.table[rows.div_ceil(self.lanes) - 1][cols - 1];
        // SAFETY: the caller's.
        unsafe {
            kernel(
                rows,
                cols,
                depth,
                dst,
                a,
                b,
                dst_col as isize,
                1,
                a_step as isize,
                b_step as isize,
                b_col as isize,
                T::one(),
                T::one(),
                u8::from(accumulate),
                false,
                false,
                false,
                std::ptr::null(),
            )
        }
    }
}

macro_rules! kernels_of {
    ($krate:ident, $ty:ident) => {{
        #[cfg(target_arch = "x86_64")]
        {
            use $krate::microkernel::{avx512f, fma};
            let table = |ukr: &[[MicroKernelFn<$ty>; NR]]| ukr.to_vec();
            if std::arch::is_x86_feature_detected!("avx512f") {
                Some(Kernels {
                    lanes: 64 / size_of::<$ty>(),
                    table: table(&avx512f::$ty::UKR),
                })
            } else if std::arch::is_x86_feature_detected!("fma") {
                Some(Kernels {
                    lanes: 32 / size_of::<$ty>(),
                    table: table(&fma::$ty::UKR),
                })
            } else {
                None
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            None
        }
    }};
}

impl Packable for f32 {
    fn kernels() -> Option<&'static Kernels<f32>> {
        static KERNELS: OnceLock<Option<Kernels<f32>>> = OnceLock::new();
        KERNELS.get_or_init(|| kernels_of!(gemm_f32, f32)).as_ref()
    }
}

impl Packable for f64 {
    fn kernels() -> Option<&'static Kernels<f64>> {
        static KERNELS: OnceLock<Option<Kernels<f64>>> = OnceLock::new();
        KERNELS.get_or_init(|| kernels_of!(gemm_f64, f64)).as_ref()
    }
}

/// Where a product's vector-side operand comes from, one depth block of a run of panels at a
/// time.
enum PanelSource<'a, T> {
    /// The packed matrix as it is: its blocks are the panels.
    Packed(&'a PackedMatrix<T>),
    /// The same, copied first (tasks that would otherwise all read the same panels).
    Copied(&'a PackedMatrix<T>),
    /// The packed matrix transposed, `[n × k]`, in depth blocks of `depth`: each block
    /// gathered from the panels.
    Transposed {
        w: &'a PackedMatrix<T>,
        depth: usize,
    },
}

impl<T: Packable> PanelSource<'_, T> {
    /// Rows per depth block.
    fn depth_block(&self) -> usize {
        match self {
            Self::Packed(w) | Self::Copied(w) => w.depth,
            Self::Transposed { depth, .. } => *depth,
        }
    }

    /// Whether [`PanelSource::block`] writes into its scratch.
    fn writes_scratch(&self) -> bool {
        !matches!(self, Self::Packed(_))
    }

    /// Panels `panels` of the depth block starting at `first_row` (`depth` rows), each
    /// `[depth][PANEL]`, one after the other: borrowed where they lie that way already,
    /// else written into `scratch`.
    fn block<'s>(
        &'s self,
        first_row: usize,
        depth: usize,
        panels: std::ops::Range<usize>,
        scratch: &'s mut [T],
    ) -> &'s [T] {
        let w = match self {
            Self::Packed(w) | Self::Copied(w) => w,
            Self::Transposed { w, .. } => {
                return transposed_block(w, first_row, depth, panels, scratch);
            }
        };
        let start = w.offset(first_row, panels.start * PANEL);
        let block = &w.data()[start..][..panels.len() * depth * PANEL];
        if matches!(self, Self::Packed(_)) {
            return block;
        }
        let copy = &mut scratch[..block.len()];
        copy.copy_from_slice(block);
        copy
    }
}

/// [`PanelSource::block`] of `w` transposed, gathered into `scratch`.
fn transposed_block<'s, T: Packable>(
    w: &PackedMatrix<T>,
    first_row: usize,
    depth: usize,
    panels: std::ops::Range<usize>,
    scratch: &'s mut [T],
) -> &'s [T] {
    // Row `first_row + r` of the transpose is column `first_row + r` of `w`; its panel
    // columns are rows of `w`, each a contiguous run of `w`'s packed panel. Runs of up to
    // PANEL rows at a time, so that the part of `dst` being written stays in L1.
    let (k, _) = w.dims();
    let block = &mut scratch[..panels.len() * depth * PANEL];
    for (local, panel) in panels.enumerate() {
        let dst = &mut block[local * depth * PANEL..][..depth * PANEL];
        let mut r = 0;
        while r < depth {
            let w_col = first_row + r;
            let run = (PANEL - w_col % PANEL).min(depth - r);
            let dst = &mut dst[r * PANEL..][..run * PANEL];
            for col in 0..PANEL {
                let w_row = panel * PANEL + col;
                if w_row >= k {
                    dst[col..]
                        .iter_mut()
                        .step_by(PANEL)
                        .for_each(|v| *v = T::zero());
                    continue;
                }
                let src = &w.data()[w.offset(w_row, w_col)..][..run];
                for (dst, &v) in dst[col..].iter_mut().step_by(PANEL).zip(src) {
                    *dst = v;
                }
            }
            r += run;
        }
    }
    block
}

/// `dst[rows × n] = x[rows × k] · w (+ bias)`, `x` and `dst` row-major and contiguous, on all
/// of rayon's threads. A product with fewer rows than columns splits its panels between the
/// threads, a longer one its rows; each element's sum is the same either way. The bias (`n`
/// values, one per column) is added to each tile as its last depth block is written, while the
/// tile is in L1: the same sums as adding it afterwards, without another pass over `dst`.
///
/// # Safety
/// `x` must hold `rows × k` elements and `dst` `rows × n`.
pub unsafe fn product<T: Packable>(
    w: &PackedMatrix<T>,
    rows: usize,
    x: *const T,
    dst: *mut T,
    bias: Option<&[T]>,
) {
    let (k, n) = w.dims();
    assert!(bias.is_none_or(|b| b.len() == n), "one bias per column");
    let Some(kernels) = T::kernels() else {
        return unsafe { product_unpacked(w, rows, x, (dst, bias), false) };
    };
    // Tasks that share panels read them from a copy of their own: measured 4-20 % faster on
    // the UNet's 8192-row products than all threads reading the one packed weight.
    let (shared, copied) = (PanelSource::Packed(w), PanelSource::Copied(w));
    unsafe { drive(kernels, (rows, n, k), x, (dst, bias), &shared, &copied) }
}

/// `dst += add`, element by element.
fn add_to<T: WithDType>(dst: &mut [T], add: &[T]) {
    for (d, &a) in dst.iter_mut().zip(add) {
        *d += a;
    }
}

/// `dst[rows × k] = x[rows × n] · wᵀ` (a frozen layer's input gradient), as [`product`].
///
/// # Safety
/// `x` must hold `rows × n` elements and `dst` `rows × k`.
pub unsafe fn product_transposed<T: Packable>(
    w: &PackedMatrix<T>,
    rows: usize,
    x: *const T,
    dst: *mut T,
) {
    let (k, n) = w.dims();
    let Some(kernels) = T::kernels() else {
        return unsafe { product_unpacked(w, rows, x, (dst, None), true) };
    };
    let depth = if n == 0 {
        1
    } else {
        kernel_params(k, rows, n, kernels.rows(), NR, size_of::<T>()).kc
    };
    let source = PanelSource::Transposed { w, depth };
    unsafe { drive(kernels, (rows, k, n), x, (dst, None), &source, &source) }
}

/// `dst[rows × m] = x[rows × k] · lhs[k × m] (+ bias[m])` with `gemm`'s microkernels, `lhs`
/// read from `shared` where each task has panels of its own and from `split` where tasks split
/// the rows.
unsafe fn drive<T: Packable>(
    kernels: &Kernels<T>,
    (rows, m, k): (usize, usize, usize),
    x: *const T,
    (dst, bias): (*mut T, Option<&[T]>),
    shared: &PanelSource<T>,
    split: &PanelSource<T>,
) {
    if rows == 0 || m == 0 {
        return;
    }
    if k == 0 {
        // SAFETY: `dst` holds rows × m elements.
        let dst = unsafe { std::slice::from_raw_parts_mut(dst, rows * m) };
        for row in dst.chunks_exact_mut(m) {
            match bias {
                Some(bias) => row.copy_from_slice(bias),
                None => row.fill(T::zero()),
            }
        }
        return;
    }
    let tile = kernels.rows();
    // Panels whose depth block stays in L2 while a tile of rows sweeps them.
    let group = kernel_params(m, rows, k, tile, NR, size_of::<T>())
        .mc
        .div_ceil(PANEL)
        .max(1);
    let panels = m.div_ceil(PANEL);
    let (x, dst) = (SharedMut(x.cast_mut()), SharedMut(dst));
    // One task: panels `p`, rows `r`.
    let task = |source: &PanelSource<T>, p: std::ops::Range<usize>, r: std::ops::Range<usize>| {
        let kc = source.depth_block();
        let scratch_len = if source.writes_scratch() {
            group * kc * PANEL
        } else {
            0
        };
        let (mut scratch, scratch_start) = aligned_zeros::<T>(scratch_len);
        let scratch = &mut scratch[scratch_start..];
        for first_row in (0..k).step_by(kc) {
            let depth = kc.min(k - first_row);
            let last_block = first_row + depth == k;
            for first_panel in p.clone().step_by(group) {
                let last_panel = (first_panel + group).min(p.end);
                let block = source.block(first_row, depth, first_panel..last_panel, scratch);
                for row in r.clone().step_by(NR) {
                    let cols = NR.min(r.end - row);
                    for panel in first_panel..last_panel {
                        let lhs = &block[(panel - first_panel) * depth * PANEL..];
                        for sub in (0..PANEL.min(m - panel * PANEL)).step_by(tile) {
                            let height = tile.min(m - panel * PANEL - sub);
                            let corner = row * m + panel * PANEL + sub;
                            // SAFETY: the tile lies in `dst`, its depth block in `x` and
                            // `lhs`; tasks write disjoint tiles.
                            unsafe {
                                kernels.tile(
                                    (height, cols, depth),
                                    (dst.at(corner), m),
                                    (lhs[sub..].as_ptr(), PANEL),
                                    (x.at(row * k + first_row), 1, k),
                                    first_row > 0,
                                )
                            };
                            if let (Some(bias), true) = (bias, last_block) {
                                let bias = &bias[panel * PANEL + sub..][..height];
                                for col in 0..cols {
                                    // SAFETY: the tile's rows, just written by this task.
                                    let out = unsafe {
                                        std::slice::from_raw_parts_mut(
                                            dst.at(corner + col * m),
                                            height,
                                        )
                                    };
                                    add_to(out, bias);
                                }
                            }
                        }
                    }
                }
            }
        }
    };
    let threads = rayon::current_num_threads();
    if threads == 1 {
        task(shared, 0..panels, 0..rows);
    } else if rows <= m {
        let per = panels.div_ceil(threads);
        (0..panels.div_ceil(per))
            .into_par_iter()
            .for_each(|t| task(shared, t * per..((t + 1) * per).min(panels), 0..rows));
    } else {
        let per = rows.div_ceil(threads).next_multiple_of(NR);
        (0..rows.div_ceil(per))
            .into_par_iter()
            .for_each(|t| task(split, 0..panels, t * per..((t + 1) * per).min(rows)));
    }
}

/// [`product`], or `transposed` [`product_transposed`], where there are no microkernels to
/// drive: `gemm` on the matrix unpacked (one pass over the weight per call, as `gemm`'s own
/// packing would make anyway), then the bias.
unsafe fn product_unpacked<T: Packable>(
    w: &PackedMatrix<T>,
    rows: usize,
    x: *const T,
    (dst, bias): (*mut T, Option<&[T]>),
    transposed: bool,
) {
    let (k, n) = w.dims();
    let full = w.unpack();
    let (inputs, outputs, rhs) = if transposed {
        (n, k, (full.as_ptr(), 1, n))
    } else {
        (k, n, (full.as_ptr(), n, 1))
    };
    // SAFETY: `x` holds rows × inputs elements, `dst` rows × outputs, `full` the matrix.
    unsafe {
        matmul_into_rows(
            (rows, outputs, inputs),
            (dst, outputs),
            false,
            (x, inputs, 1),
            rhs,
            Parallelism::Rayon(0),
        )
    }
    if let Some(bias) = bias {
        // SAFETY: `dst` holds rows × outputs elements, all written by the product.
        let dst = unsafe { std::slice::from_raw_parts_mut(dst, rows * outputs) };
        dst.chunks_exact_mut(outputs.max(1))
            .for_each(|row| add_to(row, bias));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::kernels::matmul::matmul;

    fn values(len: usize, seed: u64) -> Vec<f64> {
        let mut state = seed;
        (0..len)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                (state >> 11) as f64 / (1u64 << 53) as f64 - 0.5
            })
            .collect()
    }

    #[test]
    fn packing_keeps_every_element() {
        let (k, n) = (5, 130);
        let src = values(k * n, 1);
        let packed = PackedMatrix::pack(&src, k, n);
        assert_eq!(packed.unpack(), src);
        assert_eq!(packed.data()[packed.offset(3, 129)], src[3 * n + 129]);
        // A matrix with no columns (or rows) packs and unpacks to nothing.
        assert!(PackedMatrix::<f64>::pack(&[], 3, 0).unpack().is_empty());
        assert!(PackedMatrix::<f64>::pack(&[], 0, 3).unpack().is_empty());
    }

    /// Against `gemm` on the unpacked weight, bit for bit in f32 (the same microkernels, the
    /// same depth blocks; but for the smallest shape, which `gemm` sums by dot products),
    /// forward and transposed, on shapes with ragged panels, ragged row tiles,
    /// several depth blocks, and both the panel and the row split. The fallbacks for CPUs
    /// without the microkernels agree to rounding.
    #[test]
    fn products_match_gemm_bit_for_bit() {
        for &(rows, k, n) in &[
            (154, 700, 130),
            (13, 1100, 70),
            (300, 96, 70),
            (2, 40, 200),
            (90, 1300, 30),
            (7, 3, 5),
        ] {
            let exact = rows > 7;
            let x: Vec<f32> = values(rows * k, 2).iter().map(|&v| v as f32).collect();
            let g: Vec<f32> = values(rows * n, 4).iter().map(|&v| v as f32).collect();
            let w: Vec<f32> = values(k * n, 3).iter().map(|&v| v as f32).collect();
            let packed = PackedMatrix::pack(&w, k, n);
            let gemm = |(m, n, k), lhs: &[f32], rhs: (*const f32, usize, usize)| {
                let mut out = vec![0.0f32; m * n];
                unsafe {
                    matmul(
                        (m, n, k),
                        out.as_mut_ptr(),
                        false,
                        (lhs.as_ptr(), k, 1),
                        rhs,
                        Parallelism::None,
                    )
                };
                out
            };
            let forward = gemm((rows, n, k), &x, (w.as_ptr(), n, 1));
            // The bias added afterwards, as a separate pass would.
            let bias: Vec<f32> = values(n, 8).iter().map(|&v| v as f32).collect();
            let biased: Vec<f32> = forward
                .chunks_exact(n)
                .flat_map(|row| row.iter().zip(&bias).map(|(a, b)| a + b))
                .collect();
            let backward = gemm((rows, k, n), &g, (w.as_ptr(), 1, n));
            for threads in [1, 3] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                let run = |f: &(dyn Fn(*const f32, *mut f32) + Sync), input: &[f32], len| {
                    let mut out = vec![f32::NAN; len];
                    pool.install(|| f(input.as_ptr(), out.as_mut_ptr()));
                    out
                };
                let shape = format!("{rows} × {k} × {n}, {threads} threads");
                let close = |a: Vec<f32>, b: &[f32]| {
                    a.iter()
                        .zip(b)
                        .all(|(a, b)| (a - b).abs() <= 1e-4 * (1.0 + b.abs()))
                };
                let forward_with = |bias: Option<&[f32]>, x: *const f32, dst: *mut f32| unsafe {
                    product(&packed, rows, x, dst, bias)
                };
                let ours = [
                    run(&|x, dst| forward_with(None, x, dst), &x, rows * n),
                    run(&|x, dst| forward_with(Some(&bias), x, dst), &x, rows * n),
                ];
                let ours_transposed = run(
                    &|g, dst| unsafe { product_transposed(&packed, rows, g, dst) },
                    &g,
                    rows * k,
                );
                if exact {
                    assert_eq!(ours, [forward.clone(), biased.clone()], "{shape}");
                    assert_eq!(ours_transposed, backward, "{shape}");
                } else {
                    for (ours, want) in ours.into_iter().zip([&forward, &biased]) {
                        assert!(close(ours, want), "{shape}");
                    }
                    assert!(close(ours_transposed, &backward), "{shape}");
                }
                let unpacked = |transposed, bias: Option<&[f32]>, x: *const f32, dst| unsafe {
                    product_unpacked(&packed, rows, x, (dst, bias), transposed)
                };
                let fallbacks = [
                    (
                        run(&|x, d| unpacked(false, None, x, d), &x, rows * n),
                        &forward,
                    ),
                    (
                        run(&|x, d| unpacked(false, Some(&bias), x, d), &x, rows * n),
                        &biased,
                    ),
                    (
                        run(&|g, d| unpacked(true, None, g, d), &g, rows * k),
                        &backward,
                    ),
                ];
                for (ours, want) in fallbacks {
                    assert!(close(ours, want), "{shape}");
                }
            }
        }
    }

    /// In f64 (the gradient checks' type), every path against the definition, with one and
    /// three threads, on a short, a long, a one-element and a depth-less product; the forward
    /// paths with a bias.
    #[test]
    fn f64_products_match_the_definition() {
        for (rows, k, n) in [(5, 9, 70), (70, 9, 5), (1, 1, 1), (3, 0, 4)] {
            let x = values(rows * k, 5);
            let g = values(rows * n, 6);
            let w = values(k * n, 7);
            let bias = values(n, 8);
            let packed = PackedMatrix::pack(&w, k, n);
            let forward: Vec<f64> = (0..rows * n)
                .map(|i| {
                    bias[i % n]
                        + (0..k)
                            .map(|p| x[i / n * k + p] * w[p * n + i % n])
                            .sum::<f64>()
                })
                .collect();
            let backward: Vec<f64> = (0..rows * k)
                .map(|i| (0..n).map(|p| g[i / k * n + p] * w[i % k * n + p]).sum())
                .collect();
            let bias = Some(bias.as_slice());
            type Path<'a> = &'a (dyn Fn(*const f64, *mut f64) + Sync);
            let paths: [(Path, &[f64], &[f64]); 4] = [
                (
                    &|x, d| unsafe { product(&packed, rows, x, d, bias) },
                    &x,
                    &forward,
                ),
                (
                    &|x, d| unsafe { product_unpacked(&packed, rows, x, (d, bias), false) },
                    &x,
                    &forward,
                ),
                (
                    &|g, d| unsafe { product_transposed(&packed, rows, g, d) },
                    &g,
                    &backward,
                ),
                (
                    &|g, d| unsafe { product_unpacked(&packed, rows, g, (d, None), true) },
                    &g,
                    &backward,
                ),
            ];
            for threads in [1, 3] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                for (path, (f, input, want)) in paths.iter().enumerate() {
                    let mut out = vec![f64::NAN; want.len()];
                    pool.install(|| f(input.as_ptr(), out.as_mut_ptr()));
                    let worst = out
                        .iter()
                        .zip(want.iter())
                        .map(|(a, b)| (a - b).abs())
                        .fold(0.0, f64::max);
                    assert!(worst < 1e-12, "path {path}, {rows} × {k} × {n}: {worst}");
                }
            }
        }
    }
}
