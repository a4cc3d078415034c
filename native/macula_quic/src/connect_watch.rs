//! A connecting caller watching its mailbox for the answer before its scheduler sleeps.
//!
//! Why: `connect/4` blocks its caller in a `receive` until the handshake ends. With a peer on
//! the same host a handshake takes a few hundred microseconds: longer than a BEAM scheduler
//! busy-waits before it sleeps (`+sbwt`), so the caller's scheduler goes to sleep, and the
//! answer has to wake it (on a VM, an idle vCPU), after which the caller may still wait for
//! the CPU of the runtime worker that sent the answer. In sequential handshakes that was the
//! largest part of the gap to raw Quinn, whose next connect follows on the thread that finished
//! the handshake (bench/README.md, "Handshakes: the last phase once more"; with the VM's
//! `+sbwt very_long` they ran level with raw Quinn). So the caller keeps its scheduler awake
//! instead: it looks at its mailbox, lets the other processes run, and looks again, for up to
//! `connect_watch_us`, and only then waits in `receive` (`MaculaQuic.connect/4`).
//!
//! Only when it is the only connect in flight in this VM: with many at once the schedulers
//! have other work and the runtime's workers need the CPUs, and a trial that let one of sixteen
//! connecting processes watch cost 16 handshakes at once ~8% (every one of them watching: a
//! third). And only while handshakes are quick: when the last one that succeeded took longer
//! than `connect_watch_us` (a peer farther away) the answer is not worth watching for, and
//! the caller waits in `receive` at once.
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

use crate::counters;

/// How long a connecting caller watches its mailbox, in microseconds (0: never; set at load).
static WATCH_US: AtomicU64 = AtomicU64::new(0);

/// Connects in flight: from the NIF call to its answer.
static IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);

/// How long the last connect that succeeded took, in microseconds (0 before the first).
static LAST_US: AtomicU64 = AtomicU64::new(0);

/// Sets the watch (from the NIF's load data).
pub fn configure(us: u64) {
    WATCH_US.store(us, Ordering::Relaxed);
}

pub fn watch_us() -> u64 {
    WATCH_US.load(Ordering::Relaxed)
}

/// Connects in flight now (for `native_counts`).
pub fn in_flight() -> usize {
    IN_FLIGHT.load(Ordering::Acquire)
}

/// A connect in flight; dropping it (however the connect ends) ends that. It should end before
/// the caller is answered: a caller that connects again at once must find itself alone.
#[derive(Debug)]
pub struct InFlight {
    started: Instant,
}

impl InFlight {
    /// The handshake succeeded: ends the connect's time in flight, and the next connect's watch
    /// depends on how long this one took.
    pub fn succeeded(self) {
        let us = u64::try_from(self.started.elapsed().as_micros()).unwrap_or(u64::MAX);
        LAST_US.store(us.max(1), Ordering::Relaxed);
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        IN_FLIGHT.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Starts a connect: its mark as in flight, and how long its caller should watch for the
/// answer in microseconds (0: not at all).
pub fn begin() -> (InFlight, u64) {
    let others = IN_FLIGHT.fetch_add(1, Ordering::AcqRel);
    let us = watch_us();
    let watch = if us > 0 && others == 0 && LAST_US.load(Ordering::Relaxed) <= us { us } else { 0 };
    if watch > 0 {
        counters::bump(&counters::CONNECT_WATCHES);
    }
    (InFlight { started: Instant::now() }, watch)
}
