//! Plans as the hot path holds them: interned, so a million accounts on four plans share four,
//! each with its [`PlanLimits`] built once from the validated config; and where an account
//! stands against them (`/usage/limits`). The limits themselves are in [`crate::limits`].

use std::sync::{Arc, Mutex};

use http::HeaderValue;

use super::{Account, Ledger, PeriodUsage};
use crate::limits::{At, LimitState, LimitView, PlanLimits, Request};

/// A plan as the hot path sees it: its name, the same as a header value ready for
/// `X-Tollgate-Plan`, and its limits.
#[derive(Debug)]
pub struct PlanName {
    pub name: Box<str>,
    pub header: HeaderValue,
    pub limits: PlanLimits,
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
        };
        let limits = &s.plan.limits;
        // the period's and the day's use are only known here once measured this period
        let nothing_to_measure = limits.period.is_none() && limits.upload.is_none();
        match s.limits.as_deref() {
            Some(state) if nothing_to_measure || now.wall < state.period.end => {
                let Some(m) = measured.filter(|m| m.start == state.period.start) else {
                    return Some(limits.describe(state, &req, at));
                };
                let pending = s.activity.as_ref().map(|a| a.pending).unwrap_or_default();
                let mut state = state.clone();
                let p = &mut state.period;
                p.used_ms = p.used_ms.max(m.used_ms + pending.charge_ms);
                p.requests = p.requests.max(m.requests + pending.requests);
                Some(limits.describe(&state, &req, at))
            }
            None if nothing_to_measure => Some(limits.describe(&LimitState::default(), &req, at)),
            _ => None,
        }
    }

    /// Where a license stands against `plan`'s limits, from a state the store measured (its
    /// period's and today's use); rates and concurrency read as unused.
    pub fn limits_of(&self, plan: &PlanName, state: &LimitState) -> Vec<LimitView> {
        let now = self.now();
        let at = At {
            wall: now.wall,
            mono: now.mono,
        };
        plan.limits.describe(state, &Request::default(), at)
    }
}
