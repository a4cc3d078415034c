//! Streams: one resource per QUIC stream, with a reader task and a writer task.
//!
//! Receiving is driven by demand. The reader task reads from Quinn only while our buffer is
//! below a fixed bound (one coalesced read of `MAX_CHUNK` bytes in active mode;
//! the stream's `read_ahead` bytes, or the length a pending `recv` asked for, in passive mode), and
//! in active mode only once what it holds was delivered; when the owner does not take data,
//! Quinn's receive buffer fills, the stream's flow-control window closes, and the peer's sends
//! stall. Nothing grows without bound. (A passive stream reads ahead so that `recv` can answer
//! from the buffer within the NIF call.)
//!
//! Every message about the stream is sent while holding the stream's state lock, so changing
//! the owner is atomic with respect to deliveries: a message goes either to the old owner
//! (before the change) or to the new one (after it).
//!
//! Sending puts data (without copying large binaries) into an ordered queue that the writer
//! task hands to Quinn as flow-control credit allows. The NIF bodies call into Quinn's
//! connection only while holding its shard (see `executor::Shard::claim`): Quinn's driver holds
//! the connection lock while it processes and encrypts whole batches of packets, and a
//! scheduler waiting on that lock stalls every process on it (the timer test in
//! receive_modes_test measured p95 lateness growing from ~4 ms to 16-30 ms when sends wrote
//! into Quinn from the NIF while the driver ran elsewhere). So a small send with nothing queued
//! before it hands its data to Quinn itself when the shard is free (`write_now`), and otherwise
//! queues it for the writer; the NIFs that wake a stream's tasks (`send`, `recv`, `setopt
//! active`, shutdown, close) then run them, and the Quinn driver they wake, on the calling
//! thread when the connection's shard is free (see `executor`): serialised with the driver, so
//! no lock is contended, and bounded in time. Blocking `send` returns once at most `SEND_AHEAD`
//! bytes wait for Quinn, its own included, or, when it finishes the stream, once Quinn has the
//! FIN (waiting for its reply until then); the fire-and-forget `async_send` data in the queue
//! is bounded by `ASYNC_QUEUE_LIMIT` bytes.
use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::Future;
use std::pin::pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use rustler::{Binary, Encoder, Env, LocalPid, NifResult, OwnedEnv, Resource, ResourceArc, Term};

use crate::atoms;
use crate::connection::ConnRes;
use crate::contain::{self, Contained};
use crate::counters::{self, Live};
use crate::error::{self, Reason};
use crate::executor::{self, TaskWaker};
use crate::inline_watch;
use crate::messages::{self, Reply};
use crate::options::{self, Active};
use crate::owner::{Owned, Owner};
use crate::received;
use crate::runtime;
use crate::util::lock;

/// Largest data message we build from coalesced reads. Large messages amortise the per-message
/// cost (about a microsecond each) over tens of KiB instead of one 1200-byte packet.
pub const MAX_CHUNK: usize = 64 * 1024;

/// How far a passive stream's reader reads ahead of `recv`, and the most a `recv` of length 0
/// returns, unless the stream's `read_ahead` option says otherwise. Reading ahead lets the
/// reader fetch the next data while the owner handles what `recv` just returned (with a single
/// 64 KiB chunk the two took turns and most `recv`s waited for the reader); returning up to
/// this much at once means fewer `recv` calls, each a possible wake-up (256 KiB against one
/// 64 KiB chunk: 300-350 against 240-300 MiB/s on 512 MiB transfers). 512 KiB goes with the
/// larger stream window (see `flow::STREAM_RECV_WINDOW`): the receiving process gets the CPU
/// in spells, a few milliseconds apart while the runtime's workers are busy, and drains as much
/// per spell as each `recv` returns; the window lets the sender go on meanwhile. Neither
/// helps alone: in 1 GiB passive transfers (eight fresh-VM rounds, macula/Quinn by median)
/// 0.66x with 256 KiB and Quinn's 1.25 MB window, 0.67x with 1 MiB alone, 0.66x with a 4 MiB
/// window alone, 0.80x with 512 KiB and 2.5 MiB (0.75-0.78x with 1 MiB and 2.5-8 MiB).
/// What a stream's owner has not read is bounded by this on top of the window; the stream's
/// `read_ahead` option sets it lower (or higher) per stream.
pub const PASSIVE_READ_AHEAD: usize = 8 * MAX_CHUNK;

/// Bytes of `async_send` data that may wait in a stream's queue before `async_send` refuses
/// more with `{:error, :send_queue_full}`. Blocking `send` is bounded by its caller waiting.
pub const ASYNC_QUEUE_LIMIT: usize = 16 * 1024 * 1024;

/// A blocking `send` returns once its data is queued and no more than this many bytes of the
/// stream's data, its own included, wait for Quinn to take them (`:gen_tcp` likewise returns
/// once the data is below the port queue's high watermark); one that finishes the stream, once
/// Quinn has all of it and the FIN. Waiting until Quinn had taken all
/// of it left a gap at every send: the writer ran dry while the answer went to the sending
/// process and its next send came back, and a 1 GiB transfer in 1 MiB sends ran 6% slower
/// (14% with the receiving side's messages taken out). Two of `send/2`'s 1 MiB pieces: one
/// being taken while the next waits.
pub const SEND_AHEAD: usize = 2 * 1024 * 1024;

/// Largest send whose Quinn work (hand over, encrypt, transmit) the sending process does itself,
/// inline (see `executor`). Small messages are bound by latency, which the thread hand-off
/// dominated; large ones by throughput, better served by a runtime worker encrypting in parallel
/// while the schedulers stay free for other processes. Measured with the timer test in
/// receive_modes_test (8 processes sending 256 KiB pieces): with every send inline, p95
/// lateness went over its 30 ms bound in one full-suite run of about a dozen.
pub const INLINE_SEND_MAX: usize = 16 * 1024;

/// quicer's receive flag for the chunk that ends the stream.
const RECV_FLAG_FIN: u32 = 2;

/// How the receive side ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RecvEnd {
    /// The peer finished the stream (FIN).
    Fin,
    /// The peer reset the stream with an application error code.
    Reset(u64),
    /// We stopped reading (close, abort, owner exit).
    Stopped,
    /// The connection ended.
    Lost,
}

/// A message about the stream (given as the argument), built when sent: so one held during a
/// handoff's pause does not keep the stream alive.
type Held = Box<dyn for<'a> FnOnce(Env<'a>, ResourceArc<StreamRes>) -> Term<'a> + Send>;

/// A passive `recv` waiting for data.
struct RecvRequest {
    reply: Reply,
    len: usize,
}

struct State {
    owner: Owner,
    active: Active,
    /// The `read_ahead` option: how far a passive stream reads ahead of `recv`.
    read_ahead: usize,
    /// `handoff_stream` paused delivery and will restore the mode once it has forwarded the old
    /// owner's queued messages, unless the new owner chooses a mode (or calls `recv`) first:
    /// then its choice stands.
    handoff_paused: bool,
    /// The mode before the handoff's pause, for `stream_handoff_abandoned`.
    paused_from: Active,
    /// `stream_closed` and `peer_receive_aborted` held back while `handoff_paused` (no mode
    /// holds them back otherwise): sent to the new owner as the pause ends, after the messages
    /// the old owner forwarded, as quicer buffers them during a handoff.
    held: Vec<Held>,
    /// Data read from Quinn and not yet delivered, in order.
    buf: VecDeque<Bytes>,
    buffered: usize,
    recv_end: Option<RecvEnd>,
    /// The end was reported to the owner (message or `recv` result).
    end_reported: bool,
    recv_request: Option<RecvRequest>,
    /// A request to stop reading, with the code to send (STOP_SENDING).
    stop_recv: Option<u64>,
    /// A request to reset the send side, with the code to send (RESET_STREAM).
    reset_send: Option<u64>,
    /// `reset_send` was asked for by the owner's exit (`owner_down`), not by a shutdown: the
    /// writer drops it once Quinn has the FIN, so that a process that sends its last data and
    /// exits does not have the stream reset under that data while it waits to be acknowledged.
    reset_on_exit: bool,
    /// After `close/1`: the owner hears nothing more about this stream.
    silenced: bool,
    recv_done: bool,
    send_done: bool,
    closed_sent: bool,
    conn_lost: bool,
    /// Why the connection ended, when the reader found it so (`recv` reports it).
    lost_reason: Option<Reason>,
    peer_reset_code: Option<u64>,
    /// Test hook: the reader panics when it next wakes.
    #[cfg(feature = "test_hooks")]
    debug_panic: bool,
    /// Test hook: the writer panics when it next wakes.
    #[cfg(feature = "test_hooks")]
    debug_panic_writer: bool,
}

