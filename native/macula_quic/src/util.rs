//! Small helpers shared by every module.
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, TryLockError};

use rustler::Term;

/// Locks a mutex, ignoring poisoning.
///
/// A panic while a lock is held is already turned into an error for the caller (rustler catches
/// panics in NIFs, tokio in tasks); the state behind our locks stays consistent between
/// statements, so refusing every later caller would only turn one failure into many.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The elements of a proper list of at most `max` elements, or `None` for anything else: not a
/// list, an improper list, or a longer one (left unread past `max`).
///
/// Rustler's `ListIterator` (and so its `Vec` decoder) panics on an improper list; this never
/// does, and never walks more than `max + 1` cells of a huge one.
pub fn list_items(term: Term<'_>, max: usize) -> Option<Vec<Term<'_>>> {
    let mut items = Vec::new();
    let mut rest = term;
    loop {
        if rest.is_empty_list() {
            return Some(items);
        }
        let (head, tail) = rest.list_get_cell().ok()?;
        if items.len() == max {
            return None;
        }
        items.push(head);
        rest = tail;
    }
}

/// A process-wide list of items, each removed when the guard `add` returned is dropped. The
/// socket watches keep their duplicate descriptors in one each (`spin`, `inline_watch`):
/// removal happens under the same lock a watch holds while it looks at the items, so once a
/// guard's drop returns, no watch is still using its item (and a duplicate it owned is closed).
pub struct Registry<T: 'static> {
    items: Mutex<Vec<(u64, T)>>,
    next_id: AtomicU64,
}

impl<T: 'static> Registry<T> {
    pub const fn new() -> Self {
        Registry { items: Mutex::new(Vec::new()), next_id: AtomicU64::new(1) }
    }

    /// Adds `item`; it stays listed until the returned guard is dropped.
    pub fn add(&'static self, item: T) -> Registered<T> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        lock(&self.items).push((id, item));
        Registered { registry: self, id }
    }

    /// The items, locked.
    pub fn lock(&self) -> MutexGuard<'_, Vec<(u64, T)>> {
        lock(&self.items)
    }

    /// The items, unless another thread holds them right now.
    pub fn try_lock(&self) -> Option<MutexGuard<'_, Vec<(u64, T)>>> {
        match self.items.try_lock() {
            Ok(g) => Some(g),
            Err(TryLockError::Poisoned(e)) => Some(e.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        }
    }
}

/// An item's place in a `Registry`; dropping it removes (and drops) the item.
pub struct Registered<T: 'static> {
    registry: &'static Registry<T>,
    id: u64,
}

impl<T: 'static> Registered<T> {
    pub fn id(&self) -> u64 {
        self.id
    }
}

impl<T: 'static> std::fmt::Debug for Registered<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Registered").field(&self.id).finish()
    }
}

impl<T: 'static> Drop for Registered<T> {
    fn drop(&mut self) {
        // Taken out under the lock, dropped after it is released (closing a descriptor is a
        // system call the watches need not wait for).
        let removed = {
            let mut items = lock(&self.registry.items);
            items.iter().position(|(id, _)| *id == self.id).map(|i| items.remove(i))
        };
        drop(removed);
    }
}
