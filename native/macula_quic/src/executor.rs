//! Shards: serial executors, one per Quinn connection (its driver, its streams' readers and
//! writers, its watcher) and one per endpoint (its driver, which receives every datagram and
//! routes it to a connection, and a listener's accept loop). A shard runs either on the calling
//! scheduler (inline, at the end of a NIF) or on a tokio worker.
//!
//! Why: with every task on tokio, each `send` was a hand-off from a BEAM scheduler to a tokio
//! worker (a thread wake-up, often a sleeping one), and so was every `recv` that re-armed the
//! reader. Profiles put those hand-offs, not Quinn, at the top of the echo and handshake costs.
//! A shard lets the NIF that queued the data run the writer and Quinn's connection driver
//! itself, bounded by `INLINE_BUDGET`, so the datagram leaves from the caller's thread.
//!
//! Rules that keep this safe for the scheduler:
//! - A shard runs on one thread at a time (`running`). A NIF never waits for it: when the shard
//!   is busy elsewhere, the NIF leaves its tasks in the queue and whoever runs the shard takes
//!   them (every runner looks at the queue again after letting go).
//! - Everything that takes a connection's lock in Quinn (its driver, its streams, waiting for
//!   its handshake, closing it, reading its stats) runs on that connection's shard, so a task
//!   polled inline never waits for that lock behind a driver on another thread. NIFs that call
//!   Quinn directly (`open_stream`, `close_connection`, the connection queries, checking that
//!   a connection is open for `accept_stream`) first `claim` the shard; when it is busy
//!   elsewhere they leave the work to a task on it, which answers the caller by message, or
//!   answer from what the library recorded.
//! - Inline work is bounded in time and reported to the VM (`consume_timeslice`); what is left
//!   goes to a tokio worker.
//! - Wake-ups that come from tokio (a datagram arrived, a timer fired) run the shard on that
//!   tokio worker, as before.
//! - Connections get their own shards (rather than sharing their endpoint's) so that a busy
//!   listener's connections still run on as many threads as there are.
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

use rustler::Env;

use crate::chaos;
use crate::contain::Contained;
use crate::counters::{self, Live};
use crate::inline_watch;
use crate::messages;
use crate::runtime;
use crate::util::lock;

/// Most time a NIF spends running shards' tasks before it leaves the rest to tokio. A send's
/// own work (hand the data to Quinn, encrypt, transmit) mostly fits. With 400 µs the timer test
/// in receive_modes_test saw p95 lateness 4.1-7.0 ms and max 8-42 ms; with 100 µs, p95 3.8-4.8 ms
/// and max 6-17 ms (everything on tokio: 3.3-4.0 and 4-10 ms), and no throughput change that
/// the benchmarks could tell from noise.
const INLINE_BUDGET: Duration = Duration::from_micros(100);

/// Most time a tokio worker runs one shard before yielding to its other tasks.
const TOKIO_BUDGET: Duration = Duration::from_millis(2);

/// A time budget that reads the clock once per task polled, and nowhere else: a reading costs
/// ~40 ns here, and a 64-byte echo round trip polls about ten tasks in six shard runs, where
/// reading it at every start, check and end made 18 of the 32 readings per round trip on the
/// scheduler threads (a uprobe count; 5 were Quinn's own, 9 the VM's).
// Not `Copy`: it is passed by `&mut` so that every shard run in a call shares its readings.
#[derive(Debug)]
struct Budget {
    start: Instant,
    deadline: Instant,
    /// The last reading.
    now: Instant,
}

impl Budget {
    fn new(length: Duration) -> Budget {
        let now = Instant::now();
        Budget { start: now, deadline: now + length, now }
    }

    /// Reads the clock: is there time left?
    fn tick(&mut self) -> bool {
        self.now = Instant::now();
        self.now < self.deadline
    }

    /// Was there time left at the last reading?
    fn left(&self) -> bool {
        self.now < self.deadline
    }