/// The sending side, shared by the send NIFs (which queue) and the writer task (which hands the
/// queue to Quinn under this lock).
struct SendSide {
    /// Taken (and dropped) by the writer task when the send side ends.
    stream: Option<Contained<quinn::SendStream>>,
    /// What Quinn could not take yet, in order.
    queue: VecDeque<SendCmd>,
    /// Bytes of `async_send` data in `queue`.
    queued: usize,
    /// Bytes ever queued, and ever taken by Quinn (or given up on): where in the stream a send's
    /// data ends, and how far Quinn has got. What lies between is `pending()`.
    queued_total: u64,
    taken_total: u64,
    /// Blocking sends not answered yet, and `send_complete`s not sent yet, in order of the
    /// `taken_total` at which each is answered (see `SEND_AHEAD`; `u64::MAX` for a send that
    /// finishes the stream, answered once Quinn has the FIN).
    waiting: VecDeque<(u64, Reply)>,
    /// Why the send side ended, for sends attempted after it did.
    ended: Option<Reason>,
    /// A FIN is queued (a send that finishes the stream, or a graceful shutdown): later sends
    /// are refused with `closed`, as once the side has ended; queued behind the FIN they would
    /// be dropped unsent.
    finishing: bool,
}

impl SendSide {
    /// Bytes of data in `queue` (mirrored in the connection's `send_pend`).
    fn pending(&self) -> usize {
        (self.queued_total - self.taken_total) as usize
    }

    /// Gives up on everything queued (it will never be sent); returns how many bytes that was,
    /// for `send_pend`.
    fn give_up_pending(&mut self) -> usize {
        let n = self.pending();
        self.taken_total = self.queued_total;
        n
    }
}

pub struct StreamRes {
    pub conn: ResourceArc<ConnRes>,
    pub id: u64,
    pub bidi: bool,
    /// True when this side opened the stream.
    pub local: bool,
    state: Mutex<State>,
    /// The reader's and the writer's wakers, for the NIFs that give them work.
    wake_reader: TaskWaker,
    wake_writer: TaskWaker,
    /// Quinn's receive side, `None` for a send-only stream; taken when the reader ends.
    recv_stream: Option<Mutex<Option<Contained<quinn::RecvStream>>>>,
    /// `None` for a receive-only stream.
    send: Option<Mutex<SendSide>>,
    _live: Live,
}

enum SendCmd {
    /// `is_async` for `async_send` data (counted in `SendSide::queued`); a blocking send's
    /// caller waits in `SendSide::waiting` when it has to.
    Data { bytes: Bytes, fin: bool, is_async: bool },
    Finish,
}

#[rustler::resource_impl]
impl Resource for StreamRes {}

impl Owned for StreamRes {
    fn describe(&self) -> String {
        let st = lock(&self.state);
        format!(
            "stream {} ({}, opened by {}) of the connection on {}: recv_done={} send_done={} \
             closed_sent={} conn_lost={} silenced={} end_reported={} stop_recv={:?} reset_send={:?} buffered={}",
            self.id,
            if self.bidi { "bidirectional" } else { "unidirectional" },
            if self.local { "this side" } else { "the peer" },
            self.conn.local_bound,
            st.recv_done,
            st.send_done,
            st.closed_sent,
            st.conn_lost,
            st.silenced,
            st.end_reported,
            st.stop_recv,
            st.reset_send,
            st.buffered
        )
    }

    fn owner_down(this: &ResourceArc<Self>, pid: LocalPid) {
        // The owner exited: abort both directions (code 0) so the peer is not left waiting, and
        // let the tasks end, which frees the stream.
        let mut st = lock(&this.state);
        if st.owner.pid != pid {
            return;
        }
        st.silenced = true;
        st.stop_recv.get_or_insert(0);
        if st.reset_send.is_none() {
            st.reset_send = Some(0);
            st.reset_on_exit = true;
        }
        drop(st);
        this.wake_reader.wake();
        this.wake_writer.wake();
    }
}

impl StreamRes {
    /// Creates a stream resource owned by `owner`, and starts its tasks, announced by
    /// `announce(res, false)`. If `owner` has exited, the stream goes to `orphan_to` instead,
    /// passive, announced by `announce(res, true)`. Returns `None` when neither is alive, or
    /// `announce` refuses the stream by returning false (the stream is then aborted, silently,
    /// and its owner's entry let go as it closes), or the connection is broken by a panic
    /// inside Quinn (see `connection`). (A process that has just exited counts as alive until
    /// the VM has told us, through its monitor: its stream is then aborted as its owner's
    /// are.)
    ///
    /// `announce` runs (for a live owner) before the tasks start: a message it sends, such as
    /// `new_stream`, is then queued before any data message of the stream. Messages sent from
    /// different threads are not otherwise ordered, and the receive task may run on another.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        env: Option<Env>,
        conn: ResourceArc<ConnRes>,
        send: Option<quinn::SendStream>,
        recv: Option<quinn::RecvStream>,
        owner: LocalPid,
        orphan_to: Option<LocalPid>,
        opts: options::Stream,
        announce: impl FnOnce(&ResourceArc<StreamRes>, bool) -> bool,
    ) -> Option<ResourceArc<StreamRes>> {
        // Contained first: on a poisoned connection even `side` below panics (see `contain`),
        // and the handles are dropped as this returns.
        let send = send.map(|s| Contained::new(s, &conn.conn));
        let recv = recv.map(|r| Contained::new(r, &conn.conn));
        let side = contain::quietly(|| conn.conn.side())?;
        let (id, local) = match (&send, &recv) {
            (Some(s), _) => (s.id(), s.id().initiator() == side),
            (None, Some(r)) => (r.id(), r.id().initiator() == side),
            (None, None) => return None,
        };
        let bidi = send.is_some() && recv.is_some();
        let has_send = send.is_some();
        let has_recv = recv.is_some();
        let res = ResourceArc::new(StreamRes {
            conn,
            id: id.index() * 4 + stream_id_low_bits(id),
            bidi,
            local,
            state: Mutex::new(State {
                owner: Owner::unmonitored(owner),
                active: opts.active,
                read_ahead: opts.read_ahead,
                buf: VecDeque::new(),
                buffered: 0,
                recv_end: None,
                end_reported: !has_recv,
                recv_request: None,
                stop_recv: None,
                reset_send: None,
                reset_on_exit: false,
                silenced: false,
                handoff_paused: false,
                paused_from: opts.active,
                held: Vec::new(),
                recv_done: !has_recv,
                send_done: send.is_none(),
                closed_sent: false,
                conn_lost: false,
                lost_reason: None,
                peer_reset_code: None,
                #[cfg(feature = "test_hooks")]
                debug_panic: false,
                #[cfg(feature = "test_hooks")]
                debug_panic_writer: false,
            }),
            wake_reader: TaskWaker::default(),
            wake_writer: TaskWaker::default(),
            recv_stream: recv.map(|r| Mutex::new(Some(r))),
            send: send.map(|stream| {
                Mutex::new(SendSide {
                    stream: Some(stream),
                    queue: VecDeque::new(),
                    queued: 0,
                    queued_total: 0,
                    taken_total: 0,
                    waiting: VecDeque::new(),
                    ended: None,
                    finishing: false,
                })
            }),
            _live: Live::new(&counters::STREAMS),
        });
        let mut orphan = false;
        let mut monitored = Owner::monitor(env, owner, &res);
        if let (None, Some(fallback)) = (&monitored, orphan_to) {
            monitored = Owner::monitor(env, fallback, &res);
            orphan = monitored.is_some();
        }
        let alive = monitored.is_some();
        {
            // The owner is in place before `announce`: whoever hears of the stream may call on
            // it at once.
            let mut st = lock(&res.state);
            if let Some(o) = monitored {
                st.owner = o;
            }
            if orphan {
                st.active = Active::Off;
            }
        }
        // Nobody alive to own it, or `announce` refused it (its connection is over for the
        // owner): nobody will hear of the stream, and it is stopped at once.
        let alive = alive && announce(&res, orphan);
        if !alive {
            let mut st = lock(&res.state);
            st.silenced = true;
            st.stop_recv = Some(0);
            st.reset_send = Some(0);
        }
        if has_recv {
            res.conn.shard.spawn(recv_loop(res.clone()));
        }
        if has_send {
            res.conn.shard.spawn(send_loop(res.clone()));
        }
        alive.then_some(res)
    }

}

impl StreamRes {
    pub fn owner_pid(&self) -> LocalPid {
        lock(&self.state).owner.pid
    }
}

/// The stream id as QUIC numbers it (low two bits: initiator and direction).
fn stream_id_low_bits(id: quinn::StreamId) -> u64 {
    let initiator = match id.initiator() {
        quinn::Side::Client => 0,
        quinn::Side::Server => 1,
    };
    let dir = match id.dir() {
        quinn::Dir::Bi => 0,
        quinn::Dir::Uni => 2,
    };
    initiator | dir
}

// ---------------------------------------------------------------------------------------------
// Receiving

