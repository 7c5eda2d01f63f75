//! `usage_alerts`: thresholds crossed, once per license, kind, threshold and period, with the
//! state of their webhook delivery.

use super::Result;
use crate::records::AlertEvent;
use crate::store::Alert;
use rusqlite::{params, Connection, Row, TransactionBehavior};

const COLUMNS: &str = "id, license_id, kind, threshold_percent, period_start, used, allowance, \
     created_at, attempts, delivered_at";

fn from_row(r: &Row<'_>) -> rusqlite::Result<Alert> {
    Ok(Alert {
        id: r.get(0)?,
        license_id: r.get(1)?,
        kind: r.get(2)?,
        threshold_percent: r.get(3)?,
        period_start: r.get(4)?,
        used: r.get(5)?,
        allowance: r.get(6)?,
        created_at: r.get(7)?,
        attempts: r.get(8)?,
        delivered_at: r.get(9)?,
    })
}

/// Records crossed thresholds; returns the ones that are new (a threshold already recorded for
/// its period is not recorded or returned again).
pub fn record(conn: &mut Connection, events: &[AlertEvent]) -> Result<Vec<Alert>> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut new = Vec::new();
    {
        let mut st = tx.prepare_cached(&format!(
            "INSERT INTO usage_alerts (license_id, kind, threshold_percent, period_start, used,
                 allowance, created_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
             ON CONFLICT (license_id, kind, threshold_percent, period_start) DO NOTHING
             RETURNING {COLUMNS}"
        ))?;
        for e in events {
            let mut rows = st.query(params![
                e.license_id,
                e.kind.as_str(),
                e.threshold,
                e.period_start,
                e.used,
                e.allowance,
                e.at
            ])?;
            if let Some(r) = rows.next()? {
                new.push(from_row(r)?);
            }
        }
    }
    tx.commit()?;
    Ok(new)
}

/// Notes a delivery attempt.
pub fn attempted(conn: &Connection, id: i64, error: Option<&str>, now: i64) -> Result<()> {
    conn.prepare_cached(
        "UPDATE usage_alerts SET attempts = attempts + 1, last_error = ?2,
             delivered_at = CASE WHEN ?2 IS NULL THEN ?3 END
         WHERE id = ?1",
    )?
    .execute(params![id, error, now])?;
    Ok(())
}

/// Alerts never delivered, created since `since` (to retry after a restart).
pub fn undelivered(conn: &Connection, since: i64) -> Result<Vec<Alert>> {
    let mut st = conn.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM usage_alerts WHERE delivered_at IS NULL AND created_at >= ?1
         ORDER BY id"
    ))?;
    let rows = st.query_map([since], from_row)?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// A license's alerts, newest first.
pub fn list_for_license(conn: &Connection, license_id: i64, limit: u32) -> Result<Vec<Alert>> {
    let mut st = conn.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM usage_alerts WHERE license_id = ?1 ORDER BY id DESC LIMIT ?2"
    ))?;
    let rows = st.query_map(params![license_id, limit], from_row)?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::AlertKind;
    use crate::store::sqlite::licenses;
    use crate::store::NewLicense;

    #[test]
    fn a_threshold_is_recorded_once_per_period() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = crate::store::sqlite::open_migrated(&dir.path().join("t.db")).unwrap();
        let (l, _) = licenses::create(
            &mut c,
            &NewLicense {
                name: "Ada".into(),
                plan: "free".into(),
                ..Default::default()
            },
            1,
        )
        .unwrap();
        let e = |threshold, period_start| AlertEvent {
            license_id: l.id,
            kind: AlertKind::PeriodRequests,
            threshold,
            period_start,
            used: 8,
            allowance: 10,
            at: 5,
        };
        assert_eq!(record(&mut c, &[e(80, 0), e(80, 0)]).unwrap().len(), 1);
        assert_eq!(record(&mut c, &[e(80, 0), e(100, 0)]).unwrap().len(), 1);
        assert_eq!(record(&mut c, &[e(80, 1_000)]).unwrap().len(), 1);
        let all = list_for_license(&c, l.id, 10).unwrap();
        assert_eq!(all.len(), 3);
        attempted(&c, all[0].id, Some("refused"), 9).unwrap();
        attempted(&c, all[0].id, None, 10).unwrap();
        let undelivered = undelivered(&c, 0).unwrap();
        assert_eq!(undelivered.len(), 2);
    }
}
