//! The store's traits on SQLite: each method is one job on the writer thread (changes) or on a
//! pooled read connection (reads), running the statements of the submodules.

use crate::store::UnitsFix;
use std::path::Path;

use async_trait::async_trait;
use bytes::Bytes;

use super::{
    alerts, exports, flush, licenses, payments, plans, reports, subscriptions, SqliteStore,
};
use crate::config::Plan;
use crate::keys::KeyHash;
use crate::license::LicenseState;
use crate::periods::Calendar;
use crate::records::{AlertEvent, RefusedCount};
use crate::store::exports::ExportRequest;
use crate::store::subscriptions::{CheckoutRow, Subscription};
use crate::store::{
    AccessRow, Adjustment, Alert, Committed, DayStats, EventAction, EventOutcome, FlushBatch,
    Fulfilment, GuestStats, HistoryKind, KeyTerms, License, LicenseFilter, LicenseKey,
    LicensePatch, LicenseStore, MeterStore, NewLicense, NewPayment, Operations, Page, PaidSession,
    Payment, PaymentStore, ReportStore, Result, StoreError, SystemStats, UsageStats,
};

#[async_trait]
impl MeterStore for SqliteStore {
    async fn admission_state(
        &self,
        key: KeyHash,
        calendar: &Calendar,
        now: i64,
    ) -> Result<Option<LicenseState>> {
        let calendar = calendar.clone();
        self.read(move |c| licenses::state_for_admission(c, &key, &calendar, now))
            .await
    }

    async fn license_state(&self, key: KeyHash) -> Result<Option<LicenseState>> {
        let now = crate::ledger::now_ms();
        self.read(move |c| licenses::state_by_hash(c, &key, now))
            .await
    }

    async fn changed_since(&self, since: i64) -> Result<Vec<LicenseState>> {
        self.read(move |c| licenses::changed_since(c, since)).await
    }

    async fn commit_flush(&self, batch: &mut FlushBatch) -> Result<Committed> {
        let owned = std::mem::take(batch);
        let (owned, result) = self
            .write(move |c| {
                let r = flush::commit(c, &owned.charges, &owned.logs, owned.now, &owned.meters);
                Ok((owned, r))
            })
            .await?;
        *batch = owned;
        let (applied, written) = result?;
        Ok(Committed { applied, written })
    }

    async fn record_alerts(&self, events: Vec<AlertEvent>) -> Result<Vec<Alert>> {
        self.write(move |c| alerts::record(c, &events)).await
    }

    async fn undelivered_alerts(&self, since: i64) -> Result<Vec<Alert>> {
        self.read(move |c| alerts::undelivered(c, since)).await
    }

    async fn alert_attempted(&self, id: i64, error: Option<String>, now: i64) -> Result<()> {
        self.write(move |c| alerts::attempted(c, id, error.as_deref(), now))
            .await
    }

    async fn record_refused(&self, counts: Vec<RefusedCount>) -> Result<()> {
        self.write(move |c| flush::record_refused(c, &counts)).await
    }

    async fn prune_access_logs(&self, before: i64) -> Result<usize> {
        self.write(move |c| flush::prune_access_logs(c, before))
            .await
    }
}

#[async_trait]
impl LicenseStore for SqliteStore {
    async fn create_license(&self, new: NewLicense, now: i64) -> Result<(License, String)> {
        self.write(move |c| licenses::create(c, &new, now)).await
    }

    async fn license(&self, id: i64) -> Result<License> {
        self.read(move |c| licenses::get(c, id)).await
    }

    async fn license_by_key(&self, key: KeyHash) -> Result<Option<License>> {
        let now = crate::ledger::now_ms();
        self.read(move |c| licenses::by_hash(c, &key, now)).await
    }

    async fn licenses(&self, filter: LicenseFilter) -> Result<(Vec<License>, Option<i64>)> {
        self.read(move |c| reports::licenses(c, &filter)).await
    }

    async fn all_licenses(&self) -> Result<Vec<License>> {
        self.read(licenses::list).await
    }

    async fn update_license(&self, id: i64, patch: LicensePatch, now: i64) -> Result<License> {
        self.write(move |c| licenses::update(c, id, &patch, now))
            .await
    }

    async fn adjust_balance(
        &self,
        id: i64,
        how: Adjustment,
        ms: i64,
        reason: Option<String>,
        now: i64,
    ) -> Result<License> {
        self.write(move |c| licenses::adjust(c, id, how, ms, reason.as_deref(), now))
            .await
    }

