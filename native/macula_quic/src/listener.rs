//! Listeners: a Quinn endpoint bound to exactly one address, accepting connections.
//!
//! An accept task takes incoming connections, completes their handshakes, and hands each one to
//! a process that called `async_accept` (one connection per call, as in quicer). A connection
//! that completes its handshake while nobody is waiting is queued, up to `backlog`; beyond that,
//! new incoming connections are refused, so a flood cannot grow memory without bound.
//!
//! The tasks hold the shared state, not the resource, so a listener whose handle is garbage
//! collected shuts down by itself.
//!
//! Closing a listener stops accepting and closes queued (never delivered) connections;
//! connections already delivered keep running, like accepted TCP sockets when a listen socket
//! closes. The UDP socket stays open for them and the address stays registered (a new listener
//! on it gets `:eaddrinuse`) until the last of them ends; with none, the address is free again
//! when `close_listener` returns.
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustler::{Encoder, Env, LocalPid, Monitor, Resource, ResourceArc, Term};
use tokio::sync::{oneshot, Notify};

use crate::address;
use crate::atoms;
use crate::connection::{self, ConnRes};
use crate::counters::{self, Live};
use crate::endpoint;
use crate::error::Reason;
use crate::messages::{self, Reply};
use crate::options;
use crate::owner::Owner;
use crate::runtime;
use crate::tls;
use crate::util::lock;

const DEFAULT_BACKLOG: usize = 1024;

/// A process waiting in `async_accept` (or the blocking `accept`, which has a reply tag).
struct Waiter {
    pid: LocalPid,
    reply: Option<Reply>,
}

struct State {
    waiters: VecDeque<Waiter>,
    ready: VecDeque<quinn::Connection>,
    handshaking: usize,
    closed: bool,
}

/// What the listener's tasks share. Freed when the resource is gone and the tasks have ended.
struct Shared {
    /// Taken (and dropped) on close, so that Quinn can close the socket once no connection
    /// uses it any more.
    endpoint: Mutex<Option<quinn::Endpoint>>,
    local: SocketAddr,
    backlog: usize,
    handshake_timeout: Duration,
    state: Mutex<State>,
    stop: Notify,
    /// Fires when the socket is closed and the address released (see `endpoint`).
    released: Mutex<Option<oneshot::Receiver<()>>>,
    _live: Live,
}

pub struct ListenerRes {
    shared: Arc<Shared>,
    owner: Mutex<Owner>,
}

#[rustler::resource_impl]
impl Resource for ListenerRes {
    const IMPLEMENTS_DOWN: bool = true;

    fn down<'a>(&'a self, _env: Env<'a>, _pid: LocalPid, mon: Monitor) {
        if lock(&self.owner).is_monitor(&mon) {
            close(&self.shared);
        }
    }
}

impl ListenerRes {
    pub fn owner_pid(&self) -> LocalPid {
        lock(&self.owner).pid
    }
}

impl Drop for ListenerRes {
    fn drop(&mut self) {
        close(&self.shared);
    }
}

/// Stops accepting. Idempotent. Returns whether accepted connections still use the socket
/// (then the address stays bound until they end).
fn close(shared: &Arc<Shared>) -> bool {
    let queued: Vec<quinn::Connection> = {
        let mut st = lock(&shared.state);
        if st.closed {
            return true;
        }
        st.closed = true;
        st.waiters.clear();
        st.ready.drain(..).collect()
    };
    for c in &queued {
        c.close(quinn::VarInt::from_u32(0), b"listener closed");
    }
    shared.stop.notify_waiters();
    shared.stop.notify_one();
    match lock(&shared.endpoint).take() {
        Some(ep) => {
            ep.set_server_config(None);
            let live = ep.open_connections() > queued.len();
            // Dropping our handle (and the accept task dropping its clone) lets Quinn close the
            // socket once the last connection on it is gone.
            drop(ep);
            live
        }
        None => true,
    }
}

