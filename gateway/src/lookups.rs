//! Lookups of what a client names and the store may not have: a license key, a console
//! session, a checkout session. Each that finds nothing is remembered for a while (the
//! ledger's negative cache for keys; [`NotFound`] for the others), so asking again costs no
//! query; and every lookup that found nothing spends from one budget for the whole process
//! ([`Lookups`], `proxy.unknown_lookups_per_second`): while it is spent, what is not in memory
//! is refused without a query (429 `rate_limited`, `Retry-After: 1`), so a flood of made-up
//! keys or cookies costs the database at most the budget. Lookups that find what they look
//! for spend nothing: a node warming up on its customers' keys is never slowed by it.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use crate::metrics;

/// The budget of lookups that found nothing: GCRA over the monotonic clock, a second's worth
/// of burst.
pub struct Lookups {
    /// Nanoseconds one lookup that found nothing costs (0: no budget).
    interval_ns: i64,
    burst_ns: i64,
    /// GCRA's theoretical arrival time, ns on this process's monotonic clock.
    tat: AtomicI64,
}

fn mono_ns() -> i64 {
    static ORIGIN: std::sync::LazyLock<std::time::Instant> =
        std::sync::LazyLock::new(std::time::Instant::now);
    ORIGIN.elapsed().as_nanos() as i64
}

impl Lookups {
    /// A budget of `per_second` lookups that find nothing (0: unlimited).
    pub fn new(per_second: u64) -> Lookups {
        let interval_ns = if per_second == 0 {
            0
        } else {
            (1_000_000_000 / per_second.min(1_000_000_000)) as i64
        };
        Lookups {
            interval_ns,
            burst_ns: 1_000_000_000,
            tat: AtomicI64::new(0),
        }
    }

    /// Whether a lookup may be made now; counts the refusal when not.
    pub fn may_look_up(&self, what: &'static str) -> bool {
        if self.interval_ns == 0 {
            return true;
        }
        let ok = self.tat.load(Ordering::Relaxed) - mono_ns() <= self.burst_ns;
        if !ok {
            metrics::LOOKUPS_REFUSED.with_label_values(&[what]).inc();
        }
        ok
    }

    /// A lookup found nothing: it spends from the budget.
    pub fn found_nothing(&self) {
        if self.interval_ns == 0 {
            return;
        }
        let now = mono_ns();
        let mut tat = self.tat.load(Ordering::Relaxed);
        loop {
            let next = tat.max(now) + self.interval_ns;
            match self
                .tat
                .compare_exchange_weak(tat, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return,
                Err(t) => tat = t,
            }
        }
    }
}

/// Values looked up lately and not found (console sessions, checkout sessions), for a while.
pub struct NotFound(moka::sync::Cache<[u8; 32], ()>);

impl NotFound {
    pub fn new(ttl: Duration) -> NotFound {
        NotFound(
            moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(ttl.max(Duration::from_millis(1)))
                .build(),
        )
    }

    /// Whether `value` was looked up lately and not found.
    pub fn contains(&self, value: &[u8]) -> bool {
        self.0.contains_key(&digest(value))
    }

    pub fn insert(&self, value: &[u8]) {
        self.0.insert(digest(value), ());
    }

    pub fn forget(&self, value: &[u8]) {
        self.0.invalidate(&digest(value));
    }
}

fn digest(value: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(value).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_lets_a_second_s_worth_through_then_what_refills() {
        let l = Lookups::new(10);
        let mut allowed = 0;
        for _ in 0..100 {
            if l.may_look_up("test") {
                allowed += 1;
                l.found_nothing();
            }
        }
        // a second's burst and the one that makes it cross, not the hundred
        assert!((10..=12).contains(&allowed), "{allowed}");
        let unlimited = Lookups::new(0);
        for _ in 0..1_000 {
            assert!(unlimited.may_look_up("test"));
            unlimited.found_nothing();
        }
    }
}
