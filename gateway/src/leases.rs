//! Several nodes: asking the store for lease slices (of balances and of period allowances) and
//! giving them back. The ledger decides who needs one and admits from them (ledger/lease.rs);
//! this is the I/O: after each flush (the accounts the flush left low), when a key is first
//! loaded, and on the request path when a key's slice is spent while its balance or allowance
//! has more (after a credit, say). A process's slices are renewed by its heartbeat
//! (cluster.rs), given back when it stops, and expire when it dies. One that could not renew
//! them in time forgets them ([`Leases::forget`]) and gives its rows back
//! ([`Leases::settle`]) before it asks again: asks and that give-back exclude each other, so
//! no grant lands between the rows going and the memory being cleared.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use crate::gather::{Gather, Running, Waiter};
use crate::ledger::{Account, Ledger};
use crate::metrics;
use crate::store::{LeaseAsk, Process, Result, SharedStore};

pub struct Leases {
    store: SharedStore,
    ledger: Arc<Ledger>,
    process: Arc<Process>,
    lifetime: Duration,
    /// The leases were forgotten (not renewed in time): the rows go back before any ask.
    forgotten: std::sync::atomic::AtomicBool,
    /// Asks hold it shared, the give-back of forgotten rows exclusive.
    gate: tokio::sync::RwLock<()>,
    /// An ask failed since the last true-up: the store may have granted it all the same (its
    /// answer lost), and the rows may reserve more than this process holds.
    unsure: std::sync::atomic::AtomicBool,
    /// One request-path ask per account at a time: the requests that find a key's slice spent
    /// together (a node's first requests on a key, say) wait for the first one's grant instead
    /// of each reserving a slice.
    asking: std::sync::Mutex<HashMap<i64, Arc<tokio::sync::Mutex<()>>>>,
    /// Request-path asks for different accounts, gathered into one transaction each: while
    /// one batch is asked, the next gathers (a node meeting many keys it has not seen asks
    /// for dozens in one round trip instead of one each).
    batch: Arc<Gather<Asked>>,
}

/// A request-path ask waiting for the next transaction: its account, and where its answer goes
/// (whether anything was granted, or the store's error).
struct Asked(Arc<Account>, Answer);

impl Waiter for Asked {
    fn gone(&self) -> bool {
        self.1.is_closed()
    }

    fn stopped(self) {
        let _ = self.1.send(Err("the lease batch stopped".into()));
    }
}

/// Where a batched ask's answer goes: whether anything was granted, or the store's error.
type Answer = tokio::sync::oneshot::Sender<std::result::Result<bool, String>>;

/// The most asks one transaction takes (each is a few rows; a burst of more waits one turn).
const BATCH_MAX: usize = 256;

impl Leases {
    /// Leases for `node` on a store that several nodes share; `None` otherwise (or when the
    /// ledger does not lease).
    pub fn new(
        store: SharedStore,
        ledger: Arc<Ledger>,
        process: Arc<Process>,
        lifetime: Duration,
    ) -> Option<Arc<Leases>> {
        store.cluster()?;
        ledger.lease_slice_ms()?;
        Some(Arc::new(Leases {
            store,
            ledger,
            process,
            lifetime,
            forgotten: std::sync::atomic::AtomicBool::new(false),
            gate: tokio::sync::RwLock::new(()),
            unsure: std::sync::atomic::AtomicBool::new(false),
            asking: std::sync::Mutex::default(),
            batch: Arc::default(),
        }))
    }

    pub fn process(&self) -> &Arc<Process> {
        &self.process
    }

