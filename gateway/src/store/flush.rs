//! The flusher's batch commit: usage deductions with their history rows, the licenses' used
//! balance, usage sessions and access logs, all in one transaction.

use std::net::IpAddr;

use http::{HeaderValue, Method, Uri};
use rusqlite::{params, Connection, TransactionBehavior};

use super::licenses::{insert_history, state_from_row, STATE_COLUMNS as RETURNED};
use super::Result;
use crate::ledger::{Committed, FlushItem};

/// One request as it is written to `access_logs`. Fields are the request's own shared buffers
/// (cheap clones), rendered to text only on the writer thread.
#[derive(Clone, Debug)]
pub struct AccessLog {
    pub ts_ms: i64,
    pub license_id: Option<i64>,
    pub session_id: Option<HeaderValue>,
    pub method: Method,
    pub uri: Uri,
    pub status: u16,
    /// `ok`, a denial's error code, or `upstream_error`.
    pub outcome: &'static str,
    pub duration_us: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub client_ip: Option<IpAddr>,
    pub user_agent: Option<HeaderValue>,
}

/// Row counts of a committed batch, by table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Written {
    pub usage_history: u64,
    pub usage_sessions: u64,
    pub access_logs: u64,
}

/// Commits a batch. Returns, per item, the license's balance after its deduction (`None` when
/// the item had no usage to deduct), and the row counts written.
pub fn commit(
    conn: &mut Connection,
    items: &[FlushItem],
    logs: &[AccessLog],
    now: i64,
) -> Result<(Vec<Option<Committed>>, Written)> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut written = Written::default();
    let mut committed = Vec::with_capacity(items.len());
    {
        let mut deduct = tx.prepare_cached(&format!(
            "UPDATE licenses SET balance_ms = balance_ms - ?2, used_ms = used_ms + ?2,
                 requests_total = requests_total + ?3, version = version + 1, last_used_at = ?4
             WHERE id = ?1 RETURNING {RETURNED}"
        ))?;
        let mut session = tx.prepare_cached(
            "INSERT INTO usage_sessions (id, license_id, started_at, last_activity_at, ended_at,
                 charged_ms, requests, bytes_in, bytes_out)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
             ON CONFLICT (id) DO UPDATE SET last_activity_at = excluded.last_activity_at,
                 ended_at = excluded.ended_at, charged_ms = excluded.charged_ms,
                 requests = excluded.requests, bytes_in = excluded.bytes_in,
                 bytes_out = excluded.bytes_out",
        )?;
        for item in items {
            let u = &item.usage;
            let result = if u.charge_ms != 0 || u.requests != 0 {
                let state = deduct
                    .query_row(
                        params![item.account.id, u.charge_ms, u.requests, now],
                        state_from_row,
                    )
                    .map_err(|e| match e {
                        // A license deleted under a running gateway: nothing to charge.
                        rusqlite::Error::QueryReturnedNoRows => super::StoreError::NotFound,
                        e => e.into(),
                    })?;
                insert_history(
                    &tx,
                    item.account.id,
                    "usage",
                    -u.charge_ms,
                    state.balance_ms + u.charge_ms,
                    u.requests,
                    None,
                    now,
                )?;
                written.usage_history += 1;
                Some(state)
            } else {
                None
            };
            committed.push(result);
            for s in &item.sessions {
                session.execute(params![
                    &*s.id,
                    s.license_id,
                    s.started_at,
                    s.last_activity_at,
                    s.ended_at,
                    s.charged_ms,
                    s.requests,
                    s.bytes_in,
                    s.bytes_out
                ])?;
                written.usage_sessions += 1;
            }
        }
        insert_logs(&tx, logs)?;
        written.access_logs = logs.len() as u64;
    }
    tx.commit()?;
    Ok((committed, written))
}

fn insert_logs(conn: &Connection, logs: &[AccessLog]) -> rusqlite::Result<()> {
    let mut st = conn.prepare_cached(
        "INSERT INTO access_logs (ts, license_id, session_id, method, path, status, outcome,
             duration_us, bytes_in, bytes_out, client_ip, user_agent)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
    )?;
    let mut ip = String::new();
    for l in logs {
        ip.clear();
        if let Some(addr) = l.client_ip {
            use std::fmt::Write;
            let _ = write!(ip, "{addr}");
        }
        st.execute(params![
            l.ts_ms,
            l.license_id,
            l.session_id.as_ref().and_then(|v| v.to_str().ok()),
            l.method.as_str(),
            l.uri.path(),
            l.status,
            l.outcome,
            l.duration_us as i64,
            l.bytes_in as i64,
            l.bytes_out as i64,
            (!ip.is_empty()).then_some(ip.as_str()),
            l.user_agent
                .as_ref()
                .map(|v| String::from_utf8_lossy(v.as_bytes())),
        ])?;
    }
    Ok(())
}
