//! The process that owns a handle, and the one monitor per process that follows it.
//!
//! Every handle (listener, connection, stream) has one owner. When the owner exits, its handles
//! are shut down, so nothing is left running for a process that cannot hear about it.
//!
//! A process that owns handles is monitored once, by an `OwnerRes`, not once per handle; its
//! handles register with it. Why: a monitor's memory comes from the allocator of the thread that
//! sets it and is given back by the monitored process, on a scheduler. With a monitor per
//! handle, every accepted connection and every peer-opened stream set one on a runtime thread,
//! and each time a scheduler gave one back it woke the VM's aux thread, which owns the memory of
//! threads outside the VM (2-3 wake-ups per handshake, each preempting the runtime's workers on a
//! small host; `bench/threads.exs macula_handshake`). The monitor is now set on a scheduler, in
//! the NIF that first makes the process an owner or that waits for a connection or stream to be
//! handed to it (`prepare`), and kept for as long as the process lives: a process opening and
//! closing connections one after another sets it once.
use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};

use rustler::{Atom, Env, LocalPid, Monitor, Resource, ResourceArc};

use crate::atoms;
use crate::counters::{self, Live};
use crate::executor::env_or_caller;
use crate::util::lock;

/// A handle (listener, connection, stream) that an owner's exit shuts down.
pub trait Owned: Resource {
    /// `pid` exited. The handle shuts down if `pid` still owns it (it may have just been handed
    /// to another process). Given the handle itself, not `&self`: a handle may name itself in
    /// the messages it sends as it shuts down, as a listener does to the processes waiting in
    /// `async_accept`.
    fn owner_down(this: &ResourceArc<Self>, pid: LocalPid)
    where
        Self: Sized;

    /// What the handle is and where it stands, in a line: for diagnostics (`describe_owners`,
    /// which only test builds call).
    #[cfg_attr(not(feature = "test_hooks"), allow(dead_code))]
    fn describe(&self) -> String;
}

/// What an entry keeps of a handle: a reference, so that an open handle belongs to its owner
/// until it closes, whether or not anything else refers to it.
trait Registered: Send + Sync {
    fn owner_down(&self, pid: LocalPid);
    #[cfg_attr(not(feature = "test_hooks"), allow(dead_code))]
    fn describe(&self) -> String;
}

impl<T: Owned> Registered for ResourceArc<T> {
    fn owner_down(&self, pid: LocalPid) {
        T::owner_down(self, pid)
    }

    fn describe(&self) -> String {
        (**self).describe()
    }
}

/// The key a handle registers under: its address, stable while it is registered.
fn key<T: Resource>(handle: &ResourceArc<T>) -> usize {
    &**handle as *const T as usize
}

/// One owning process: the resource that monitors it.
struct OwnerRes {
    entry: Arc<Entry>,
}

#[rustler::resource_impl]
impl Resource for OwnerRes {
    const IMPLEMENTS_DOWN: bool = true;

    fn down<'a>(&'a self, _env: Env<'a>, pid: LocalPid, _mon: Monitor) {
        crate::chaos::pause();
        let handles = lock(&self.entry.handles).take().unwrap_or_default();
        {
            let mut owners = lock(&OWNERS);
            if owners.get(&pid).is_some_and(|r| Arc::ptr_eq(&r.entry, &self.entry)) {
                owners.remove(&pid);
            }
        }
        for h in handles.values() {
            crate::chaos::pause();
            h.owner_down(pid);
        }
    }
}

/// The handles of one owning process, keyed by their address. `None` once the process is dead:
/// nothing more can register.
struct Entry {
    handles: Mutex<Option<HashMap<usize, Arc<dyn Registered>>>>,
    _live: Live,
}

impl Entry {
    fn add(&self, key: usize, handle: Arc<dyn Registered>) -> bool {
        match lock(&self.handles).as_mut() {
            Some(hs) => {
                hs.insert(key, handle);
                true
            }
            None => false,
        }
    }

    fn remove(&self, key: usize) {
        let gone = lock(&self.handles).as_mut().and_then(|hs| hs.remove(&key));
        // Dropped here, outside the lock (a handle's last reference runs its destructor).
        drop(gone);
    }
}

/// The monitored processes. An entry leaves when its process exits.
static OWNERS: LazyLock<Mutex<HashMap<LocalPid, ResourceArc<OwnerRes>>>> = LazyLock::new(|| Mutex::new(HashMap::new()));

