//! LoRA export and import on the tiny fixture model: a kohya or PEFT export of an erasure
//! adapter reloads to the adapter's LoRA branch exactly (and, folded, to its Safe Adapter on the
//! tail tokens); the fold's low-rank approximation is optimal; imported files stack and refuse
//! other models; and diffusers + peft apply our kohya export and a LoRA of its own as the engine
//! does (fixtures from `scripts/make_lora_fixtures.py`).

mod common;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::{fixtures, load, rel_l2, temp_dir, tiny_sd1};
use erasure_studio::adapter::lora::{LoraAdapter, LoraExport, LoraFormat};
use erasure_studio::adapter::stack::{AdapterSpec, AdapterStack};
use erasure_studio::adapter::{AdapterConfig, ErasureAdapter, SafeDelta};
use erasure_studio::engine::ModelSource;
use erasure_studio::engine::StableDiffusion;
use erasure_studio::engine::diffusion::noise::NoiseStream;
use erasure_studio::engine::models::clip::text::ids_tensor;
use erasure_studio::engine::models::unet::UNetHook;
use erasure_studio::parity;

/// An adapter on the tiny model with every variable random (seeded), so each part matters.
fn random_adapter(sd: &StableDiffusion, config: AdapterConfig, seed: u64) -> ErasureAdapter {
    let adapter = ErasureAdapter::new(&sd.unet, config, seed, DType::F32, &Device::Cpu).unwrap();
    let mut rng = NoiseStream::new(seed);
    let data = adapter.vars().data().lock().unwrap();
    let mut names: Vec<_> = data.keys().cloned().collect();
    names.sort();
    for name in names {
        let var = &data[&name];
        var.set(&(rng.tensor(var.dims(), &Device::Cpu).unwrap() * 0.2).unwrap())
            .unwrap();
    }
    drop(data);
    adapter
}

fn context(sd: &StableDiffusion) -> Tensor {
    let ids = sd.tokenizer.encode("a red striped star");
    sd.text_encoder
        .forward(&ids_tensor(&[ids], &Device::Cpu).unwrap())
        .unwrap()
}

/// Per cross-attention layer, what `hook` adds to the keys and to the values.
fn kv_updates(sd: &StableDiffusion, hook: &dyn UNetHook, context: &Tensor) -> Vec<[Tensor; 2]> {
    sd.unet
        .cross_attn_layers()
        .into_iter()
        .map(|layer| {
            let (k0, v0) = layer.base_key_value(context).unwrap();
            let (k, v) = layer.key_value(context, Some(hook)).unwrap();
            [(k - k0).unwrap(), (v - v0).unwrap()]
        })
        .collect()
}

fn export(
    sd: &StableDiffusion,
    adapter: &ErasureAdapter,
    format: LoraFormat,
    fold: Option<usize>,
    path: &Path,
) {
    let export = LoraExport {
        format,
        fold_rank: fold,
        title: "test".into(),
    };
    adapter.export_lora(sd, &export, path).unwrap();
}

