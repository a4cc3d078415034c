//! Connections: one resource per QUIC connection, outgoing (`connect`) or accepted.
//!
//! A watcher task follows each connection until it ends and then tells the owner how:
//! `{quic, shutdown, C, AppErrorCode}` when the peer closed it, `{quic, transport_shutdown, C,
//! %{status, error}}` for an idle timeout or a transport error, and always `{quic, closed, C,
//! Props}` last. The watcher holds the resource while the connection is open; once it ends,
//! nothing native holds it and garbage collection frees it.
//!
//! If Quinn's driver of an established connection panics (a bug in Quinn; during an outgoing
//! connection's handshake that aborts the VM inside Quinn, see `contain`), the connection is
//! broken for good and will never say it closed. Its tasks then end as after a panic (see
//! `executor::Shard::fail`): calls waiting on it get `{:error, :internal_error}`, its streams
//! end, and the watcher reports `{quic, transport_shutdown, C, %{status => internal_error,
//! error => 1}}` and `closed`. Later calls answer as for a closed connection. The peer is not
//! told; it sees the connection go idle.
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use rustler::{Encoder, Env, LocalPid, Resource, ResourceArc, Term};
use tokio::sync::oneshot;

use crate::address::{self, Host};
use crate::atoms;
use crate::connect_watch;
use crate::counters::{self, Live};
use crate::contain::{self, Contained};
use crate::datagram;
use crate::endpoint;
use crate::inline_watch;
use crate::error::{self, Reason};
use crate::executor::{self, Shard};
use crate::messages::{self, Reply};
use crate::options::{self, Active};
use crate::owner::{self, Owned, Owner};
use crate::runtime;
use crate::stream::StreamRes;
use crate::tls;
use crate::util::lock;

/// Default time a handshake may take when the caller sets no timeout of its own.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

struct State {
    owner: Owner,
    /// Pending stream accepts by id, so `accept_stream/3` can withdraw one on timeout.
    /// Each entry cancels its accept task (which then withdraws its reply unanswered).
    accepts: HashMap<u64, oneshot::Sender<()>>,
    next_accept: u64,
    /// Set by `close/1`: the closing caller consumes the `closed` message itself.
    closed_by_app: bool,
    /// The `closed` message was sent (by `conn_close` or the watcher): nothing follows it.
    closed_sent: bool,
    /// Why it ended, recorded as `closed` is sent: for calls that cannot ask Quinn (its shard
    /// busy on another thread) yet must refuse an ended connection at once.
    ended: Option<Reason>,
    /// How datagrams reach the owner (see `datagram`); `None` when the connection takes none.
    dgram: Option<datagram::Delivery>,
    /// While an `async_connect` handshake runs: sending on it (or dropping it) abandons the
    /// handshake. Taken by whoever ends the connecting state first: the handshake's task as it
    /// establishes the connection, or a close, or the owner's exit.
    connecting: Option<oneshot::Sender<()>>,
    /// Calls waiting for an `async_connect` handshake to end (`conn_await_connected`),
    /// answered by whatever ends the connecting state.
    await_connected: Vec<Reply>,
    /// Stream accepts asked for while an `async_connect` handshake runs: started as it
    /// completes, answered with why it failed otherwise (each is in `accepts` too, so it can
    /// be withdrawn meanwhile).
    pending_accepts: Vec<PendingAccept>,
    /// Set by `debug_panic_handshake` (test builds): the handshake's task panics as it
    /// completes, before `establish` or inside it, to prove the `Handshake` guard reports it.
    debug_panic_handshake: Option<PanicAt>,
    /// Set by `debug_refuse_streams` (test builds): accepted streams are refused as after
    /// `closed` (see `hand_over`), a race tests cannot otherwise bring about at will.
    debug_refuse_streams: bool,
}

impl State {
    /// Why the connection ended, as recorded when `closed` was sent (`:closed` when a close by
    /// the application recorded none).
    fn ended_reason(&self) -> Reason {
        self.ended.clone().unwrap_or_else(|| atoms::closed().into())
    }

    /// Ends an `async_connect` handle's connecting state for `reason`: nothing follows (the
    /// owner has heard `closed`, or is about to, or is gone), the handshake is abandoned if it
    /// runs (dropping the sender ends its task), and whoever waits on it hears `reason`.
    fn end_connecting(&mut self, reason: Reason) {
        self.closed_sent = true;
        self.connecting = None;
        self.answer_waiters(Err(reason.clone()));
        self.ended = Some(reason);
    }

    /// Answers the calls waiting for the handshake: `Ok` when it completed, else why not. A
    /// failed handshake also fails the accepts asked for meanwhile (after `Ok`, `establish` has
    /// taken them to start).
    fn answer_waiters(&mut self, result: Result<(), Reason>) {
        for reply in self.await_connected.drain(..) {
            match &result {
                Ok(()) => reply.ok(),
                Err(r) => reply.error(r.clone()),
            };
        }
        if let Err(r) = &result {
            for accept in std::mem::take(&mut self.pending_accepts) {
                let withdrawn = self.accepts.remove(&accept.id).is_none();
                let no_stream = AcceptorClosed::new(accept.caller, &accept.reply);
                fail_accept(accept.reply, no_stream, withdrawn, r.clone());
            }
        }
    }
}

/// A stream accept waiting for an `async_connect` handshake to complete (see `spawn_accept`).
struct PendingAccept {
    id: u64,
    caller: LocalPid,
    opts: options::Stream,
    reply: Option<Reply>,
    cancel: oneshot::Receiver<()>,
}

/// A connection handle. Every handle but one from `async_connect/3` is made with its handshake
/// complete; an `async_connect` handle is made at once and gets its Quinn connection when the
/// handshake completes (see `Established`).
pub struct ConnRes {
    /// The connection's Quinn side. Set from the start, except for an `async_connect` handle
    /// until its handshake completes (Quinn has no connection object before then). Read
    /// through `Deref`; every call that a connecting handle can reach checks `ready` first.
    est: OnceLock<Established>,
    /// Bytes handed to `send`/`async_send` on this connection's streams that wait in their
    /// queues for flow-control or congestion credit (`getstat`'s `send_pend`).
    pub send_pend: AtomicUsize,
    /// Wakes the datagram reader when the owner's datagram mode changes (see `datagram`).
    pub dgram_wake: tokio::sync::Notify,
    /// `send_dgram` calls waiting, in order, for a task on the shard to hand their datagrams
    /// to Quinn (see `datagram::Outbox`).
    pub dgram_out: Mutex<datagram::Outbox>,
    state: Mutex<State>,
    _live: Live,
}

/// What an established connection has: its Quinn connection, its address and its shard.
pub struct Established {
    /// Contained: on a poisoned connection (see `contain`) dropping the last handle panics.
    pub conn: Contained<quinn::Connection>,
    /// The endpoint's bound address; its IP may be the wildcard (a shared client endpoint).
    pub local_bound: SocketAddr,
    /// The source IP the kernel routes to the peer from a wildcard-bound endpoint, looked up
    /// the first time `local_addr` needs it (not on every connect: few callers ask).
    routed_ip: OnceLock<Option<IpAddr>>,
    /// This connection's shard, where its tasks run: its Quinn driver, its streams' readers
    /// and writers, its watcher (see `executor`).
    pub shard: Arc<Shard>,
}

impl Established {
    fn new(conn: Contained<quinn::Connection>, local_bound: SocketAddr, shard: Arc<Shard>) -> Self {
        Established { conn, local_bound, routed_ip: OnceLock::new(), shard }
    }
}

/// Established connections' fields read as the handle's own (`c.conn`, `c.shard`). Only an
/// `async_connect` handle can lack them, and only until its handshake completes: the calls
/// it can reach check `ConnRes::ready` first, so this never panics; if a path were missed, the
/// panic would be caught (a NIF's raises, a task's is contained), never crash the VM.
impl std::ops::Deref for ConnRes {
    type Target = Established;
    fn deref(&self) -> &Established {
        self.est.get().expect("connection used before its handshake completed")
    }
}

#[rustler::resource_impl]
impl Resource for ConnRes {}

impl Owned for ConnRes {
    fn describe(&self) -> String {
        let st = lock(&self.state);
        if self.est.get().is_none() {
            return format!("connection, handshake in progress (async_connect): closed_sent={}", st.closed_sent);
        }
        format!(
            "connection on {}: closed_by_app={} closed_sent={} ended={} driver_failed={}",
            self.local_bound,
            st.closed_by_app,
            st.closed_sent,
            st.ended.is_some(),
            self.shard.failed()
        )
    }

    fn owner_down(this: &ResourceArc<Self>, pid: LocalPid) {
        // The owner exited: close with code 0 so the peer learns at once, instead of waiting
        // for the idle timeout. The watcher then ends and the resource can be freed. Closing
        // takes Quinn's connection lock, which its driver may hold for a while: do it on the
        // shard, serialised with the driver, not on the scheduler running this callback.
        let mut st = lock(&this.state);
        if st.owner.pid != pid {
            return;
        }
        if this.est.get().is_none() {
            // A handshake in progress (or one that has ended): abandon it. Nobody is left to
            // tell; a failure already recorded keeps its reason (and answered the waiters).
            if !st.closed_sent {
                st.end_connecting(atoms::closed().into());
            }
            st.owner.release();
            return;
        }
        drop(st);
        {
            let conn = this.conn.clone();
            this.shard.spawn(async move { conn.close(quinn::VarInt::from_u32(0), b"owner exited") });
        }
    }
}

