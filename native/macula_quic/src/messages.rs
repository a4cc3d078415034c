//! Sending terms to Erlang processes from runtime threads, and replying to requests.
//!
//! A NIF that starts async work takes a reply tag from the caller (a fresh reference) and
//! returns at once; the task later sends `{Tag, Result}`. The caller waits in a `receive`,
//! which blocks the calling process, never a scheduler.
use std::cell::{Cell, RefCell};

use rustler::env::SavedTerm;
use rustler::{Encoder, Env, LocalPid, OwnedEnv, Term};

thread_local! {
    // One reusable environment per runtime thread: `send_and_clear` empties it after each
    // message, so messages cost no allocation of an environment of their own.
    static SEND_ENV: RefCell<OwnedEnv> = RefCell::new(OwnedEnv::new());
    /// Messages this scheduler thread has sent inside calls (see `sent_in_calls`).
    static SENT_IN_CALLS: Cell<u64> = const { Cell::new(0) };
}

/// How many messages this thread has sent to processes from inside calls (shards run in a
/// NIF): `executor::inline` compares it around the work a watch found, to tell an answer that
/// reached a process from a datagram that carried none (an acknowledgement).
pub fn sent_in_calls() -> u64 {
    SENT_IN_CALLS.with(|n| n.get())
}

/// Sends the term `build` makes to `pid`, from a runtime thread or from a shard running inline
/// in a NIF (see `executor`). Returns false when the process no longer exists.
pub fn send<F>(pid: &LocalPid, build: F) -> bool
where
    F: for<'a> FnOnce(Env<'a>) -> Term<'a>,
{
    crate::chaos::pause();
    if rustler::thread::is_scheduler_thread() {
        return send_from_scheduler(pid, build);
    }
    SEND_ENV.with(|env| {
        let mut env = env.borrow_mut();
        env.send_and_clear(pid, build).is_ok()
    })
}

/// On a scheduler thread a message must be built in the calling process's environment. Inside
/// a NIF that runs shards inline there is one; anywhere else (a monitor's callback: a
/// listener telling its acceptors as its owner exits) the term is built in an owned
/// environment and sent from a runtime thread instead.
fn send_from_scheduler<F>(pid: &LocalPid, build: F) -> bool
where
    F: for<'a> FnOnce(Env<'a>) -> Term<'a>,
{
    let marker = ();
    if let Some(env) = crate::executor::caller_env(&marker) {
        let msg = build(env);
        SENT_IN_CALLS.with(|n| n.set(n.get() + 1));
        return env.send(pid, msg).is_ok();
    }
    let mut owned = OwnedEnv::new();
    let saved = owned.run(|e| owned.save(build(e)));
    let pid = *pid;
    crate::runtime::get().spawn(async move {
        let _ = owned.send_and_clear(&pid, |e| saved.load(e));
    });
    true
}

/// Someone waiting for the answer to a request: a process and the tag it will match on.
///
/// Every request is answered exactly once. A `Reply` dropped without an answer (the object it
/// waited on went away, or the task holding it panicked) answers by itself with
/// `{:error, :closed}` — `{:error, :internal_error}` when a panic dropped it — so no caller waits
/// forever. A caller that withdraws its request (a timeout) uses `withdraw`, which answers
/// nothing.
pub struct Reply {
    inner: Option<Pending>,
}

struct Pending {
    pid: LocalPid,
    env: OwnedEnv,
    tag: SavedTerm,
    shape: Shape,
}

/// How an answer is worded.
#[derive(Clone, Copy)]
enum Shape {
    /// `{Tag, Result}`, for a caller waiting in a `receive` on its tag.
    Tagged,
    /// quicer's `{quic, send_complete, Stream, IsCancelled}`, the tag being the stream: sent to
    /// a process that asked to hear when a send's data was taken (`async_send/3`'s sync flag).
    SendComplete,
}

