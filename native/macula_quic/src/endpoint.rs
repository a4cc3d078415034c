//! UDP sockets and Quinn endpoints.
//!
//! Listeners bind exactly the address given. On Linux a wildcard listener and a listener on a
//! specific address can share a port only if both sockets set SO_REUSEADDR — which would also
//! let two sockets bind the *same* address and port, silently splitting traffic. So every
//! listener socket sets SO_REUSEADDR (never SO_REUSEPORT, which spreads packets across
//! sockets), and this module keeps a registry of the addresses our listeners hold, refusing an
//! exact duplicate with `:eaddrinuse`.
//!
//! Client endpoints are shared: one per local bind address, created on first use and reused by
//! every later connect, so a burst of connects never creates a burst of sockets and drivers.
//! Those on an ephemeral port (the usual case) stay for the life of the library; one on a port
//! the application chose is let go once its last connection has ended, since the application
//! may want that port back (say, to listen on it).
use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::io::IoSliceMut;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};

use quinn::{AsyncUdpSocket, Runtime, UdpPoller};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::sync::oneshot;

use crate::error::{self, Reason};
use crate::executor::{Shard, ShardRuntime};
use crate::flow;
use crate::spin;
use crate::util::lock;

fn registry() -> &'static Mutex<HashSet<SocketAddr>> {
    static R: OnceLock<Mutex<HashSet<SocketAddr>>> = OnceLock::new();
    R.get_or_init(|| Mutex::new(HashSet::new()))
}

/// An address held by a listener; dropping it frees the address for a new listener and tells
/// whoever waits on `released`.
#[derive(Debug)]
pub struct Registration {
    addr: SocketAddr,
    released: Option<oneshot::Sender<()>>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        lock(registry()).remove(&self.addr);
        if let Some(tx) = self.released.take() {
            let _ = tx.send(());
        }
    }
}

/// A listener's UDP socket as Quinn sees it, carrying the address registration.
///
/// Quinn shares the socket between the endpoint driver and every connection on it, and would
/// close it only when the last of them lets go: a connection keeps its socket for as long as
/// any handle to it exists, even long after it closed. So the listener retires the socket
/// itself (see `ListenerSocket::retire`) once it is closed and its last accepted connection has
/// ended: the OS socket closes, then the registration is released. The address is never
/// released while a socket still holds it (which, with SO_REUSEADDR, would let a new listener
/// share it and steal packets), and never later than necessary.
#[derive(Debug)]
struct RegisteredSocket {
    inner: Mutex<Option<Arc<dyn AsyncUdpSocket>>>,
    /// The runtime workers' watch on this socket (a duplicate descriptor; see `spin`).
    watch: Mutex<Option<spin::Watch>>,
    registration: Mutex<Option<Registration>>,
    local: SocketAddr,
    max_transmit_segments: usize,
    max_receive_segments: usize,
    may_fragment: bool,
}

impl RegisteredSocket {
    fn inner(&self) -> Option<Arc<dyn AsyncUdpSocket>> {
        lock(&self.inner).clone()
    }
}

/// Waits for the socket to be writable. It holds the OS socket only while a wait is pending
/// (a full send buffer), so that a retired socket really closes even though every connection
/// keeps a poller.
#[derive(Debug)]
struct RegisteredPoller {
    socket: Arc<RegisteredSocket>,
    pending: Option<Pin<Box<dyn UdpPoller>>>,
}

impl UdpPoller for RegisteredPoller {
    fn poll_writable(self: Pin<&mut Self>, cx: &mut Context) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.pending.is_none() {
            match this.socket.inner() {
                Some(inner) => this.pending = Some(inner.create_io_poller()),
                // Retired: sends are discarded, so it is always "writable".
                None => return Poll::Ready(Ok(())),
            }
        }
        let Some(pending) = this.pending.as_mut() else { return Poll::Ready(Ok(())) };
        let ready = pending.as_mut().poll_writable(cx);
        if ready.is_ready() {
            this.pending = None;
        }
        ready
    }
}

impl AsyncUdpSocket for RegisteredSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        Box::pin(RegisteredPoller { socket: self, pending: None })
    }

    fn try_send(&self, transmit: &quinn::udp::Transmit) -> std::io::Result<()> {
        match self.inner() {
            Some(inner) => inner.try_send(transmit),
            // Retired: what is left to send belongs to connections that have ended.
            None => Ok(()),
        }
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [quinn::udp::RecvMeta],
    ) -> Poll<std::io::Result<usize>> {
        match self.inner() {
            Some(inner) => inner.poll_recv(cx, bufs, meta),
            // Retired: nothing will ever arrive.
            None => Poll::Pending,
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.local)
    }

    fn max_transmit_segments(&self) -> usize {
        self.max_transmit_segments
    }

    fn max_receive_segments(&self) -> usize {
        self.max_receive_segments
    }

    fn may_fragment(&self) -> bool {
        self.may_fragment
    }
}

