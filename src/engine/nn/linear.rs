//! Linear layers. A layer whose weight is a variable (a model being trained) goes through
//! candle's matmul. A frozen f32 or f64 one on the CPU (a loaded model, or the base model
//! under an adapter) keeps its weight packed once for the GEMM's microkernels
//! (`packed_gemm`) and runs as a CPU op whose backward computes only the input's gradient:
//! candle's matmul backward also computes, and keeps, a gradient for every frozen weight,
//! which doubles the cost of an adapter's backward pass and holds a second copy of the model
//! in memory; and the GEMM would otherwise pack the weight again on every call, a seventh of
//! a text encoder's time.

use std::sync::Arc;

use candle_core::{Module, Result, Tensor, bail};
use candle_nn::{Init, VarBuilder};

use super::channel::{add_bias, split_frozen_bias};
use crate::engine::kernels;
use crate::engine::kernels::linear::{FrozenMatmul, PackedWeight};

/// `y = x · Wᵀ + b`, weight `[out, in]`, optional bias `[out]`, over the last dim of `x`.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Weight,
    bias: Option<Tensor>,
}

#[derive(Debug, Clone)]
enum Weight {
    /// `[out, in]`: a variable, or a frozen weight off the CPU or of another dtype.
    Tensor(Tensor),
    /// A frozen CPU weight, `Wᵀ` (`[in, out]`) packed.
    Packed(Arc<PackedWeight>),
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
        let bias = if bias {
            Some(vb.get_with_hints(out_dim, "bias", uniform)?)
        } else {
            None
        };
        Self::new(weight, bias)
    }

    /// A layer of `weight` (`[out, in]`, rank 2), packed when it is a frozen CPU weight.
    fn new(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let frozen = !weight.track_op();
        let weight = if frozen && kernels::supports(weight.device(), weight.dtype()) {
            Weight::Packed(Arc::new(PackedWeight::pack(&weight)?))
        } else {
            Weight::Tensor(weight)
        };
        Ok(Self { weight, bias })
    }

    /// `(out, in)`.
    pub fn dims(&self) -> (usize, usize) {
        match &self.weight {
            Weight::Tensor(w) => (w.dims()[0], w.dims()[1]),
            Weight::Packed(w) => {
                let (in_dim, out_dim) = w.dims();
                (out_dim, in_dim)
            }
        }
    }

    /// The weight, `[out, in]` (unpacked into a new tensor where it is kept packed).
    pub fn weight(&self) -> Result<Tensor> {
        match &self.weight {
            Weight::Tensor(w) => Ok(w.clone()),
            Weight::Packed(w) => w.tensor(),
        }
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims();
        let Some((&in_dim, lead)) = dims.split_last() else {
            bail!("a linear layer takes at least one dim, got a scalar");
        };
        let rows = x.reshape(((), in_dim))?;
        // A frozen bias is added by the packed product itself.
        let (fused_bias, bias) = match self.weight {
            Weight::Packed(_) => split_frozen_bias(self.bias.as_ref())?,
            Weight::Tensor(_) => (None, self.bias.as_ref()),
        };
        let y = match &self.weight {
            Weight::Packed(w) => rows.contiguous()?.apply_op1(FrozenMatmul {
                weight: w.clone(),
                bias: fused_bias,
                transposed: false,
            })?,
            Weight::Tensor(w) => rows.matmul(&w.t()?)?,
        };
        let (out_dim, _) = self.dims();
        let y = y.reshape([lead, &[out_dim]].concat())?;
        match bias {
            Some(bias) => add_bias(&y, bias, y.rank() - 1),
            None => Ok(y),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::diffusion::noise::NoiseStream;
    use crate::engine::kernels::test_support::projected_grads;
    use candle_core::{DType, Device, Var};

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

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
        let frozen = Linear::new(weight.clone(), Some(bias.clone())).unwrap();
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
        assert!(matches!(loaded.weight, Weight::Packed(_)));
        let trained = Linear::new(
            Var::from_tensor(&weight).unwrap().as_tensor().clone(),
            Some(bias),
        )
        .unwrap();
        assert!(matches!(trained.weight, Weight::Tensor(_)));
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
        assert_eq!(y_frozen.dims(), &[2, 3, 6]);
        assert!(max_abs_diff(&y_frozen, &y_trained) < 1e-12);
        assert!(max_abs_diff(&dx_frozen, &dx_trained) < 1e-12);
        assert!(max_abs_diff(&y_loaded, &y_trained) < 1e-12);
        assert!(max_abs_diff(&dx_loaded, &dx_trained) < 1e-12);
        assert!(max_abs_diff(&loaded.weight().unwrap(), &weight) == 0.0);
        assert_eq!(loaded.dims(), (6, 5));
        // No gradient is computed, or kept, for the frozen weight.
        assert!(grads_frozen.get(&weight).is_none());
    }

    /// A frozen weight under a bias being trained: the bias is added by its own op, so it
    /// gets its gradient (the upstream gradient summed over rows), and the output is the same
    /// as with the bias added by the product.
    #[test]
    fn a_trained_bias_on_a_frozen_weight_gets_its_gradient() {
        let dev = Device::Cpu;
        let mut rng = NoiseStream::new(11);
        let f64_tensor = |rng: &mut NoiseStream, shape: &[usize]| {
            rng.tensor(shape, &dev)
                .unwrap()
                .to_dtype(DType::F64)
                .unwrap()
        };
        let weight = f64_tensor(&mut rng, &[4, 3]);
        let bias = Var::from_tensor(&f64_tensor(&mut rng, &[4])).unwrap();
        let x = f64_tensor(&mut rng, &[5, 3]);
        let upstream = f64_tensor(&mut rng, &[5, 4]);
        let trained_bias = Linear::new(weight.clone(), Some(bias.as_tensor().clone())).unwrap();
        let frozen_bias = Linear::new(weight, Some(bias.as_tensor().detach())).unwrap();
        assert!(matches!(trained_bias.weight, Weight::Packed(_)));
        let y = trained_bias.forward(&x).unwrap();
        let grads = projected_grads(&y, &upstream);
        let db = grads.get(bias.as_tensor()).expect("the bias is trained");
        let want = upstream.sum(0).unwrap();
        assert!(max_abs_diff(db, &want) < 1e-12);
        assert!(max_abs_diff(&y, &frozen_bias.forward(&x).unwrap()) < 1e-12);
    }
}
