//! Several nodes: balances by lease. A node admits a key only from the slice of its balance
//! it reserved in the store (`held_ms`), so several nodes never spend more than the balance
//! beyond what one node may (a request admitted with time left may finish past zero). A slice
//! is asked for when a key is first loaded, when a flush leaves less than half a slice, and on
//! the request path only when the lease is spent while the balance has more
//! (`Denial::InsufficientBalance { lease_spent }`); a node that could not renew its leases
//! for their lifetime forgets them (other nodes may have been given them). The store's side
//! is in
//! `store::ClusterStore::lease`; the calls in `crate::leases`.

use std::sync::Arc;

use super::{Account, Ledger};

impl Ledger {
    /// The lease slice (ms of balance) on several nodes; `None` on one node.
    pub fn lease_slice_ms(&self) -> Option<i64> {
        self.lease_slice_ms
    }

    /// The accounts that want a new slice, with how much each asks for (a slice); emptied.
    pub fn take_lease_wants(&self) -> Vec<(Arc<Account>, i64)> {
        let Some(slice) = self.lease_slice_ms else {
            return Vec::new();
        };
        let mut wants =
            std::mem::take(&mut *self.wants_lease.lock().unwrap_or_else(|e| e.into_inner()));
        wants.sort_unstable_by_key(|a| a.id);
        wants.dedup_by_key(|a| a.id);
        wants.into_iter().map(|a| (a, slice)).collect()
    }

    /// After a committed flush: a lease with less than half a slice left (and balance left to
    /// lease) is renewed at the next renewal.
    pub(super) fn want_lease_if_low(
        &self,
        account: &Arc<Account>,
        spendable_ms: i64,
        remaining_ms: i64,
    ) {
        let Some(slice) = self.lease_slice_ms else {
            return;
        };
        if spendable_ms < slice / 2 && remaining_ms > 0 {
            self.wants_lease
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(account.clone());
        }
    }

    /// Applies a grant: `granted` ms more were reserved for this node. Grants add, so they
    /// commute with each other and with a flush committing meanwhile. (What an account evicted
    /// and loaded again held before stays reserved, unspent, until the node gives its leases
    /// back: less served, never more.)
    pub fn grant(&self, account: &Account, granted: i64) {
        if let Some(held) = account.lock().held_ms.as_mut() {
            *held += granted;
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
            if let Some(held) = a.lock().held_ms.as_mut() {
                *held = 0;
            }
        }
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