    /// Time spent by the last reading.
    fn spent(&self) -> Duration {
        self.now.saturating_duration_since(self.start)
    }
}

type BoxFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

/// One connection's or one endpoint's executor.
#[derive(Debug)]
pub struct Shard {
    queue: Mutex<VecDeque<Arc<Task>>>,
    /// Some thread is polling this shard's tasks.
    running: AtomicBool,
    /// The shard's runner (see `schedule`) is asked to run it and has not started yet.
    scheduled: AtomicBool,
    /// The shard's runner on tokio, once there is one.
    runner: Mutex<Runner>,
    /// Every task spawned here that may still exist, so `fail` can wake them all.
    tasks: Mutex<TaskList>,
    /// Quinn's driver on this shard panicked (see `fail`).
    failed: AtomicBool,
    /// Held until the shard's Quinn driver ends (see `keep_until_driver_ends`).
    kept: Mutex<Kept>,
    /// Set by `debug_fail_on_next_spawn` (test builds): the next `spawn` fails the shard as
    /// it queues its task, so that task is dropped before it first runs.
    #[cfg(feature = "test_hooks")]
    fail_on_spawn: AtomicBool,
    _live: Live,
}

struct Task {
    shard: Arc<Shard>,
    future: Mutex<Option<BoxFuture>>,
    /// In the shard's queue (so a burst of wake-ups queues it once).
    queued: AtomicBool,
}

impl std::fmt::Debug for Task {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Task")
    }
}

thread_local! {
    /// The shard this thread is running now (null when none).
    static CURRENT: Cell<*const Shard> = const { Cell::new(std::ptr::null()) };
    /// Inside a NIF that runs woken shards before returning: the shards woken so far.
    static INLINE: RefCell<Option<Vec<Arc<Shard>>>> = const { RefCell::new(None) };
    /// Set by `with_new_shard`: where Quinn's next spawned task (a connection's driver) goes.
    static NEXT_SHARD: RefCell<Option<Arc<Shard>>> = const { RefCell::new(None) };
    /// The calling process's environment while a NIF runs shards inline, so that tasks can
    /// send messages from a scheduler thread (an owned environment cannot, there).
    static CALLER_ENV: Cell<*mut rustler::sys::ErlNifEnv> = const { Cell::new(std::ptr::null_mut()) };
    /// Set by a task polled inline whose next step is too long for a scheduler (see
    /// `defer_to_runtime`).
    static DEFER: Cell<bool> = const { Cell::new(false) };
}

/// For a task polled inline (see `in_inline`) whose next step is too long for a scheduler
/// (copying megabytes into a binary): awaiting this yields once, queued again, with the flag
/// that makes `Shard::run` stop and leave the shard to a runtime worker, where the task goes on.
pub async fn defer_to_runtime() {
    // (Set as the task is first polled, when it yields.)
    DEFER.with(|d| d.set(true));
    counters::bump(&counters::INLINE_DEFERRALS);
    yield_once().await
}

/// Yields once: the task is queued again behind the shard's other tasks, and `Shard::run`
/// checks its budget before polling it again. For a task whose loop can go on for long without
/// waiting (its steps all ready), which one poll would otherwise run whole, on a scheduler
/// thread when the shard runs inline.
pub async fn yield_once() {
    let mut yielded = false;
    std::future::poll_fn(|cx| {
        if yielded {
            return Poll::Ready(());
        }
        yielded = true;
        cx.waker().wake_by_ref();
        Poll::Pending
    })
    .await
}

/// A shard task's own waker, recorded at its first poll, so that a NIF that gives the task work
/// (a stream's reader or writer) can wake it.
///
/// Why not a `tokio::sync::Notify`: a task waiting on one registers with it at every wait and
/// unregisters at every wake-up (its waiter list is behind a lock), and a stream's reader waits
/// once per message it delivers. A shard task's waker never changes (it is the task itself, see
/// `Task::poll`), so recording it once is enough, and a task that re-checks its state at every
/// poll needs nothing more: a wake-up that comes while it runs queues it to run again (see
/// `Task::wake_by_ref`), so none is lost. (The stored waker holds the task, and the task's future
/// may hold what holds this; the cycle ends when the future does.)
#[derive(Debug, Default)]
pub struct TaskWaker(std::sync::OnceLock<Waker>);

