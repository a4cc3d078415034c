//! Receiving the answer in the call that sent the question.
//!
//! Why: a NIF that sends runs Quinn's work for it on the caller's scheduler (see `executor`),
//! but the answer is received by a runtime worker, which hands it to the receiving process:
//! per one-way trip a thread hop, often a wake-up, and Quinn's code and state taken up on
//! another thread. `bin/calls echo` shows that macula_quic makes the same calls into Quinn per
//! round trip as raw Quinn, yet its Quinn code takes twice as long; the hops are what differs.
//!
//! Always on: when a call sends a datagram to one of the library's own sockets (the peer is in
//! the same VM), loopback has put it in that socket before the send returns. The call then
//! wakes that endpoint's driver, which runs in the same call like any other woken shard: it
//! reads the datagram itself, and the connection's driver and reader deliver the data to their
//! process from this scheduler, with no hop to a runtime worker. Only the sockets bound to the
//! datagram's destination are looked at (a comparison of addresses; no system call), so a
//! send to a peer elsewhere costs nothing more. Measured against reading on the
//! runtime only: 64-byte echo in one VM 0.53× → 0.67× raw Quinn by median, and far steadier;
//! handshakes, bulk, and echo with the peer in another OS process no worse.
//!
//! With `inline_watch_us` set, a call that sent a datagram to a peer outside this VM also
//! watches the socket it sent on, for up to that long, for the answer: a datagram whose work
//! sends a process a message (one that carries nothing for a process, such as an
//! acknowledgement, is received and the watch goes on). A peer in this VM is not watched for:
//! its answer comes in its own call, which reads it and delivers it itself (as above). With the
//! peer in another OS process on the same host the answer often comes within tens of
//! microseconds, and the call that reads it spares its process a wake-up (64-byte echo
//! 0.60-0.68× → 0.79-0.92× raw Quinn by median at 50 µs). Across a network the answer never
//! comes that soon: a call watches only on a connection whose smallest round trip is at most
//! twice the watch, and a thread whose watches bring no answer backs off (see `begin`). Off by
//! default: a watch spends its scheduler's time waiting, and the gains were measured for one
//! request/response chain at a time. README's "Tuning: receiving in the sending call" sums up
//! the measurements, bench/README.md has them in full.
//!
//! To read outside tokio's readiness tracking (which only a runtime worker's poll of the OS
//! updates), each endpoint's socket is wrapped: its receive reads the socket directly first,
//! and only when that finds nothing (or the read before it came back short, so the socket
//! was empty a moment ago) does it ask tokio to wait, keeping the waker so that a call can
//! wake the driver. The runtime workers still poll the sockets too; a worker that finds the
//! datagram already taken just waits again.
use std::cell::{Cell, RefCell};
use std::fmt;
use std::io::{ErrorKind, IoSliceMut};
use std::net::{SocketAddr, UdpSocket};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use quinn::udp::{RecvMeta, Transmit, UdpSocketState};
use quinn::{AsyncUdpSocket, UdpPoller};

use crate::connection::ConnRes;
use crate::contain;
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
    /// The wrapped sockets this thread sent a datagram on since `take_sent` last looked (weak:
    /// a listener's socket must close when its listener goes, not when this thread next looks).
    static SENT: RefCell<Vec<Weak<Direct>>> = const { RefCell::new(Vec::new()) };
}

/// Sets the watch time (from the NIF's load data), before any endpoint exists.
pub fn configure(us: u64) {
    WATCH_US.store(us, Ordering::Relaxed);
}

pub fn watch_us() -> u64 {
    WATCH_US.load(Ordering::Relaxed)
}

/// The sockets this thread sent a datagram on since the last call (and clears the list): the
/// sockets an answer comes back to.
pub fn take_sent() -> Sent {
    Sent(SENT.with(|s| std::mem::take(&mut *s.borrow_mut())))
}

/// Sockets a call sent on, to watch for the answers.
pub struct Sent(Vec<Weak<Direct>>);