/// What one read from Quinn produced.
enum ReadOutcome {
    /// Data (possibly none), appended to the buffer: how many bytes, and whether the stream
    /// ended right after it.
    Data(usize, bool),
    Reset(u64),
    /// The connection ended: why, as a send on it reports it.
    Lost(Reason),
}

/// Takes whatever Quinn has available now, up to `max` bytes; pending only if nothing is.
///
/// Quinn hands out data in packet-sized chunks; this appends every chunk that is already
/// available to `into` (the stream's buffer: no copy, and no vector of its own per read, which
/// with ~50 chunks per 64 KiB grew by reallocation several times per read), and also notices a
/// FIN that arrived with them, so the last data message can carry the FIN flag. On `Pending`,
/// Quinn keeps `cx`'s waker; so it does when data comes back because Quinn had no more
/// (`armed`, the second value).
fn poll_available(
    recv: &mut quinn::RecvStream,
    into: &mut VecDeque<Bytes>,
    max: usize,
    cx: &mut Context,
) -> Poll<(ReadOutcome, bool)> {
    let mut total = 0usize;
    let mut got = false;
    loop {
        let want = max.saturating_sub(total).max(1);
        let step = pin!(recv.read_chunk(want, true)).poll(cx);
        match step {
            Poll::Ready(Ok(Some(chunk))) => {
                total += chunk.bytes.len();
                into.push_back(chunk.bytes);
                got = true;
                if total >= max {
                    return Poll::Ready((ReadOutcome::Data(total, false), false));
                }
            }
            Poll::Ready(Ok(None)) => return Poll::Ready((ReadOutcome::Data(total, true), false)),
            // Data read before an error is still delivered; the error shows on the next read.
            Poll::Ready(Err(_)) if got => return Poll::Ready((ReadOutcome::Data(total, false), false)),
            Poll::Ready(Err(quinn::ReadError::Reset(code))) => {
                return Poll::Ready((ReadOutcome::Reset(code.into_inner()), false))
            }
            Poll::Ready(Err(quinn::ReadError::ConnectionLost(why))) => {
                return Poll::Ready((ReadOutcome::Lost(error::connection(&why)), false))
            }
            Poll::Ready(Err(_)) => return Poll::Ready((ReadOutcome::Lost(atoms::closed().into()), false)),
            Poll::Pending if got => return Poll::Ready((ReadOutcome::Data(total, false), true)),
            Poll::Pending => return Poll::Pending,
        }
    }
}

/// Ends the receive side when the reader task ends, however it ends: nobody may be left
/// waiting in `recv` once the reader is gone, and no later `recv` may wait for it. After a
/// panic (a bug) the stream's receive side is closed and a pending `recv` gets
/// `{:error, :internal_error}`.
struct ReaderExit(ResourceArc<StreamRes>);

impl Drop for ReaderExit {
    fn drop(&mut self) {
        let res = &self.0;
        let mut st = lock(&res.state);
        // After a panic Quinn's stream is still here: let it go (which stops it).
        let recv = res.recv_stream.as_ref().and_then(|rs| lock(rs).take());
        drop(recv);
        let pending = st.recv_request.take();
        if !st.recv_done {
            // Only a panic gets here: every normal exit finishes the receive side first.
            st.recv_end.get_or_insert(RecvEnd::Stopped);
            st.buf.clear();
            st.buffered = 0;
            st.end_reported = true;
            finish_recv(res, &mut st);
        }
        let reason = end_reason(&st);
        drop(st);
        if let Some(req) = pending {
            if runtime::after_panic() {
                // Dropped unanswered, it answers `{:error, :internal_error}`.
                drop(req);
            } else {
                req.reply.error(reason);
            }
        }
    }
}

/// Records what a read produced.
fn absorb(st: &mut State, outcome: ReadOutcome) {
    match outcome {
        ReadOutcome::Data(bytes, fin) => {
            st.buffered += bytes;
            if fin {
                st.recv_end = Some(RecvEnd::Fin);
            }
        }
        ReadOutcome::Reset(code) => {
            st.recv_end = Some(RecvEnd::Reset(code));
            st.peer_reset_code = Some(code);
        }
        ReadOutcome::Lost(why) => {
            st.recv_end = Some(RecvEnd::Lost);
            st.lost_reason = Some(why);
            st.conn_lost = true;
        }
    }
}

/// Reads up to `max` bytes from Quinn into the buffer, if Quinn has any; ready with whether
/// Quinn kept `cx`'s waker (see `poll_available`). Only the reader task reads (the NIFs answer
/// from the buffer), holding the state lock and then the stream's lock (the order every path
/// that takes both uses).
fn read_locked(res: &StreamRes, st: &mut State, max: usize, cx: &mut Context) -> Poll<bool> {
    let Some(rs) = &res.recv_stream else { return Poll::Ready(false) };
    let mut guard = lock(rs);
    let Some(recv) = guard.as_mut() else { return Poll::Ready(false) };
    match poll_available(recv, &mut st.buf, max, cx) {
        Poll::Ready((outcome, armed)) => {
            absorb(st, outcome);
            Poll::Ready(armed)
        }
        Poll::Pending => Poll::Pending,
    }
}

/// The reader task. Its `ReaderExit` exists before the task first runs, as the writer's does
/// (see `send_loop`): a task dropped without ever running still ends the receive side, so the
/// stream can close.
fn recv_loop(res: ResourceArc<StreamRes>) -> impl Future<Output = ()> + Send {
    let exit = ReaderExit(res.clone());
    async move { read_until_ended(res, exit).await }
}

async fn read_until_ended(res: ResourceArc<StreamRes>, _exit: ReaderExit) {
    let _task = Live::new(&counters::TASKS);
    // Before the first look at the state: a NIF that changes it afterwards finds the waker.
    res.wake_reader.bind().await;
    // The last read, in this same run of the loop, ended with Quinn keeping the task's waker
    // (it had no more data). Quinn then wakes the task when more comes, and the next read can
    // wait for that instead of asking again at once (a read takes Quinn's connection lock and
    // registers the waker anew: one per message delivered). Only valid until the task next
    // waits: a wake-up it takes, whoever made it, may have been Quinn's.
    let mut armed = false;
    loop {
        // Taken at the top, so that every path below that waits without reading clears it.
        let mut skip = std::mem::take(&mut armed);
        let want = {
            let mut st = lock(&res.state);
            #[cfg(feature = "test_hooks")]
            if st.debug_panic {
                panic!("macula_quic: deliberate panic in a stream reader (debug_panic_reader/1)");
            }
            if let Some(code) = st.stop_recv.take() {
                if let Some(mut recv) = res.recv_stream.as_ref().and_then(|rs| lock(rs).take()) {
                    let _ = recv.stop(code.try_into().unwrap_or(quinn::VarInt::from_u32(0)));
                }
                if st.recv_end.is_none() {
                    st.recv_end = Some(RecvEnd::Stopped);
                }
                // Whatever was buffered is discarded: the owner asked for no more.
                st.buf.clear();
                st.buffered = 0;
                finish_recv(&res, &mut st);
                break;
            }
            // A large answer to a waiting `recv` is not built on a scheduler (see
            // `INLINE_COPY_MAX`): when this runs inside a call, the runtime takes over first.
            if executor::in_inline() && st.recv_request.as_ref().is_some_and(|r| large_answer(&st, r.len)) {
                None
            } else {
                deliver(&res, &mut st);
                if st.recv_done {
                    break;
                }
                Some(wanted_bytes(&st))
            }
        };
        let Some(want) = want else {
            executor::defer_to_runtime().await;
            continue;
        };
        if want.is_none() {
            // Until a NIF gives the reader something to do.
            executor::until_woken(false, |_| Poll::<()>::Pending).await;
            continue;
        }
        // Reads (unless Quinn is known to have nothing), and when Quinn has nothing, waits for it
        // (or for a NIF's wake-up) and reads once more. The wanted amount is computed again under
        // the lock: `stream_recv` may have taken data since.
        let read = executor::until_woken(true, |cx| {
            if std::mem::take(&mut skip) {
                return Poll::Pending;
            }
            let mut st = lock(&res.state);
            match wanted_bytes(&st) {
                Some(max) => read_locked(&res, &mut st, max, cx),
                None => Poll::Ready(false),
            }
        })
        .await;
        // `None`: the read after the wake-up found nothing, so Quinn keeps the waker again.
        armed = read.unwrap_or(true);
    }
    // Let Quinn's stream go now (dropping it stops it if it has not ended), not when the
    // resource is garbage collected. `_exit` answers a pending `recv` as it drops.
    let recv = res.recv_stream.as_ref().and_then(|rs| lock(rs).take());
    drop(recv);
}

