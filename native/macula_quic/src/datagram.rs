//! QUIC datagrams (RFC 9221): unreliable, unordered messages on a connection, beside its
//! streams. Each is sent in one packet or not at all; none is retransmitted.
//!
//! Datagrams are opt-in (`datagram_receive_enabled`, off by default as in quicer). Only then does
//! the connection tell its peer that it accepts datagrams, and a reader task on the
//! connection's shard hands each one to the owner of the moment as `{quic, Bin, C, 0}`, after a
//! first `{quic, dgram_state_changed, C, #{dgram_send_enabled, dgram_max_len}}` saying whether
//! the peer accepts them in turn. Nothing follows `closed` (`ConnRes::with_datagrams`). Quinn
//! sends datagrams only on a connection that accepts them too (MsQuic lets one that does not
//! send), so the option is needed at both ends.
//!
//! Datagrams have no flow control, so a receiver cannot slow its peer; what it can bound is
//! what waits for it. The owner's `datagram_active` mode works as a stream's `active`: `true`
//! delivers each as it comes (the mailbox then grows if the owner falls behind), `:once` and
//! `N` deliver that many and then stop, `false` delivers none. While delivery is stopped the
//! reader holds one datagram and reads no more, and Quinn keeps at most its receive buffer's
//! worth (`datagram_receive_buffer`, 1.25 MB unless set), dropping the oldest: a passive
//! owner's datagrams cost bounded memory, and the newest of them wait for it. Bounded, but not
//! by the buffer's figure alone: Quinn counts a datagram as its length plus 32 bytes, while its
//! bytes keep alive the whole UDP packet it came in (Quinn slices packets, it does not copy
//! them). A peer sending empty datagrams in full-size packets could so pin about 45 times the
//! buffer (some 57 MB at the default); a smaller buffer lowers that in proportion.
//!
//! Sending (`conn_send_dgram`) waits, in the calling process, for room in Quinn's bounded send
//! buffer (1 MiB) when the connection's congestion window holds datagrams back, instead of
//! letting Quinn drop the oldest queued ones to make room: a sender that outruns the path is
//! slowed down. Calls that wait are served strictly in turn, by one task per connection
//! (`Outbox`), and a call that finds others waiting queues behind them rather than taking the
//! room they wait for: otherwise small datagrams, which fit in less, could starve a large one
//! for as long as they keep coming (Quinn itself wakes all its waiters at once, and the first
//! whose datagram fits wins). (Quinn still drops queued datagrams that no longer fit when the
//! path's packet size shrinks, and those queued when the connection closes.)
use std::collections::VecDeque;
use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use rustler::{Binary, Encoder, Env, LocalPid, ResourceArc, Term};

use crate::atoms;
use crate::connection::ConnRes;
use crate::contain;
use crate::counters::{self, Live};
use crate::error::{self, Reason};
use crate::executor;
use crate::inline_watch;
use crate::messages::{self, Reply};
use crate::options::{self, Active};
use crate::received;
use crate::util::lock;

rustler::atoms! { dgram_state_changed, dgram_send_enabled, dgram_max_len, unsupported_by_peer, too_large, datagrams_disabled, wait }

/// No QUIC packet carries more (a UDP payload is at most 65,527 bytes): anything larger is
/// refused before it is copied.
const MAX_DATAGRAM: usize = 65_535;

/// Datagrams the reader delivers before it yields (`executor::yield_once`): with many waiting in
/// Quinn (an owner turning active after a passive spell) every read is ready at once, and one
/// poll would deliver them all, on a scheduler thread when the shard runs inline in a call.
const DELIVERIES_PER_POLL: u32 = 16;

/// A connection's datagram delivery: the owner's mode, and the datagram read while delivery
/// was stopped. Kept in the connection's state, under its lock (see `ConnRes::with_datagrams`).
#[derive(Debug)]
pub struct Delivery {
    active: Active,
    held: Option<Bytes>,
}

impl Delivery {
    pub fn new(active: Active) -> Delivery {
        Delivery { active, held: None }
    }
}

