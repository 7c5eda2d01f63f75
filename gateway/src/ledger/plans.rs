//! Plans as the hot path holds them: interned, so a million accounts on four plans share four,
//! each with its [`PlanLimits`] built once from the validated config; and where an account
//! stands against them (`/usage/limits`). The limits themselves are in [`crate::limits`].

use std::sync::{Arc, Mutex};

use http::HeaderValue;

use super::{Account, AccountState, Ledger, LicenseState, PeriodUsage};
use crate::limits::{At, LimitState, LimitView, PlanLimits, Request, Unit};
use crate::meters::{Units, MAX_METERS};

/// A plan as the hot path sees it: its name, the same as a header value ready for
/// `X-Tollgate-Plan`, and its limits.
#[derive(Debug)]
pub struct PlanName {
    pub name: Box<str>,
    pub header: HeaderValue,
    pub limits: PlanLimits,
    /// A higher plan (later in `[[plans]]`) is for sale: a refusal for a spent allowance says
    /// where to upgrade.
    pub upgradable: bool,
}

/// Plans by name, shared. A license whose plan is not in the config is limited as `free`.
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
        let at = (self.configured.iter().position(|p| p.name == name))
            .or_else(|| self.configured.iter().position(|p| p.name == "free"));
        let limits = at
            .map(|i| PlanLimits::from_plan(&self.configured[i]))
            .unwrap_or_default();
        let upgradable =
            at.is_some_and(|i| self.configured[i + 1..].iter().any(|p| p.price.is_some()));
        let p = Arc::new(PlanName {
            name: name.into(),
            header,
            limits,
            upgradable,
        });
        plans.push(p.clone());
        p
    }
}

impl Ledger {
    /// The start of the plan period an account is in at `now` (Unix ms): the one its limits
    /// count while it lasts, else the calendar's from its anchor. Charges, allowances and lease
    /// asks all name the period by it.
    pub(super) fn period_start(&self, s: &AccountState, now: i64) -> i64 {
        match s.limits.as_deref() {
            Some(l) if now < l.period.end => l.period.start,
            _ => self.calendar.period(s.period_anchor, now).0,
        }
    }

    /// A new period gives what the plan includes whole (what is pending from before the
    /// boundary is committed in it, and taken from it, as the store does). Admission and a
    /// stream's check both look.
    pub(super) fn renew_included(&self, s: &mut AccountState, now: i64) {
        if let Some(i) = s.plan.limits.included_ms {
            let start = self.period_start(s, now);
            if s.included.is_none_or(|c| c.start < start) {
                s.included = Some(super::account::Included { start, left_ms: i });
            }
        }
    }

    /// The plan a license named `name` is limited by (an unknown name: `free`'s limits).
    pub fn plan(&self, name: &str) -> Arc<PlanName> {
        self.plans.intern(name)
    }

    /// Where an account stands against its plan's limits now: as metered here, unflushed use
    /// included. `None` when its plan counts use over a period or a day and this account has
    /// not measured the current one; then [`Ledger::limits_of`] describes what the store read.
    pub fn limits_now(&self, account: &Account) -> Option<Vec<LimitView>> {
        self.limits_now_with(account, None)
    }

