//! A cache of large output buffers, so a training loop's repeated kernel outputs reuse memory that is
//! already faulted in.
//!
//! torch's CPU allocator hands large tensors straight to `mmap` and gives them back to the OS when freed,
//! so every call's fresh output is faulted in again page by page (the kernel zeroes each page first). For
//! the block-sparse forward at 10 % density that cost is as large as the arithmetic (18 ms of kernel,
//! 15 ms of faults on a 32 MiB output), and the routing plan's 69 MB of tables pay it too. A training loop
//! asks for the same sizes every step, so buffers freed by one step are kept here (up to a byte limit) and
//! handed out again to the next request of the same size, as torch's CUDA caching allocator does on GPUs.
//!
//! * Only buffers of at least [`MIN_BYTES`] come from here; the caller allocates smaller ones itself.
//! * Idle bytes are capped by `SPARSEKIT_BUFFER_CACHE_MB` (default 1024; 0 turns the cache off) or
//!   [`set_limit`]; over the cap the oldest idle buffers are freed. [`clear`] frees every idle buffer.
//! * Contents of a reused buffer are whatever the last user left (like `torch.empty`).
//! * Never blocks: the lock is only tried. A request or a release that finds it taken (another thread in
//!   the middle of one, or a child forked while a thread of the parent held it) bypasses the cache.

use std::alloc::{alloc, dealloc, Layout};
use std::ptr::NonNull;
use std::sync::{Mutex, OnceLock};

use crate::error::CoreError;
use crate::pages::prefer_huge_pages_raw;

/// Smaller requests are not worth caching (the allocator serves them from its heap without faults).
pub const MIN_BYTES: usize = 1 << 20;
/// Alignment of every buffer: a 2 MiB boundary lets a huge page back the buffer from its first byte.
const ALIGN: usize = 2 << 20;
const DEFAULT_LIMIT_MB: usize = 1024;

struct Idle {
    ptr: NonNull<u8>,
    bytes: usize,
}

struct Cache {
    /// Idle buffers, oldest first.
    idle: Vec<Idle>,
    idle_bytes: usize,
    limit: usize,
}

// SAFETY: the cache owns its idle buffers exclusively; pointers are only moved between threads under the lock.
unsafe impl Send for Cache {}

static CACHE: OnceLock<Mutex<Cache>> = OnceLock::new();

fn cache() -> &'static Mutex<Cache> {
    CACHE.get_or_init(|| {
        let mb = std::env::var("SPARSEKIT_BUFFER_CACHE_MB")
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .unwrap_or(DEFAULT_LIMIT_MB);
        Mutex::new(Cache { idle: Vec::new(), idle_bytes: 0, limit: mb.saturating_mul(1 << 20) })
    })
}

fn layout(bytes: usize) -> Result<Layout, CoreError> {
    Layout::from_size_align(bytes, ALIGN)
        .map_err(|_| CoreError::Invalid { arg: "nbytes", why: format!("{bytes} bytes cannot be allocated") })
}

/// A buffer of `len()` bytes, 2 MiB aligned, returned to the cache when dropped.
pub struct Buffer {
    ptr: NonNull<u8>,
    bytes: usize,
}

// SAFETY: a Buffer owns its memory exclusively, like a Box<[u8]>.
unsafe impl Send for Buffer {}
unsafe impl Sync for Buffer {}

impl Buffer {
    /// A buffer of `bytes >= MIN_BYTES` (uninitialised contents): an idle one of exactly that size when
    /// the cache holds one, else fresh memory advised for huge pages.
    pub fn take(bytes: usize) -> Result<Buffer, CoreError> {
        if bytes < MIN_BYTES {
            return Err(CoreError::Invalid { arg: "nbytes", why: format!("at least {MIN_BYTES} bytes, got {bytes}") });
        }
        if let Ok(mut c) = cache().try_lock() {
            if let Some(i) = c.idle.iter().rposition(|b| b.bytes == bytes) {
                let b = c.idle.remove(i);
                c.idle_bytes -= b.bytes;
                return Ok(Buffer { ptr: b.ptr, bytes: b.bytes });
            }
        }
        let lay = layout(bytes)?;
        // SAFETY: `lay` has a non-zero size (bytes >= MIN_BYTES).
        let ptr = NonNull::new(unsafe { alloc(lay) })
            .ok_or_else(|| CoreError::Invalid { arg: "nbytes", why: format!("out of memory allocating {bytes} bytes") })?;
        prefer_huge_pages_raw(ptr.as_ptr(), bytes);
        Ok(Buffer { ptr, bytes })
    }