    async fn correct_units(&self, id: i64, fix: UnitsFix, now: i64) -> Result<License> {
        self.write(move |c| licenses::correct_units(c, id, &fix, now))
            .await
    }

    async fn revoke(&self, id: i64, now: i64) -> Result<License> {
        self.write(move |c| licenses::revoke(c, id, now)).await
    }

    async fn rotate(&self, id: i64, now: i64) -> Result<(License, String)> {
        self.write(move |c| licenses::rotate(c, id, now)).await
    }

    async fn keys(&self, id: i64) -> Result<Vec<LicenseKey>> {
        self.read(move |c| licenses::keys(c, id)).await
    }

    async fn add_key(
        &self,
        id: i64,
        key: KeyTerms,
        now: i64,
    ) -> Result<(License, LicenseKey, String)> {
        self.write(move |c| licenses::add_key(c, id, key, now))
            .await
    }

    async fn revoke_key(&self, id: i64, key_id: i64, now: i64) -> Result<(License, LicenseKey)> {
        self.write(move |c| licenses::revoke_key(c, id, key_id, now))
            .await
    }

    async fn rotate_key(
        &self,
        id: i64,
        key_id: i64,
        now: i64,
    ) -> Result<(License, LicenseKey, String)> {
        self.write(move |c| licenses::rotate_key(c, id, key_id, now))
            .await
    }

    async fn period_usage(&self, id: i64, start: i64) -> Result<(i64, i64)> {
        self.read(move |c| licenses::period_usage(c, id, start))
            .await
    }

    async fn history(
        &self,
        id: i64,
        kind: HistoryKind,
        limit: u32,
        before: Option<i64>,
    ) -> Result<Page> {
        self.read(move |c| {
            licenses::get(c, id)?;
            reports::history(c, id, kind, limit, before)
        })
        .await
    }

    async fn alerts_for_license(&self, id: i64, limit: u32) -> Result<Vec<Alert>> {
        self.read(move |c| alerts::list_for_license(c, id, limit))
            .await
    }
}

#[async_trait]
impl PaymentStore for SqliteStore {
    async fn record_pending(&self, payment: NewPayment, now: i64) -> Result<Payment> {
        self.write(move |c| payments::record_pending(c, &payment, now))
            .await
    }

    async fn payment_by_session(&self, session_id: String) -> Result<Option<Payment>> {
        self.read(move |c| payments::by_session(c, &session_id))
            .await
    }

    async fn payments_for_license(
        &self,
        id: i64,
        limit: u32,
        before: Option<i64>,
    ) -> Result<Vec<Payment>> {
        self.read(move |c| payments::list_for_license(c, id, limit, before))
            .await
    }

    async fn fulfil(&self, paid: PaidSession, now: i64) -> Result<Fulfilment> {
        self.write(move |c| payments::fulfil(c, &paid, now)).await
    }

    async fn apply_event(
        &self,
        event_id: String,
        event_type: String,
        action: EventAction,
        now: i64,
    ) -> Result<EventOutcome> {
        self.write(move |c| payments::apply_event(c, &event_id, &event_type, &action, now))
            .await
    }

    async fn record_subscription_checkout(&self, checkout: CheckoutRow, now: i64) -> Result<()> {
        self.write(move |c| subscriptions::record_checkout(c, &checkout, now))
            .await
    }

    async fn subscription_checkout(&self, session_id: String) -> Result<Option<CheckoutRow>> {
        self.read(move |c| subscriptions::checkout(c, &session_id))
            .await
    }

    async fn open_subscription_checkout(
        &self,
        license_id: i64,
        now: i64,
    ) -> Result<Option<CheckoutRow>> {
        self.read(move |c| subscriptions::open_checkout(c, license_id, now))
            .await
    }

    async fn subscription(&self, license_id: i64) -> Result<Option<Subscription>> {
        self.read(move |c| subscriptions::for_license(c, license_id))
            .await
    }

    async fn end_due_subscriptions(
        &self,
        fallback: String,
        calendar: Calendar,
        now: i64,
    ) -> Result<Vec<License>> {
        // on the writer's own connection (a pooled reader may mean a new connection, and its
        // descriptors, every few seconds), taking the write lock only when something is due
        self.write(move |c| {
            if !subscriptions::any_due(c, now)? {
                return Ok(Vec::new());
            }
            subscriptions::end_due(c, &fallback, &calendar, now)
        })
        .await
    }
}