/// Starts the reader of a connection whose owner receives datagrams. It holds the connection
/// until the connection has ended and Quinn's buffered datagrams are drained.
pub fn start_reader(res: &ResourceArc<ConnRes>) {
    res.shard.spawn(read(res.clone()));
}

/// What the reader does next.
enum Step {
    Read,
    /// Delivery is stopped with a datagram held: wait for the owner's next mode.
    Wait,
    End,
}

async fn read(res: ResourceArc<ConnRes>) {
    let _task = Live::new(&counters::TASKS);
    // Runs on the shard, so asking Quinn never waits for its driver on another thread.
    let max = send_limit(&res);
    let r = res.clone();
    res.with_datagrams(|_, owner, closed| {
        if !closed {
            messages::send(&owner, move |e| state_changed_msg(e, r, max));
        }
    });
    let mut delivered = 0u32;
    loop {
        if delivered >= DELIVERIES_PER_POLL {
            delivered = 0;
            executor::yield_once().await;
        }
        // Registered before the state is read, so a mode set in between still wakes it.
        let mut changed = pin!(res.dgram_wake.notified());
        changed.as_mut().enable();
        let step = res.with_datagrams(|d, owner, closed| match d {
            Some(d) if !closed => {
                if d.active != Active::Off {
                    if let Some(data) = d.held.take() {
                        deliver(&res, d, owner, data);
                        delivered += 1;
                    }
                }
                if d.held.is_some() {
                    Step::Wait
                } else {
                    Step::Read
                }
            }
            _ => Step::End,
        });
        match step {
            Step::End => return,
            Step::Wait => {
                tokio::select! {
                    _ = changed => {}
                    // The held datagram goes with the connection.
                    _ = res.conn.closed() => return,
                }
            }
            // Quinn hands out what it buffered before the connection ended, then the error.
            Step::Read => match res.conn.read_datagram().await {
                Ok(data) => {
                    delivered += 1;
                    res.with_datagrams(|d, owner, closed| match d {
                        Some(d) if !closed && d.active != Active::Off => deliver(&res, d, owner, data),
                        Some(d) if !closed => d.held = Some(data),
                        _ => {}
                    })
                }
                Err(_) => return,
            },
        }
    }
}

/// Sends `data` to the owner and counts it against the mode (under the state lock).
fn deliver(res: &ResourceArc<ConnRes>, d: &mut Delivery, owner: LocalPid, data: Bytes) {
    let r = res.clone();
    messages::send(&owner, move |e| (atoms::quic(), received::binary(e, std::slice::from_ref(&data)), r, 0u32).encode(e));
    let (next, spent) = d.active.after_message();
    if spent {
        let r = res.clone();
        messages::send(&owner, move |e| passive_msg(e, r));
    }
    d.active = next;
}

/// `{quic, passive, C, undefined}`: a `datagram_active` count ran out.
fn passive_msg(e: Env, c: ResourceArc<ConnRes>) -> Term {
    (atoms::quic(), atoms::passive(), c, atoms::undefined()).encode(e)
}

/// `conn_set_dgram_active(Conn, Active)`: the owner's `datagram_active` mode, with `:inet`'s
/// `active` semantics. An `N` that brings the count to zero or below stops delivery and says so
/// (`{quic, passive, C, undefined}` to the owner). `{:error, :datagrams_disabled}` on a
/// connection that takes no datagrams.
#[rustler::nif]
fn conn_set_dgram_active<'a>(env: Env<'a>, c: ResourceArc<ConnRes>, value: Term<'a>) -> Term<'a> {
    let Some(setting) = options::decode_active(value) else {
        return err(env, error::bad_option("datagram_active"));
    };
    executor::inline(env, None, || {
        let set = c.with_datagrams(|d, owner, closed| {
            let Some(d) = d else { return Err(Reason::from(datagrams_disabled())) };
            let mode = setting.apply(d.active).map_err(|_| error::bad_option("datagram_active"))?;
            if setting.ran_out(d.active, mode) && !closed {
                let _ = env.send(&owner, passive_msg(env, c.clone()));
            }
            d.active = mode;
            Ok(())
        });
        match set {
            Ok(()) => {
                // The reader may be waiting with a datagram held.
                c.dgram_wake.notify_waiters();
                atoms::ok().encode(env)
            }
            Err(r) => err(env, r),
        }
    })
}

