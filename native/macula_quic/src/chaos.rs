//! Random pauses for hunting races in the test suite (`bin/chaos`); only in builds with the
//! `test_hooks` feature, and only when `MACULA_QUIC_CHAOS_US` is set to a positive number.
//!
//! Why: a race between a runtime thread and a BEAM process can need a window of microseconds
//! (a test that acted on a counter a moment before the task it waited for had ended failed once
//! in many CI runs). Pausing the threads at random where their work becomes visible to
//! processes (between a shard's task polls, as a runtime worker picks up a shard, before a
//! message is sent, as an owner's exit is handled) widens such windows, so a suite run finds in
//! minutes what CI would find in weeks.

#[cfg(feature = "test_hooks")]
mod imp {
    use std::cell::Cell;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    /// Longest pause, in microseconds (0: off).
    fn max_us() -> u64 {
        static MAX: OnceLock<u64> = OnceLock::new();
        *MAX.get_or_init(|| std::env::var("MACULA_QUIC_CHAOS_US").ok().and_then(|v| v.parse().ok()).unwrap_or(0))
    }

    /// A xorshift generator per thread, seeded apart from the others (a shared counter) and
    /// from earlier runs (the clock).
    fn next() -> u64 {
        static SEEDS: AtomicU64 = AtomicU64::new(0);
        thread_local! { static STATE: Cell<u64> = const { Cell::new(0) }; }
        STATE.with(|s| {
            let mut x = s.get();
            if x == 0 {
                let clock = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
                // (Never 0: xorshift would stay there.)
                x = (clock ^ SEEDS.fetch_add(0x9E37_79B9_7F4A_7C15, Ordering::Relaxed)) | 1;
            }
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            s.set(x);
            x
        })
    }

    /// One time in four, sleeps for up to the configured maximum.
    pub fn pause() {
        let max = max_us();
        if max == 0 {
            return;
        }
        let r = next();
        if r.is_multiple_of(4) {
            std::thread::sleep(Duration::from_micros((r >> 8) % max));
        }
    }
}

#[cfg(feature = "test_hooks")]
pub use imp::pause;

/// Without `test_hooks`: nothing, compiled away.
#[cfg(not(feature = "test_hooks"))]
#[inline(always)]
pub fn pause() {}
