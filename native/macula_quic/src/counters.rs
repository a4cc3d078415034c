//! Live-object counters. Each native object increments its counter when created and decrements
//! it when dropped, so tests can prove that closing, owner death and garbage collection free
//! everything.
use std::sync::atomic::{AtomicI64, Ordering};

pub static LISTENERS: AtomicI64 = AtomicI64::new(0);
pub static CONNECTIONS: AtomicI64 = AtomicI64::new(0);
pub static STREAMS: AtomicI64 = AtomicI64::new(0);
pub static TASKS: AtomicI64 = AtomicI64::new(0);

/// Counts one live object of a kind for as long as it exists.
pub struct Live(&'static AtomicI64);

impl Live {
    pub fn new(counter: &'static AtomicI64) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        Live(counter)
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

pub fn get(counter: &AtomicI64) -> i64 {
    counter.load(Ordering::Relaxed)
}