impl TaskWaker {
    /// Records the polling task's waker (the first time; later calls change nothing).
    pub async fn bind(&self) {
        std::future::poll_fn(|cx| {
            self.0.get_or_init(|| cx.waker().clone());
            Poll::Ready(())
        })
        .await
    }

    /// Wakes the task, once it has bound (before that, its first poll is still to come).
    pub fn wake(&self) {
        if let Some(w) = self.0.get() {
            w.wake_by_ref();
        }
    }
}

/// Polls `f` once more after the task's next wake-up, whoever wakes it: `f`'s result if it is
/// ready at either poll, else `None` after the wake-up. For a task bound to a `TaskWaker`, to
/// wait for its own work (`f` registers with what it polls) or for any other wake-up (its NIFs).
/// With `poll_again` false, the wake-up returns `None` without polling `f` again.
pub async fn until_woken<T>(poll_again: bool, mut f: impl FnMut(&mut Context) -> Poll<T>) -> Option<T> {
    let mut first = true;
    std::future::poll_fn(|cx| {
        let woken = !std::mem::replace(&mut first, false);
        if woken && !poll_again {
            return Poll::Ready(None);
        }
        match f(cx) {
            Poll::Ready(out) => Poll::Ready(Some(out)),
            Poll::Pending if woken => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    })
    .await
}

/// Is inline running switched on? `MACULA_QUIC_INLINE=0` turns it off, for comparing the two
/// in benchmarks: shards then run on tokio workers only, and `claim` always finds the shard
/// busy (so the calls that ask Quinn directly take their deferred path). Tasks still go
/// through their shards, so a connection's work stays serial and `fail` reaches every task.
fn enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var("MACULA_QUIC_INLINE").map_or(true, |v| v != "0"))
}

impl Wake for Task {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref()
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if self.queued.swap(true, Ordering::AcqRel) {
            return;
        }
        lock(&self.shard.queue).push_back(self.clone());
        self.shard.kick();
    }
}

impl Shard {
    pub fn new() -> Arc<Shard> {
        Arc::new(Shard {
            queue: Mutex::new(VecDeque::new()),
            running: AtomicBool::new(false),
            scheduled: AtomicBool::new(false),
            runner: Mutex::new(Runner::None),
            tasks: Mutex::new(TaskList::default()),
            failed: AtomicBool::new(false),
            kept: Mutex::new(Kept::default()),
            #[cfg(feature = "test_hooks")]
            fail_on_spawn: AtomicBool::new(false),
            _live: Live::new(&counters::SHARDS),
        })
    }

    /// Test builds: the next `spawn` here fails the shard (as a panic in its Quinn driver
    /// would) right after queuing its task, which is then dropped without ever running: for
    /// tests that a task's guards exist before its first poll. Unlike a real driver panic,
    /// `driver_panics` is not counted.
    #[cfg(feature = "test_hooks")]
    pub fn debug_fail_on_next_spawn(&self) {
        self.fail_on_spawn.store(true, Ordering::Release);
    }

    /// Runs `fut` on this shard. It is first polled by whoever runs the shard next (the NIF
    /// that spawned it, if that NIF runs shards inline).
    pub fn spawn<F>(self: &Arc<Self>, fut: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let fut = runtime::guarded(fut);
        // A shard's tasks share one tokio task when they run on a worker; tokio's per-task
        // budget (which makes a resource answer "pending, poll again" after 128 operations)
        // would then spin them here. The shard's own budget bounds them instead.
        let fut = tokio::task::coop::unconstrained(fut);
        let task = Arc::new(Task {
            shard: self.clone(),
            future: Mutex::new(Some(Box::pin(async move {
                fut.await;
            }))),
            queued: AtomicBool::new(false),
        });
        lock(&self.tasks).push(&task);
        task.wake_by_ref();
        #[cfg(feature = "test_hooks")]
        if self.fail_on_spawn.swap(false, Ordering::AcqRel) {
            self.fail();
            // What the driver's task does after a real panic, which its drop here skips.
            self.let_go_of_kept();
        }
    }

