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
//! Closing a listener stops accepting, aborts handshakes in progress and closes queued (never
//! delivered) connections; connections already delivered keep running, like accepted TCP
//! sockets when a listen socket closes. The UDP socket stays open for them and the address
//! stays registered (a new listener on it gets `:eaddrinuse`) until the last of them has
//! closed (handles to it may live on); with none, the address is free again when
//! `close_listener` returns.
use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustler::{Encoder, Env, LocalPid, Resource, ResourceArc, Term};
use tokio::sync::{oneshot, watch};

use crate::address;
use crate::atoms;
use crate::connection::{self, ConnRes, HandshakeInfo};
use crate::counters::{self, Live};
use crate::endpoint;
use crate::contain::{self, Contained};
use crate::error::Reason;
use crate::executor::{self, Shard};
use crate::messages::{self, Reply};
use crate::options;
use crate::owner::{self, Owned, Owner};
use crate::runtime;
use crate::tls;
use crate::util::lock;

const DEFAULT_BACKLOG: usize = 1024;

/// A process waiting in `async_accept` (or the blocking `accept`, which has a reply tag).
struct Waiter {
    pid: LocalPid,
    reply: Option<Reply>,
    _live: Live,
}

struct State {
    waiters: VecDeque<Waiter>,
    /// How many waiters were left the last time those of exited processes were dropped.
    waiters_pruned: usize,
    ready: VecDeque<Queued>,
    handshaking: usize,
    /// Delivered connections not yet closed: they keep the socket open after `close`.
    delivered_live: usize,
    closed: bool,
    /// The socket is being (or has been) retired.
    retiring: bool,
}

/// What the listener's tasks share. Freed when the resource is gone and the tasks have ended.
struct Shared {
    /// Taken when the socket is retired.
    endpoint: Mutex<Option<quinn::Endpoint>>,
    socket: endpoint::ListenerSocket,
    local: SocketAddr,
    backlog: usize,
    handshake_timeout: Duration,
    /// How accepted connections deliver datagrams to their owners (`None`: they take none).
    datagrams: Option<options::Active>,
    state: Mutex<State>,
    /// Tells the accept task and handshakes in progress that the listener is closed.
    stop: watch::Sender<bool>,
    /// Fires when the socket is closed and the address released (see `endpoint`).
    released: Mutex<Option<oneshot::Receiver<()>>>,
    /// The endpoint's shard, where its driver and the accept loop run (see `executor`).
    shard: Arc<Shard>,
    owner: Mutex<Owner>,
    _live: Live,
}

pub struct ListenerRes {
    shared: Arc<Shared>,
}

#[rustler::resource_impl]
impl Resource for ListenerRes {}

/// The owner's entry holds the listener until it closes (see `owner`): like a `:gen_tcp` listen
/// socket, an open listener belongs to its owner whether or not anything still refers to it.
/// Before, dropping the last reference closed it, and a listener held only in a variable the
/// caller no longer used could close under a connect when something garbage-collected the caller.
impl Owned for ListenerRes {
    fn describe(&self) -> String {
        format!("listener on {}", self.shared.local)
    }

    fn owner_down(this: &ResourceArc<Self>, pid: LocalPid) {
        let owned = lock(&this.shared.owner).pid == pid;
        if let Some((_, acceptors)) = owned.then(|| close(&this.shared)).flatten() {
            tell_acceptors(None, this, acceptors, &[pid]);
        }
    }
}

/// Sends `{quic, listener_stopped, Listener}` to each process that was waiting in
/// `async_accept` as the listener closed, once, but for those in `skip` (the owner, told by
/// `listener_close` or gone, and the process that closed it). Why: no connection will come,
/// and a process that does not own the listener (one of a pool of acceptors) would otherwise
/// wait for ever, as it would for a stream (`{quic, closed, undefined, undefined}` tells a
/// stream acceptor the same). From a NIF (`env`) the messages leave within the call, after
/// the owner's; from an owner's exit (the monitor's callback) through `messages::send`.
fn tell_acceptors(env: Option<Env>, l: &ResourceArc<ListenerRes>, mut acceptors: Vec<LocalPid>, skip: &[LocalPid]) {
    acceptors.sort();
    acceptors.dedup();
    for pid in acceptors.iter().filter(|p| !skip.contains(p)) {
        match env {
            Some(env) => {
                let _ = env.send(pid, stopped_msg(env, l.clone()));
            }
            None => {
                let l = l.clone();
                messages::send(pid, move |e| stopped_msg(e, l));
            }
        }
    }
}

