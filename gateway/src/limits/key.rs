//! A key's own rules, checked beside its license's plan (`license_keys`): its expiry, its
//! `requests_per_second` and `max_concurrent`, and `max_seconds_per_day`, the request time it
//! may use in a UTC day. The license stays the account (balance, plan, allowances): these bound
//! one of its keys, and never give it more than the plan does. A key without rules of its own
//! has no gate, so it costs the hot path nothing.
//!
//! One gate per key id, shared by every cached copy of the key and by its requests in flight,
//! so a key read again (its license's keys changed) keeps its counts. The day's request time
//! counts the requests that ended that day (on the day each began, as the rollup does) and the
//! time so far of those in flight: a new request is refused once they reach the cap, and one
//! admitted below it runs to its end. On several nodes the rate and the concurrency cap are
//! split between the live nodes as a plan's are; the day's request time is the larger of what
//! the store's rollup held when the key was last read here and what this node counted (another
//! node's use of the key the same day is seen at the key's next read).

use std::sync::Mutex;

use super::{At, Denial, Limit, LimitState, MaxConcurrent, Rate, Rates, Request};
use crate::license::KeyRules;
use crate::store::rollup::day_of;

const DAY_MS: i64 = 86_400_000;

/// The `limit` a refusal names for a key's daily cap.
pub const DAILY_LIMIT: &str = "key.max_seconds_per_day";

pub struct KeyGate {
    pub id: i64,
    state: Mutex<GateState>,
}

struct GateState {
    expires_at: Option<i64>,
    rates: Rates,
    concurrent: Option<MaxConcurrent>,
    max_us_per_day: Option<i64>,
    /// The rate's theoretical arrival time.
    limit: LimitState,
    in_flight: u32,
    /// The sum of the monotonic ms its requests in flight were admitted at: with `in_flight`,
    /// the time they have run so far.
    in_flight_since_ms: i64,
    /// The UTC day `day_used_us` counts.
    day: i64,
    day_used_us: i64,
}

impl GateState {
    fn set(&mut self, rules: &KeyRules) {
        let l = &rules.limits;
        self.expires_at = rules.expires_at;
        self.rates = Rates(
            l.requests_per_second
                .filter(|n| *n > 0)
                .map(|n| Rate::new(u64::from(n), 1_000, "second"))
                .into_iter()
                .collect(),
        );
        self.concurrent = l.max_concurrent.map(|n| MaxConcurrent::new(u64::from(n)));
        self.max_us_per_day = l
            .max_seconds_per_day
            .map(|s| s.max(0).saturating_mul(1_000_000));
        // the store's count of the day, when it is of a later day or more than this node's
        // (another node's use, or this node's own flushed): counts only grow within a day
        if rules.day > self.day || (rules.day == self.day && rules.day_used_us > self.day_used_us) {
            self.day = rules.day;
            self.day_used_us = rules.day_used_us;
        }
    }

    fn request(&self, cost: u32, nodes: u32) -> Request {
        Request {
            in_flight: self.in_flight,
            nodes,
            cost,
            ..Request::default()
        }
    }

    fn check(&mut self, at: At, req: &Request) -> Result<(), Denial> {
        if self.expires_at.is_some_and(|e| e <= at.wall) {
            return Err(Denial::Expired);
        }
        if let Some(max) = self.max_us_per_day {
            let today = day_of(at.wall);
            if today > self.day {
                self.day = today;
                self.day_used_us = 0;
            }
            let running_ms = i64::from(self.in_flight) * at.mono - self.in_flight_since_ms;
            if self.day_used_us + running_ms.max(0) * 1_000 >= max {
                return Err(Denial::QuotaExceeded {
                    resets_at: (today + 1) * DAY_MS,
                    limit: DAILY_LIMIT,
                    lease_spent: false,
                });
            }
        }
        if let Some(c) = &self.concurrent {
            c.check(&self.limit, req, at)?;
        }
        self.rates.check(&self.limit, req, at)
    }
}

