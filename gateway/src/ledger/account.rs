//! One license as the proxy holds it: its balance and version as last read or committed, its
//! plan, its activity (pending usage, session, requests in flight) and limit state, all under
//! one mutex; and how a row read from the store is applied (a newer one only, its balance held
//! back while a flush of the account is being committed).

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use super::plans::Plans;
use super::session::Activity;
use super::{LicenseState, LicenseStatus, PlanName, Usage};
use crate::limits::{LimitState, MAX_RATES};

/// One license as the proxy sees it.
pub struct Account {
    pub id: i64,
    /// The license's `keys_version` as last applied: a key cached at an older one is read
    /// again before it is trusted (outside the mutex: the lookup checks it on every request).
    keys_version: AtomicI64,
    state: Mutex<AccountState>,
}

/// What a period's included time has left, as committed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Included {
    /// The period's start (Unix ms).
    pub(super) start: i64,
    pub(super) left_ms: i64,
}

pub(super) struct AccountState {
    pub(super) plan: Arc<PlanName>,
    pub(super) expires_at: Option<i64>,
    /// The balance as last read from or committed to the store.
    pub(super) balance_ms: i64,
    pub(super) version: i64,
    /// Present only while the account has uncommitted usage, a session or requests in flight:
    /// most cached keys are idle, and this keeps them small (benches/memory.rs).
    pub(super) activity: Option<Box<Activity>>,
    /// Rate-limit buckets, the period's use and the day's uploads, for plans that have such
    /// limits (allocated at the first admission, or at load when the load measured them).
    pub(super) limits: Option<Box<LimitState>>,
    /// What the plan's included time has left in a period (plans that include time): as of
    /// the last read or committed flush, not counting `pending`, which the store will take
    /// from it first ([`crate::store::included::split`]).
    pub(super) included: Option<Included>,
    /// Where its plan periods are counted from ([`LicenseState::period_anchor`]).
    pub(super) period_anchor: i64,
    /// The balance right after the last top-up, and when: balance alerts measure from it.
    pub(super) topup_ms: i64,
    pub(super) topup_at: i64,
    /// A guest (no license): limited by its plan, never charged, never flushed.
    pub(super) guest: bool,
    pub(super) status: LicenseStatus,
    /// Whether the account is in the ledger's dirty list.
    pub(super) dirty: bool,
    /// A snapshot of this account is being committed. A row read meanwhile may already hold
    /// that commit's deduction while `pending` still holds it too, so its balance waits in
    /// `deferred` until the commit (or its failure) is applied: remaining never counts one
    /// usage twice.
    pub(super) flushing: bool,
    pub(super) deferred: Option<Box<LicenseState>>,
    /// The license is no longer in the store: nothing more is charged or written for it (its
    /// id may be given to a new license).
    pub(super) gone: bool,
    /// Several nodes: what is left of the balance this node reserved (its lease), as of the
    /// last grant or committed flush; it admits only from that. `None` on one node.
    pub(super) held_ms: Option<i64>,
    /// Several nodes: what is left of the slices of its plan period's allowances this node
    /// reserved, as of the last grant or committed flush. `None` on one node.
    pub(super) period_held: Option<super::lease::PeriodHeld>,
    /// Several nodes: the store had nothing to give a lease request; the request path does
    /// not ask again before this (Unix ms).
    pub(super) lease_retry_at: i64,
    /// As `lease_retry_at`, for a meter's slices (asked for alone, for a reservation).
    pub(super) units_retry_at: i64,
    /// Several nodes: when a stream found its lease spent and asked the next renewal for a
    /// slice (Unix ms; cleared by a grant).
    pub(super) lease_wanted_at: Option<i64>,
    /// Several nodes: priced requests were refused for want of room in this node's lease for
    /// their reservations (ms, summed until the next grant): the next ask is for at least
    /// that.
    pub(super) lease_need_ms: i64,
    /// Several nodes: a call counting as several requests was refused for want of room in
    /// this node's slice of the period's requests: the next ask is for at least that many.
    pub(super) lease_need_requests: i64,
    /// Several nodes: priced requests were refused for want of room in this node's slice of
    /// a meter's allowance for their reservations (summed until the next grant): the next ask
    /// is for at least that, by meter.
    pub(super) lease_need_units: crate::meters::Units,
    /// When a request was last admitted, or a lease granted for one (Unix ms): a lease idle
    /// for a lease lifetime is given back ([`super::Ledger::drop_idle_leases`]).
    pub(super) last_used_at: i64,
}

impl Account {
    /// The license's `keys_version` as last applied.
    pub(super) fn keys_version(&self) -> i64 {
        self.keys_version.load(Ordering::Acquire)
    }

    /// A row of the license arrived with `keys_version`: keys cached at an older one are
    /// read again. It only grows, whatever order rows arrive in.
    pub(super) fn keys_seen(&self, keys_version: i64) {
        self.keys_version.fetch_max(keys_version, Ordering::AcqRel);
    }

