//! Plans and their limits as the hot path holds them: interned plans, rate buckets (GCRA),
//! the period's allowance, and where an account stands against them (`/usage/limits`). The
//! checks themselves run in `Ledger::admit_request`, before anything is taken.

use std::sync::{Arc, Mutex};

use http::HeaderValue;

use super::{Account, Ledger, PeriodUsage};

/// An account against its plan's limits, for people (`/usage/limits`).
#[derive(Clone, Debug)]
pub struct LimitsNow {
    pub plan: Arc<PlanName>,
    pub in_flight: u32,
    pub rates: Vec<RateNow>,
    /// The current period's usage as metered here (unflushed usage included), if the account
    /// has been measured this period.
    pub period: Option<PeriodUsage>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateNow {
    pub rate: Rate,
    /// Requests that would be admitted now, back to back.
    pub remaining: u64,
    /// When the bucket is full again (Unix ms).
    pub full_at: i64,
}

/// Per-account limit state.
pub(super) struct LimitState {
    /// Theoretical arrival time of each rate of the plan (GCRA), in monotonic nanoseconds.
    pub(super) tat_ns: [i64; MAX_RATES],
    pub(super) period: PeriodUsage,
}

/// A plan as the hot path sees it: its name, the same as a header value ready for
/// `X-Tollgate-Plan`, and its limits.
#[derive(Debug)]
pub struct PlanName {
    pub name: Box<str>,
    pub header: HeaderValue,
    pub limits: PlanLimits,
}

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

    pub(super) fn interval_ns(&self) -> i64 {
        self.interval_ns
    }

    pub(super) fn tolerance_ns(&self) -> i64 {
        self.tolerance_ns
    }
}

/// A plan's limits (`[[plans]]`); `None` and an empty list are unlimited.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PlanLimits {
    pub rates: Vec<Rate>,
    pub max_concurrent: Option<u32>,
    pub max_body_bytes: Option<u64>,
    pub period_ms: Option<i64>,
    pub period_requests: Option<i64>,
}

impl PlanLimits {
    pub fn from_plan(p: &crate::config::Plan) -> PlanLimits {
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
        PlanLimits {
            rates,
            max_concurrent: p.max_concurrent.map(|n| n.min(u32::MAX as u64) as u32),
            max_body_bytes: p.max_body_bytes,
            period_ms: p.period_ms,
            period_requests: p.period_requests.map(|n| n as i64),
        }
    }

    /// Whether an account on this plan keeps limit state (buckets or a period).
    pub fn has_state(&self) -> bool {
        !self.rates.is_empty() || self.has_period()
    }

    pub fn has_period(&self) -> bool {
        self.period_ms.is_some() || self.period_requests.is_some()
    }
}

/// Plans by name, shared: a million accounts on four plans hold four of them. A license whose
/// plan is not in the config is limited as `free`.
#[derive(Default)]
pub(super) struct Plans {
    pub(super) configured: Vec<crate::config::Plan>,
    pub(super) interned: Mutex<Vec<Arc<PlanName>>>,
}

impl Plans {
    pub(super) fn intern(&self, name: &str) -> Arc<PlanName> {
        let mut plans = self.interned.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = plans.iter().find(|p| *p.name == *name) {
            return p.clone();
        }
        let header = HeaderValue::from_str(name)
            .unwrap_or_else(|_| HeaderValue::from_static("invalid-plan-name"));
        let limits = self
            .configured
            .iter()
            .find(|p| p.name == name)
            .or_else(|| self.configured.iter().find(|p| p.name == "free"))
            .map(PlanLimits::from_plan)
            .unwrap_or_default();
        let p = Arc::new(PlanName {
            name: name.into(),
            header,
            limits,
        });
        plans.push(p.clone());
        p
    }
}

impl Ledger {
    /// Where an account stands against its plan's limits now.
    pub fn limits_now(&self, account: &Account) -> LimitsNow {
        let now = self.now();
        let s = account.lock();
        let limits = &s.plan.limits;
        let now_ns = now.mono * 1_000_000;
        let tats = s.limits.as_ref().map(|l| l.tat_ns);
        let rates = limits
            .rates
            .iter()
            .enumerate()
            .map(|(i, rate)| {
                let tat = tats.map_or(0, |t| t[i]).max(now_ns);
                // requests that would pass now, back to back (see `admit_request`): the next
                // passes while `now + tolerance >= tat`, and each books one interval more.
                // Rounded down, as admission decides: a bucket one request short of room
                // has none.
                let room = (now_ns + rate.tolerance_ns() - tat).div_euclid(rate.interval_ns()) + 1;
                RateNow {
                    rate: *rate,
                    remaining: room.clamp(0, rate.requests as i64) as u64,
                    full_at: now.wall + (tat - now_ns + 999_999) / 1_000_000,
                }
            })
            .collect();
        LimitsNow {
            plan: s.plan.clone(),
            in_flight: s.activity.as_ref().map_or(0, |a| a.in_flight()),
            rates,
            period: s
                .limits
                .as_ref()
                .map(|l| l.period)
                .filter(|p| now.wall < p.end),
        }
    }
}
