//! The flusher: a Pingora background service that commits the ledger and the access-log queue
//! to the store every `storage.flush_interval_ms`, polls the store for license changes made by
//! other processes, and at shutdown waits for in-flight requests before its last flush.
//!
//! Charges are never dropped: a failed commit leaves usage pending in the ledger and the batch's
//! log rows are kept for the next try. Only access-log rows can be dropped, when the bounded
//! queue is full, and each drop is counted. A commit whose outcome is unknown (PostgreSQL: the
//! COMMIT went out and no answer came back) is held in doubt, its usage neither committed nor
//! put back, and no other flush runs until the store says whether it committed: then it is
//! applied as committed, or put back and retried. Never both, so never charged twice.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use tokio::sync::mpsc;

use crate::ledger::FlushItem;
use crate::ledger::Ledger;
use crate::metrics;
use crate::records::{AccessLog, Applied, RefusedCount, Written};
use crate::store::{Committed, FlushBatch, Process, SharedStore, StoreError};

/// The proxy's end of the access-log queue: never blocks, counts what it drops.
#[derive(Clone)]
pub struct LogSender {
    tx: mpsc::Sender<AccessLog>,
    refused: Arc<Refused>,
    /// Which rows are written whole (`storage.access_log`); the rest count in the rollups.
    rows: crate::config::AccessLogRows,
}

thread_local! {
    /// Requests this thread logged: the sample's count (one per thread, no shared line).
    static LOGGED: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Distinct (minute, reason, address) counts one flush keeps apart; past this, further
/// addresses are counted together (so random source addresses cannot grow it without bound).
const REFUSED_KEYS: usize = 10_000;

/// Requests refused without a known license: a bounded sample of their rows is logged, and
/// every one of them is counted, per minute, reason and client address, for the flusher.
struct Refused {
    per_second: u32,
    state: Mutex<RefusedState>,
}

#[derive(Default)]
struct RefusedState {
    /// The second the sample is counting in, and how many rows it let through in it.
    second: i64,
    logged: u32,
    counts: HashMap<(i64, &'static str, Option<IpAddr>), i64>,
}

impl Refused {
    /// Counts a refusal; returns whether its row is to be written.
    fn count(&self, row: &AccessLog) -> bool {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        // rows reach here slightly out of order (they are stamped when their request began):
        // the window only moves forward, so a late row never reopens a spent second
        let second = row.ts_ms.div_euclid(1_000);
        if second > st.second {
            st.second = second;
            st.logged = 0;
        }
        let minute = row.ts_ms - row.ts_ms.rem_euclid(60_000);
        let mut key = (minute, row.outcome, row.client_ip);
        if st.counts.len() >= REFUSED_KEYS && !st.counts.contains_key(&key) {
            key.2 = None;
        }
        *st.counts.entry(key).or_default() += 1;
        let log = st.logged < self.per_second;
        st.logged += u32::from(log);
        log
    }

    fn take(&self) -> Vec<RefusedCount> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.counts
            .drain()
            .map(|((minute, reason, client_ip), requests)| RefusedCount {
                minute,
                reason,
                client_ip,
                requests,
            })
            .collect()
    }

    /// Puts counts back after a failed write.
    fn restore(&self, counts: Vec<RefusedCount>) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        for c in counts {
            *st.counts
                .entry((c.minute, c.reason, c.client_ip))
                .or_default() += c.requests;
        }
    }
}

impl LogSender {
    /// A request refused without a known license (no key, or a key nobody has): counted
    /// always, its row written only within `storage.unauthenticated_log_rows_per_s`.
    pub fn send_refused(&self, row: AccessLog) -> bool {
        if self.refused.count(&row) {
            self.send(row)
        } else {
            metrics::LOG_ROWS_SKIPPED.inc();
            false
        }
    }

    /// Queues a row; returns false when the queue was full and the row was dropped.
    pub fn send(&self, mut row: AccessLog) -> bool {
        if self.rows != crate::config::AccessLogRows::All {
            let nth = LOGGED.with(|n| {
                n.set(n.get().wrapping_add(1));
                n.get()
            });
            row.summary_only = !self.rows.keeps(row.status, row.outcome, nth);
        }
        match self.tx.try_send(row) {
            Ok(()) => {
                metrics::PENDING_LOG_ROWS.inc();
                true
            }
            Err(_) => {
                metrics::LOG_ROWS_DROPPED.inc();
                false
            }
        }
    }
}

/// Requests between their first filter and their logging phase, for the shutdown drain.
#[derive(Default)]
pub struct InFlight(AtomicI64);

