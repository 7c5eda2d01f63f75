//! Several nodes: balances and period allowances by lease. A node admits a key only from the
//! slice of its balance it reserved in the store (`held_ms`), and, on a plan with a period
//! allowance, from the slices of the period's time, requests and meters' units it reserved
//! (`period_held`; a meter's only when a reservation needs them, [`units_want`]),
//! so several nodes never spend more than the balance or the allowance beyond what one node
//! may (a request admitted with time left may finish past zero). A slice is asked for when a
//! key is first loaded, when a flush leaves less than half a slice, and on the request path
//! only when a slice is spent while the balance or allowance has more
//! (`Denial::InsufficientBalance { lease_spent }`, `Denial::QuotaExceeded { lease_spent }`;
//! after the store had nothing to give, not again for [`LEASE_RETRY_MS`]). A node that could
//! not renew its leases for their lifetime forgets them (other nodes may have been given
//! them). The store's side is in `store::ClusterStore::lease`; the calls in `crate::leases`.

use std::collections::HashMap;
use std::sync::Arc;

use super::account::AccountState;
use super::session::Activity;
use super::{Account, Ledger, LicenseStatus, PeriodUsage};
use crate::limits::PeriodLeft;
use crate::meters::{Units, MAX_METERS};
use crate::store::{Grant, LeaseAsk, PeriodAsk};

/// After a lease request the store had nothing for, the request path waits this long before it
/// asks again for that key (refusing meanwhile), so a client hammering a spent key costs the
/// database one statement a second, not one a request. Renewals after flushes go on.
pub const LEASE_RETRY_MS: i64 = 1_000;

/// How long a stream whose node's lease is spent (its balance having more) runs on while the
/// next renewal asks for a slice; past this without a grant (the database does not answer) it
/// is ended, as a request would be refused.
pub const STREAM_GRACE_MS: i64 = 2_000;

/// What is left of a node's slices of one plan period's allowances.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeriodHeld {
    /// The period they are of (its start); slices of another period are worth nothing.
    pub start: i64,
    pub ms: i64,
    pub requests: i64,
    /// Of each meter's allowance (`period_units`), by index.
    pub units: Units,
}

impl PeriodHeld {
    /// What this node may still use in the period beginning at `start`: its slices less its
    /// pending use, and less the requests in flight (each will count one).
    pub(super) fn left(
        &self,
        start: i64,
        activity: Option<&Activity>,
        may_ask: bool,
    ) -> PeriodLeft {
        let (ms, requests) = if self.start == start {
            (self.ms, self.requests)
        } else {
            (0, 0)
        };
        let (pending_ms, pending_requests) = activity.map_or((0, 0), |a| {
            (
                a.pending.time_ms(),
                a.pending.requests + a.in_flight_requests(),
            )
        });
        PeriodLeft {
            ms: ms - pending_ms,
            requests: requests - pending_requests,
            may_ask,
        }
    }

    /// What this node may still take of each meter's allowance in the period beginning at
    /// `start`: its slices less the units charged here and not yet flushed, and less what the
    /// priced requests in flight reserved.
    pub(super) fn units_left(&self, start: i64, activity: Option<&Activity>) -> Units {
        let mut left = if self.start == start {
            self.units
        } else {
            [0; MAX_METERS]
        };
        if let Some(a) = activity {
            let reserved = a.reserved().1;
            for i in 0..MAX_METERS {
                left[i] -= a.pending.units[i] + reserved[i];
            }
        }
        left
    }

    /// A committed flush took what it charged off the slices in the store (never below
    /// nothing): the same here. A meter's units reported past its slice stay owed here (below
    /// nothing), as they may well be (a report past the reservation): the store floors its
    /// row, and a grant the store committed before this flush but this node applies after
    /// would otherwise leave more here than the row holds. What is owed comes out of the
    /// next grant (asked for with it), and the heartbeat gives that much of the row back.
    pub(super) fn spend(&mut self, ms: i64, requests: i64, units: &Units) {
        self.ms = (self.ms - ms.max(0)).max(0);
        self.requests = (self.requests - requests.max(0)).max(0);
        for (held, &n) in self.units.iter_mut().zip(units) {
            *held -= n.max(0);
        }
    }
}

