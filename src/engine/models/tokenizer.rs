//! CLIP's byte-level BPE tokenizer, id-for-id identical to transformers' `CLIPTokenizer`.
//!
//! Text is split around special tokens, then each piece is NFC-normalised, whitespace runs become
//! one space, it is lower-cased, split by CLIP's pattern, mapped to byte-level characters and
//! merged by BPE with `</w>` marking the end of each word.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, bail};
use regex::Regex;
use serde::Deserialize;
use unicode_normalization::UnicodeNormalization;

const WORD_PATTERN: &str = r"'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+";
pub const END_OF_WORD: &str = "</w>";
const DEFAULT_MAX_LENGTH: usize = 77;

pub struct ClipTokenizer {
    vocab: HashMap<String, u32>,
    merge_ranks: HashMap<(String, String), usize>,
    byte_chars: [char; 256],
    word_pattern: Regex,
    whitespace: Regex,
    /// Special token strings, longest first, matched in the raw text before normalisation.
    specials: Vec<(String, u32)>,
    bos: u32,
    eos: u32,
    pad: u32,
    unk: u32,
    max_length: usize,
}

/// Special-token settings from `tokenizer_config.json` / `special_tokens_map.json`.
#[derive(Default, Deserialize)]
struct SpecialTokens {
    bos_token: Option<TokenSpec>,
    eos_token: Option<TokenSpec>,
    unk_token: Option<TokenSpec>,
    pad_token: Option<TokenSpec>,
    model_max_length: Option<f64>,
    /// Tokens added after training (textual inversion), by id.
    added_tokens_decoder: Option<HashMap<String, TokenSpec>>,
}

#[derive(Deserialize, Clone)]
#[serde(untagged)]
enum TokenSpec {
    Plain(String),
    Detailed { content: String },
}

impl TokenSpec {
    fn content(&self) -> &str {
        match self {
            TokenSpec::Plain(s) => s,
            TokenSpec::Detailed { content } => content,
        }
    }
}

#[derive(Deserialize)]
struct TokenizerJson {
    model: TokenizerJsonModel,
    #[serde(default)]
    added_tokens: Vec<AddedToken>,
}

#[derive(Deserialize)]
struct AddedToken {
    id: u32,
    content: String,
}

