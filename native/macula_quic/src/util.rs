//! Small helpers shared by every module.
use std::sync::{Mutex, MutexGuard};

/// Locks a mutex, ignoring poisoning.
///
/// A panic while a lock is held is already turned into an error for the caller (rustler catches
/// panics in NIFs, tokio in tasks); the state behind our locks stays consistent between
/// statements, so refusing every later caller would only turn one failure into many.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