async fn accept_loop(shared: Arc<Shared>, endpoint: quinn::Endpoint) {
    let _task = Live::new(&counters::TASKS);
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => i,
            _ = shared.stop.notified() => None,
        };
        let Some(incoming) = incoming else { break };
        {
            let mut st = lock(&shared.state);
            if st.closed {
                incoming.refuse();
                break;
            }
            if st.ready.len() + st.handshaking >= shared.backlog {
                drop(st);
                incoming.refuse();
                continue;
            }
            st.handshaking += 1;
        }
        runtime::spawn(handshake(shared.clone(), incoming));
    }
}

async fn handshake(shared: Arc<Shared>, incoming: quinn::Incoming) {
    let _task = Live::new(&counters::TASKS);
    let result = match incoming.accept() {
        Ok(connecting) => tokio::time::timeout(shared.handshake_timeout, connecting).await.ok().and_then(Result::ok),
        Err(_) => None,
    };
    let mut st = lock(&shared.state);
    st.handshaking -= 1;
    let Some(conn) = result else { return };
    if st.closed {
        conn.close(quinn::VarInt::from_u32(0), b"listener closed");
        return;
    }
    while let Some(w) = st.waiters.pop_front() {
        if let Some(res) = ConnRes::start(None, conn.clone(), shared.local, w.pid) {
            deliver(res, w);
            return;
        }
        // That waiter exited while waiting; try the next.
    }
    st.ready.push_back(conn);
}

/// Sends `{quic, new_conn, Conn, Info}` (or `{Tag, {:ok, Conn}}`) to the new owner.
fn deliver(res: ResourceArc<ConnRes>, w: Waiter) {
    let local = res.local_addr();
    match w.reply {
        Some(r) => {
            r.send(move |e| (atoms::ok(), res).encode(e));
        }
        None => {
            messages::send(&w.pid, move |e| {
                let info = connection::handshake_info(e, &res.conn, &local);
                (atoms::quic(), atoms::new_conn(), res, info).encode(e)
            });
        }
    }
}

// ---------------------------------------------------------------------------------------------
// NIFs

fn err<'a>(env: Env<'a>, reason: impl Encoder) -> Term<'a> {
    (atoms::error(), reason).encode(env)
}

/// `listen(Address, Port, Opts)`: binds exactly `Address:Port` and starts accepting.
#[rustler::nif]
fn listen<'a>(env: Env<'a>, addr: Term<'a>, port: Term<'a>, opts: Term<'a>) -> Term<'a> {
    let Some(ip) = address::decode_ip(addr) else { return err(env, atoms::bad_address()) };
    let Some(port) = address::decode_port(port) else { return err(env, atoms::bad_address()) };
    let opts = match options::decode_listen(opts) {
        Ok(o) => o,
        Err(r) => return err(env, r),
    };
    match start(env, SocketAddr::new(ip, port), opts) {
        Ok(l) => (atoms::ok(), l).encode(env),
        Err(r) => err(env, r),
    }
}

fn start(env: Env, addr: SocketAddr, opts: options::Listen) -> Result<ResourceArc<ListenerRes>, Reason> {
    let server = tls::server_config(&opts.tls, &opts.transport)?;
    let bound = endpoint::listener_endpoint(addr, server)?;
    let local = bound.local;
    let accept_endpoint = bound.endpoint.clone();
    let shared = Arc::new(Shared {
        endpoint: Mutex::new(Some(bound.endpoint)),
        local,
        backlog: opts.backlog.unwrap_or(DEFAULT_BACKLOG),
        handshake_timeout: opts.handshake_timeout.unwrap_or(connection::DEFAULT_HANDSHAKE_TIMEOUT),
        state: Mutex::new(State { waiters: VecDeque::new(), ready: VecDeque::new(), handshaking: 0, closed: false }),
        stop: Notify::new(),
        released: Mutex::new(Some(bound.released)),
        _live: Live::new(&counters::LISTENERS),
    });
    let res = ResourceArc::new(ListenerRes { shared: shared.clone(), owner: Mutex::new(Owner::unmonitored(env.pid())) });
    match Owner::monitor(&res, Some(env), env.pid()) {
        Some(o) => *lock(&res.owner) = o,
        None => return Err(atoms::closed().into()),
    }
    runtime::spawn(accept_loop(shared, accept_endpoint));
    Ok(res)
}

