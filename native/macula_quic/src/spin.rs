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
//! A datagram that a call in this VM sent, and is about to read itself (see `inline_watch`),
//! does not end the watch: the call claims the socket just before it sends, and the watch
//! passes over a socket claimed in the last `CLAIM_WINDOW`. Ending it there sent the
//! worker to take the datagram the call was about to read, or to sleep just before the next
//! one, whose arrival then woke it: on a host whose idle vCPUs halt, an interrupt that the
//! sending scheduler pays for inside its `sendmsg`. Measured with 64-byte echo between two
//! processes of one VM: 0.62× → 0.70× raw Quinn by median at the default 20 µs, and with a
//! 250 µs watch 0.65× → 0.80× (eight fresh-VM rounds against the build before; bench/README
//! has those and the trial builds' rounds). A datagram from elsewhere that lands
//! on a claimed socket waits for the window to pass (at most 100 µs, and only while no other
//! worker sleeps in the kernel's poll, which it would wake).
//!
//! And while calls keep claiming sockets, the watch goes on (`spin_us` past the last claim, at
//! most `LOCAL_WATCH_MAX`): two processes of this VM exchanging datagrams do all the work in
//! their calls, and a worker that slept would be woken by every datagram's arrival for nothing
//! (each wake-up an interrupt the sending scheduler pays for). 64-byte echo between processes of
//! one VM: 0.68× → 0.83× raw Quinn by median (eight fresh-VM rounds); bulk, which sends from
//! runtime workers and claims little, and handshakes within the noise. It costs CPU only while
//! such traffic flows: up to a core while it is steady, and at 200 round trips/s a few percent
//! of one (`bench/sparse_cpu.exs`). With `spin_us` 0 nothing watches at all. A watch ends early
//! when work waits in the runtime's global queue (spawned from outside the runtime: a shard a
//! call left over, a large send), which a watching worker would otherwise leave waiting; timers
//! still fire only once a worker parks, up to `LOCAL_WATCH_MAX` late while both watch.
//!
//! A worker whose watches keep catching work watches longer: after a watch that ended at a
//! datagram or at work in the global queue the next one is twice as long, up to
//! `spin_max_us` (500 µs by default, `runtime_spin_max_us`), and after one that caught nothing
//! it is half as long, down to `spin_us`. Why: in a steady flow (a bulk transfer, a peer in
//! another OS process answering requests) the next datagram comes tens of µs after a worker
//! runs out of work, and on a host whose idle vCPUs halt a sleeping worker takes about as long
//! again to wake. Fresh-VM rounds on such a host against the flat watch (bench/README, "A
//! runtime watch that grows"): bulk +20% (higher in 8 of 8), 64-byte echo with the peer in
//! another OS process 2×, the rest within 2%. A flat 500 µs watch gained bulk about as much but
//! cost a quiet node far more CPU (`bench/sparse_cpu.exs`, peer elsewhere, 200 round trips/s:
//! +9% of a core against at most +4%); halving on a miss keeps a quiet node's watches short,
//! and resetting at once to `spin_us` instead gave bulk only +11%. Each worker keeps its own
//! length.
//!
//! The check is a non-blocking peek on a duplicate of each socket's descriptor: it reads
//! nothing, and the endpoint's own receive loop takes the datagram. Between looks the worker
//! yields its CPU: on a small host a BEAM scheduler with work to do would otherwise wait for
//! the watch to end (without the yield, bulk transfers saw ten times as many preemptions of the
//! runtime's workers, and more CPU per MiB than with no watch at all). A listener's duplicate
//! is closed when the listener retires its socket, before the address is released, so a
//! closed listener's socket never outlives it.
use std::cell::Cell;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crate::util::{Registered, Registry};

/// How long a worker watches before it parks, in microseconds (0: never; set at load).
static SPIN_US: AtomicU64 = AtomicU64::new(0);

/// The longest a worker's watch grows to while its watches catch work, in microseconds (set at
/// load, never below `SPIN_US`).
static SPIN_MAX_US: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// This worker's next watch, in microseconds: grows and shrinks with what its watches catch
    /// (see the top of this file). 0 until its first watch.
    static WATCH_US: Cell<u64> = const { Cell::new(0) };
}

/// How long after a call claimed a socket (see `Claim`) the watch leaves its datagrams alone.
/// The call reads the datagram within microseconds; this bounds how long one from elsewhere
/// that lands there meanwhile can go unnoticed by the watch.
const CLAIM_WINDOW: Duration = Duration::from_micros(100);

/// The longest a watch goes on while calls in this VM keep claiming sockets: the worker then
/// parks (and finds what arrived meanwhile) before it watches again.
const LOCAL_WATCH_MAX: Duration = Duration::from_millis(1);

/// The watched sockets.
static WATCHED: Registry<Watched> = Registry::new();

struct Watched {
    /// A duplicated descriptor: dropping it closes only the duplicate.
    socket: socket2::Socket,
    /// Where the socket is bound, to find its claim (see `claim_for`).
    local: Option<SocketAddr>,
    claim: Claim,
}

