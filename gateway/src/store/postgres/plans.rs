//! The `plans` table on PostgreSQL: the config's `[[plans]]`, written at start, as
//! store/sqlite/plans.rs.

use super::{backend, PgStore};
use crate::config::Plan;
use crate::store::Result;

/// The advisory lock `sync_plans` writes under ("plans" in ASCII).
const PLANS_LOCK: i64 = 0x0070_6c61_6e73;

impl PgStore {
    /// The configured plans, written in one transaction (the file is the source of truth).
    pub async fn sync_plans(&self, plans: Vec<Plan>, now: i64) -> Result<()> {
        self.run(async |c| {
            let tx = c.transaction().await.map_err(backend)?;
            // nodes starting together write one after the other: under READ COMMITTED two
            // deletes would see no rows each, and the second's inserts break the key
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&PLANS_LOCK])
                .await
                .map_err(backend)?;
            tx.execute("DELETE FROM plans", &[])
                .await
                .map_err(backend)?;
            let n = |v: Option<u64>| v.map(|v| v.min(i64::MAX as u64) as i64);
            for p in &plans {
                tx.execute(
                    "INSERT INTO plans (name, requests_per_second, requests_per_minute,
                     requests_per_hour, requests_per_day, max_concurrent, max_body_bytes,
                     period_ms, period_requests, max_upload_bytes_per_day, updated_at,
                     included_ms, price_cents, price_interval)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
                    &[
                        &p.name,
                        &n(p.requests_per_second),
                        &n(p.requests_per_minute),
                        &n(p.requests_per_hour),
                        &n(p.requests_per_day),
                        &n(p.max_concurrent),
                        &n(p.max_body_bytes),
                        &p.period_ms,
                        &n(p.period_requests),
                        &n(p.max_upload_bytes_per_day),
                        &now,
                        &p.included_ms,
                        &p.price.as_ref().and_then(|x| x.cents),
                        &p.price.as_ref().map(|x| x.interval),
                    ],
                )
                .await
                .map_err(backend)?;
            }
            tx.commit().await.map_err(backend)?;
            Ok(())
        })
        .await
    }
}
