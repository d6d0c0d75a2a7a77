//! Frozen linear layers on the CPU: the weight packed once for the GEMM's microkernels
//! (`packed_gemm`), and a product op whose backward gives the input's gradient only.
//! `nn::linear` decides which layers take it.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Result, Shape, Tensor, bail};

use super::packed_gemm::{Packable, PackedMatrix, product, product_transposed};
use super::{contiguous, with_cpu_slice};

#[derive(Debug)]
pub(crate) enum PackedWeight {
    F32(PackedMatrix<f32>),
    F64(PackedMatrix<f64>),
}

impl PackedWeight {
    /// Packs a frozen `[out, in]` CPU weight.
    pub(crate) fn pack(weight: &Tensor) -> Result<Self> {
        let (out_dim, in_dim) = weight.dims2()?;
        let transposed = weight.t()?.contiguous()?;
        Ok(match weight.dtype() {
            DType::F32 => Self::F32(with_cpu_slice(&transposed, |w| {
                Ok(PackedMatrix::pack(w, in_dim, out_dim))
            })?),
            DType::F64 => Self::F64(with_cpu_slice(&transposed, |w| {
                Ok(PackedMatrix::pack(w, in_dim, out_dim))
            })?),
            other => bail!("linear: a frozen {other:?} weight is not packed"),
        })
    }

    /// `(in, out)`.
    pub(crate) fn dims(&self) -> (usize, usize) {
        match self {
            Self::F32(w) => w.dims(),
            Self::F64(w) => w.dims(),
        }
    }

    /// The weight, `[out, in]` (a transposed view of `[in, out]` storage).
    pub(crate) fn tensor(&self) -> Result<Tensor> {
        let (in_dim, out_dim) = self.dims();
        let w = match self {
            Self::F32(w) => Tensor::from_vec(w.unpack(), (in_dim, out_dim), &Device::Cpu)?,
            Self::F64(w) => Tensor::from_vec(w.unpack(), (in_dim, out_dim), &Device::Cpu)?,
        };
        w.t()
    }
}

/// `x [n, in] → x · Wᵀ (+ b) [n, out]` against a packed frozen `Wᵀ` and an optional frozen
/// bias; its backward gives x's gradient only, as the same op `transposed` without a bias
/// (recorded without a backward of its own): `g [n, out] → g · W [n, in]`.
pub(crate) struct FrozenMatmul {
    pub(crate) weight: Arc<PackedWeight>,
    pub(crate) bias: Option<Tensor>,
    pub(crate) transposed: bool,
}

impl FrozenMatmul {
    fn run<T: Packable>(
        &self,
        w: &PackedMatrix<T>,
        x: &[T],
        layout: &Layout,
    ) -> Result<(Vec<T>, Shape)> {
        let x = contiguous(x, layout)?;
        let (rows, k) = layout.shape().dims2()?;
        let (w_in, w_out) = w.dims();
        let (k_expected, m) = if self.transposed {
            (w_out, w_in)
        } else {
            (w_in, w_out)
        };
        if k != k_expected {
            bail!("linear: the weight takes {k_expected} inputs, the input has {k}");
        }
        let mut y = Vec::with_capacity(rows * m);
        let mut write = |bias: Option<&[T]>| {
            if bias.is_some_and(|b| b.len() != m) {
                bail!(
                    "linear: a bias of {} values for {m} outputs",
                    bias.map_or(0, <[T]>::len)
                );
            }
            // SAFETY: `x` holds rows × k elements, `y` room for rows × m, all of which the
            // product writes before the length is set.
            unsafe {
                if self.transposed {
                    product_transposed(w, rows, x.as_ptr(), y.as_mut_ptr());
                } else {
                    product(w, rows, x.as_ptr(), y.as_mut_ptr(), bias);
                }
                y.set_len(rows * m);
            }
            Ok(())
        };
        match &self.bias {
            Some(bias) => with_cpu_slice(bias, |b| write(Some(b)))?,
            None => write(None)?,
        }
        Ok((y, Shape::from((rows, m))))
    }
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        match (storage, &*self.weight) {
            (CpuStorage::F32(x), PackedWeight::F32(w)) => {
                let (y, shape) = self.run(w, x, layout)?;
                Ok((CpuStorage::F32(y), shape))
            }
            (CpuStorage::F64(x), PackedWeight::F64(w)) => {
                let (y, shape) = self.run(w, x, layout)?;
                Ok((CpuStorage::F64(y), shape))
            }
            _ => bail!(
                "linear: a {:?} input for a frozen layer of another dtype; convert one to the other",
                candle_core::backend::BackendStorage::dtype(storage)
            ),
        }
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let dx = grad.contiguous()?.apply_op1_no_bwd(&FrozenMatmul {
            weight: self.weight.clone(),
            bias: None,
            transposed: true,
        })?;
        Ok(Some(dx))
    }
}