impl InFlight {
    pub fn enter(&self) {
        self.0.fetch_add(1, Ordering::AcqRel);
    }
    pub fn leave(&self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Acquire)
    }
}

/// How long the flusher waits after failed commits: one flush interval after the first, then
/// twice as long after each further failure, up to [`Backoff::MAX`], so a database that is down
/// is not hammered and one that is back is written to within seconds.
struct Backoff {
    failures: u32,
    retry_at: Instant,
}

impl Backoff {
    const MAX: Duration = Duration::from_secs(8);

    fn new() -> Self {
        Backoff {
            failures: 0,
            retry_at: Instant::now(),
        }
    }

    /// Counts a failure; returns the wait before the next try.
    fn failed(&mut self, interval: Duration) -> Duration {
        let wait = interval
            .saturating_mul(1 << self.failures.min(16))
            .min(Self::MAX.max(interval));
        self.failures += 1;
        self.retry_at = Instant::now() + wait;
        wait
    }

    fn succeeded(&mut self) {
        if self.failures > 0 {
            tracing::info!(
                failures = self.failures,
                "flush committed again after failures"
            );
        }
        self.failures = 0;
    }
}
pub struct FlusherOptions {
    pub flush_interval: Duration,
    pub refresh_interval: Duration,
    pub log_queue_capacity: usize,
    /// How long shutdown waits for in-flight requests before the last flush.
    pub drain_timeout: Duration,
    /// Where newly recorded usage alerts go to be announced; none: recorded only.
    pub alert_queue: Option<crate::alerts::AlertQueue>,
    /// Access-log rows older than this are deleted (`storage.access_log_retention_days`);
    /// none: kept for ever.
    pub access_log_retention: Option<Duration>,
    /// Rows logged per second for requests refused without a known license.
    pub unauthenticated_log_rows_per_s: u32,
    /// Which requests are written to `access_logs` row by row (`storage.access_log`).
    pub access_log: crate::config::AccessLogRows,
    /// Several nodes: this node's leases, renewed after each flush and given back at the end.
    pub leases: Option<Arc<crate::leases::Leases>>,
    /// Session metering on a store several writers share: the idle timeout, for one session
    /// across nodes (`FlushBatch::session_gap_ms`).
    pub session_gap_ms: Option<i64>,
    /// A store several processes share: this process (its flushes are numbered, and one in
    /// doubt is looked up by its number).
    pub process: Option<Arc<Process>>,
    /// The configured meters (`FlushBatch::meters`).
    pub meters: Arc<[crate::config::Meter]>,
}

pub struct Flusher {
    refused: Arc<Refused>,
    ledger: Arc<Ledger>,
    store: SharedStore,
    in_flight: Arc<InFlight>,
    opts: FlusherOptions,
    state: Mutex<FlushState>,
    /// Serializes flushes: the periodic one and the final one at exit never overlap.
    running: tokio::sync::Mutex<()>,
    /// Turns true once shutdown has drained the requests in flight and the last flush is done:
    /// the process may end (the server's own shutdown would sit out its whole grace period).
    drained: tokio::sync::watch::Sender<bool>,
    /// Several nodes: for each capped key (license, period start), the committed units of
    /// every node before a time, summed once, so each flush reads only the rows since
    /// ([`Flusher::refresh_units`]).
    units_base: Mutex<HashMap<(i64, i64), UnitsBase>>,
}

/// Units committed before `until`, by meter.
#[derive(Clone, Copy)]
struct UnitsBase {
    units: crate::meters::Units,
    until: i64,
}

/// A `usage_units` row is committed within this of its `created_at` (a flush's statements are
/// bounded far below it): rows older than this are folded into a key's base for good.
const UNITS_SETTLED_MS: i64 = 120_000;

/// How much newer than its base a key's reads may grow before the base moves on.
const UNITS_FOLD_MS: i64 = 600_000;

struct FlushState {
    rx: mpsc::Receiver<AccessLog>,
    /// The number of the last flush sent to the store.
    seq: i64,
    /// A flush whose commit's outcome is unknown, until the store says.
    in_doubt: Option<InDoubt>,
    /// The batch buffer: empty with its capacity kept after a commit (a busy second is tens of
    /// thousands of rows, and regrowing it every flush showed in the profile), or holding the
    /// rows of a failed commit, which go first in the next.
    buf: Vec<AccessLog>,
}

/// A flush whose COMMIT went out without an answer: its items and rows, held.
struct InDoubt {
    seq: i64,
    items: Vec<FlushItem>,
    logs: Vec<AccessLog>,
}

