//! The `plans` table: the config's `[[plans]]`, written at start.

use rusqlite::{params, Connection, TransactionBehavior};

use super::Result;
use crate::config::Plan;

/// Replaces the table's contents with `plans`, in one transaction.
pub fn sync(conn: &mut Connection, plans: &[Plan], now: i64) -> Result<()> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    tx.execute("DELETE FROM plans", [])?;
    {
        let mut st = tx.prepare(
            "INSERT INTO plans (name, requests_per_second, requests_per_minute, requests_per_hour,
                 requests_per_day, max_concurrent, max_body_bytes, period_ms, period_requests,
                 max_upload_bytes_per_day, updated_at, included_ms, price_cents, price_interval)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
        )?;
        let n = |v: Option<u64>| v.map(|v| v.min(i64::MAX as u64) as i64);
        for p in plans {
            st.execute(params![
                p.name,
                n(p.requests_per_second),
                n(p.requests_per_minute),
                n(p.requests_per_hour),
                n(p.requests_per_day),
                n(p.max_concurrent),
                n(p.max_body_bytes),
                p.period_ms,
                n(p.period_requests),
                n(p.max_upload_bytes_per_day),
                now,
                p.included_ms,
                p.price.as_ref().and_then(|x| x.cents),
                p.price.as_ref().map(|x| x.interval),
            ])?;
        }
    }
    tx.commit()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_mirrors_the_config() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = crate::store::sqlite::open_migrated(&dir.path().join("t.db")).unwrap();
        let plans = crate::config::Config::default().plans;
        sync(&mut c, &plans, 1).unwrap();
        sync(&mut c, &plans[..2], 2).unwrap();
        let rows: Vec<(String, Option<i64>, Option<i64>)> = c
            .prepare("SELECT name, period_ms, included_ms FROM plans ORDER BY name")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        assert_eq!(rows.len(), 2);
        assert!(
            rows.contains(&("free".into(), None, Some(1_800_000))),
            "the shipped free plan includes 30 min: {rows:?}"
        );
    }
}
