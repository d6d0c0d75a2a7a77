//! Scenes of the demo world and their deterministic rendering.

use image::{Rgb, RgbImage};
use rand::Rng;
use rayon::prelude::*;
use std::sync::LazyLock;

/// Side of every demo-world image, in pixels.
pub const IMAGE_SIZE: u32 = 64;
/// Anti-aliasing: samples per pixel along each axis.
const SUPERSAMPLE: u32 = 3;
/// Width of an outline, and of the border drawn around patterned fills, in pixels.
const OUTLINE_WIDTH: f64 = 2.5;
/// Period of stripes and dots, in pixels: coarse enough to survive a 4× down-sampling VAE.
const PATTERN_PERIOD: f64 = 8.0;
const DOT_RADIUS: f64 = 2.3;

/// Declares an attribute enum with its prompt words, in a fixed order.
macro_rules! attribute {
    ($(#[$doc:meta])* $name:ident { $($variant:ident => $word:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum $name {
            $($variant),+
        }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The word prompts use for this value.
            pub fn word(self) -> &'static str {
                match self {
                    $($name::$variant => $word),+
                }
            }

            pub fn from_word(word: &str) -> Option<Self> {
                Self::ALL.iter().copied().find(|v| v.word() == word)
            }

            pub fn index(self) -> usize {
                self as usize
            }
        }
    };
}

attribute!(
    /// The one object in a scene.
    Object {
        Circle => "circle",
        Square => "square",
        Triangle => "triangle",
        Star => "star",
        Heart => "heart",
    }
);

attribute!(
    /// The object's colour.
    Colour {
        Red => "red",
        Green => "green",
        Blue => "blue",
        Yellow => "yellow",
        Purple => "purple",
        Orange => "orange",
    }
);

attribute!(
    /// How the object is painted.
    Fill {
        Solid => "solid",
        Striped => "striped",
        Dotted => "dotted",
        Outline => "outline",
    }
);

attribute!(
    /// The plain background.
    Background {
        White => "white",
        Black => "black",
        Gray => "gray",
    }
);

impl Colour {
    pub fn rgb(self) -> [u8; 3] {
        match self {
            Colour::Red => [220, 40, 40],
            Colour::Green => [40, 170, 60],
            Colour::Blue => [45, 85, 225],
            Colour::Yellow => [240, 210, 40],
            Colour::Purple => [150, 60, 190],
            Colour::Orange => [245, 140, 30],
        }
    }
}

impl Background {
    pub fn rgb(self) -> [u8; 3] {
        match self {
            Background::White => [245, 245, 245],
            Background::Black => [15, 15, 15],
            Background::Gray => [128, 128, 128],
        }
    }
}

/// One image of the world: the attributes plus the small variations of size and position.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scene {
    pub object: Object,
    pub colour: Colour,
    pub fill: Fill,
    pub background: Background,
    /// Circumradius of the object, in pixels.
    pub radius: f64,
    /// Centre of the object, in pixels.
    pub center: (f64, f64),
}

impl Scene {
    /// Random attributes, size and position.
    pub fn sample(rng: &mut impl Rng) -> Self {
        let pick = |rng: &mut dyn rand::RngCore, n: usize| rng.random_range(0..n);
        let object = Object::ALL[pick(rng, Object::ALL.len())];
        let colour = Colour::ALL[pick(rng, Colour::ALL.len())];
        let fill = Fill::ALL[pick(rng, Fill::ALL.len())];
        let background = Background::ALL[pick(rng, Background::ALL.len())];
        Self::with_attributes(object, colour, fill, background, rng)
    }

    /// Given attributes, with random size and position.
    pub fn with_attributes(
        object: Object,
        colour: Colour,
        fill: Fill,
        background: Background,
        rng: &mut impl Rng,
    ) -> Self {
        let half = IMAGE_SIZE as f64 / 2.0;
        Self {
            object,
            colour,
            fill,
            background,
            radius: rng.random_range(17.0..23.0),
            center: (
                half + rng.random_range(-4.0..4.0),
                half + rng.random_range(-4.0..4.0),
            ),
        }
    }

