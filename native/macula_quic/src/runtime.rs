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
        let mut builder = Builder::new_multi_thread();
        builder.worker_threads(workers).thread_name("macula_quic").enable_all();
        if crate::spin::spin_us() > 0 {
            // Before a worker sleeps, it watches the sockets for a moment (see `spin`).
            builder.on_thread_park(crate::spin::before_park);
        }
        builder
            .build()
            // Without a runtime the library cannot do anything at all; there is no better answer
            // than failing the first NIF call that needs it (rustler turns the panic into an error).
            .expect("macula_quic: cannot start the tokio runtime")
    })
}

/// Spawns a task on the runtime.
///
/// A panic in the task is caught here (as tokio would) but the task's state is then dropped
/// with `in_panic_cleanup()` true, so whatever it held can tell a crash from an ordinary end:
/// a pending `Reply` answers `{:error, :internal_error}`, a stream's reader fails its pending
/// `recv`. The task then ends with `None`.
pub fn spawn<F>(fut: F) -> tokio::task::JoinHandle<Option<F::Output>>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    get().spawn(guarded(fut))
}

/// `fut` with the panic handling `spawn` gives, for executors other than tokio's (shards).
pub fn guarded<F: std::future::Future>(fut: F) -> impl std::future::Future<Output = Option<F::Output>> {
    Guarded { inner: Some(Box::pin(fut)) }
}

thread_local! {
    static PANIC_CLEANUP: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// True while a panicked task's state is being dropped (on this thread).
fn in_panic_cleanup() -> bool {
    PANIC_CLEANUP.with(|c| c.get())
}

/// True when whatever is being dropped now goes because of a panic: this thread unwinds, or a
/// panicked task's state is being dropped.
pub fn after_panic() -> bool {
    std::thread::panicking() || in_panic_cleanup()
}

/// Drops a task's state as after a panic in it: with `after_panic()` true, so that what it
/// holds answers its waiters with `:internal_error`. Also used for the tasks of a connection
/// whose Quinn driver panicked (see `executor::Shard::fail`).
pub fn drop_as_panicked<T>(state: T) {
    PANIC_CLEANUP.with(|c| c.set(true));
    // A destructor that panics must not take the thread down.
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || drop(state)));
    PANIC_CLEANUP.with(|c| c.set(false));
}

struct Guarded<F: std::future::Future> {
    inner: Option<std::pin::Pin<Box<F>>>,
}

impl<F: std::future::Future> std::future::Future for Guarded<F> {
    type Output = Option<F::Output>;

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Self::Output> {
        use std::panic::{catch_unwind, AssertUnwindSafe};
        use std::task::Poll;
        let Some(fut) = self.inner.as_mut() else { return Poll::Ready(None) };
        match catch_unwind(AssertUnwindSafe(|| fut.as_mut().poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(out)) => {
                // What the finished future still holds (Quinn's connection driver holds the
                // connection) may panic as it drops, on a poisoned connection (see `contain`).
                let done = self.inner.take();
                let _ = catch_unwind(AssertUnwindSafe(move || drop(done)));
                Poll::Ready(Some(out))
            }
            Err(_) => {
                drop_as_panicked(self.inner.take());
                Poll::Ready(None)
            }
        }
    }
}

/// Worker threads in use (0 before the runtime starts).
pub fn worker_count() -> usize {
    match RUNTIME.get() {
        Some(rt) => rt.metrics().num_workers(),
        None => 0,
    }
}
