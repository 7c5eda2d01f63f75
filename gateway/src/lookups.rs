//! Lookups of what a client names and the store may not have: a license key, a console
//! session, a checkout session. Each that finds nothing is remembered for a while (the
//! ledger's negative cache for keys; [`NotFound`] for the others), so asking again costs no
//! query; and every lookup takes its share of one budget for the whole process before it is
//! made ([`Lookups`], `proxy.unknown_lookups_per_second`), kept if it found nothing: while
//! the budget is spent, what is not in memory is refused without a query (429
//! `rate_limited`, `Retry-After: 1`), so a flood of made-up keys or cookies costs the
//! database at most the budget, however many arrive at once. Lookups that find what they
//! look for give their share back, so they spend nothing of it (during a flood, a key not
//! yet in memory waits for the budget like any other).

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

    /// A lookup's share of the budget, taken now if the budget has it (else the refusal is
    /// counted and `None` returned). Taken before the query, so lookups made together cannot
    /// all pass before any is counted, and the budget is never overdrawn by more than one;
    /// given back when the guard drops, unless the lookup found nothing
    /// ([`Reserved::found_nothing`]).
    pub fn may_look_up(&self, what: &'static str) -> Option<Reserved<'_>> {
        if self.interval_ns == 0 {
            return Some(Reserved {
                lookups: self,
                kept: true,
            });
        }
        let now = mono_ns();
        let mut tat = self.tat.load(Ordering::Relaxed);
        loop {
            if tat - now > self.burst_ns {
                metrics::LOOKUPS_REFUSED.with_label_values(&[what]).inc();
                return None;
            }
            let next = tat.max(now) + self.interval_ns;
            match self
                .tat
                .compare_exchange_weak(tat, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => {
                    return Some(Reserved {
                        lookups: self,
                        kept: false,
                    })
                }
                Err(t) => tat = t,
            }
        }
    }
}

/// A lookup's share of the budget, given back when dropped: a lookup that found what it
/// looked for (or could not be answered) spends nothing.
pub struct Reserved<'a> {
    lookups: &'a Lookups,
    kept: bool,
}

impl Reserved<'_> {
    /// The lookup found nothing: its share stays spent.
    pub fn found_nothing(mut self) {
        self.kept = true;
    }
}

impl Drop for Reserved<'_> {
    fn drop(&mut self) {
        if !self.kept {
            self.lookups
                .tat
                .fetch_sub(self.lookups.interval_ns, Ordering::Relaxed);
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
            if let Some(r) = l.may_look_up("test") {
                allowed += 1;
                r.found_nothing();
            }
        }
        // a second's burst and the one that makes it cross, not the hundred
        assert!((10..=12).contains(&allowed), "{allowed}");
        let unlimited = Lookups::new(0);
        for _ in 0..1_000 {
            unlimited.may_look_up("test").unwrap().found_nothing();
        }
    }

    #[test]
    fn lookups_made_together_take_their_share_first_and_found_ones_give_it_back() {
        let l = Lookups::new(10);
        // a thousand at once: no more pass than the budget holds, however many are in flight
        let held: Vec<_> = (0..1_000).filter_map(|_| l.may_look_up("test")).collect();
        assert!((10..=12).contains(&held.len()), "{}", held.len());
        assert!(l.may_look_up("test").is_none());
        // they all found what they looked for: the budget is whole again
        drop(held);
        let again: Vec<_> = (0..1_000).filter_map(|_| l.may_look_up("test")).collect();
        assert!((10..=12).contains(&again.len()), "{}", again.len());
    }
}
