//! Thread pools.
//!
//! candle runs its large element-wise ops on a private barrier pool whose workers spin between
//! calls, while the GEMMs and the engine's own kernels run on rayon's pool, whose workers also
//! spin before they sleep. With both pools, each pool's idle workers spin on the cores the
//! other is computing on: on a 2-core machine a demo DDPO epoch spent a fifth of its time
//! there. Most element-wise work is fused into the engine's kernels, so the rest runs on the
//! calling thread and rayon's pool is the only one.

/// The variable candle sizes its barrier pool by (threads including the caller).
const CANDLE_POOL_THREADS: &str = "CANDLE_NUM_THREADS";

/// Leaves rayon's pool as the only worker pool, unless the user sized candle's pool. Call at
/// start-up, before the first tensor op.
///
/// # Safety
/// It sets an environment variable: no other thread may be running.
pub unsafe fn use_one_pool() {
    if std::env::var_os(CANDLE_POOL_THREADS).is_none() {
        // SAFETY: the caller guarantees no other thread runs.
        unsafe { std::env::set_var(CANDLE_POOL_THREADS, "1") };
    }
}
