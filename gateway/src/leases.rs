//! Several nodes: asking the store for lease slices (of balances and of period allowances) and
//! giving them back. The ledger decides who needs one and admits from them (ledger/lease.rs);
//! this is the I/O: after each flush (the accounts the flush left low), when a key is first
//! loaded, and on the request path when a key's slice is spent while its balance or allowance
//! has more (after a credit, say). A node's slices are
//! renewed by its heartbeat (cluster.rs), given back when it stops, and expire when it dies.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::ledger::{Account, Ledger};
use crate::metrics;
use crate::store::{LeaseAsk, Result, SharedStore};

pub struct Leases {
    store: SharedStore,
    ledger: Arc<Ledger>,
    node: Arc<str>,
    lifetime: Duration,
    /// One request-path ask per account at a time: the requests that find a key's slice spent
    /// together (a node's first requests on a key, say) wait for the first one's grant instead
    /// of each reserving a slice.
    asking: std::sync::Mutex<HashMap<i64, Arc<tokio::sync::Mutex<()>>>>,
}

impl Leases {
    /// Leases for `node` on a store that several nodes share; `None` otherwise (or when the
    /// ledger does not lease).
    pub fn new(
        store: SharedStore,
        ledger: Arc<Ledger>,
        node: &str,
        lifetime: Duration,
    ) -> Option<Arc<Leases>> {
        store.cluster()?;
        ledger.lease_slice_ms()?;
        Some(Arc::new(Leases {
            store,
            ledger,
            node: Arc::from(node),
            lifetime,
            asking: std::sync::Mutex::default(),
        }))
    }

    pub fn node(&self) -> &Arc<str> {
        &self.node
    }

    /// Asks for what `wants` names (account, ask): applies each grant; returns whether
    /// anything was granted.
    async fn ask(&self, wants: &[(Arc<Account>, LeaseAsk)]) -> Result<bool> {
        let Some(cluster) = self.store.cluster() else {
            return Ok(false);
        };
        if wants.is_empty() {
            return Ok(false);
        }
        let asked: Vec<LeaseAsk> = wants.iter().map(|(_, ask)| *ask).collect();
        let until = self.ledger.now_ms() + self.lifetime.as_millis() as i64;
        let grants = match cluster.lease(&self.node, &asked, until).await {
            Ok(g) => g,
            Err(e) => {
                metrics::LEASE_REQUESTS
                    .with_label_values(&["failed"])
                    .inc_by(wants.len() as u64);
                return Err(e);
            }
        };
        let mut any = false;
        for (account, ask) in wants {
            let grant = grants.iter().find(|g| g.license_id == account.id);
            let granted = grant.is_some_and(|g| {
                g.granted_ms > 0 || g.period.is_some_and(|p| p.ms > 0 || p.requests > 0)
            });
            let result = if granted { "granted" } else { "refused" };
            metrics::LEASE_REQUESTS.with_label_values(&[result]).inc();
            self.ledger.grant(account, ask, grant);
            any |= granted;
        }
        Ok(any)
    }

    /// Renews the leases the ledger found low (after a flush, or a change).
    pub async fn renew(&self) {
        let wants = self.ledger.take_lease_wants();
        if let Err(e) = self.ask(&wants).await {
            tracing::warn!(error = %e, keys = wants.len(), "lease renewal failed; retried after the next flush");
        }
    }

    /// Slices for one account now (loaded, or a slice spent with more left): what it wants
    /// of its balance and its period's allowances; whether any was granted.
    /// Asks made together for one account wait for each other: each asks only for what the
    /// one before it left wanted.
    pub async fn acquire(&self, account: &Arc<Account>) -> Result<bool> {
        let turn = self
            .asking
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(account.id)
            .or_default()
            .clone();
        let result = {
            let _turn = turn.lock().await;
            let ask = self.ledger.lease_ask(account);
            if ask.ms <= 0 && ask.period.is_none() {
                Ok(false)
            } else {
                self.ask(&[(account.clone(), ask)]).await
            }
        };
        let mut asking = self.asking.lock().unwrap_or_else(|e| e.into_inner());
        // the last one out takes the turn away (the map's and this one are the only holders)
        if Arc::strong_count(&turn) == 2 {
            asking.remove(&account.id);
        }
        result
    }

    /// After changes to these licenses: what this node holds of each is what the store says at
    /// most (a debit or refund shrinks the leases; one the store no longer has is nothing).
    pub async fn resync(&self, ids: &[i64]) {
        let Some(cluster) = self.store.cluster() else {
            return;
        };
        match cluster.held(&self.node, ids).await {
            Ok(held) => {
                for id in ids {
                    let ms = held.iter().find(|(l, _)| l == id).map_or(0, |(_, ms)| *ms);
                    self.ledger.clamp_lease(*id, ms);
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not read this node's leases"),
        }
    }

    /// Gives back everything this node holds (it stops); returns the ms given back.
    pub async fn release(&self) -> Result<i64> {
        let Some(cluster) = self.store.cluster() else {
            return Ok(0);
        };
        let back = cluster.release(&self.node).await?;
        self.ledger.drop_leases();
        Ok(back)
    }
}