/// quicer's `{quic, listener_stopped, Listener}`.
fn stopped_msg(e: Env, l: ResourceArc<ListenerRes>) -> Term {
    (atoms::quic(), atoms::listener_stopped(), l).encode(e)
}

impl ListenerRes {
    pub fn owner_pid(&self) -> LocalPid {
        lock(&self.shared.owner).pid
    }
}

impl Drop for ListenerRes {
    /// Closed already, unless the owner could not be registered: closing again does nothing.
    fn drop(&mut self) {
        close(&self.shared);
    }
}

/// How long a retiring socket waits for closing connections to send their CONNECTION_CLOSE
/// and drain (three probe timeouts, ~100 ms on loopback) before it closes anyway.
const RETIRE_GRACE: Duration = Duration::from_secs(1);

/// Stops accepting. Idempotent: `None` when the listener was closed already (by another
/// call, perhaps at the same moment), else whether accepted connections still use the socket
/// (then the address stays bound until they close), and the processes that were waiting in
/// `async_accept` (for `tell_acceptors`).
fn close(shared: &Arc<Shared>) -> Option<(bool, Vec<LocalPid>)> {
    let (queued, live, acceptors) = {
        let mut st = lock(&shared.state);
        if st.closed {
            return None;
        }
        st.closed = true;
        // Blocking `accept` callers are answered `{:error, :closed}` (their `Reply` does so as
        // it is dropped); `async_accept` callers are returned, to be told.
        let acceptors = st.waiters.drain(..).filter(|w| w.reply.is_none()).map(|w| w.pid).collect();
        (st.ready.drain(..).collect::<Vec<_>>(), st.delivered_live > 0, acceptors)
    };
    // The owner's entry lets go of the listener. That is never its last reference (which would
    // run `Drop`, and `close`, under this lock): whoever closes it holds one, or is its `Drop`,
    // which runs only after the entry let go.
    lock(&shared.owner).release();
    for Queued { conn: c, shard, .. } in queued {
        // On the connection's shard: closing takes its lock, which its driver may hold.
        shard.spawn(async move { c.close(quinn::VarInt::from_u32(0), b"listener closed") });
    }
    shared.stop.send_replace(true);
    if let Some(ep) = lock(&shared.endpoint).as_ref() {
        ep.set_server_config(None);
    }
    maybe_retire(shared);
    Some((live, acceptors))
}

/// Retires the socket once the listener is closed and no delivered connection is open.
fn maybe_retire(shared: &Arc<Shared>) {
    {
        let mut st = lock(&shared.state);
        if !st.closed || st.delivered_live > 0 || st.retiring {
            return;
        }
        st.retiring = true;
    }
    let endpoint = lock(&shared.endpoint).take();
    let socket = shared.socket.clone();
    runtime::spawn(async move {
        if let Some(ep) = endpoint {
            let _ = tokio::time::timeout(RETIRE_GRACE, ep.wait_idle()).await;
        }
        socket.retire();
    });
}

/// A delivered connection is counted (`delivered_live += 1`, under the state lock the caller
/// holds while starting it) until it closes; the connection's watcher then runs this, which
/// needs the same lock and so always comes after the count.
fn on_delivered_closed(shared: &Arc<Shared>) -> connection::OnClosed {
    let shared = shared.clone();
    Box::new(move || {
        lock(&shared.state).delivered_live -= 1;
        maybe_retire(&shared);
    })
}

async fn accept_loop(shared: Arc<Shared>, endpoint: quinn::Endpoint) {
    let _task = Live::new(&counters::TASKS);
    let mut stop = shared.stop.subscribe();
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => i,
            _ = stop.wait_for(|closed| *closed) => None,
        };
        let Some(incoming) = incoming else { break };
        let slot = {
            let mut st = lock(&shared.state);
            if st.closed {
                incoming.refuse();
                break;
            }
            if st.ready.len() + st.handshaking >= shared.backlog {
                // Queued connections whose driver has panicked (see `connection`) would only be
                // skipped by `accept`: they give their slots back now rather than when they
                // reach the front of the queue.
                st.ready.retain(|q| !q.shard.failed());
            }
            if st.ready.len() + st.handshaking >= shared.backlog {
                drop(st);
                incoming.refuse();
                continue;
            }
            Handshaking::take(&shared, &mut st)
        };
        start_handshake(&shared, slot, incoming);
    }
}

