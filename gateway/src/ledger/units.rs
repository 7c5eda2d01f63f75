//! Several nodes: a meter's period use (`period_units`) counted from everyone's use. Each
//! node counts the units the store had when it loaded a key plus what it charged since; after
//! each flush it commits, the flusher reads every node's committed units of the capped keys it
//! holds and each account's count becomes that plus its own not yet flushed
//! ([`Ledger::units_to_refresh`], [`Ledger::refresh_units`]): what `/usage/limits` shows and
//! what tells a node the allowance is spent. The cap itself holds across nodes by the slices
//! of it each node leases (`lease.rs`, `PeriodHeld::units`).

use super::Ledger;
use crate::meters::{Units, MAX_METERS};

impl Ledger {
    /// The accounts held here whose plan caps a meter, with the start of the period their
    /// allowance counts: what the flusher reads the store's units for.
    pub fn units_to_refresh(&self) -> Vec<(i64, i64)> {
        let by_id = self.by_id.lock().unwrap_or_else(|e| e.into_inner());
        by_id
            .iter()
            .filter_map(|(id, a)| {
                let a = a.upgrade()?;
                let s = a.lock();
                let capped = s.plan.limits.period_units.iter().any(|&n| n > 0);
                if s.guest || !(capped || s.plan.limits.includes.is_some()) {
                    return None;
                }
                Some((*id, s.limits.as_ref()?.period.start))
            })
            .collect()
    }

    /// The units every node committed for account `id` in the period beginning at `start`
    /// (read after this node's last flush committed, before the next): its count becomes
    /// those plus what it charged since that flush; so do its requests, on a plan that
    /// includes requests (what admission estimates the plan pays from). A count of another
    /// period is left alone.
    pub fn refresh_units(&self, id: i64, start: i64, committed: &Units, requests: Option<i64>) {
        let Some(a) = self.account(id) else {
            return;
        };
        let mut guard = a.lock();
        let s = &mut *guard;
        let (pending, pending_requests) = s.activity.as_ref().map_or(([0; MAX_METERS], 0), |act| {
            (act.pending.units, act.pending.requests)
        });
        let includes_requests = s.plan.limits.includes.is_some_and(|i| i.requests > 0);
        let Some(state) = s.limits.as_mut().filter(|l| l.period.start == start) else {
            return;
        };
        for i in 0..MAX_METERS {
            state.period.units[i] = committed[i] + pending[i];
        }
        if let Some(n) = requests.filter(|_| includes_requests) {
            state.period.requests = n + pending_requests;
        }
    }
}

impl Ledger {
    /// Whether account `id`'s plan includes requests (its period's requests are read back
    /// from every node's after each flush, beside the units).
    pub fn includes_requests(&self, id: i64) -> bool {
        self.account(id).is_some_and(|a| {
            a.lock()
                .plan
                .limits
                .includes
                .is_some_and(|i| i.requests > 0)
        })
    }

    /// An operator's correction of meter `meter`'s units for account `id`, committed: its
    /// period's count moves with it (never below nothing), so units given back are room again.
    pub fn correct_units(&self, id: i64, meter: usize, units: i64) {
        let Some(a) = self.account(id) else {
            return;
        };
        let mut guard = a.lock();
        if let Some(state) = guard.limits.as_mut() {
            if let Some(n) = state.period.units.get_mut(meter) {
                *n = (*n + units).max(0);
            }
        }
    }
}
