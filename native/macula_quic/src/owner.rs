//! The process that owns a handle.
//!
//! Every handle (listener, connection, stream) has one owner. The native side monitors it: when
//! the owner exits, the resource's `down` callback shuts the handle down, so nothing is left
//! running for a process that cannot hear about it.
use rustler::{Env, LocalPid, Monitor, Resource, ResourceArc};

use crate::executor::env_or_caller;

pub struct Owner {
    pub pid: LocalPid,
    monitor: Option<Monitor>,
}

impl Owner {
    /// An owner not yet monitored (the resource does not exist yet).
    pub fn unmonitored(pid: LocalPid) -> Owner {
        Owner { pid, monitor: None }
    }

    /// Monitors `pid` on behalf of `res`. `env` is the calling NIF's environment, or `None` on a
    /// runtime thread or in a shard task (which uses the environment of the NIF running it).
    /// Returns `None` when the process is already dead.
    pub fn monitor<T: Resource>(res: &ResourceArc<T>, env: Option<Env>, pid: LocalPid) -> Option<Owner> {
        let m = env_or_caller(env, |e| res.monitor(e, &pid));
        m.map(|m| Owner { pid, monitor: Some(m) })
    }

    /// True when `mon` is this owner's current monitor (a `down` for an earlier owner is stale).
    pub fn is_monitor(&self, mon: &Monitor) -> bool {
        self.monitor.as_ref() == Some(mon)
    }

    /// Moves ownership to `new_pid`: monitors the new owner, then drops the old monitor.
    /// Returns false (and changes nothing) when the new owner is already dead.
    pub fn transfer<T: Resource>(&mut self, res: &ResourceArc<T>, env: Option<Env>, new_pid: LocalPid) -> bool {
        match res.monitor(env, &new_pid) {
            Some(m) => {
                if let Some(old) = self.monitor.take() {
                    res.demonitor(env, &old);
                }
                self.pid = new_pid;
                self.monitor = Some(m);
                true
            }
            None => false,
        }
    }

    /// Stops monitoring (the handle closed by itself).
    pub fn release<T: Resource>(&mut self, res: &ResourceArc<T>, env: Option<Env>) {
        if let Some(old) = self.monitor.take() {
            env_or_caller(env, |e| res.demonitor(e, &old));
        }
    }
}