    /// Runs Quinn's driver for a connection; if it panics, the shard `fail`s.
    fn spawn_driver(self: &Arc<Self>, driver: BoxFuture) {
        let shard = self.clone();
        self.spawn(async move {
            if runtime::guarded(driver).await.is_none() {
                shard.fail();
                counters::bump(&counters::DRIVER_PANICS);
            }
            // Only now: while the driver existed, this kept its drop from taking Quinn's lock.
            shard.let_go_of_kept();
        });
    }

    /// The shard's Quinn driver has ended: the references `keep_until_driver_ends` holds go.
    /// (They hold the connection, which holds this shard: kept, they would keep both for good.)
    fn let_go_of_kept(&self) {
        let kept = {
            let mut k = lock(&self.kept);
            k.driver_ended = true;
            k.value.take()
        };
        drop(kept);
    }

    /// Keeps references to `conn` (see `contain`) until the shard's Quinn driver has ended. Quinn drops its driver while a panic in it unwinds, and that drop takes
    /// the connection's lock, poisoned by the panic, when the driver's reference is one of the
    /// last two: a second panic, and the VM aborts. The connection's handles hold more while
    /// they live; this covers the time after they have gone (a closed connection draining).
    /// Kept references also mean that letting go of the connection's last handle no longer
    /// closes it (Quinn's implicit close): every path that lets go of a kept connection must
    /// close it explicitly.
    pub fn keep_until_driver_ends(&self, conn: &quinn::Connection) {
        let mut k = lock(&self.kept);
        // Once the driver has ended it is too late to matter, and nothing would ever let go of
        // them (they would keep the connection, whose state holds this shard's tasks, for good).
        if !k.driver_ended {
            k.value = Some(Contained::connection(conn.clone()));
        }
    }

    /// Quinn's connection driver panicked: the connection is broken for good (its lock is
    /// poisoned, see `contain`), and nothing will wake the tasks that wait on it. Every task of
    /// this shard, those waiting now and any spawned later, then ends as if it had panicked:
    /// its state is dropped, and the guards in it answer whoever waits (`{:error,
    /// :internal_error}`), end the streams, and report the connection's end to its owner (see
    /// `connection`). Quinn is not called again for it.
    fn fail(self: &Arc<Self>) {
        self.failed.store(true, Ordering::Release);
        let tasks: Vec<Arc<Task>> = lock(&self.tasks).list.iter().filter_map(Weak::upgrade).collect();
        for t in tasks {
            t.wake_by_ref();
        }
    }

    /// Did Quinn's connection driver on this shard panic?
    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// Somebody must run this shard's queue.
    fn kick(self: &Arc<Self>) {
        if CURRENT.with(|c| c.get()) == Arc::as_ptr(self) {
            // This thread is running the shard and takes the task before it lets go.
            return;
        }
        let recorded = INLINE.with(|s| match s.borrow_mut().as_mut() {
            Some(list) => {
                if !list.iter().any(|x| Arc::ptr_eq(x, self)) {
                    list.push(self.clone());
                }
                true
            }
            None => false,
        });
        if !recorded {
            self.schedule();
        }
    }

