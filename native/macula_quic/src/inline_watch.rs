//! Receiving the answer in the call that sent the question.
//!
//! Why: a NIF that sends runs Quinn's work for it on the caller's scheduler (see `executor`),
//! but the answer is received by a runtime worker, which hands it to the receiving process:
//! per one-way trip a thread hop, often a wake-up, and Quinn's code and state taken up on
//! another thread. `bin/calls echo` shows that macula_quic makes the same calls into Quinn per
//! round trip as raw Quinn, yet its Quinn code takes twice as long; the hops are what differs.
//! With `inline_watch_us` set, a call that sent a datagram watches the library's sockets for up
//! to that long before it returns. When one has a datagram (with the peer in the same VM, the
//! datagram this call just sent is already in the peer's socket), it wakes that endpoint's
//! driver, which then runs in the same call like any other woken shard: it reads the datagram
//! itself and the connection's driver and reader deliver the data to their process from this
//! scheduler. The whole exchange can then run on the BEAM's schedulers, with no hop at all.
//!
//! Off by default (`inline_watch_us: 0`): it pays only when the peer is in the same VM (or
//! answers within microseconds); across a network, or with the peer in another VM on the same
//! few cores, the watch finds nothing and costs the calling process up to that long per send.
//! Each look peeks at every endpoint's socket (a system call each), so it also costs more the
//! more listeners and client endpoints there are. README's "Tuning: receiving in the sending
//! call" sums up the measurements, bench/README.md has them in full.
//!
//! To read outside tokio's readiness tracking (which only a runtime worker's poll of the OS
//! updates), each endpoint's socket is wrapped: its receive reads the socket directly first,
//! and only when that finds nothing does it ask tokio to wait (keeping the waker, so that a
//! watch can wake the driver). The runtime workers still poll the sockets too; a worker that
//! finds the datagram already taken just waits again.
use std::cell::Cell;
use std::fmt;
use std::io::{ErrorKind, IoSliceMut};
use std::net::{SocketAddr, UdpSocket};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use quinn::udp::{RecvMeta, Transmit, UdpSocketState};
use quinn::{AsyncUdpSocket, UdpPoller};

use crate::counters;
use crate::executor;
use crate::spin;
use crate::util::{lock, Registered, Registry};

/// How long a sending call watches, in microseconds (0: never; set at load).
static WATCH_US: AtomicU64 = AtomicU64::new(0);

/// The sockets a call may receive from: a duplicate descriptor of each endpoint's socket (to
/// peek and read), its receive state, and the endpoint driver's waker once it waits.
static SOCKETS: Registry<Arc<Direct>> = Registry::new();

thread_local! {
    /// This thread sent a datagram on a wrapped socket since `take_sent` last looked.
    static SENT: Cell<bool> = const { Cell::new(false) };
}

/// Sets the watch time (from the NIF's load data), before any endpoint exists.
pub fn configure(us: u64) {
    WATCH_US.store(us, Ordering::Relaxed);
}

pub fn watch_us() -> u64 {
    WATCH_US.load(Ordering::Relaxed)
}

/// Did this thread send a datagram since the last call? (Clears the mark.)
pub fn take_sent() -> bool {
    SENT.with(|s| s.replace(false))
}

struct Direct {
    fd: UdpSocket,
    state: UdpSocketState,
    waker: Mutex<Option<Waker>>,
}

/// An endpoint's socket as Quinn sees it when the watch is on: tokio's socket, with a receive
/// that reads directly first.
pub struct DirectSocket {
    /// Dropped first: taken out of `SOCKETS` under the lock a watch holds while it looks, so
    /// that no watch uses the duplicate afterwards, and it closes with `direct` (a listener's
    /// socket must be closed before its address is released).
    registered: Registered<Arc<Direct>>,
    inner: Arc<dyn AsyncUdpSocket>,
    direct: Arc<Direct>,
}

impl fmt::Debug for DirectSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DirectSocket").field("id", &self.registered.id()).finish()
    }
}

/// Wraps an endpoint's socket: `inner` is tokio's, `fd` a duplicate descriptor of the OS socket
/// it was made from (kept for reading and peeking directly).
pub fn wrap(inner: Arc<dyn AsyncUdpSocket>, fd: UdpSocket) -> std::io::Result<Arc<dyn AsyncUdpSocket>> {
    fd.set_nonblocking(true)?;
    let state = UdpSocketState::new((&fd).into())?;
    let direct = Arc::new(Direct { fd, state, waker: Mutex::new(None) });
    let registered = SOCKETS.add(direct.clone());
    Ok(Arc::new(DirectSocket { registered, inner, direct }))
}

impl AsyncUdpSocket for DirectSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit) -> std::io::Result<()> {
        let sent = self.inner.try_send(transmit);
        // A peer in this VM has the datagram already (loopback delivers it inside the send).
        // Waking its endpoint's driver now, rather than once this call's other work is done,
        // queues it to run in this call before a runtime worker (woken by the same datagram)
        // takes it. Only when it is not there yet is the call marked to watch for it.
        if sent.is_ok() && executor::in_inline() && !wake_ready() {
            SENT.with(|s| s.set(true));
        }
        sent
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<std::io::Result<usize>> {
        match self.direct.state.recv((&self.direct.fd).into(), bufs, meta) {
            Ok(n) => {
                if executor::in_inline() {
                    counters::bump(&counters::INLINE_RECEIVES);
                }
                return Poll::Ready(Ok(n));
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => return Poll::Ready(Err(e)),
        }
        *lock(&self.direct.waker) = Some(cx.waker().clone());
        self.inner.poll_recv(cx, bufs, meta)
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

/// Watches the sockets for up to `inline_watch_us`; wakes the driver of every endpoint whose
/// socket has a datagram waiting. True when it woke one (its shard is then queued to run in
/// the calling NIF, see `executor::inline`).
pub fn watch() -> bool {
    let until = Instant::now() + Duration::from_micros(watch_us());
    loop {
        let woke = wake_ready();
        if woke || Instant::now() >= until {
            return woke;
        }
        std::hint::spin_loop();
    }
}

/// Wakes the driver of every endpoint whose socket has a datagram waiting and whose driver
/// waits for one. True when it woke one.
fn wake_ready() -> bool {
    let mut woke = false;
    for (_, d) in SOCKETS.lock().iter() {
        if spin::has_datagram(&d.fd) {
            if let Some(waker) = lock(&d.waker).take() {
                waker.wake();
                woke = true;
            }
        }
    }
    woke
}