/// `pid`'s entry, monitoring it first if it has none. `None` when the process is dead. `env` is
/// the calling NIF's environment, or `None` on a runtime thread or in a shard task.
fn entry_for(env: Option<Env>, pid: LocalPid) -> Option<Arc<Entry>> {
    let mut owners = lock(&OWNERS);
    if let Some(r) = owners.get(&pid) {
        return Some(r.entry.clone());
    }
    let entry = Arc::new(Entry { handles: Mutex::new(Some(HashMap::new())), _live: Live::new(&counters::OWNERS) });
    let res = ResourceArc::new(OwnerRes { entry: entry.clone() });
    // The monitor lives as long as the resource, which the table keeps until `down`.
    env_or_caller(env, |e| res.monitor(e, &pid))?;
    owners.insert(pid, res);
    Some(entry)
}

/// Every monitored process with a line about each handle it owns, for finding what a leak test
/// found left over (test builds' `debug_owners/0`). Copies what it needs under each lock and
/// describes the handles after, so that it never holds a registry's lock while it takes a
/// handle's (the order elsewhere is the other way round).
#[cfg(feature = "test_hooks")]
pub fn describe_owners() -> Vec<(LocalPid, Vec<String>)> {
    let entries: Vec<(LocalPid, Arc<Entry>)> = lock(&OWNERS).iter().map(|(pid, r)| (*pid, r.entry.clone())).collect();
    entries
        .into_iter()
        .map(|(pid, entry)| {
            let handles: Vec<Arc<dyn Registered>> =
                lock(&entry.handles).as_ref().map(|hs| hs.values().cloned().collect()).unwrap_or_default();
            (pid, handles.iter().map(|h| h.describe()).collect())
        })
        .collect()
}

/// Makes sure the calling process is monitored, from its own NIF (a scheduler), before a runtime
/// thread hands it a connection or stream: the monitor is then not set on the runtime thread.
pub fn prepare(env: Env) {
    let _ = entry_for(Some(env), env.pid());
}

/// A handle's owner.
pub struct Owner {
    pub pid: LocalPid,
    /// Where the handle is registered; `None` before it is and after `release`.
    entry: Option<Arc<Entry>>,
    key: usize,
}

impl Owner {
    /// An owner the handle is not yet registered with (the handle does not exist yet).
    pub fn unmonitored(pid: LocalPid) -> Owner {
        Owner { pid, entry: None, key: 0 }
    }

    /// Registers `handle` with `pid`, monitoring `pid` if it is not yet. `env` is the calling
    /// NIF's environment, or `None` on a runtime thread or in a shard task. Returns `None` when
    /// the process is already dead.
    pub fn monitor<T: Owned>(env: Option<Env>, pid: LocalPid, handle: &ResourceArc<T>) -> Option<Owner> {
        let entry = entry_for(env, pid)?;
        let key = key(handle);
        entry.add(key, Arc::new(handle.clone())).then_some(Owner { pid, entry: Some(entry), key })
    }

    /// Hands the handle to `new_pid`, for the calling process (`env`'s), which must own it:
    /// `controlling_process` and `handoff_stream`. Registers `handle` with the new owner, then
    /// unregisters it from the old. `Err(not_owner)` when the caller does not own it,
    /// `Err(closed)` when the new owner is already dead; either way nothing changes. A released
    /// handle (closed) only changes owner: there is nothing left to shut down.
    pub fn hand_over<T: Owned>(&mut self, env: Env, new_pid: LocalPid, handle: &ResourceArc<T>) -> Result<(), Atom> {
        if self.pid != env.pid() {
            return Err(atoms::not_owner());
        }
        // To itself: nothing changes. (Going on would register the handle with its own entry,
        // then remove it from there, and the owner's exit would no longer shut it down.)
        if new_pid == self.pid {
            return Ok(());
        }
        let Some(new) = entry_for(Some(env), new_pid) else { return Err(atoms::closed()) };
        if let Some(old) = self.entry.take() {
            if !new.add(self.key, Arc::new(handle.clone())) {
                self.entry = Some(old);
                return Err(atoms::closed());
            }
            old.remove(self.key);
            self.entry = Some(new);
        }
        self.pid = new_pid;
        Ok(())
    }

    /// Unregisters the handle (it closed by itself): the owner's exit no longer concerns it.
    pub fn release(&mut self) {
        if let Some(e) = self.entry.take() {
            e.remove(self.key);
        }
    }
}
