//! NIFs that take any kind of handle, and the library's diagnostics.
use rustler::{Encoder, Env, LocalPid, NifResult, ResourceArc, Term};

use crate::atoms;
use crate::connect_watch;
use crate::connection::{self, ConnRes};
use crate::counters;
use crate::endpoint;
use crate::inline_watch;
use crate::listener::{self, ListenerRes};
use crate::runtime;
use crate::spin;
use crate::stream::{self, StreamRes};

/// `ping()`: `:ok` when the library is loaded.
#[rustler::nif]
fn ping() -> rustler::Atom {
    atoms::ok()
}

/// `controlling_process(Handle, Pid)`: only the current owner may give a handle away.
#[rustler::nif]
fn controlling_process<'a>(env: Env<'a>, handle: Term<'a>, pid: LocalPid) -> NifResult<Term<'a>> {
    if let Ok(s) = handle.decode::<ResourceArc<StreamRes>>() {
        return Ok(stream::controlling_process(env, &s, pid));
    }
    if let Ok(c) = handle.decode::<ResourceArc<ConnRes>>() {
        return Ok(connection::controlling_process(env, &c, pid));
    }
    if let Ok(l) = handle.decode::<ResourceArc<ListenerRes>>() {
        return Ok(listener::controlling_process(env, &l, pid));
    }
    Err(rustler::Error::BadArg)
}

/// `handle_owner(Handle)`: the owning process.
#[rustler::nif]
fn handle_owner<'a>(handle: Term<'a>) -> NifResult<LocalPid> {
    if let Ok(s) = handle.decode::<ResourceArc<StreamRes>>() {
        return Ok(s.owner_pid());
    }
    if let Ok(c) = handle.decode::<ResourceArc<ConnRes>>() {
        return Ok(c.owner_pid());
    }
    if let Ok(l) = handle.decode::<ResourceArc<ListenerRes>>() {
        return Ok(l.owner_pid());
    }
    Err(rustler::Error::BadArg)
}

/// `handle_kind(Term)`: `:listener | :connection | :stream | nil`.
#[rustler::nif]
fn handle_kind<'a>(env: Env<'a>, handle: Term<'a>) -> Term<'a> {
    rustler::atoms! { listener, connection, stream }
    if handle.decode::<ResourceArc<StreamRes>>().is_ok() {
        stream().encode(env)
    } else if handle.decode::<ResourceArc<ConnRes>>().is_ok() {
        connection().encode(env)
    } else if handle.decode::<ResourceArc<ListenerRes>>().is_ok() {
        listener().encode(env)
    } else {
        atoms::nil().encode(env)
    }
}

/// `debug_owners()` (test builds only): `[{Pid, [Description]}]`, every monitored process and a
/// line about each handle it owns, for leak tests to say what was left and who holds it.
#[cfg(feature = "test_hooks")]
#[rustler::nif]
fn debug_owners() -> Vec<(rustler::LocalPid, Vec<String>)> {
    crate::owner::describe_owners()
}

