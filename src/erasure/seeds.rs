//! The seed ranges of an erasure run, in one place so that they never overlap: training draws
//! below 2^32 (plus a batch), evaluation starts at 2^40, previews at 2^41. Image `i` of a batch
//! uses its batch's seed + `i`.

use rand::Rng;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// The first evaluation seed: far above every training seed.
pub const EVALUATION: u64 = 1 << 40;

/// The seed of the preview grids' first column: far from training and evaluation seeds.
pub const PREVIEW: u64 = 1 << 41;

/// Seed of the fixed shuffles that pick prompts (held out for evaluation, or shown), so every
/// run of a preset picks the same ones.
const PROMPT_SHUFFLE: u64 = 0x5eed;

/// A training batch's seed, one draw from the epoch's random stream.
pub fn training(rng: &mut impl Rng) -> u64 {
    u64::from(rng.random::<u32>())
}

/// The random stream of the fixed prompt shuffles.
pub fn prompt_shuffle() -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(PROMPT_SHUFFLE)
}
