//! The one tokio runtime that all of the library's network work runs on.
//!
//! It is created lazily, on first use, so loading the NIF costs nothing. NIFs never `block_on`
//! it: they spawn a task and return, and the task answers the caller with a message.
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use tokio::runtime::{Builder, Runtime};

static RUNTIME: OnceLock<Runtime> = OnceLock::new();
static WORKERS: AtomicUsize = AtomicUsize::new(0);

/// Sets the worker-thread count (from the NIF's load data). 0 means "size for the host".
pub fn configure(workers: usize) {
    WORKERS.store(workers, Ordering::Relaxed);
}

fn default_workers() -> usize {
    // The BEAM already runs one scheduler per core. Quinn's work per connection is light and
    // mostly I/O bound, so a small pool (one per core, at most 4) keeps both sides busy without
    // oversubscribing small machines.
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .clamp(1, 4)
}

/// The runtime, built on first call.
pub fn get() -> &'static Runtime {
    RUNTIME.get_or_init(|| {
        let workers = match WORKERS.load(Ordering::Relaxed) {
            0 => default_workers(),
            n => n.min(256),
        };
        Builder::new_multi_thread()
            .worker_threads(workers)
            .thread_name("macula_quic")
            .enable_all()
            .build()
            // Without a runtime the library cannot do anything at all; there is no better answer
            // than failing the first NIF call that needs it (rustler turns the panic into an error).
            .expect("macula_quic: cannot start the tokio runtime")
    })
}

/// Spawns a task on the runtime.
pub fn spawn<F>(fut: F) -> tokio::task::JoinHandle<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    get().spawn(fut)
}

/// Worker threads in use (0 before the runtime starts).
pub fn worker_count() -> usize {
    match RUNTIME.get() {
        Some(rt) => rt.metrics().num_workers(),
        None => 0,
    }
}