/// How many more bytes the reader should fetch now, or `None` when it should wait.
///
/// A passive stream reads ahead (its `read_ahead`) even without a pending `recv`, so that
/// `recv` usually finds data already buffered and answers within the NIF call, instead of
/// waking the reader and waiting for its reply. An active stream holds at most one `MAX_CHUNK`.
fn wanted_bytes(st: &State) -> Option<usize> {
    if st.recv_end.is_some() {
        return None;
    }
    let target = match (&st.active, &st.recv_request) {
        (Active::Off, Some(req)) if req.len > 0 => req.len.max(st.read_ahead),
        (Active::Off, _) => st.read_ahead,
        _ => MAX_CHUNK,
    };
    if st.active != Active::Off && st.buffered > 0 {
        // Deliverable already; `deliver` runs again before the next read.
        return None;
    }
    if st.recv_request.as_ref().is_some_and(|r| r.len == 0) && st.buffered > 0 {
        return None;
    }
    (st.buffered < target).then(|| target - st.buffered)
}

/// Takes up to `max` bytes of whole chunks from the buffer (splitting the last one only when
/// `exact` asks for exactly `max` bytes).
fn take(st: &mut State, max: usize, exact: bool) -> Vec<Bytes> {
    let mut out = Vec::new();
    take_into(st, max, exact, &mut out);
    out
}

/// `take` into `out` (empty), which keeps its capacity for the next time.
fn take_into(st: &mut State, max: usize, exact: bool, out: &mut Vec<Bytes>) {
    let mut n = 0;
    while let Some(front) = st.buf.front_mut() {
        let room = max - n;
        if room == 0 {
            break;
        }
        if front.len() <= room {
            n += front.len();
            out.push(st.buf.pop_front().unwrap_or_default());
        } else if exact || out.is_empty() {
            out.push(front.split_to(room));
            n += room;
        } else {
            break;
        }
    }
    st.buffered -= n;
}

/// The most a passive `recv` of `len` bytes takes from the buffer now (`len`, or for `len` 0
/// `read_ahead`), or `None` when it has to wait for more.
fn recv_limit(st: &State, len: usize) -> Option<usize> {
    if st.buf.is_empty() || !(len == 0 || st.buffered >= len || st.recv_end.is_some()) {
        return None;
    }
    Some(if len == 0 { st.read_ahead } else { len })
}

/// What a passive `recv` of `len` bytes can take from the buffer now: exactly `len` bytes (fewer
/// only at the end of the stream), or for `len` 0 whatever is buffered, up to `read_ahead`.
/// `None` when it has to wait for more. Shared by the `recv` NIF and the reader answering a
/// waiting `recv`.
fn take_for_recv(st: &mut State, len: usize) -> Option<Vec<Bytes>> {
    let limit = recv_limit(st, len)?;
    Some(take(st, limit, len != 0))
}

/// The most one `recv` returns (`:gen_tcp`'s limit too): its bytes are buffered until they are
/// all there and then copied into one binary.
const MAX_RECV: usize = 64 * 1024 * 1024;

/// The largest `recv` answer built where the stream's work happens to run, which may be a
/// scheduler (the `recv` call itself, or another call running the connection's work inline).
/// Copying more takes too long there (64 MiB: 8-40 ms, page faults included): a larger answer
/// is built by the reader on a runtime worker while the caller waits (see
/// `executor::defer_to_runtime`).
const INLINE_COPY_MAX: usize = 1024 * 1024;

/// Would a `recv` of `len` bytes be answered now, with more than `INLINE_COPY_MAX` bytes?
fn large_answer(st: &State, len: usize) -> bool {
    recv_limit(st, len).is_some_and(|limit| limit.min(st.buffered) > INLINE_COPY_MAX)
}

fn ended(st: &State) -> bool {
    st.buf.is_empty() && st.recv_end.is_some()
}

thread_local! {
    /// The chunks of the data message `deliver` is building, kept (empty) between messages with
    /// their capacity. Why: a vector per message (~50 chunks for 64 KiB) grew by reallocation
    /// several times, and glibc's malloc handles blocks over 1 KiB under its arena's lock, for
    /// which the other threads' frees compete; this and the reads straight into the stream's
    /// buffer made bulk transfers ~4% faster (bench/README.md, "Allocation: glibc's arena
    /// locks, and mimalloc").
    static MESSAGE_CHUNKS: RefCell<Vec<Bytes>> = const { RefCell::new(Vec::new()) };
}

/// Delivers buffered data and the end of the stream, as far as the owner's demand allows.
/// Called by the reader task with the state lock held.
fn deliver(res: &ResourceArc<StreamRes>, st: &mut State) {
    loop {
        if st.silenced {
            return;
        }
        if !st.buf.is_empty() && st.active != Active::Off {
            let mut chunks = MESSAGE_CHUNKS.with(|v| std::mem::take(&mut *v.borrow_mut()));
            take_into(st, MAX_CHUNK, false, &mut chunks);
            let flags = if ended(st) && st.recv_end == Some(RecvEnd::Fin) { RECV_FLAG_FIN } else { 0 };
            let pid = st.owner.pid;
            let r = res.clone();
            messages::send(&pid, |e| (atoms::quic(), received::binary(e, &chunks), r, flags).encode(e));
            chunks.clear();
            MESSAGE_CHUNKS.with(|v| *v.borrow_mut() = chunks);
            let (next, spent) = st.active.after_message();
            if spent {
                let r = res.clone();
                messages::send(&pid, move |e| (atoms::quic(), atoms::passive(), r, atoms::undefined()).encode(e));
            }
            st.active = next;
            continue;
        }
        if let Some(req) = st.recv_request.take() {
            if let Some(chunks) = take_for_recv(st, req.len) {
                let kept = chunks.clone();
                if !req.reply.send(move |e| (atoms::ok(), received::binary(e, &chunks)).encode(e)) {
                    // The caller exited while it waited: the data stays, in order, for the
                    // next `recv` (sharing the bytes, not copying them).
                    st.buffered += kept.iter().map(Bytes::len).sum::<usize>();
                    for c in kept.into_iter().rev() {
                        st.buf.push_front(c);
                    }
                }
                continue;
            }
            if ended(st) {
                let reason = end_reason(st);
                req.reply.send(move |e| (atoms::error(), reason).encode(e));
                st.end_reported = true;
                finish_recv(res, st);
                continue;
            }
            st.recv_request = Some(req);
            return;
        }
        if ended(st) && !st.end_reported && st.active != Active::Off {
            let pid = st.owner.pid;
            let r = res.clone();
            match st.recv_end {
                Some(RecvEnd::Fin) => {
                    messages::send(&pid, move |e| (atoms::quic(), atoms::peer_send_shutdown(), r, atoms::undefined()).encode(e));
                }
                Some(RecvEnd::Reset(code)) => {
                    messages::send(&pid, move |e| (atoms::quic(), atoms::peer_send_aborted(), r, code).encode(e));
                }
                _ => {}
            }
            st.end_reported = true;
            finish_recv(res, st);
        }
        return;
    }
}

/// The `recv` error for a drained, ended stream.
fn end_reason(st: &State) -> Reason {
    match st.recv_end {
        Some(RecvEnd::Fin) => atoms::peer_send_shutdown().into(),
        Some(RecvEnd::Reset(code)) => Reason::Code(atoms::peer_send_aborted(), code),
        Some(RecvEnd::Lost) => st.lost_reason.clone().unwrap_or_else(|| atoms::closed().into()),
        _ => atoms::closed().into(),
    }
}

fn finish_recv(res: &ResourceArc<StreamRes>, st: &mut State) {
    st.recv_done = true;
    maybe_closed(res, st);
}

/// The send side is over: `graceful` when the peer acknowledged all of the data and the FIN.
/// The owner hears it as quicer's `send_shutdown_complete`, before `stream_closed`.
fn finish_send(res: &ResourceArc<StreamRes>, st: &mut State, graceful: bool) {
    st.send_done = true;
    if !st.silenced {
        send_or_hold(res, st, Box::new(move |e, r| (atoms::quic(), atoms::send_shutdown_complete(), r, graceful).encode(e)));
    }
    maybe_closed(res, st);
}

/// Sends `stream_closed` once both directions are done, and stops following the owner.
fn maybe_closed(res: &ResourceArc<StreamRes>, st: &mut State) {
    if !(st.recv_done && st.send_done) || st.closed_sent {
        return;
    }
    st.closed_sent = true;
    if !st.silenced {
        // A connection whose Quinn driver panicked (see `connection`) is lost too.
        let conn_lost = st.conn_lost || res.conn.shard.failed();
        let remote = st.peer_reset_code.is_some() || st.recv_end == Some(RecvEnd::Fin);
        let code = st.peer_reset_code.unwrap_or(0);
        send_or_hold(res, st, Box::new(move |e, r| {
            let props = rustler::Term::map_from_pairs(
                e,
                &[
                    (atoms::is_conn_shutdown().encode(e), conn_lost.encode(e)),
                    (atoms::is_app_closing().encode(e), (!remote).encode(e)),
                    (atoms::is_shutdown_by_app().encode(e), true.encode(e)),
                    (atoms::is_closed_remotely().encode(e), remote.encode(e)),
                    (atoms::error().encode(e), code.encode(e)),
                    (atoms::status().encode(e), if conn_lost { atoms::closed() } else { atoms::ok() }.encode(e)),
                ],
            )
            .unwrap_or_else(|_| atoms::undefined().encode(e));
            (atoms::quic(), atoms::stream_closed(), r, props).encode(e)
        }));
    }
    st.owner.release();
}

