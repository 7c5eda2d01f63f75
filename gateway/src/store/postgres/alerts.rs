//! `usage_alerts` on PostgreSQL: thresholds crossed, once per license, kind, threshold and
//! period, with the state of their webhook delivery, as store/sqlite/alerts.rs.

use tokio_postgres::Row;

use super::{backend, PgStore};
use crate::records::AlertEvent;
use crate::store::{Alert, Result};

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

impl PgStore {
    /// Records the thresholds crossed, each once: the ones new here are returned, to deliver.
    pub async fn record_alerts(&self, events: Vec<AlertEvent>) -> Result<Vec<Alert>> {
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

    /// Alerts not yet delivered, created since `since`, oldest first.
    pub async fn undelivered_alerts(&self, since: i64) -> Result<Vec<Alert>> {
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

    /// One delivery attempt: delivered when `error` is none.
    pub async fn alert_attempted(&self, id: i64, error: Option<String>, now: i64) -> Result<()> {
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

    /// A license's alerts, newest first.
    pub async fn alerts_for_license(&self, id: i64, limit: u32) -> Result<Vec<Alert>> {
        self.run(async |c| {
            let st = c
                .prepare_cached(&format!(
                    "SELECT {ALERT_COLUMNS} FROM usage_alerts
                     WHERE license_id = $1 ORDER BY id DESC LIMIT $2"
                ))
                .await
                .map_err(backend)?;
            let rows = c
                .query(&st, &[&id, &i64::from(limit)])
                .await
                .map_err(backend)?;
            Ok(rows.iter().map(alert_from_row).collect())
        })
        .await
    }
}
