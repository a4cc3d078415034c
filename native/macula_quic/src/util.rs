//! Small helpers shared by every module.
use std::sync::{Mutex, MutexGuard};

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
