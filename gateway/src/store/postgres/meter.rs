//! What the proxy and the flusher need (`MeterStore`), on PostgreSQL: the same statements and
//! rules as store/sqlite (licenses.rs, alerts.rs, flush.rs), one round trip or a transaction
//! each.

use async_trait::async_trait;
use tokio_postgres::types::ToSql;
use tokio_postgres::Row;

use super::flush::{state_from_row, STATE_COLUMNS};
use super::{backend, PgStore};
use crate::keys::KeyHash;
use crate::license::{DayUsage, LicenseState, PeriodUsage};
use crate::periods::Calendar;
use crate::records::{AlertEvent, RefusedCount};
use crate::store::rollup::day_of;
use crate::store::{Alert, Committed, FlushBatch, MeterStore, Process, Result};

const ALERT_COLUMNS: &str = "id, license_id, kind, threshold_percent, period_start, used, \
     allowance, created_at, attempts, delivered_at";

fn alert_from_row(r: &Row) -> Alert {
    Alert {
        id: r.get(0),
        license_id: r.get(1),
        kind: r.get(2),
        threshold_percent: r.get(3),
        period_start: r.get(4),
        used: r.get(5),
        allowance: r.get(6),
        created_at: r.get(7),
        attempts: r.get(8),
        delivered_at: r.get(9),
    }
}

/// Rows one retention step deletes (as on SQLite: a step is short, the flush never waits long
/// behind it).
pub const PRUNE_BATCH: i64 = 2_000;

impl PgStore {
    /// The license rows `condition` selects (`… FROM licenses WHERE {condition}`), as the
    /// core holds them.
    pub(super) async fn states_where(
        &self,
        condition: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<LicenseState>> {
        self.run(async |c| {
            let st = c
                .prepare_cached(&format!(
                    "SELECT {STATE_COLUMNS} FROM licenses WHERE {condition}"
                ))
                .await
                .map_err(backend)?;
            Ok(c.query(&st, params)
                .await
                .map_err(backend)?
                .iter()
                .map(state_from_row)
                .collect())
        })
        .await
    }

    /// Time charged and requests counted since `start` (Unix ms), from the usage history.
    pub async fn period_usage(&self, id: i64, start: i64) -> Result<(i64, i64)> {
        self.run(async |c| {
            let st = c
                .prepare_cached(
                    "SELECT coalesce(sum(-delta_ms - priced_ms), 0)::bigint,
                        coalesce(sum(requests), 0)::bigint
                 FROM usage_history
                 WHERE license_id = $1 AND kind = 'usage' AND created_at >= $2",
                )
                .await
                .map_err(backend)?;
            let r = c.query_one(&st, &[&id, &start]).await.map_err(backend)?;
            Ok((r.get(0), r.get(1)))
        })
        .await
    }

    /// Ends the sessions of processes gone since before `live_since` (a crash left them open),
    /// at their last charged time (run at start, and by every heartbeat); those of live
    /// processes stay open.
    pub async fn close_stale_sessions(&self, live_since: i64) -> Result<u64> {
        self.run(async |c| {
            c.execute(super::cluster::END_GONE_SESSIONS, &[&live_since])
                .await
                .map_err(backend)
        })
        .await
    }
}

#[async_trait]
impl MeterStore for PgStore {
    async fn admission_state(
        &self,
        key: KeyHash,
        calendar: &Calendar,
        now: i64,
    ) -> Result<Option<LicenseState>> {
        let Some(mut state) = self.license_state(key).await? else {
            return Ok(None);
        };
        let (start, end) = calendar.period(state.created_at, now);
        self.run(async |c| {
            let usage = c
                .prepare_cached(
                    "SELECT coalesce(sum(-delta_ms - priced_ms), 0)::bigint,
                        coalesce(sum(requests), 0)::bigint
                 FROM usage_history
                 WHERE license_id = $1 AND kind = 'usage' AND created_at >= $2",
                )
                .await
                .map_err(backend)?;
            let topup = c
                .prepare_cached(
                    "SELECT balance_after_ms, created_at FROM usage_history
                 WHERE license_id = $1 AND kind IN ('credit', 'purchase')
                 ORDER BY id DESC LIMIT 1",
                )
                .await
                .map_err(backend)?;
            let today = c
                .prepare_cached(
                    "SELECT bytes_in FROM usage_daily WHERE license_id = $1 AND day = $2",
                )
                .await
                .map_err(backend)?;
            let units = c
                .prepare_cached(
                    "SELECT meter, sum(units)::bigint FROM usage_units
                     WHERE license_id = $1 AND created_at >= $2 GROUP BY meter",
                )
                .await
                .map_err(backend)?;
            let day = day_of(now);
            let id = state.id;
            let (p_usage, p_topup, p_today): (
                [&(dyn ToSql + Sync); 2],
                [&(dyn ToSql + Sync); 1],
                [&(dyn ToSql + Sync); 2],
            ) = ([&id, &start], [&id], [&id, &day]);
            // four reads, pipelined on one connection
            let (usage, topup, today, units) = tokio::try_join!(
                c.query_one(&usage, &p_usage),
                c.query_opt(&topup, &p_topup),
                c.query_opt(&today, &p_today),
                c.query(&units, &p_usage),
            )
            .map_err(backend)?;
            state.period_units = units.iter().map(|r| (r.get(0), r.get(1))).collect();
            state.period = Some(PeriodUsage {
                start,
                end,
                used_ms: usage.get(0),
                requests: usage.get(1),
                units: Default::default(),
            });
            state.topup = topup.map(|r| (r.get(0), r.get(1)));
            let bytes_in: i64 = today.map_or(0, |r| r.get(0));
            state.today = Some(DayUsage {
                day,
                bytes_in: bytes_in.max(0) as u64,
            });
            Ok(Some(state))
        })
        .await
    }

