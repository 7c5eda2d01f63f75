//! `period_hours` / `period_minutes` and `period_requests`: the time and the requests a plan
//! allows per plan period (a calendar month from the license's anniversary by default; the
//! ledger rolls the period over, since it knows the calendar). What a request used counts in
//! the period it began in, so a give-back never takes from the next period. On several nodes a
//! node spends only the slices of the allowances it reserved in the store
//! ([`Request::period_left`]; ledger/lease.rs).

use super::{At, Denial, Limit, LimitState, LimitView, Request, Unit};
use crate::config::Plan;
use crate::license::PeriodUsage;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PeriodAllowance {
    pub time_ms: Option<i64>,
    pub requests: Option<i64>,
}

impl PeriodAllowance {
    pub fn from_plan(p: &Plan) -> Option<PeriodAllowance> {
        let a = PeriodAllowance {
            time_ms: p.period_ms,
            requests: p.period_requests.map(|n| n.min(i64::MAX as u64) as i64),
        };
        (a.time_ms.is_some() || a.requests.is_some()).then_some(a)
    }

    /// Whether a charge for a request admitted at `started_wall` (none: now) counts in the
    /// period `p`.
    pub fn counts(p: &PeriodUsage, started_wall: Option<i64>) -> bool {
        started_wall.is_none_or(|w| w >= p.start)
    }
}

impl Limit for PeriodAllowance {
    fn check(&self, state: &LimitState, req: &Request, _: At) -> Result<(), Denial> {
        let p = &state.period;
        let refused = |time: bool, lease_spent| Denial::QuotaExceeded {
            resets_at: p.end,
            limit: if time {
                "period_hours"
            } else {
                "period_requests"
            },
            lease_spent,
        };
        let over_time = self.time_ms.is_some_and(|max| p.used_ms >= max);
        // the calls in flight count already: each counts when it ends, so admitting past them
        // would let concurrent requests run over the allowance
        let over_count = self
            .requests
            .is_some_and(|max| p.requests + req.in_flight_requests + req.cost() > max);
        if over_time || over_count {
            return Err(refused(over_time, false));
        }
        // several nodes: only what this node reserved of the allowance is spent here
        if let Some(left) = req.period_left {
            let time_spent = self.time_ms.is_some() && left.ms <= 0;
            let count_spent = self.requests.is_some() && left.requests < req.cost();
            if time_spent || count_spent {
                return Err(refused(time_spent, left.may_ask));
            }
        }
        Ok(())
    }

    fn describe(&self, state: &LimitState, _: &Request, _: At, out: &mut Vec<LimitView>) {
        let p = &state.period;
        let line = |name, unit, max: i64, used: i64| LimitView {
            name,
            unit,
            max,
            used: Some(used),
            remaining: Some((max - used).max(0)),
            window_start: Some(p.start),
            resets_at: Some(p.end),
        };
        if let Some(max) = self.time_ms {
            out.push(line("period_hours", Unit::Milliseconds, max, p.used_ms));
        }
        if let Some(max) = self.requests {
            out.push(line("period_requests", Unit::Requests, max, p.requests));
        }
    }
}
