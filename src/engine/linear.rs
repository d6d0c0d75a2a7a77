//! Linear layers. A layer whose weight is a variable (a model being trained) goes through
//! candle's matmul. A frozen one (a loaded model, or the base model under an adapter) uses a
//! CPU op whose backward computes only the input's gradient: candle's matmul backward also
//! computes, and keeps, a gradient for every frozen weight, which doubles the cost of an
//! adapter's backward pass and holds a second copy of the model in memory. A frozen weight is
//! kept transposed in memory (`[in, out]`): the GEMM would otherwise repack an `[out, in]`
//! weight element by element on every call, which cost a quarter of a text encoder's time.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Module, Result, Shape, Tensor, bail};
use candle_nn::{Init, VarBuilder};

use super::channel::add_bias;
use super::cpu_kernels::{contiguous, matmul_threaded, with_floats};

/// `y = x · Wᵀ + b`, weight `[out, in]`, optional bias `[out]`, over the last dim of `x`.
#[derive(Debug, Clone)]
pub struct Linear {
    /// `[out, in]`; a frozen one is a transposed view of contiguous `[in, out]` storage.
    weight: Tensor,
    bias: Option<Tensor>,
}

impl Linear {
    /// Weights named `weight` (and `bias`) under `vb`, initialised like PyTorch's `Linear`.
    pub fn load(vb: VarBuilder, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let bound = 1.0 / (in_dim as f64).sqrt();
        let uniform = Init::Uniform {
            lo: -bound,
            up: bound,
        };
        let weight = vb.get_with_hints((out_dim, in_dim), "weight", uniform)?;
        let weight = if weight.track_op() {
            weight
        } else {
            weight.t()?.contiguous()?.t()?
        };
        let bias = if bias {
            Some(vb.get_with_hints(out_dim, "bias", uniform)?)
        } else {
            None
        };
        Ok(Self { weight, bias })
    }

    /// `[out, in]`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims();
        let Some((&in_dim, lead)) = dims.split_last() else {
            bail!("a linear layer takes at least one dim, got a scalar");
        };
        let rows = x.reshape(((), in_dim))?;
        let frozen_cpu = !self.weight.track_op()
            && x.device().is_cpu()
            && matches!(x.dtype(), DType::F32 | DType::F64);
        let y = if frozen_cpu {
            rows.contiguous()?.apply_op2(
                &self.weight.t()?.contiguous()?,
                FrozenMatmul { transposed: false },
            )?
        } else {
            rows.matmul(&self.weight.t()?)?
        };
        let out_dim = self.weight.dim(0)?;
        let y = y.reshape([lead, &[out_dim]].concat())?;
        match &self.bias {
            Some(bias) => add_bias(&y, bias, y.rank() - 1),
            None => Ok(y),
        }
    }
}

/// `(x [n, in], frozen Wᵀ [in, out]) → x · Wᵀ [n, out]`; its backward gives x's gradient only,
/// as the same op `transposed` (recorded without a backward of its own):
/// `(g [n, out], Wᵀ [in, out]) → g · W [n, in]`.
struct FrozenMatmul {
    transposed: bool,
}

impl CustomOp2 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, k) = l1.shape().dims2()?;
        let (rows, cols) = l2.shape().dims2()?;
        let (k2, m) = if self.transposed {
            (cols, rows)
        } else {
            (rows, cols)
        };
        if k != k2 {
            bail!("linear: the weight takes {k2} inputs, the input has {k}");
        }
        let out = with_floats!((s1, s2), |x, w| {
            let (x, w) = (contiguous(x, l1)?, contiguous(w, l2)?);
            let mut y = vec![0.0; n * m];
            // The weight as the product's [k × m] right-hand side.
            let rhs = if self.transposed {
                (w.as_ptr(), 1, k)
            } else {
                (w.as_ptr(), m, 1)
            };
            unsafe { matmul_threaded((n, m, k), y.as_mut_ptr(), (x.as_ptr(), k, 1), rhs) }
            y
        });
        Ok((out, Shape::from((n, m))))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        weight_t: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let dx = grad
            .contiguous()?
            .apply_op2_no_bwd(weight_t, &FrozenMatmul { transposed: true })?;
        Ok((Some(dx), None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::cpu_kernels::projected_grads;
    use crate::engine::noise::NoiseStream;
    use candle_core::{Device, Var};

    /// A frozen layer computes what candle's matmul does, and passes the same input gradient
    /// back, for inputs of any rank, whether its weight is laid out as loaded (transposed) or
    /// as given.
    #[test]
    fn frozen_layer_matches_matmul_forward_and_backward() {
        let dev = Device::Cpu;
        let mut rng = NoiseStream::new(7);
        let weight = rng
            .tensor((6, 5), &dev)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap();
        let bias = rng.tensor(6, &dev).unwrap().to_dtype(DType::F64).unwrap();
        let x = rng
            .tensor((2, 3, 5), &dev)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap();
        let frozen = Linear {
            weight: weight.clone(),
            bias: Some(bias.clone()),
        };
        let tensors = [("weight", &weight), ("bias", &bias)]
            .map(|(name, t)| (name.to_string(), t.clone()))
            .into_iter()
            .collect();
        let loaded = Linear::load(
            VarBuilder::from_tensors(tensors, DType::F64, &dev),
            5,
            6,
            true,
        )
        .unwrap();
        assert!(loaded.weight().t().unwrap().is_contiguous());
        let trained = Linear {
            weight: Var::from_tensor(&weight).unwrap().as_tensor().clone(),
            bias: Some(bias),
        };
        let x = Var::from_tensor(&x).unwrap();
        let upstream = rng
            .tensor((2, 3, 6), &dev)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap();
        let run = |layer: &Linear| {
            let y = layer.forward(x.as_tensor()).unwrap();
            let grads = projected_grads(&y, &upstream);
            (y, grads.get(x.as_tensor()).unwrap().clone(), grads)
        };
        let (y_frozen, dx_frozen, grads_frozen) = run(&frozen);
        let (y_trained, dx_trained, _) = run(&trained);
        let (y_loaded, dx_loaded, _) = run(&loaded);
        let diff = |a: &Tensor, b: &Tensor| {
            (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        assert_eq!(y_frozen.dims(), &[2, 3, 6]);
        assert!(diff(&y_frozen, &y_trained) < 1e-12);
        assert!(diff(&dx_frozen, &dx_trained) < 1e-12);
        assert!(diff(&y_loaded, &y_trained) < 1e-12);
        assert!(diff(&dx_loaded, &dx_trained) < 1e-12);
        assert!(diff(loaded.weight(), &weight) == 0.0);
        // No gradient is computed, or kept, for the frozen weight.
        assert!(grads_frozen.get(&weight).is_none());
    }
}