    /// [`Ledger::limits_now`] with the period's use as the store measured it (`measured`:
    /// every node's committed flushes) when that is more than this node saw: on several nodes
    /// the others' use counts too, this node's uncommitted use added to it.
    pub fn limits_now_with(
        &self,
        account: &Account,
        measured: Option<PeriodUsage>,
    ) -> Option<Vec<LimitView>> {
        let now = self.now();
        let at = At {
            wall: now.wall,
            mono: now.mono,
        };
        let s = account.lock();
        let req = Request {
            body_len: None,
            in_flight: s.activity.as_ref().map_or(0, |a| a.in_flight()),
            nodes: self.live_nodes(),
            period_left: None,
            cost: 1,
            in_flight_requests: 0,
        };
        let limits = &s.plan.limits;
        let reserved = s
            .activity
            .as_ref()
            .map_or([0; MAX_METERS], |a| a.reserved().1);
        // the period's and the day's use are only known here once measured this period
        let nothing_to_measure = limits.period.is_none()
            && limits.upload.is_none()
            && limits.period_units.iter().all(|&n| n <= 0);
        match s.limits.as_deref() {
            Some(state) if nothing_to_measure || now.wall < state.period.end => {
                let Some(m) = measured.filter(|m| m.start == state.period.start) else {
                    return Some(self.describe(limits, state, &req, at, &reserved));
                };
                let pending = s.activity.as_ref().map(|a| a.pending).unwrap_or_default();
                let mut state = state.clone();
                let p = &mut state.period;
                p.used_ms = p.used_ms.max(m.used_ms + pending.time_ms());
                p.requests = p.requests.max(m.requests + pending.requests);
                for i in 0..MAX_METERS {
                    p.units[i] = p.units[i].max(m.units[i] + pending.units[i]);
                }
                Some(self.describe(limits, &state, &req, at, &reserved))
            }
            None if nothing_to_measure => {
                Some(self.describe(limits, &LimitState::default(), &req, at, &reserved))
            }
            _ => None,
        }
    }

    /// Every limit's lines, then one a meter the plan caps (`period_units.<meter>`): what the
    /// period charged, and what is left beside the reservations of requests in flight.
    fn describe(
        &self,
        limits: &PlanLimits,
        state: &LimitState,
        req: &Request,
        at: At,
        reserved: &Units,
    ) -> Vec<LimitView> {
        let mut out = limits.describe(state, req, at);
        let p = &state.period;
        // what the plan includes of requests and units, first: spent before the balance
        if let Some(inc) = limits.includes {
            let line = |name, unit, max: i64, used: i64| LimitView {
                name,
                unit,
                max,
                used: Some(used.min(max)),
                remaining: Some(crate::store::included::left(max, used)),
                window_start: Some(p.start),
                resets_at: Some(p.end),
            };
            let mut lines = Vec::new();
            if inc.requests > 0 {
                lines.push(line(
                    "included_requests",
                    Unit::Requests,
                    inc.requests,
                    p.requests,
                ));
            }
            for (i, &max) in inc.units.iter().enumerate().filter(|(_, &n)| n > 0) {
                let name = self.included_unit_names[i];
                lines.push(line(name, Unit::Units, max, p.units[i]));
            }
            out.splice(0..0, lines);
        }
        for (i, &max) in limits.period_units.iter().enumerate() {
            if max <= 0 {
                continue;
            }
            out.push(LimitView {
                name: self.unit_limit_name(i as u8),
                unit: Unit::Units,
                max,
                used: Some(p.units[i]),
                remaining: Some((max - p.units[i] - reserved[i]).max(0)),
                window_start: Some(p.start),
                resets_at: Some(p.end),
            });
        }
        out
    }

    /// A period's use as the store measured it (`row.period`), with its units by meter
    /// (`row.period_units`, by name) in the ledger's order.
    pub fn measured_period(&self, row: &LicenseState) -> Option<PeriodUsage> {
        let mut p = row.period?;
        for (name, n) in &row.period_units {
            if let Some(i) = self.meter_names.iter().position(|m| m == name) {
                p.units[i] = *n;
            }
        }
        Some(p)
    }

    /// Where a license stands against `plan`'s limits, from a state the store measured (its
    /// period's and today's use); rates and concurrency read as unused.
    pub fn limits_of(&self, plan: &PlanName, state: &LimitState) -> Vec<LimitView> {
        let now = self.now();
        let at = At {
            wall: now.wall,
            mono: now.mono,
        };
        self.describe(
            &plan.limits,
            state,
            &Request::default(),
            at,
            &[0; MAX_METERS],
        )
    }
}