    pub(super) fn new(s: &LicenseState, plan: Arc<PlanName>) -> Account {
        let included_ms = plan.limits.included_ms;
        let limits = s
            .period
            .filter(|_| plan.limits.has_state())
            .map(|period| Box::new(LimitState::measured(period, s.today)));
        Account {
            id: s.id,
            keys_version: AtomicI64::new(s.keys_version),
            state: Mutex::new(AccountState {
                plan,
                status: s.status,
                expires_at: s.expires_at,
                balance_ms: s.balance_ms,
                version: s.version,
                activity: None,
                limits,
                period_anchor: s.period_anchor,
                topup_ms: s.topup.map_or(s.balance_ms, |(ms, _)| ms.max(s.balance_ms)),
                topup_at: s.topup.map_or(s.period_anchor, |(_, at)| at),
                guest: false,
                dirty: false,
                flushing: false,
                deferred: None,
                gone: false,
                held_ms: None,
                period_held: None,
                included: included_ms
                    .zip(s.period_use())
                    .map(|(i, (start, used))| Included {
                        start,
                        left_ms: crate::store::included::left(i, used),
                    }),
                lease_retry_at: 0,
                units_retry_at: 0,
                lease_wanted_at: None,
                lease_need_ms: 0,
                lease_need_requests: 0,
                lease_need_units: [0; crate::meters::MAX_METERS],
                last_used_at: 0,
            }),
        }
    }

    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, AccountState> {
        // A panic while holding an account lock leaves plain integers behind; keep metering.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The balance left: stored balance minus unflushed charges.
    pub fn remaining_ms(&self) -> i64 {
        self.lock().remaining_ms()
    }

    /// What is left of the prepaid balance, and of the period's included time on a plan that
    /// includes time (what is pending taken from the included time first).
    pub fn left_ms(&self) -> (i64, Option<i64>) {
        self.lock().left_ms()
    }

    /// What this node may still spend (its lease's rest on several nodes).
    pub fn spendable_ms(&self) -> i64 {
        self.lock().spendable_ms()
    }

    /// What is left of this node's lease (`None` on one node).
    pub fn held_ms(&self) -> Option<i64> {
        self.lock().held_ms
    }

    pub fn plan(&self) -> Arc<PlanName> {
        self.lock().plan.clone()
    }

    /// Unflushed usage (for tests and the admin view).
    pub fn pending(&self) -> Usage {
        self.lock()
            .activity
            .as_ref()
            .map_or_else(Usage::default, |a| a.pending)
    }

    /// Where its plan periods are counted from, as the ledger last saw it.
    pub fn period_anchor(&self) -> i64 {
        self.lock().period_anchor
    }

    /// The stored balance and its version, as the ledger last saw them.
    pub fn stored(&self) -> (i64, i64) {
        let s = self.lock();
        (s.balance_ms, s.version)
    }
}

impl AccountState {
    /// Applies a row read from the store if it is newer than what we hold. While a flush of
    /// this account is being committed, only the fields a flush never changes are applied now;
    /// the balance waits for the commit (see `flushing`).
    pub(super) fn apply(&mut self, row: &LicenseState, plans: &Plans, now: i64) -> Option<i64> {
        self.apply_after(row, 0, plans, now)
    }

    /// [`AccountState::apply`] for the row a flush's deduction of `deducted_ms` left (negative
    /// when the flush gave time back): only a balance above what that deduction explains is a
    /// top-up.
    pub(super) fn apply_after(
        &mut self,
        row: &LicenseState,
        deducted_ms: i64,
        plans: &Plans,
        now: i64,
    ) -> Option<i64> {
        // a row held back during a flush is newer than `version` already: an older one must
        // not undo it
        let newest = self
            .deferred
            .as_ref()
            .map_or(self.version, |d| d.version.max(self.version));
        if row.version <= newest {
            return None;
        }
        if self.flushing {
            if self
                .deferred
                .as_ref()
                .is_none_or(|d| d.version < row.version)
            {
                self.deferred = Some(Box::new(row.clone()));
            }
            return self.apply_details(row, plans);
        }
        self.version = row.version;
        if row.balance_ms > self.balance_ms - deducted_ms {
            // credited: balance alerts count from here (a new "period" for them)
            self.topup_ms = row.balance_ms;
            self.topup_at = now;
        }
        self.balance_ms = row.balance_ms;
        self.apply_included(row);
        self.apply_details(row, plans)
    }

    /// Status, expiry and plan: returns the row's `keys_version`, for the account to hold (its
    /// keys cached at an older one are read again).
    pub(super) fn apply_details(&mut self, row: &LicenseState, plans: &Plans) -> Option<i64> {
        self.status = row.status;
        self.expires_at = row.expires_at;
        if self.period_anchor != row.period_anchor {
            // a subscription's new billing period: the plan's periods start again from it (its
            // counts from zero, its included time whole, until a read or flush measures them)
            self.period_anchor = row.period_anchor;
            self.limits = None;
            self.included = None;
            self.apply_included(row);
            self.ask_again();
        }
        if *self.plan.name != *row.plan {
            self.plan = plans.intern(&row.plan);
            self.ask_again();
            // the new plan's rates are other buckets; the period's usage stays counted
            if let Some(l) = self.limits.as_mut() {
                l.tat_ns = [0; MAX_RATES];
            }
            // what the old plan included is not the new one's: counted again from the
            // period's use as measured (else given whole at the next admission, until the
            // next flush measures it)
            self.included = None;
            self.apply_included(row);
        }
        Some(row.keys_version)
    }

