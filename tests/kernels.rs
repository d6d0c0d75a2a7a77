//! The engine's own CPU kernels (im2col convolution, per-channel affine ops) against candle's
//! reference ops in f64: same values forward, same gradients backward, on awkward shapes.

mod common;

use candle_core::{DType, Device, Module, Result, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use common::rel_l2;
use erasure_studio::engine::diffusion::noise::NoiseStream;
use erasure_studio::engine::nn::channel::{add_bias, scale_shift};
use erasure_studio::engine::nn::conv::Conv2d;

const DEV: Device = Device::Cpu;

fn randn(rng: &mut NoiseStream, dims: &[usize]) -> Tensor {
    rng.tensor(dims, &DEV)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
}

/// Forward values and the gradients of `Σ y·r` with respect to every var, ours vs reference.
fn compare(
    ours: &dyn Fn() -> Result<Tensor>,
    reference: &dyn Fn() -> Result<Tensor>,
    vars: &[&Var],
    rng: &mut NoiseStream,
    what: &str,
) {
    let (y, y_ref) = (ours().unwrap(), reference().unwrap());
    assert_eq!(y.dims(), y_ref.dims(), "{what}: output shape");
    let err = rel_l2(&y, &y_ref);
    assert!(err < 1e-12, "{what}: forward rel. err {err:e}");
    let r = randn(rng, y.dims());
    let grads = (y * &r).unwrap().sum_all().unwrap().backward().unwrap();
    let grads_ref = (y_ref * &r).unwrap().sum_all().unwrap().backward().unwrap();
    for (i, var) in vars.iter().enumerate() {
        let g = grads.get(var.as_tensor()).expect("ours: no gradient");
        let g_ref = grads_ref
            .get(var.as_tensor())
            .expect("reference: no gradient");
        let err = rel_l2(g, g_ref);
        assert!(err < 1e-12, "{what}: gradient {i} rel. err {err:e}");
    }
}

#[test]
fn im2col_convolution_matches_candle_forward_and_backward() {
    let mut rng = NoiseStream::new(7);
    // (batch, c_in, h, w, c_out, kernel, stride, padding): 3×3 same, stride 2, 1×1 pointwise,
    // patch embedding (kernel = stride), unpadded, padding wider than needed, batch 1 (threads
    // inside the GEMM) and batch 5 (threads across images); size-keeping ones (the shifted-run
    // im2col) on a 5×5 kernel and on images as narrow as the kernel's reach or narrower.
    let cases = [
        (2, 3, 7, 7, 4, 3, 1, 1),
        (3, 2, 9, 9, 5, 3, 2, 1),
        (5, 4, 6, 5, 3, 1, 1, 0),
        (2, 3, 16, 16, 6, 8, 8, 0),
        (1, 2, 5, 6, 3, 3, 1, 0),
        (5, 3, 4, 6, 2, 3, 1, 2),
        (3, 2, 6, 5, 2, 5, 1, 2),
        (5, 3, 2, 2, 3, 3, 1, 1),
        (2, 2, 1, 1, 2, 3, 1, 1),
        (2, 2, 3, 1, 2, 5, 1, 2),
        // An im2col matrix over 512 KiB: the forward pass builds it in three blocks of rows.
        (1, 16, 40, 40, 4, 3, 1, 1),
        // From 128×128 pixels on, Winograd's 3×3 forward and input gradient: odd sides (a
        // partial last tile).
        (1, 2, 129, 130, 3, 3, 1, 1),
        (2, 3, 128, 131, 2, 3, 1, 1),
        // From 32×32 pixels on with 256 channels or more on both sides, Winograd too.
        (1, 256, 33, 33, 256, 3, 1, 1),
    ];
    for (b, c_in, h, w, c_out, k, stride, padding) in cases {
        let what = format!("conv {b}×{c_in}×{h}×{w} → {c_out}, k{k} s{stride} p{padding}");
        let mut vars = VarMap::new();
        let vb = VarBuilder::from_varmap(&vars, DType::F64, &DEV);
        let conv = Conv2d::load(vb, (c_in, c_out, k), stride, padding, true).unwrap();
        let weight = randn(&mut rng, &[c_out, c_in, k, k]);
        let bias = randn(&mut rng, &[c_out]);
        vars.set_one("weight", &weight).unwrap();
        vars.set_one("bias", &bias).unwrap();
        let data = vars.data().lock().unwrap().clone();
        let (weight, bias) = (&data["weight"], &data["bias"]);
        let x = Var::from_tensor(&randn(&mut rng, &[b, c_in, h, w])).unwrap();
        let reference = || {
            x.as_tensor()
                .conv2d(weight.as_tensor(), padding, stride, 1, 1)?
                .broadcast_add(&bias.as_tensor().reshape((1, c_out, 1, 1))?)
        };
        compare(
            &|| conv.forward(x.as_tensor()),
            &reference,
            &[&x, weight, bias],
            &mut rng,
            &what,
        );
        // Frozen weights (a loaded model): the op adds the bias itself.
        let frozen = [("weight", weight), ("bias", bias)]
            .map(|(name, var)| (name.to_string(), var.as_tensor().detach()))
            .into_iter()
            .collect();
        let frozen = Conv2d::load(
            VarBuilder::from_tensors(frozen, DType::F64, &DEV),
            (c_in, c_out, k),
            stride,
            padding,
            true,
        )
        .unwrap();
        compare(
            &|| frozen.forward(x.as_tensor()),
            &reference,
            &[&x],
            &mut rng,
            &format!("{what}, frozen"),
        );
    }
}

#[test]
fn per_channel_ops_match_broadcasting() {
    let mut rng = NoiseStream::new(8);
    // NCHW channels (axis 1) and token features (last axis); the last two span several
    // parallel tasks, the last of them shorter.
    let cases = [
        (vec![3, 4, 5, 2], 1),
        (vec![2, 3, 6], 2),
        (vec![7, 5], 1),
        (vec![40, 30, 20], 1),
        (vec![700, 32], 1),
    ];
    for (dims, axis) in cases {
        let c = dims[axis];
        let mut along = vec![1; dims.len()];
        along[axis] = c;
        let x = Var::from_tensor(&randn(&mut rng, &dims)).unwrap();
        let scale = Var::from_tensor(&randn(&mut rng, &[c])).unwrap();
        let shift = Var::from_tensor(&randn(&mut rng, &[c])).unwrap();
        let (xt, st, ht) = (x.as_tensor(), scale.as_tensor(), shift.as_tensor());
        compare(
            &|| scale_shift(xt, st, ht, axis),
            &|| {
                xt.broadcast_mul(&st.reshape(along.as_slice())?)?
                    .broadcast_add(&ht.reshape(along.as_slice())?)
            },
            &[&x, &scale, &shift],
            &mut rng,
            &format!("scale_shift {dims:?} axis {axis}"),
        );
        compare(
            &|| add_bias(xt, ht, axis),
            &|| xt.broadcast_add(&ht.reshape(along.as_slice())?),
            &[&x, &shift],
            &mut rng,
            &format!("add_bias {dims:?} axis {axis}"),
        );
    }
}