impl ConnRes {
    /// Wraps an established connection, monitors `owner` and starts the watcher. Returns
    /// `None` (leaving the connection untouched) when the owner is already dead.
    ///
    /// `announce` runs (for a live owner) before the watcher starts, so a message it sends
    /// (`new_conn`) reaches the owner before the connection's `shutdown`/`closed` messages.
    /// `on_closed` (if the connection starts) runs on a runtime thread when it has closed.
    /// `datagrams`: the connection was made with `datagram_receive_enabled`, and its owner
    /// receives them in that mode (see `datagram`).
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        env: Option<Env>,
        conn: quinn::Connection,
        local_bound: SocketAddr,
        shard: Arc<Shard>,
        owner: LocalPid,
        announce: impl FnOnce(&ResourceArc<ConnRes>),
        on_closed: Option<OnClosed>,
        datagrams: Option<Active>,
    ) -> Option<ResourceArc<ConnRes>> {
        let res = ConnRes::new(Some(Established::new(Contained::connection(conn), local_bound, shard)), owner, datagrams);
        let owner = Owner::monitor(env, owner, &res)?;
        lock(&res.state).owner = owner;
        announce(&res);
        res.shard.spawn(watch(res.clone(), on_closed));
        if datagrams.is_some() {
            datagram::start_reader(&res);
        }
        Some(res)
    }

    fn new(est: Option<Established>, owner: LocalPid, datagrams: Option<Active>) -> ResourceArc<ConnRes> {
        let cell = OnceLock::new();
        if let Some(est) = est {
            let _ = cell.set(est);
        }
        ResourceArc::new(ConnRes {
            est: cell,
            send_pend: AtomicUsize::new(0),
            dgram_wake: tokio::sync::Notify::new(),
            dgram_out: Mutex::new(datagram::Outbox::default()),
            state: Mutex::new(State {
                owner: Owner::unmonitored(owner),
                accepts: HashMap::new(),
                next_accept: 1,
                closed_by_app: false,
                closed_sent: false,
                ended: None,
                dgram: datagrams.map(datagram::Delivery::new),
                connecting: None,
                await_connected: Vec::new(),
                pending_accepts: Vec::new(),
                debug_panic_handshake: None,
                debug_refuse_streams: false,
            }),
            _live: Live::new(&counters::CONNECTIONS),
        })
    }

    /// `Ok` once the connection is established (always, but for an `async_connect` handle
    /// whose handshake is still running or has failed); else the error a call on it answers:
    /// why it ended, or `:not_connected` while the handshake runs.
    pub fn ready(&self) -> Result<(), Reason> {
        if self.est.get().is_some() {
            return Ok(());
        }
        Err(lock(&self.state).ended.clone().unwrap_or_else(|| atoms::not_connected().into()))
    }

    /// Ends an `async_connect` handle's handshake in progress for a close (a NIF's, in `env`):
    /// abandons it, sends the owner `closed` (under the state lock) and answers `:ok`, or
    /// `:closed` when it had already ended. `None` when the connection is established (or
    /// becomes so as this runs): the caller closes it as any other.
    fn close_connecting(env: Env, this: &ResourceArc<ConnRes>) -> Option<rustler::Atom> {
        if this.est.get().is_some() {
            return None;
        }
        let mut st = lock(&this.state);
        if this.est.get().is_some() {
            return None;
        }
        if st.closed_sent {
            return Some(atoms::closed());
        }
        st.closed_by_app = true;
        st.end_connecting(atoms::closed().into());
        let _ = env.send(&st.owner.pid, closed_msg(env, this.clone(), false, true));
        st.owner.release();
        Some(atoms::ok())
    }

    /// An `async_connect` handshake completed: gives the handle its connection, starts the
    /// watcher and tells the owner `connected` (under the state lock, so before anything the
    /// watcher reports). False, leaving `conn` to the caller to close, when the connecting state
    /// was ended meanwhile (closed, or its owner exited). Runs on the connection's shard, so
    /// the watcher spawned here cannot run before this returns.
    fn establish(this: &ResourceArc<ConnRes>, conn: quinn::Connection, bound: SocketAddr, shard: Arc<Shard>, on_closed: Option<OnClosed>) -> bool {
        let alpn = negotiated_protocol(&conn);
        let (datagrams, accepts) = {
            let mut st = lock(&this.state);
            if st.closed_sent || st.connecting.take().is_none() {
                return false;
            }
            // The worst place for a panic: the handshake is no longer abortable, and the
            // handle is not established yet.
            if st.debug_panic_handshake == Some(PanicAt::Establish) {
                panic!("macula_quic: deliberate panic in establish (debug_panic_handshake/2)");
            }
            if this.est.set(Established::new(Contained::connection(conn), bound, shard)).is_err() {
                return false;
            }
            // The watcher first: from here on, however the connection ends (after a panic
            // below, the caller closes it), `on_closed` runs and the owner hears `closed`.
            #[cfg(feature = "test_hooks")]
            if st.debug_panic_handshake == Some(PanicAt::WatcherUnrun) {
                this.shard.debug_fail_on_next_spawn();
            }
            // (`watch` builds its guard here, under the state lock; `spawn` only queues the
            // task, so the guard's report, which takes that lock, cannot run in between.)
            this.shard.spawn(watch(this.clone(), on_closed));
            if st.debug_panic_handshake == Some(PanicAt::Established) {
                panic!("macula_quic: deliberate panic in establish, established (debug_panic_handshake/2)");
            }
            let r = this.clone();
            messages::send(&st.owner.pid, move |e| {
                let alpn = alpn.as_deref().map_or_else(|| atoms::undefined().encode(e), |a| binary_term(e, a));
                connected_msg(e, r, alpn)
            });
            st.answer_waiters(Ok(()));
            (st.dgram.is_some(), std::mem::take(&mut st.pending_accepts))
        };
        for a in accepts {
            spawn_accept(this, a.id, a.caller, a.opts, a.reply, a.cancel);
        }
        if datagrams {
            datagram::start_reader(this);
        }
        true
    }

    /// An `async_connect` failed before its handshake completed: tells the owner quicer's
    /// `transport_shutdown` (`status`: Quinn's, else the reason's own atom) and `closed`,
    /// unless a close or the owner's exit ended it first. `peer_acked`: the peer closed it.
    fn handshake_failed(this: &ResourceArc<ConnRes>, reason: Reason, quinn_status: Option<(rustler::Atom, u64)>, peer_acked: bool) {
        let mut st = lock(&this.state);
        if st.closed_sent || this.est.get().is_some() {
            return;
        }
        let (status, code) = quinn_status.unwrap_or_else(|| reason.status());
        st.end_connecting(reason);
        let r = this.clone();
        messages::send(&st.owner.pid, move |e| transport_shutdown_msg(e, r, status, code));
        let r = this.clone();
        messages::send(&st.owner.pid, move |e| closed_msg(e, r, peer_acked, false));
        st.owner.release();
    }

    pub fn owner_pid(&self) -> LocalPid {
        lock(&self.state).owner.pid
    }

    /// Runs `f` with the connection's datagram delivery (`None` without datagrams), the owner of
    /// the moment, and whether `closed` has gone, under the state lock. `datagram` sends its
    /// messages inside `f`, as the watcher does under the same lock: so each goes to the owner
    /// of the moment (never to one that has just handed the connection over), and none follows
    /// `closed`.
    pub fn with_datagrams<R>(&self, f: impl FnOnce(Option<&mut datagram::Delivery>, LocalPid, bool) -> R) -> R {
        let mut st = lock(&self.state);
        let (owner, closed) = (st.owner.pid, st.closed_sent);
        f(st.dgram.as_mut(), owner, closed)
    }

    /// Why the connection can no longer be used (`None` while it is open): Quinn's reason, or
    /// `:closed` when its driver panicked (see the module doc). `quietly`: a driver panicking on
    /// another thread while this waits for Quinn's lock leaves the lock poisoned.
    pub fn end_reason(&self) -> Option<Reason> {
        if self.shard.failed() {
            return Some(atoms::closed().into());
        }
        match contain::quietly(|| self.conn.close_reason()) {
            None => Some(atoms::closed().into()),
            Some(why) => why.map(|why| error::connection(&why)),
        }
    }

    /// The local address as the peer sees it: the path's local IP where Quinn knows it,
    /// else the endpoint's bound address.
    pub fn local_addr(&self) -> SocketAddr {
        local_addr_with(&self.conn, self.local_bound, || {
            *self.routed_ip.get_or_init(|| endpoint::route_source(&self.conn.remote_address()))
        })
    }
}

/// A connection's local address as the peer sees it: the path's local IP where Quinn knows it,
/// else, for an endpoint bound to a wildcard, the IP `routed` finds, else the bound address.
fn local_addr_with(conn: &quinn::Connection, bound: SocketAddr, routed: impl FnOnce() -> Option<IpAddr>) -> SocketAddr {
    match conn.local_ip() {
        Some(ip) => SocketAddr::new(ip, bound.port()),
        None if bound.ip().is_unspecified() => routed().map_or(bound, |ip| SocketAddr::new(ip, bound.port())),
        None => bound,
    }
}

/// Something to do once a connection has closed (a listener counting its live connections).
pub type OnClosed = Box<dyn FnOnce() + Send + 'static>;

/// Follows the connection to its end and reports it to the owner.
///
/// Its `WatcherExit` exists before the task first runs: a watcher dropped without ever running
/// (its shard failed first) still reports, so the owner hears `closed` and a listener learns
/// that the connection is gone.
fn watch(res: ResourceArc<ConnRes>, on_closed: Option<OnClosed>) -> impl std::future::Future<Output = ()> + Send {
    let mut exit = WatcherExit { res: res.clone(), on_closed };
    async move {
        let _task = Live::new(&counters::TASKS);
        let why = res.conn.closed().await;
        exit.report(Some(&why));
    }
}

/// Reports how the connection ended, once. Dropped without having reported, which only a
/// panic (the watcher's own, or Quinn's driver's: see `executor::Shard::fail`) makes happen,
/// it reports an internal error: the owner always hears `closed`, and a listener always learns
/// that its accepted connection is gone (its address may then be released).
struct WatcherExit {
    res: ResourceArc<ConnRes>,
    on_closed: Option<OnClosed>,
}

impl Drop for WatcherExit {
    fn drop(&mut self) {
        self.report(None);
    }
}

impl WatcherExit {
    /// `why` is Quinn's reason, `None` after a panic.
    fn report(&mut self, why: Option<&quinn::ConnectionError>) {
        if let Some(f) = self.on_closed.take() {
            f();
        }
        report_end(&self.res, why);
    }
}

