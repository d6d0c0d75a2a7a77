//! `erasure-studio`: the command-line entry point.

mod cli;

fn main() {
    erasure_studio::allocator::keep_freed_memory();
    // SAFETY: first thing in `main`, before any other thread starts.
    unsafe { erasure_studio::threads::use_one_pool() };
    if let Err(e) = cli::run() {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
