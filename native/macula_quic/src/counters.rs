//! Live-object counters (and a few cumulative ones). Each native object increments its counter
//! when created and decrements it when dropped, so tests can prove that closing, owner death
//! and garbage collection free everything.
use std::sync::atomic::{AtomicI64, Ordering};

pub static LISTENERS: AtomicI64 = AtomicI64::new(0);
pub static CONNECTIONS: AtomicI64 = AtomicI64::new(0);
pub static STREAMS: AtomicI64 = AtomicI64::new(0);
pub static TASKS: AtomicI64 = AtomicI64::new(0);
/// Processes that own handles and are monitored (see `owner`); one leaves when its process exits.
pub static OWNERS: AtomicI64 = AtomicI64::new(0);
/// Pending `async_accept`/`accept` calls on listeners (see `listener`).
pub static ACCEPT_WAITERS: AtomicI64 = AtomicI64::new(0);
/// Executors (see `executor`): one per endpoint (listener or shared client endpoint) and one
/// per connection.
pub static SHARDS: AtomicI64 = AtomicI64::new(0);
/// Shards' runners on tokio (see `executor::Shard::schedule`): at most one per shard, spawned
/// the first time the shard runs on a runtime worker and ended when the shard goes.
pub static SHARD_RUNNERS: AtomicI64 = AtomicI64::new(0);
/// Buffers of the library's own that received binaries point into (see `received`), until the
/// BEAM frees the last binary that refers to one.
pub static RECEIVED_BUFFERS: AtomicI64 = AtomicI64::new(0);
/// Cumulative, not live: times a NIF ran a shard's work on its own thread, and times a
/// runtime worker did. Their ratio shows how often sends leave without a thread hand-off.
pub static INLINE_RUNS: AtomicI64 = AtomicI64::new(0);
pub static RUNTIME_RUNS: AtomicI64 = AtomicI64::new(0);
/// Cumulative: small sends whose data Quinn took within the `send` call itself, without the
/// stream's writer task (see `stream::write_now`).
pub static DIRECT_WRITES: AtomicI64 = AtomicI64::new(0);
/// Cumulative: datagrams a call read itself, having sent to a socket of this VM or watched for
/// the answer (see `inline_watch`).
pub static INLINE_RECEIVES: AtomicI64 = AtomicI64::new(0);
/// Cumulative: times a stream's reader, run inside a call, left a large answer to a runtime
/// worker (see `executor::defer_to_runtime`).
pub static INLINE_DEFERRALS: AtomicI64 = AtomicI64::new(0);
/// Cumulative: watches a sending call made for its answer, and watches skipped by a thread
/// backing off after watches that brought no answer (see `inline_watch::begin`).
pub static INLINE_WATCHES: AtomicI64 = AtomicI64::new(0);
pub static INLINE_WATCH_SKIPS: AtomicI64 = AtomicI64::new(0);
/// Cumulative: watches that found a datagram which sent no process a message (an
/// acknowledgement, say): counted as finding nothing by the back-off (see
/// `inline_watch::Watch::end`).
pub static INLINE_WATCH_UNANSWERED: AtomicI64 = AtomicI64::new(0);
/// Cumulative: calls that sent a datagram to a peer outside this VM and did not watch for the
/// answer because the connection's smallest round-trip time is over twice the watch (see
/// `inline_watch::begin`).
pub static INLINE_WATCH_FAR: AtomicI64 = AtomicI64::new(0);
/// Cumulative: runtime workers' socket watches that ended at a datagram waiting on a socket no
/// call had claimed (see `spin`).
pub static RUNTIME_WATCH_HITS: AtomicI64 = AtomicI64::new(0);
/// Cumulative: runtime workers' socket watches that went on past `runtime_spin_us` because
/// calls in this VM were exchanging datagrams (see `spin`).
pub static RUNTIME_WATCH_EXTENSIONS: AtomicI64 = AtomicI64::new(0);
/// Cumulative: runtime workers' socket watches longer than `runtime_spin_us` because the
/// worker's watches before had caught work (see `spin`).
pub static RUNTIME_WATCHES_GROWN: AtomicI64 = AtomicI64::new(0);
/// Cumulative: TLS 1.3 session tickets clients stored, and tickets they took to offer a
/// resumed handshake (see `tls::CountingSessionStore`).
pub static TLS_TICKETS: AtomicI64 = AtomicI64::new(0);
/// Cumulative: Quinn connection drivers that panicked (see `executor::Shard::fail`).
pub static DRIVER_PANICS: AtomicI64 = AtomicI64::new(0);
/// Cumulative: panics in the library's own socket code, which Quinn calls with a connection's
/// or an endpoint's lock held, stopped there (see `contain::in_socket`).
pub static SOCKET_PANICS: AtomicI64 = AtomicI64::new(0);
pub static TLS_RESUMPTIONS: AtomicI64 = AtomicI64::new(0);
/// Cumulative: connects whose caller was told to watch its mailbox for the answer (see
/// `connect_watch`).
pub static CONNECT_WATCHES: AtomicI64 = AtomicI64::new(0);

/// Counts one live object of a kind for as long as it exists.
#[derive(Debug)]
pub struct Live(&'static AtomicI64);

impl Live {
    pub fn new(counter: &'static AtomicI64) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        Live(counter)
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Adds one to a cumulative counter.
pub fn bump(counter: &AtomicI64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

pub fn get(counter: &AtomicI64) -> i64 {
    counter.load(Ordering::Relaxed)
}