    pub fn len(&self) -> usize {
        self.bytes
    }

    pub fn is_empty(&self) -> bool {
        self.bytes == 0
    }

    /// The start of the buffer; its bytes may be uninitialised until written (as `torch.empty`'s).
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }

    /// The start of the buffer, for reading what was written.
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }
}

fn free(ptr: NonNull<u8>, bytes: usize) {
    // SAFETY: `ptr` was allocated by `alloc` with this very layout (checked when it was made).
    unsafe { dealloc(ptr.as_ptr(), Layout::from_size_align_unchecked(bytes, ALIGN)) }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        let (ptr, bytes) = (self.ptr, self.bytes);
        if let Ok(mut c) = cache().try_lock() {
            if bytes <= c.limit {
                c.idle.push(Idle { ptr, bytes });
                c.idle_bytes += bytes;
                let evicted = over_limit(&mut c);
                drop(c);
                evicted.into_iter().for_each(|b| free(b.ptr, b.bytes));
                return;
            }
        }
        free(ptr, bytes);
    }
}

/// Takes the oldest idle buffers out of `c` until its idle bytes fit the limit (the caller frees them
/// after releasing the lock).
fn over_limit(c: &mut Cache) -> Vec<Idle> {
    let mut n = 0;
    while c.idle_bytes > c.limit {
        c.idle_bytes -= c.idle[n].bytes;
        n += 1;
    }
    c.idle.drain(..n).collect()
}

/// Cap the idle bytes the cache keeps (0 turns it off); frees the oldest idle buffers over the cap.
pub fn set_limit(bytes: usize) {
    let mut c = cache().lock().unwrap_or_else(|e| e.into_inner());
    c.limit = bytes;
    let evicted = over_limit(&mut c);
    drop(c);
    evicted.into_iter().for_each(|b| free(b.ptr, b.bytes));
}

/// (idle buffers, idle bytes, limit in bytes).
pub fn stats() -> (usize, usize, usize) {
    let c = cache().lock().unwrap_or_else(|e| e.into_inner());
    (c.idle.len(), c.idle_bytes, c.limit)
}

/// Free every idle buffer (the memory goes back to the OS); buffers in use are not affected.
pub fn clear() {
    let limit = stats().2;
    set_limit(0);
    set_limit(limit);
}

#[cfg(test)]
mod tests {
    use super::*;

    // One test: the cache is process-wide, so the steps run in a fixed order.
    #[test]
    fn buffers_are_reused_by_size_and_capped() {
        assert!(Buffer::take(MIN_BYTES - 1).is_err());
        set_limit(8 << 20);
        clear();
        let mut a = Buffer::take(3 << 20).unwrap();
        assert_eq!(a.len(), 3 << 20);
        assert_eq!(a.as_mut_ptr() as usize % ALIGN, 0);
        // SAFETY: byte 5 of a 3 MiB buffer we own
        unsafe { a.as_mut_ptr().add(5).write(7) };
        let pa = a.as_mut_ptr();
        drop(a);
        assert_eq!(stats().0, 1);
        // another size does not take it; the same size does, contents as left
        let mut b = Buffer::take(2 << 20).unwrap();
        assert_ne!(b.as_mut_ptr(), pa);
        let mut c = Buffer::take(3 << 20).unwrap();
        assert_eq!(c.as_mut_ptr(), pa);
        // SAFETY: byte 5, written above
        assert_eq!(unsafe { c.as_mut_ptr().add(5).read() }, 7);
        assert_eq!(stats(), (0, 0, 8 << 20));
        drop(b);
        drop(c);
        assert_eq!(stats().1, 5 << 20);
        // over the cap the oldest goes: 2 + 3 + 4 MiB > 8 MiB leaves 3 + 4
        drop(Buffer::take(4 << 20).unwrap());
        assert_eq!(stats().1, 7 << 20);
        // a buffer above the cap is freed, not kept
        drop(Buffer::take(9 << 20).unwrap());
        assert_eq!(stats().1, 7 << 20);
        clear();
        assert_eq!(stats(), (0, 0, 8 << 20));
        set_limit(0);
        drop(Buffer::take(2 << 20).unwrap());
        assert_eq!(stats().0, 0);
    }
}