/// Tells the owner how the connection ended (`why`: Quinn's reason, `None` after a panic),
/// unless it has been told already.
fn report_end(res: &ResourceArc<ConnRes>, why: Option<&quinn::ConnectionError>) {
    // Pending stream accepts end by themselves (Quinn fails them) and answer their callers.
    // The messages are sent holding the state lock, as streams do: `controlling_process`
    // takes the same lock, so each message goes to the owner of the moment, never to one
    // that has just handed the connection over (where nobody would read it, keeping the
    // handle alive).
    let mut st = lock(&res.state);
    if st.closed_sent {
        // Reported already, or `conn_close` told the owner.
        return;
    }
    st.closed_sent = true;
    st.ended = Some(why.map_or_else(|| atoms::closed().into(), error::connection));
    let (owner, by_app) = (st.owner.pid, st.closed_by_app);
    let local = matches!(why, Some(quinn::ConnectionError::LocallyClosed));
    if !local {
        let r = res.clone();
        let why = why.cloned();
        messages::send(&owner, move |e| match &why {
            Some(quinn::ConnectionError::ApplicationClosed(frame)) => {
                (atoms::quic(), atoms::shutdown(), r, frame.error_code.into_inner()).encode(e)
            }
            other => {
                let (status, code) = match other {
                    Some(why) => transport_status(why),
                    // QUIC's INTERNAL_ERROR.
                    None => (atoms::internal_error(), 1),
                };
                transport_shutdown_msg(e, r, status, code)
            }
        });
    }
    let r = res.clone();
    let peer_acked = why.is_some() && !local;
    messages::send(&owner, move |e| closed_msg(e, r, peer_acked, local || by_app));
    st.owner.release();
}

/// quicer's `{quic, transport_shutdown, C, #{status => Status, error => Code}}`.
fn transport_shutdown_msg(e: Env, r: ResourceArc<ConnRes>, status: rustler::Atom, code: u64) -> Term {
    let props = Term::map_from_pairs(e, &[(atoms::status().encode(e), status.encode(e)), (atoms::error().encode(e), code.encode(e))])
        .unwrap_or_else(|_| atoms::undefined().encode(e));
    (atoms::quic(), atoms::transport_shutdown(), r, props).encode(e)
}

/// `{quic, closed, C, Props}`: always the last message about a connection.
fn closed_msg(e: Env, r: ResourceArc<ConnRes>, peer_acked: bool, app_closing: bool) -> Term {
    // Only an `async_connect` handle can end before its handshake completed.
    let handshake_done = r.est.get().is_some();
    let props = Term::map_from_pairs(
        e,
        &[
            (atoms::is_handshake_completed().encode(e), handshake_done.encode(e)),
            (atoms::is_peer_acked().encode(e), peer_acked.encode(e)),
            (atoms::is_app_closing().encode(e), app_closing.encode(e)),
        ],
    )
    .unwrap_or_else(|_| atoms::undefined().encode(e));
    (atoms::quic(), atoms::closed(), r, props).encode(e)
}

/// quicer's `transport_shutdown` status atom and error code for why a connection ended.
fn transport_status(why: &quinn::ConnectionError) -> (rustler::Atom, u64) {
    use quinn::ConnectionError::*;
    match why {
        TimedOut => (atoms::connection_idle(), 0),
        TransportError(e) => (status_atom(u64::from(e.code)), u64::from(e.code)),
        ConnectionClosed(f) => (status_atom(u64::from(f.error_code)), u64::from(f.error_code)),
        Reset => (atoms::reset(), 0),
        VersionMismatch => (atoms::version_mismatch(), 0),
        CidsExhausted => (atoms::cids_exhausted(), 0),
        ApplicationClosed(f) => (atoms::shutdown(), f.error_code.into_inner()),
        LocallyClosed => (atoms::closed(), 0),
    }
}

fn status_atom(code: u64) -> rustler::Atom {
    if (0x100..0x200).contains(&code) {
        atoms::tls_error()
    } else {
        atoms::transport_error()
    }
}

// ---------------------------------------------------------------------------------------------
// NIFs

fn err<'a>(env: Env<'a>, reason: impl Encoder) -> Term<'a> {
    (atoms::error(), reason).encode(env)
}

/// `connect(Host, Port, Opts, Tag, TimeoutMs)`: starts a connection and returns `:ok`, or
/// `{:watch, Us}` when the caller should watch its mailbox for the answer for up to `Us`
/// microseconds before it waits (see `connect_watch`); the caller later receives `{Tag, {:ok,
/// Conn} | {:error, Reason}}`. Bad arguments are answered at once with `{:error, Reason}`. The
/// timeout covers resolution and the handshake.
#[rustler::nif]
fn connect<'a>(env: Env<'a>, host: Term<'a>, port: Term<'a>, opts: Term<'a>, tag: Term<'a>, timeout_ms: u64) -> Term<'a> {
    let DialArgs { host, port, opts, config } = match DialArgs::decode(host, port, opts) {
        Ok(a) => a,
        Err(r) => return err(env, r),
    };
    // The connection may start on a runtime thread: monitor its owner here, on the scheduler.
    owner::prepare(env);
    let (in_flight, watch_us) = connect_watch::begin();
    let caller = Caller { owner: env.pid(), reply: Reply::new(env.pid(), tag), in_flight, datagrams: opts.datagrams() };
    let timeout = Duration::from_millis(timeout_ms.clamp(1, u32::MAX as u64));
    let timeout = opts.handshake_timeout.map_or(timeout, |h| h.min(timeout));
    let deadline = tokio::time::Instant::now() + timeout;
    let client = known_client(&host, port, &opts);
    let shard = client.as_ref().map(|(_, s, _)| s.clone());
    let task = async move {
        let _task = Live::new(&counters::TASKS);
        match tokio::time::timeout_at(deadline, dial(host, port, opts, config, client)).await {
            Ok(Ok((connecting, bound, shard, lease))) => {
                shard.clone().spawn(finish_connect(connecting, bound, shard, lease, caller, deadline));
            }
            Ok(Err(reason)) => caller.error(reason),
            Err(_) => caller.error(atoms::timeout()),
        }
    };
    match shard {
        Some(shard) => executor::inline(env, None, || shard.spawn(task)),
        None => {
            runtime::spawn(task);
        }
    }
    if watch_us > 0 {
        (atoms::watch(), watch_us).encode(env)
    } else {
        atoms::ok().encode(env)
    }
}

/// `async_connect(Host, Port, Opts)`: quicer's `async_connect/3`. Returns `{:ok, Conn}` at once,
/// a handle owned (and monitored) from now, whose handshake then runs: the owner receives
/// `{quic, connected, Conn, #{is_resumed => false, alpns => Alpn}}` once it completes, or
/// `{quic, transport_shutdown, Conn, #{status, error}}` and `{quic, closed, Conn, _}` if it
/// fails. Until then stream accepts are held for it (`conn_accept_stream`), `open_stream`
/// waits for it in Elixir (`conn_await_connected`), and other calls that need the connection
/// answer `{:error, :not_connected}`; closing abandons the handshake. Bad arguments are answered at once with `{:error, Reason}`. The
/// handshake has `handshake_idle_timeout_ms` (10 s by default, as MsQuic's).
#[rustler::nif]
fn async_connect<'a>(env: Env<'a>, host: Term<'a>, port: Term<'a>, opts: Term<'a>) -> Term<'a> {
    let DialArgs { host, port, opts, config } = match DialArgs::decode(host, port, opts) {
        Ok(a) => a,
        Err(r) => return err(env, r),
    };
    owner::prepare(env);
    let res = ConnRes::new(None, env.pid(), opts.datagrams());
    let Some(owner) = Owner::monitor(Some(env), env.pid(), &res) else {
        // The caller is running this call: it cannot have exited.
        return err(env, atoms::closed());
    };
    let (abort_tx, mut abort) = oneshot::channel::<()>();
    {
        let mut st = lock(&res.state);
        st.owner = owner;
        st.connecting = Some(abort_tx);
    }
    let deadline = tokio::time::Instant::now() + opts.handshake_timeout.unwrap_or(DEFAULT_HANDSHAKE_TIMEOUT);
    let client = known_client(&host, port, &opts);
    let shard = client.as_ref().map(|(_, s, _)| s.clone());
    let handshake = Handshake { res: res.clone(), done: false };
    let task = async move {
        let _task = Live::new(&counters::TASKS);
        let dialed = tokio::select! {
            // Closed, or its owner exited, during the lookup.
            _ = &mut abort => return handshake.abandoned(),
            d = tokio::time::timeout_at(deadline, dial(host, port, opts, config, client)) => d,
        };
        match dialed {
            Ok(Ok((connecting, bound, shard, lease))) => {
                shard.clone().spawn(finish_async_connect(connecting, bound, shard, lease, handshake, abort, deadline));
            }
            Ok(Err(reason)) => handshake.failed(reason, None, false),
            Err(_) => handshake.failed(atoms::timeout().into(), None, false),
        }
    };
    // As in `connect`: on the client endpoint's shard, inline when it is free.
    match shard {
        Some(shard) => executor::inline(env, None, || shard.spawn(task)),
        None => {
            runtime::spawn(task);
        }
    }
    (atoms::ok(), res).encode(env)
}

/// Waits for an `async_connect` handshake on the connection's shard, unless the handle is
/// closed (or its owner exits) first; dropping `connecting` then abandons it (Quinn closes the
/// connection). The connection keeps `lease` until it has ended.
async fn finish_async_connect(
    connecting: quinn::Connecting,
    bound: SocketAddr,
    shard: Arc<Shard>,
    lease: Option<endpoint::Lease>,
    handshake: Handshake,
    mut abort: oneshot::Receiver<()>,
    deadline: tokio::time::Instant,
) {
    let _task = Live::new(&counters::TASKS);
    let outcome = tokio::select! {
        _ = &mut abort => return handshake.abandoned(),
        r = tokio::time::timeout_at(deadline, connecting) => r,
    };
    match outcome {
        Ok(Ok(conn)) => {
            let conn = Contained::connection(conn);
            if lock(&handshake.res.state).debug_panic_handshake == Some(PanicAt::Task) {
                panic!("macula_quic: deliberate panic in an async_connect handshake (debug_panic_handshake/2)");
            }
            shard.keep_until_driver_ends(&conn);
            let on_closed: Option<OnClosed> = lease.map(|l| Box::new(move || drop(l)) as OnClosed);
            if !handshake.established(conn.clone(), bound, shard, on_closed) {
                contain::quietly(|| conn.close(quinn::VarInt::from_u32(0), b"closed"));
            }
        }
        Ok(Err(e)) => {
            use quinn::ConnectionError::*;
            // Quinn's idle timer ending a handshake is MsQuic's handshake timeout too.
            let status = if matches!(e, TimedOut) { (atoms::connection_timeout(), 0) } else { transport_status(&e) };
            let peer_closed = matches!(e, ConnectionClosed(_) | ApplicationClosed(_));
            handshake.failed(error::connection(&e), Some(status), peer_closed)
        }
        Err(_) => handshake.failed(atoms::timeout().into(), None, false),
    }
}