#[test]
fn lora_exports_reload_to_the_adapters_lora_branch() {
    let sd = tiny_sd1();
    let config = AdapterConfig::default();
    let adapter = random_adapter(&sd, config, 1);
    let context = context(&sd);
    let native = kv_updates(&sd, &adapter.detached(), &context);
    let dir = temp_dir("lora-export");
    let tail = config.tail_tokens;
    let len = context.dim(1).unwrap();
    for format in [LoraFormat::Kohya, LoraFormat::Peft] {
        let path = dir.join(format!("{format:?}.safetensors"));
        export(&sd, &adapter, format, None, &path);
        let lora = LoraAdapter::load(&path, &sd.unet, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(lora.format(), format);
        assert_eq!(lora.layer_count(), 2 * native.len());
        assert!(lora.skipped().is_empty());
        for (n, l) in native.iter().zip(kv_updates(&sd, &lora, &context)) {
            for (a, b) in n.iter().zip(&l) {
                // The leading tokens get the LoRA branch in both.
                let head = |t: &Tensor| t.narrow(1, 0, len - tail).unwrap();
                let e = rel_l2(&head(a), &head(b));
                assert!(e < 1e-6, "{format:?}: leading tokens differ by {e}");
            }
        }
    }
}

#[test]
fn a_folded_export_carries_the_safe_adapter_onto_the_tail_tokens() {
    let sd = tiny_sd1();
    let context = context(&sd);
    let dir = temp_dir("lora-fold");
    let len = context.dim(1).unwrap();
    // A low-rank Safe Adapter delta of rank 3 folds exactly at rank 3; a full one (rank up to
    // the layer's width) nearly so at a rank as wide as the layer.
    for (safe_delta, fold) in [
        (SafeDelta::LowRank { rank: 3 }, 3),
        (SafeDelta::Full {}, 64),
    ] {
        let config = AdapterConfig {
            safe_delta,
            ..AdapterConfig::default()
        };
        let tail = config.tail_tokens;
        let adapter = random_adapter(&sd, config, 2);
        let native = kv_updates(&sd, &adapter.detached(), &context);
        let path = dir.join("folded.safetensors");
        export(&sd, &adapter, LoraFormat::Kohya, Some(fold), &path);
        let folded = LoraAdapter::load(&path, &sd.unet, DType::F32, &Device::Cpu).unwrap();
        let unfolded_path = dir.join("unfolded.safetensors");
        export(&sd, &adapter, LoraFormat::Kohya, None, &unfolded_path);
        let unfolded =
            LoraAdapter::load(&unfolded_path, &sd.unet, DType::F32, &Device::Cpu).unwrap();
        let with_fold = kv_updates(&sd, &folded, &context);
        let lora_only = kv_updates(&sd, &unfolded, &context);
        for ((n, f), l) in native.iter().zip(&with_fold).zip(&lora_only) {
            for i in 0..2 {
                let last = |t: &Tensor| t.narrow(1, len - tail, tail).unwrap();
                // On the tail the export adds the LoRA branch to the Safe Adapter's delta.
                let safe_part = (last(&f[i]) - last(&l[i])).unwrap();
                let e = rel_l2(&safe_part, &last(&n[i]));
                assert!(
                    e < 1e-4,
                    "{safe_delta:?} folded at {fold}: tail differs by {e}"
                );
            }
        }
    }
}

#[test]
fn the_fold_is_the_best_approximation_of_its_rank() {
    // A = U diag(s) Vᵀ with known singular values: the rank-k error must be the tail's norm.
    let (m, n, k) = (48usize, 40usize, 6usize);
    let mut rng = NoiseStream::new(9);
    let orthonormal = |rows: usize, cols: usize, rng: &mut NoiseStream| {
        let g = rng
            .tensor(&[rows, cols], &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap();
        // Gram–Schmidt on the columns of a Gaussian matrix.
        let mut cols_v: Vec<Vec<f64>> = (0..cols)
            .map(|j| {
                g.narrow(1, j, 1)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap()
            })
            .collect();
        for j in 0..cols {
            for i in 0..j {
                let p: f64 = cols_v[i].iter().zip(&cols_v[j]).map(|(a, b)| a * b).sum();
                let ci = cols_v[i].clone();
                for (x, q) in cols_v[j].iter_mut().zip(&ci) {
                    *x -= p * q;
                }
            }
            let norm: f64 = cols_v[j].iter().map(|x| x * x).sum::<f64>().sqrt();
            cols_v[j].iter_mut().for_each(|x| *x /= norm);
        }
        let flat: Vec<f64> = (0..rows)
            .flat_map(|r| cols_v.iter().map(move |c| c[r]))
            .collect();
        Tensor::from_vec(flat, (rows, cols), &Device::Cpu).unwrap()
    };
    let u = orthonormal(m, n, &mut rng);
    let v = orthonormal(n, n, &mut rng);
    let s: Vec<f64> = (0..n).map(|i| 10.0 * 0.7f64.powi(i as i32)).collect();
    let a = u
        .broadcast_mul(
            &Tensor::new(s.clone(), &Device::Cpu)
                .unwrap()
                .unsqueeze(0)
                .unwrap(),
        )
        .unwrap()
        .matmul(&v.t().unwrap())
        .unwrap();
    let (up, down) = erasure_studio::adapter::low_rank::truncated(&a, k, 0).unwrap();
    assert_eq!((up.dims(), down.dims()), (&[m, k][..], &[k, n][..]));
    let error = (a - up.matmul(&down).unwrap())
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
        .sqrt();
    let optimum = s[k..].iter().map(|x| x * x).sum::<f64>().sqrt();
    assert!(
        (error - optimum).abs() < 1e-6 * optimum,
        "rank-{k} error {error}, optimum {optimum}"
    );
}

#[test]
fn imported_loras_stack_with_a_strength_each_and_refuse_other_models() {
    let sd = tiny_sd1();
    let adapter = random_adapter(&sd, AdapterConfig::default(), 3);
    let dir = temp_dir("lora-stack");
    let path = dir.join("kohya.safetensors");
    export(&sd, &adapter, LoraFormat::Kohya, None, &path);
    let context = context(&sd);
    let spec = |s: &str| s.parse::<AdapterSpec>().unwrap();
    let path_str = path.display().to_string();
    let once = AdapterStack::load(&[spec(&path_str)], &sd.unet, DType::F32, &Device::Cpu).unwrap();
    let twice = AdapterStack::load(
        &[
            spec(&format!("{path_str}:0.5")),
            spec(&format!("{path_str}:1.5")),
        ],
        &sd.unet,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    for (a, b) in kv_updates(&sd, &once, &context)
        .iter()
        .zip(kv_updates(&sd, &twice, &context))
    {
        for i in 0..2 {
            let e = rel_l2(&(&a[i] * 2.0).unwrap(), &b[i]);
            assert!(e < 1e-6, "0.5 + 1.5 should be twice 1: {e}");
        }
    }
    assert_eq!(
        spec("a:b.safetensors").path,
        PathBuf::from("a:b.safetensors")
    );
    assert_eq!(spec("x.safetensors:-0.25").strength, -0.25);

    let sd2 = StableDiffusion::load(
        &ModelSource::folder(&fixtures().join("tiny-sd2")).unwrap(),
        &Device::Cpu,
        DType::F32,
    )
    .unwrap();
    let err = LoraAdapter::load(&path, &sd2.unet, DType::F32, &Device::Cpu)
        .err()
        .expect("an SD1 LoRA on an SD2 model");
    let err = format!("{err:#}");
    assert!(
        err.contains("made for another model") || err.contains("another kind of model"),
        "{err}"
    );
}

/// The kohya file diffusers is run on by `scripts/make_lora_fixtures.py`.
fn export_fixture() -> PathBuf {
    fixtures().join("lora/exported-kohya.safetensors")
}

/// The adapter behind the export fixture, exported to `path`.
fn export_the_fixture_adapter(path: &Path) {
    let sd = tiny_sd1();
    let adapter = random_adapter(&sd, AdapterConfig::default(), 4);
    export(&sd, &adapter, LoraFormat::Kohya, None, path);
}

#[test]
#[ignore = "writes tests/fixtures/lora/exported-kohya.safetensors for scripts/make_lora_fixtures.py"]
fn write_the_export_fixture() {
    std::fs::create_dir_all(export_fixture().parent().unwrap()).unwrap();
    export_the_fixture_adapter(&export_fixture());
}

#[test]
fn the_export_fixture_is_what_the_exporter_writes() {
    let path = temp_dir("lora-fixture").join("kohya.safetensors");
    export_the_fixture_adapter(&path);
    let (ours, committed) = (load(&path), load(&export_fixture()));
    assert_eq!(ours.len(), committed.len());
    for (name, tensor) in &ours {
        let other = &committed[name];
        assert_eq!(tensor.dims(), other.dims(), "{name}");
        assert_eq!(rel_l2(tensor, other), 0.0, "{name}");
    }
}

#[test]
fn diffusers_applies_our_export_and_its_own_lora_as_the_engine_does() {
    let dir = fixtures().join("lora");
    let source = ModelSource::folder(&fixtures().join("tiny-sd1")).unwrap();
    let out_dir = temp_dir("lora-parity");
    let spec = |file: &str, strength: f64| AdapterSpec {
        path: dir.join(file),
        strength,
    };
    let cases = [
        (
            "exported-kohya",
            vec![spec("exported-kohya.safetensors", 1.0)],
        ),
        (
            "diffusers-peft",
            vec![spec("diffusers-peft.safetensors", 1.0)],
        ),
        (
            "stacked",
            vec![
                spec("exported-kohya.safetensors", 0.5),
                spec("diffusers-peft.safetensors", 1.0),
            ],
        ),
    ];
    let base = load(&dir.join("expected-exported-kohya.safetensors"));
    for (case, specs) in cases {
        let out = out_dir.join(format!("{case}.safetensors"));
        let inputs = dir.join("unet-inputs.safetensors");
        parity::run(&source, &inputs, &out, &specs, &Device::Cpu).unwrap();
        let ours = &load(&out)["unet.out"];
        let expected = &load(&dir.join(format!("expected-{case}.safetensors")))["unet.out"];
        let e = rel_l2(ours, expected);
        println!("{case}: relative L2 {e:.2e}");
        assert!(e <= 1e-4, "{case}: relative L2 {e}");
    }
    // The files change the output (a test of nothing otherwise).
    let plain = out_dir.join("plain.safetensors");
    parity::run(
        &source,
        &dir.join("unet-inputs.safetensors"),
        &plain,
        &[],
        &Device::Cpu,
    )
    .unwrap();
    assert!(rel_l2(&load(&plain)["unet.out"], &base["unet.out"]) > 1e-3);
}
