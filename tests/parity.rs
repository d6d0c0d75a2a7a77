//! Parity with diffusers / transformers on committed fixtures (made by
//! `scripts/make_parity_fixtures.py`): token ids exact, floats within relative L2 1e-4.

mod common;

use candle_core::{DType, Device};
use common::{fixtures, load, rel_l2, temp_dir};
use erasure_studio::engine::ModelSource;
use erasure_studio::parity;

const TOLERANCE: f64 = 1e-4;

fn check_case(model: &str, case: &str) {
    let dir = fixtures();
    let out = temp_dir(&format!("parity-{case}")).join("out.safetensors");
    let source = ModelSource::folder(&dir.join(model)).unwrap();
    let inputs = dir
        .join("parity")
        .join(format!("{case}-inputs.safetensors"));
    let written = parity::run(&source, &inputs, &out, &[], &Device::Cpu).unwrap();
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

#[test]
fn clip_model_matches_transformers() {
    check_case("tiny-clip", "clip");
}

#[test]
fn tokenizer_json_format_gives_the_same_ids() {
    use erasure_studio::engine::models::tokenizer::ClipTokenizer;
    let dir = fixtures();
    let from_json = ClipTokenizer::from_dir(&dir.join("tokenizer-json").join("tokenizer")).unwrap();
    let from_vocab = ClipTokenizer::from_dir(&dir.join("tiny-sd1").join("tokenizer")).unwrap();
    let bytes = std::fs::read(dir.join("parity").join("tokenizer-inputs.safetensors")).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let prompts: Vec<String> =
        serde_json::from_str(&meta.metadata().as_ref().unwrap()["prompts"]).unwrap();
    assert!(prompts.len() > 20);
    for prompt in &prompts {
        assert_eq!(
            from_json.encode(prompt),
            from_vocab.encode(prompt),
            "{prompt:?}"
        );
    }
    // And both agree with transformers on the SD 1.x fixture prompts.
    let expected = load(&dir.join("parity").join("sd1-expected.safetensors"));
    let bytes = std::fs::read(dir.join("parity").join("sd1-inputs.safetensors")).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let prompts: Vec<String> =
        serde_json::from_str(&meta.metadata().as_ref().unwrap()["prompts"]).unwrap();
    let want = expected["tokenizer.input_ids"].to_vec2::<i64>().unwrap();
    for (prompt, want) in prompts.iter().zip(want) {
        let got: Vec<i64> = from_json
            .encode(prompt)
            .into_iter()
            .map(i64::from)
            .collect();
        assert_eq!(got, want, "{prompt:?}");
    }
}

/// A textual-inversion token in `added_tokens.json` is matched whole. Expected ids recorded from
/// transformers 5.24's `CLIPTokenizer` on the same folder.
#[test]
fn added_tokens_are_matched_whole() {
    use erasure_studio::engine::models::tokenizer::ClipTokenizer;
    let dir = common::temp_dir("added-tokens").join("tokenizer");
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(fixtures().join("tiny-sd1").join("tokenizer")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
    }
    std::fs::write(dir.join("added_tokens.json"), r#"{"<cat-toy>": 2014}"#).unwrap();
    let tok = ClipTokenizer::from_dir(&dir).unwrap();
    let ids = tok.encode("a photo of <cat-toy> on a mat, <cat-toy>!");
    let want = [
        2012, 320, 1125, 539, 2014, 525, 320, 76, 536, 267, 2014, 256, 2013,
    ];
    assert_eq!(&ids[..want.len()], &want);
}
