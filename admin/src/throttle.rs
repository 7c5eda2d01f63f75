//! Failed operator sign-ins and bearer tokens, slowed per client address.
//!
//! Each client has a bucket of [`BURST`] failures that refills at [`PER_SECOND`]; once it is
//! empty, that client's wrong attempts are answered 429 with `Retry-After`, so a guesser learns
//! nothing more than that it is slowed. The valid token is never throttled: it is compared
//! first, so others' failures from the same address (behind one balancer) cannot lock the
//! operator out. A client is its address (an IPv6 one by its /64), or behind a load balancer
//! listed in `[admin] trusted_proxies` the address in its `X-Forwarded-For`. Successes cost
//! nothing. Failures are counted in `tollgate_admin_auth_failures_total` and logged with
//! the address, at most one line a second.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;

/// Failures an address may make back to back.
pub const BURST: i64 = 5;
/// Failures an address earns back per second.
pub const PER_SECOND: i64 = 2;
const INTERVAL_MS: i64 = 1_000 / PER_SECOND;
/// Addresses remembered at once; past this, the ones whose buckets are full again are forgotten.
const ADDRESSES: usize = 10_000;

#[derive(Default)]
pub struct AuthThrottle {
    /// Per address, when its bucket is full again (GCRA's theoretical arrival time, Unix ms).
    full_at: Mutex<HashMap<IpAddr, i64>>,
    last_log_s: AtomicI64,
    unlogged: AtomicU64,
}

impl AuthThrottle {
    /// `Err(retry_after_s)` while `ip` has no failure left to spend.
    pub fn check(&self, ip: IpAddr, now: i64) -> Result<(), i64> {
        let ip = gateway::forwarded::client_key(ip);
        let map = self.full_at.lock().unwrap_or_else(|e| e.into_inner());
        match map.get(&ip) {
            Some(&full) if full - now > (BURST - 1) * INTERVAL_MS => {
                let wait = full - now - (BURST - 1) * INTERVAL_MS;
                Err((wait + 999) / 1_000)
            }
            _ => Ok(()),
        }
    }

    /// Spends one of `ip`'s failures, counts it, and logs it (at most a line a second).
    pub fn failed(&self, ip: IpAddr, now: i64, what: &str) {
        let key = gateway::forwarded::client_key(ip);
        {
            let mut map = self.full_at.lock().unwrap_or_else(|e| e.into_inner());
            if map.len() >= ADDRESSES && !map.contains_key(&key) {
                map.retain(|_, full| *full > now);
            }
            let full = map.entry(key).or_insert(now);
            *full = (*full).max(now) + INTERVAL_MS;
        }
        gateway::metrics::ADMIN_AUTH_FAILURES.inc();
        let second = now.div_euclid(1_000);
        let last = self.last_log_s.load(Ordering::Relaxed);
        if second > last
            && self
                .last_log_s
                .compare_exchange(last, second, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            let more = self.unlogged.swap(0, Ordering::Relaxed);
            tracing::warn!(client = %ip, also_failed = more, "{what}: wrong admin token");
        } else {
            self.unlogged.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_gets_a_burst_then_a_few_a_second_and_others_are_untouched() {
        let t = AuthThrottle::default();
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let now = 1_000_000;
        for _ in 0..BURST {
            assert!(t.check(a, now).is_ok());
            t.failed(a, now, "test");
        }
        assert_eq!(t.check(a, now), Err(1));
        assert!(t.check(b, now).is_ok(), "another address is not slowed");
        assert!(t.check(a, now + INTERVAL_MS - 1).is_err());
        assert!(
            t.check(a, now + INTERVAL_MS).is_ok(),
            "one more after an interval"
        );
        t.failed(a, now + INTERVAL_MS, "test");
        assert!(t.check(a, now + INTERVAL_MS).is_err());
        // over ten seconds of hammering: the burst, then two a second
        let mut passed = 0;
        for ms in (0..10_000).step_by(10) {
            let at = now + 2 * INTERVAL_MS + ms;
            if t.check(a, at).is_ok() {
                t.failed(a, at, "test");
                passed += 1;
            }
        }
        assert!((19..=21).contains(&passed), "{passed}");
    }
}