    async fn license_state(&self, key: KeyHash) -> Result<Option<LicenseState>> {
        let hash: &[u8] = &key.0;
        Ok(self
            .states_where("key_hash = $1", &[&hash])
            .await?
            .into_iter()
            .next())
    }

    async fn changed_since(&self, since: i64) -> Result<Vec<LicenseState>> {
        self.states_where("updated_at >= $1 ORDER BY id", &[&since])
            .await
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
        let committed = self
            .run(async |c| super::flush::flush_committed(c, process, seq, now).await)
            .await?;
        if !committed {
            return Ok(None);
        }
        Ok(Some(self.states_of(ids).await?))
    }

    async fn record_alerts(&self, events: Vec<AlertEvent>) -> Result<Vec<Alert>> {
        if events.is_empty() {
            return Ok(Vec::new());
        }
        self.run(async |c| {
            let tx = c.transaction().await.map_err(backend)?;
            let st = tx
                .prepare_cached(&format!(
                    "INSERT INTO usage_alerts (license_id, kind, threshold_percent, period_start,
                     used, allowance, created_at)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)
                 ON CONFLICT (license_id, kind, threshold_percent, period_start) DO NOTHING
                 RETURNING {ALERT_COLUMNS}"
                ))
                .await
                .map_err(backend)?;
            let mut new = Vec::new();
            for e in &events {
                let threshold = i64::from(e.threshold);
                let row = tx
                    .query_opt(
                        &st,
                        &[
                            &e.license_id,
                            &e.kind.as_str(),
                            &threshold,
                            &e.period_start,
                            &e.used,
                            &e.allowance,
                            &e.at,
                        ],
                    )
                    .await
                    .map_err(backend)?;
                new.extend(row.as_ref().map(alert_from_row));
            }
            tx.commit().await.map_err(backend)?;
            Ok(new)
        })
        .await
    }

    async fn undelivered_alerts(&self, since: i64) -> Result<Vec<Alert>> {
        self.run(async |c| {
            let rows = c
                .query(
                    &format!(
                        "SELECT {ALERT_COLUMNS} FROM usage_alerts
                     WHERE delivered_at IS NULL AND created_at >= $1 ORDER BY id"
                    ),
                    &[&since],
                )
                .await
                .map_err(backend)?;
            Ok(rows.iter().map(alert_from_row).collect())
        })
        .await
    }

    async fn alert_attempted(&self, id: i64, error: Option<String>, now: i64) -> Result<()> {
        self.run(async |c| {
            c.execute(
                "UPDATE usage_alerts SET attempts = attempts + 1, last_error = $2::text,
                     delivered_at = CASE WHEN $2::text IS NULL THEN $3::bigint END
                 WHERE id = $1",
                &[&id, &error, &now],
            )
            .await
            .map_err(backend)
        })
        .await?;
        Ok(())
    }

    async fn record_refused(&self, counts: Vec<RefusedCount>) -> Result<()> {
        if counts.is_empty() {
            return Ok(());
        }
        // summed per key first: one upsert may not touch a row twice
        let mut sums: std::collections::BTreeMap<(i64, &str, String), i64> = Default::default();
        for c in &counts {
            let ip = c.client_ip.map(|ip| ip.to_string()).unwrap_or_default();
            *sums.entry((c.minute, c.reason, ip)).or_default() += c.requests;
        }
        let minute: Vec<i64> = sums.keys().map(|k| k.0).collect();
        let reason: Vec<&str> = sums.keys().map(|k| k.1).collect();
        let ip: Vec<&str> = sums.keys().map(|k| k.2.as_str()).collect();
        let n: Vec<i64> = sums.values().copied().collect();
        self.run(async |c| {
            c.execute(
                "INSERT INTO refused_minutes (minute, reason, client_ip, requests)
                 SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::bigint[])
                 ON CONFLICT (minute, reason, client_ip) DO UPDATE SET
                     requests = refused_minutes.requests + excluded.requests",
                &[&minute, &reason, &ip, &n],
            )
            .await
            .map_err(backend)
        })
        .await?;
        Ok(())
    }

    async fn prune_access_logs(&self, before: i64) -> Result<usize> {
        self.run(async |c| {
            c.execute(
                "DELETE FROM refused_minutes WHERE minute IN
               (SELECT DISTINCT minute FROM refused_minutes WHERE minute < $1 ORDER BY minute
                LIMIT 10)",
                &[&before],
            )
            .await
            .map_err(backend)?;
            let n = c
                .execute(
                    "DELETE FROM access_logs WHERE id IN
                   (SELECT id FROM access_logs WHERE ts < $1 ORDER BY ts LIMIT $2)",
                    &[&before, &PRUNE_BATCH],
                )
                .await
                .map_err(backend)?;
            Ok(n as usize)
        })
        .await
    }
}