/// An `async_connect` handshake in progress, held by the task running it, which reports how it
/// ended once: `established`, `failed`, or `abandoned` (a close or the owner's exit ended the
/// connecting state and told whom there was to tell). Dropped without a report (its task
/// panicked, or was dropped), it reports an internal error, so the owner still hears `closed`
/// and the handle does not stay `not_connected` for good.
struct Handshake {
    res: ResourceArc<ConnRes>,
    done: bool,
}

impl Handshake {
    /// False when the connection must be closed by the caller: the connecting state had
    /// ended, or `establish` panicked.
    fn established(mut self, conn: quinn::Connection, bound: SocketAddr, shard: Arc<Shard>, on_closed: Option<OnClosed>) -> bool {
        if let Some(established) = contain::quietly(|| ConnRes::establish(&self.res, conn, bound, shard, on_closed)) {
            self.done = true;
            return established;
        }
        // `establish` panicked. The caller closes the connection (the shard keeps it alive
        // until its driver ends: left open, it would last until its idle timeout, or for good
        // with keep-alives). Not established yet: this guard's drop reports a failed
        // handshake. Established: the owner and the calls still waiting for the handshake are
        // told here; the watcher, started first thing, then only runs `on_closed`.
        if self.res.est.get().is_some() {
            self.done = true;
            lock(&self.res.state).answer_waiters(Err(atoms::internal_error().into()));
            // Told now, as a driver's panic is told (`transport_shutdown` with INTERNAL_ERROR,
            // then `closed`): the close the caller makes would reach the owner through the
            // watcher as a close of its own (`is_app_closing`).
            report_end(&self.res, None);
        }
        false
    }

    fn failed(mut self, reason: Reason, status: Option<(rustler::Atom, u64)>, peer_acked: bool) {
        self.done = true;
        ConnRes::handshake_failed(&self.res, reason, status, peer_acked);
    }

    fn abandoned(mut self) {
        self.done = true;
    }
}

impl Drop for Handshake {
    fn drop(&mut self) {
        if !self.done {
            // QUIC's INTERNAL_ERROR, as for a panic in an established connection's driver.
            ConnRes::handshake_failed(&self.res, atoms::internal_error().into(), Some((atoms::internal_error(), 1)), false);
        }
    }
}

/// A connect's arguments, decoded and checked, with the client configuration they call for.
struct DialArgs {
    host: Host,
    port: u16,
    opts: options::Connect,
    config: quinn::ClientConfig,
}

impl DialArgs {
    fn decode(host: Term, port: Term, opts: Term) -> Result<DialArgs, Reason> {
        let host = address::decode_host(host).ok_or(Reason::Atom(atoms::bad_address()))?;
        let port = address::decode_port(port).filter(|p| *p != 0).ok_or(Reason::Atom(atoms::bad_address()))?;
        let opts = options::decode_connect(opts)?;
        // Checked here, as Quinn would check it in `dial`: an `async_connect` answers it at once.
        if let Some(name) = &opts.server_name {
            rustls::pki_types::ServerName::try_from(name.as_str()).map_err(|_| error::bad_option("server_name"))?;
        }
        let config = tls::client_config_cached(&opts.tls, &opts.transport)?;
        Ok(DialArgs { host, port, opts, config })
    }
}

/// The client endpoint for a connect to an address (no lookup to wait for), so that the connect
/// starts on its shard, inline in the call when the shard is free: the new connection's driver
/// then runs there too, and the Initial packet leaves from the calling thread instead of
/// waiting for a runtime worker to wake up. `None` for a name, or when finding the endpoint
/// failed (`dial` then tries again and answers the error).
fn known_client(host: &Host, port: u16, opts: &options::Connect) -> Option<(quinn::Endpoint, Arc<Shard>, Option<endpoint::Lease>)> {
    match host {
        Host::Ip(ip) => endpoint::client_endpoint(&SocketAddr::new(*ip, port), opts.local_address).ok(),
        Host::Name(_) => None,
    }
}

/// Who waits for a connect's answer: the new connection's owner, the reply, and the connect's
/// mark as in flight, held until the answer goes (the caller may be watching its mailbox for
/// it, see `connect_watch`).
struct Caller {
    owner: LocalPid,
    reply: Reply,
    in_flight: connect_watch::InFlight,
    /// The connect's datagram mode (`options::Connect::datagrams`).
    datagrams: Option<Active>,
}

impl Caller {
    /// Answers an error, the connect no longer in flight.
    fn error<R: Encoder + Send + 'static>(self, reason: R) {
        drop(self.in_flight);
        self.reply.error(reason);
    }
}

/// Resolves the host and starts the handshake: the connection, its local address, the new
/// shard its driver runs on (see `executor`) and its lease on the client endpoint (see
/// `endpoint::Lease`). `client` is the client endpoint when the caller has already found it
/// (for an address); otherwise it is looked up for the resolved address.
async fn dial(
    host: Host,
    port: u16,
    opts: options::Connect,
    config: quinn::ClientConfig,
    client: Option<(quinn::Endpoint, Arc<Shard>, Option<endpoint::Lease>)>,
) -> Result<(quinn::Connecting, SocketAddr, Arc<Shard>, Option<endpoint::Lease>), Reason> {
    let want_v4 = opts.local_address.map(|(ip, _)| ip.is_ipv4());
    let (remote, default_name) = match &host {
        Host::Ip(ip) => (SocketAddr::new(*ip, port), ip.to_string()),
        Host::Name(name) => {
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((name.as_str(), port))
                .await
                .map_err(|_| Reason::Atom(atoms::nxdomain()))?
                .collect();
            let pick = addrs
                .iter()
                .find(|a| want_v4.is_none_or(|v4| a.is_ipv4() == v4))
                .or(addrs.first())
                .copied()
                .ok_or(Reason::Atom(atoms::nxdomain()))?;
            (pick, name.clone())
        }
    };
    let (endpoint, _, lease) = match client {
        Some(found) => found,
        None => endpoint::client_endpoint(&remote, opts.local_address)?,
    };
    let bound = endpoint.local_addr().map_err(|e| error::io(&e))?;
    let server_name = opts.server_name.unwrap_or(default_name);
    let (connecting, shard) = executor::with_new_shard(|| endpoint.connect_with(config, remote, &server_name));
    let connecting = connecting.map_err(|e| error::connect(&e))?;
    Ok((connecting, bound, shard, lease))
}

/// Waits for the handshake, on the connection's own shard (polling it takes the connection's
/// lock), and answers the caller. The connection keeps `lease` until it has ended.
async fn finish_connect(
    connecting: quinn::Connecting,
    bound: SocketAddr,
    shard: Arc<Shard>,
    lease: Option<endpoint::Lease>,
    caller: Caller,
    deadline: tokio::time::Instant,
) {
    let _task = Live::new(&counters::TASKS);
    match tokio::time::timeout_at(deadline, connecting).await {
        Ok(Ok(conn)) => {
            let conn = Contained::connection(conn);
            shard.keep_until_driver_ends(&conn);
            let on_closed: Option<OnClosed> = lease.map(|l| Box::new(move || drop(l)) as OnClosed);
            match ConnRes::start(None, conn.clone(), bound, shard, caller.owner, |_| {}, on_closed, caller.datagrams) {
                Some(res) => {
                    caller.in_flight.succeeded();
                    if !caller.reply.send(move |e| (atoms::ok(), res).encode(e)) {
                        // The caller is gone; the monitor's down callback closes the connection.
                    }
                }
                None => conn.close(quinn::VarInt::from_u32(0), b"owner exited"),
            }
        }
        Ok(Err(e)) => caller.error(error::connection(&e)),
        // Dropping the handshake closes the connection.
        Err(_) => caller.error(atoms::timeout()),
    }
}

/// `conn_close(Conn, Code, Tag)`: closes the connection with an application error code.
/// Answers `:ok` when this call closed it (the owner will receive `{quic, closed, Conn, _}`,
/// which the Elixir layer consumes when the owner closes), `:closed` when it had already ended;
/// or `:wait`, and later `{Tag, :ok | :closed}`.
///
/// Closing takes Quinn's connection lock. The call closes only when it can claim the
/// connection's shard, so that its driver does not run (and hold that lock) meanwhile, and then
/// runs the driver it woke inline: the CONNECTION_CLOSE leaves from this thread. When the shard
/// is busy on another thread, the close goes to a task on the shard and answers from there.
#[rustler::nif]
fn conn_close<'a>(env: Env<'a>, c: ResourceArc<ConnRes>, code: u64, tag: Term<'a>) -> Term<'a> {
    rustler::atoms! { wait }
    let Ok(code) = quinn::VarInt::from_u64(code) else { return err(env, atoms::badarg()) };
    if let Some(done) = ConnRes::close_connecting(env, &c) {
        return done.encode(env);
    }
    if c.shard.failed() {
        // Its driver panicked: it has ended (and its owner has heard so, or will).
        return atoms::closed().encode(env);
    }
    let shard = c.shard.clone();
    executor::inline(env, inline_watch::watch_on(&c), || match shard.claim() {
        Some(_claim) => close_by_app(&c, code, |owner, res| {
            let _ = env.send(owner, closed_msg(env, res, false, true));
        })
        .encode(env),
        None => {
            let reply = Reply::new(env.pid(), tag);
            shard.spawn(async move {
                let _task = Live::new(&counters::TASKS);
                let answer = close_by_app(&c, code, |owner, res| {
                    messages::send(owner, move |e| closed_msg(e, res, false, true));
                });
                reply.send(move |e| answer.encode(e));
            });
            wait().encode(env)
        }
    })
}

