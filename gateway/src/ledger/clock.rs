//! Time for the ledger: the wall clock for what is stored and shown, a monotonic clock for what
//! is charged.
//!
//! Durations (a request's, a session's, an idle gap, a rate bucket's refill) are measured on the
//! monotonic clock, so a step of the wall clock (NTP, a resumed VM) is never charged or refunded.
//! Timestamps written to the store (a session's start, an alert's time) and calendar questions
//! (expiry, plan periods) read the wall clock.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Where the ledger reads the time.
pub trait Clock: Send + Sync + 'static {
    /// Wall-clock time in Unix milliseconds.
    fn now_ms(&self) -> i64;
    /// Milliseconds on a clock that never steps, from an arbitrary origin: only differences
    /// between two readings mean anything.
    fn mono_ms(&self) -> i64;
}

/// The system's clocks.
pub struct SystemClock;

static ORIGIN: LazyLock<Instant> = LazyLock::new(Instant::now);

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        now_ms()
    }

    fn mono_ms(&self) -> i64 {
        ORIGIN.elapsed().as_millis() as i64
    }
}

/// The current wall-clock time in Unix milliseconds.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// A clock that moves only when told to: for tests. Both clocks start at `start_ms`.
pub struct ManualClock {
    wall: AtomicI64,
    mono: AtomicI64,
}

impl ManualClock {
    pub fn new(start_ms: i64) -> Arc<ManualClock> {
        Arc::new(ManualClock {
            wall: AtomicI64::new(start_ms),
            mono: AtomicI64::new(start_ms),
        })
    }

    /// Time passes: both clocks move by `ms`.
    pub fn advance(&self, ms: i64) {
        self.wall.fetch_add(ms, Ordering::SeqCst);
        self.mono.fetch_add(ms, Ordering::SeqCst);
    }

    /// The wall clock is set forward (or back, with a negative `ms`); no time passes.
    pub fn step_wall(&self, ms: i64) {
        self.wall.fetch_add(ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> i64 {
        self.wall.load(Ordering::SeqCst)
    }

    fn mono_ms(&self) -> i64 {
        self.mono.load(Ordering::SeqCst)
    }
}

/// Both clocks read at one moment, to turn a monotonic instant into the wall time it was.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Now {
    pub wall: i64,
    pub mono: i64,
}

impl Now {
    pub fn read(clock: &dyn Clock) -> Now {
        Now {
            wall: clock.now_ms(),
            mono: clock.mono_ms(),
        }
    }

    /// The wall time of monotonic instant `mono`, as the wall clock reads now.
    pub fn wall_of(self, mono: i64) -> i64 {
        self.wall - (self.mono - mono)
    }
}
