//! The flush protocol: a snapshot of every account with uncommitted work (open requests
//! charged up to now, idle sessions closed), and, once the store has committed it, the
//! subtraction of exactly what was committed. A failed commit puts everything back; a crash
//! loses only what no commit took.

use std::sync::Arc;

use super::{Account, Applied, Ledger, LicenseStatus, Usage};
use crate::records::Charge;

/// A snapshot of one account's uncommitted work, taken by the flusher: the [`Charge`] the store
/// commits, and what the ledger needs to subtract exactly that once it is committed.
pub struct FlushItem {
    pub account: Arc<Account>,
    pub charge: Charge,
    closed: usize,
    /// The open session written (its id, and the change it was written at).
    open: Option<(Arc<str>, u64)>,
}

impl Ledger {
    /// Takes a snapshot of every account with uncommitted work: requests still open are
    /// charged up to now, and sessions that idled out are closed. Nothing is subtracted until
    /// [`Ledger::commit`]; pass failed items to [`Ledger::abandon`].
    pub fn snapshot(&self) -> Vec<FlushItem> {
        self.snapshot_closing(false)
    }

    /// The snapshot of the last flush before the process exits: every open session ends, at
    /// its last charged time.
    pub fn final_snapshot(&self) -> Vec<FlushItem> {
        self.snapshot_closing(true)
    }

    fn snapshot_closing(&self, close_all: bool) -> Vec<FlushItem> {
        let now = self.now();
        let taken = std::mem::take(&mut *self.dirty.lock().unwrap_or_else(|e| e.into_inner()));
        let mut items = Vec::with_capacity(taken.len());
        let mut keep = Vec::new();
        for account in taken {
            let mut guard = account.lock();
            let s = &mut *guard;
            if s.gone {
                // its requests still in flight charge nothing: there is nobody to charge
                s.activity = None;
                s.dirty = false;
                continue;
            }
            self.charge_open(account.id, s, now);
            // the period the charge counts in, for the history rows it may join and the
            // allowance it is first taken from
            let (included_ms, includes) = (s.plan.limits.included_ms, s.plan.limits.includes);
            let period_start =
                (s.plan.limits.period.is_some() || included_ms.is_some() || includes.is_some())
                    .then(|| self.period_start(s, now.wall));
            let Some(a) = s.activity.as_mut() else {
                s.dirty = false;
                continue;
            };
            if close_all || a.session_expired(now.mono, self.idle_timeout_ms) {
                a.close_session();
            }
            let mut sessions = a.closed.clone();
            // the open session when it changed: charged more, or given back (a span written
            // before and retracted is written again, so the store sees the time leave it)
            let open = match &a.session {
                Some(o) if o.seq != o.written_seq && (o.billed.is_some() || o.written_seq > 0) => {
                    sessions.push(o.record.clone());
                    Some((o.record.id.clone(), o.seq))
                }
                _ => None,
            };
            if a.pending.is_zero() && sessions.is_empty() {
                if s.has_work() {
                    drop(guard);
                    keep.push(account);
                } else {
                    s.settle();
                    s.dirty = false;
                }
                continue;
            }
            let item = FlushItem {
                charge: Charge {
                    license_id: account.id,
                    usage: a.pending,
                    sessions,
                    period_start,
                    included_ms,
                    includes,
                },
                closed: a.closed.len(),
                open,
                account: account.clone(),
            };
            s.flushing = true;
            drop(guard);
            items.push(item);
        }
        if !keep.is_empty() {
            self.dirty
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend(keep);
        }
        items
    }

    /// Subtracts what a flush committed: `applied[i]` says what the store did with item `i`.
    /// An item the store could not apply (its license is gone) is set aside: its usage is
    /// dropped, as there is nothing left to charge it to, and its key stops working.
    pub fn commit(&self, items: Vec<FlushItem>, applied: &[Applied]) {
        let now = self.clock.now_ms();
        let mut keep = Vec::new();
        let mut forgotten = Vec::new();
        for (item, applied) in items.into_iter().zip(applied) {
            let mut s = item.account.lock();
            let a = s.activity();
            a.pending.subtract(&item.charge.usage);
            a.closed.drain(..item.closed);
            // the session written, if it is still the open one (it may have idled out and
            // closed meanwhile, and another opened: that one is not written yet)
            if let (Some((id, seq)), Some(open)) = (&item.open, a.session.as_mut()) {
                if open.record.id == *id {
                    open.written_seq = open.written_seq.max(*seq);
                }
            }
            let mut replaced = Vec::new();
            match applied {
                Applied::Deducted(row, deducted_ms) => {
                    // the store took what this node served off its lease too (whatever the
                    // license was charged for it)
                    let served_ms = item.charge.usage.charge_ms;
                    if let Some(held) = s.held_ms.as_mut().filter(|_| served_ms > 0) {
                        *held = (*held - served_ms).max(0);
                    }
                    // the period's time slice, by the time it served (not the prices)
                    if let Some(held) = s.period_held.as_mut() {
                        let u = &item.charge.usage;
                        held.spend(u.time_ms(), u.requests, &u.units);
                    }
                    replaced = s.end_flush_with(row, *deducted_ms, &self.plans, now);
                    self.want_lease_if_low(&item.account, &s);
                }
                Applied::Written => replaced.extend(s.end_flush(&self.plans, now)),
                Applied::Orphaned => {
                    // nothing of it can be written, now or later: the account is gone, and
                    // what its requests still in flight use is dropped with it
                    s.gone = true;
                    s.status = LicenseStatus::Revoked;
                    if let Some(a) = s.activity.as_mut() {
                        a.session = None;
                        a.closed.clear();
                        a.pending = Usage::default();
                    }
                    replaced.extend(s.end_flush(&self.plans, now));
                    forgotten.push(item.account.id);
                    // every key of it is read again, and found gone
                    replaced.push(i64::MAX);
                }
            }
            for v in replaced {
                item.account.keys_seen(v);
            }
            if s.has_work() {
                drop(s);
                keep.push(item.account);
            } else {
                s.settle();
                s.dirty = false;
            }
        }
        if !forgotten.is_empty() {
            let mut by_id = self.by_id.lock().unwrap_or_else(|e| e.into_inner());
            for id in forgotten {
                by_id.remove(&id);
            }
        }
        if !keep.is_empty() {
            self.dirty
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend(keep);
        }
    }

    /// Puts back items whose commit failed (or whose write was lost with the store's writer):
    /// their usage stays pending and is retried.
    pub fn abandon(&self, items: Vec<FlushItem>) {
        let now = self.clock.now_ms();
        let accounts: Vec<Arc<Account>> = items.into_iter().map(|i| i.account).collect();
        for account in &accounts {
            let keys = account.lock().end_flush(&self.plans, now);
            if let Some(v) = keys {
                account.keys_seen(v);
            }
        }
        let mut dirty = self.dirty.lock().unwrap_or_else(|e| e.into_inner());
        dirty.extend(accounts);
    }
}