/// Closes the connection for the application: `:ok`, or `:closed` when it had ended already.
/// When this is what closed it (not a peer close racing it), nothing else is left to report:
/// `tell` sends the owner `closed` right away, saving the closing caller (who waits for it) a
/// round trip through the watcher task, and the flag it sets keeps the watcher from sending
/// anything after. Takes Quinn's connection lock: run it on the connection's shard, or holding
/// it.
fn close_by_app(c: &ResourceArc<ConnRes>, code: quinn::VarInt, tell: impl FnOnce(&LocalPid, ResourceArc<ConnRes>)) -> rustler::Atom {
    let mut st = lock(&c.state);
    if c.end_reason().is_some() {
        return atoms::closed();
    }
    st.closed_by_app = true;
    // `quietly`, here and below: see `ConnRes::end_reason`.
    if contain::quietly(|| c.conn.close(code, b"")).is_none() {
        return atoms::closed();
    }
    let why = contain::quietly(|| c.conn.close_reason()).flatten();
    if let Some(why @ quinn::ConnectionError::LocallyClosed) = why.as_ref().filter(|_| !st.closed_sent) {
        st.closed_sent = true;
        st.ended = Some(error::connection(why));
        tell(&st.owner.pid, c.clone());
        st.owner.release();
    }
    atoms::ok()
}

/// `conn_shutdown(Conn, Flags, Code)`: quicer's connection shutdown. SILENT (1) closes without
/// telling the peer, which we cannot do with Quinn; it is accepted and behaves as NONE (0).
#[rustler::nif]
fn conn_shutdown<'a>(env: Env<'a>, c: ResourceArc<ConnRes>, flags: u32, code: u64) -> Term<'a> {
    if flags > 1 {
        return err(env, atoms::badarg());
    }
    let Ok(code) = quinn::VarInt::from_u64(code) else { return err(env, atoms::badarg()) };
    if ConnRes::close_connecting(env, &c).is_some() {
        return atoms::ok().encode(env);
    }
    if c.shard.failed() {
        // It has ended already (and its owner has heard so, or will from the watcher).
        return atoms::ok().encode(env);
    }
    // Closing takes Quinn's connection lock: on the shard, serialised with the drivers (inline
    // here when the shard is free). The owner hears `closed` from the watcher either way, with
    // `is_app_closing` true only if this close came first: the peer's may have been taken in
    // before the task runs (a review find: it said true after the peer's close).
    let res = c.clone();
    executor::inline(env, inline_watch::watch_on(&c), || {
        c.shard.spawn(async move {
            if contain::quietly(|| res.conn.close_reason()).flatten().is_none() {
                lock(&res.state).closed_by_app = true;
                let _ = contain::quietly(|| res.conn.close(code, b""));
            }
        })
    });
    atoms::ok().encode(env)
}

/// `conn_connected(Conn, Alpn)`: sends the owner quicer's `{quic, connected, Conn, #{is_resumed
/// => false, alpns => Alpn}}` (for `async_handshake/1`; `Alpn` is a binary or `undefined`) and
/// answers `:ok`; or, once `closed` has gone, sends nothing and answers why it ended. Sent under
/// the state lock, as the watcher sends `closed`, so it goes to the owner of the moment and never
/// follows `closed`. Quinn does not say whether TLS resumed a session: `is_resumed` is always
/// false.
#[rustler::nif]
fn conn_connected<'a>(env: Env<'a>, c: ResourceArc<ConnRes>, alpn: Term<'a>) -> Term<'a> {
    if !alpn.is_binary() && alpn != atoms::undefined().encode(env) {
        return err(env, atoms::badarg());
    }
    if let Err(r) = c.ready() {
        return err(env, r);
    }
    let st = lock(&c.state);
    if st.closed_sent {
        return err(env, st.ended_reason());
    }
    let _ = env.send(&st.owner.pid, connected_msg(env, c.clone(), alpn));
    atoms::ok().encode(env)
}

/// `conn_handshake_done(Conn)`: `:ok` once the connection's handshake has completed (every
/// delivered connection, and an `async_connect` handle from `connected` on, whatever happened
/// since), `{:error, :not_connected}` while it runs, or `{:error, Reason}` if it failed.
#[rustler::nif]
fn conn_handshake_done<'a>(env: Env<'a>, c: ResourceArc<ConnRes>) -> Term<'a> {
    match c.ready() {
        Ok(()) => atoms::ok().encode(env),
        Err(r) => err(env, r),
    }
}

/// `conn_await_connected(Conn, Tag)`: `:ok` when the connection is established, `{:error,
/// Reason}` when it ended before its handshake completed, else `:wait`, and `{Tag, :ok |
/// {:error, Reason}}` follows as the `async_connect` handshake ends (bounded by its deadline).
/// `open_stream` waits so on a connecting handle, as MsQuic queues a stream started early.
#[rustler::nif]
fn conn_await_connected<'a>(env: Env<'a>, c: ResourceArc<ConnRes>, tag: Term<'a>) -> Term<'a> {
    rustler::atoms! { wait }
    let mut st = lock(&c.state);
    if c.est.get().is_some() {
        return atoms::ok().encode(env);
    }
    if st.closed_sent {
        return err(env, st.ended_reason());
    }
    st.await_connected.push(Reply::new(env.pid(), tag));
    wait().encode(env)
}

/// quicer's `{quic, connected, C, #{is_resumed => false, alpns => Alpn}}`.
fn connected_msg<'a>(e: Env<'a>, c: ResourceArc<ConnRes>, alpn: Term<'a>) -> Term<'a> {
    let props = Term::map_from_pairs(e, &[(atoms::is_resumed().encode(e), false.encode(e)), (atoms::alpns().encode(e), alpn)])
        .unwrap_or_else(|_| atoms::undefined().encode(e));
    (atoms::quic(), atoms::connected(), c, props).encode(e)
}

/// `conn_query(Conn, What, Tag)`: answers `{Tag, Result}` from a task on the connection's
/// shard, where `What` is `:peername` or `:sockname` (`{:ok, {"ip", port}}`), `:stats` (every
/// counter Quinn keeps, as a map of atoms to integers), `:negotiated_protocol` (`{:ok, Alpn}`)
/// or `:peercert` (`{:ok, Der}` or `{:error, :no_peercert}`). Returns `:ok` at once, or
/// `{:error, :badarg}` for another `What`.
///
/// Every one of these reads Quinn's connection state, under the lock Quinn's driver holds while
/// it processes packet batches, so the read is serialised with the driver: in this call,
/// holding the shard, when the shard is free (the answer is then already in the caller's
/// mailbox), else by a task on the shard. `bench/query_stalls.exs` (1 GiB moving meanwhile)
/// measured the native part of `getstat` reading Quinn in the NIF regardless of the driver at
/// p99 78 µs, p99.9 2.8 ms, max 10 ms (18 calls over 5 ms in 259k); always handing over to
/// the runtime at p99 40-44 µs, p99.9 1.7-2.1 ms; as a task on the shard, run in the call with
/// whatever else the connection had queued (a driver step, say), at p99 53-115 µs, p99.9
/// 211-294 µs; answering in the call, leaving the rest to the runtime, at p99 3 µs, p99.9
/// 26-52 µs (2026-11-27). What remains over 1 ms (0.01-0.02% of calls either way) is the OS
/// preempting the scheduler thread on the busy two-core host (`perf sched`: the schedulers
/// waited, runnable, over 1 ms 68 times in 2 s of the transfer).
#[rustler::nif]
fn conn_query<'a>(env: Env<'a>, c: ResourceArc<ConnRes>, what: rustler::Atom, tag: Term<'a>) -> Term<'a> {
    rustler::atoms! { peername, sockname, stats, negotiated_protocol, peercert, datagram_send_enabled, datagram_max_len }
    let query = if what == peername() {
        Query::Peername
    } else if what == sockname() {
        Query::Sockname
    } else if what == stats() {
        Query::Stats
    } else if what == negotiated_protocol() {
        Query::Protocol
    } else if what == peercert() {
        Query::Peercert
    } else if what == datagram_send_enabled() {
        Query::DatagramSendEnabled
    } else if what == datagram_max_len() {
        Query::DatagramMaxLen
    } else {
        return err(env, atoms::badarg());
    };
    if let Err(r) = c.ready() {
        let _ = env.send(&env.pid(), (tag, (atoms::error(), r)).encode(env));
        return atoms::ok().encode(env);
    }
    if c.shard.failed() {
        let _ = env.send(&env.pid(), (tag, (atoms::error(), atoms::closed())).encode(env));
        return atoms::ok().encode(env);
    }
    let shard = c.shard.clone();
    match shard.claim() {
        // Holding the shard, no driver of this endpoint holds Quinn's lock: answer now. Not
        // inside `executor::inline`: whatever the connection has queued meanwhile (a driver
        // step during a transfer can take milliseconds) is left to the runtime.
        Some(_claim) => {
            let _ = env.send(&env.pid(), (tag, query.answer(env, &c)).encode(env));
        }
        None => {
            let reply = Reply::new(env.pid(), tag);
            shard.spawn(async move {
                let _task = Live::new(&counters::TASKS);
                reply.send(move |e| query.answer(e, &c));
            });
        }
    }
    atoms::ok().encode(env)
}

#[derive(Clone, Copy)]
enum Query {
    Peername,
    Sockname,
    Stats,
    Protocol,
    Peercert,
    /// Whether this end may send datagrams now: it accepts them itself (Quinn's rule) and the
    /// peer accepts them.
    DatagramSendEnabled,
    /// The largest datagram this end may send now, 0 if it may send none. It moves with the
    /// path's packet size, so it can differ from what `dgram_state_changed` said.
    DatagramMaxLen,
}

