//! Prompts that describe scenes: several templates, sometimes leaving attributes out, so the
//! model learns that an unmentioned attribute may take any value.

use rand::Rng;

use super::scene::{Background, Colour, Fill, Object, Scene};

/// Probability that a caption leaves out each of colour, fill and background.
const DROP_ATTRIBUTE: f64 = 0.2;
/// Probability that a caption says "shape" instead of naming the object.
const DROP_OBJECT: f64 = 0.1;
const TEMPLATES: usize = 5;

/// A prompt and the attributes it names.
#[derive(Debug, Clone, PartialEq)]
pub struct Caption {
    pub text: String,
    pub object: Option<Object>,
    pub colour: Option<Colour>,
    pub fill: Option<Fill>,
    pub background: Option<Background>,
}

impl Caption {
    /// The full description in the canonical template.
    pub fn full(scene: &Scene) -> Self {
        Self::compose(
            0,
            Some(scene.object),
            Some(scene.colour),
            Some(scene.fill),
            Some(scene.background),
            false,
        )
    }

    /// A random description of `scene`: random template, some attributes left out.
    pub fn sample(scene: &Scene, rng: &mut impl Rng) -> Self {
        let template = rng.random_range(0..TEMPLATES);
        let keep = |p: f64, rng: &mut dyn rand::RngCore| !rng.random_bool(p);
        let object = keep(DROP_OBJECT, rng).then_some(scene.object);
        let colour = keep(DROP_ATTRIBUTE, rng).then_some(scene.colour);
        let fill = keep(DROP_ATTRIBUTE, rng).then_some(scene.fill);
        let background = keep(DROP_ATTRIBUTE, rng).then_some(scene.background);
        let fill_first = rng.random_bool(0.3);
        Self::compose(template, object, colour, fill, background, fill_first)
    }

    fn compose(
        template: usize,
        object: Option<Object>,
        colour: Option<Colour>,
        fill: Option<Fill>,
        background: Option<Background>,
        fill_first: bool,
    ) -> Self {
        let noun = object.map_or("shape", Object::word);
        let mut adjectives: Vec<&str> = [colour.map(Colour::word), fill.map(Fill::word)]
            .into_iter()
            .flatten()
            .collect();
        if fill_first {
            adjectives.reverse();
        }
        let described = adjectives
            .iter()
            .copied()
            .chain(std::iter::once(noun))
            .collect::<Vec<_>>()
            .join(" ");
        let bg = background.map(Background::word);
        let text = match (template, bg) {
            (1, _) => {
                let mut parts = vec![format!("{} {noun}", article(noun))];
                parts.extend(adjectives.iter().map(|a| a.to_string()));
                parts.extend(bg.map(|b| format!("on {b}")));
                parts.join(", ")
            }
            (2, Some(b)) => format!("{described} with {} {b} background", article(b)),
            (2, None) => described,
            (3, Some(b)) => format!(
                "{} {b} background with {} {described}",
                article(b),
                article(&described)
            ),
            (4, Some(b)) => format!("a picture of {} {described} on {b}", article(&described)),
            (4, None) => format!("a picture of {} {described}", article(&described)),
            (_, Some(b)) => format!(
                "{} {described} on {} {b} background",
                article(&described),
                article(b)
            ),
            (_, None) => format!("{} {described}", article(&described)),
        };
        Self {
            text,
            object,
            colour,
            fill,
            background,
        }
    }

    /// Whether everything the caption names is true of `scene`.
    pub fn describes(&self, scene: &Scene) -> bool {
        self.object.is_none_or(|o| o == scene.object)
            && self.colour.is_none_or(|c| c == scene.colour)
            && self.fill.is_none_or(|f| f == scene.fill)
            && self.background.is_none_or(|b| b == scene.background)
    }

    /// The attributes a prompt names, read back from its words.
    pub fn parse(text: &str) -> Self {
        let words: Vec<String> = text
            .split(|c: char| !c.is_alphanumeric())
            .filter(|w| !w.is_empty())
            .map(str::to_lowercase)
            .collect();
        let find = |f: &dyn Fn(&str) -> bool| words.iter().position(|w| f(w));
        let pick = |i: Option<usize>| i.map(|i| words[i].as_str());
        Self {
            text: text.to_string(),
            object: pick(find(&|w| Object::from_word(w).is_some())).and_then(Object::from_word),
            colour: pick(find(&|w| Colour::from_word(w).is_some())).and_then(Colour::from_word),
            fill: pick(find(&|w| Fill::from_word(w).is_some())).and_then(Fill::from_word),
            background: pick(find(&|w| Background::from_word(w).is_some()))
                .and_then(Background::from_word),
        }
    }
}

/// "a" or "an" before `phrase`.
fn article(phrase: &str) -> &'static str {
    match phrase.chars().next() {
        Some('a' | 'e' | 'i' | 'o' | 'u') => "an",
        _ => "a",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::demo_world::judge::Attributes;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn full_caption_names_everything() {
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let scene = Scene::with_attributes(
            Object::Star,
            Colour::Red,
            Fill::Striped,
            Background::Black,
            &mut rng,
        );
        assert_eq!(
            Caption::full(&scene).text,
            "a red striped star on a black background"
        );
        let scene = Scene::with_attributes(
            Object::Heart,
            Colour::Orange,
            Fill::Outline,
            Background::Gray,
            &mut rng,
        );
        assert_eq!(
            Caption::full(&scene).text,
            "an orange outline heart on a gray background"
        );
    }

    #[test]
    fn sampled_captions_vary_and_parse_back() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let mut texts = std::collections::HashSet::new();
        let mut partial = 0;
        for _ in 0..500 {
            let scene = Scene::sample(&mut rng);
            let caption = Caption::sample(&scene, &mut rng);
            let parsed = Caption::parse(&caption.text);
            assert_eq!(
                (parsed.object, parsed.colour, parsed.fill, parsed.background),
                (
                    caption.object,
                    caption.colour,
                    caption.fill,
                    caption.background
                ),
                "{}",
                caption.text
            );
            // Whatever a caption names is true of the scene.
            assert!(caption.describes(&scene));
            let other = Scene::sample(&mut rng);
            assert_eq!(
                Caption::full(&other).describes(&scene),
                Attributes::from(&other) == Attributes::from(&scene)
            );
            partial += usize::from(
                caption.colour.is_none() || caption.fill.is_none() || caption.background.is_none(),
            );
            texts.insert(caption.text);
        }
        assert!(texts.len() > 300, "only {} distinct captions", texts.len());
        // 1 − 0.8³ ≈ 49 % of captions leave something out.
        assert!(
            (200..300).contains(&partial),
            "{partial} partial captions of 500"
        );
    }
}