    /// A new plan or period: the store may have slices of it for this node now, though it had
    /// none for the old a moment ago.
    fn ask_again(&mut self) {
        self.lease_retry_at = 0;
        self.units_retry_at = 0;
    }

    /// The flush taken of this account is done (committed or failed): a row held back while it
    /// ran can be applied now. Returns its `keys_version`, as [`AccountState::apply`] does.
    pub(super) fn end_flush(&mut self, plans: &Plans, now: i64) -> Option<i64> {
        self.flushing = false;
        let row = self.deferred.take()?;
        self.apply(&row, plans, now)
    }

    /// Ends a flush whose row is `row`, the deduction of `deducted_ms` applied in it; a row
    /// held back meanwhile is applied after it when newer.
    pub(super) fn end_flush_with(
        &mut self,
        row: &LicenseState,
        deducted_ms: i64,
        plans: &Plans,
        now: i64,
    ) -> Vec<i64> {
        self.flushing = false;
        let deferred = self.deferred.take();
        let mut replaced: Vec<i64> = self
            .apply_after(row, deducted_ms, plans, now)
            .into_iter()
            .collect();
        if let Some(d) = deferred {
            replaced.extend(self.apply(&d, plans, now));
        }
        replaced
    }

    /// What is left to spend: the period's included time, then the balance, less what is
    /// pending (the store takes it from the included time first).
    pub(super) fn remaining_ms(&self) -> i64 {
        self.balance_ms + self.included_left_ms() - self.pending_ms()
    }

    /// The included time left as committed (0 on plans that include none).
    pub(super) fn included_left_ms(&self) -> i64 {
        match self.plan.limits.included_ms {
            Some(_) => self.included.map_or(0, |i| i.left_ms),
            None => 0,
        }
    }

    /// What is left of the prepaid balance and of the period's included time, what is pending
    /// taken from the included time first (its time only: the store takes prices from the
    /// balance).
    pub(super) fn left_ms(&self) -> (i64, Option<i64>) {
        let (charge_ms, time_ms) = self.activity.as_ref().map_or((0, 0), |a| {
            (
                a.pending.charge_ms - a.pending.waived_ms,
                a.pending.time_ms(),
            )
        });
        let from_included = self.taken_by_included(time_ms);
        (
            self.balance_ms - (charge_ms - from_included),
            self.included
                .filter(|_| self.plan.limits.included_ms.is_some())
                .map(|_| self.included_left_ms() - from_included),
        )
    }

    /// The prepaid balance left were `charge_ms` pending, `time_ms` of it time (balance alerts
    /// measure it before and after a charge).
    pub(super) fn prepaid_left_ms(&self, charge_ms: i64, time_ms: i64) -> i64 {
        self.balance_ms - (charge_ms - self.taken_by_included(time_ms))
    }

    /// What of `time_ms` of pending time the included time takes (none on a plan that includes
    /// none; never prices, which the store takes from the balance).
    fn taken_by_included(&self, time_ms: i64) -> i64 {
        time_ms.clamp(0, self.included_left_ms().max(0))
    }

    /// A row's measure of its period's use, for the included time left: the store's reads
    /// and committed flushes give it.
    fn apply_included(&mut self, row: &LicenseState) {
        let (Some(i), Some((start, used))) = (self.plan.limits.included_ms, row.period_use())
        else {
            return;
        };
        // a measure of an older period than the one counted here is no news
        if self.included.is_none_or(|c| start >= c.start) {
            self.included = Some(Included {
                start,
                left_ms: crate::store::included::left(i, used),
            });
        }
    }

    /// What this node may still spend: the balance left, and on several nodes no more than
    /// what is left of its lease.
    pub(super) fn spendable_ms(&self) -> i64 {
        match self.held_ms {
            None => self.remaining_ms(),
            // (what the plan still includes is spendable beside the balance: the store grants
            // slices of both)
            Some(held) => (self.balance_ms + self.included_left_ms()).min(held) - self.pending_ms(),
        }
    }

    /// What is pending against the balance and included time: the charges, less the prices
    /// the plan's included requests and units are expected to pay.
    fn pending_ms(&self) -> i64 {
        self.activity
            .as_ref()
            .map_or(0, |a| a.pending.charge_ms - a.pending.waived_ms)
    }

    pub(super) fn activity(&mut self) -> &mut Activity {
        self.activity.get_or_insert_with(Box::default)
    }

    pub(super) fn has_work(&self) -> bool {
        self.activity.as_ref().is_some_and(|a| a.has_work())
    }

    /// Frees the activity state once everything in it is committed.
    pub(super) fn settle(&mut self) {
        if !self.has_work() {
            self.activity = None;
        }
    }
}