impl Query {
    /// Builds the answer. Runs on the connection's shard (it reads Quinn under its lock).
    fn answer<'a>(self, env: Env<'a>, c: &ConnRes) -> Term<'a> {
        rustler::atoms! { no_protocol, no_peercert }
        match self {
            Query::Peername => (atoms::ok(), address::encode_addr(env, &c.conn.remote_address())).encode(env),
            Query::Sockname => (atoms::ok(), address::encode_addr(env, &c.local_addr())).encode(env),
            Query::Stats => stats_map(env, c),
            // Connections reach their owners with the handshake done, so both ends have agreed
            // on one of the names offered (both sides require `:alpn`); `no_protocol` is there
            // for completeness, not expected.
            Query::Protocol => match negotiated_protocol(&c.conn) {
                Some(p) => (atoms::ok(), binary_term(env, &p)).encode(env),
                None => err(env, no_protocol()),
            },
            Query::Peercert => match peer_certificate(&c.conn) {
                Some(der) => (atoms::ok(), binary_term(env, &der)).encode(env),
                None => err(env, no_peercert()),
            },
            Query::DatagramSendEnabled => (atoms::ok(), datagram::send_limit(c).is_some()).encode(env),
            Query::DatagramMaxLen => (atoms::ok(), datagram::send_limit(c).unwrap_or(0)).encode(env),
        }
    }
}

/// The ALPN name the handshake settled on.
fn negotiated_protocol(conn: &quinn::Connection) -> Option<Vec<u8>> {
    conn.handshake_data()?.downcast::<quinn::crypto::rustls::HandshakeData>().ok()?.protocol
}

/// The peer's end-entity certificate (DER): a server always sends one; a client only when the
/// listener asks for it (`verify: :verify_peer`). Quinn hands out the whole chain as rustls
/// gave it, the end entity first.
fn peer_certificate(conn: &quinn::Connection) -> Option<Vec<u8>> {
    let chain = conn
        .peer_identity()?
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .ok()?;
    chain.first().map(|c| c.as_ref().to_vec())
}

/// A fresh binary holding `bytes`.
fn binary_term<'a>(env: Env<'a>, bytes: &[u8]) -> Term<'a> {
    let mut b = rustler::NewBinary::new(env, bytes.len());
    b.as_mut_slice().copy_from_slice(bytes);
    rustler::Binary::from(b).to_term(env)
}

/// Every counter Quinn keeps (and our `send_pend`), as a map of atoms to integers.
fn stats_map<'a>(env: Env<'a>, c: &ConnRes) -> Term<'a> {
    rustler::atoms! {
        recv_cnt, recv_oct, send_cnt, send_oct, send_pend, udp_tx_ios, udp_rx_ios, rtt_us, min_rtt_us,
        cwnd, congestion_events, lost_packets, lost_bytes, sent_packets, mtu, stream_frames_tx,
        stream_frames_rx, data_blocked_tx, data_blocked_rx, stream_data_blocked_tx,
        stream_data_blocked_rx, datagram_frames_tx, datagram_frames_rx,
    }
    let s = c.conn.stats();
    let pairs: [(rustler::Atom, u64); 23] = [
        (recv_cnt(), s.udp_rx.datagrams),
        (recv_oct(), s.udp_rx.bytes),
        (send_cnt(), s.udp_tx.datagrams),
        (send_oct(), s.udp_tx.bytes),
        // Bytes waiting in our send queues for Quinn to take them (Quinn itself does not
        // expose its unacknowledged bytes).
        (send_pend(), c.send_pend.load(Ordering::Relaxed) as u64),
        (udp_tx_ios(), s.udp_tx.ios),
        (udp_rx_ios(), s.udp_rx.ios),
        (rtt_us(), s.path.rtt.as_micros() as u64),
        (min_rtt_us(), s.path.min_rtt.as_micros() as u64),
        (cwnd(), s.path.cwnd),
        (congestion_events(), s.path.congestion_events),
        (lost_packets(), s.path.lost_packets),
        (lost_bytes(), s.path.lost_bytes),
        (sent_packets(), s.path.sent_packets),
        (mtu(), s.path.current_mtu as u64),
        (stream_frames_tx(), s.frame_tx.stream),
        (stream_frames_rx(), s.frame_rx.stream),
        // A sender tells its peer once per limit that flow control holds it back: these count
        // the times a connection's window (DATA_BLOCKED) or a stream's (STREAM_DATA_BLOCKED)
        // stopped the sending side, as sent by this end and as heard from the peer.
        (data_blocked_tx(), s.frame_tx.data_blocked),
        (data_blocked_rx(), s.frame_rx.data_blocked),
        (stream_data_blocked_tx(), s.frame_tx.stream_data_blocked),
        (stream_data_blocked_rx(), s.frame_rx.stream_data_blocked),
        // QUIC datagrams (see `datagram`): those received include any Quinn dropped unread.
        (datagram_frames_tx(), s.frame_tx.datagram),
        (datagram_frames_rx(), s.frame_rx.datagram),
    ];
    let terms: Vec<(Term, Term)> = pairs.iter().map(|(k, v)| (k.encode(env), v.encode(env))).collect();
    Term::map_from_pairs(env, &terms).unwrap_or_else(|_| atoms::undefined().encode(env))
}

/// What `new_conn` reports about an accepted connection (quicer's keys: version, addresses as
/// "ip:port" strings, the server name the client asked for, the negotiated ALPN). Read once,
/// as the handshake ends, on the connection's shard (Quinn keeps it under the connection's
/// lock), so that handing the connection to an acceptor later asks Quinn nothing: it never
/// waits for the connection's driver, wherever that runs.
#[derive(Debug, Clone)]
pub struct HandshakeInfo {
    local: SocketAddr,
    remote: SocketAddr,
    server_name: Option<String>,
    alpn: Option<Vec<u8>>,
}

impl HandshakeInfo {
    /// Reads it from Quinn: run on the connection's shard. `bound` is the endpoint's address.
    pub fn read(conn: &quinn::Connection, bound: SocketAddr) -> HandshakeInfo {
        let hd = conn
            .handshake_data()
            .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok());
        HandshakeInfo {
            local: local_addr_with(conn, bound, || endpoint::route_source(&conn.remote_address())),
            remote: conn.remote_address(),
            server_name: hd.as_ref().and_then(|h| h.server_name.clone()),
            alpn: hd.and_then(|h| h.protocol),
        }
    }

    /// The props map.
    pub fn encode<'a>(&self, env: Env<'a>) -> Term<'a> {
        let alpn_term = match &self.alpn {
            Some(p) => binary_term(env, p),
            None => atoms::undefined().encode(env),
        };
        let name_term = match &self.server_name {
            Some(n) => n.encode(env),
            None => atoms::undefined().encode(env),
        };
        let pairs = [
            (atoms::version().encode(env), 1u32.encode(env)),
            (atoms::local_addr().encode(env), address::encode_addr_string(env, &self.local)),
            (atoms::remote_addr().encode(env), address::encode_addr_string(env, &self.remote)),
            (atoms::server_name().encode(env), name_term),
            (atoms::alpns().encode(env), alpn_term),
        ];
        Term::map_from_pairs(env, &pairs).unwrap_or_else(|_| atoms::undefined().encode(env))
    }
}

/// `open_stream(Conn, Opts, Tag)`: opens a stream owned by the caller. Answers `{:ok, Stream}`
/// at once when the call can ask Quinn and the peer's stream limit allows; otherwise `:wait`,
/// and `{Tag, Result}` once the stream is open (or cannot be).
///
/// Asking Quinn takes its connection lock, which the connection's driver holds while it works.
/// So the call asks only when it can claim the connection's shard (no driver of this endpoint
/// runs meanwhile); when the shard is busy on another thread, the whole open goes to a task
/// on the shard and the caller waits in its `receive`, never on the lock (test/shard_test.exs,
/// with `debug_stall_send_from/5`).
#[rustler::nif]
fn open_stream<'a>(env: Env<'a>, c: ResourceArc<ConnRes>, opts: Term<'a>, tag: Term<'a>) -> Term<'a> {
    let opts = match options::decode_stream(opts) {
        Ok(o) => o,
        Err(r) => return err(env, r),
    };
    if let Err(r) = c.ready() {
        return err(env, r);
    }
    if c.shard.failed() {
        return err(env, atoms::closed());
    }
    executor::inline(env, inline_watch::watch_on(&c), || match c.shard.claim() {
        Some(_claim) => open_stream_now(env, &c, opts, tag),
        None => open_stream_later(env, &c, opts, tag),
    })
}

/// Opens the stream in the call when Quinn has credit for it, else as `open_stream_later`.
/// The caller holds the connection's shard.
fn open_stream_now<'a>(env: Env<'a>, c: &ResourceArc<ConnRes>, opts: options::Stream, tag: Term<'a>) -> Term<'a> {
    if let Some(reason) = c.end_reason() {
        return err(env, reason);
    }
    // Quinn opens a stream synchronously when credit is available: poll once.
    let waker = std::task::Waker::noop();
    let mut cx = std::task::Context::from_waker(waker);
    let ready = contain::quietly(|| {
        if opts.unidirectional {
            let mut fut = std::pin::pin!(c.conn.open_uni());
            match std::future::Future::poll(fut.as_mut(), &mut cx) {
                std::task::Poll::Ready(r) => Some(r.map(|s| (Some(s), None))),
                std::task::Poll::Pending => None,
            }
        } else {
            let mut fut = std::pin::pin!(c.conn.open_bi());
            match std::future::Future::poll(fut.as_mut(), &mut cx) {
                std::task::Poll::Ready(r) => Some(r.map(|(s, r)| (Some(s), Some(r)))),
                std::task::Poll::Pending => None,
            }
        }
    });
    let Some(ready) = ready else { return err(env, atoms::closed()) };
    match ready {
        Some(Ok((send, recv))) => match StreamRes::start(Some(env), c.clone(), send, recv, env.pid(), None, opts, |_, _| true) {
            Some(s) => (atoms::ok(), s).encode(env),
            None => err(env, atoms::closed()),
        },
        Some(Err(e)) => err(env, error::connection(&e)),
        None => open_stream_later(env, c, opts, tag),
    }
}

