//! `requests_per_second` / `_minute` / `_hour` / `_day`: rate limits as GCRA buckets, a burst
//! of `requests` and then a steady `requests` per window. Every bucket must have room before
//! any is booked; the state is one theoretical arrival time per rate, on the monotonic clock.

use super::{At, Denial, Limit, LimitState, LimitView, Request, Unit};
use crate::config::Plan;

/// At most this many rate limits per plan (per second, minute, hour, day).
pub const MAX_RATES: usize = 4;

/// One rate limit: a bucket of `requests`, refilled at `requests` per `window_ms` (GCRA): a
/// burst of `requests`, then a steady `requests` per window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    pub requests: u64,
    pub window_ms: i64,
    /// `second`, `minute`, `hour` or `day`.
    pub per: &'static str,
    /// Time between two requests at the steady rate, in nanoseconds (computed once: admission
    /// runs on every request).
    interval_ns: i64,
    /// How far ahead of now the bucket may be booked: a full bucket is a burst of `requests`.
    tolerance_ns: i64,
}

impl Rate {
    /// The steady interval and the tolerance of this node's share of the rate, when `nodes`
    /// live nodes split it: each books `nodes` intervals a request, and its burst is its share
    /// of the bucket (at least one request).
    fn shared(&self, nodes: u32) -> (i64, i64) {
        if nodes <= 1 {
            return (self.interval_ns, self.tolerance_ns);
        }
        let interval = self.interval_ns.saturating_mul(i64::from(nodes));
        (interval, (self.window_ms * 1_000_000 - interval).max(0))
    }

    pub fn new(requests: u64, window_ms: i64, per: &'static str) -> Rate {
        let interval_ns = (window_ms * 1_000_000 / requests.max(1) as i64).max(1);
        Rate {
            requests,
            window_ms,
            per,
            interval_ns,
            tolerance_ns: window_ms * 1_000_000 - interval_ns,
        }
    }

    fn name(&self) -> &'static str {
        match self.per {
            "second" => "requests_per_second",
            "minute" => "requests_per_minute",
            "hour" => "requests_per_hour",
            _ => "requests_per_day",
        }
    }
}

/// A plan's rate limits, in window order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Rates(pub Vec<Rate>);

impl Rates {
    pub fn from_plan(p: &Plan) -> Rates {
        let rates = [
            (p.requests_per_second, 1_000, "second"),
            (p.requests_per_minute, 60_000, "minute"),
            (p.requests_per_hour, 3_600_000, "hour"),
            (p.requests_per_day, 86_400_000, "day"),
        ]
        .into_iter()
        .filter_map(|(n, window_ms, per)| {
            n.filter(|n| *n > 0)
                .map(|requests| Rate::new(requests, window_ms, per))
        })
        .collect();
        Rates(rates)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Limit for Rates {
    fn check(&self, state: &LimitState, req: &Request, at: At) -> Result<(), Denial> {
        let now_ns = at.mono * 1_000_000;
        let mut wait_ns = 0;
        for (rate, tat) in self.0.iter().zip(&state.tat_ns) {
            let (interval_ns, tolerance_ns) = rate.shared(req.share());
            // a call counting as n requests needs room for n back to back
            let more = interval_ns.saturating_mul(req.cost() - 1);
            wait_ns = wait_ns.max((*tat).max(now_ns) + more - tolerance_ns - now_ns);
        }
        if wait_ns > 0 {
            return Err(Denial::RateLimited {
                retry_after_ms: (wait_ns + 999_999) / 1_000_000,
            });
        }
        Ok(())
    }

    fn admit(&self, state: &mut LimitState, req: &Request, at: At) {
        let now_ns = at.mono * 1_000_000;
        for (rate, tat) in self.0.iter().zip(&mut state.tat_ns) {
            *tat = (*tat).max(now_ns) + rate.shared(req.share()).0.saturating_mul(req.cost());
        }
    }

    fn describe(&self, state: &LimitState, req: &Request, at: At, out: &mut Vec<LimitView>) {
        let now_ns = at.mono * 1_000_000;
        for (rate, tat) in self.0.iter().zip(&state.tat_ns) {
            let (interval_ns, tolerance_ns) = rate.shared(req.share());
            let tat = (*tat).max(now_ns);
            // requests that would pass now, back to back (see `check`): the next passes while
            // `now + tolerance >= tat`, and each books one interval more. Rounded down, as
            // admission decides: a bucket one request short of room has none.
            let room = (now_ns + tolerance_ns - tat).div_euclid(interval_ns) + 1;
            // the bucket of this node's share: what a full one lets through back to back
            let max =
                (tolerance_ns / interval_ns + 1).min(rate.requests.min(i64::MAX as u64) as i64);
            let remaining = room.clamp(0, max);
            out.push(LimitView {
                name: rate.name(),
                unit: Unit::Requests,
                max,
                used: Some(max - remaining),
                remaining: Some(remaining),
                window_start: None,
                resets_at: Some(at.wall + (tat - now_ns + 999_999) / 1_000_000),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Requests admitted by one node over `ms` milliseconds, one asked every millisecond.
    fn admitted(rates: &Rates, nodes: u32, ms: i64) -> usize {
        let mut state = LimitState::default();
        let req = Request {
            nodes,
            ..Request::default()
        };
        (0..ms)
            .filter(|&t| {
                let at = At { wall: t, mono: t };
                let ok = rates.check(&state, &req, at).is_ok();
                if ok {
                    rates.admit(&mut state, &req, at);
                }
                ok
            })
            .count()
    }

    /// Split between three live nodes, a 10-a-second rate lets each node through its share:
    /// together what one node alone lets through, give or take a request a node for the
    /// rounding of the shared burst.
    #[test]
    fn a_rate_split_between_nodes_gives_each_its_share() {
        let rates = Rates(vec![Rate::new(10, 1_000, "second")]);
        // one node: a burst of 10, then one every 100 ms: 39 in 3 s
        let alone = admitted(&rates, 1, 3_000);
        assert_eq!(alone, 39);
        // each of three: a burst of 3, then one every 300 ms: 13 in 3 s, 39 together
        let each = admitted(&rates, 3, 3_000);
        assert_eq!(each, 13);
        assert!(
            (alone - 3..=alone + 3).contains(&(3 * each)),
            "{each} a node"
        );
        // the share shown is the node's
        let mut out = Vec::new();
        let req = Request {
            nodes: 3,
            ..Request::default()
        };
        rates.describe(
            &LimitState::default(),
            &req,
            At { wall: 0, mono: 0 },
            &mut out,
        );
        assert_eq!((out[0].max, out[0].remaining), (3, Some(3)));
    }
}
