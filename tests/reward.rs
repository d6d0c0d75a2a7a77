//! CLIP scoring with the demo model's CLIP on images straight from the world generator.

use candle_core::{D, Device, Tensor};
use erasure_studio::demo_world::demo_model_dir;
use erasure_studio::demo_world::scene::{Background, Colour, Fill, Object, Scene, render_batch};
use erasure_studio::reward::clip::ClipScorer;
use rand::SeedableRng;

fn scorer() -> ClipScorer {
    ClipScorer::load(&demo_model_dir().unwrap().join("clip"), &Device::Cpu).unwrap()
}

#[test]
fn zero_shot_reads_colours_and_similarity_prefers_the_right_caption() {
    let clip = scorer();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(21);
    let scenes: Vec<Scene> = (0..24).map(|_| Scene::sample(&mut rng)).collect();
    let images = render_batch(&scenes, &Device::Cpu).unwrap();
    let texts: Vec<String> = Colour::ALL
        .iter()
        .map(|c| format!("a {} shape", c.word()))
        .collect();
    let probs = clip.zero_shot(&images, &texts).unwrap();
    assert_eq!(probs.dims(), &[24, 6]);
    for row in probs.sum(D::Minus1).unwrap().to_vec1::<f32>().unwrap() {
        assert!((row - 1.0).abs() < 1e-5);
    }
    let picks = probs.argmax(D::Minus1).unwrap().to_vec1::<u32>().unwrap();
    let right = scenes
        .iter()
        .zip(&picks)
        .filter(|(s, p)| s.colour.index() == **p as usize)
        .count();
    assert!(right >= 22, "colour read right on {right}/24");

    // A red striped star matches its own caption better than one with another colour.
    let star = Scene::with_attributes(
        Object::Star,
        Colour::Red,
        Fill::Striped,
        Background::Black,
        &mut rng,
    );
    let image = render_batch(&[star, star], &Device::Cpu).unwrap();
    let texts = [
        "a red striped star on a black background".to_string(),
        "a blue striped star on a black background".to_string(),
    ];
    let sims = clip
        .similarity(&image, &texts)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert!(sims[0] > sims[1], "{sims:?}");
}

#[test]
fn images_of_another_size_are_refused_with_the_sizes() {
    let images = Tensor::zeros((1, 3, 32, 32), candle_core::DType::F32, &Device::Cpu).unwrap();
    let err = scorer().image_features(&images).err().unwrap().to_string();
    assert!(err.contains("64×64") && err.contains("32×32"), "{err}");
}
