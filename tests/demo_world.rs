//! The shipped demo-world judge, loaded as a user would load it, reads generator images.

use candle_core::Device;
use erasure_studio::demo_world::judge::{JudgeNet, accuracy};

#[test]
fn shipped_judge_reads_held_out_scenes() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/demo-model/judge");
    let judge = JudgeNet::load(&dir, &Device::Cpu).unwrap();
    // Seed 7 is not the training stream (seed 0) of the shipped judge.
    let acc = accuracy(&judge, 320, 7, &Device::Cpu).unwrap();
    for (head, a) in ["object", "colour", "fill", "background"].iter().zip(acc) {
        assert!(a >= 0.97, "{head} accuracy {a:.3}");
    }
}
