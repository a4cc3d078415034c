//! Keeping a panic inside Quinn from taking the VM down.
//!
//! Why: Quinn keeps each connection's state behind a lock, and unwraps that lock wherever it
//! takes it. A panic inside Quinn while it holds the lock (a bug, perhaps one a peer's packets
//! trigger) poisons it, and from then on every use of the connection panics. Our tasks
//! (`runtime::guarded`) and NIFs (rustler) catch panics, so a use only fails its call or task.
//! Dropping a handle is worse: a stream's handle takes the lock as it drops and panics, and
//! while that panic unwinds the handle's own reference to the connection drops; if it was the
//! connection's last, that takes the lock too and panics again. A second panic while one
//! unwinds aborts the process: the whole VM, whatever catches what. Measured with the test hook
//! `debug_panic_driver/1`: before this module, closing a stream of such a connection did.
//!
//! So every Quinn handle we keep is `Contained`: it holds a reference to the connection of its
//! own, dropped after the handle, so the handle's reference is never the last and its drop
//! panics at most once; each drop runs inside `catch_unwind`. Quinn calls made from our own
//! destructors go through `quietly`.
//!
//! Quinn runs each driver inside a task of its own that drops the driver while a panic in it
//! unwinds, before any code of ours can catch it. A connection's driver takes the lock as it
//! drops when its reference is one of the connection's last two (Quinn counts them). So we hold
//! two more wherever we can: from the end of the handshake until the driver ends the shard
//! keeps them (`executor::Shard::keep_until_driver_ends`), and an accepted connection's
//! handshake holds them from its start (`listener::start_handshake` takes the connection out
//! of Quinn's `Connecting` at once).
//!
//! Our own code that Quinn calls with those locks held (the sockets' sends and receives) keeps
//! its panics to itself (`in_socket`): only a panic in Quinn's own code poisons them.
//!
//! What this cannot reach: an outgoing connection's handshake, whose only other reference is
//! the `Connecting`'s (Quinn hands out the connection early only to a client resuming with
//! 0-RTT), and an endpoint's driver, which takes the lock whenever it drops: a panic inside
//! Quinn there is a second panic as it unwinds, and the process aborts. Tried with test hooks
//! panicking in a send during a connect and in an endpoint's receive; only Quinn can change
//! that.
use std::mem::ManuallyDrop;
use std::ops::{Deref, DerefMut};
use std::panic::{catch_unwind, AssertUnwindSafe};

/// A Quinn handle (a stream, a connection) with a reference to the connection it belongs to;
/// dropping it never panics. Used like the handle itself (it dereferences to it).
pub struct Contained<T> {
    value: ManuallyDrop<T>,
    conn: ManuallyDrop<quinn::Connection>,
}

impl<T> Contained<T> {
    /// `value` belongs to `conn`.
    pub fn new(value: T, conn: &quinn::Connection) -> Self {
        Contained { value: ManuallyDrop::new(value), conn: ManuallyDrop::new(conn.clone()) }
    }
}

impl Contained<quinn::Connection> {
    pub fn connection(conn: quinn::Connection) -> Self {
        let own = conn.clone();
        Contained { value: ManuallyDrop::new(conn), conn: ManuallyDrop::new(own) }
    }
}

impl<T> Deref for Contained<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.value
    }
}

impl<T> DerefMut for Contained<T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.value
    }
}

impl<T> Drop for Contained<T> {
    fn drop(&mut self) {
        // SAFETY: both are taken out once, here, and `self` is never used again.
        let (value, conn) = unsafe { (ManuallyDrop::take(&mut self.value), ManuallyDrop::take(&mut self.conn)) };
        // The handle first, while `conn` keeps its reference from being the last.
        let _ = catch_unwind(AssertUnwindSafe(move || drop(value)));
        let _ = catch_unwind(AssertUnwindSafe(move || drop(conn)));
    }
}

impl<T: std::fmt::Debug> std::fmt::Debug for Contained<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.value.fmt(f)
    }
}

/// Runs `f`, a part of the library's own socket code (sending, receiving) that Quinn calls with
/// a connection's or an endpoint's lock held. A panic there must not unwind into Quinn: it
/// would poison that lock, and Quinn drops its driver while the panic unwinds, whose drop takes
/// the lock again and panics a second time, which aborts the process (see above; an endpoint's
/// driver always takes its lock as it drops). So it stops here: `None`, counted in
/// `socket_panics`, and the caller goes on as if the datagram were lost or not there yet.
pub fn in_socket<R>(f: impl FnOnce() -> R) -> Option<R> {
    let out = quietly(f);
    if out.is_none() {
        crate::counters::bump(&crate::counters::SOCKET_PANICS);
    }
    out
}

/// Runs `f` (a Quinn call from one of our destructors), containing a panic: `None` if it
/// panicked.
pub fn quietly<R>(f: impl FnOnce() -> R) -> Option<R> {
    catch_unwind(AssertUnwindSafe(f)).ok()
}