/// A socket's claim: when (`ns`, plus one so that 0 means never) a call last sent a
/// datagram there that it reads itself.
#[derive(Clone, Debug, Default)]
pub struct Claim(Arc<AtomicU64>);

impl Claim {
    /// A call is about to send a datagram to this socket, and to read it.
    pub fn mark(&self) {
        self.0.store(ns(Instant::now()) + 1, Ordering::Relaxed);
    }

    fn recent(&self, now: u64) -> bool {
        let at = self.0.load(Ordering::Relaxed);
        at != 0 && now.saturating_sub(at - 1) < CLAIM_WINDOW.as_nanos() as u64
    }
}

/// `at` as nanoseconds since the first call (a timestamp an atomic can hold).
fn ns(at: Instant) -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    at.saturating_duration_since(*BASE.get_or_init(Instant::now)).as_nanos() as u64
}

/// The claim of the watched socket bound to `local`, for the in-call receive to mark. The socket
/// is watched (`watch`) just before Quinn wraps it, and wrapping it is where this is asked, so
/// the address finds it: no two open sockets share one. `None` when nothing watches it.
pub fn claim_for(local: SocketAddr) -> Option<Claim> {
    WATCHED.lock().iter().find(|(_, w)| w.local == Some(local)).map(|(_, w)| w.claim.clone())
}

/// Sets the watch time and the longest it grows to (from the NIF's load data), before the
/// runtime starts. A `max_us` below `us` means no growth.
pub fn configure(us: u64, max_us: u64) {
    SPIN_US.store(us, Ordering::Relaxed);
    SPIN_MAX_US.store(max_us.max(us), Ordering::Relaxed);
}

pub fn spin_us() -> u64 {
    SPIN_US.load(Ordering::Relaxed)
}

pub fn spin_max_us() -> u64 {
    SPIN_MAX_US.load(Ordering::Relaxed)
}

/// A socket being watched; dropping it stops the watch and closes the duplicate (no worker is
/// still looking at it once the drop returns).
#[derive(Debug)]
pub struct Watch {
    _entry: Registered<Watched>,
}

/// Starts watching `socket`. `None` when watching is off, not supported here, or the descriptor
/// cannot be duplicated (the socket then just is not watched).
pub fn watch(socket: &UdpSocket) -> Option<Watch> {
    if spin_us() == 0 || !cfg!(unix) {
        return None;
    }
    let dup = socket2::Socket::from(socket.try_clone().ok()?);
    let watched = Watched { socket: dup, local: socket.local_addr().ok(), claim: Claim::default() };
    Some(Watch { _entry: WATCHED.add(watched) })
}

/// Sockets being watched (for tests and `native_counts`).
pub fn watched_count() -> usize {
    WATCHED.lock().len()
}

/// The runtime's `on_thread_park` hook: watches for this worker's current length (`spin_us`,
/// grown while its watches catch work; see the top of this file), then sets the next one.
pub fn before_park() {
    let (base, max) = (spin_us(), spin_max_us());
    let len = WATCH_US.with(Cell::get).min(max).max(base);
    if len > base {
        crate::counters::bump(&crate::counters::RUNTIME_WATCHES_GROWN);
    }
    let next = if look(Duration::from_micros(len)) { len.saturating_mul(2) } else { len / 2 };
    WATCH_US.with(|w| w.set(next.min(max).max(base)));
}

/// Watches the sockets: returns true when a watched socket that no call has claimed has a
/// datagram waiting, or work waits in the runtime's global queue; false after `spin`, or, while
/// calls claim sockets, `spin` after the last claim (at most `LOCAL_WATCH_MAX` in all).
fn look(spin: Duration) -> bool {
    let start = Instant::now();
    let mut until = start + spin;
    let mut extended = false;
    let mut caught = false;
    let runtime = crate::runtime::get().metrics();
    loop {
        let t = Instant::now();
        if t >= until {
            break;
        }
        // Work handed to the runtime from outside it (a shard a call could not finish, a large
        // send) waits in its global queue for a worker that is not watching: stop for it.
        if runtime.global_queue_depth() > 0 {
            caught = true;
            break;
        }
        // The other worker may be looking too: skip a turn rather than wait for it.
        if let Some(watched) = WATCHED.try_lock() {
            let now = ns(t);
            let mut claimed = false;
            for (_, w) in watched.iter() {
                if w.claim.recent(now) {
                    claimed = true;
                } else if has_datagram(&w.socket) {
                    crate::counters::bump(&crate::counters::RUNTIME_WATCH_HITS);
                    return true;
                }
            }
            // Calls in this VM are exchanging datagrams: stay awake for the next one.
            let later = (t + spin).min(start + LOCAL_WATCH_MAX);
            if claimed && later > until {
                until = later;
                extended = true;
            }
        }
        // Let a runnable thread on this CPU (a BEAM scheduler, say) go first.
        std::thread::yield_now();
    }
    if extended {
        crate::counters::bump(&crate::counters::RUNTIME_WATCH_EXTENSIONS);
    }
    caught
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