    /// Renders the scene with anti-aliased edges.
    pub fn render(&self) -> RgbImage {
        let fg = self.colour.rgb().map(f64::from);
        let bg = self.background.rgb().map(f64::from);
        let n = SUPERSAMPLE;
        let samples = f64::from(n * n);
        RgbImage::from_fn(IMAGE_SIZE, IMAGE_SIZE, |px, py| {
            let mut covered = 0u32;
            for sy in 0..n {
                for sx in 0..n {
                    let x = f64::from(px) + (f64::from(sx) + 0.5) / f64::from(n);
                    let y = f64::from(py) + (f64::from(sy) + 0.5) / f64::from(n);
                    covered += u32::from(self.painted(x, y));
                }
            }
            let a = f64::from(covered) / samples;
            Rgb(std::array::from_fn(|c| {
                (a * fg[c] + (1.0 - a) * bg[c]).round() as u8
            }))
        })
    }

    fn inside(&self, x: f64, y: f64) -> bool {
        let r = self.radius;
        self.object
            .contains((x - self.center.0) / r, (y - self.center.1) / r)
    }

    /// Whether an inside point lies within `OUTLINE_WIDTH` of the edge: some point that far
    /// away, in one of 12 directions, is outside. Gives bands of even width on every shape.
    fn near_edge(&self, x: f64, y: f64) -> bool {
        (0..12).any(|k| {
            let angle = k as f64 * std::f64::consts::TAU / 12.0;
            !self.inside(
                x + OUTLINE_WIDTH * angle.cos(),
                y + OUTLINE_WIDTH * angle.sin(),
            )
        })
    }

    /// Whether the point (in pixels) takes the object's colour.
    fn painted(&self, x: f64, y: f64) -> bool {
        if !self.inside(x, y) {
            return false;
        }
        let (u, v) = (x - self.center.0, y - self.center.1);
        match self.fill {
            Fill::Solid => true,
            Fill::Outline => self.near_edge(x, y),
            // Diagonal bands, half colour, half background, inside an outline.
            Fill::Striped => {
                (u + v).rem_euclid(PATTERN_PERIOD) < PATTERN_PERIOD / 2.0 || self.near_edge(x, y)
            }
            // A square grid of round dots inside an outline.
            Fill::Dotted => {
                let du = u.rem_euclid(PATTERN_PERIOD) - PATTERN_PERIOD / 2.0;
                let dv = v.rem_euclid(PATTERN_PERIOD) - PATTERN_PERIOD / 2.0;
                du * du + dv * dv < DOT_RADIUS * DOT_RADIUS || self.near_edge(x, y)
            }
        }
    }
}

/// Scenes rendered into a batch [B, 3, 64, 64] in [0, 1].
pub fn render_batch(
    scenes: &[Scene],
    device: &candle_core::Device,
) -> candle_core::Result<candle_core::Tensor> {
    let items = scenes
        .par_iter()
        .map(|s| crate::images::to_tensor(&s.render(), device))
        .collect::<candle_core::Result<Vec<_>>>()?;
    candle_core::Tensor::stack(&items, 0)
}

static TRIANGLE: LazyLock<Vec<(f64, f64)>> = LazyLock::new(|| regular_polygon(3, 1.0, 1.0));
static STAR: LazyLock<Vec<(f64, f64)>> = LazyLock::new(|| regular_polygon(5, 1.0, 0.42));

impl Object {
    /// Whether (u, v), in units of the circumradius around the centre (v pointing down), is
    /// inside the shape.
    pub fn contains(self, u: f64, v: f64) -> bool {
        match self {
            Object::Circle => u * u + v * v <= 1.0,
            Object::Square => u.abs() <= 0.75 && v.abs() <= 0.75,
            Object::Triangle => in_polygon(&TRIANGLE, u, v - 0.15),
            Object::Star => in_polygon(&STAR, u, v - 0.05),
            Object::Heart => {
                // The classic heart curve (x² + y² − 1)³ ≤ x²·y³, scaled to the unit circle.
                let (x, y) = (u * 1.15, -v * 1.15 + 0.15);
                (x * x + y * y - 1.0).powi(3) <= x * x * y.powi(3)
            }
        }
    }
}

