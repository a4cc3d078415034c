//! Watching the sockets for a moment before a runtime worker goes to sleep.
//!
//! Why: when a worker has nothing left to do it sleeps in the kernel, and the next datagram has
//! to wake it (a context switch; on a VM an interrupt to another vCPU). In request/response
//! traffic with a peer on the same host the next datagram is often only microseconds away: the
//! peer's answer to what a BEAM process sent from its own scheduler (see `executor`) after this
//! worker handed it a message. The BEAM's schedulers wait the same way before they sleep
//! (`+sbwt`). So before it parks, a worker checks the library's sockets for up to `spin_us`
//! microseconds, and stops at the first datagram (tokio's poll then finds it without sleeping)
//! or when the time is up.
//!
//! 20 µs by default (the NIF's load data; `runtime_spin_us: 0` turns it off). It pays off when
//! the peer answers within microseconds, and on hosts where waking an idle vCPU is slow (one
//! measured here took ~20 µs per cross-CPU wake-up) it lifts bulk transfers and handshakes as
//! well; with several VMs sharing a few cores it slowed them down on another host. README's
//! "Tuning: the runtime's socket watch" sums up the measurements, bench/README.md has them in
//! full. `SPIN_US` starts at 0 so that nothing watches before the load data has set it.
//!
//! The check is a non-blocking peek on a duplicate of each socket's descriptor: it reads
//! nothing, and the endpoint's own receive loop takes the datagram. Between looks the worker
//! yields its CPU: on a small host a BEAM scheduler with work to do would otherwise wait for
//! the watch to end (without the yield, bulk transfers saw ten times as many preemptions of the
//! runtime's workers, and more CPU per MiB than with no watch at all). A listener's duplicate
//! is closed when the listener retires its socket, before the address is released, so a
//! closed listener's socket never outlives it.
use std::net::UdpSocket;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::util::{Registered, Registry};

/// How long a worker watches before it parks, in microseconds (0: never; set at load).
static SPIN_US: AtomicU64 = AtomicU64::new(0);

/// The watched sockets (duplicated descriptors: dropping one closes only the duplicate).
static WATCHED: Registry<socket2::Socket> = Registry::new();

/// Sets the watch time (from the NIF's load data), before the runtime starts.
pub fn configure(us: u64) {
    SPIN_US.store(us, Ordering::Relaxed);
}

pub fn spin_us() -> u64 {
    SPIN_US.load(Ordering::Relaxed)
}

/// A socket being watched; dropping it stops the watch and closes the duplicate (no worker is
/// still looking at it once the drop returns).
#[derive(Debug)]
pub struct Watch {
    _entry: Registered<socket2::Socket>,
}

/// Starts watching `socket`. `None` when watching is off, not supported here, or the descriptor
/// cannot be duplicated (the socket then just is not watched).
pub fn watch(socket: &UdpSocket) -> Option<Watch> {
    if spin_us() == 0 || !cfg!(unix) {
        return None;
    }
    let dup = socket2::Socket::from(socket.try_clone().ok()?);
    Some(Watch { _entry: WATCHED.add(dup) })
}

/// Sockets being watched (for tests and `native_counts`).
pub fn watched_count() -> usize {
    WATCHED.lock().len()
}

/// The runtime's `on_thread_park` hook: returns when a watched socket has a datagram waiting,
/// or after `spin_us`.
pub fn before_park() {
    let until = Instant::now() + Duration::from_micros(spin_us());
    while Instant::now() < until {
        // The other worker may be looking too: skip a turn rather than wait for it.
        if let Some(watched) = WATCHED.try_lock() {
            if watched.iter().any(|(_, s)| has_datagram(s)) {
                return;
            }
        }
        // Let a runnable thread on this CPU (a BEAM scheduler, say) go first.
        std::thread::yield_now();
    }
}

/// Is a datagram waiting on `s`? A peek that does not block (whether or not the socket is in
/// blocking mode) and does not take the datagram. Also used by `inline_watch`.
#[cfg(unix)]
pub fn has_datagram(s: &impl std::os::fd::AsFd) -> bool {
    let mut one = [std::mem::MaybeUninit::<u8>::uninit(); 1];
    socket2::SockRef::from(s).recv_with_flags(&mut one, libc::MSG_PEEK | libc::MSG_DONTWAIT).is_ok()
}

#[cfg(not(unix))]
pub fn has_datagram<S>(_: &S) -> bool {
    false
}