    /// Runs the shard on a tokio worker, unless that is already arranged: wakes the shard's
    /// runner, a tokio task that lives as long as the shard (it is spawned the first time).
    ///
    /// Why one task for the shard's life rather than one per schedule: a tokio task is a
    /// 128-byte-aligned allocation (see `alloc`), plus its setup and free, at every datagram
    /// that reaches a runtime worker. Under callgrind, where a 64-byte echo scheduled ~5 shards
    /// per round trip on tokio, the spawns cost ~8,000 instructions per round trip
    /// (`bin/instructions echo`, bench/README). Waking a task costs none of it.
    fn schedule(self: &Arc<Self>) {
        if self.scheduled.swap(true, Ordering::AcqRel) {
            return;
        }
        let mut r = lock(&self.runner);
        match &mut *r {
            Runner::None => {
                *r = Runner::Spawned(None);
                drop(r);
                runtime::get().spawn(run_on_tokio(Arc::downgrade(self)));
            }
            Runner::Spawned(waiting) => {
                // No waker: the runner is running, and looks at `scheduled` before it waits.
                let waker = waiting.take();
                drop(r);
                if let Some(w) = waker {
                    w.wake();
                }
            }
        }
    }

    /// Polls queued tasks until `budget` runs out (at least one task, if any is queued).
    /// Returns true when the queue was empty at the end (or another thread is running the shard
    /// and will see it), false when the budget ran out with tasks left. `runs` (`inline_runs`
    /// or `runtime_runs`) counts the call if it polled anything.
    fn run(self: &Arc<Self>, budget: &mut Budget, runs: &AtomicI64) -> bool {
        let mut counted = false;
        // (A deferral left over from a poll that did not end here must not cut this run short.)
        DEFER.with(|d| d.set(false));
        loop {
            let Some(held) = self.hold() else {
                // The runner looks at the queue again after it lets go, so nothing is lost.
                return true;
            };
            let mut out_of_time = false;
            loop {
                let next = lock(&self.queue).pop_front();
                let Some(task) = next else { break };
                if !counted {
                    counters::bump(runs);
                    counted = true;
                }
                task.poll();
                chaos::pause();
                // A deferring task has queued itself again: the rest is the runtime's.
                if DEFER.with(|d| d.replace(false)) || !budget.tick() {
                    out_of_time = true;
                    break;
                }
            }
            drop(held);
            if out_of_time {
                return lock(&self.queue).is_empty();
            }
            if lock(&self.queue).is_empty() {
                return true;
            }
            // A task was queued between our last look and letting go: run it too.
        }
    }

    /// Marks the shard as run by this thread, unless another thread runs it. Dropping the
    /// result lets go (also when unwinding, so a shard is never left marked for good).
    fn hold(self: &Arc<Self>) -> Option<Held<'_>> {
        if self.running.compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire).is_err() {
            return None;
        }
        let prev = CURRENT.with(|c| c.replace(Arc::as_ptr(self)));
        Some(Held { shard: self, prev })
    }
}

/// A shard's runner on tokio (see `Shard::schedule`).
#[derive(Debug)]
enum Runner {
    /// Not spawned yet, or it ended by a panic (the next `schedule` spawns another).
    None,
    /// Spawned; with its waker while it waits to be scheduled.
    Spawned(Option<Waker>),
}

