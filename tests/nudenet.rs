//! NudeNet's detector run by tract: the raw network output matches onnxruntime's on a fixed
//! input (fixture from tests/fixtures/nudenet/make_fixture.py), and generated demo images stay
//! below the threshold. The model is fetched by
//! `.ci/fetch-test-models` (not committed).

mod common;

use std::path::PathBuf;

use candle_core::Device;
use erasure_studio::demo_world::scene::{Background, Colour, Fill, Object, Scene, render_batch};
use erasure_studio::reward::nudenet::{LABELS, NudeNet};
use rand::SeedableRng;

fn model_path() -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".cache/nudenet/320n.onnx");
    assert!(
        path.is_file(),
        "{} is missing: run .ci/fetch-test-models first",
        path.display()
    );
    path
}

/// The input make_fixture.py builds: smooth per-channel stripes and a bright disc.
fn synthetic_input() -> Vec<f32> {
    let mut out = Vec::with_capacity(3 * 320 * 320);
    for c in 0..3 {
        for y in 0..320 {
            for x in 0..320 {
                let (c, y, x) = (c as f64, y as f64, x as f64);
                let stripes = 0.5 + 0.4 * (0.05 * x * (c + 1.0) + 0.03 * y).sin();
                let disc = f64::from(u8::from((x - 160.0).powi(2) + (y - 140.0).powi(2) < 3600.0));
                out.push((0.7 * stripes + 0.3 * disc) as f32);
            }
        }
    }
    out
}

#[test]
fn the_network_matches_onnxruntime_on_a_fixed_input() {
    let all: Vec<String> = LABELS.iter().map(|s| s.to_string()).collect();
    let net = NudeNet::load(&model_path(), &all).unwrap();
    let got = net.network_output(&synthetic_input()).unwrap();
    let expected =
        candle_core::Tensor::read_npy(common::fixtures().join("nudenet/expected.npy")).unwrap();
    assert_eq!(expected.dims(), [1, 22, 2100]);
    let got = candle_core::Tensor::from_vec(got, (1, 22, 2100), &Device::Cpu).unwrap();
    let err = common::rel_l2(&got, &expected);
    assert!(err < 1e-4, "relative L2 error {err:.2e}");
}

#[test]
fn a_drawn_shape_shows_no_nudity_and_unknown_classes_are_refused() {
    let exposed: Vec<String> = [
        "FEMALE_BREAST_EXPOSED",
        "FEMALE_GENITALIA_EXPOSED",
        "MALE_GENITALIA_EXPOSED",
        "BUTTOCKS_EXPOSED",
        "ANUS_EXPOSED",
    ]
    .map(String::from)
    .to_vec();
    let net = NudeNet::load(&model_path(), &exposed).unwrap();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
    let scenes: Vec<Scene> = [Object::Star, Object::Heart]
        .map(|o| {
            Scene::with_attributes(o, Colour::Orange, Fill::Solid, Background::White, &mut rng)
        })
        .to_vec();
    let scores = net
        .scores(&render_batch(&scenes, &Device::Cpu).unwrap())
        .unwrap();
    assert_eq!(scores.len(), 2);
    // Below the nudity preset's threshold of 0.6 (the orange heart scores about 0.37 on
    // BUTTOCKS_EXPOSED: the detector is not infallible, which is why the threshold is high).
    assert!(scores.iter().all(|s| (0.0..0.6).contains(s)), "{scores:?}");

    let err = NudeNet::load(&model_path(), &["NAVEL_EXPOSED".to_string()])
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("NAVEL_EXPOSED") && err.contains("BELLY_EXPOSED"),
        "{err}"
    );
}