/// `listener_accept(Listener, Tag | nil)`: the next connection goes to the caller.
#[rustler::nif]
fn listener_accept<'a>(env: Env<'a>, l: ResourceArc<ListenerRes>, tag: Term<'a>) -> Term<'a> {
    let caller = env.pid();
    let mut st = lock(&l.shared.state);
    if st.closed {
        return err(env, atoms::closed());
    }
    let reply = if tag.is_atom() { None } else { Some(Reply::new(caller, tag)) };
    let waiter = Waiter { pid: caller, reply };
    if let Some(conn) = st.ready.pop_front() {
        // The caller is alive (it is calling), so the monitor is set.
        return match ConnRes::start(Some(env), conn, l.shared.local, caller) {
            Some(res) => {
                // Messages to processes are sent from runtime threads; hand the delivery to one.
                runtime::spawn(async move { deliver(res, waiter) });
                atoms::ok().encode(env)
            }
            None => err(env, atoms::closed()),
        };
    }
    st.waiters.push_back(waiter);
    atoms::ok().encode(env)
}

/// `listener_cancel_accept(Listener)`: withdraws the caller's most recent pending accept.
/// `:cancelled`, or `:delivered` if none is pending (its connection was already sent).
#[rustler::nif]
fn listener_cancel_accept<'a>(env: Env<'a>, l: ResourceArc<ListenerRes>) -> Term<'a> {
    let caller = env.pid();
    let mut st = lock(&l.shared.state);
    match st.waiters.iter().rposition(|w| w.pid == caller) {
        Some(i) => {
            st.waiters.remove(i);
            atoms::cancelled().encode(env)
        }
        None => atoms::delivered().encode(env),
    }
}

/// `listener_close(Listener, Tag)`: stops accepting (see the module doc for what happens to
/// connections) and sends the owner `{quic, listener_stopped, Listener}`. Returns `:wait` when
/// the address is about to be released — the caller then receives `{Tag, :ok}` once it is —
/// or `:ok` when accepted connections keep it bound (or it was already closed).
#[rustler::nif]
fn listener_close<'a>(env: Env<'a>, l: ResourceArc<ListenerRes>, tag: Term<'a>) -> Term<'a> {
    rustler::atoms! { wait }
    let was_open = !lock(&l.shared.state).closed;
    let live = close(&l.shared);
    if !was_open {
        return atoms::ok().encode(env);
    }
    let owner = lock(&l.owner).pid;
    let _ = env.send(&owner, (atoms::quic(), atoms::listener_stopped(), l.clone()));
    let released = lock(&l.shared.released).take();
    match released {
        Some(rx) if !live => {
            let reply = Reply::new(env.pid(), tag);
            runtime::spawn(async move {
                // Quinn closes the socket as soon as its driver notices it is unused; bounded so
                // a caller never waits on a socket that is, unexpectedly, still in use.
                let _ = tokio::time::timeout(Duration::from_secs(2), rx).await;
                reply.ok();
            });
            wait().encode(env)
        }
        _ => atoms::ok().encode(env),
    }
}

/// `listener_sockname(Listener)`: `{:ok, {"ip", port}}`.
#[rustler::nif]
fn listener_sockname<'a>(env: Env<'a>, l: ResourceArc<ListenerRes>) -> Term<'a> {
    (atoms::ok(), address::encode_addr(env, &l.shared.local)).encode(env)
}

pub fn controlling_process<'a>(env: Env<'a>, l: &ResourceArc<ListenerRes>, pid: LocalPid) -> Term<'a> {
    let mut owner = lock(&l.owner);
    if owner.pid != env.pid() {
        return err(env, atoms::not_owner());
    }
    if owner.transfer(l, Some(env), pid) {
        atoms::ok().encode(env)
    } else {
        err(env, atoms::closed())
    }
}
