//! QUIC datagrams (RFC 9221): unreliable, unordered messages on a connection, beside its
//! streams. Each is sent in one packet or not at all; none is retransmitted.
//!
//! Datagrams are opt-in (`datagram_receive_enabled`, off by default as in quicer). Only then does
//! the connection tell its peer that it accepts datagrams, and a reader task on the
//! connection's shard hands each one to the owner of the moment as `{quic, Bin, C, 0}`, after a
//! first `{quic, dgram_state_changed, C, #{dgram_send_enabled, dgram_max_len}}` saying whether
//! the peer accepts them in turn. Nothing follows `closed` (`ConnRes::tell_owner`). Between
//! the network and the reader, Quinn keeps at most its receive buffer's worth (1.25 MB),
//! dropping the oldest when the reader falls behind; the reader forwards each datagram as it
//! comes, as a stream in `active: true` does, so a process that cannot keep up should not turn
//! reception on. Quinn sends datagrams only on a connection that accepts them too (MsQuic lets
//! one that does not send), so the option is needed at both ends.
//!
//! Sending (`conn_send_dgram`) waits, in the calling process, for room in Quinn's bounded send
//! buffer (1 MiB) when the connection's congestion window holds datagrams back, instead of
//! letting Quinn drop the oldest queued ones to make room: a sender that outruns the path is
//! slowed down, and what it was told was queued is sent.
use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use rustler::{Binary, Encoder, Env, ResourceArc, Term};

use crate::atoms;
use crate::connection::ConnRes;
use crate::contain;
use crate::counters::{self, Live};
use crate::error::{self, Reason};
use crate::executor;
use crate::inline_watch;
use crate::messages::Reply;

rustler::atoms! { dgram_state_changed, dgram_send_enabled, dgram_max_len, unsupported_by_peer, too_large, datagrams_disabled, wait }

/// No QUIC packet carries more (a UDP payload is at most 65,527 bytes): anything larger is
/// refused before it is copied.
const MAX_DATAGRAM: usize = 65_535;

/// Starts the reader of a connection whose owner receives datagrams. It holds the connection
/// until the connection has ended and Quinn's buffered datagrams are drained.
pub fn start_reader(res: &ResourceArc<ConnRes>) {
    res.shard.spawn(read(res.clone()));
}

async fn read(res: ResourceArc<ConnRes>) {
    let _task = Live::new(&counters::TASKS);
    // Runs on the shard, so asking Quinn never waits for its driver on another thread.
    let max = res.conn.max_datagram_size();
    ConnRes::tell_owner(&res, move |e, c| state_changed_msg(e, c, max));
    // Quinn hands out what it buffered before the connection ended, then the error.
    while let Ok(data) = res.conn.read_datagram().await {
        ConnRes::tell_owner(&res, move |e, c| {
            let mut bin = rustler::NewBinary::new(e, data.len());
            bin.as_mut_slice().copy_from_slice(&data);
            (atoms::quic(), Binary::from(bin), c, 0u32).encode(e)
        });
    }
}

/// quicer's `{quic, dgram_state_changed, C, #{dgram_send_enabled, dgram_max_len}}`: whether
/// the peer accepts datagrams, and the largest one this end may send it now (0 if none). The
/// largest can grow later, as Quinn finds the path takes larger packets.
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
    if c.shard.failed() {
        return err(env, atoms::closed());
    }
    let data = Bytes::copy_from_slice(data.as_slice());
    executor::inline(env, inline_watch::watch_on(&c.conn), || match c.shard.claim() {
        Some(_claim) => send_now(env, &c, data, tag),
        None => send_later(env, &c, data, tag),
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

/// Sends the datagram from a task on the connection's shard, once Quinn's send buffer has
/// room, and answers `{Tag, Result}`. Returns `:wait`.
fn send_later<'a>(env: Env<'a>, c: &ResourceArc<ConnRes>, data: Bytes, tag: Term<'a>) -> Term<'a> {
    let reply = Reply::new(env.pid(), tag);
    let c = c.clone();
    c.shard.clone().spawn(async move {
        let _task = Live::new(&counters::TASKS);
        match c.conn.send_datagram_wait(data).await {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(reason(&e)),
        };
    });
    wait().encode(env)
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
