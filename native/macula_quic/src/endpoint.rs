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
use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::sync::{Arc, Mutex, OnceLock};

use socket2::{Domain, Protocol, Socket, Type};

use crate::error::{self, Reason};
use crate::runtime;
use crate::util::lock;

fn registry() -> &'static Mutex<HashSet<SocketAddr>> {
    static R: OnceLock<Mutex<HashSet<SocketAddr>>> = OnceLock::new();
    R.get_or_init(|| Mutex::new(HashSet::new()))
}

/// An address held by a listener; dropping it frees the address for a new listener.
#[derive(Debug)]
pub struct Registration(SocketAddr);

impl Drop for Registration {
    fn drop(&mut self) {
        lock(registry()).remove(&self.0);
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
    if addr.is_ipv6() {
        // A specific IPv6 address is v6-only; `::` is dual-stack (IPv4 peers appear as
        // ::ffff:a.b.c.d), as the original library's users rely on.
        s.set_only_v6(!addr.ip().is_unspecified())?;
    }
    Ok(s)
}

/// Binds a listener socket to exactly `addr` and registers it.
pub fn bind_listener(addr: SocketAddr) -> Result<(UdpSocket, Registration), Reason> {
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
    Ok((sock.into(), Registration(local)))
}

/// Wraps a bound socket in a Quinn endpoint. Must run inside the runtime context.
pub fn endpoint(socket: UdpSocket, server: Option<quinn::ServerConfig>) -> Result<quinn::Endpoint, Reason> {
    let _guard = runtime::get().enter();
    quinn::Endpoint::new(quinn::EndpointConfig::default(), server, socket, Arc::new(quinn::TokioRuntime))
        .map_err(|e| error::io(&e))
}

fn client_endpoints() -> &'static Mutex<HashMap<SocketAddr, quinn::Endpoint>> {
    static C: OnceLock<Mutex<HashMap<SocketAddr, quinn::Endpoint>>> = OnceLock::new();
    C.get_or_init(|| Mutex::new(HashMap::new()))
}

/// The shared client endpoint for connections from `local` (an IP and port; port 0 means any).
/// Without a local address, the wildcard of the remote address's family is used.
pub fn client_endpoint(remote: &SocketAddr, local: Option<(IpAddr, u16)>) -> Result<quinn::Endpoint, Reason> {
    let bind = match local {
        Some((ip, port)) => SocketAddr::new(ip, port),
        None if remote.is_ipv4() => SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), 0),
        None => SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), 0),
    };
    if bind.is_ipv4() != remote.is_ipv4() {
        return Err(crate::atoms::eaddrnotavail().into());
    }
    let mut map = lock(client_endpoints());
    if let Some(ep) = map.get(&bind) {
        return Ok(ep.clone());
    }
    let sock = new_socket(&bind).map_err(|e| error::io(&e))?;
    sock.bind(&bind.into()).map_err(|e| error::io(&e))?;
    let ep = endpoint(sock.into(), None)?;
    map.insert(bind, ep.clone());
    Ok(ep)
}

pub fn client_endpoint_count() -> usize {
    lock(client_endpoints()).len()
}