/// `conn_get_dgram_active(Conn)`: `true | false | :once | N`, or `{:error,
/// :datagrams_disabled}`.
#[rustler::nif]
fn conn_get_dgram_active<'a>(env: Env<'a>, c: ResourceArc<ConnRes>) -> Term<'a> {
    c.with_datagrams(|d, _, _| match d {
        Some(d) => (atoms::ok(), options::encode_active(env, d.active)).encode(env),
        None => err(env, datagrams_disabled()),
    })
}

/// The largest datagram the connection may send now, `None` if it may send none: the peer
/// refuses datagrams, this end was made without them (Quinn's `max_datagram_size` tells only
/// the first; its sends refuse the second), or the connection has ended (Quinn still answers
/// its last figure). Reads Quinn under its lock: call it on the connection's shard.
pub fn send_limit(c: &ConnRes) -> Option<usize> {
    if c.with_datagrams(|d, _, _| d.is_none()) || c.end_reason().is_some() {
        return None;
    }
    contain::quietly(|| c.conn.max_datagram_size()).flatten()
}

/// quicer's `{quic, dgram_state_changed, C, #{dgram_send_enabled, dgram_max_len}}`: whether
/// the peer accepts datagrams, and the largest one this end may send it now (0 if none). That
/// moves with the path's packet size: up as Quinn finds larger packets pass, down again if
/// they stop passing.
fn state_changed_msg(e: Env, c: ResourceArc<ConnRes>, max: Option<usize>) -> Term {
    let props = Term::map_from_pairs(
        e,
        &[
            (dgram_send_enabled().encode(e), max.is_some().encode(e)),
            (dgram_max_len().encode(e), max.unwrap_or(0).encode(e)),
        ],
    )
    .unwrap_or_else(|_| atoms::undefined().encode(e));
    (atoms::quic(), dgram_state_changed(), c, props).encode(e)
}

/// `conn_send_dgram(Conn, Binary, Tag)`: sends `Binary` as one datagram. Answers `:ok` or
/// `{:error, Reason}` at once when the call can hand it to Quinn; otherwise `:wait`, and later
/// `{Tag, :ok | {:error, Reason}}`.
///
/// As `open_stream`: the call asks Quinn (under its connection lock) only while it holds the
/// connection's shard, and then runs the driver it woke, so the datagram leaves from this
/// thread. When the shard is busy on another thread, or Quinn's send buffer is full, a task on
/// the shard sends it and answers.
#[rustler::nif]
fn conn_send_dgram<'a>(env: Env<'a>, c: ResourceArc<ConnRes>, data: Binary<'a>, tag: Term<'a>) -> Term<'a> {
    if data.len() > MAX_DATAGRAM {
        return err(env, too_large());
    }
    if let Err(r) = c.ready() {
        return err(env, r);
    }
    if c.shard.failed() {
        return err(env, atoms::closed());
    }
    let data = Bytes::copy_from_slice(data.as_slice());
    executor::inline(env, inline_watch::watch_on(&c), || {
        let claim = c.shard.claim();
        // With others waiting, this one waits behind them.
        if claim.is_some() && !lock(&c.dgram_out).serving {
            send_now(env, &c, data, tag)
        } else {
            send_later(env, &c, data, tag)
        }
    })
}

