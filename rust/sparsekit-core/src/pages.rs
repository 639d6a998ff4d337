//! Huge pages for the large buffers the kernels write first: spmm outputs and SDD column copies, the
//! routing plan's tables.
//!
//! A fresh multi-megabyte buffer (torch allocates a new output per call, freed memory goes back to the
//! OS) is faulted in 4 KiB page by page by the first writer. At 10 % density that cost is of the order of
//! the arithmetic, and with two threads the faults contend in the kernel, so the DSD forward scaled
//! worse on 2 threads than on 1 (see docs/blocksparse.md). `MADV_HUGEPAGE` on the buffer's 2 MiB-aligned
//! interior lets Linux fault it in 2 MiB pages (the machines here run transparent huge pages in
//! `madvise` mode). Advisory only: contents and ownership are unchanged, errors are ignored.

/// Buffers below this stay as they are (a few pages: nothing to win).
const MIN_BYTES: usize = 4 << 20;

#[cfg(target_os = "linux")]
mod sys {
    use std::ffi::{c_int, c_void};
    pub const MADV_HUGEPAGE: c_int = 14;
    extern "C" {
        pub fn madvise(addr: *mut c_void, len: usize, advice: c_int) -> c_int;
    }
}

/// Asks for huge pages on the 2 MiB-aligned interior of `buf` (Linux; a no-op elsewhere or for small
/// buffers). Call before the first write. `SPARSEKIT_HUGEPAGES=0` turns the advice off (read per call,
/// only for large buffers: the benchmark compares both in one process; a user whose kernel stalls
/// compacting memory for huge pages can opt out).
pub fn prefer_huge_pages<T>(buf: &mut [T]) {
    prefer_huge_pages_raw(buf.as_mut_ptr() as *mut u8, std::mem::size_of_val(buf));
}

/// [`prefer_huge_pages`] on the `bytes` bytes at `start` (memory the caller owns; it may be uninitialised).
pub fn prefer_huge_pages_raw(start: *mut u8, bytes: usize) {
    if bytes < MIN_BYTES || std::env::var_os("SPARSEKIT_HUGEPAGES").is_some_and(|v| v == "0") {
        return;
    }
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let start = start as usize;
        let (lo, hi) = (start.next_multiple_of(HUGE), (start + bytes) / HUGE * HUGE);
        if hi > lo {
            // SAFETY: [lo, hi) lies inside the caller's buffer; MADV_HUGEPAGE changes only how
            // the range is backed, never its contents.
            unsafe {
                sys::madvise(lo as *mut std::ffi::c_void, hi - lo, sys::MADV_HUGEPAGE);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advising_keeps_the_contents() {
        let mut v: Vec<u32> = (0..(6 << 20) / 4).collect();
        prefer_huge_pages(&mut v);
        assert!(v.iter().enumerate().all(|(i, &x)| x as usize == i));
        let mut small = vec![1u8; 10];
        prefer_huge_pages(&mut small);
        prefer_huge_pages(&mut small[..0]);
        assert_eq!(small, vec![1u8; 10]);
    }
}