/// A slice of an allowance of `max` split between `nodes`: the configured slice, but no more
/// than a quarter of the node's share, so a small allowance is not all held by one node.
fn period_slice(configured: i64, max: i64, nodes: i64) -> i64 {
    configured.min(max / (4 * nodes.max(1))).max(1)
}

impl Ledger {
    /// The lease slice (ms of balance) on several nodes; `None` on one node.
    pub fn lease_slice_ms(&self) -> Option<i64> {
        self.lease_slice_ms
    }

    /// What an account wants of the store now: a slice of each thing whose slice here is less
    /// than half left (balance, the period's time, its requests) while the store may have
    /// more of it, plus what is already spent past the balance's slice; nothing within
    /// [`LEASE_RETRY_MS`] of an ask the store had nothing for. Nothing wanted is an ask of
    /// zeros.
    pub fn lease_ask(&self, account: &Account) -> LeaseAsk {
        self.ask_of(account.id, &account.lock())
    }

    fn ask_of(&self, id: i64, s: &AccountState) -> LeaseAsk {
        let mut ask = LeaseAsk {
            license_id: id,
            ..LeaseAsk::default()
        };
        let Some(slice) = self.lease_slice_ms else {
            return ask;
        };
        let now = self.clock.now_ms();
        // (the store had nothing a moment ago: not asked again yet; a meter's slices, asked
        // for alone, have their own moment)
        let asks = now >= s.lease_retry_at;
        let asks_units = now >= s.units_retry_at;
        if !asks && !asks_units {
            return ask;
        }
        // what priced requests in flight hold of it is not free to spend
        let reserved = s.activity.as_ref().map_or(0, |a| a.reserved().0);
        let free = s.spendable_ms() - reserved;
        let need = s.lease_need_ms;
        if asks && (2 * free < slice || free < need) && s.remaining_ms() - reserved > 0 {
            // a slice (or what the reservation a priced request was refused for lacks: the
            // part held already counts, so no remainder is stranded here while another node
            // lacks it), and what is already spent past the one held (usage not yet flushed:
            // a session's gap charged at a request's end may be larger than a slice), so that
            // a grant always leaves something to admit from
            ask.ms = slice.max(need - free.max(0)) + (-free).max(0);
        }
        let limits = &s.plan.limits;
        ask.included = limits.included_ms.map(|ms| crate::store::IncludedAsk {
            start: self.period_start(s, now),
            ms,
        });
        let caps = limits.period_units;
        let (Some(state), Some(held)) = (s.limits.as_ref(), s.period_held) else {
            return ask;
        };
        if limits.period.is_none() && caps.iter().all(|&n| n <= 0) {
            return ask;
        }
        // the period now: the one the state counts, or the next once that has ended
        let p = if now < state.period.end {
            state.period
        } else {
            let (start, end) = self.calendar.period(s.period_anchor, now);
            PeriodUsage {
                start,
                end,
                ..PeriodUsage::default()
            }
        };
        let nodes = i64::from(self.live_nodes());
        let left = held.left(p.start, s.activity.as_deref(), true);
        let want = |max: Option<i64>, configured: i64, left: i64, used: i64, need: i64| match max {
            Some(max) if used < max => {
                let slice = period_slice(configured, max, nodes);
                if 2 * left < slice || left < need {
                    // (or what a call that counts as several requests, or a reservation of
                    // units, lacks), and what is spent past the slice held (pending, and
                    // requests in flight)
                    slice.max(need - left.max(0)) + (-left).max(0)
                } else {
                    0
                }
            }
            _ => 0,
        };
        let (max_ms, max_requests) = limits
            .period
            .map_or((None, None), |a| (a.time_ms, a.requests));
        let mut period = PeriodAsk {
            start: p.start,
            max_ms,
            max_requests,
            max_units: caps,
            ..PeriodAsk::default()
        };
        if asks {
            period.ms = want(max_ms, slice, left.ms, p.used_ms, 0);
            period.requests = want(
                max_requests,
                self.lease_requests,
                left.requests,
                p.requests,
                s.lease_need_requests,
            );
        }
        let units_left = held.units_left(p.start, s.activity.as_deref());
        for i in (0..MAX_METERS).filter(|&i| asks_units && caps[i] > 0) {
            period.units[i] = units_want(
                caps[i],
                p.units[i],
                units_left[i],
                s.lease_need_units[i],
                nodes,
            );
        }
        if period.ms > 0 || period.requests > 0 || period.units.iter().any(|&n| n > 0) {
            ask.period = Some(period);
        }
        ask
    }