/// The shard's runner: waits until the shard is scheduled, runs it on this tokio worker in
/// `TOKIO_BUDGET` slices, and waits again. It holds the shard only weakly while it waits, so
/// that the shard (and everything its tasks hold) goes when its last user lets go; the shard's
/// `Drop` then wakes it to end.
async fn run_on_tokio(shard: Weak<Shard>) {
    // Should this end while the shard lives (a panic here; tokio dropping its tasks), the next
    // `schedule` must spawn a new runner (and what is queued now must run), as it did when every
    // schedule spawned a task. (At its ordinary end the shard is gone.)
    struct Respawn(Weak<Shard>);
    impl Drop for Respawn {
        fn drop(&mut self) {
            if let Some(shard) = self.0.upgrade() {
                *lock(&shard.runner) = Runner::None;
                shard.scheduled.store(false, Ordering::Release);
                if !lock(&shard.queue).is_empty() {
                    shard.schedule();
                }
            }
        }
    }
    let _respawn = Respawn(shard.clone());
    let _live = Live::new(&counters::SHARD_RUNNERS);
    loop {
        let next = std::future::poll_fn(|cx| {
            let Some(s) = shard.upgrade() else { return Poll::Ready(None) };
            let mut r = lock(&s.runner);
            // Read under the lock that `schedule` takes after setting it: either it is seen
            // here, or `schedule` finds the waker stored here and wakes it.
            if s.scheduled.load(Ordering::Acquire) {
                drop(r);
                return Poll::Ready(Some(s));
            }
            *r = Runner::Spawned(Some(cx.waker().clone()));
            drop(r);
            // (If this was the last reference, the shard's `Drop` wakes the waker just stored.)
            drop(s);
            Poll::Pending
        })
        .await;
        let Some(strong) = next else { return };
        chaos::pause();
        strong.scheduled.store(false, Ordering::Release);
        while !strong.run(&mut Budget::new(TOKIO_BUDGET), &counters::RUNTIME_RUNS) {
            tokio::task::yield_now().await;
        }
    }
}

impl Drop for Shard {
    fn drop(&mut self) {
        // Ends the runner, if it waits (see `run_on_tokio`).
        let waiting = match &mut *lock(&self.runner) {
            Runner::Spawned(w) => w.take(),
            Runner::None => None,
        };
        if let Some(w) = waiting {
            w.wake();
        }
    }
}

/// What `Shard::keep_until_driver_ends` keeps.
#[derive(Debug, Default)]
struct Kept {
    value: Option<Contained<quinn::Connection>>,
    driver_ended: bool,
}

/// A shard's tasks, weakly (a task that has ended and has no waker left is gone).
#[derive(Default)]
struct TaskList {
    list: Vec<Weak<Task>>,
    /// How many were left when the gone ones were last dropped.
    pruned: usize,
}

impl TaskList {
    /// Adds `task`, first dropping the gone ones whenever the list has doubled since that was
    /// last done (so a spawn costs O(1) on average, and the list stays within about twice the
    /// tasks that exist).
    fn push(&mut self, task: &Arc<Task>) {
        if self.list.len() >= (2 * self.pruned).max(8) {
            self.list.retain(|t| t.strong_count() > 0);
            self.pruned = self.list.len();
        }
        self.list.push(Arc::downgrade(task));
    }
}

impl std::fmt::Debug for TaskList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TaskList({})", self.list.len())
    }
}

/// This thread runs (or holds) a shard; see `Shard::hold`.
struct Held<'a> {
    shard: &'a Arc<Shard>,
    prev: *const Shard,
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        CURRENT.with(|c| c.set(self.prev));
        self.shard.running.store(false, Ordering::Release);
    }
}

impl Task {
    fn poll(self: &Arc<Self>) {
        // Cleared before polling, so a wake-up during the poll queues the task again.
        self.queued.store(false, Ordering::Release);
        let waker = Waker::from(self.clone());
        let mut cx = Context::from_waker(&waker);
        let mut slot = lock(&self.future);
        if self.shard.failed() {
            // Quinn's driver here panicked: the task ends as if it had (see `fail`).
            if let Some(fut) = slot.take() {
                runtime::drop_as_panicked(fut);
            }
            return;
        }
        if let Some(fut) = slot.as_mut() {
            // `runtime::guarded` already turned a panic into a finished task.
            if let Poll::Ready(()) = fut.as_mut().poll(&mut cx) {
                *slot = None;
            }
        }
    }
}

/// A shard held by this thread without running its queue (see `Shard::claim`).
pub struct Claim<'a> {
    held: Option<Held<'a>>,
}

