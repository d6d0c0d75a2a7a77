//! Allocator tuning for tensor workloads.
//!
//! A training step allocates and frees thousands of tensor buffers of a few MiB. glibc's
//! defaults hand such buffers back to the kernel on free (mmap threshold, heap trimming), so
//! every step faults the same pages in again and zeroes them: a third of a step's time on the
//! demo CLIP. Raising the thresholds keeps the memory in the process for reuse, and turning off
//! mmap for the largest buffers (over glibc's 32 MiB threshold ceiling: im2col scratch, SD
//! feed-forward activations) stops the kernel from zeroing fresh pages for them on every call,
//! 15 % of an SD UNet forward at 64×64 latents. All threads share the one arena these settings
//! govern: glibc gives other threads arenas of their own, made of 64 MiB heaps that cannot hold
//! an SD decoder's activations, and a decode run on a pool worker took a fifth longer.

/// Keeps freed tensor memory in the process. Call once at start-up; no effect off glibc.
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; it is called before other threads run.
    unsafe {
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 256 << 20);
        // No mmap at all: glibc would still mmap anything over 32 MiB, its threshold's ceiling.
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}