#[derive(Deserialize)]
struct TokenizerJsonModel {
    vocab: HashMap<String, u32>,
    merges: Vec<MergeSpec>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum MergeSpec {
    Joined(String),
    Pair(String, String),
}

impl ClipTokenizer {
    /// Loads a `tokenizer/` folder: `tokenizer.json` when present, else `vocab.json` +
    /// `merges.txt`; special tokens and length from the optional config files.
    pub fn from_dir(dir: &Path) -> anyhow::Result<Self> {
        if !dir.is_dir() {
            bail!("tokenizer folder {} not found", dir.display());
        }
        let mut specials = SpecialTokens::default();
        for name in ["tokenizer_config.json", "special_tokens_map.json"] {
            let path = dir.join(name);
            if path.exists() {
                let found: SpecialTokens = crate::engine::io::config::read_json(&path)?;
                specials.merge(found);
            }
        }
        // Added tokens (textual-inversion words, specials) are matched whole in the raw text.
        let mut added: Vec<(String, u32)> = Vec::new();
        if let Some(decoder) = specials.added_tokens_decoder.take() {
            for (id, spec) in decoder {
                let id = id.parse().with_context(|| {
                    format!("{}: added token id `{id}` is not a number", dir.display())
                })?;
                added.push((spec.content().to_string(), id));
            }
        }
        let added_path = dir.join("added_tokens.json");
        if added_path.exists() {
            let map: HashMap<String, u32> = crate::engine::io::config::read_json(&added_path)?;
            added.extend(map);
        }
        let json_path = dir.join("tokenizer.json");
        let (vocab, merges) = if json_path.exists() {
            let parsed: TokenizerJson = crate::engine::io::config::read_json(&json_path)?;
            added.extend(parsed.added_tokens.into_iter().map(|t| (t.content, t.id)));
            let merges = parsed
                .model
                .merges
                .into_iter()
                .map(|m| match m {
                    MergeSpec::Pair(a, b) => Ok((a, b)),
                    MergeSpec::Joined(s) => split_merge(&s)
                        .with_context(|| format!("{}: bad merge `{s}`", json_path.display())),
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            (parsed.model.vocab, merges)
        } else {
            let vocab_path = dir.join("vocab.json");
            let merges_path = dir.join("merges.txt");
            let vocab: HashMap<String, u32> = crate::engine::io::config::read_json(&vocab_path)?;
            let text = std::fs::read_to_string(&merges_path)
                .with_context(|| format!("cannot read {}", merges_path.display()))?;
            let merges = text
                .lines()
                .filter(|l| !l.starts_with("#version") && !l.trim().is_empty())
                .map(|l| {
                    split_merge(l)
                        .with_context(|| format!("{}: bad merge line `{l}`", merges_path.display()))
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            (vocab, merges)
        };
        Self::new(vocab, merges, specials, added)
            .with_context(|| format!("tokenizer {}", dir.display()))
    }

    fn new(
        mut vocab: HashMap<String, u32>,
        merges: Vec<(String, String)>,
        specials: SpecialTokens,
        added: Vec<(String, u32)>,
    ) -> anyhow::Result<Self> {
        for (text, id) in &added {
            vocab.entry(text.clone()).or_insert(*id);
        }
        let token = |spec: &Option<TokenSpec>, default: &str| -> anyhow::Result<(String, u32)> {
            let text = spec.as_ref().map_or(default, |s| s.content()).to_string();
            let id = *vocab
                .get(&text)
                .with_context(|| format!("special token `{text}` is not in the vocabulary"))?;
            Ok((text, id))
        };
        let bos = token(&specials.bos_token, "<|startoftext|>")?;
        let eos = token(&specials.eos_token, "<|endoftext|>")?;
        let unk = token(&specials.unk_token, "<|endoftext|>")?;
        let pad = token(&specials.pad_token, "<|endoftext|>")?;
        let mut special_list = vec![bos.clone(), eos.clone(), unk.clone(), pad.clone()];
        special_list.extend(added);
        special_list.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.0.cmp(&b.0)));
        special_list.dedup();
        let max_length = match specials.model_max_length {
            Some(n) if (2.0..=1e6).contains(&n) => n as usize,
            _ => DEFAULT_MAX_LENGTH,
        };
        let merge_ranks = merges
            .into_iter()
            .enumerate()
            .map(|(rank, pair)| (pair, rank))
            .collect();
        Ok(Self {
            vocab,
            merge_ranks,
            byte_chars: bytes_to_unicode(),
            word_pattern: Regex::new(WORD_PATTERN).expect("valid pattern"),
            whitespace: Regex::new(r"\s+").expect("valid pattern"),
            specials: special_list,
            bos: bos.1,
            eos: eos.1,
            pad: pad.1,
            unk: unk.1,
            max_length,
        })
    }

    pub fn max_length(&self) -> usize {
        self.max_length
    }

    pub fn pad_id(&self) -> u32 {
        self.pad
    }

    pub fn eos_id(&self) -> u32 {
        self.eos
    }

    /// Ids of `text` as the model sees them: start token, at most `max_length - 2` text tokens,
    /// end token, then padding to `max_length`.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut ids = Vec::with_capacity(self.max_length);
        ids.push(self.bos);
        let mut body = self.tokenize(text);
        body.truncate(self.max_length - 2);
        ids.extend(body);
        ids.push(self.eos);
        ids.resize(self.max_length, self.pad);
        ids
    }

    /// Text token ids without start, end or padding tokens.
    pub fn tokenize(&self, text: &str) -> Vec<u32> {
        let mut ids = Vec::new();
        let mut rest = text;
        while !rest.is_empty() {
            match self.next_special(rest) {
                Some((start, len, id)) => {
                    self.tokenize_plain(&rest[..start], &mut ids);
                    ids.push(id);
                    rest = &rest[start + len..];
                }
                None => {
                    self.tokenize_plain(rest, &mut ids);
                    rest = "";
                }
            }
        }
        ids
    }

    /// The leftmost special token in `text` (longest on ties): byte offset, length and id.
    fn next_special(&self, text: &str) -> Option<(usize, usize, u32)> {
        self.specials
            .iter()
            .filter_map(|(s, id)| text.find(s.as_str()).map(|pos| (pos, s.len(), *id)))
            .min_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)))
    }

    fn tokenize_plain(&self, text: &str, ids: &mut Vec<u32>) {
        if text.is_empty() {
            return;
        }
        let normalized: String = text.nfc().collect();
        let normalized = self.whitespace.replace_all(&normalized, " ").to_lowercase();
        for word in self.word_pattern.find_iter(&normalized) {
            let mapped: String = word
                .as_str()
                .bytes()
                .map(|b| self.byte_chars[b as usize])
                .collect();
            for piece in self.bpe(&mapped) {
                ids.push(self.vocab.get(&piece).copied().unwrap_or(self.unk));
            }
        }
    }

    /// Applies the merges to one word, lowest rank first.
    fn bpe(&self, word: &str) -> Vec<String> {
        let mut symbols: Vec<String> = word.chars().map(String::from).collect();
        if let Some(last) = symbols.last_mut() {
            last.push_str(END_OF_WORD);
        }
        loop {
            let best = symbols
                .windows(2)
                .enumerate()
                .filter_map(|(i, pair)| {
                    self.merge_ranks
                        .get(&(pair[0].clone(), pair[1].clone()))
                        .map(|&rank| (rank, i))
                })
                .min();
            let Some((rank, _)) = best else { break };
            let mut merged = Vec::with_capacity(symbols.len());
            let mut i = 0;
            while i < symbols.len() {
                if i + 1 < symbols.len()
                    && self
                        .merge_ranks
                        .get(&(symbols[i].clone(), symbols[i + 1].clone()))
                        == Some(&rank)
                {
                    merged.push(format!("{}{}", symbols[i], symbols[i + 1]));
                    i += 2;
                } else {
                    merged.push(symbols[i].clone());
                    i += 1;
                }
            }
            symbols = merged;
        }
        symbols
    }
}