impl Shard {
    /// Takes the shard for a moment, when no other thread runs it, so that a NIF can call into
    /// Quinn knowing that no driver of this endpoint holds a connection lock meanwhile. `None`
    /// when the shard is busy elsewhere. Tasks woken meanwhile run when the claim ends (inline,
    /// inside `inline`; else on tokio).
    pub fn claim(self: &Arc<Self>) -> Option<Claim<'_>> {
        if !enabled() {
            return None;
        }
        self.hold().map(|held| Claim { held: Some(held) })
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        if let Some(held) = self.held.take() {
            let shard = held.shard;
            drop(held);
            // Wake-ups during the claim were left in the queue for "the runner": us.
            if !lock(&shard.queue).is_empty() {
                shard.kick();
            }
        }
    }
}

/// Runs `f` (the body of a NIF), then the tasks it woke, on this thread, bounded by
/// `INLINE_BUDGET`; what is left runs on tokio. Shards woken while those run (a new
/// connection's, say) are run too, within the same budget. Call only from a NIF on a normal
/// scheduler, with no locks held by the caller. `watch_on`: the connection the call is made on
/// (`inline_watch::watch_on`), whose distance decides whether the call watches for its answer.
pub fn inline<R>(env: Env, mut watch_on: Option<inline_watch::WatchOn>, f: impl FnOnce() -> R) -> R {
    if !enabled() || in_inline() {
        return f();
    }
    // Whatever happens, the scope and the environment are unset when this call ends (a panic
    // propagates to rustler's handler; the environment is only valid during the call).
    struct Scope(*mut rustler::sys::ErlNifEnv);
    impl Drop for Scope {
        fn drop(&mut self) {
            INLINE.with(|s| s.borrow_mut().take());
            CALLER_ENV.with(|c| c.set(self.0));
        }
    }
    INLINE.with(|s| *s.borrow_mut() = Some(Vec::new()));
    let _scope = Scope(CALLER_ENV.with(|c| c.get()));
    inline_watch::take_sent();
    let out = f();
    let mut budget = Budget::new(INLINE_BUDGET);
    let mut entered = None;
    let mut watched = false;
    // This call's watch for its answer, and the messages this thread had sent when it began.
    let mut watch: Option<(inline_watch::Watch, u64)> = None;
    loop {
        let mut woken = take_woken();
        // Once this call's work is done: if it sent a datagram to a peer outside the VM and has
        // time left, watch for the answer, and receive it here when it comes (see
        // `inline_watch`).
        if woken.is_empty() && !watched && inline_watch::watch_us() > 0 && budget.tick() {
            watched = true;
            watch = inline_watch::begin(inline_watch::take_sent(), watch_on.take()).map(|w| (w, messages::sent_in_calls()));
        }
        if woken.is_empty() {
            if let Some((mut w, before)) = watch.take() {
                // The watch goes on until what it found has sent a process a message (an
                // answer), or its time is up: a datagram that carried nothing for a process
                // (an acknowledgement, which the peer may send before its answer) does not end
                // it.
                let answered = messages::sent_in_calls() > before;
                if !answered && w.next() {
                    woken = take_woken();
                    watch = Some((w, before));
                } else {
                    w.end(answered);
                }
                // The watch took time the budget (and the VM's accounting) must count.
                budget.tick();
            }
        }
        if woken.is_empty() {
            break;
        }
        if entered.is_none() {
            CALLER_ENV.with(|c| c.set(env.as_c_arg()));
            entered = Some(runtime::get().enter());
        }
        for shard in woken {
            // (As of the last task polled: every poll reads the clock.)
            if !budget.left() {
                shard.schedule();
                continue;
            }
            if !shard.run(&mut budget, &counters::INLINE_RUNS) {
                shard.schedule();
            }
        }
    }
    if entered.is_some() {
        // Tell the VM what this call cost (a full timeslice is about 1 ms), so that a process
        // sending in a loop is preempted in time like any other busy process: a NIF call
        // otherwise counts as a single reduction, and a sender doing up to `INLINE_BUDGET` of
        // Quinn's work per call would keep its scheduler from the processes queued behind it.
        let percent = (budget.spent().as_micros() / 10).clamp(1, 100) as i32;
        rustler::schedule::consume_timeslice(env, percent);
    }
    out
}