/// Sends a message that no active mode holds back to the owner, or holds it while a handoff
/// has delivery paused (see `State::held`).
fn send_or_hold(res: &ResourceArc<StreamRes>, st: &mut State, msg: Held) {
    if st.handoff_paused {
        st.held.push(msg);
    } else {
        let r = res.clone();
        messages::send(&st.owner.pid, move |e| msg(e, r));
    }
}

/// Ends a handoff's pause, in the NIF (`env`'s) that ends it: the messages held meanwhile go to
/// the owner of the moment (the new one), unless the stream was silenced meanwhile. Sent from
/// the calling process itself, so that when that is the old owner ending the handoff they
/// follow the messages it has just forwarded.
fn end_pause(env: Env, res: &ResourceArc<StreamRes>, st: &mut State) {
    st.handoff_paused = false;
    for msg in std::mem::take(&mut st.held) {
        if !st.silenced {
            let _ = env.send(&st.owner.pid, msg(env, res.clone()));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Sending

/// Sends at least this long are not copied: the Erlang binary itself is kept alive (by a
/// process-independent environment holding a reference) until Quinn has no more use for it.
/// Below this, copying is cheaper than allocating that environment.
const ZERO_COPY_MIN: usize = 16 * 1024;

/// An Erlang binary's bytes, kept alive by a process-independent environment that holds a
/// reference to it.
struct ErlangBytes {
    _env: OwnedEnv,
    ptr: *const u8,
    len: usize,
}

// SAFETY: the bytes belong to an Erlang refc binary, which is immutable once inspected
// (`enif_inspect_binary` and copying a term both make a writable binary fixed) and lives as
// long as `_env` references it. A process-independent environment may be used and freed from
// any thread; nothing here is touched through shared references except the bytes.
unsafe impl Send for ErlangBytes {}

impl AsRef<[u8]> for ErlangBytes {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: see the `Send` impl: `ptr..ptr+len` stays valid and unchanged while `_env` lives.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

/// The data of a send as `Bytes` Quinn can hold on to until it is acknowledged.
fn payload(env: Env, data: Binary) -> Bytes {
    if data.len() < ZERO_COPY_MIN {
        return Bytes::copy_from_slice(data.as_slice());
    }
    let owned = OwnedEnv::new();
    let saved = owned.save(data.to_term(env));
    let view = owned.run(|e| saved.load(e).decode::<Binary>().ok().map(|b| (b.as_slice().as_ptr(), b.len())));
    match view {
        Some((ptr, len)) if len == data.len() => Bytes::from_owner(ErlangBytes { _env: owned, ptr, len }),
        _ => Bytes::copy_from_slice(data.as_slice()),
    }
}

/// Hands queued data to Quinn, in order, as far as flow control allows. Runs in the writer
/// task with the send lock held; `cx` is the task's, so Quinn wakes the task when it has room
/// again. Pending while there is nothing to write or no room; ready when the send side is done:
/// `Ok` after FIN, or the write error.
fn poll_queue(sd: &mut SendSide, send_pend: &AtomicUsize, cx: &mut Context) -> Poll<Result<(), quinn::WriteError>> {
    let Some(stream) = sd.stream.as_mut() else { return Poll::Ready(Ok(())) };
    loop {
        let Some(front) = sd.queue.front_mut() else { return Poll::Pending };
        if let SendCmd::Data { bytes, is_async, .. } = front {
            if !bytes.is_empty() {
                let before = bytes.len();
                let step = pin!(stream.write_chunks(std::slice::from_mut(bytes))).poll(cx);
                let taken = before - bytes.len();
                if *is_async {
                    sd.queued -= taken;
                }
                sd.taken_total += taken as u64;
                send_pend.fetch_sub(taken, Ordering::Relaxed);
                answer_waiting(&mut sd.waiting, sd.taken_total);
                match step {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Ready(Ok(_)) => continue,
                }
            }
        }
        match sd.queue.pop_front() {
            Some(SendCmd::Data { fin: true, .. } | SendCmd::Finish) => {
                let _ = stream.finish();
                // Before anyone hears of it: a graceful shutdown from now on is `closed`, as
                // once the send side has ended, though the writer waits on for the
                // acknowledgement.
                sd.ended = Some(atoms::closed().into());
                // Quinn has all of it and the FIN: the send that finished the stream (and any
                // before it) may return; its owner can now exit without the stream being reset.
                // (After a graceful shutdown's `Finish` nothing waits any more: every send
                // before it was due by the time its data was taken.)
                answer_waiting(&mut sd.waiting, u64::MAX);
                return Poll::Ready(Ok(()));
            }
            Some(SendCmd::Data { .. }) => {}
            None => return Poll::Pending,
        }
    }
}

/// Adds a reply due once Quinn has taken `due` bytes in all, keeping `waiting` in the order
/// `answer_waiting` needs. A blocking send's is due before all of its data is taken (see
/// `SEND_AHEAD`), a `send_complete`'s after, so a blocking send may be due before the
/// `send_complete` queued ahead of it.
fn wait_for(waiting: &mut VecDeque<(u64, Reply)>, due: u64, reply: Reply) {
    let at = waiting.iter().rposition(|(d, _)| *d <= due).map_or(0, |i| i + 1);
    waiting.insert(at, (due, reply));
}

/// Answers `:ok` to the waiting sends due once Quinn has taken `taken` bytes in all. In order, so
/// each call looks at one entry more than it answers.
fn answer_waiting(waiting: &mut VecDeque<(u64, Reply)>, taken: u64) {
    while waiting.front().is_some_and(|(due, _)| *due <= taken) {
        if let Some((_, r)) = waiting.pop_front() {
            r.ok();
        }
    }
}

/// The writer task: drains the send queue when the NIFs could not hand everything to Quinn
/// themselves, performs resets, and notices the peer stopping the stream (STOP_SENDING) even
/// while nothing is being written.
///
/// Its `WriterExit` exists before the task first runs: a task dropped without ever running (its
/// shard failed first) still ends the send side, answering whoever waits on it. (A
/// `send_complete` waiting there holds the stream, which would otherwise never be freed.)
fn send_loop(res: ResourceArc<StreamRes>) -> impl Future<Output = ()> + Send {
    let exit = WriterExit { res: res.clone(), ended: false, fin_given: false };
    async move { write_until_ended(res, exit).await }
}

async fn write_until_ended(res: ResourceArc<StreamRes>, mut exit: WriterExit) {
    let _task = Live::new(&counters::TASKS);
    let Some(side) = res.send.as_ref() else { return };
    let Some(stopped) = lock(side).stream.as_ref().map(|s| s.stopped()) else {
        // Nothing to end: the send side was ended before the task ran.
        exit.ended = true;
        return;
    };
    let mut stopped = Box::pin(stopped);
    // Before the first look at the state: a NIF that changes it afterwards finds the waker.
    res.wake_writer.bind().await;
    // Once Quinn has the FIN (`exit.fin_given`) the writer only waits for the peer to acknowledge
    // all of the data
    // (`stopped` gives `None`), for `send_shutdown_complete` with `true`. A reset (an abortive
    // shutdown, which QUIC allows until then), STOP_SENDING or the connection's end meanwhile
    // makes it `false`, reported at once as quicer documents it (MsQuic itself waits for the
    // RESET_STREAM's acknowledgement).
    let (failure, graceful): (Reason, bool) = loop {
        #[cfg(feature = "test_hooks")]
        if lock(&res.state).debug_panic_writer {
            panic!("macula_quic: deliberate panic in a stream writer (debug_panic_writer/1)");
        }
        // Once Quinn has the FIN, a reset asked for by the owner's exit is dropped (see
        // `State::reset_on_exit`); one asked for by a shutdown is made.
        let reset = {
            let mut st = lock(&res.state);
            let on_exit = std::mem::take(&mut st.reset_on_exit);
            st.reset_send.take().filter(|_| !(exit.fin_given && on_exit))
        };
        if let Some(code) = reset {
            let mut sd = lock(side);
            // What is queued will never be sent: uncount it before the reset can reach the
            // peer, so `send_pend` never shows it to someone who already heard of the reset.
            res.conn.send_pend.fetch_sub(sd.give_up_pending(), Ordering::Relaxed);
            let code = quinn::VarInt::from_u64(code).unwrap_or(quinn::VarInt::from_u32(0));
            let refused = sd.stream.as_mut().is_some_and(|s| s.reset(code).is_err());
            // After the FIN Quinn refuses a reset only for a stream that is over: the peer had
            // acknowledged everything by then, and `stopped` was about to say so.
            break (atoms::closed().into(), exit.fin_given && refused);
        }
        // Hands the queue to Quinn, then waits for Quinn (credit, the peer's STOP_SENDING or
        // acknowledgement) or a NIF's wake-up; after a wake-up the checks above come first (a
        // reset before more data).
        let step = executor::until_woken(false, |cx| {
            if let Poll::Ready(peer) = stopped.as_mut().poll(cx) {
                return Poll::Ready(Err(peer));
            }
            if exit.fin_given {
                return Poll::Pending;
            }
            poll_queue(&mut lock(side), &res.conn.send_pend, cx).map(Ok)
        })
        .await;
        match step {
            None => continue,
            Some(Err(Ok(None))) if exit.fin_given => break (atoms::closed().into(), true),
            Some(Err(peer)) => break (stopped_reason(&res, peer), false),
            Some(Ok(Ok(()))) => exit.fin_given = true,
            Some(Ok(Err(e))) => break (write_reason(&res, &e), false),
        }
    };
    exit.ended = true;
    let leftover = end_send(&res, side, &failure);
    // The owner hears that the peer stopped reading only now that later sends report it: a
    // send made after the message must not be queued (and, being small, answered `:ok`).
    if let Reason::Code(tag, code) = &failure {
        if *tag == atoms::peer_receive_aborted() {
            notify_receive_aborted(&res, *code);
        }
    }
    // No caller may be left waiting for a send that will never happen.
    for (_, r) in leftover {
        r.error(failure.clone());
    }
    let mut st = lock(&res.state);
    finish_send(&res, &mut st, graceful);
}

/// Ends the send side: records why (later sends report it), gives up what can no longer be
/// sent, and lets Quinn's stream go (dropping it finishes or resets it, as Quinn decides).
/// Returns the sends still waiting, for the caller to answer.
fn end_send(res: &StreamRes, side: &Mutex<SendSide>, why: &Reason) -> VecDeque<(u64, Reply)> {
    let (unsent, leftover, stream) = {
        let mut sd = lock(side);
        sd.ended = Some(why.clone());
        sd.queued = 0;
        res.conn.send_pend.fetch_sub(sd.give_up_pending(), Ordering::Relaxed);
        // Dropped below, outside the lock: large sends hold their Erlang binaries.
        (std::mem::take(&mut sd.queue), std::mem::take(&mut sd.waiting), sd.stream.take())
    };
    drop(stream);
    drop(unsent);
    leftover
}

/// Ends the send side if the writer task ends without doing so itself, which only a panic (a
/// bug, ours or Quinn's) makes it do: the sends waiting in `send/2` and every later send get
/// `{:error, :internal_error}` instead of waiting forever for a writer that is gone, and the
/// stream can still close. (The reader's counterpart is `ReaderExit`.)
struct WriterExit {
    res: ResourceArc<StreamRes>,
    ended: bool,
    /// Quinn has the FIN and all the data: from then on the writer only waits for the peer's
    /// acknowledgement, and a reset here would only throw away a delivery that is probably
    /// complete, so the stream is left to Quinn as it is.
    fin_given: bool,
}

impl Drop for WriterExit {
    fn drop(&mut self) {
        let Some(side) = self.res.send.as_ref().filter(|_| !self.ended) else { return };
        // Reset, not finished: Quinn's stream, dropped as it is, would send a FIN, and the peer
        // would take what it got for the whole of the data. (Unless the FIN was given already.)
        if let Some(s) = lock(side).stream.as_mut().filter(|_| !self.fin_given) {
            contain::quietly(|| s.reset(quinn::VarInt::from_u32(0)));
        }
        // Dropped unanswered, each waiting `Reply` answers by itself: `{:error, :internal_error}`
        // after a panic, `{:error, :closed}` if the task was only dropped (the runtime going
        // away); later sends get the same.
        drop(end_send(&self.res, side, &messages::dropped_reason().into()));
        let mut st = lock(&self.res.state);
        finish_send(&self.res, &mut st, false);
    }
}

/// The peer stopped the stream (STOP_SENDING) or the connection ended while we could send.
fn stopped_reason(res: &ResourceArc<StreamRes>, peer: Result<Option<quinn::VarInt>, quinn::StoppedError>) -> Reason {
    match peer {
        Ok(Some(code)) => Reason::Code(atoms::peer_receive_aborted(), code.into_inner()),
        Ok(None) => atoms::closed().into(),
        Err(_) => {
            lock(&res.state).conn_lost = true;
            // Why the connection ended, as a write that failed on it would report it.
            match res.conn.conn.close_reason() {
                Some(why) => error::connection(&why),
                None => atoms::closed().into(),
            }
        }
    }
}

fn notify_receive_aborted(res: &ResourceArc<StreamRes>, code: u64) {
    let mut st = lock(&res.state);
    if st.silenced {
        return;
    }
    send_or_hold(res, &mut st, Box::new(move |e, r| (atoms::quic(), atoms::peer_receive_aborted(), r, code).encode(e)));
}

fn write_reason(res: &ResourceArc<StreamRes>, e: &quinn::WriteError) -> Reason {
    match e {
        quinn::WriteError::Stopped(code) => Reason::Code(atoms::peer_receive_aborted(), code.into_inner()),
        quinn::WriteError::ConnectionLost(ce) => {
            lock(&res.state).conn_lost = true;
            error::connection(ce)
        }
        _ => atoms::closed().into(),
    }
}

// ---------------------------------------------------------------------------------------------
// NIFs

fn err<'a>(env: Env<'a>, reason: impl Encoder) -> Term<'a> {
    (atoms::error(), reason).encode(env)
}

/// `stream_send(Stream, Binary, Tag | nil | complete, Fin)`. Without a tag (`async_send`):
/// returns `:ok` at once (`{:error, :send_queue_full}` past the async queue limit); with
/// `complete` the caller also gets quicer's `{quic, send_complete, Stream, IsCancelled}` once
/// Quinn has taken all of this data (and the FIN, with `Fin`), or the send side ended first
/// (`async_send/3` with the sync flag). With a tag (blocking
/// `send`): `:ok` when the data fits within `SEND_AHEAD` with what waits before it (and does
/// not finish the stream), else `:wait`, and the caller is answered `{Tag, :ok | {:error,
/// Reason}}` once the queue has drained that far, or Quinn has the FIN (or the send side ended).
#[rustler::nif]
fn stream_send<'a>(env: Env<'a>, s: ResourceArc<StreamRes>, data: Binary<'a>, tag: Term<'a>, fin: bool) -> Term<'a> {
    if data.len() <= INLINE_SEND_MAX {
        executor::inline(env, inline_watch::watch_on(&s.conn), || stream_send_now(env, s, data, tag, fin, true))
    } else {
        stream_send_now(env, s, data, tag, fin, false)
    }
}