fn mark_sent(d: &Arc<Direct>) {
    SENT.with(|s| {
        let mut s = s.borrow_mut();
        if !s.iter().any(|w| std::ptr::eq(w.as_ptr(), Arc::as_ptr(d))) {
            s.push(Arc::downgrade(d));
        }
    })
}

struct Direct {
    /// The address the socket is bound to: a datagram sent to it lands here.
    local: SocketAddr,
    fd: UdpSocket,
    state: UdpSocketState,
    waker: Mutex<Option<Waker>>,
    /// The last direct read came back short (fewer datagrams than asked for): the socket was
    /// empty a moment ago, and the next look goes straight to waiting (see `poll_recv`).
    drained: AtomicBool,
    /// Marked when a call is about to send a datagram here that it then reads itself, so that
    /// the runtime's socket watch leaves that datagram to the call (see `spin`).
    claim: Option<spin::Claim>,
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
    let local = fd.local_addr()?;
    let state = UdpSocketState::new((&fd).into())?;
    let claim = spin::claim_for(local);
    let direct = Arc::new(Direct { local, fd, state, waker: Mutex::new(None), drained: AtomicBool::new(false), claim });
    let registered = SOCKETS.add(direct.clone());
    Ok(Arc::new(DirectSocket { registered, inner, direct }))
}

