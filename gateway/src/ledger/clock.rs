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
    /// Both at one moment: (wall, mono).
    fn read(&self) -> (i64, i64) {
        (self.now_ms(), self.mono_ms())
    }
    /// Whether this is the machine's own clock (which a store shared by several nodes replaces
    /// with one that follows the database's, [`SyncedClock`]).
    fn is_system(&self) -> bool {
        false
    }
}

/// The system's clocks.
pub struct SystemClock;

static ORIGIN: LazyLock<Instant> = LazyLock::new(Instant::now);

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        now_ms()
    }

    fn mono_ms(&self) -> i64 {
        mono_ms()
    }

    fn is_system(&self) -> bool {
        true
    }
}

fn mono_ms() -> i64 {
    ORIGIN.elapsed().as_millis() as i64
}

/// A clock that follows the database's where several processes share it: the monotonic clock
/// plus an offset taken from the database's clock ([`SyncedClock::sync`]), so every node (and
/// every process of one node) stamps sessions, leases and heartbeats on one time line, however
/// far its own wall clock is off. Wall time is the monotonic time plus the offset, exactly, so
/// a span's length on it is the monotonic duration; the offset moves only when the database's
/// time and this one part by more than [`SyncedClock::STEP_MS`] (a clock stepped on either
/// side, a suspended machine), never by the jitter of a measurement.
pub struct SyncedClock {
    offset: AtomicI64,
}

impl SyncedClock {
    /// How far this clock and the database's may part before the offset is moved.
    pub const STEP_MS: i64 = 250;

    /// A clock that reads the system's wall time until it is first synced.
    pub fn new() -> Arc<SyncedClock> {
        Arc::new(SyncedClock {
            offset: AtomicI64::new(now_ms() - mono_ms()),
        })
    }

    /// The database read `db_ms` between the monotonic instants `sent` and `received`; takes
    /// its time as the midpoint's (off by at most half the round trip). Moves the offset when
    /// it parts from the current one by more than [`Self::STEP_MS`], or always when `force`
    /// (the first reading). Returns the correction applied (0: none).
    pub fn sync(&self, db_ms: i64, sent: i64, received: i64, force: bool) -> i64 {
        let measured = db_ms - (sent + received) / 2;
        let current = self.offset.load(Ordering::SeqCst);
        let step = measured - current;
        if force || step.abs() > Self::STEP_MS {
            self.offset.store(measured, Ordering::SeqCst);
            step
        } else {
            0
        }
    }

    /// The monotonic time now, to bracket a reading of the database's clock.
    pub fn mono_now(&self) -> i64 {
        mono_ms()
    }
}

impl Clock for SyncedClock {
    fn now_ms(&self) -> i64 {
        mono_ms() + self.offset.load(Ordering::SeqCst)
    }

    fn mono_ms(&self) -> i64 {
        mono_ms()
    }

    fn read(&self) -> (i64, i64) {
        let mono = mono_ms();
        (mono + self.offset.load(Ordering::SeqCst), mono)
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
        let (wall, mono) = clock.read();
        Now { wall, mono }
    }

    /// The wall time of monotonic instant `mono`, as the wall clock reads now.
    pub fn wall_of(self, mono: i64) -> i64 {
        self.wall - (self.mono - mono)
    }
}