impl SpecialTokens {
    fn merge(&mut self, other: SpecialTokens) {
        self.bos_token = other.bos_token.or(self.bos_token.take());
        self.eos_token = other.eos_token.or(self.eos_token.take());
        self.unk_token = other.unk_token.or(self.unk_token.take());
        self.pad_token = other.pad_token.or(self.pad_token.take());
        self.model_max_length = other.model_max_length.or(self.model_max_length);
        self.added_tokens_decoder = other
            .added_tokens_decoder
            .or(self.added_tokens_decoder.take());
    }
}

fn split_merge(line: &str) -> anyhow::Result<(String, String)> {
    let mut parts = line.split(' ');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(a), Some(b), None) if !a.is_empty() && !b.is_empty() => {
            Ok((a.to_string(), b.to_string()))
        }
        _ => bail!("expected two symbols separated by one space"),
    }
}

/// GPT-2's reversible map from bytes to printable characters.
pub fn bytes_to_unicode() -> [char; 256] {
    let printable = |b: u32| {
        (u32::from('!')..=u32::from('~')).contains(&b)
            || (0xA1..=0xAC).contains(&b)
            || (0xAE..=0xFF).contains(&b)
    };
    let mut table = ['\0'; 256];
    let mut next_extra = 256u32;
    for b in 0..256u32 {
        let code = if printable(b) {
            b
        } else {
            next_extra += 1;
            next_extra - 1
        };
        table[b as usize] = char::from_u32(code).expect("valid code point");
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_map_is_a_bijection_onto_printable_chars() {
        let table = bytes_to_unicode();
        let mut seen: Vec<char> = table.to_vec();
        seen.sort();
        seen.dedup();
        assert_eq!(seen.len(), 256);
        assert_eq!(table[b'a' as usize], 'a');
        assert_eq!(table[b' ' as usize], 'Ġ');
    }

    #[test]
    fn bpe_merges_by_rank_and_marks_word_end() {
        let mut vocab = HashMap::new();
        for (i, t) in [
            "<|startoftext|>",
            "<|endoftext|>",
            "a",
            "b",
            "b</w>",
            "ab</w>",
            "a</w>",
        ]
        .iter()
        .enumerate()
        {
            vocab.insert(t.to_string(), i as u32);
        }
        let merges = vec![("a".to_string(), "b</w>".to_string())];
        let tok = ClipTokenizer::new(vocab, merges, SpecialTokens::default(), vec![]).unwrap();
        assert_eq!(tok.tokenize("AB a"), vec![5, 6]);
        let ids = tok.encode("ab");
        assert_eq!(&ids[..4], &[0, 5, 1, 1]);
        assert_eq!(ids.len(), 77);
    }
}
