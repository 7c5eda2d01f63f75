//! The store's traits on PostgreSQL, each method delegating to the statements of the submodule
//! of its concern, as store/sqlite/backend.rs. With these, `PgStore` is a whole `Backend`.

use crate::store::UnitsFix;
use std::path::Path;

use async_trait::async_trait;
use bytes::Bytes;

use super::{backend, PgStore};
use crate::config::Plan;
use crate::keys::KeyHash;
use crate::license::LicenseState;
use crate::periods::Calendar;
use crate::records::{AlertEvent, RefusedCount};
use crate::store::exports::ExportRequest;
use crate::store::{
    AccessRow, Adjustment, Alert, Committed, DayStats, EventAction, EventOutcome, FlushBatch,
    Fulfilment, GuestStats, HistoryKind, KeyTerms, License, LicenseFilter, LicenseKey,
    LicensePatch, LicenseStore, MeterStore, NewLicense, NewPayment, Operations, Page, PaidSession,
    Payment, PaymentStore, Process, ReportStore, Result, StoreError, SystemStats, UsageStats,
};

#[async_trait]
impl MeterStore for PgStore {
    async fn admission_state(
        &self,
        key: KeyHash,
        calendar: &Calendar,
        now: i64,
    ) -> Result<Option<LicenseState>> {
        PgStore::state_for_admission(self, key, calendar, now).await
    }

    async fn license_state(&self, key: KeyHash) -> Result<Option<LicenseState>> {
        PgStore::state_by_hash(self, key, crate::ledger::now_ms()).await
    }

    async fn changed_since(&self, since: i64) -> Result<Vec<LicenseState>> {
        PgStore::changed_since(self, since).await
    }

    fn license_changes(&self) -> Option<tokio::sync::mpsc::Receiver<Vec<LicenseState>>> {
        Some(self.listen_for_changes())
    }

    async fn commit_flush(&self, batch: &mut FlushBatch) -> Result<Committed> {
        // the batch is only read: it stays the caller's, to recycle or retry
        PgStore::commit_flush(self, batch).await
    }

    async fn flush_outcome(
        &self,
        process: &Process,
        seq: i64,
        ids: &[i64],
        now: i64,
    ) -> Result<Option<Vec<LicenseState>>> {
        PgStore::flush_outcome(self, process, seq, ids, now).await
    }

    async fn record_alerts(&self, events: Vec<AlertEvent>) -> Result<Vec<Alert>> {
        PgStore::record_alerts(self, events).await
    }

    async fn undelivered_alerts(&self, since: i64) -> Result<Vec<Alert>> {
        PgStore::undelivered_alerts(self, since).await
    }

    async fn alert_attempted(&self, id: i64, error: Option<String>, now: i64) -> Result<()> {
        PgStore::alert_attempted(self, id, error, now).await
    }

    async fn record_refused(&self, counts: Vec<RefusedCount>) -> Result<()> {
        PgStore::record_refused(self, counts).await
    }

    async fn prune_access_logs(&self, before: i64) -> Result<usize> {
        PgStore::prune_access_logs(self, before).await
    }
}

#[async_trait]
impl LicenseStore for PgStore {
    async fn create_license(&self, new: NewLicense, now: i64) -> Result<(License, String)> {
        PgStore::create_license(self, new, now).await
    }

    async fn license(&self, id: i64) -> Result<License> {
        PgStore::license(self, id).await
    }

    async fn license_by_key(&self, key: KeyHash) -> Result<Option<License>> {
        PgStore::license_by_key(self, key).await
    }

    async fn licenses(&self, filter: LicenseFilter) -> Result<(Vec<License>, Option<i64>)> {
        PgStore::licenses(self, filter).await
    }

    async fn all_licenses(&self) -> Result<Vec<License>> {
        PgStore::all_licenses(self).await
    }

    async fn update_license(&self, id: i64, patch: LicensePatch, now: i64) -> Result<License> {
        PgStore::update_license(self, id, patch, now).await
    }

    async fn adjust_balance(
        &self,
        id: i64,
        how: Adjustment,
        ms: i64,
        reason: Option<String>,
        now: i64,
    ) -> Result<License> {
        PgStore::adjust_balance(self, id, how, ms, reason, now).await
    }

    async fn correct_units(&self, id: i64, fix: UnitsFix, now: i64) -> Result<License> {
        PgStore::correct_units(self, id, fix, now).await
    }

    async fn revoke(&self, id: i64, now: i64) -> Result<License> {
        PgStore::revoke(self, id, now).await
    }