/// Accepts the connection attempt: Quinn starts the connection and spawns its driver, on a new
/// shard (see `executor`), where the handshake is then awaited.
///
/// The connection is taken out of Quinn's `Connecting` at once (`into_0rtt`, which always
/// succeeds for an incoming connection and changes nothing on the wire: nothing is sent on it
/// before the handshake ends), so that the handshake holds references to it of its own. With
/// only the `Connecting`'s, a panic inside Quinn's driver during the handshake (a bug in Quinn,
/// perhaps one a peer's packets trigger) aborted the VM: see `contain`. Done inside
/// `with_new_shard`, right after Quinn spawned the driver and before its first run (the new
/// shard runs once this task yields, or after the NIF running it inline), so that the lock it
/// takes is free and a panic in that first run finds the references held.
fn start_handshake(shared: &Arc<Shared>, slot: Handshaking, incoming: quinn::Incoming) {
    let (accepted, shard) = executor::with_new_shard(|| {
        incoming.accept().map(|connecting| connecting.into_0rtt().map(|(conn, done)| (Contained::connection(conn), done)))
    });
    // Otherwise `slot`, dropped, gives its place back. (`into_0rtt` fails only for outgoing
    // connections; dropping what it returns closes the connection.)
    if let Ok(Ok((conn, done))) = accepted {
        shard.clone().spawn(handshake(shared.clone(), slot, conn, done, shard));
    }
}

/// A handshake's place in the listener's `backlog` (counted in `State::handshaking`), given
/// back as it ends (`end`) or whenever it is dropped first: the handshake could not start, or
/// its task was dropped unfinished (the connection's driver panicked, and
/// `executor::Shard::fail` drops the shard's tasks).
struct Handshaking {
    shared: Arc<Shared>,
    counted: bool,
}

impl Handshaking {
    /// Takes a place (the caller holds the listener's state lock, `st`).
    fn take(shared: &Arc<Shared>, st: &mut State) -> Self {
        st.handshaking += 1;
        Handshaking { shared: shared.clone(), counted: true }
    }

    fn end(mut self, st: &mut State) {
        st.handshaking -= 1;
        self.counted = false;
    }
}

impl Drop for Handshaking {
    fn drop(&mut self) {
        if self.counted {
            lock(&self.shared.state).handshaking -= 1;
        }
    }
}

async fn handshake(shared: Arc<Shared>, slot: Handshaking, conn: Contained<quinn::Connection>, done: quinn::ZeroRttAccepted, shard: Arc<Shard>) {
    let _task = Live::new(&counters::TASKS);
    let mut stop = shared.stop.subscribe();
    let ended = tokio::select! {
        r = tokio::time::timeout(shared.handshake_timeout, done) => r.is_ok(),
        // Dropping the connection (our references are the last but the driver's) closes it.
        _ = stop.wait_for(|closed| *closed) => false,
    };
    // `done` resolves when the handshake ends either way. A failed one leaves a close reason;
    // so does one that completed and was closed at once (a client that connects and closes),
    // which still goes to an acceptor, as it did when the `Connecting` said it connected.
    // (`None`: Quinn panicked; see `contain`.)
    let failed = !ended || contain::quietly(|| conn.close_reason().is_some() && !handshake_complete(&conn)).unwrap_or(true);
    let mut st = lock(&shared.state);
    slot.end(&mut st);
    if failed {
        return;
    }
    shard.keep_until_driver_ends(&conn);
    // (`None`: its driver panicked already, see `connection`; nobody can use it.)
    let info = contain::quietly(|| HandshakeInfo::read(&conn, shared.local));
    let Some(info) = info.filter(|_| !shard.failed()) else { return };
    if st.closed {
        conn.close(quinn::VarInt::from_u32(0), b"listener closed");
        return;
    }
    let queued = Queued { conn, shard, info };
    while let Some(w) = st.waiters.pop_front() {
        let Waiter { pid, reply, .. } = w;
        let on_closed = on_delivered_closed(&shared);
        let info = queued.info.clone();
        let deliver = |res: &ResourceArc<ConnRes>| deliver(res, pid, reply, info);
        if ConnRes::start(None, (*queued.conn).clone(), shared.local, queued.shard.clone(), pid, deliver, Some(on_closed), shared.datagrams).is_some() {
            st.delivered_live += 1;
            return;
        }
        // That waiter exited while waiting; try the next.
    }
    st.ready.push_back(queued);
}

