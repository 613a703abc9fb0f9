//! `gcg::util::keep_freed_memory` (called by the `gcg` binary at start): large tensor buffers come
//! from the heap and are reused once freed, on the main thread and (with one heap for all
//! threads) on any other.
//!
//! No libtest harness: glibc settles which arena a thread allocates from at its first
//! allocation, so the call has to come first in `main`, as in the binary.

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn main() {
    gcg::util::keep_freed_memory(true);
    check("the main thread");
    std::thread::spawn(|| check("a second thread")).join().unwrap();
    println!("freed_memory: 2 checks passed");
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn main() {
    println!("freed_memory: keep_freed_memory is a no-op off Linux with glibc; nothing to check");
}

/// This thread's minor page faults so far.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn thread_faults() -> i64 {
    // SAFETY: getrusage writes the struct it is given.
    unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        assert_eq!(libc::getrusage(libc::RUSAGE_THREAD, &mut u), 0);
        u.ru_minflt
    }
}

/// A block far above glibc's largest mmap threshold (96 MiB, as the ViT's activations at 32
/// frames a pass) is not given its own mapping, and its pages are reused by the next block of
/// that size: no fresh page faults.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn check(who: &str) {
    const BYTES: usize = 96 << 20;
    // SAFETY: mallinfo2 only reads the allocator's counters.
    let mapped = || unsafe { libc::mallinfo2().hblkhd };
    let before = mapped();
    let mut a = vec![0u8; BYTES];
    a.iter_mut().step_by(4096).for_each(|b| *b = 1);
    let during = mapped();
    assert!(
        during < before + BYTES,
        "{who}: a {BYTES}-byte block was given its own mapping ({before} -> {during} bytes mapped)"
    );
    drop(a);
    let f0 = thread_faults();
    let mut b: Vec<u8> = Vec::with_capacity(BYTES);
    b.resize(BYTES, 1);
    let faults = thread_faults() - f0;
    assert_eq!(b[BYTES - 1], 1);
    assert!(
        faults < (BYTES / 4096 / 8) as i64,
        "{who}: allocating the freed {BYTES} bytes again took {faults} page faults"
    );
}