/// `counters()`: live native objects, for leak tests and observability.
#[rustler::nif]
fn counters<'a>(env: Env<'a>) -> NifResult<Term<'a>> {
    let pairs = [
        (atoms::listeners().encode(env), counters::get(&counters::LISTENERS).encode(env)),
        (atoms::connections().encode(env), counters::get(&counters::CONNECTIONS).encode(env)),
        (atoms::streams().encode(env), counters::get(&counters::STREAMS).encode(env)),
        (atoms::tasks().encode(env), counters::get(&counters::TASKS).encode(env)),
        (atoms::owners().encode(env), counters::get(&counters::OWNERS).encode(env)),
        (atoms::accept_waiters().encode(env), counters::get(&counters::ACCEPT_WAITERS).encode(env)),
        (atoms::client_endpoints().encode(env), endpoint::client_endpoint_count().encode(env)),
        (atoms::bound_addresses().encode(env), endpoint::registered_count().encode(env)),
        (atoms::runtime_workers().encode(env), runtime::worker_count().encode(env)),
        (atoms::shards().encode(env), counters::get(&counters::SHARDS).encode(env)),
        (atoms::shard_runners().encode(env), counters::get(&counters::SHARD_RUNNERS).encode(env)),
        (atoms::received_buffers().encode(env), counters::get(&counters::RECEIVED_BUFFERS).encode(env)),
        (atoms::inline_runs().encode(env), counters::get(&counters::INLINE_RUNS).encode(env)),
        (atoms::runtime_runs().encode(env), counters::get(&counters::RUNTIME_RUNS).encode(env)),
        (atoms::direct_writes().encode(env), counters::get(&counters::DIRECT_WRITES).encode(env)),
        (atoms::runtime_spin_us().encode(env), spin::spin_us().encode(env)),
        (atoms::watched_sockets().encode(env), spin::watched_count().encode(env)),
        (atoms::runtime_watch_hits().encode(env), counters::get(&counters::RUNTIME_WATCH_HITS).encode(env)),
        (atoms::runtime_watch_extensions().encode(env), counters::get(&counters::RUNTIME_WATCH_EXTENSIONS).encode(env)),
        (atoms::runtime_spin_max_us().encode(env), spin::spin_max_us().encode(env)),
        (atoms::runtime_watches_grown().encode(env), counters::get(&counters::RUNTIME_WATCHES_GROWN).encode(env)),
        (atoms::inline_watch_us().encode(env), inline_watch::watch_us().encode(env)),
        (atoms::inline_receives().encode(env), counters::get(&counters::INLINE_RECEIVES).encode(env)),
        (atoms::inline_deferrals().encode(env), counters::get(&counters::INLINE_DEFERRALS).encode(env)),
        (atoms::inline_watches().encode(env), counters::get(&counters::INLINE_WATCHES).encode(env)),
        (atoms::inline_watch_skips().encode(env), counters::get(&counters::INLINE_WATCH_SKIPS).encode(env)),
        (atoms::inline_watch_unanswered().encode(env), counters::get(&counters::INLINE_WATCH_UNANSWERED).encode(env)),
        (atoms::inline_watch_far().encode(env), counters::get(&counters::INLINE_WATCH_FAR).encode(env)),
        (atoms::tls_tickets().encode(env), counters::get(&counters::TLS_TICKETS).encode(env)),
        (atoms::driver_panics().encode(env), counters::get(&counters::DRIVER_PANICS).encode(env)),
        (atoms::socket_panics().encode(env), counters::get(&counters::SOCKET_PANICS).encode(env)),
        (atoms::tls_resumptions().encode(env), counters::get(&counters::TLS_RESUMPTIONS).encode(env)),
        (atoms::connect_watch_us().encode(env), connect_watch::watch_us().encode(env)),
        (atoms::connect_watches().encode(env), counters::get(&counters::CONNECT_WATCHES).encode(env)),
        (atoms::connects().encode(env), connect_watch::in_flight().encode(env)),
    ];
    Term::map_from_pairs(env, &pairs).map_err(|_| rustler::Error::BadArg)
}

/// `debug_panic()` (test builds only): panics on purpose, so tests can prove a panic in Rust
/// is an Erlang error and not a crashed VM.
#[cfg(feature = "test_hooks")]
#[rustler::nif]
fn debug_panic() -> rustler::Atom {
    panic!("macula_quic: deliberate panic (debug_panic/0)")
}

/// `debug_panic_task(Tag)` (test builds only): starts a runtime task that holds a request
/// from the caller and panics. The caller must still be answered:
/// `{Tag, {:error, :internal_error}}`.
#[cfg(feature = "test_hooks")]
#[rustler::nif]
fn debug_panic_task<'a>(env: Env<'a>, tag: Term<'a>) -> rustler::Atom {
    let reply = crate::messages::Reply::new(env.pid(), tag);
    runtime::spawn(async move {
        let _held = reply;
        tokio::task::yield_now().await;
        panic!("macula_quic: deliberate panic in a runtime task (debug_panic_task/1)");
    });
    atoms::ok()
}
