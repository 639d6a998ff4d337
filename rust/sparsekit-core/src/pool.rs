//! The thread pool all parallel work runs in.
//!
//! Sized by `SPARSEKIT_NUM_THREADS` (default: the number of available cores) or by [`set_num_threads`].
//! Fork safety: a child created by `fork` (DataLoader workers) inherits the pool object but none of its
//! threads, so using it would hang. The pool remembers the pid that built it and is rebuilt, never
//! reused, in any other process.

use std::sync::{Arc, Mutex};

use rayon::{ThreadPool, ThreadPoolBuilder};

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
        .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1))
}

fn wanted_threads() -> usize {
    let requested = *REQUESTED.lock().unwrap_or_else(|e| e.into_inner());
    if requested > 0 { requested } else { default_threads() }
}

fn current_pool() -> Arc<ThreadPool> {
    let mut guard = POOL.lock().unwrap_or_else(|e| e.into_inner());
    let pid = std::process::id();
    let threads = wanted_threads();
    if let Some(state) = guard.as_ref() {
        if state.pid == pid && state.threads == threads {
            return Arc::clone(&state.pool);
        }
    }
    if let Some(stale) = guard.take() {
        if stale.pid != pid {
            // Inherited across fork: its worker threads do not exist here, and dropping it would wait
            // for them. Leak it on purpose.
            std::mem::forget(stale);
        }
    }
    let pool = Arc::new(
        ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("sparsekit-{i}"))
            .build()
            .expect("building a rayon thread pool"),
    );
    *guard = Some(PoolState { pid, threads, pool: Arc::clone(&pool) });
    pool
}

/// Run `f` inside the sparsekit pool.
pub fn install<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    current_pool().install(f)
}

/// Set the number of worker threads (0 restores the `SPARSEKIT_NUM_THREADS` / core-count default).
pub fn set_num_threads(n: usize) {
    *REQUESTED.lock().unwrap_or_else(|e| e.into_inner()) = n;
}

/// The number of worker threads the next parallel call will use.
pub fn num_threads() -> usize {
    wanted_threads()
}