/// What one flush did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlushReport {
    pub written: Written,
    pub charged_ms: i64,
}

impl Flusher {
    pub fn new(
        ledger: Arc<Ledger>,
        store: SharedStore,
        in_flight: Arc<InFlight>,
        opts: FlusherOptions,
    ) -> (Arc<Flusher>, LogSender) {
        let (tx, rx) = mpsc::channel(opts.log_queue_capacity.max(1));
        let refused = Arc::new(Refused {
            per_second: opts.unauthenticated_log_rows_per_s,
            state: Mutex::default(),
        });
        let flusher = Arc::new(Flusher {
            refused: refused.clone(),
            ledger,
            store,
            in_flight,
            opts,
            state: Mutex::new(FlushState {
                rx,
                seq: 0,
                in_doubt: None,
                buf: Vec::new(),
            }),
            running: tokio::sync::Mutex::new(()),
            drained: tokio::sync::watch::Sender::new(false),
            units_base: Mutex::default(),
        });
        let rows = flusher.opts.access_log;
        (flusher, LogSender { tx, refused, rows })
    }

    /// Takes the queued log rows (after any kept from a failed commit).
    fn take_logs(&self) -> Vec<AccessLog> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let mut logs = std::mem::take(&mut st.buf);
        while let Ok(row) = st.rx.try_recv() {
            logs.push(row);
        }
        logs
    }

    /// Keeps the rows of a failed commit for the next try, within the queue's capacity.
    fn keep_logs(&self, mut logs: Vec<AccessLog>) {
        let cap = self.opts.log_queue_capacity;
        if logs.len() > cap {
            let dropped = logs.len() - cap;
            logs.drain(..dropped);
            metrics::LOG_ROWS_DROPPED.inc_by(dropped as u64);
            metrics::PENDING_LOG_ROWS.sub(dropped as i64);
        }
        self.state.lock().unwrap_or_else(|e| e.into_inner()).buf = logs;
    }

    /// Hands the committed batch's buffer back for the next flush.
    fn recycle(&self, mut logs: Vec<AccessLog>) {
        logs.clear();
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.buf.is_empty() {
            st.buf = logs;
        }
    }

    /// Commits everything pending now, in one transaction.
    pub async fn flush(&self) -> Result<FlushReport, StoreError> {
        self.flush_closing(false).await
    }

    /// The last flush before exit: as [`Flusher::flush`], and every open session ends.
    pub async fn final_flush(&self) -> Result<FlushReport, StoreError> {
        self.flush_closing(true).await
    }

    async fn flush_closing(&self, last: bool) -> Result<FlushReport, StoreError> {
        let _one = self.running.lock().await;
        // nothing else until a flush in doubt is settled: its usage is in no snapshot
        let settled = self.settle_in_doubt().await?;
        self.record_alerts().await;
        self.record_refused().await;
        let items = if last {
            self.ledger.final_snapshot()
        } else {
            self.ledger.snapshot()
        };
        let logs = self.take_logs();
        if items.is_empty() && logs.is_empty() {
            // other nodes' units still count here when this one has nothing to write
            if !last {
                self.refresh_units().await;
            }
            return Ok(settled);
        }
        let started = Instant::now();
        let seq = {
            let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
            st.seq += 1;
            st.seq
        };
        let mut batch = FlushBatch {
            charges: items.iter().map(|i| i.charge.clone()).collect(),
            logs,
            now: self.ledger.now_ms(),
            process: self.opts.process.clone(),
            seq,
            session_gap_ms: self.opts.session_gap_ms,
            meters: self.opts.meters.clone(),
        };
        // several nodes: no clamp of the slices between the commit (which spends them in the
        // rows) and the ledger's commit (which spends them in memory)
        let flushing = match &self.opts.leases {
            Some(l) => Some(l.flushing().await),
            None => None,
        };
        let result = self.store.commit_flush(&mut batch).await;
        // the batch's rows come back to be recycled, or kept for the retry (none if the backend
        // lost them with its writer)
        let logs = std::mem::take(&mut batch.logs);
        metrics::FLUSH_DURATION.observe(started.elapsed().as_secs_f64());
        match result {
            Ok(Committed { applied, written }) => {
                let report = self.committed(items, &applied, logs, written);
                drop(flushing);
                if !last {
                    // (nothing is admitted after the last flush)
                    self.refresh_units().await;
                }
                Ok(add(settled, report))
            }
            Err(StoreError::InDoubt(e)) => {
                metrics::FLUSHES_IN_DOUBT.inc();
                metrics::STORE_ERRORS.inc();
                self.pending_gauges(&items);
                tracing::warn!(
                    error = %e,
                    seq,
                    "a flush's COMMIT got no answer: held until the database says whether it \
                     committed"
                );
                let doubt = InDoubt { seq, items, logs };
                self.state
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .in_doubt = Some(doubt);
                Err(StoreError::InDoubt(e))
            }
            Err(e) => {
                metrics::STORE_ERRORS.inc();
                self.pending_gauges(&items);
                self.ledger.abandon(items);
                self.keep_logs(logs);
                Err(e)
            }
        }
    }

    /// Several nodes: every node's committed units of the capped keys held here, read at each
    /// flush once this node's own is committed (and before its next: none of its own is in
    /// between), so a meter's period allowance counts the other nodes' use too
    /// (`ledger::units`). Each read covers the rows since the key's base (at most
    /// [`UNITS_FOLD_MS`] and [`UNITS_SETTLED_MS`] of them), not the whole period. A failed
    /// read changes nothing; the next flush reads again.
    async fn refresh_units(&self) {
        let Some(cluster) = self.store.cluster() else {
            return;
        };
        let asked = self.ledger.units_to_refresh();
        let settled = self.ledger.now_ms() - UNITS_SETTLED_MS;
        // the keys whose base is missing or old: what to fold into it, up to `settled`
        let folds: Vec<((i64, i64), i64, i64)> = {
            let mut base = self.units_base.lock().unwrap_or_else(|e| e.into_inner());
            let held: std::collections::HashSet<&(i64, i64)> = asked.iter().collect();
            base.retain(|k, _| held.contains(k));
            asked
                .iter()
                .filter_map(|&(id, start)| {
                    let b = base.entry((id, start)).or_insert(UnitsBase {
                        units: [0; crate::meters::MAX_METERS],
                        until: start,
                    });
                    let due = b.until == start || settled - b.until > UNITS_FOLD_MS;
                    (due && settled > b.until).then_some(((id, start), b.until, settled))
                })
                .collect()
        };
        if asked.is_empty() {
            return;
        }
        let folded = match folds.is_empty() {
            true => Vec::new(),
            false => match cluster
                .period_units(
                    &folds
                        .iter()
                        .map(|&((id, _), f, t)| (id, f, t))
                        .collect::<Vec<_>>(),
                )
                .await
            {
                Ok(rows) => rows,
                Err(e) => {
                    tracing::debug!(error = %e, "could not read the period units of other nodes");
                    return;
                }
            },
        };
        let window: Vec<(i64, i64, i64)> = {
            let folded = by_license(&folded, &self.opts.meters);
            let mut base = self.units_base.lock().unwrap_or_else(|e| e.into_inner());
            for &(key, _, to) in &folds {
                if let Some(b) = base.get_mut(&key) {
                    if let Some(units) = folded.get(&key.0) {
                        crate::meters::add(&mut b.units, units);
                    }
                    b.until = to;
                }
            }
            asked
                .iter()
                .map(|&(id, start)| (id, base[&(id, start)].until, i64::MAX))
                .collect()
        };
        let rows = match cluster.period_units(&window).await {
            Ok(rows) => rows,
            Err(e) => {
                tracing::debug!(error = %e, "could not read the period units of other nodes");
                return;
            }
        };
        // the period's requests, where the plan includes requests: read whole
        let wanted: Vec<(i64, i64)> = asked
            .iter()
            .filter(|&&(id, _)| self.ledger.includes_requests(id))
            .copied()
            .collect();
        let requests: HashMap<i64, i64> = match wanted.is_empty() {
            true => HashMap::new(),
            false => match cluster.period_requests(&wanted).await {
                Ok(rows) => rows.into_iter().collect(),
                Err(e) => {
                    tracing::debug!(error = %e, "could not read the period requests of other nodes");
                    return;
                }
            },
        };
        let since = by_license(&rows, &self.opts.meters);
        let base = self.units_base.lock().unwrap_or_else(|e| e.into_inner());
        for &(id, start) in &asked {
            let mut units = base[&(id, start)].units;
            if let Some(more) = since.get(&id) {
                crate::meters::add(&mut units, more);
            }
            self.ledger
                .refresh_units(id, start, &units, requests.get(&id).copied());
        }
    }

    /// Asks the store about a flush in doubt, if any: applies it as committed, or puts its
    /// usage back and keeps its rows for the next flush. `Err` while the store cannot tell.
    async fn settle_in_doubt(&self) -> Result<FlushReport, StoreError> {
        let doubt = self
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .in_doubt
            .take();
        let Some(doubt) = doubt else {
            return Ok(FlushReport::default());
        };
        let process = self
            .opts
            .process
            .as_ref()
            .expect("only a shared store doubts");
        let ids: Vec<i64> = doubt.items.iter().map(|i| i.account.id).collect();
        match self
            .store
            .flush_outcome(process, doubt.seq, &ids, self.ledger.now_ms())
            .await
        {
            Ok(Some(rows)) => {
                tracing::info!(seq = doubt.seq, "the flush in doubt had committed");
                let applied: Vec<Applied> = doubt
                    .items
                    .iter()
                    .map(|i| match rows.iter().find(|r| r.id == i.account.id) {
                        None => Applied::Orphaned,
                        // the row as it is now, whatever the store deducted (its own decision,
                        // unseen: this node's measure stands in for it, which only tells a
                        // top-up from a flush)
                        Some(r) => Applied::Deducted(r.clone(), i.charge.usage.charge_ms),
                    })
                    .collect();
                let written = Written {
                    access_logs: AccessLog::written(&doubt.logs).count() as u64,
                    ..Written::default()
                };
                let report = self.committed(doubt.items, &applied, doubt.logs, written);
                if let Some(l) = &self.opts.leases {
                    // what it spent of the leases is in the rows, not in what was read back
                    l.resync(&ids).await;
                }
                Ok(report)
            }
            Ok(None) => {
                tracing::info!(
                    seq = doubt.seq,
                    "the flush in doubt had not committed: its usage is retried"
                );
                self.ledger.abandon(doubt.items);
                self.keep_logs(doubt.logs);
                Ok(FlushReport::default())
            }
            Err(e) => {
                self.state
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .in_doubt = Some(doubt);
                Err(e)
            }
        }
    }

    /// Applies a committed flush: the ledger subtracts what it committed, the rows' buffer is
    /// recycled, the metrics count it.
    fn committed(
        &self,
        items: Vec<FlushItem>,
        applied: &[Applied],
        logs: Vec<AccessLog>,
        written: Written,
    ) -> FlushReport {
        let mut charged_ms = 0;
        for (item, applied) in items.iter().zip(applied) {
            let usage = &item.charge.usage;
            match applied {
                Applied::Orphaned => {
                    metrics::STORE_ERRORS.inc();
                    tracing::error!(
                        license = item.account.id,
                        charge_ms = usage.charge_ms,
                        requests = usage.requests,
                        "usage for a license that is no longer in the database was set aside; \
                         the rest of the batch is committed"
                    );
                }
                Applied::Deducted(_, deducted_ms) => charged_ms += deducted_ms,
                Applied::Written => {}
            }
        }
        self.ledger.commit(items, applied);
        metrics::PENDING_CHARGES.set(0);
        metrics::PENDING_CHARGE_SECONDS.set(0.0);
        metrics::PENDING_LOG_ROWS.sub(logs.len() as i64);
        self.recycle(logs);
        record_written(&written, charged_ms);
        FlushReport {
            written,
            charged_ms,
        }
    }

    fn pending_gauges(&self, items: &[FlushItem]) {
        let waiting: i64 = items.iter().map(|i| i.charge.usage.charge_ms).sum();
        metrics::PENDING_CHARGES.set(items.len() as i64);
        metrics::PENDING_CHARGE_SECONDS.set(waiting as f64 / 1_000.0);
    }

    /// Records the thresholds crossed since the last flush and queues the new ones for
    /// announcement. On failure they are kept for the next flush.
    async fn record_alerts(&self) {
        let events = self.ledger.take_alerts();
        if events.is_empty() {
            return;
        }
        let keep = events.clone();
        match self.store.record_alerts(events).await {
            Ok(new) => {
                if let Some(q) = &self.opts.alert_queue {
                    for a in new {
                        q.send(a);
                    }
                }
            }
            Err(e) => {
                metrics::STORE_ERRORS.inc();
                tracing::warn!(error = %e, "could not record usage alerts; retrying next flush");
                self.ledger.restore_alerts(keep);
            }
        }
    }

    /// Adds the refusals counted since the last flush to `refused_minutes`; kept for the next
    /// flush if the write fails.
    async fn record_refused(&self) {
        let counts = self.refused.take();
        if counts.is_empty() {
            return;
        }
        let keep = counts.clone();
        if let Err(e) = self.store.record_refused(counts).await {
            metrics::STORE_ERRORS.inc();
            tracing::warn!(error = %e, "could not record refusal counts; retrying next flush");
            self.refused.restore(keep);
        }
    }

    /// Flushes from outside a runtime: the last flush after the server has stopped (every open
    /// session ends).
    pub fn flush_blocking(&self) -> Result<FlushReport, StoreError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| StoreError::Invalid(e.to_string()))?;
        rt.block_on(self.final_flush())
    }

    /// One small step of access-log retention per flush tick: a batch of old rows, so a large
    /// backlog (a lowered retention) drains over many ticks without long write locks.
    async fn prune_access_logs(&self) {
        let Some(keep) = self.opts.access_log_retention else {
            return;
        };
        let before = self.ledger.now_ms() - keep.as_millis() as i64;
        match self.store.prune_access_logs(before).await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(rows = n, "access logs past retention deleted"),
            Err(e) => {
                metrics::STORE_ERRORS.inc();
                tracing::warn!(error = %e, "access-log retention step failed");
            }
        }
    }

    /// Applies license changes made by other processes since `since` (Unix ms).
    async fn refresh(&self, since: i64) -> Result<(), StoreError> {
        let rows = self.store.changed_since(since).await?;
        for row in &rows {
            self.ledger.apply(row);
        }
        if let Some(l) = self.opts.leases.as_ref().filter(|_| !rows.is_empty()) {
            // a debit or refund the notices missed (a reconnect gap, a pooler that drops
            // LISTEN) may have taken the leases down: this node holds no more than its rows
            let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
            l.resync(&ids).await;
        }
        metrics::LICENSE_CHANGES
            .with_label_values(&["poll"])
            .inc_by(rows.len() as u64);
        Ok(())
    }

    fn update_gauges(&self) {
        metrics::ACTIVE_SESSIONS.set(self.ledger.active_sessions() as i64);
        metrics::CACHED_KEYS.set(self.ledger.cached_keys() as i64);
        if self.opts.leases.is_some() {
            metrics::LEASES_HELD.set(self.ledger.leases_held().0 as i64);
        }
    }

    /// Waits until no request is in flight (bounded by the drain timeout).
    async fn drain(&self) {
        let deadline = Instant::now() + self.opts.drain_timeout;
        // Give connections accepted just before the signal time to enter the proxy.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut quiet = 0;
        while Instant::now() < deadline && quiet < 3 {
            if self.in_flight.get() == 0 {
                quiet += 1;
            } else {
                quiet = 0;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if self.in_flight.get() > 0 {
            tracing::warn!(
                in_flight = self.in_flight.get(),
                "requests still in flight at the end of the drain timeout"
            );
        }
    }

    async fn run(&self, mut shutdown: ShutdownWatch) {
        let mut tick = tokio::time::interval(self.opts.flush_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_refresh = Instant::now();
        let mut refreshed_since = self.ledger.now_ms();
        let mut last_prune = Instant::now();
        let mut backoff = Backoff::new();
        let listener = self.store.license_changes().map(|mut changes| {
            let ledger = self.ledger.clone();
            let leases = self.opts.leases.clone();
            tokio::spawn(async move {
                while let Some(rows) = changes.recv().await {
                    for row in &rows {
                        ledger.apply(row);
                    }
                    if let Some(l) = &leases {
                        let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
                        l.resync(&ids).await;
                    }
                    metrics::LICENSE_CHANGES
                        .with_label_values(&["notify"])
                        .inc_by(rows.len() as u64);
                }
            })
        });
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.changed() => break,
            }
            if Instant::now() < backoff.retry_at {
                continue;
            }
            match self.flush().await {
                Ok(_) => {
                    backoff.succeeded();
                    if let Some(l) = &self.opts.leases {
                        l.renew().await;
                    }
                }
                Err(e) => {
                    let wait = backoff.failed(self.opts.flush_interval);
                    tracing::error!(
                        error = %e,
                        retry_in_ms = wait.as_millis() as u64,
                        "flush failed; usage stays pending and is retried"
                    );
                    // the store is down: polling it and pruning can wait for the retry too
                    continue;
                }
            }
            if last_refresh.elapsed() >= self.opts.refresh_interval {
                let poll_start = self.ledger.now_ms();
                // Overlap polls by a few seconds: a change committed with an earlier timestamp
                // than our last poll is still seen (versions make re-applying harmless).
                match self.refresh(refreshed_since - 5_000).await {
                    Ok(()) => refreshed_since = poll_start,
                    Err(e) => {
                        metrics::STORE_ERRORS.inc();
                        tracing::warn!(error = %e, "license refresh failed");
                    }
                }
                last_refresh = Instant::now();
            }
            if last_prune.elapsed() >= Duration::from_secs(60) {
                self.ledger.prune();
                last_prune = Instant::now();
            }
            self.prune_access_logs().await;
            self.update_gauges();
        }

        if let Some(l) = listener {
            l.abort();
        }
        tracing::info!("shutdown: draining in-flight requests before the last flush");
        self.drain().await;
        for attempt in 1..=5 {
            match self.final_flush().await {
                Ok(r) => {
                    tracing::info!(
                        access_logs = r.written.access_logs,
                        charged_ms = r.charged_ms,
                        "last flush committed"
                    );
                    break;
                }
                Err(e) => {
                    tracing::error!(attempt, error = %e, "last flush failed");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
        if let Some(l) = &self.opts.leases {
            match l.release().await {
                Ok(ms) => tracing::info!(ms, "leases given back"),
                Err(e) => tracing::warn!(error = %e, "could not give the leases back; they expire"),
            }
            metrics::LEASES_HELD.set(0);
        }
        tracing::info!("shutdown: drained and flushed");
        self.drained.send_replace(true);
    }

    /// Whether shutdown has drained and flushed (see [`Flusher::run`]); `run` waits on it.
    pub fn drained(&self) -> tokio::sync::watch::Receiver<bool> {
        self.drained.subscribe()
    }
}

/// Two reports as one (a flush in doubt settled, then the flush that followed it).
fn add(a: FlushReport, b: FlushReport) -> FlushReport {
    FlushReport {
        written: Written {
            usage_history: a.written.usage_history + b.written.usage_history,
            usage_sessions: a.written.usage_sessions + b.written.usage_sessions,
            access_logs: a.written.access_logs + b.written.access_logs,
        },
        charged_ms: a.charged_ms + b.charged_ms,
    }
}

fn record_written(w: &Written, charged_ms: i64) {
    let rows = &metrics::FLUSHED_ROWS;
    rows.with_label_values(&["usage_history"])
        .inc_by(w.usage_history);
    rows.with_label_values(&["usage_sessions"])
        .inc_by(w.usage_sessions);
    rows.with_label_values(&["access_logs"])
        .inc_by(w.access_logs);
    if charged_ms > 0 {
        metrics::CHARGED_SECONDS.inc_by(charged_ms as f64 / 1_000.0);
    }
}

/// The flusher as a Pingora background service.
pub struct FlusherService(pub Arc<Flusher>);

#[async_trait]
impl BackgroundService for FlusherService {
    async fn start(&self, shutdown: ShutdownWatch) {
        self.0.run(shutdown).await;
    }
}

#[cfg(all(test, feature = "sqlite"))]
mod tests {
    use super::*;
    use crate::config::MeteringMode;

    #[test]
    fn failed_flushes_back_off_doubling_to_a_cap_and_a_commit_resets_it() {
        let interval = Duration::from_millis(200);
        let mut b = Backoff::new();
        let waits: Vec<u128> = (0..8).map(|_| b.failed(interval).as_millis()).collect();
        assert_eq!(waits, [200, 400, 800, 1_600, 3_200, 6_400, 8_000, 8_000]);
        assert!(b.retry_at > Instant::now() + Duration::from_secs(7));
        b.succeeded();
        assert_eq!(b.failed(interval).as_millis(), 200);
        // an interval longer than the cap is never shortened
        let mut b = Backoff::new();
        assert_eq!(b.failed(Duration::from_secs(20)).as_secs(), 20);
        assert_eq!(b.failed(Duration::from_secs(20)).as_secs(), 20);
    }
    use crate::keys::KeyHash;
    use crate::ledger::{Clock, Ending, LedgerOptions, ManualClock};
    use crate::store::{LicenseStore, MeterStore, NewLicense, SqliteStore};

    struct Fixture {
        _dir: tempfile::TempDir,
        store: SqliteStore,
        ledger: Arc<Ledger>,
        flusher: Arc<Flusher>,
        logs: LogSender,
        clock: Arc<ManualClock>,
        key: String,
        id: i64,
    }

    async fn fixture(log_queue_capacity: usize) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("t.db")).unwrap();
        let new = NewLicense {
            name: "Ada".into(),
            plan: "free".into(),
            balance_ms: 3_600_000,
            ..Default::default()
        };
        let (license, key) = store.create_license(new, 1).await.unwrap();
        let clock = ManualClock::new(1_700_000_000_000);
        let ledger = Arc::new(Ledger::new(
            clock.clone(),
            LedgerOptions {
                mode: MeteringMode::RequestTime,
                idle_timeout_ms: 300_000,
                cache_capacity: 100,
                negative_ttl: Duration::from_secs(1),
                ..LedgerOptions::default()
            },
        ));
        let (flusher, logs) = Flusher::new(
            ledger.clone(),
            Arc::new(store.clone()),
            Arc::new(InFlight::default()),
            FlusherOptions {
                flush_interval: Duration::from_secs(1),
                refresh_interval: Duration::from_secs(1),
                log_queue_capacity,
                drain_timeout: Duration::from_secs(1),
                alert_queue: None,
                access_log_retention: None,
                unauthenticated_log_rows_per_s: 100,
                access_log: Default::default(),
                leases: None,
                session_gap_ms: None,
                meters: Default::default(),
                process: None,
            },
        );
        Fixture {
            _dir: dir,
            store,
            ledger,
            flusher,
            logs,
            clock,
            key,
            id: license.id,
        }
    }

    impl Fixture {
        async fn request(&self, ms: i64) {
            let hash = KeyHash::of(self.key.as_bytes());
            let row = self.store.license_state(hash).await.unwrap();
            let account = self.ledger.insert_loaded(hash, row).unwrap();
            let adm = self.ledger.admit(&account).unwrap();
            let start = self.clock.now_ms();
            self.clock.advance(ms);
            self.ledger
                .finish(&account, adm.ticket, Ending::Charged, 0, 0);
            self.logs.send(AccessLog {
                summary_only: false,
                key_id: None,
                ts_ms: start,
                license_id: Some(self.id),
                session_id: None,
                method: http::Method::GET,
                path: "/x".into(),
                status: 200,
                outcome: "ok",
                duration_us: ms as u64 * 1000,
                bytes_in: 0,
                bytes_out: 0,
                client_ip: None,
                user_agent: None,
                guest_id: None,
                route: None,
                units: None,
            });
        }

        async fn sql(&self, sql: &'static str) -> i64 {
            self.store
                .read(move |c| Ok(c.query_row(sql, [], |r| r.get(0))?))
                .await
                .unwrap()
        }
    }

    #[tokio::test]
    async fn a_failed_flush_keeps_charges_pending_and_the_retry_commits_them_once() {
        let f = fixture(1_000).await;
        f.request(1_500).await;
        f.store
            .write(|c| {
                c.execute_batch(
                    "CREATE TRIGGER no_history BEFORE INSERT ON usage_history
                     BEGIN SELECT RAISE(ABORT, 'disk says no'); END;",
                )?;
                Ok(())
            })
            .await
            .unwrap();
        assert!(f.flusher.flush().await.is_err());
        assert_eq!(f.sql("SELECT balance_ms FROM licenses").await, 3_600_000);
        assert_eq!(f.sql("SELECT count(*) FROM access_logs").await, 0);
        f.request(500).await; // usage keeps accruing while the store is down

        f.store
            .write(|c| Ok(c.execute_batch("DROP TRIGGER no_history")?))
            .await
            .unwrap();
        let report = f.flusher.flush().await.unwrap();
        assert_eq!(report.charged_ms, 2_000);
        assert_eq!(report.written.access_logs, 2);
        assert_eq!(f.sql("SELECT balance_ms FROM licenses").await, 3_598_000);
        assert_eq!(
            f.sql("SELECT sum(delta_ms) FROM usage_history").await,
            3_598_000
        );
        assert_eq!(f.flusher.flush().await.unwrap(), FlushReport::default());
        assert_eq!(f.sql("SELECT count(*) FROM access_logs").await, 2);
    }

    #[tokio::test]
    async fn a_full_log_queue_drops_rows_but_never_charges() {
        let f = fixture(3).await;
        for _ in 0..5 {
            f.request(100).await;
        }
        let report = f.flusher.flush().await.unwrap();
        assert_eq!(
            report.written.access_logs, 3,
            "two rows dropped at the queue"
        );
        assert_eq!(report.charged_ms, 500, "every charge kept");
        assert_eq!(f.sql("SELECT requests_total FROM licenses").await, 5);
    }
}

/// A units read's rows (license, meter, units), as each license's units by meter.
fn by_license(
    rows: &[(i64, String, i64)],
    meters: &[crate::config::Meter],
) -> HashMap<i64, crate::meters::Units> {
    let mut out: HashMap<i64, crate::meters::Units> = HashMap::new();
    for (id, meter, n) in rows {
        if let Some(i) = meters.iter().position(|m| &m.name == meter) {
            out.entry(*id).or_insert([0; crate::meters::MAX_METERS])[i] += *n;
        }
    }
    out
}