/// The listener's handle on its socket, to retire it.
#[derive(Clone, Debug)]
pub struct ListenerSocket(Arc<RegisteredSocket>);

impl ListenerSocket {
    /// Closes the OS socket (Quinn's tasks may still hold the wrapper: from now on it discards
    /// sends and receives nothing), then releases the address. Idempotent.
    pub fn retire(&self) {
        let inner = lock(&self.0.inner).take();
        drop(inner);
        // The watch's duplicate descriptor too, or the OS socket would stay open.
        let watch = lock(&self.0.watch).take();
        drop(watch);
        let registration = lock(&self.0.registration).take();
        drop(registration);
    }
}

impl Drop for RegisteredSocket {
    fn drop(&mut self) {
        // Socket (and its watched duplicate) first, registration second, whichever way the
        // wrapper goes.
        lock(&self.inner).take();
        lock(&self.watch).take();
        lock(&self.registration).take();
    }
}

/// The addresses that would take the same packets as `addr`: itself, and for a dual-stack `::`
/// socket also `0.0.0.0` on the same port (and the reverse).
fn overlapping(addr: &SocketAddr) -> Vec<SocketAddr> {
    let mut v = vec![*addr];
    match addr.ip() {
        IpAddr::V6(ip) if ip.is_unspecified() => v.push(SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), addr.port())),
        IpAddr::V4(ip) if ip.is_unspecified() => v.push(SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), addr.port())),
        _ => {}
    }
    v
}

pub fn registered_count() -> usize {
    lock(registry()).len()
}

fn new_socket(addr: &SocketAddr) -> std::io::Result<Socket> {
    let domain = if addr.is_ipv4() { Domain::IPV4 } else { Domain::IPV6 };
    let s = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP))?;
    // Best effort: a smaller buffer only costs performance.
    let _ = s.set_recv_buffer_size(flow::SOCKET_BUFFER);
    let _ = s.set_send_buffer_size(flow::SOCKET_BUFFER);
    if addr.is_ipv6() {
        // A specific IPv6 address is v6-only; `::` is dual-stack, as the original library's
        // users rely on (its IPv4 peers arrive as ::ffff:a.b.c.d; `address::canonical_ip`
        // reports them as plain IPv4).
        s.set_only_v6(!addr.ip().is_unspecified())?;
    }
    Ok(s)
}

/// A listener's endpoint, its socket, and a receiver that fires when the socket is closed and
/// its address free again.
pub struct ListenerEndpoint {
    pub endpoint: quinn::Endpoint,
    pub socket: ListenerSocket,
    pub local: SocketAddr,
    pub released: oneshot::Receiver<()>,
    /// Where the endpoint's and its connections' tasks run.
    pub shard: Arc<Shard>,
}

/// Binds exactly `addr`, registers it, and wraps the socket in a Quinn server endpoint.
pub fn listener_endpoint(addr: SocketAddr, server: quinn::ServerConfig) -> Result<ListenerEndpoint, Reason> {
    let (socket, local) = bind_listener(addr)?;
    let (tx, released) = oneshot::channel();
    let registration = Registration { addr: local, released: Some(tx) };
    let shard = Shard::new();
    let quinn_runtime = Arc::new(ShardRuntime { shard: shard.clone() });
    let watch = spin::watch(&socket);
    let inner = quinn_runtime.wrap_udp_socket(socket).map_err(|e| error::io(&e))?;
    let socket = Arc::new(RegisteredSocket {
        max_transmit_segments: inner.max_transmit_segments(),
        max_receive_segments: inner.max_receive_segments(),
        may_fragment: inner.may_fragment(),
        inner: Mutex::new(Some(inner)),
        watch: Mutex::new(watch),
        registration: Mutex::new(Some(registration)),
        local,
    });
    let endpoint =
        quinn::Endpoint::new_with_abstract_socket(quinn::EndpointConfig::default(), Some(server), socket.clone(), quinn_runtime)
            .map_err(|e| error::io(&e))?;
    Ok(ListenerEndpoint { endpoint, socket: ListenerSocket(socket), local, released, shard })
}

/// Binds a listener socket to exactly `addr` and records the address in the registry. The
/// caller must hand the address to a `Registration` (which removes it again).
fn bind_listener(addr: SocketAddr) -> Result<(UdpSocket, SocketAddr), Reason> {
    let mut reg = lock(registry());
    if overlapping(&addr).iter().any(|a| a.port() != 0 && reg.contains(a)) {
        return Err(crate::atoms::eaddrinuse().into());
    }
    let sock = new_socket(&addr).map_err(|e| error::io(&e))?;
    if addr.port() == 0 {
        // Let the kernel pick a port nobody holds (SO_REUSEADDR would let it pick one a
        // reusable socket already has), then allow later specific/wildcard binds beside it.
        sock.bind(&addr.into()).map_err(|e| error::io(&e))?;
        sock.set_reuse_address(true).map_err(|e| error::io(&e))?;
    } else {
        sock.set_reuse_address(true).map_err(|e| error::io(&e))?;
        sock.bind(&addr.into()).map_err(|e| error::io(&e))?;
    }
    let local = sock
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .ok_or(Reason::Atom(crate::atoms::io_error()))?;
    if overlapping(&local).iter().any(|a| reg.contains(a)) {
        return Err(crate::atoms::eaddrinuse().into());
    }
    reg.insert(local);
    Ok((sock.into(), local))
}

