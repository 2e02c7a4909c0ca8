//! The process's memory as the operating system sees it: resident size for /metrics, and
//! handing freed heap memory back once the engine goes idle.
//!
//! glibc's allocator keeps freed memory in per-thread arenas for reuse: after a few large
//! requests (an 8,000-token prefill allocates hundreds of MiB of activations across the rayon
//! threads' arenas) the resident size stayed several times the idle figure although nothing
//! was in use. `malloc_trim(0)` returns the free pages of every arena to the kernel. The
//! engine calls [`release_free_memory`] when it has been idle for a moment (not between
//! back-to-back steps, where the memory is about to be reused), so a burst's peak does not
//! become the server's permanent size. Measured with `scripts/soak/soak.py`: docs/SOAK.md.

/// Returns free heap memory to the operating system; a no-op where the C library has no
/// `malloc_trim` (it is a glibc extension).
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes a padding size and only releases memory glibc's allocator
    // holds free; it is thread-safe (it locks each arena) and touches no Rust-owned memory.
    #[allow(unsafe_code)]
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The process's resident set size in bytes (`VmRSS` in `/proc/self/status`, Linux); `None`
/// elsewhere or if it cannot be read.
pub fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_os = "linux")]
    #[test]
    fn resident_size_grows_with_touched_memory() {
        let before = resident_bytes().unwrap();
        let block = vec![1u8; 64 << 20];
        let during = resident_bytes().unwrap();
        assert!(during >= before + (48 << 20), "{before} -> {during}");
        drop(block);
    }

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn trimming_returns_freed_small_allocations_to_the_system() {
        // Many small blocks (below the mmap threshold) live in the heap; a block allocated
        // after them keeps them from the heap's top, which free() alone would give back.
        // Freed, glibc keeps them until trimmed.
        let blocks: Vec<Vec<u8>> = (0..64 * 1024).map(|_| vec![1u8; 1024]).collect();
        let pin = vec![1u8; 1024];
        let full = resident_bytes().unwrap();
        drop(blocks);
        release_free_memory();
        let trimmed = resident_bytes().unwrap();
        assert!(trimmed + (32 << 20) < full, "{full} -> {trimmed}");
        drop(pin);
    }
}
