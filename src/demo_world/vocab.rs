//! The demo model's tokenizer: CLIP's byte-level BPE format, with merges learned from the
//! world's captions so that every world word is one token (other text still tokenizes, byte by
//! byte).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::Context;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::captions::Caption;
use super::scene::Scene;
use crate::engine::models::tokenizer::{END_OF_WORD, bytes_to_unicode};

const BOS: &str = "<|startoftext|>";
const EOS: &str = "<|endoftext|>";

/// Vocabulary (token → id, ids in CLIP's order: bytes, bytes + `</w>`, merges, specials) and
/// merges, learned from `captions` sampled captions.
pub fn learn(captions: usize, seed: u64) -> (BTreeMap<String, u32>, Vec<(String, String)>) {
    let byte_chars = bytes_to_unicode();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut word_counts: BTreeMap<String, usize> = BTreeMap::new();
    for _ in 0..captions {
        let caption = Caption::sample(&Scene::sample(&mut rng), &mut rng);
        for word in caption
            .text
            .split(|c: char| !c.is_alphanumeric())
            .filter(|w| !w.is_empty())
        {
            *word_counts.entry(word.to_string()).or_default() += 1;
        }
    }
    // Each word as symbols, the last carrying the end-of-word mark.
    let mut words: Vec<(Vec<String>, usize)> = word_counts
        .iter()
        .map(|(w, &n)| {
            let mut symbols: Vec<String> = w
                .bytes()
                .map(|b| byte_chars[b as usize].to_string())
                .collect();
            if let Some(last) = symbols.last_mut() {
                last.push_str(END_OF_WORD);
            }
            (symbols, n)
        })
        .collect();
    let mut merges = Vec::new();
    loop {
        let mut pairs: HashMap<(String, String), usize> = HashMap::new();
        for (symbols, n) in &words {
            for pair in symbols.windows(2) {
                *pairs.entry((pair[0].clone(), pair[1].clone())).or_default() += n;
            }
        }
        // Most frequent pair; ties broken by the pair itself so the result is deterministic.
        let Some(best) = pairs
            .into_iter()
            .max_by(|a, b| a.1.cmp(&b.1).then_with(|| b.0.cmp(&a.0)))
            .map(|(pair, _)| pair)
        else {
            break;
        };
        for (symbols, _) in &mut words {
            let mut merged = Vec::with_capacity(symbols.len());
            let mut i = 0;
            while i < symbols.len() {
                if i + 1 < symbols.len() && symbols[i] == best.0 && symbols[i + 1] == best.1 {
                    merged.push(format!("{}{}", best.0, best.1));
                    i += 2;
                } else {
                    merged.push(symbols[i].clone());
                    i += 1;
                }
            }
            *symbols = merged;
        }
        merges.push(best);
    }
    let mut tokens: Vec<String> = byte_chars.iter().map(|c| c.to_string()).collect();
    tokens.extend(byte_chars.iter().map(|c| format!("{c}{END_OF_WORD}")));
    tokens.extend(merges.iter().map(|(a, b)| format!("{a}{b}")));
    tokens.push(BOS.into());
    tokens.push(EOS.into());
    let vocab = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| (t, i as u32))
        .collect();
    (vocab, merges)
}

/// Writes a `tokenizer/` folder in the layout SD 1.x repos use; prompts are padded or cut to
/// `max_length` tokens.
pub fn write_tokenizer(
    dir: &Path,
    captions: usize,
    seed: u64,
    max_length: usize,
) -> anyhow::Result<()> {
    let (vocab, merges) = learn(captions, seed);
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let merges_txt: String = std::iter::once("#version: 0.2".to_string())
        .chain(merges.iter().map(|(a, b)| format!("{a} {b}")))
        .map(|l| l + "\n")
        .collect();
    let config = serde_json::json!({
        "model_max_length": max_length,
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": EOS,
        "pad_token": EOS,
        "tokenizer_class": "CLIPTokenizer",
    });
    let specials =
        serde_json::json!({"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS});
    crate::fs::write_atomic(
        &dir.join("vocab.json"),
        serde_json::to_string(&vocab)?.as_bytes(),
    )?;
    crate::fs::write_atomic(&dir.join("merges.txt"), merges_txt.as_bytes())?;
    crate::fs::write_atomic(
        &dir.join("tokenizer_config.json"),
        serde_json::to_string_pretty(&config)?.as_bytes(),
    )?;
    crate::fs::write_atomic(
        &dir.join("special_tokens_map.json"),
        serde_json::to_string_pretty(&specials)?.as_bytes(),
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::demo_world::{Background, Colour, Fill, Object};
    use crate::engine::models::tokenizer::ClipTokenizer;

    #[test]
    fn every_world_word_is_one_token_and_other_text_still_tokenizes() {
        let dir = std::env::temp_dir().join(format!("demo-tokenizer-{}", std::process::id()));
        write_tokenizer(&dir, 2000, 0, 24).unwrap();
        let tok = ClipTokenizer::from_dir(&dir).unwrap();
        let words = Object::ALL
            .iter()
            .map(|o| o.word())
            .chain(Colour::ALL.iter().map(|c| c.word()))
            .chain(Fill::ALL.iter().map(|f| f.word()))
            .chain(Background::ALL.iter().map(|b| b.word()))
            .chain([
                "a",
                "an",
                "on",
                "background",
                "with",
                "picture",
                "of",
                "shape",
            ]);
        for word in words {
            assert_eq!(
                tok.tokenize(word).len(),
                1,
                "`{word}` is not a single token"
            );
        }
        let ids = tok.encode("a red striped star on a black background");
        assert_eq!(
            ids.iter().filter(|&&i| i != tok.pad_id()).count(),
            9,
            "bos + 8 words; eos is the pad"
        );
        assert!(
            tok.tokenize("a zebra").len() > 2,
            "unknown words fall back to byte tokens"
        );
        // Learning is deterministic.
        assert_eq!(learn(500, 3), learn(500, 3));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