/// Wraps a bound socket in a Quinn endpoint whose driver runs on a new shard.
pub fn endpoint(socket: UdpSocket, server: Option<quinn::ServerConfig>) -> Result<(quinn::Endpoint, Arc<Shard>), Reason> {
    let shard = Shard::new();
    let quinn_runtime = Arc::new(ShardRuntime { shard: shard.clone() });
    let ep = quinn::Endpoint::new(quinn::EndpointConfig::default(), server, socket, quinn_runtime).map_err(|e| error::io(&e))?;
    Ok((ep, shard))
}

/// A shared client endpoint: its shard, and for an application-chosen port, how many
/// connections use it (see `Lease`).
struct ClientEndpoint {
    endpoint: quinn::Endpoint,
    shard: Arc<Shard>,
    users: usize,
    _watch: Option<spin::Watch>,
}

/// The shared client endpoints by local address.
type ClientEndpoints = Mutex<HashMap<SocketAddr, ClientEndpoint>>;

fn client_endpoints() -> &'static ClientEndpoints {
    static C: OnceLock<ClientEndpoints> = OnceLock::new();
    C.get_or_init(|| Mutex::new(HashMap::new()))
}

/// A connection's use of a client endpoint on a port the application chose; the endpoint is
/// let go once no connection uses it (see `Lease::drop`). Ephemeral-port endpoints need none.
#[derive(Debug)]
pub struct Lease {
    bind: SocketAddr,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let endpoint = {
            let mut map = lock(client_endpoints());
            let Some(entry) = map.get_mut(&self.bind) else { return };
            entry.users -= 1;
            if entry.users > 0 {
                return;
            }
            entry.endpoint.clone()
        };
        // Kept until its connections have drained (their close frames answered, or timed out):
        // a connect from the same address meanwhile reuses it rather than finding the port
        // still held by the closing socket. Then let go, unless one did; the socket closes
        // once Quinn's driver sees the endpoint unused.
        let bind = self.bind;
        crate::runtime::spawn(async move {
            endpoint.wait_idle().await;
            drop(endpoint);
            let mut map = lock(client_endpoints());
            if map.get(&bind).is_some_and(|e| e.users == 0) {
                map.remove(&bind);
            }
        });
    }
}

/// The shared client endpoint for connections from `local` (an IP and port; port 0 means any),
/// with its shard, and for a port the caller chose, a `Lease` the connection keeps until it
/// ends. Without a local address, the wildcard of the remote address's family is used.
pub fn client_endpoint(
    remote: &SocketAddr,
    local: Option<(IpAddr, u16)>,
) -> Result<(quinn::Endpoint, Arc<Shard>, Option<Lease>), Reason> {
    let bind = match local {
        Some((ip, port)) => SocketAddr::new(ip, port),
        None if remote.is_ipv4() => SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), 0),
        None => SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), 0),
    };
    if bind.is_ipv4() != remote.is_ipv4() {
        return Err(crate::atoms::eaddrnotavail().into());
    }
    let mut map = lock(client_endpoints());
    let entry = match map.entry(bind) {
        Entry::Occupied(found) => found.into_mut(),
        Entry::Vacant(slot) => {
            let sock = new_socket(&bind).map_err(|e| error::io(&e))?;
            sock.bind(&bind.into()).map_err(|e| error::io(&e))?;
            let sock: UdpSocket = sock.into();
            // (If the endpoint fails, the watch is dropped here and its duplicate closed.)
            let watch = spin::watch(&sock);
            let (endpoint, shard) = endpoint(sock, None)?;
            slot.insert(ClientEndpoint { endpoint, shard, users: 0, _watch: watch })
        }
    };
    let lease = (bind.port() != 0).then(|| {
        entry.users += 1;
        Lease { bind }
    });
    Ok((entry.endpoint.clone(), entry.shard.clone(), lease))
}

pub fn client_endpoint_count() -> usize {
    lock(client_endpoints()).len()
}

/// The source address the kernel would use to reach `remote` from a wildcard-bound socket (a
/// route lookup: connecting a UDP socket sends nothing). Lets `sockname` report the real local
/// IP of a connection made from a shared `0.0.0.0`/`::` client endpoint.
pub fn route_source(remote: &SocketAddr) -> Option<IpAddr> {
    let any: SocketAddr = if remote.is_ipv4() {
        SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), 0)
    } else {
        SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), 0)
    };
    let probe = UdpSocket::bind(any).ok()?;
    probe.connect(remote).ok()?;
    probe.local_addr().ok().map(|a| a.ip())
}
