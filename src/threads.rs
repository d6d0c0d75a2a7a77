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

/// Runs `f` on a worker thread of rayon's pool and waits for it. A parallel op started outside
/// the pool hands its work to the workers and sleeps until they are done, a wake-up and a
/// sleep for every op; started on a worker, it splits its work by stealing and the starting
/// thread computes too. For long computations (a command, a studio job): a demo UNet step
/// takes a fifth less time on a worker, a demo DDPO epoch 6 % less. The results are the same
/// bit for bit, since every op divides its work by the pool's size, not by thread.
pub fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| f())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn on_pool_runs_the_closure_on_a_worker_and_returns_its_value() {
        assert!(rayon::current_thread_index().is_none());
        let (index, value) = on_pool(|| (rayon::current_thread_index(), 6 * 7));
        assert!(index.is_some(), "the closure ran outside the pool");
        assert_eq!(value, 42);
    }
}