    /// The accounts that want new slices, with what each asks for; emptied.
    pub fn take_lease_wants(&self) -> Vec<(Arc<Account>, LeaseAsk)> {
        if self.lease_slice_ms.is_none() {
            return Vec::new();
        }
        let mut wants =
            std::mem::take(&mut *self.wants_lease.lock().unwrap_or_else(|e| e.into_inner()));
        wants.sort_unstable_by_key(|a| a.id);
        wants.dedup_by_key(|a| a.id);
        wants
            .into_iter()
            .map(|a| {
                let ask = self.lease_ask(&a);
                (a, ask)
            })
            .filter(|(_, ask)| wants_any(ask))
            .collect()
    }

    /// After a committed flush: an account whose slices are less than half left (and whose
    /// balance or allowance has more) renews them at the next renewal.
    pub(super) fn want_lease_if_low(&self, account: &Arc<Account>, s: &AccountState) {
        if self.lease_slice_ms.is_some() && wants_any(&self.ask_of(account.id, s)) {
            self.wants_lease
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(account.clone());
        }
    }

    /// Applies the answer to `ask`: what `grant` reserved for this node more (none: the
    /// license is gone). Grants add, so they commute with each other and with a flush
    /// committing meanwhile; a resync ([`Ledger::clamp_lease`]) never runs between a grant's
    /// commit and this (`Leases` keeps them apart), so it cannot be undone by a grant it did
    /// not see. (What an account evicted and loaded again held before stays
    /// reserved, unspent, until the node gives its leases back: less served, never more.) An
    /// ask the store could give nothing of is not repeated on the request path for
    /// [`LEASE_RETRY_MS`].
    pub fn grant(&self, account: &Account, ask: &LeaseAsk, grant: Option<&Grant>) {
        let mut s = account.lock();
        s.lease_wanted_at = None;
        s.lease_need_ms = 0;
        s.lease_need_requests = 0;
        for (need, &asked) in s
            .lease_need_units
            .iter_mut()
            .zip(&ask.period.unwrap_or_default().units)
        {
            // (a meter not asked for yet, its moment not come, still needs it)
            if asked > 0 {
                *need = 0;
            }
        }
        s.last_used_at = self.clock.now_ms();
        let granted_ms = grant.map_or(0, |g| g.granted_ms);
        if let Some(held) = s.held_ms.as_mut() {
            *held += granted_ms;
        }
        let mut refused = ask.ms > 0 && granted_ms == 0;
        let mut refused_units = false;
        if let Some(asked) = ask.period {
            let g = grant.and_then(|g| g.period).unwrap_or_default();
            refused |= (asked.ms > 0 && g.ms == 0) || (asked.requests > 0 && g.requests == 0);
            // (a meter's ask is for what a reservation lacks: less than that is nothing)
            refused_units =
                (0..MAX_METERS).any(|i| asked.units[i] > 0 && g.units[i] < asked.units[i]);
            if let Some(held) = s.period_held.as_mut().filter(|_| g.start != 0) {
                if held.start != g.start {
                    *held = PeriodHeld {
                        start: g.start,
                        ..PeriodHeld::default()
                    };
                }
                held.ms += g.ms;
                held.requests += g.requests;
                crate::meters::add(&mut held.units, &g.units);
            }
            if let Some(p) = s
                .limits
                .as_mut()
                .map(|l| &mut l.period)
                .filter(|p| g.start != 0 && p.start == g.start)
            {
                // what the other nodes' committed flushes used of it, as far as this knows
                p.used_ms = p.used_ms.max(g.used_ms);
                p.requests = p.requests.max(g.used_requests);
                for (n, &used) in p.units.iter_mut().zip(&g.used_units) {
                    *n = (*n).max(used);
                }
            }
        }
        if refused {
            s.lease_retry_at = self.clock.now_ms() + LEASE_RETRY_MS;
        }
        if refused_units {
            s.units_retry_at = self.clock.now_ms() + LEASE_RETRY_MS;
        }
    }

    /// What the store says this node holds of a license now: never more than that is spent
    /// (a debit or refund may have taken the leases down). Only lowers what is held, so a
    /// grant or a flush in flight meanwhile can only make it serve less, never more.
    pub fn clamp_lease(&self, id: i64, held_in_store_ms: i64) {
        if let Some(a) = self.account(id) {
            if let Some(held) = a.lock().held_ms.as_mut() {
                *held = (*held).min(held_in_store_ms);
            }
        }
    }