/// Did the connection's TLS handshake complete? TLS exports keying material only once it has
/// (before, rustls answers `HandshakeNotComplete`), and still can after the connection closed.
/// Quinn tells a completed handshake from a failed one only through the `Connecting` that
/// `start_handshake` gives up. Takes Quinn's lock: run it on the connection's shard.
fn handshake_complete(conn: &quinn::Connection) -> bool {
    let mut probe = [0u8; 1];
    conn.export_keying_material(&mut probe, b"macula_quic handshake complete", b"").is_ok()
}

/// A connection whose handshake is over, waiting for an accept.
struct Queued {
    conn: Contained<quinn::Connection>,
    shard: Arc<Shard>,
    /// What `new_conn` will say of it, read as its handshake ended: handing it over asks
    /// Quinn nothing (see `connection::HandshakeInfo`).
    info: HandshakeInfo,
}

/// Sends `{quic, new_conn, Conn, Info}` (or `{Tag, {:ok, Conn}}`) to the new owner. Runs on a
/// runtime thread.
fn deliver(res: &ResourceArc<ConnRes>, pid: LocalPid, reply: Option<Reply>, info: HandshakeInfo) {
    let res = res.clone();
    match reply {
        Some(r) => {
            r.send(move |e| (atoms::ok(), res).encode(e));
        }
        None => {
            messages::send(&pid, move |e| new_conn_msg(e, res, &info));
        }
    }
}

fn new_conn_msg<'a>(e: Env<'a>, res: ResourceArc<ConnRes>, info: &HandshakeInfo) -> Term<'a> {
    (atoms::quic(), atoms::new_conn(), res, info.encode(e)).encode(e)
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
        socket: bound.socket,
        local,
        backlog: opts.backlog.unwrap_or(DEFAULT_BACKLOG),
        handshake_timeout: opts.handshake_timeout.unwrap_or(connection::DEFAULT_HANDSHAKE_TIMEOUT),
        datagrams: opts.datagrams(),
        state: Mutex::new(State {
            waiters: VecDeque::new(),
            waiters_pruned: 0,
            ready: VecDeque::new(),
            handshaking: 0,
            delivered_live: 0,
            closed: false,
            retiring: false,
        }),
        stop: watch::channel(false).0,
        released: Mutex::new(Some(bound.released)),
        shard: bound.shard,
        owner: Mutex::new(Owner::unmonitored(env.pid())),
        _live: Live::new(&counters::LISTENERS),
    });
    let res = ResourceArc::new(ListenerRes { shared: shared.clone() });
    match Owner::monitor(Some(env), env.pid(), &res) {
        Some(o) => *lock(&shared.owner) = o,
        None => return Err(atoms::closed().into()),
    }
    shared.shard.clone().spawn(accept_loop(shared, accept_endpoint));
    Ok(res)
}

