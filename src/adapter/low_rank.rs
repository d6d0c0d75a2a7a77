//! The best rank-k approximation of a matrix, `A ≈ up · down`, by a randomised truncated SVD
//! (Halko, Martinsson & Tropp's range finder with power iterations). It folds the Safe Adapter's
//! full-rank delta into a LoRA export.

use candle_core::{DType, Device, Result, Tensor};
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};

/// Extra sampled directions beyond the rank, and power iterations: with these the error is
/// within rounding of the optimum for the spectra adapters have (tested against known spectra).
const OVERSAMPLING: usize = 10;
const POWER_ITERATIONS: usize = 4;

/// `(up [m, k], down [k, n])` with `up · down` the best rank-`k` approximation of `a` [m, n] (in
/// Frobenius norm), each factor carrying the square root of the singular values. Computed in f64
/// and returned in `a`'s dtype; deterministic for a given `seed`.
pub fn truncated(a: &Tensor, k: usize, seed: u64) -> Result<(Tensor, Tensor)> {
    let dtype = a.dtype();
    let a = a.to_dtype(DType::F64)?;
    let (m, n) = a.dims2()?;
    let k = k.min(m).min(n);
    let l = (k + OVERSAMPLING).min(m).min(n);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let omega: Vec<f64> = (0..n * l)
        .map(|_| StandardNormal.sample(&mut rng))
        .collect();
    let omega = Tensor::from_vec(omega, (n, l), a.device())?;
    // An orthonormal basis of A's dominant column space.
    let mut q = orthonormal_columns(&a.matmul(&omega)?)?;
    for _ in 0..POWER_ITERATIONS {
        let z = orthonormal_columns(&a.t()?.matmul(&q)?)?;
        q = orthonormal_columns(&a.matmul(&z)?)?;
    }
    // A ≈ Q B with B small: B Bᵀ = W Σ² Wᵀ gives A ≈ (Q W) Σ Vᵀ, Vᵀ = Σ⁻¹ Wᵀ B.
    let b = q.t()?.matmul(&a)?;
    let (eigenvalues, w) = symmetric_eigen(&b.matmul(&b.t()?)?)?;
    let mut order: Vec<usize> = (0..l).collect();
    order.sort_by(|&i, &j| eigenvalues[j].total_cmp(&eigenvalues[i]));
    let top: Vec<usize> = order.into_iter().take(k).collect();
    let sigma: Vec<f64> = top
        .iter()
        .map(|&i| eigenvalues[i].max(0.0).sqrt())
        .collect();
    let pick = Tensor::new(
        top.iter().map(|&i| i as u32).collect::<Vec<_>>(),
        a.device(),
    )?;
    let w_k = w.index_select(&pick, 1)?;
    let u = q.matmul(&w_k)?;
    let root = |p: f64| -> Result<Tensor> {
        let s: Vec<f64> = sigma
            .iter()
            .map(|&s| if s > 0.0 { s.powf(p) } else { 0.0 })
            .collect();
        Tensor::new(s, a.device())
    };
    // up = U Σ^½; down = Σ^½ Vᵀ = Σ^-½ Wᵀ B.
    let up = u.broadcast_mul(&root(0.5)?.unsqueeze(0)?)?;
    let down = root(-0.5)?
        .unsqueeze(1)?
        .broadcast_mul(&w_k.t()?.matmul(&b)?)?;
    Ok((up.to_dtype(dtype)?, down.to_dtype(dtype)?))
}

/// The columns of `y` [m, l] made orthonormal (Gram–Schmidt, twice for stability); a column
/// that depends on the others becomes zero.
fn orthonormal_columns(y: &Tensor) -> Result<Tensor> {
    let (m, l) = y.dims2()?;
    let rows: Vec<Vec<f64>> = y.to_vec2()?;
    let mut cols: Vec<Vec<f64>> = (0..l)
        .map(|j| rows.iter().map(|r| r[j]).collect())
        .collect();
    let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    let scale = cols.iter().map(|c| dot(c, c)).fold(0.0, f64::max).sqrt();
    for j in 0..l {
        for _ in 0..2 {
            for i in 0..j {
                let (done, rest) = cols.split_at_mut(j);
                let p = dot(&done[i], &rest[0]);
                for (x, q) in rest[0].iter_mut().zip(&done[i]) {
                    *x -= p * q;
                }
            }
        }
        let norm = dot(&cols[j], &cols[j]).sqrt();
        let keep = norm > 1e-12 * scale.max(f64::MIN_POSITIVE);
        for x in &mut cols[j] {
            *x = if keep { *x / norm } else { 0.0 };
        }
    }
    let flat: Vec<f64> = (0..m)
        .flat_map(|i| cols.iter().map(move |c| c[i]))
        .collect();
    Tensor::from_vec(flat, (m, l), &Device::Cpu)?.to_device(y.device())
}

/// Eigenvalues and eigenvectors (as columns) of the small symmetric matrix `s`, by cyclic
/// Jacobi rotations.
fn symmetric_eigen(s: &Tensor) -> Result<(Vec<f64>, Tensor)> {
    let n = s.dim(0)?;
    let mut a: Vec<Vec<f64>> = s.to_vec2()?;
    let mut v: Vec<Vec<f64>> = (0..n)
        .map(|i| (0..n).map(|j| f64::from(u8::from(i == j))).collect())
        .collect();
    for _sweep in 0..100 {
        let off: f64 = (0..n)
            .flat_map(|i| (0..n).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| a[i][j] * a[i][j])
            .sum();
        let diag: f64 = (0..n).map(|i| a[i][i] * a[i][i]).sum();
        if off <= 1e-30 * diag.max(f64::MIN_POSITIVE) {
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                if a[p][q] == 0.0 {
                    continue;
                }
                let theta = (a[q][q] - a[p][p]) / (2.0 * a[p][q]);
                // The smaller root of t² + 2θt − 1 = 0 (signum(0) is 1, so θ = 0 gives t = 1).
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let c = 1.0 / (t * t + 1.0).sqrt();
                let sn = t * c;
                for row in a.iter_mut() {
                    let (x, y) = (row[p], row[q]);
                    row[p] = c * x - sn * y;
                    row[q] = sn * x + c * y;
                }
                let (upper, lower) = a.split_at_mut(q);
                for (x, y) in upper[p].iter_mut().zip(lower[0].iter_mut()) {
                    (*x, *y) = (c * *x - sn * *y, sn * *x + c * *y);
                }
                for row in v.iter_mut() {
                    let (x, y) = (row[p], row[q]);
                    row[p] = c * x - sn * y;
                    row[q] = sn * x + c * y;
                }
            }
        }
    }
    let eigenvalues = (0..n).map(|i| a[i][i]).collect();
    let flat: Vec<f64> = v.into_iter().flatten().collect();
    Ok((
        eigenvalues,
        Tensor::from_vec(flat, (n, n), &Device::Cpu)?.to_device(s.device())?,
    ))
}