    /// Forgets every lease this node holds (returned when it stops, or expired).
    pub fn drop_leases(&self) {
        let by_id = self.by_id.lock().unwrap_or_else(|e| e.into_inner());
        for a in by_id.values().filter_map(std::sync::Weak::upgrade) {
            let mut s = a.lock();
            if let Some(held) = s.held_ms.as_mut() {
                *held = 0;
            }
            if let Some(held) = s.period_held.as_mut() {
                // nothing held, of the period it was held of
                held.ms = 0;
                held.requests = 0;
                held.units = [0; MAX_METERS];
            }
        }
    }

    /// What this process's rows say it holds now (`rows`, all of them): never more is spent.
    /// Only lowers what is held (a row given back under it by another node's heartbeat, or
    /// a debit), as [`Ledger::clamp_lease`] does; a row the store has no more of is nothing.
    pub fn clamp_leases_to(&self, rows: &[crate::store::HeldLease]) {
        let rows: HashMap<i64, &crate::store::HeldLease> =
            rows.iter().map(|r| (r.license_id, r)).collect();
        let by_id = self.by_id.lock().unwrap_or_else(|e| e.into_inner());
        for (id, a) in by_id.iter() {
            let Some(a) = a.upgrade() else { continue };
            let mut s = a.lock();
            let row = rows.get(id);
            if let Some(held) = s.held_ms.as_mut() {
                *held = (*held).min(row.map_or(0, |r| r.ms));
            }
            if let Some(held) = s.period_held.as_mut() {
                let (ms, requests, units) = row
                    .filter(|r| r.period_start == held.start)
                    .map_or((0, 0, [0; MAX_METERS]), |r| {
                        (r.period_ms, r.period_requests, r.units)
                    });
                held.ms = held.ms.min(ms);
                held.requests = held.requests.min(requests);
                for (h, n) in held.units.iter_mut().zip(units) {
                    *h = (*h).min(n);
                }
            }
        }
    }

    /// What this process's usage not yet committed will take off its lease rows, per license
    /// (its flush spends what it served from them): after its leases were forgotten, what the
    /// rows keep when the rest is given back.
    pub fn pending_leases(&self) -> Vec<crate::store::HeldLease> {
        let by_id = self.by_id.lock().unwrap_or_else(|e| e.into_inner());
        by_id
            .iter()
            .filter_map(|(id, a)| {
                let a = a.upgrade()?;
                let s = a.lock();
                s.held_ms?;
                let (ms, time_ms, requests, units) =
                    s.activity.as_ref().map_or((0, 0, 0, [0; MAX_METERS]), |a| {
                        (
                            a.pending.charge_ms.max(0),
                            a.pending.time_ms().max(0),
                            a.pending.requests + a.in_flight_requests(),
                            a.pending.units.map(|n| n.max(0)),
                        )
                    });
                Some(crate::store::HeldLease {
                    license_id: *id,
                    ms,
                    period_start: s.period_held.map_or(0, |p| p.start),
                    period_ms: time_ms,
                    period_requests: requests,
                    units,
                })
            })
            .collect()
    }

    /// What this process holds of each license it has a lease on, for a true-up against its
    /// rows (`store::books::lease_excess`).
    pub fn held_leases(&self) -> Vec<crate::store::HeldLease> {
        let by_id = self.by_id.lock().unwrap_or_else(|e| e.into_inner());
        by_id
            .iter()
            .filter_map(|(id, a)| {
                let a = a.upgrade()?;
                let s = a.lock();
                let p = s.period_held.unwrap_or_default();
                Some(crate::store::HeldLease {
                    license_id: *id,
                    ms: s.held_ms?,
                    period_start: p.start,
                    period_ms: p.ms,
                    period_requests: p.requests,
                    units: p.units,
                })
            })
            .collect()
    }