/// Queues a send, or with `now` (a small send, whose caller runs the connection's work inline)
/// first tries to hand it to Quinn directly (see `write_now`).
fn stream_send_now<'a>(
    env: Env<'a>,
    s: ResourceArc<StreamRes>,
    data: Binary<'a>,
    tag: Term<'a>,
    fin: bool,
    now: bool,
) -> Term<'a> {
    rustler::atoms! { wait, complete }
    let Some(side) = &s.send else {
        return err(env, atoms::einval());
    };
    let is_async = tag.is_atom();
    let notify = tag == complete().to_term(env);
    let len = data.len();
    let mut sd = lock(side);
    // After the caller's own FIN, `closed` whatever ended the side since (the peer's
    // STOP_SENDING, the connection's end): the send is refused for what the caller did.
    if sd.finishing {
        return err(env, atoms::closed());
    }
    if let Some(reason) = &sd.ended {
        return err(env, reason.clone());
    }
    if is_async && sd.queued > 0 && sd.queued + len > ASYNC_QUEUE_LIMIT {
        return err(env, atoms::send_queue_full());
    }
    let mut bytes = payload(env, data);
    sd.queued_total += bytes.len() as u64;
    // A small send with nothing queued before it goes to Quinn from here; what Quinn does not
    // take (no flow-control credit, an error) is queued for the writer as before.
    if now && !fin {
        sd.taken_total += write_now(&s, &mut sd, &mut bytes) as u64;
        if bytes.is_empty() {
            if notify {
                // From the call itself (this is the caller): it arrives before any later one.
                let _ = env.send(&env.pid(), (atoms::quic(), atoms::send_complete(), &s, false));
            }
            return atoms::ok().encode(env);
        }
    }
    if is_async {
        sd.queued += bytes.len();
    }
    s.conn.send_pend.fetch_add(bytes.len(), Ordering::Relaxed);
    // A blocking send whose data fits within `SEND_AHEAD` with what waits before it is answered
    // now; otherwise the writer answers it once the queue has drained that far. One that
    // finishes the stream waits until Quinn has the FIN: a process that sends its last data and
    // exits must not have the stream reset under that data (see `owner_down`).
    let answered = is_async || (!fin && sd.pending() <= SEND_AHEAD);
    if !answered {
        let due = if fin { u64::MAX } else { sd.queued_total.saturating_sub(SEND_AHEAD as u64) };
        wait_for(&mut sd.waiting, due, Reply::new(env.pid(), tag));
    }
    if notify {
        let due = if fin { u64::MAX } else { sd.queued_total };
        wait_for(&mut sd.waiting, due, Reply::send_complete(env.pid(), s.encode(env)));
    }
    sd.finishing = fin;
    sd.queue.push_back(SendCmd::Data { bytes, fin, is_async });
    drop(sd);
    s.wake_writer.wake();
    if answered { atoms::ok().encode(env) } else { wait().encode(env) }
}