    async fn rotate(&self, id: i64, now: i64) -> Result<(License, String)> {
        PgStore::rotate(self, id, now).await
    }

    async fn keys(&self, id: i64) -> Result<Vec<LicenseKey>> {
        PgStore::keys(self, id).await
    }

    async fn add_key(
        &self,
        id: i64,
        key: KeyTerms,
        now: i64,
    ) -> Result<(License, LicenseKey, String)> {
        PgStore::add_key(self, id, key, now).await
    }

    async fn revoke_key(&self, id: i64, key_id: i64, now: i64) -> Result<(License, LicenseKey)> {
        PgStore::revoke_key(self, id, key_id, now).await
    }

    async fn rotate_key(
        &self,
        id: i64,
        key_id: i64,
        now: i64,
    ) -> Result<(License, LicenseKey, String)> {
        PgStore::rotate_key(self, id, key_id, now).await
    }

    async fn period_usage(&self, id: i64, start: i64) -> Result<(i64, i64)> {
        PgStore::period_usage(self, id, start).await
    }

    async fn history(
        &self,
        id: i64,
        kind: HistoryKind,
        limit: u32,
        before: Option<i64>,
    ) -> Result<Page> {
        PgStore::history(self, id, kind, limit, before).await
    }

    async fn alerts_for_license(&self, id: i64, limit: u32) -> Result<Vec<Alert>> {
        PgStore::alerts_for_license(self, id, limit).await
    }
}

#[async_trait]
impl PaymentStore for PgStore {
    async fn record_pending(&self, payment: NewPayment, now: i64) -> Result<Payment> {
        PgStore::record_pending(self, payment, now).await
    }

    async fn payment_by_session(&self, session_id: String) -> Result<Option<Payment>> {
        PgStore::payment_by_session(self, session_id).await
    }

    async fn payments_for_license(
        &self,
        id: i64,
        limit: u32,
        before: Option<i64>,
    ) -> Result<Vec<Payment>> {
        PgStore::payments_for_license(self, id, limit, before).await
    }

    async fn fulfil(&self, paid: PaidSession, now: i64) -> Result<Fulfilment> {
        PgStore::fulfil(self, paid, now).await
    }

    async fn apply_event(
        &self,
        event_id: String,
        event_type: String,
        action: EventAction,
        now: i64,
    ) -> Result<EventOutcome> {
        PgStore::apply_event(self, event_id, event_type, action, now).await
    }

    async fn record_subscription_checkout(
        &self,
        checkout: crate::store::subscriptions::CheckoutRow,
        now: i64,
    ) -> Result<()> {
        PgStore::record_subscription_checkout(self, checkout, now).await
    }

    async fn subscription_checkout(
        &self,
        session_id: String,
    ) -> Result<Option<crate::store::subscriptions::CheckoutRow>> {
        PgStore::subscription_checkout(self, session_id).await
    }

    async fn open_subscription_checkout(
        &self,
        license_id: i64,
        now: i64,
    ) -> Result<Option<crate::store::subscriptions::CheckoutRow>> {
        PgStore::open_subscription_checkout(self, license_id, now).await
    }

    async fn subscription(
        &self,
        license_id: i64,
    ) -> Result<Option<crate::store::subscriptions::Subscription>> {
        PgStore::subscription(self, license_id).await
    }

    async fn end_due_subscriptions(
        &self,
        fallback: String,
        calendar: Calendar,
        now: i64,
    ) -> Result<Vec<License>> {
        PgStore::end_due_subscriptions(self, fallback, calendar, now).await
    }
}

#[async_trait]
impl ReportStore for PgStore {
    async fn usage_stats(&self, id: i64, days: u32, now: i64) -> Result<UsageStats> {
        PgStore::usage_stats(self, id, days, now).await
    }

    async fn system_stats(&self, days: u32, now: i64) -> Result<SystemStats> {
        PgStore::system_stats(self, days, now).await
    }

    async fn guest_stats(
        &self,
        days: u32,
        now: i64,
        guest: Option<String>,
    ) -> Result<Vec<GuestStats>> {
        PgStore::guest_stats(self, days, now, guest).await
    }

    async fn system_daily(&self, days: u32, now: i64) -> Result<Vec<DayStats>> {
        PgStore::system_daily(self, days, now).await
    }

    async fn recent_access(&self, id: i64, limit: u32) -> Result<Vec<AccessRow>> {
        PgStore::recent_access(self, id, limit).await
    }