/// Vertices of a regular star polygon with `points` tips at radius `outer` (pointing up) and
/// inner corners at `inner`; `inner == outer` gives a plain regular polygon.
fn regular_polygon(points: usize, outer: f64, inner: f64) -> Vec<(f64, f64)> {
    let corners = if inner == outer { points } else { 2 * points };
    (0..corners)
        .map(|i| {
            let r = if i % 2 == 1 && inner != outer {
                inner
            } else {
                outer
            };
            let angle =
                -std::f64::consts::FRAC_PI_2 + i as f64 * std::f64::consts::TAU / corners as f64;
            (r * angle.cos(), r * angle.sin())
        })
        .collect()
}

/// Even-odd point-in-polygon test.
fn in_polygon(poly: &[(f64, f64)], x: f64, y: f64) -> bool {
    let mut inside = false;
    let mut j = poly.len() - 1;
    for i in 0..poly.len() {
        let ((xi, yi), (xj, yj)) = (poly[i], poly[j]);
        if (yi > y) != (yj > y) && x < (xj - xi) * (y - yi) / (yj - yi) + xi {
            inside = !inside;
        }
        j = i;
    }
    inside
}

/// Scenes rendered side by side, row-major.
pub fn grid(scenes: &[Scene], columns: usize) -> RgbImage {
    let side = IMAGE_SIZE;
    let cols = columns.clamp(1, scenes.len().max(1));
    let rows = scenes.len().div_ceil(cols);
    let mut out = RgbImage::new(cols as u32 * side, rows as u32 * side);
    for (i, scene) in scenes.iter().enumerate() {
        let (x, y) = (
            (i % cols) as i64 * side as i64,
            (i / cols) as i64 * side as i64,
        );
        image::imageops::overlay(&mut out, &scene.render(), x, y);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    fn count(img: &RgbImage, rgb: [u8; 3]) -> usize {
        img.pixels().filter(|p| p.0 == rgb).count()
    }

    #[test]
    fn rendering_is_deterministic_and_uses_the_palette() {
        let mut a = ChaCha8Rng::seed_from_u64(1);
        let mut b = ChaCha8Rng::seed_from_u64(1);
        for _ in 0..20 {
            let (sa, sb) = (Scene::sample(&mut a), Scene::sample(&mut b));
            assert_eq!(sa, sb);
            let img = sa.render();
            assert_eq!(img, sb.render());
            // Most pixels are exactly background or object colour; the rest are edges.
            let pure = count(&img, sa.colour.rgb()) + count(&img, sa.background.rgb());
            assert!(pure as f64 > 0.8 * 64.0 * 64.0, "{sa:?}");
            assert!(
                count(&img, sa.colour.rgb()) > 60,
                "{sa:?}: object too small"
            );
        }
    }

    #[test]
    fn fills_paint_different_amounts_of_the_shape() {
        for object in Object::ALL {
            // The same seed for every fill: same size and position.
            let coverage = |fill| {
                let mut rng = ChaCha8Rng::seed_from_u64(2);
                let scene =
                    Scene::with_attributes(*object, Colour::Red, fill, Background::Black, &mut rng);
                count(&scene.render(), Colour::Red.rgb())
            };
            let (solid, striped, dotted, outline) = (
                coverage(Fill::Solid),
                coverage(Fill::Striped),
                coverage(Fill::Dotted),
                coverage(Fill::Outline),
            );
            assert!(
                solid > striped && striped > outline,
                "{object:?}: {solid} {striped} {outline}"
            );
            assert!(
                solid > dotted && dotted > outline,
                "{object:?}: {solid} {dotted} {outline}"
            );
        }
    }

    #[test]
    fn shapes_differ_from_each_other() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let masks: Vec<Vec<bool>> = Object::ALL
            .iter()
            .map(|&o| {
                let mut s = Scene::with_attributes(
                    o,
                    Colour::Blue,
                    Fill::Solid,
                    Background::White,
                    &mut rng,
                );
                s.center = (32.0, 32.0);
                s.radius = 20.0;
                s.render()
                    .pixels()
                    .map(|p| p.0 == Colour::Blue.rgb())
                    .collect()
            })
            .collect();
        for i in 0..masks.len() {
            for j in i + 1..masks.len() {
                let differ = masks[i]
                    .iter()
                    .zip(&masks[j])
                    .filter(|(a, b)| a != b)
                    .count();
                assert!(
                    differ > 150,
                    "{:?} vs {:?}: {differ} pixels differ",
                    Object::ALL[i],
                    Object::ALL[j]
                );
            }
        }
    }
}