/// Opens the stream from a task on the connection's shard, once the peer's stream limit allows;
/// answers `{Tag, Result}`. Returns `:wait`.
fn open_stream_later<'a>(env: Env<'a>, c: &ResourceArc<ConnRes>, opts: options::Stream, tag: Term<'a>) -> Term<'a> {
    rustler::atoms! { wait }
    let owner = env.pid();
    let reply = Reply::new(owner, tag);
    // The stream may start on a runtime thread: monitor its owner here, on the scheduler.
    owner::prepare(env);
    let c = c.clone();
    c.shard.clone().spawn(async move {
        let _task = Live::new(&counters::TASKS);
        let opened = if opts.unidirectional {
            c.conn.open_uni().await.map(|s| (Some(s), None))
        } else {
            c.conn.open_bi().await.map(|(s, r)| (Some(s), Some(r)))
        };
        match opened {
            Ok((send, recv)) => {
                // `None`: the caller has exited meanwhile, and `start` aborted the stream.
                if let Some(s) = StreamRes::start(None, c.clone(), send, recv, owner, None, opts, |_, _| true) {
                    reply.send(move |e| (atoms::ok(), s).encode(e));
                }
            }
            Err(e) => {
                reply.error(error::connection(&e));
            }
        }
    });
    wait().encode(env)
}

/// `conn_accept_stream(Conn, Opts, Tag | nil)`: the next stream the peer opens goes to the
/// caller, as `{quic, new_stream, Stream, Props}` (no tag) or `{Tag, {:ok, Stream}}`.
/// Returns `{:ok, AcceptId}`; `conn_cancel_accept/2` withdraws it.
///
/// Streams the peer opens while nobody accepts wait inside Quinn, which counts them against
/// the peer's stream limit: an application that stops accepting stops the peer opening more.
#[rustler::nif]
fn conn_accept_stream<'a>(env: Env<'a>, c: ResourceArc<ConnRes>, opts: Term<'a>, tag: Term<'a>) -> Term<'a> {
    let opts = match options::decode_stream(opts) {
        Ok(o) => o,
        Err(r) => return err(env, r),
    };
    let caller = env.pid();
    // Made only once the accept is taken: a `Reply` dropped unanswered would answer by itself.
    let reply = || if tag.is_atom() { None } else { Some(Reply::new(caller, tag)) };
    if c.est.get().is_none() {
        // While an `async_connect` handshake runs the accept waits for it, as MsQuic lets a
        // connection's streams be accepted before it is connected; once it has ended, the
        // accept answers why. (Checked again under the lock `establish` sets it under: if it
        // has just been established, the accept goes on as on any other.)
        let mut st = lock(&c.state);
        if c.est.get().is_none() {
            if st.closed_sent {
                return err(env, st.ended_reason());
            }
            owner::prepare(env);
            let (id, cancel_tx, cancel) = new_accept(&mut st);
            st.pending_accepts.push(PendingAccept { id, caller, opts, reply: reply(), cancel });
            st.accepts.insert(id, cancel_tx);
            return (atoms::ok(), id).encode(env);
        }
    }
    // An ended connection is an error at once. `end_reason` takes Quinn's connection lock, so
    // Quinn is asked only while holding the shard (its driver does not hold that lock
    // meanwhile); when the shard is busy on another thread, what the watcher recorded as it
    // told the owner `closed` answers (the process now calling may have been handed the
    // connection after that message went to its previous owner). One that ends later fails
    // the accept task, as one ending just after this call would.
    if c.shard.failed() {
        return err(env, atoms::closed());
    }
    let ended = match c.shard.claim() {
        Some(_claim) => c.end_reason(),
        None => lock(&c.state).ended.clone(),
    };
    if let Some(reason) = ended {
        return err(env, reason);
    }
    // The stream may start on a runtime thread: monitor its owner-to-be here, on the scheduler.
    owner::prepare(env);
    let mut st = lock(&c.state);
    let (id, cancel_tx, cancel_rx) = new_accept(&mut st);
    spawn_accept(&c, id, caller, opts, reply(), cancel_rx);
    st.accepts.insert(id, cancel_tx);
    (atoms::ok(), id).encode(env)
}

/// A fresh accept id, and the channel that withdraws the accept.
fn new_accept(st: &mut State) -> (u64, oneshot::Sender<()>, oneshot::Receiver<()>) {
    let id = st.next_accept;
    st.next_accept += 1;
    let (tx, rx) = oneshot::channel::<()>();
    (id, tx, rx)
}

/// Starts accept `id`: a task on the connection's shard that takes the next stream the peer
/// opens and hands it to `caller`, unless `cancel` withdraws it first.
fn spawn_accept(c: &ResourceArc<ConnRes>, id: u64, caller: LocalPid, opts: options::Stream, reply: Option<Reply>, cancel_rx: oneshot::Receiver<()>) {
    let task_conn = c.clone();
    // Made before the task first runs, so that a task dropped unpolled still says so.
    let mut no_stream = AcceptorClosed::new(caller, &reply);
    c.shard.spawn(async move {
        let accepted = tokio::select! {
            r = task_conn.conn.accept_bi() => r.map(|(s, r)| (Some(s), r, 0u32)),
            r = task_conn.conn.accept_uni() => r.map(|r| (None, r, 1u32)),
            // Withdrawn by `conn_cancel_accept` before a stream came (a stream Quinn already
            // had stays queued for the next accept). A dropped sender (the connection's state
            // gone) is no withdrawal: then the accepts above fail by themselves.
            Ok(()) = cancel_rx => {
                no_stream.disarm();
                if let Some(r) = reply {
                    r.withdraw();
                }
                return;
            }
        };
        let withdrawn = lock(&task_conn.state).accepts.remove(&id).is_none();
        match accepted {
            Ok((send, recv, flags)) => hand_over(task_conn, send, recv, flags, caller, opts, reply, withdrawn, no_stream),
            Err(e) => fail_accept(reply, no_stream, withdrawn, error::connection(&e)),
        }
    });
}

/// Ends an accept that gets no stream, for `why`: an `accept_stream/3` (`reply`) is answered
/// with it, an `async_accept_stream`'s caller hears `no_stream` (dropped here); an accept its
/// caller withdrew gets nothing.
fn fail_accept(reply: Option<Reply>, mut no_stream: AcceptorClosed, withdrawn: bool, why: Reason) {
    match reply {
        Some(r) if withdrawn => r.withdraw(),
        Some(r) => {
            r.error(why);
        }
        None if withdrawn => no_stream.disarm(),
        None => {}
    }
}

/// Until disarmed (a stream came), sends the caller of an `async_accept_stream` quicer's
/// `{quic, closed, undefined, undefined}` (see `acceptor_closed`) as it is dropped: when its
/// accept fails with the connection, and also when its task is dropped unfinished (its shard
/// failed after a panic inside Quinn), as a `Reply` answers by itself for the other accepts.
struct AcceptorClosed(Option<LocalPid>);

impl AcceptorClosed {
    /// Armed for an `async_accept_stream` (no `reply`); an `accept_stream/3` has its `Reply`.
    fn new(caller: LocalPid, reply: &Option<Reply>) -> Self {
        AcceptorClosed(reply.is_none().then_some(caller))
    }

    fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for AcceptorClosed {
    fn drop(&mut self) {
        if let Some(caller) = self.0.take() {
            acceptor_closed(&caller);
        }
    }
}

/// Tells the caller of an `async_accept_stream` that no stream will come, the connection having
/// ended: quicer's `{quic, closed, undefined, undefined}`, which it sends every stream acceptor
/// still waiting then. Without it a process that accepts but does not own the connection (and
/// so gets no `closed` about it) would wait forever.
fn acceptor_closed(caller: &LocalPid) {
    messages::send(caller, |e| (atoms::quic(), atoms::closed(), atoms::undefined(), atoms::undefined()).encode(e));
}

/// Gives an accepted stream to the process that asked for it. If that process has exited, or
/// withdrew its accept as the stream arrived, the stream goes to the connection's owner as an
/// orphan in passive mode, so no stream is silently lost (it is aborted only when the owner
/// has exited too).
#[allow(clippy::too_many_arguments)]
fn hand_over(
    c: ResourceArc<ConnRes>,
    send: Option<quinn::SendStream>,
    recv: quinn::RecvStream,
    flags: u32,
    caller: LocalPid,
    opts: options::Stream,
    reply: Option<Reply>,
    withdrawn: bool,
    no_stream: AcceptorClosed,
) {
    let mut reply = reply;
    if withdrawn {
        // The caller gave up on it: it must get no answer now.
        if let Some(r) = reply.take() {
            r.withdraw();
        }
    }
    let owner = c.owner_pid();
    let conn = c.clone();
    // Announced before the stream's tasks start, so new_stream precedes its first data.
    // A stream that never starts (the connection broke meanwhile) drops this unannounced, and
    // `no_stream` then tells an `async_accept_stream`'s caller.
    //
    // Announced under the connection's state lock, and not at all once its owner has been sent
    // `closed`, which is the last message about a connection: Quinn still hands out a stream
    // that arrived before the connection ended, and an accept task queued behind the watcher
    // on a busy shard took one after `closed` had gone (a review find). Such a stream is
    // refused (`StreamRes::start` silences and stops it); a blocking accept gets why the
    // connection ended, an `async_accept_stream`'s caller `{quic, closed, undefined,
    // undefined}` (from `no_stream`), an orphan goes unannounced.
    let announce = move |s: &ResourceArc<StreamRes>, orphan: bool| -> bool {
        let st = lock(&conn.state);
        if st.closed_sent || st.debug_refuse_streams {
            let why = st.ended_reason();
            drop(st);
            // As an accept that got no stream; an orphan's (its caller gone, or withdrawn) is
            // answered nothing.
            fail_accept(reply, no_stream, orphan, why);
            return false;
        }
        let mut no_stream = no_stream;
        no_stream.disarm();
        let s = s.clone();
        let c = conn.clone();
        match reply {
            Some(r) if !orphan => {
                r.send(move |e| (atoms::ok(), s).encode(e));
            }
            None if !orphan => {
                messages::send(&caller, move |e| new_stream_msg(e, s, c, flags, false));
            }
            r => {
                if let Some(r) = r {
                    r.withdraw();
                }
                messages::send(&owner, move |e| new_stream_msg(e, s, c, flags, true));
            }
        }
        drop(st);
        true
    };
    if withdrawn {
        let opts = options::Stream { active: Active::Off, ..Default::default() };
        StreamRes::start(None, c, send, Some(recv), owner, None, opts, move |s, _| announce(s, true));
    } else {
        StreamRes::start(None, c, send, Some(recv), caller, Some(owner), opts, announce);
    }
}

fn new_stream_msg<'a>(e: Env<'a>, s: ResourceArc<StreamRes>, conn: ResourceArc<ConnRes>, flags: u32, orphan: bool) -> Term<'a> {
    let props = Term::map_from_pairs(
        e,
        &[
            (atoms::conn().encode(e), conn.encode(e)),
            (atoms::flags().encode(e), flags.encode(e)),
            (atoms::is_orphan().encode(e), orphan.encode(e)),
        ],
    )
    .unwrap_or_else(|_| atoms::undefined().encode(e));
    (atoms::quic(), atoms::new_stream(), s, props).encode(e)
}