    /// Whether the leases are forgotten and their rows not yet given back.
    pub fn is_forgotten(&self) -> bool {
        self.forgotten.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The leases could not be renewed in time (other processes may be given them once they
    /// expire): stop spending them now, and give their rows back at the next
    /// [`Leases::settle`]. Returns whether they were held until now.
    pub fn forget(&self) -> bool {
        self.ledger.drop_leases();
        !self
            .forgotten
            .swap(true, std::sync::atomic::Ordering::SeqCst)
    }

    /// Gives back the rows of forgotten leases, if any, but for what this process's usage not
    /// yet committed will spend of them (served from them while the database was away: given
    /// back, another node could lease balance that usage is about to take), and clears what the
    /// memory held of them (a grant that landed after they were forgotten included): then the
    /// rows hold only what the next flush spends, and the memory nothing.
    pub async fn settle(&self) -> Result<()> {
        use std::sync::atomic::Ordering::SeqCst;
        if !self.forgotten.load(SeqCst) {
            return Ok(());
        }
        let Some(cluster) = self.store.cluster() else {
            return Ok(());
        };
        let _alone = self.gate.write().await;
        if self.forgotten.load(SeqCst) {
            self.ledger.drop_leases();
            let back = cluster
                .true_up(
                    &self.process,
                    self.ledger.meter_names(),
                    &self.ledger.pending_leases(),
                )
                .await?;
            self.forgotten.store(false, SeqCst);
            tracing::info!(ms = back, "leases forgotten in an outage given back");
        }
        Ok(())
    }

    /// Asks for what `wants` names (account, ask): applies each grant; returns whether
    /// anything was granted.
    async fn ask(&self, wants: &[(Arc<Account>, LeaseAsk)]) -> Result<bool> {
        Ok(self.ask_each(wants).await?.into_iter().any(|g| g))
    }

    /// [`Leases::ask`], saying for each want whether anything was granted.
    async fn ask_each(&self, wants: &[(Arc<Account>, LeaseAsk)]) -> Result<Vec<bool>> {
        let Some(cluster) = self.store.cluster() else {
            return Ok(vec![false; wants.len()]);
        };
        if wants.is_empty() {
            return Ok(Vec::new());
        }
        self.settle().await?;
        let _shared = self.gate.read().await;
        let asked: Vec<LeaseAsk> = wants.iter().map(|(_, ask)| *ask).collect();
        let until = self.ledger.now_ms() + self.lifetime.as_millis() as i64;
        let grants = match cluster
            .lease(&self.process, self.ledger.meter_names(), &asked, until)
            .await
        {
            Ok(g) => g,
            Err(e) => {
                metrics::LEASE_REQUESTS
                    .with_label_values(&["failed"])
                    .inc_by(wants.len() as u64);
                self.unsure.store(true, std::sync::atomic::Ordering::SeqCst);
                return Err(e);
            }
        };
        let mut out = Vec::with_capacity(wants.len());
        for (account, ask) in wants {
            let grant = grants.iter().find(|g| g.license_id == account.id);
            let granted = grant.is_some_and(|g| {
                g.granted_ms > 0
                    || g.period.is_some_and(|p| {
                        p.ms > 0 || p.requests > 0 || p.units.iter().any(|&n| n > 0)
                    })
            });
            let result = if granted { "granted" } else { "refused" };
            metrics::LEASE_REQUESTS.with_label_values(&[result]).inc();
            self.ledger.grant(account, ask, grant);
            out.push(granted);
        }
        Ok(out)
    }

    /// One request-path ask for `account`, in the next batch: a task of its own (started by
    /// the first ask while none runs, so a request that goes away never strands the others)
    /// asks for everyone gathered, reading each ask's amount as the batch goes out, and goes
    /// on while more wait.
    async fn ask_batched(self: &Arc<Self>, account: &Arc<Account>) -> Result<bool> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if let Some(running) = self.batch.push(Asked(account.clone(), tx)) {
            let me = self.clone();
            tokio::spawn(async move { me.run_batches(running).await });
        }
        match rx.await {
            Ok(r) => r.map_err(crate::store::StoreError::Backend),
            Err(_) => Err(crate::store::StoreError::Backend(
                "the lease batch stopped before answering".into(),
            )),
        }
    }

    /// The batches: everyone waiting (up to [`BATCH_MAX`]) in one transaction, until nobody
    /// waits. An account waiting twice (a request that went away left its place) is asked
    /// for once, each waiting one told the answer; one whose request went away is not asked
    /// for. Should the task end otherwise (a panic), whoever waits is told so and the next ask
    /// starts another.
    async fn run_batches(&self, mut running: Running<Asked>) {
        while let Some(taken) = running.next(BATCH_MAX) {
            if self.is_forgotten() {
                // the database did not answer the heartbeats: no ask waits on it
                for Asked(_, tx) in taken {
                    let _ = tx.send(Err("the database has not answered the heartbeats".into()));
                }
                continue;
            }
            let mut wants: Vec<(Arc<Account>, LeaseAsk)> = Vec::with_capacity(taken.len());
            let mut index = Vec::with_capacity(taken.len());
            for Asked(a, _) in &taken {
                if let Some(i) = wants.iter().position(|(w, _)| w.id == a.id) {
                    index.push(Some(i));
                    continue;
                }
                let ask = self.ledger.lease_ask(a);
                index.push((ask.ms > 0 || ask.period.is_some()).then(|| {
                    wants.push((a.clone(), ask));
                    wants.len() - 1
                }));
            }
            let result = self.ask_each(&wants).await;
            for (Asked(_, tx), i) in taken.into_iter().zip(index) {
                let answer = match (&result, i) {
                    (_, None) => Ok(false),
                    (Ok(granted), Some(i)) => Ok(granted[i]),
                    (Err(e), Some(_)) => Err(e.to_string()),
                };
                let _ = tx.send(answer);
            }
        }
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
    /// one before it left wanted. While the leases are forgotten (the database did not answer
    /// the heartbeats), a request does not wait on the database: it fails at once, and the
    /// heartbeat settles them when the database is back.
    pub async fn acquire(self: &Arc<Self>, account: &Arc<Account>) -> Result<bool> {
        if self.forgotten.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(crate::store::StoreError::Backend(
                "the database has not answered the heartbeats: no lease is asked for".into(),
            ));
        }
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
                // (its amount read again as its batch goes out)
                self.ask_batched(account).await
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
    ///
    /// Alone, with no ask in flight: a grant committed before the read but applied here after
    /// the clamp would add its slice on top of a row that already holds it (one slice more
    /// than the store says, until the next resync).
    pub async fn resync(&self, ids: &[i64]) {
        let Some(cluster) = self.store.cluster() else {
            return;
        };
        let _alone = self.gate.write().await;
        match cluster.held(&self.process, ids).await {
            Ok(held) => {
                for id in ids {
                    let ms = held.iter().find(|(l, _)| l == id).map_or(0, |(_, ms)| *ms);
                    self.ledger.clamp_lease(*id, ms);
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not read this node's leases"),
        }
    }

    /// Held by a flush from its commit until the ledger has taken what it spent off the slices
    /// in memory ([`crate::flusher`]): a clamp ([`Leases::reconcile`], [`Leases::resync`])
    /// between the two would read rows the flush already spent and follow them, and the
    /// ledger's commit would then take the same spend off a second time, leaving a slice
    /// stranded in the rows that no one can use (a stream near its allowance was ended early).
    pub async fn flushing(&self) -> tokio::sync::RwLockReadGuard<'_, ()> {
        self.gate.read().await
    }

    /// The heartbeat's part: renews this process's lease rows to `until` (`None`: reads them
    /// only, between renewals), clamps what it holds
    /// to what they hold (a row another node's heartbeat gave back under it is nothing), and
    /// gives back what they hold beyond it (a grant whose answer was lost, an account
    /// forgotten), so memory and rows agree at every beat. Alone, with no ask in flight and no
    /// flush between its commit and the ledger's ([`Leases::flushing`]): what the memory holds
    /// is all it will hold until the rows are read. Returns what the rows reserve beyond what
    /// is held (ms), before it was given back.
    pub async fn reconcile(&self, until: Option<i64>) -> Result<i64> {
        use std::sync::atomic::Ordering::SeqCst;
        let Some(cluster) = self.store.cluster() else {
            return Ok(0);
        };
        let _alone = self.gate.write().await;
        let rows = cluster
            .renew(&self.process, self.ledger.meter_names(), until)
            .await?;
        self.ledger.clamp_leases_to(&rows);
        // slices of revoked, expired and idle licenses go back (the true-up below; once the
        // rows are read, so a failed renewal lets go of nothing it would not give back)
        let dropped = self
            .ledger
            .drop_idle_leases(self.lifetime.as_millis() as i64);
        let held = self.ledger.held_leases();
        let excess = crate::store::books::lease_excess(&rows, &held);
        // (what was let go of above is no grant lost)
        let stranded: i64 = excess
            .iter()
            .filter(|e| !dropped.contains(&e.license_id))
            .map(|e| e.ms)
            .sum();
        if !excess.is_empty() || self.unsure.load(SeqCst) {
            let back = cluster
                .true_up(&self.process, self.ledger.meter_names(), &held)
                .await?;
            self.unsure.store(false, SeqCst);
            if back > 0 && stranded == 0 {
                tracing::debug!(
                    ms = back,
                    licenses = dropped.len(),
                    "leases of revoked, expired or idle licenses given back"
                );
            } else if back > 0 {
                tracing::warn!(
                    ms = back,
                    "lease rows held more than this node did (a grant's answer was lost): the \
                     rest given back"
                );
            }
        }
        Ok(stranded)
    }

    /// Gives back everything this process holds (it stops); returns the ms given back.
    pub async fn release(&self) -> Result<i64> {
        let Some(cluster) = self.store.cluster() else {
            return Ok(0);
        };
        let _alone = self.gate.write().await;
        let back = cluster.release(&self.process).await?;
        self.ledger.drop_leases();
        self.forgotten
            .store(false, std::sync::atomic::Ordering::SeqCst);
        Ok(back)
    }
}