/// Hands `bytes` to Quinn in the calling NIF, when nothing waits in the queue before them and
/// the connection's shard is free here (so no driver holds Quinn's connection lock meanwhile,
/// see `executor::Shard::claim`); returns how many bytes Quinn took (from the front of `bytes`).
///
/// Why: queueing a small send and waking the writer task to hand it over cost, per send, a
/// wake-up, a task poll and the writer's checks and polls (Quinn's `stopped` future among them,
/// under the connection's lock), all on the same thread a moment later. The writer stays asleep
/// when this takes everything; Quinn's own wake-up of the connection's driver still runs the
/// driver inline when the claim ends.
///
/// With no credit Quinn takes nothing, and with an error (the stream stopped or finished, the
/// connection lost) it leaves `bytes` alone: the queue and the writer then handle both as
/// before (the writer registers for Quinn's wake-up when it finds no credit, and reports the
/// error). The waker given here is never used for that: Quinn keeps it only when it takes
/// nothing, and the writer, woken next, replaces it with its own.
fn write_now(s: &StreamRes, sd: &mut SendSide, bytes: &mut Bytes) -> usize {
    if !sd.queue.is_empty() || bytes.is_empty() || s.conn.shard.failed() {
        return 0;
    }
    let Some(stream) = sd.stream.as_mut() else { return 0 };
    let Some(_claim) = s.conn.shard.claim() else { return 0 };
    let before = bytes.len();
    let mut cx = Context::from_waker(Waker::noop());
    let _ = pin!(stream.write_chunks(std::slice::from_mut(bytes))).poll(&mut cx);
    if bytes.is_empty() {
        counters::bump(&counters::DIRECT_WRITES);
    }
    before - bytes.len()
}

/// Queues a FIN after whatever data is queued, unless one is queued already. False when the
/// send side has already ended.
fn queue_finish(s: &StreamRes, side: &Mutex<SendSide>) -> bool {
    let mut sd = lock(side);
    if sd.ended.is_some() {
        return false;
    }
    if !sd.finishing {
        sd.finishing = true;
        sd.queue.push_back(SendCmd::Finish);
    }
    drop(sd);
    s.wake_writer.wake();
    true
}

/// `stream_shutdown(Stream, Flags, Code)` with quicer's flags: GRACEFUL=1 (FIN after queued
/// data), ABORT_SEND=2 (RESET_STREAM), ABORT_RECEIVE=4 (STOP_SENDING), ABORT=6, IMMEDIATE=8.
#[rustler::nif]
fn stream_shutdown<'a>(env: Env<'a>, s: ResourceArc<StreamRes>, flags: u32, code: u64) -> Term<'a> {
    executor::inline(env, inline_watch::watch_on(&s.conn), || stream_shutdown_now(env, s, flags, code))
}

fn stream_shutdown_now<'a>(env: Env<'a>, s: ResourceArc<StreamRes>, flags: u32, code: u64) -> Term<'a> {
    const GRACEFUL: u32 = 1;
    const ABORT_SEND: u32 = 2;
    const ABORT_RECEIVE: u32 = 4;
    const IMMEDIATE: u32 = 8;
    let abort = flags & (ABORT_SEND | ABORT_RECEIVE);
    let valid = flags & !(GRACEFUL | ABORT_SEND | ABORT_RECEIVE | IMMEDIATE) == 0
        && (flags & (GRACEFUL | ABORT_SEND | ABORT_RECEIVE)) != 0
        && !(flags & GRACEFUL != 0 && abort != 0)
        && !(flags & IMMEDIATE != 0 && abort == 0);
    if !valid || quinn::VarInt::from_u64(code).is_err() {
        return err(env, atoms::badarg());
    }
    if flags & GRACEFUL != 0 {
        return match &s.send {
            Some(side) if queue_finish(&s, side) => atoms::ok().encode(env),
            Some(_) => err(env, atoms::closed()),
            None => err(env, atoms::einval()),
        };
    }
    let mut st = lock(&s.state);
    if flags & ABORT_SEND != 0 && s.send.is_some() && !st.send_done {
        st.reset_send = Some(code);
        st.reset_on_exit = false;
        s.wake_writer.wake();
    }
    if flags & ABORT_RECEIVE != 0 && !st.recv_done {
        st.stop_recv = Some(code);
        s.wake_reader.wake();
    }
    atoms::ok().encode(env)
}

/// `stream_close(Stream)`: FIN after queued data, stop receiving, and no more messages to the
/// owner about this stream.
#[rustler::nif]
fn stream_close<'a>(env: Env<'a>, s: ResourceArc<StreamRes>) -> Term<'a> {
    executor::inline(env, inline_watch::watch_on(&s.conn), || stream_close_now(env, s))
}

fn stream_close_now<'a>(env: Env<'a>, s: ResourceArc<StreamRes>) -> Term<'a> {
    if let Some(side) = &s.send {
        queue_finish(&s, side);
    }
    let mut st = lock(&s.state);
    st.silenced = true;
    if !st.recv_done {
        st.stop_recv.get_or_insert(0);
        s.wake_reader.wake();
    }
    atoms::ok().encode(env)
}

/// `stream_setopt_active(Stream, Active)`.
#[rustler::nif]
fn stream_set_active<'a>(env: Env<'a>, s: ResourceArc<StreamRes>, value: Term<'a>) -> Term<'a> {
    executor::inline(env, inline_watch::watch_on(&s.conn), || apply_active(env, s, value, false))
}

/// `stream_handoff_resume(Stream, Active)`: the end of `handoff_stream`, which sets the mode
/// only if the stream is still paused by the handoff. A new owner that already chose a mode,
/// or called `recv`, keeps its choice (restoring over it could leave the stream passive with
/// data waiting and nobody told).
#[rustler::nif]
fn stream_handoff_resume<'a>(env: Env<'a>, s: ResourceArc<StreamRes>, value: Term<'a>) -> Term<'a> {
    executor::inline(env, inline_watch::watch_on(&s.conn), || apply_active(env, s, value, true))
}

/// `stream_handoff_abandoned(Stream)`: the process handing the stream over exited before it
/// ended the pause (`wait_for_handoff/2` saw it go): restores the mode the stream had before,
/// as that process would have, and so sends what was held, unless the pause has ended.
#[rustler::nif]
fn stream_handoff_abandoned<'a>(env: Env<'a>, s: ResourceArc<StreamRes>) -> Term<'a> {
    let previous = options::encode_active(env, lock(&s.state).paused_from);
    executor::inline(env, inline_watch::watch_on(&s.conn), || apply_active(env, s, previous, true))
}

/// Sets the active mode; with `only_if_paused`, only while `handoff_stream` has it paused.
fn apply_active<'a>(env: Env<'a>, s: ResourceArc<StreamRes>, value: Term<'a>, only_if_paused: bool) -> Term<'a> {
    let Some(setting) = options::decode_active(value) else {
        return err(env, error::bad_option("active"));
    };
    let mut st = lock(&s.state);
    if only_if_paused && !st.handoff_paused {
        return atoms::ok().encode(env);
    }
    let Ok(mode) = setting.apply(st.active) else {
        return err(env, error::bad_option("active"));
    };
    end_pause(env, &s, &mut st);
    // `{active, N}` that brings the counter to zero or below turns the stream passive and, as
    // in `:inet`, says so: to the owner (who may not be the caller, as at the end of a
    // handoff), and under the lock, like every message about the stream.
    if setting.ran_out(st.active, mode) {
        let _ = env.send(&st.owner.pid, (atoms::quic(), atoms::passive(), s.clone(), atoms::undefined()));
    }
    st.active = mode;
    if st.active != Active::Off && st.recv_request.is_some() {
        // A pending passive recv cannot coexist with active delivery: it fails with einval.
        if let Some(req) = st.recv_request.take() {
            drop(st);
            req.reply.error(atoms::einval());
            s.wake_reader.wake();
            return atoms::ok().encode(env);
        }
    }
    drop(st);
    s.wake_reader.wake();
    atoms::ok().encode(env)
}