#[async_trait]
impl ReportStore for SqliteStore {
    async fn usage_stats(&self, id: i64, days: u32, now: i64) -> Result<UsageStats> {
        self.read(move |c| {
            licenses::get(c, id)?;
            reports::usage_stats(c, id, days, now)
        })
        .await
    }

    async fn system_stats(&self, days: u32, now: i64) -> Result<SystemStats> {
        self.read(move |c| reports::system_stats(c, days, now))
            .await
    }

    async fn guest_stats(
        &self,
        days: u32,
        now: i64,
        guest: Option<String>,
    ) -> Result<Vec<GuestStats>> {
        self.read(move |c| reports::guest_stats(c, days, now, guest.as_deref()))
            .await
    }

    async fn system_daily(&self, days: u32, now: i64) -> Result<Vec<DayStats>> {
        self.read(move |c| reports::system_daily(c, days, now))
            .await
    }

    async fn recent_access(&self, id: i64, limit: u32) -> Result<Vec<AccessRow>> {
        self.read(move |c| reports::recent_access(c, id, limit))
            .await
    }

    async fn refused_since(&self, since: i64, limit: u32) -> Result<Vec<(String, String, i64)>> {
        self.read(move |c| reports::refused_since(c, since, limit))
            .await
    }

    async fn export(
        &self,
        request: ExportRequest,
        sink: tokio::sync::mpsc::Sender<Bytes>,
    ) -> Result<()> {
        let store = self.clone();
        tokio::task::spawn_blocking(move || {
            store.read_blocking(|c| {
                let range = (
                    request.from,
                    request.to,
                    request.license,
                    request.guest.as_deref(),
                );
                exports::write(c, request.table, request.format, range, |chunk| {
                    sink.blocking_send(Bytes::from(chunk)).is_ok()
                })
            })
        })
        .await
        .map_err(|e| StoreError::Invalid(format!("export task failed: {e}")))?
    }
}

/// Each license's money columns and its history's sums (`store::books`).
const BOOKS: &str = "SELECT l.id, l.balance_ms, l.used_ms, l.requests_total,
        coalesce(h.all_ms, 0), coalesce(h.usage_ms, 0), coalesce(h.usage_requests, 0),
        coalesce(h.priced_ms, 0), coalesce(u.ms, 0)
    FROM licenses l LEFT JOIN (
        SELECT license_id, sum(delta_ms) AS all_ms,
            sum(CASE WHEN kind = 'usage' THEN -delta_ms + included_ms ELSE 0 END) AS usage_ms,
            sum(CASE WHEN kind = 'usage' THEN requests ELSE 0 END) AS usage_requests,
            sum(priced_ms) AS priced_ms
        FROM usage_history GROUP BY license_id) h ON h.license_id = l.id
    LEFT JOIN (
        SELECT license_id, sum(charged_ms) AS ms FROM usage_units GROUP BY license_id
    ) u ON u.license_id = l.id
    ORDER BY l.id";

#[async_trait]
impl Operations for SqliteStore {
    async fn ready(&self) -> Result<()> {
        self.read(|c| Ok(c.query_row("SELECT 1", [], |r| r.get::<_, i64>(0))?))
            .await
            .map(|_| ())
    }

    async fn close_stale_sessions(&self, _live_since: i64) -> Result<usize> {
        self.write(flush::close_stale_sessions).await
    }

    async fn sync_plans(&self, plans: Vec<Plan>, now: i64) -> Result<()> {
        self.write(move |c| plans::sync(c, &plans, now)).await
    }

    async fn books(&self) -> Result<Vec<crate::store::books::BooksRow>> {
        self.read(|c| {
            let mut st = c.prepare(BOOKS)?;
            let rows = st.query_map([], |r| {
                Ok(crate::store::books::BooksRow {
                    license_id: r.get(0)?,
                    balance_ms: r.get(1)?,
                    used_ms: r.get(2)?,
                    requests_total: r.get(3)?,
                    history_ms: r.get(4)?,
                    usage_ms: r.get(5)?,
                    usage_requests: r.get(6)?,
                    priced_ms: r.get(7)?,
                    units_ms: r.get(8)?,
                    leases: None,
                })
            })?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }

    async fn backup(&self, dest: &Path) -> Result<()> {
        let (src, dest) = (self.path().to_path_buf(), dest.to_path_buf());
        tokio::task::spawn_blocking(move || super::backup(&src, &dest))
            .await
            .map_err(|e| StoreError::Invalid(format!("backup task failed: {e}")))?
    }

    fn close(&self) {
        SqliteStore::close(self)
    }

    fn describe(&self) -> String {
        self.path().display().to_string()
    }
}
