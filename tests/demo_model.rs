//! The shipped demo model, loaded through the normal loader, draws what its prompts say: the
//! judge reads fixed-seed generations back, and the pixels carry the named colours about as
//! much as the world's own images do.

use candle_core::{DType, Device, Tensor};
use erasure_studio::demo_world::judge::{Attributes, JudgeNet};
use erasure_studio::demo_world::quality::prompt;
use erasure_studio::demo_world::scene::{Scene, render_batch};
use erasure_studio::demo_world::{Background, Colour, Fill, Object};
use erasure_studio::engine::diffusion::pipeline::{GenerateRequest, SampleHooks, txt2img};
use erasure_studio::engine::io::source::demo_model_dir;
use erasure_studio::engine::{ModelSource, StableDiffusion};

/// Mean colour (0–255) of the pixels of `image` [3, 64, 64] whose distance to `reference` is
/// below 60, and the fraction of such pixels.
fn near(image: &Tensor, reference: [u8; 3]) -> (f64, [f64; 3]) {
    let pixels: Vec<Vec<f32>> = image
        .flatten_from(1)
        .unwrap()
        .t()
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let mut sum = [0.0; 3];
    let mut count = 0;
    for px in &pixels {
        let rgb: [f64; 3] = std::array::from_fn(|c| f64::from(px[c]) * 255.0);
        let dist = rgb
            .iter()
            .zip(reference)
            .map(|(v, r)| (v - f64::from(r)).powi(2))
            .sum::<f64>()
            .sqrt();
        if dist < 60.0 {
            count += 1;
            for (s, v) in sum.iter_mut().zip(rgb) {
                *s += v;
            }
        }
    }
    let mean = sum.map(|s| s / count.max(1) as f64);
    (count as f64 / pixels.len() as f64, mean)
}

#[test]
fn demo_model_draws_what_it_is_told() {
    let dev = Device::Cpu;
    let dir = demo_model_dir().unwrap();
    let sd = StableDiffusion::load(&ModelSource::folder(&dir).unwrap(), &dev, DType::F32).unwrap();
    let judge = JudgeNet::load(&dir.join("judge"), &dev).unwrap();
    let wanted = [
        (Object::Star, Colour::Red, Fill::Striped, Background::Black),
        (Object::Circle, Colour::Blue, Fill::Solid, Background::White),
        (
            Object::Heart,
            Colour::Yellow,
            Fill::Dotted,
            Background::Gray,
        ),
        (
            Object::Square,
            Colour::Green,
            Fill::Outline,
            Background::Black,
        ),
    ]
    .map(|(object, colour, fill, background)| Attributes {
        object,
        colour,
        fill,
        background,
    });
    let req = GenerateRequest {
        prompts: wanted.iter().map(prompt).collect(),
        negative_prompt: String::new(),
        seed: 1234,
        steps: 25,
        guidance_scale: 5.0,
        width: 64,
        height: 64,
        eta: 0.0,
    };
    let (_, images) = txt2img(&sd, &req, SampleHooks::default()).unwrap();
    for (i, (got, want)) in judge
        .predict(&images)
        .unwrap()
        .iter()
        .zip(&wanted)
        .enumerate()
    {
        assert_eq!(got, want, "{}", req.prompts[i]);
        let image = images.get(i).unwrap();
        // The background fills a good part of the frame, in its colour; the object's colour is
        // there too.
        let (bg_share, bg_mean) = near(&image, want.background.rgb());
        assert!(
            bg_share > 0.3,
            "{}: background covers {bg_share:.2}",
            req.prompts[i]
        );
        for c in 0..3 {
            let target = f64::from(want.background.rgb()[c]);
            assert!(
                (bg_mean[c] - target).abs() < 20.0,
                "{}: background {bg_mean:?}",
                req.prompts[i]
            );
        }
        // The object's colour covers at least a third of the area it covers in a centred world
        // image of the same attributes (an outline covers far less than a solid shape, and
        // the decoder softens thin lines).
        let world = Scene {
            object: want.object,
            colour: want.colour,
            fill: want.fill,
            background: want.background,
            radius: 20.0,
            center: (32.0, 32.0),
        };
        let world_image = render_batch(&[world], &dev).unwrap().get(0).unwrap();
        let (world_share, _) = near(&world_image, want.colour.rgb());
        let (fg_share, _) = near(&image, want.colour.rgb());
        assert!(
            fg_share > world_share / 3.0,
            "{}: object colour covers {fg_share:.3} (world image: {world_share:.3})",
            req.prompts[i]
        );
    }
}