    /// Lets go of the leases not worth holding: of licenses revoked or expired, and of those
    /// that admitted nothing for `idle_ms`, with nothing pending, in flight or being flushed;
    /// and of every meter's slices, what the requests in flight and the units not yet
    /// flushed do not use.
    /// What they hold here drops to nothing, so the heartbeat's true-up gives their rows back
    /// to the license (a request on one later asks for a slice again). Returns their ids.
    pub fn drop_idle_leases(&self, idle_ms: i64) -> Vec<i64> {
        let now = self.clock.now_ms();
        let by_id = self.by_id.lock().unwrap_or_else(|e| e.into_inner());
        let mut dropped = Vec::new();
        for a in by_id.values().filter_map(std::sync::Weak::upgrade) {
            let mut guard = a.lock();
            let s = &mut *guard;
            if let Some(p) = s
                .period_held
                .as_mut()
                .filter(|_| now - s.last_used_at >= LEASE_RETRY_MS)
            {
                // a meter's slices beyond what the requests in flight reserved and the units
                // not yet flushed: asked for a reservation, they go back once it is settled
                // (not a moment after a grant, before the request it was for is admitted)
                let in_use = s.activity.as_ref().map_or([0; MAX_METERS], |a| {
                    let mut n = a.reserved().1;
                    crate::meters::add(&mut n, &a.pending.units.map(|u| u.max(0)));
                    n
                });
                for (held, used) in p.units.iter_mut().zip(in_use) {
                    *held = (*held).min(used);
                }
            }
            let holds = s.held_ms.is_some_and(|h| h > 0)
                || s.period_held
                    .is_some_and(|p| p.ms > 0 || p.requests > 0 || p.units.iter().any(|&n| n > 0));
            // (a session left open with nothing in flight is not busy: a request that comes
            // back asks for a slice again)
            let busy = s.flushing
                || s.activity
                    .as_ref()
                    .is_some_and(|a| a.in_flight() > 0 || !a.pending.is_zero());
            if !holds || busy {
                continue;
            }
            let unusable =
                s.status != LicenseStatus::Active || s.expires_at.is_some_and(|e| e <= now);
            if unusable || now - s.last_used_at >= idle_ms {
                s.held_ms = Some(0);
                if let Some(p) = s.period_held.as_mut() {
                    *p = PeriodHeld {
                        start: p.start,
                        ..PeriodHeld::default()
                    };
                }
                dropped.push(a.id);
            }
        }
        dropped
    }

    /// The leases held and their sum (ms), for the metrics.
    pub fn leases_held(&self) -> (usize, i64) {
        if self.lease_slice_ms.is_none() {
            return (0, 0);
        }
        let by_id = self.by_id.lock().unwrap_or_else(|e| e.into_inner());
        by_id
            .values()
            .filter_map(std::sync::Weak::upgrade)
            .filter_map(|a| a.lock().held_ms.filter(|h| *h > 0))
            .fold((0, 0), |(n, sum), h| (n + 1, sum + h))
    }
}

/// What a node asks of a meter's allowance `cap` (`used` of it, as far as it knows; `left` of
/// its slices here, less what is pending and reserved): only for a reservation it lacks room
/// for (`need`), so a node holds units only while its requests need them. What it lacks, and
/// while the allowance is less than half used a slice (a quarter of the node's share) if
/// that is more, for the requests after; nearer the cap exactly what it lacks, so no other
/// node's upload is refused for units held here idle. (What the heartbeat finds held beyond
/// the requests in flight goes back: [`Ledger::drop_idle_leases`].)
fn units_want(cap: i64, used: i64, left: i64, need: i64, nodes: i64) -> i64 {
    if need <= 0 || used >= cap || left >= need {
        return 0;
    }
    let lacks = need - left.max(0) + (-left).max(0);
    if 2 * used < cap {
        lacks.max(period_slice(i64::MAX, cap, nodes))
    } else {
        lacks
    }
}

/// Whether an ask asks for anything.
fn wants_any(ask: &LeaseAsk) -> bool {
    ask.ms > 0
        || ask
            .period
            .is_some_and(|p| p.ms > 0 || p.requests > 0 || p.units.iter().any(|&n| n > 0))
}

#[cfg(test)]
mod tests {
    use super::period_slice;

    #[test]
    fn a_period_slice_is_at_most_a_quarter_of_a_nodes_share() {
        assert_eq!(period_slice(100, 10_000, 3), 100);
        assert_eq!(period_slice(100, 100, 3), 8);
        assert_eq!(period_slice(100, 10, 3), 1, "never nothing");
        assert_eq!(period_slice(30_000, 1_800_000, 1), 30_000);
        assert_eq!(period_slice(100, 100, 0), 25, "no nodes known yet is one");
    }
}