impl Pending {
    /// Sends the answer: `build`'s term for a tagged reply; for a `send_complete`, whether the
    /// send was cancelled (`!ok`).
    fn send<F>(self, ok: bool, build: F) -> bool
    where
        F: for<'a> FnOnce(Env<'a>) -> Term<'a>,
    {
        let shape = self.shape;
        if rustler::thread::is_scheduler_thread() {
            let (env, tag) = (self.env, self.tag);
            return send_from_scheduler(&self.pid, move |e| {
                let t = env.run(|own| tag.load(own).in_env(e));
                shape.word(e, t, ok, build)
            });
        }
        let tag = self.tag;
        let mut env = self.env;
        env.send_and_clear(&self.pid, move |e| shape.word(e, tag.load(e), ok, build)).is_ok()
    }
}

impl Shape {
    fn word<'a>(self, e: Env<'a>, tag: Term<'a>, ok: bool, build: impl FnOnce(Env<'a>) -> Term<'a>) -> Term<'a> {
        match self {
            Shape::Tagged => (tag, build(e)).encode(e),
            Shape::SendComplete => (crate::atoms::quic(), crate::atoms::send_complete(), tag, !ok).encode(e),
        }
    }
}

impl Reply {
    /// Captures the caller and its tag. Called inside the NIF that starts the request.
    pub fn new(pid: LocalPid, tag: Term) -> Reply {
        let env = OwnedEnv::new();
        let tag = env.save(tag);
        Reply { inner: Some(Pending { pid, env, tag, shape: Shape::Tagged }) }
    }

    /// A reply worded as quicer's `{quic, send_complete, Stream, IsCancelled}` to `pid`:
    /// `ok` sends `IsCancelled = false`; `error`, or dropping it unanswered, `true`.
    pub fn send_complete(pid: LocalPid, stream: Term) -> Reply {
        let env = OwnedEnv::new();
        let tag = env.save(stream);
        Reply { inner: Some(Pending { pid, env, tag, shape: Shape::SendComplete }) }
    }

    /// Sends `{Tag, Result}`, from a runtime thread or a shard running inline. (A
    /// `send_complete` reply takes any answer sent this way as success.)
    pub fn send<F>(mut self, build: F) -> bool
    where
        F: for<'a> FnOnce(Env<'a>) -> Term<'a>,
    {
        crate::chaos::pause();
        match self.inner.take() {
            Some(p) => p.send(true, build),
            None => false,
        }
    }

    /// Sends `{Tag, :ok}`.
    pub fn ok(self) -> bool {
        self.send(|e| crate::atoms::ok().encode(e))
    }

    /// Sends `{Tag, {:error, Reason}}`.
    pub fn error<R: Encoder + Send + 'static>(mut self, reason: R) -> bool {
        crate::chaos::pause();
        match self.inner.take() {
            Some(p) => p.send(false, move |e| (crate::atoms::error(), reason).encode(e)),
            None => false,
        }
    }

    /// The process waiting, while the request is unanswered.
    pub fn pid(&self) -> Option<LocalPid> {
        self.inner.as_ref().map(|p| p.pid)
    }

    /// Forgets the request without answering: its caller withdrew it and waits no more.
    pub fn withdraw(mut self) {
        self.inner.take();
    }
}

/// Why something that ends without an answer ended, for whoever waited on it:
/// `:internal_error` after a panic, else `:closed`.
pub fn dropped_reason() -> rustler::Atom {
    if crate::runtime::after_panic() {
        crate::atoms::internal_error()
    } else {
        crate::atoms::closed()
    }
}

impl Drop for Reply {
    fn drop(&mut self) {
        let Some(pending) = self.inner.take() else { return };
        let reason = dropped_reason();
        // `send` also copes with a scheduler thread (a destructor, or a shard run inline).
        pending.send(false, move |e| (crate::atoms::error(), reason).encode(e));
    }
}
