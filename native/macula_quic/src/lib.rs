//! macula_quic: Quinn (QUIC) bound to the BEAM through Rustler.
//!
//! One file per concept:
//! - `runtime`: the one tokio runtime all network work runs on.
//! - `executor`: shards (per connection, per endpoint) whose tasks a NIF may run on its own thread.
//! - `spin`: a runtime worker watching the sockets for a moment before it sleeps.
//! - `messages`: sending terms to Erlang processes from runtime threads; request replies.
//! - `owner`: the process that owns a handle; one monitor per owning process follows it.
//! - `address`, `options`, `tls`: decoding what callers pass in.
//! - `flow`: the default flow-control windows and socket buffers (shared with the baseline).
//! - `endpoint`: UDP sockets (exact binds, the bound-address registry, shared client endpoints).
//! - `listener`, `connection`, `stream`: the three handle kinds, one resource each; `handle`:
//!   the NIFs any handle takes, and the diagnostics.
//! - `datagram`: QUIC datagrams on a connection (sending, and the reader that delivers them).
//! - `received`: received stream data as binaries (in our own buffers from 16 KiB).
//! - `inline_watch`: receiving the answer in the call that sent the question.
//! - `connect_watch`: a connecting caller watching its mailbox for the answer before it sleeps.
//! - `contain`: keeping a panic inside Quinn from becoming two, which would abort the VM.
//! - `error`: mapping Quinn/rustls/io errors to atoms callers can match on.
//! - `counters`: live-object counters the test suite uses to prove nothing leaks.
//! - `atoms`, `util`: the atoms messages and results use; small shared helpers.
//! - `chaos`: random pauses that widen race windows, for `bin/chaos` (test builds only).

mod address;
mod atoms;
mod chaos;
mod connect_watch;
mod connection;
mod contain;
mod counters;
mod datagram;
mod endpoint;
mod error;
mod executor;
mod flow;
mod handle;
mod inline_watch;
mod listener;
mod messages;
mod options;
mod owner;
mod received;
mod runtime;
mod spin;
mod stream;
mod tls;
mod util;

use rustler::{Env, Term};

// mimalloc on Linux, where it was measured (other targets keep the system's allocator). Why:
// runtime workers and BEAM schedulers free each other's allocations all the time (Quinn's
// datagram buffers and packet records, our message buffers), and glibc's malloc serves such
// frees under the lock of the arena they came from: in a bulk transfer most of the runtime
// workers' sleeps were waits for an arena lock. With mimalloc, fresh-VM rounds against glibc
// (bench/README.md, "Allocation: glibc's arena locks, and mimalloc"): bulk +7-11%, 16
// handshakes at once +9-11%, the rest level; an idle connection costs ~8% more memory. The
// crate's `.cargo/config.toml` has mimalloc commit its arenas as they are used.
#[cfg(target_os = "linux")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Load data is `{workers, spin_us, spin_max_us, inline_watch_us, connect_watch_us}`: the
/// runtime's worker-thread count (0: size for the host), how long a worker watches the sockets
/// before it sleeps and the longest that watch grows to, how long a call that sent a datagram
/// watches them for the answer, and how long a connecting caller watches its mailbox, all in
/// microseconds (0: never). Anything else leaves the defaults (size for the host, no watching).
fn on_load(_env: Env, info: Term) -> bool {
    if let Ok((workers, spin_us, spin_max_us, inline_watch_us, connect_watch_us)) =
        info.decode::<(usize, u64, u64, u64, u64)>()
    {
        runtime::configure(workers);
        spin::configure(spin_us, spin_max_us);
        inline_watch::configure(inline_watch_us);
        connect_watch::configure(connect_watch_us);
    }
    true
}

rustler::init!("Elixir.MaculaQuic.Native", load = on_load);