/// The shards woken since the last look, inside `inline` (none outside it).
fn take_woken() -> Vec<Arc<Shard>> {
    INLINE.with(|s| s.borrow_mut().as_mut().map(std::mem::take).unwrap_or_default())
}

/// Is this thread inside `inline` (a NIF running shards on its caller's scheduler)?
pub fn in_inline() -> bool {
    INLINE.with(|s| s.borrow().is_some())
}

/// The calling process's environment, while this thread runs shards inside a NIF.
pub fn caller_env<'a, T>(marker: &'a T) -> Option<Env<'a>> {
    let raw = CALLER_ENV.with(|c| c.get());
    // SAFETY: set only for the duration of `inline`, inside the NIF whose env it is; the
    // marker's lifetime does not outlive that call because the closures that use it are
    // synchronous sends.
    (!raw.is_null()).then(|| unsafe { Env::new(marker, raw) })
}

/// Calls `f` with `env`, or, without one, with the environment of the NIF running shards on
/// this thread (if any): on a scheduler thread, monitors must be set and dropped in the calling
/// process's environment.
pub fn env_or_caller<R>(env: Option<Env>, f: impl for<'x> FnOnce(Option<Env<'x>>) -> R) -> R {
    match env {
        Some(e) => f(Some(e)),
        None => {
            let marker = ();
            f(caller_env(&marker))
        }
    }
}

/// Runs `f` (a Quinn call that creates a connection: `connect_with`, `Incoming::accept`) so
/// that the connection's driver, which Quinn spawns inside it, goes to a new shard of its own.
/// Returns that shard, for the connection's other tasks.
pub fn with_new_shard<R>(f: impl FnOnce() -> R) -> (R, Arc<Shard>) {
    let shard = Shard::new();
    struct Unset;
    impl Drop for Unset {
        fn drop(&mut self) {
            NEXT_SHARD.with(|n| n.borrow_mut().take());
        }
    }
    NEXT_SHARD.with(|n| *n.borrow_mut() = Some(shard.clone()));
    let unset = Unset;
    let out = f();
    drop(unset);
    (out, shard)
}

/// Quinn's runtime for an endpoint: the endpoint's driver runs on the endpoint's shard, each
/// connection's driver on the connection's own shard (see `with_new_shard`); timers and the
/// socket use tokio's time and I/O drivers.
#[derive(Debug)]
pub struct ShardRuntime {
    pub shard: Arc<Shard>,
}

impl quinn::Runtime for ShardRuntime {
    fn new_timer(&self, t: std::time::Instant) -> Pin<Box<dyn quinn::AsyncTimer>> {
        // Creating a tokio timer needs the runtime's context (a shard may run on a scheduler).
        let _rt = runtime::get().enter();
        quinn::TokioRuntime.new_timer(t)
    }

    fn spawn(&self, future: Pin<Box<dyn Future<Output = ()> + Send>>) {
        // Quinn spawns nothing but drivers: each connection's (on its new shard), and the
        // endpoint's. (A panic in an endpoint's driver, or in an outgoing connection's before
        // its handshake completes, aborts inside Quinn's own task: see `contain`.)
        match NEXT_SHARD.with(|n| n.borrow().clone()) {
            Some(shard) => shard.spawn_driver(future),
            None => self.shard.spawn(future),
        }
    }

    fn wrap_udp_socket(&self, t: std::net::UdpSocket) -> std::io::Result<Arc<dyn quinn::AsyncUdpSocket>> {
        let _rt = runtime::get().enter();
        // The socket is also read directly, by calls that find a datagram waiting (see
        // `inline_watch`).
        let dup = t.try_clone()?;
        inline_watch::wrap(quinn::TokioRuntime.wrap_udp_socket(t)?, dup)
    }

    fn now(&self) -> std::time::Instant {
        std::time::Instant::now()
    }
}