/// `listener_accept(Listener, Tag | nil)`: the next connection goes to the caller.
///
/// With a connection already queued it is handed over here, without a trip through the
/// runtime (a busy runtime would otherwise slow every accept down): `{:ok, Conn}` is returned
/// to a blocking caller (`Tag` a reference), `new_conn` is sent to an `async_accept` caller
/// and `:ok` returned. Otherwise the caller waits in line and `:ok` is returned.
#[rustler::nif]
fn listener_accept<'a>(env: Env<'a>, l: ResourceArc<ListenerRes>, tag: Term<'a>) -> Term<'a> {
    let caller = env.pid();
    let blocking = !tag.is_atom();
    // The connection may be handed over on a runtime thread: monitor the caller here, on the
    // scheduler.
    owner::prepare(env);
    let mut st = lock(&l.shared.state);
    if st.closed {
        return err(env, atoms::closed());
    }
    // A queued connection whose Quinn driver has panicked is of no use (see `connection`):
    // every call on it would fail.
    while st.ready.front().is_some_and(|q| q.shard.failed()) {
        st.ready.pop_front();
    }
    if let Some(Queued { conn, shard, info }) = st.ready.pop_front() {
        // Handing over asks Quinn nothing (what `new_conn` says was read as the handshake
        // ended), so it never waits for the connection's driver on another thread.
        let mut reply = atoms::ok().encode(env);
        // The caller is alive (it is calling), so the monitor is set.
        let announce = |res: &ResourceArc<ConnRes>| {
            if blocking {
                reply = (atoms::ok(), res.clone()).encode(env);
            } else {
                let _ = env.send(&caller, new_conn_msg(env, res.clone(), &info));
            }
        };
        let on_closed = on_delivered_closed(&l.shared);
        if ConnRes::start(Some(env), (*conn).clone(), l.shared.local, shard.clone(), caller, announce, Some(on_closed), l.shared.datagrams).is_none() {
            // Closed explicitly: its shard keeps references to it until its driver ends (see
            // `executor::Shard::keep_until_driver_ends`), so letting go would not close it.
            shard.spawn(async move { conn.close(quinn::VarInt::from_u32(0), b"accept failed") });
            return err(env, atoms::closed());
        }
        st.delivered_live += 1;
        return reply;
    }
    let reply = if blocking { Some(Reply::new(caller, tag)) } else { None };
    // Waiters served or withdrawn since the last pruning count as pruned (the list only
    // shrank), so it is pruned again once it doubles from what is there now.
    st.waiters_pruned = st.waiters_pruned.min(st.waiters.len());
    prune_waiters(env, &mut st);
    st.waiters.push_back(Waiter { pid: caller, reply, _live: Live::new(&counters::ACCEPT_WAITERS) });
    atoms::ok().encode(env)
}

/// Drops the waiters whose process has exited, whenever the list has doubled since the last
/// time (so each accept costs O(1) on average). A connection arriving skips such waiters too,
/// but a listener nobody connects to would otherwise keep one for every accept ever made by an
/// acceptor that has since exited (an acceptor pool restarted over and over, say).
fn prune_waiters(env: Env, st: &mut State) {
    if st.waiters.len() < (2 * st.waiters_pruned).max(16) {
        return;
    }
    st.waiters.retain_mut(|w| {
        let alive = env.is_process_alive(w.pid);
        if let (false, Some(r)) = (alive, w.reply.take()) {
            r.withdraw();
        }
        alive
    });
    st.waiters_pruned = st.waiters.len();
}

/// `listener_cancel_accept(Listener)`: withdraws the caller's most recent pending accept.
/// `:cancelled`, or `:delivered` if none is pending (its connection was already sent).
#[rustler::nif]
fn listener_cancel_accept<'a>(env: Env<'a>, l: ResourceArc<ListenerRes>) -> Term<'a> {
    let caller = env.pid();
    let mut st = lock(&l.shared.state);
    match st.waiters.iter().rposition(|w| w.pid == caller) {
        Some(i) => {
            if let Some(Waiter { reply: Some(r), .. }) = st.waiters.remove(i) {
                r.withdraw();
            }
            atoms::cancelled().encode(env)
        }
        None => atoms::delivered().encode(env),
    }
}

/// `listener_close(Listener, Tag)`: stops accepting (see the module doc for what happens to
/// connections) and sends the owner `{quic, listener_stopped, Listener}`, as it does every
/// other process waiting in `async_accept` (`tell_acceptors`). Returns `:wait` when
/// the address is about to be released — the caller then receives `{Tag, :ok}` once it is —
/// or `:ok` when accepted connections keep it bound (or it was already closed).
#[rustler::nif]
fn listener_close<'a>(env: Env<'a>, l: ResourceArc<ListenerRes>, tag: Term<'a>) -> Term<'a> {
    rustler::atoms! { wait }
    // Only the call that closes it tells anyone: two at once (or one and the owner's exit)
    // must not send the owner `listener_stopped` twice.
    let Some((live, acceptors)) = close(&l.shared) else {
        return atoms::ok().encode(env);
    };
    let owner = lock(&l.shared.owner).pid;
    let _ = env.send(&owner, stopped_msg(env, l.clone()));
    tell_acceptors(Some(env), &l, acceptors, &[owner, env.pid()]);
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
    match lock(&l.shared.owner).hand_over(env, pid, l) {
        Ok(()) => atoms::ok().encode(env),
        Err(reason) => err(env, reason),
    }
}