/// Hands the datagram to Quinn in the call when its send buffer has room, else as
/// `send_later`. The caller holds the connection's shard.
fn send_now<'a>(env: Env<'a>, c: &ResourceArc<ConnRes>, data: Bytes, tag: Term<'a>) -> Term<'a> {
    let mut cx = Context::from_waker(Waker::noop());
    // (`Bytes` clones share the data.)
    let polled = contain::quietly(|| pin!(c.conn.send_datagram_wait(data.clone())).as_mut().poll(&mut cx));
    match polled {
        // Quinn panicked: the connection is broken for good (see `connection`).
        None => err(env, atoms::closed()),
        Some(Poll::Ready(Ok(()))) => atoms::ok().encode(env),
        Some(Poll::Ready(Err(e))) => err(env, reason(&e)),
        Some(Poll::Pending) => send_later(env, c, data, tag),
    }
}

/// Queues the datagram behind any others waiting, for `serve` to hand to Quinn once its send
/// buffer has room, and returns `:wait`; `{Tag, Result}` follows.
fn send_later<'a>(env: Env<'a>, c: &ResourceArc<ConnRes>, data: Bytes, tag: Term<'a>) -> Term<'a> {
    let reply = Reply::new(env.pid(), tag);
    let start = {
        let mut out = lock(&c.dgram_out);
        out.queue.push_back((data, reply));
        !std::mem::replace(&mut out.serving, true)
    };
    if start {
        c.shard.clone().spawn(serve(c.clone()));
    }
    wait().encode(env)
}

/// The datagrams of `send_dgram` calls that wait, in the order they came, and whether a task
/// (`serve`) is handing them to Quinn. While one is, every new call queues here too.
#[derive(Default)]
pub struct Outbox {
    queue: VecDeque<(Bytes, Reply)>,
    serving: bool,
}

/// Hands the connection's queued datagrams to Quinn one at a time, each once its send buffer
/// has room, answering each caller as its datagram goes; ends when none is left. One per
/// connection at a time, so Quinn has one waiter, and callers are served in turn.
///
/// Its `Serving` exists before the task first runs: a task dropped without ever running (its
/// shard failed first) still answers the callers queued.
fn serve(c: ResourceArc<ConnRes>) -> impl Future<Output = ()> + Send {
    let serving = Serving { c: c.clone(), done: false };
    serve_queue(c, serving)
}

async fn serve_queue(c: ResourceArc<ConnRes>, mut serving: Serving) {
    let _task = Live::new(&counters::TASKS);
    loop {
        let next = {
            let mut out = lock(&c.dgram_out);
            let next = out.queue.pop_front();
            if next.is_none() {
                // Under the lock: a call from now on starts a new task.
                out.serving = false;
                serving.done = true;
            }
            next
        };
        let Some((data, reply)) = next else { return };
        // A closed connection fails each at once.
        match c.conn.send_datagram_wait(data).await {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(reason(&e)),
        };
    }
}

/// Dropped with `serve`'s task. If that was dropped unfinished (the shard failed, or a
/// panic), the datagrams still queued are dropped, their callers answered (`Reply`'s drop:
/// `{:error, :closed}`, or `:internal_error` after a panic), and a later call starts anew.
/// (Once `done`, the queue may already be a new task's.)
struct Serving {
    c: ResourceArc<ConnRes>,
    done: bool,
}

impl Drop for Serving {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let dropped = {
            let mut out = lock(&self.c.dgram_out);
            out.serving = false;
            std::mem::take(&mut out.queue)
        };
        // Answered outside the lock.
        drop(dropped);
    }
}

/// Why Quinn refused a datagram.
fn reason(e: &quinn::SendDatagramError) -> Reason {
    use quinn::SendDatagramError::*;
    match e {
        // The peer did not turn datagram reception on.
        UnsupportedByPeer => unsupported_by_peer().into(),
        // This end was made without `datagram_receive_enabled`: Quinn sends datagrams only on a
        // connection that accepts them.
        Disabled => datagrams_disabled().into(),
        // Over the peer's limit or the path's packet size (`dgram_max_len`).
        TooLarge => too_large().into(),
        ConnectionLost(why) => error::connection(why),
    }
}

fn err<'a>(env: Env<'a>, reason: impl Encoder) -> Term<'a> {
    (atoms::error(), reason).encode(env)
}