/// `conn_cancel_accept(Conn, AcceptId)`: `:cancelled` when the accept was withdrawn before a
/// stream arrived, `:delivered` when its stream was already sent.
#[rustler::nif]
fn conn_cancel_accept<'a>(env: Env<'a>, c: ResourceArc<ConnRes>, id: u64) -> Term<'a> {
    let mut st = lock(&c.state);
    // One still waiting for an `async_connect` handshake goes at once: accepts that time out
    // one after another must not pile up until the handshake ends.
    let at = st.pending_accepts.iter().position(|a| a.id == id);
    if let Some(r) = at.and_then(|at| st.pending_accepts.remove(at).reply) {
        r.withdraw();
    }
    // Still in `accepts`: withdrawn before its task handed a stream over (the task, finding
    // its entry gone, answers nothing), even when the task has just taken one (it goes to the
    // owner as an orphan) and so no longer listens for the cancel.
    match st.accepts.remove(&id) {
        Some(cancel) => {
            let _ = cancel.send(());
            atoms::cancelled().encode(env)
        }
        None => atoms::delivered().encode(env),
    }
}

pub fn controlling_process<'a>(env: Env<'a>, c: &ResourceArc<ConnRes>, pid: LocalPid) -> Term<'a> {
    match lock(&c.state).owner.hand_over(env, pid, c) {
        Ok(()) => atoms::ok().encode(env),
        Err(reason) => err(env, reason),
    }
}

/// Where `debug_panic_handshake` makes an `async_connect` handshake's task panic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PanicAt {
    /// In the task, before `establish`.
    Task,
    /// Inside `establish`, with the connecting state taken and the handle not yet established.
    Establish,
    /// Inside `establish`, the handle established and its watcher started, before `connected`.
    Established,
    /// No panic: the shard fails (as after a panic in its Quinn driver) as the watcher is
    /// spawned, so the watcher is dropped before it first runs.
    #[cfg_attr(not(feature = "test_hooks"), allow(dead_code))]
    WatcherUnrun,
}

/// `debug_panic_handshake(Conn, :task | :establish | :established | :watcher_unrun)` (test
/// builds only): an `async_connect` handle's handshake task panics as its handshake
/// completes, before `establish` or inside it (see `PanicAt`), so tests can prove the owner
/// still hears how it ended.
#[cfg(feature = "test_hooks")]
#[rustler::nif]
fn debug_panic_handshake(c: ResourceArc<ConnRes>, at: rustler::Atom) -> rustler::NifResult<rustler::Atom> {
    rustler::atoms! { task, establish, established, watcher_unrun }
    let at = if at == task() {
        PanicAt::Task
    } else if at == establish() {
        PanicAt::Establish
    } else if at == established() {
        PanicAt::Established
    } else if at == watcher_unrun() {
        PanicAt::WatcherUnrun
    } else {
        return Err(rustler::Error::BadArg);
    };
    lock(&c.state).debug_panic_handshake = Some(at);
    Ok(atoms::ok())
}

/// `debug_refuse_streams(Conn)` (test builds only): the connection's accepted streams are
/// refused from now on, as those that reach `hand_over` after the owner was sent `closed`.
#[cfg(feature = "test_hooks")]
#[rustler::nif]
fn debug_refuse_streams(c: ResourceArc<ConnRes>) -> rustler::Atom {
    lock(&c.state).debug_refuse_streams = true;
    atoms::ok()
}

/// `debug_panic_driver(Conn)` (test builds only): the next datagram this connection's side
/// sends panics inside the send, which Quinn's connection driver makes with the connection's
/// lock held: a panic inside Quinn, which leaves that lock poisoned for good. Tests use it to
/// prove the owner still hears how the connection ended and the VM comes to no harm.
#[cfg(feature = "test_hooks")]
#[rustler::nif]
fn debug_panic_driver(c: ResourceArc<ConnRes>) -> rustler::NifResult<rustler::Atom> {
    // Not on an `async_connect` handle before its handshake completed.
    c.ready().map_err(|_| rustler::Error::BadArg)?;
    *lock(&crate::inline_watch::DEBUG_PANIC_SEND) = Some((c.local_bound.port(), c.conn.remote_address()));
    Ok(atoms::ok())
}

/// `debug_panic_socket(LocalPort, Count)` (test builds only): the next `Count` sends and direct
/// reads of the library's socket on `LocalPort` panic in the library's own socket code, which
/// Quinn calls with a connection's or the endpoint's lock held. Tests use it to prove that such
/// a panic stays there (`contain::in_socket`): the datagram is lost or read the other way, and
/// nothing else happens.
#[cfg(feature = "test_hooks")]
#[rustler::nif]
fn debug_panic_socket(local_port: u16, count: u32) -> rustler::Atom {
    *lock(&crate::inline_watch::DEBUG_SOCKET_PANICS) = (count > 0).then_some((local_port, count));
    atoms::ok()
}

/// `debug_stall_send_from(LocalPort, Ip, Port, Ms, Pid)` (test builds only): the next datagram
/// from the library's socket on `LocalPort` to `Ip:Port` that a runtime worker sends stalls
/// for `Ms` milliseconds inside the send, after sending `Pid` the atom `driver_stalled`. Sent by
/// a connection's driver, that holds the connection's lock and its shard meanwhile, on another
/// thread than the test's: tests use it to prove that the NIFs asking Quinn about a
/// connection never wait for its driver on the caller's scheduler.
#[cfg(feature = "test_hooks")]
#[rustler::nif]
fn debug_stall_send_from<'a>(local_port: u16, ip: Term<'a>, port: Term<'a>, ms: u64, pid: LocalPid) -> rustler::NifResult<rustler::Atom> {
    let to = debug_socket_addr(ip, port)?;
    *lock(&crate::inline_watch::DEBUG_STALL_SEND) = Some((local_port, to, pid, Duration::from_millis(ms)));
    Ok(atoms::ok())
}

/// The test hooks' `Ip, Port` arguments.
#[cfg(feature = "test_hooks")]
fn debug_socket_addr(ip: Term, port: Term) -> rustler::NifResult<SocketAddr> {
    let ip = address::decode_ip(ip).ok_or(rustler::Error::BadArg)?;
    let port = address::decode_port(port).ok_or(rustler::Error::BadArg)?;
    Ok(SocketAddr::new(ip, port))
}

/// `debug_stall_shard(Conn, Ms, Pid)` (test builds only): a task on this connection's shard,
/// run on a runtime worker, sends `Pid` the atom `shard_stalled` and then holds the shard for
/// `Ms` milliseconds (Quinn's lock stays free). For the calls that, finding the shard busy,
/// must answer without asking Quinn.
#[cfg(feature = "test_hooks")]
#[rustler::nif]
fn debug_stall_shard(c: ResourceArc<ConnRes>, ms: u64, pid: LocalPid) -> rustler::NifResult<rustler::Atom> {
    // Not on an `async_connect` handle before its handshake completed.
    c.ready().map_err(|_| rustler::Error::BadArg)?;
    rustler::atoms! { shard_stalled }
    let shard = c.shard.clone();
    // Spawned from a runtime thread, so that the shard runs there rather than in this call.
    runtime::spawn(async move {
        shard.spawn(async move {
            messages::send(&pid, |e| shard_stalled().encode(e));
            std::thread::sleep(Duration::from_millis(ms));
        })
    });
    Ok(atoms::ok())
}

/// `debug_fail_shard_on_spawn(Conn)` (test builds only): the next task spawned on this
/// connection's shard finds the shard failed (as after a panic in Quinn's driver) before it
/// first runs. For tests that a task's guards answer even then.
#[cfg(feature = "test_hooks")]
#[rustler::nif]
fn debug_fail_shard_on_spawn(c: ResourceArc<ConnRes>) -> rustler::NifResult<rustler::Atom> {
    c.ready().map_err(|_| rustler::Error::BadArg)?;
    c.shard.debug_fail_on_next_spawn();
    Ok(atoms::ok())
}

/// `debug_nudge_driver(Conn)` (test builds only): makes this connection's driver send a
/// datagram from a runtime worker (it raises the peer's stream limit, from a runtime thread:
/// Quinn then sends MAX_STREAMS, and the peer acknowledges it).
#[cfg(feature = "test_hooks")]
#[rustler::nif]
fn debug_nudge_driver(c: ResourceArc<ConnRes>) -> rustler::NifResult<rustler::Atom> {
    // Not on an `async_connect` handle before its handshake completed.
    c.ready().map_err(|_| rustler::Error::BadArg)?;
    static LIMIT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(10_000);
    let limit = quinn::VarInt::from_u32(LIMIT.fetch_add(1, Ordering::Relaxed));
    let conn = (*c.conn).clone();
    runtime::spawn(async move { conn.set_max_concurrent_bi_streams(limit) });
    Ok(atoms::ok())
}

/// `debug_panic_send_from(LocalPort, Ip, Port)` (test builds only): as `debug_panic_driver/1`,
/// for the next datagram from the library's socket on `LocalPort` to `Ip:Port`, when there is no
/// handle to name the connection by (one queued in a listener, say).
#[cfg(feature = "test_hooks")]
#[rustler::nif]
fn debug_panic_send_from<'a>(local_port: u16, ip: Term<'a>, port: Term<'a>) -> rustler::NifResult<rustler::Atom> {
    *lock(&crate::inline_watch::DEBUG_PANIC_SEND) = Some((local_port, debug_socket_addr(ip, port)?));
    Ok(atoms::ok())
}