impl AsyncUdpSocket for DirectSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit) -> std::io::Result<()> {
        // Outside `in_socket`: this hook stands for a panic in Quinn's own code.
        #[cfg(feature = "test_hooks")]
        debug_panic_hook(self.direct.local.port(), transmit.destination);
        #[cfg(feature = "test_hooks")]
        debug_stall_hook(self.direct.local.port(), transmit.destination);
        // A panic in our part of the send stops in `in_socket`, and the datagram counts as lost
        // (as quinn-udp itself treats a failed `sendmsg`): QUIC's loss recovery sends its
        // frames again.
        contain::in_socket(|| self.send(transmit)).unwrap_or(Ok(()))
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<std::io::Result<usize>> {
        // If the direct read found nothing, or panicked (stopped in `in_socket`), tokio's
        // readiness path reads instead.
        if let Some(Some(ready)) = contain::in_socket(|| self.recv_direct(cx, bufs, meta)) {
            return ready;
        }
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

impl DirectSocket {
    /// `try_send`'s work: claims the datagram for a call in this VM that will read it, sends it,
    /// and wakes the receiving endpoint's driver.
    fn send(&self, transmit: &Transmit) -> std::io::Result<()> {
        #[cfg(feature = "test_hooks")]
        debug_socket_panic_hook(self.direct.local.port());
        let inline = executor::in_inline();
        // The library's sockets bound to the destination (a peer in this VM), claimed before
        // the send: loopback delivers the datagram inside it, and a runtime worker's socket
        // watch that saw it unclaimed would go after it (see `spin`).
        let peers = if inline { claim_peers(transmit.destination) } else { Vec::new() };
        let sent = self.inner.try_send(transmit);
        // A peer in this VM has the datagram already. Waking its endpoint's driver now, rather
        // than once this call's other work is done, queues it to run in this call before a
        // runtime worker (woken by the same datagram) takes it. With the watch on, the call is
        // then marked to watch this socket, where the answer will come.
        //
        // No peek first: the send has just put the datagram there (loopback usually delivers
        // inside `sendmsg`), and a peek is a system call per datagram (2 of the 8 a 64-byte echo
        // round trip cost the sending scheduler). If it is not there (a worker took it, the
        // kernel left the delivery for later, a full buffer dropped it), the driver's read finds
        // nothing and it waits again, as it would have.
        if sent.is_ok() && inline {
            for d in &peers {
                d.wake();
            }
            // The answer from a peer in this VM comes in the peer's own call, which reads it
            // and delivers it to our process itself (as this call just did for the peer): a
            // watch would wait for what it cannot see. So only datagrams to elsewhere (another
            // OS process, another host) are watched for.
            if watch_us() > 0 && peers.is_empty() {
                mark_sent(&self.direct);
            }
        }
        sent
    }

    /// `poll_recv`'s direct read: `Some` with what it read (or its error), `None` when the
    /// socket is to be waited on through tokio's readiness.
    fn recv_direct(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Option<Poll<std::io::Result<usize>>> {
        #[cfg(feature = "test_hooks")]
        debug_socket_panic_hook(self.direct.local.port());
        // The waker first: a call that sends here from now on wakes this driver (`wake`), also
        // while it is still deciding below, and the driver then looks again.
        {
            let mut slot = lock(&self.direct.waker);
            if !slot.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                *slot = Some(cx.waker().clone());
            }
        }
        // Quinn reads until a read finds nothing. After a short read that last read would be a
        // system call for nothing (two of the six a 64-byte echo round trip cost the sending
        // scheduler), so it is skipped once: whatever arrived since wakes the driver anyway, a
        // call's datagram through `wake` (which clears `drained`), any other through tokio's
        // readiness, which `inner` registers for.
        if !self.direct.drained.swap(false, Ordering::AcqRel) {
            match self.direct.state.recv((&self.direct.fd).into(), bufs, meta) {
                Ok(n) => {
                    if executor::in_inline() {
                        counters::bump(&counters::INLINE_RECEIVES);
                    }
                    if n < meta.len().min(bufs.len()) {
                        self.direct.drained.store(true, Ordering::Release);
                    }
                    return Some(Poll::Ready(Ok(n)));
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => return Some(Poll::Ready(Err(e))),
            }
        }
        None
    }
}

/// The connection a call is made on, and its shard, for `executor::inline` to decide whether
/// the call may watch (see `begin`).
pub struct WatchOn {
    conn: quinn::Connection,
    shard: Arc<executor::Shard>,
}

/// The connection a call is made on, for `executor::inline` to decide whether the call may
/// watch (see `begin`): `None` while the setting is 0, so that the calls pay nothing for it then.
/// Dropping the clone never takes Quinn's lock (only a connection's last reference does, and
/// the call's handle keeps its own for the whole call), so it cannot panic on a poisoned
/// connection (see `contain`), also while a panic in the call unwinds.
pub fn watch_on(c: &ConnRes) -> Option<WatchOn> {
    (watch_us() > 0).then(|| WatchOn { conn: (*c.conn).clone(), shard: c.shard.clone() })
}

/// Starts the watch of a call on `conn` that sent datagrams on `sent`'s sockets, for up to
/// `inline_watch_us`, unless the connection's peer is too far for an answer to come within
/// it (counted in `inline_watch_far`), this thread is backing off (counted in
/// `inline_watch_skips`), the connection's shard is busy on another thread (whose worker is
/// awake to take the answer), or the sockets are gone. `executor::inline` runs it (`Watch::next`)
/// and ends it. A call with no connection (a connect, whose answer is a handshake that takes
/// longer than any watch) does not watch.
///
/// Too far: the smallest round-trip time Quinn has measured on the connection (from the
/// handshake on, ack delays left out) is over twice the watch. No answer can come sooner than
/// a round trip, so a watch for such a peer (across a network) could only wait. Twice, because
/// without watches that measure includes the runtime worker's wake-up for each datagram, which
/// a watch removes: with the peer in another OS process on the same host it was 20-37 µs
/// without watches and 13-14 µs with them (at 50 µs) here, so a 20 µs watch judged by the
/// measure alone would never start.
///
/// A thread whose watches bring no answer (a near peer that answers late, or one that only
/// acknowledges) backs off: after n such watches in a row it skips the next 2^n - 1 (at most
/// 1023), so that such sends cost next to nothing, and one watch that brings an answer puts it
/// back to watching every time.
pub fn begin(sent: Sent, on: Option<WatchOn>) -> Option<Watch> {
    let sockets: Vec<Arc<Direct>> = sent.0.iter().filter_map(Weak::upgrade).collect();
    if sockets.is_empty() {
        return None;
    }
    let on = on?;
    let watch = Duration::from_micros(watch_us());
    // Quinn's round-trip time is read under its connection lock, which the connection's driver
    // holds while it works: only while this thread holds the connection's shard, so that no
    // driver runs meanwhile (a call never waits for that lock). Busy on another thread, the
    // shard's worker is awake and takes the answer: no watch then (and none counted: the
    // counters are for the watch's own decisions).
    let _claim = on.shard.claim()?;
    // `quietly`: on a connection whose lock a panic inside Quinn has poisoned (see `contain`),
    // `stats` panics; such a connection is not watched for.
    let near = contain::quietly(|| on.conn.stats().path.min_rtt).is_some_and(|rtt| rtt <= 2 * watch);
    if !near {
        counters::bump(&counters::INLINE_WATCH_FAR);
        return None;
    }
    if !backoff_allows() {
        counters::bump(&counters::INLINE_WATCH_SKIPS);
        return None;
    }
    counters::bump(&counters::INLINE_WATCHES);
    let until = Instant::now() + watch;
    Some(Watch { sockets, until, found: false })
}

/// A call's watch for its answer.
pub struct Watch {
    sockets: Vec<Arc<Direct>>,
    until: Instant,
    /// Some look found a datagram.
    found: bool,
}

impl Watch {
    /// Watches the sockets until a datagram waits on one of them, and wakes its endpoint's
    /// driver (true: that shard is then queued to run in the calling NIF), or until the
    /// watch's time is up (false).
    pub fn next(&mut self) -> bool {
        loop {
            let mut woke = false;
            for d in &self.sockets {
                woke |= d.wake_if_ready();
            }
            if woke {
                self.found = true;
                return true;
            }
            if Instant::now() >= self.until {
                return false;
            }
            std::hint::spin_loop();
        }
    }

    /// Ends the watch: `answer` when what it found sent a process a message. Only an answer
    /// resets the back-off; a watch that found only datagrams that carried nothing for a
    /// process (acknowledgements, say) counts as finding nothing, and in
    /// `inline_watch_unanswered`. Without that, a process streaming small messages one way to a
    /// peer outside the VM would wait after each send for the acknowledgement, and send at
    /// their pace (`bench/one_way.exs` at 50 µs: 78k-221k messages/s in three of eight runs,
    /// against 0.36-0.69M).
    pub fn end(self, answer: bool) {
        backoff_record(answer);
        if self.found && !answer {
            counters::bump(&counters::INLINE_WATCH_UNANSWERED);
        }
    }
}

thread_local! {
    /// This thread's watches that found nothing in a row, and how many watches to skip before
    /// the next one.
    static MISSES: Cell<(u32, u32)> = const { Cell::new((0, 0)) };
}

/// The most a thread backs off: after ten empty watches in a row, one watch in 1024.
const MAX_BACKOFF_SHIFT: u32 = 10;

fn backoff_allows() -> bool {
    MISSES.with(|m| {
        let (misses, skip) = m.get();
        if skip > 0 {
            m.set((misses, skip - 1));
            false
        } else {
            true
        }
    })
}

fn backoff_record(found: bool) {
    MISSES.with(|m| {
        if found {
            m.set((0, 0));
        } else {
            let misses = (m.get().0 + 1).min(MAX_BACKOFF_SHIFT);
            m.set((misses, (1 << misses) - 1));
        }
    })
}

impl Direct {
    /// Wakes the endpoint's driver if a datagram waits on its socket and the driver waits for
    /// one. True when it woke it.
    fn wake_if_ready(&self) -> bool {
        spin::has_datagram(&self.fd) && self.wake()
    }

    /// Wakes the endpoint's driver if it waits for a datagram (its next look reads the socket).
    /// True when it woke it.
    fn wake(&self) -> bool {
        self.drained.store(false, Ordering::Release);
        match lock(&self.waker).take() {
            Some(waker) => {
                waker.wake();
                true
            }
            None => false,
        }
    }

    /// Would a datagram sent to `to` land on this socket? (A dual-stack socket's peer may be
    /// addressed as `::ffff:a.b.c.d`.)
    fn receives(&self, to: SocketAddr) -> bool {
        let ip = self.local.ip();
        self.local.port() == to.port() && (ip.is_unspecified() || ip.to_canonical() == to.ip().to_canonical())
    }
}

/// The library's sockets bound to `to` (usually none: the peer is elsewhere), each claimed for
/// the calling NIF, which is about to send a datagram there and read it. Only an address
/// comparison per socket; a `Vec` allocates only for a match.
fn claim_peers(to: SocketAddr) -> Vec<Arc<Direct>> {
    let mut peers = Vec::new();
    for (_, d) in SOCKETS.lock().iter() {
        if d.receives(to) {
            if let Some(claim) = &d.claim {
                claim.mark();
            }
            peers.push(d.clone());
        }
    }
    peers
}

/// Test builds only: `(local port, destination)` of the next datagram whose send panics (see
/// `connection::debug_panic_driver`).
#[cfg(feature = "test_hooks")]
pub static DEBUG_PANIC_SEND: Mutex<Option<(u16, SocketAddr)>> = Mutex::new(None);

/// Panics (once) when a test asked for a panic on this socket's next datagram to `to`: from a
/// connection's driver that is a panic inside Quinn, with the connection's lock held.
#[cfg(feature = "test_hooks")]
fn debug_panic_hook(port: u16, to: SocketAddr) {
    let mut armed = lock(&DEBUG_PANIC_SEND);
    if *armed == Some((port, to)) {
        *armed = None;
        drop(armed);
        panic!("macula_quic: deliberate panic while sending (debug_panic_driver/1)");
    }
}

/// Test builds only: `(local port, how many)`: the next sends and direct reads of the library's
/// socket on that port panic in the library's own socket code (see `contain::in_socket`).
#[cfg(feature = "test_hooks")]
pub static DEBUG_SOCKET_PANICS: Mutex<Option<(u16, u32)>> = Mutex::new(None);

#[cfg(feature = "test_hooks")]
fn debug_socket_panic_hook(port: u16) {
    let mut armed = lock(&DEBUG_SOCKET_PANICS);
    if let Some((p, left)) = *armed {
        if p == port {
            *armed = if left > 1 { Some((p, left - 1)) } else { None };
            drop(armed);
            panic!("macula_quic: deliberate panic in the socket code (debug_panic_socket/2)");
        }
    }
}

/// Test builds only: `(local port, destination, who to tell, how long)` for the next datagram
/// whose send stalls on a runtime worker (see `connection::debug_stall_send_from`).
#[cfg(feature = "test_hooks")]
pub static DEBUG_STALL_SEND: Mutex<Option<(u16, SocketAddr, rustler::LocalPid, std::time::Duration)>> = Mutex::new(None);

/// Sleeps (once), after telling the test so, when a test asked for a stall on this socket's
/// next datagram to `to` sent from a runtime worker: a connection's driver then holds the
/// connection's lock, and its shard, for that long on another thread than the test's.
#[cfg(feature = "test_hooks")]
fn debug_stall_hook(port: u16, to: SocketAddr) {
    // Never a scheduler's thread: the point is a runtime worker busy while a NIF is called.
    if executor::in_inline() || rustler::thread::is_scheduler_thread() {
        return;
    }
    let mut armed = lock(&DEBUG_STALL_SEND);
    let Some((p, t, pid, how_long)) = *armed else { return };
    if (p, t) != (port, to) {
        return;
    }
    *armed = None;
    drop(armed);
    rustler::atoms! { driver_stalled }
    crate::messages::send(&pid, |e| rustler::Encoder::encode(&driver_stalled(), e));
    std::thread::sleep(how_long);
}