impl KeyGate {
    pub fn new(id: i64, rules: &KeyRules) -> KeyGate {
        let mut s = GateState {
            expires_at: None,
            rates: Rates::default(),
            concurrent: None,
            max_us_per_day: None,
            limit: LimitState::default(),
            in_flight: 0,
            in_flight_since_ms: 0,
            day: rules.day,
            day_used_us: rules.day_used_us,
        };
        s.set(rules);
        KeyGate {
            id,
            state: Mutex::new(s),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The key was read again (its license's keys changed): its rules as they are now; what
    /// it counted is kept.
    pub fn update(&self, rules: &KeyRules) {
        self.lock().set(rules);
    }

    /// Admission through the key: its checks first, then `license` (the license's own
    /// admission), and the key's booking (a rate token, a request in flight) only if that
    /// admitted it. The key is held meanwhile, so two requests of a key at its cap are never
    /// both admitted; a refusal takes nothing of either.
    pub fn admit<T>(
        &self,
        at: At,
        cost: u32,
        nodes: u32,
        license: impl FnOnce() -> Result<T, Denial>,
    ) -> Result<T, Denial> {
        let mut s = self.lock();
        let req = s.request(cost, nodes);
        s.check(at, &req)?;
        let admitted = license()?;
        let s = &mut *s;
        s.rates.admit(&mut s.limit, &req, at);
        s.in_flight += 1;
        s.in_flight_since_ms += at.mono;
        Ok(admitted)
    }

    /// The decision [`KeyGate::admit`] would take now on the key's own rules, taking nothing.
    pub fn check(&self, at: At, cost: u32, nodes: u32) -> Result<(), Denial> {
        let mut s = self.lock();
        let req = s.request(cost, nodes);
        s.check(at, &req)
    }

    /// An admitted request of the key, booked at `since_ms` (monotonic), ended after
    /// `duration_us`, at `wall` (Unix ms): its time counts on the day it began, as the rollup
    /// counts it.
    pub fn finish(&self, since_ms: i64, duration_us: u64, wall: i64) {
        let mut s = self.lock();
        if s.in_flight > 0 {
            s.in_flight -= 1;
            s.in_flight_since_ms -= since_ms;
        }
        let duration_us = i64::try_from(duration_us).unwrap_or(i64::MAX / 4);
        let day = day_of(wall - duration_us / 1_000);
        if day > s.day {
            s.day = day;
            s.day_used_us = 0;
        }
        if day == s.day {
            s.day_used_us = s.day_used_us.saturating_add(duration_us);
        }
    }

    /// The key's requests in flight here, and its request time today (µs).
    pub fn counts(&self, wall: i64) -> (u32, i64) {
        let s = self.lock();
        let today = if s.day == day_of(wall) {
            s.day_used_us
        } else {
            0
        };
        (s.in_flight, today)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::license::KeyLimits;

    fn at(ms: i64) -> At {
        At {
            wall: 1_700_000_000_000 + ms,
            mono: ms,
        }
    }

    fn gate(limits: KeyLimits) -> KeyGate {
        KeyGate::new(
            1,
            &KeyRules {
                limits,
                day: day_of(at(0).wall),
                ..KeyRules::default()
            },
        )
    }

    #[test]
    fn a_key_at_its_concurrency_cap_is_refused_and_a_refusal_takes_nothing() {
        let g = gate(KeyLimits {
            max_concurrent: Some(2),
            ..KeyLimits::default()
        });
        assert!(g.admit(at(0), 1, 1, || Ok(())).is_ok());
        // the license refuses: the key books nothing
        assert_eq!(
            g.admit(at(0), 1, 1, || Err::<(), _>(Denial::Revoked)),
            Err(Denial::Revoked)
        );
        assert!(g.admit(at(0), 1, 1, || Ok(())).is_ok());
        assert_eq!(
            g.admit(at(0), 1, 1, || Ok(())),
            Err(Denial::ConcurrencyLimit { max: 2 })
        );
        g.finish(at(0).mono, 10, at(1).wall);
        assert!(g.admit(at(1), 1, 1, || Ok(())).is_ok());
        // split between two nodes, each runs one
        assert_eq!(
            g.check(at(1), 1, 2),
            Err(Denial::ConcurrencyLimit { max: 1 })
        );
    }

    #[test]
    fn a_keys_rate_is_a_bucket_of_its_own() {
        let g = gate(KeyLimits {
            requests_per_second: Some(3),
            ..KeyLimits::default()
        });
        let ok = (0..10)
            .filter(|_| g.admit(at(0), 1, 1, || Ok(())).is_ok())
            .count();
        assert_eq!(ok, 3, "a burst of the rate");
        assert!(matches!(
            g.admit(at(0), 1, 1, || Ok(())),
            Err(Denial::RateLimited { .. })
        ));
        assert!(g.admit(at(334), 1, 1, || Ok(())).is_ok(), "refilled");
    }

    #[test]
    fn a_keys_day_of_request_time_is_capped_and_starts_again_the_next_day() {
        let g = KeyGate::new(
            1,
            &KeyRules {
                limits: KeyLimits {
                    max_seconds_per_day: Some(2),
                    ..KeyLimits::default()
                },
                day: day_of(at(0).wall),
                day_used_us: 1_500_000,
                ..KeyRules::default()
            },
        );
        assert!(g.admit(at(0), 1, 1, || Ok(())).is_ok());
        g.finish(at(0).mono, 600_000, at(600).wall);
        let Err(Denial::QuotaExceeded {
            resets_at, limit, ..
        }) = g.admit(at(601), 1, 1, || Ok(()))
        else {
            panic!("2.1 s of a 2 s day");
        };
        assert_eq!(limit, DAILY_LIMIT);
        assert_eq!(resets_at % DAY_MS, 0);
        assert!(resets_at > at(601).wall);
        // a read of the store with less than counted here changes nothing
        g.update(&KeyRules {
            limits: KeyLimits {
                max_seconds_per_day: Some(2),
                ..KeyLimits::default()
            },
            day: day_of(at(0).wall),
            day_used_us: 1_000,
            ..KeyRules::default()
        });
        assert!(g.check(at(602), 1, 1).is_err());
        // the next day
        assert!(g.admit(at(DAY_MS), 1, 1, || Ok(())).is_ok());
        assert_eq!(g.counts(at(DAY_MS).wall), (1, 0));
    }

    #[test]
    fn a_keys_requests_in_flight_count_against_its_day_as_they_run() {
        let g = gate(KeyLimits {
            max_seconds_per_day: Some(1),
            ..KeyLimits::default()
        });
        assert!(g.admit(at(0), 1, 1, || Ok(())).is_ok());
        assert!(g.admit(at(0), 1, 1, || Ok(())).is_ok());
        // two running for 0.5 s: a second of the day
        assert!(matches!(
            g.check(at(500), 1, 1),
            Err(Denial::QuotaExceeded { .. })
        ));
        g.finish(at(0).mono, 300_000, at(300).wall);
        assert!(g.check(at(400), 1, 1).is_ok(), "0.3 s ended, 0.4 s running");
        // a request that began before midnight counts on the day it began
        let midnight = (day_of(at(0).wall) + 1) * DAY_MS;
        g.finish(at(0).mono, 900_000, midnight + 100);
        assert_eq!(g.counts(midnight + 100), (0, 0));
    }

    #[test]
    fn an_expired_key_is_refused() {
        let g = KeyGate::new(
            1,
            &KeyRules {
                expires_at: Some(at(100).wall),
                ..KeyRules::default()
            },
        );
        assert!(g.check(at(99), 1, 1).is_ok());
        assert_eq!(g.check(at(100), 1, 1), Err(Denial::Expired));
    }
}
