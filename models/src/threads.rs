//! CPU thread count, fixed once per process.
//!
//! candle decides how many threads a CPU matmul uses by reading `RAYON_NUM_THREADS`, and when
//! it is unset, by parsing /proc/cpuinfo — on every dense matmul (candle 0.11 `utils.rs`). A
//! decode step runs dozens of small attention matmuls, so that parse cost about a quarter of decode
//! time. Binaries call [`pin_cpu_threads`] first thing, before any other thread starts,
//! which writes the count once into the environment variable candle reads.

/// Sets `RAYON_NUM_THREADS` (unless the user already did) to `threads`, or to candle's own
/// default, and returns the count in effect. Call before spawning threads: changing the
/// environment of a multi-threaded process is racy.
pub fn pin_cpu_threads(threads: Option<usize>) -> usize {
    if let Some(n) = std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|s| s.parse::<usize>().ok())
    {
        if n > 0 {
            return n;
        }
    }
    let n = threads
        .filter(|&n| n > 0)
        .unwrap_or_else(candle_core::utils::get_num_threads);
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    n
}
