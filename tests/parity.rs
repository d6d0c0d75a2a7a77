//! Parity with diffusers / transformers on committed fixtures (made by
//! `scripts/make_parity_fixtures.py`): token ids exact, floats within relative L2 1e-4.

mod common;

use candle_core::{DType, Device};
use common::{fixtures, load, rel_l2, temp_dir};
use erasure_studio::engine::model::ModelSource;
use erasure_studio::parity;

const TOLERANCE: f64 = 1e-4;

fn check_case(model: &str, case: &str) {
    let dir = fixtures();
    let out = temp_dir(&format!("parity-{case}")).join("out.safetensors");
    let source = ModelSource::folder(&dir.join(model)).unwrap();
    let inputs = dir
        .join("parity")
        .join(format!("{case}-inputs.safetensors"));
    let written = parity::run(&source, &inputs, &out, &Device::Cpu).unwrap();
    let expected = load(
        &dir.join("parity")
            .join(format!("{case}-expected.safetensors")),
    );
    let actual = load(&out);
    assert_eq!(written.len(), expected.len(), "outputs {written:?}");
    for (name, want) in &expected {
        let got = actual
            .get(name)
            .unwrap_or_else(|| panic!("{case}: `{name}` not written"));
        if want.dtype() == DType::I64 {
            let (g, w) = (
                got.to_vec2::<i64>().unwrap(),
                want.to_vec2::<i64>().unwrap(),
            );
            for (row, (g, w)) in g.iter().zip(&w).enumerate() {
                assert_eq!(g, w, "{case}: {name} row {row}");
            }
        } else {
            let err = rel_l2(got, want);
            println!("{case}: {name} relative L2 error {err:.2e}");
            assert!(
                err <= TOLERANCE,
                "{case}: {name} relative L2 error {err:.3e} > {TOLERANCE:e}"
            );
        }
    }
}

#[test]
fn tokenizer_matches_transformers_on_full_clip_vocab() {
    check_case("clip-tokenizer", "tokenizer");
}

#[test]
fn sd1_style_model_matches_diffusers() {
    check_case("tiny-sd1", "sd1");
}

#[test]
fn sd2_style_model_matches_diffusers() {
    check_case("tiny-sd2", "sd2");
}
