//! The thread pool all parallel work runs in.
//!
//! Sized by `SPARSEKIT_NUM_THREADS` (default: the number of available cores) or by [`set_num_threads`],
//! at most [`MAX_THREADS`]. A pool the OS cannot build is an error ([`run`]), never a hang or a panic.
//! Fork safety: a child created by `fork` (DataLoader workers) inherits the pool object but none of its
//! threads, so using it would hang. The pool remembers the pid that built it and is rebuilt, never
//! reused, in any other process.

use std::sync::{Arc, Mutex};

use rayon::{ThreadPool, ThreadPoolBuilder};

use crate::error::CoreError;

/// The largest worker count accepted: more threads than this never help a memory-bound kernel, and a
/// typo such as `10**6` must not try to start a million threads.
pub const MAX_THREADS: usize = 1024;

struct PoolState {
    pid: u32,
    threads: usize,
    pool: Arc<ThreadPool>,
}

static POOL: Mutex<Option<PoolState>> = Mutex::new(None);
/// Thread count requested through `set_num_threads`; 0 means "from the environment".
static REQUESTED: Mutex<usize> = Mutex::new(0);

fn default_threads() -> usize {
    std::env::var("SPARSEKIT_NUM_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
        .map(|n| n.min(MAX_THREADS))
        .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1))
}

fn wanted_threads() -> usize {
    let requested = *REQUESTED.lock().unwrap_or_else(|e| e.into_inner());
    if requested > 0 { requested } else { default_threads() }
}

fn current_pool() -> Result<Arc<ThreadPool>, CoreError> {
    let mut guard = POOL.lock().unwrap_or_else(|e| e.into_inner());
    let pid = std::process::id();
    let threads = wanted_threads();
    if let Some(state) = guard.as_ref() {
        if state.pid == pid && state.threads == threads {
            return Ok(Arc::clone(&state.pool));
        }
    }
    if let Some(stale) = guard.take() {
        if stale.pid != pid {
            // Inherited across fork: its worker threads do not exist here, and dropping it would wait
            // for them. Leak it on purpose.
            std::mem::forget(stale);
        }
    }
    let pool = ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("sparsekit-{i}"))
        .build()
        .map_err(|e| CoreError::ThreadPool { why: format!("{threads} threads: {e}") })?;
    let pool = Arc::new(pool);
    *guard = Some(PoolState { pid, threads, pool: Arc::clone(&pool) });
    Ok(pool)
}

/// Run `f` inside the sparsekit pool; a pool that cannot be built is a [`CoreError::ThreadPool`].
pub fn run<R: Send>(f: impl FnOnce() -> Result<R, CoreError> + Send) -> Result<R, CoreError> {
    current_pool()?.install(f)
}

/// Run an infallible `f` inside the sparsekit pool (benchmarks and tests). Panics if the pool cannot
/// be built; library entry points use [`run`].
pub fn install<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    match current_pool() {
        Ok(pool) => pool.install(f),
        Err(e) => panic!("{e}"),
    }
}

/// Set the number of worker threads (0 restores the `SPARSEKIT_NUM_THREADS` / core-count default).
pub fn set_num_threads(n: usize) -> Result<(), CoreError> {
    if n > MAX_THREADS {
        return Err(CoreError::Invalid { arg: "n", why: format!("thread count must be in [0, {MAX_THREADS}], got {n}") });
    }
    *REQUESTED.lock().unwrap_or_else(|e| e.into_inner()) = n;
    Ok(())
}

/// The number of worker threads the next parallel call will use.
pub fn num_threads() -> usize {
    wanted_threads()
}