    async fn refused_since(&self, since: i64, limit: u32) -> Result<Vec<(String, String, i64)>> {
        PgStore::refused_since(self, since, limit).await
    }

    async fn export(
        &self,
        request: ExportRequest,
        sink: tokio::sync::mpsc::Sender<Bytes>,
    ) -> Result<()> {
        PgStore::export(self, request, sink).await
    }
}

/// Each license's money columns, its history's sums and its leases' (`store::books`).
const BOOKS: &str = "SELECT l.id, l.balance_ms, l.used_ms, l.requests_total,
        coalesce(h.all_ms, 0)::bigint, coalesce(h.usage_ms, 0)::bigint,
        coalesce(h.usage_requests, 0)::bigint,
        l.reserved_ms, coalesce(s.ms, 0)::bigint, l.period_reserved_ms, coalesce(s.pms, 0)::bigint,
        l.period_reserved_requests, coalesce(s.preq, 0)::bigint,
        coalesce(h.priced_ms, 0)::bigint, coalesce(u.ms, 0)::bigint
    FROM licenses l
    LEFT JOIN (
        SELECT license_id, sum(delta_ms) AS all_ms,
            sum(CASE WHEN kind = 'usage' THEN -delta_ms + included_ms ELSE 0 END) AS usage_ms,
            sum(CASE WHEN kind = 'usage' THEN requests ELSE 0 END) AS usage_requests,
            sum(priced_ms) AS priced_ms
        FROM usage_history GROUP BY license_id) h ON h.license_id = l.id
    LEFT JOIN (
        SELECT license_id, sum(charged_ms) AS ms FROM usage_units GROUP BY license_id
    ) u ON u.license_id = l.id
    LEFT JOIN (
        SELECT license_id, sum(amount_ms) AS ms, sum(period_ms) AS pms,
            sum(period_requests) AS preq
        FROM leases GROUP BY license_id) s ON s.license_id = l.id
    ORDER BY l.id";

#[async_trait]
impl Operations for PgStore {
    async fn ready(&self) -> Result<()> {
        PgStore::ready(self).await
    }

    async fn close_stale_sessions(&self, live_since: i64) -> Result<usize> {
        Ok(PgStore::close_stale_sessions(self, live_since).await? as usize)
    }

    async fn books(&self) -> Result<Vec<crate::store::books::BooksRow>> {
        use crate::store::books::{BooksRow, LeaseBooks};
        self.run(async |c| {
            // one snapshot: the rows, the history and the leases as of one moment
            let tx = c
                .build_transaction()
                .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .await
                .map_err(backend)?;
            let rows = tx.query(BOOKS, &[]).await.map_err(backend)?;
            tx.commit().await.map_err(backend)?;
            Ok(rows
                .iter()
                .map(|r| BooksRow {
                    license_id: r.get(0),
                    balance_ms: r.get(1),
                    used_ms: r.get(2),
                    requests_total: r.get(3),
                    history_ms: r.get(4),
                    usage_ms: r.get(5),
                    usage_requests: r.get(6),
                    priced_ms: r.get(13),
                    units_ms: r.get(14),
                    leases: Some(LeaseBooks {
                        reserved_ms: r.get(7),
                        leased_ms: r.get(8),
                        period_reserved_ms: r.get(9),
                        leased_period_ms: r.get(10),
                        period_reserved_requests: r.get(11),
                        leased_period_requests: r.get(12),
                    }),
                })
                .collect())
        })
        .await
    }

    async fn sync_plans(&self, plans: Vec<Plan>, now: i64) -> Result<()> {
        PgStore::sync_plans(self, plans, now).await
    }

    /// A PostgreSQL database is backed up with its own tools, which copy it consistently while
    /// every node keeps writing.
    async fn backup(&self, _dest: &Path) -> Result<()> {
        Err(StoreError::Invalid(format!(
            "the store is {}: back it up with pg_dump (pg_dump --format=custom --file=<file> \
             <database URL>), which copies it consistently while the gateways run",
            self.describe()
        )))
    }

    fn close(&self) {
        PgStore::close(self)
    }

    fn release_idle(&self) {
        PgStore::release_idle(self)
    }

    fn cluster(&self) -> Option<&dyn crate::store::ClusterStore> {
        Some(self)
    }

    fn console(&self) -> Option<&dyn crate::store::ConsoleStore> {
        Some(self)
    }

    fn describe(&self) -> String {
        PgStore::describe(self)
    }
}