/// `stream_get_active(Stream)`: `true | false | :once | N`.
#[rustler::nif]
fn stream_get_active<'a>(env: Env<'a>, s: ResourceArc<StreamRes>) -> Term<'a> {
    options::encode_active(env, lock(&s.state).active)
}

/// `stream_set_read_ahead(Stream, Bytes)`: the `read_ahead` option. A larger value lets the
/// reader fetch more at once (woken here, run inline when the shard is free); a smaller one
/// takes effect as the owner reads what is already buffered.
#[rustler::nif]
fn stream_set_read_ahead<'a>(env: Env<'a>, s: ResourceArc<StreamRes>, value: Term<'a>) -> Term<'a> {
    let Some(n) = options::decode_read_ahead(value) else {
        return err(env, error::bad_option("read_ahead"));
    };
    executor::inline(env, inline_watch::watch_on(&s.conn), || {
        let mut st = lock(&s.state);
        let grew = n > st.read_ahead;
        st.read_ahead = n;
        drop(st);
        if grew {
            s.wake_reader.wake();
        }
        atoms::ok().encode(env)
    })
}

/// `stream_get_read_ahead(Stream)`: bytes.
#[rustler::nif]
fn stream_get_read_ahead<'a>(env: Env<'a>, s: ResourceArc<StreamRes>) -> Term<'a> {
    lock(&s.state).read_ahead.encode(env)
}


/// `stream_recv(Stream, Length, Tag)`: passive receive. Answers at once with `{:ok, Bin}` or
/// `{:error, Reason}` when it can, else `:wait` and later `{Tag, Result}`.
#[rustler::nif]
fn stream_recv<'a>(env: Env<'a>, s: ResourceArc<StreamRes>, len: u64, tag: Term<'a>) -> Term<'a> {
    executor::inline(env, inline_watch::watch_on(&s.conn), || stream_recv_now(env, s, len, tag))
}

fn stream_recv_now<'a>(env: Env<'a>, s: ResourceArc<StreamRes>, len: u64, tag: Term<'a>) -> Term<'a> {
    rustler::atoms! { wait, building, ealready }
    let Ok(len) = usize::try_from(len) else { return err(env, atoms::badarg()) };
    // 64 MiB, as `MaculaQuic.recv/3` checks first: the answer is one binary, copied in one go.
    if len > MAX_RECV {
        return err(env, atoms::badarg());
    }
    let mut st = lock(&s.state);
    if st.active != Active::Off {
        return err(env, atoms::einval());
    }
    // Reading passively is a choice of mode: a handoff in progress leaves it alone.
    end_pause(env, &s, &mut st);
    if let Some(req) = &st.recv_request {
        // A waiting `recv` whose caller has since exited (killed while waiting) must not
        // block the stream's next `recv` forever: it is dropped, unanswered.
        match req.reply.pid() {
            Some(pid) if env.is_process_alive(pid) => return err(env, ealready()),
            _ => {
                if let Some(stale) = st.recv_request.take() {
                    stale.reply.withdraw();
                }
            }
        }
    }
    // The NIF body never reads from Quinn (that takes Quinn's connection lock, which its
    // driver may hold for a while; see the module doc): it answers from the buffer, which the
    // reader task keeps up to `read_ahead` bytes ahead of demand, or leaves a request for
    // the reader (which then runs inline, after the body, when the shard is free).
    // A large answer goes through the reader, on a runtime worker (see `INLINE_COPY_MAX`):
    // `:building` tells the caller it is certain to come, so no timeout applies to it.
    let large = large_answer(&st, len);
    if let Some(chunks) = (!large).then(|| take_for_recv(&mut st, len)).flatten() {
        let bin = received::binary(env, &chunks);
        // There is room again: let the reader fetch the next chunk while the caller handles this.
        let wake = st.buffered < st.read_ahead && st.recv_end.is_none();
        drop(st);
        if wake {
            s.wake_reader.wake();
        }
        return (atoms::ok(), bin).encode(env);
    }
    if st.recv_done || (st.end_reported && st.buf.is_empty()) {
        return err(env, end_reason(&st));
    }
    st.recv_request = Some(RecvRequest { reply: Reply::new(env.pid(), tag), len });
    drop(st);
    s.wake_reader.wake();
    if large { building().encode(env) } else { wait().encode(env) }
}

/// `stream_cancel_recv(Stream)`: `:cancelled` if a pending recv was withdrawn, `:delivered` if
/// its answer was already sent.
#[rustler::nif]
fn stream_cancel_recv<'a>(env: Env<'a>, s: ResourceArc<StreamRes>) -> Term<'a> {
    let mut st = lock(&s.state);
    match st.recv_request.take() {
        Some(req) => {
            req.reply.withdraw();
            atoms::cancelled().encode(env)
        }
        None => atoms::delivered().encode(env),
    }
}

/// `stream_handoff(Stream, NewOwner)`: makes `NewOwner` the owner and pauses delivery (passive),
/// returning the previous mode so the caller can forward queued messages and then restore it.
#[rustler::nif]
fn stream_handoff<'a>(env: Env<'a>, s: ResourceArc<StreamRes>, pid: LocalPid) -> Term<'a> {
    let mut st = lock(&s.state);
    if let Err(reason) = st.owner.hand_over(env, pid, &s) {
        return err(env, reason);
    }
    let previous = st.active;
    st.active = Active::Off;
    st.handoff_paused = true;
    st.paused_from = previous;
    (atoms::ok(), options::encode_active(env, previous)).encode(env)
}

pub fn controlling_process<'a>(env: Env<'a>, s: &ResourceArc<StreamRes>, pid: LocalPid) -> Term<'a> {
    match lock(&s.state).owner.hand_over(env, pid, s) {
        Ok(()) => atoms::ok().encode(env),
        Err(reason) => err(env, reason),
    }
}

/// `stream_conn(Stream)`: the connection the stream belongs to.
#[rustler::nif]
fn stream_conn(s: ResourceArc<StreamRes>) -> ResourceArc<ConnRes> {
    s.conn.clone()
}

/// `stream_info(Stream)`: `%{stream_id: Id, ...}` for diagnostics and tests.
#[rustler::nif]
fn stream_info<'a>(env: Env<'a>, s: ResourceArc<StreamRes>) -> NifResult<Term<'a>> {
    rustler::atoms! { bidirectional, local, active, buffered, queued, owner, silenced }
    let queued_bytes = s.send.as_ref().map_or(0, |side| lock(side).queued);
    let st = lock(&s.state);
    let pairs = [
        (atoms::stream_id().encode(env), s.id.encode(env)),
        (bidirectional().encode(env), s.bidi.encode(env)),
        (local().encode(env), s.local.encode(env)),
        (active().encode(env), options::encode_active(env, st.active)),
        (buffered().encode(env), st.buffered.encode(env)),
        (queued().encode(env), queued_bytes.encode(env)),
        (owner().encode(env), st.owner.pid.encode(env)),
        (atoms::closed().encode(env), st.closed_sent.encode(env)),
        // After `stream_close`: the owner hears nothing more (`shutdown_stream` must not wait).
        (silenced().encode(env), st.silenced.encode(env)),
    ];
    Term::map_from_pairs(env, &pairs).map_err(|_| rustler::Error::BadArg)
}


/// `debug_panic_reader(Stream)` (test builds only): makes the stream's reader task panic, so
/// tests can prove a panic on a runtime thread fails the stream's callers instead of leaving
/// them waiting.
#[cfg(feature = "test_hooks")]
#[rustler::nif]
fn debug_panic_reader(s: ResourceArc<StreamRes>) -> rustler::Atom {
    lock(&s.state).debug_panic = true;
    s.wake_reader.wake();
    atoms::ok()
}

/// `debug_panic_writer(Stream)` (test builds only): makes the stream's writer task panic, so
/// tests can prove the sends waiting on it, and later ones, fail instead of waiting forever.
#[cfg(feature = "test_hooks")]
#[rustler::nif]
fn debug_panic_writer(s: ResourceArc<StreamRes>) -> rustler::Atom {
    lock(&s.state).debug_panic_writer = true;
    s.wake_writer.wake();
    atoms::ok()
}

/// `debug_panic_reader_inline(Stream)` (test builds only): as `debug_panic_reader/1`, but the
/// reader is woken inside this call, so (with its shard free) it panics on the calling
/// scheduler, inside the NIF, after the NIF's own work.
#[cfg(feature = "test_hooks")]
#[rustler::nif]
fn debug_panic_reader_inline(env: Env, s: ResourceArc<StreamRes>) -> rustler::Atom {
    executor::inline(env, inline_watch::watch_on(&s.conn), || {
        lock(&s.state).debug_panic = true;
        s.wake_reader.wake();
    });
    atoms::ok()
}
