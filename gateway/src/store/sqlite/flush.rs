//! The flusher's batch commit: usage deductions with their history rows, the licenses' used
//! balance, usage sessions and access logs, all in one transaction.

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};

use super::licenses::{insert_history, state_from_row, STATE_COLUMNS as RETURNED};
use super::Result;
use crate::license::LicenseState;
use crate::records::{AccessLog, Applied, Charge, RefusedCount, Written};
use crate::store::rollup::{self, day_of, LATENCY_BUCKETS};
use crate::store::{included, usage};

/// Commits a batch. Returns, per item, what was done with it (see [`Applied`]), and the row
/// counts written.
///
/// An item whose license is no longer in the store cannot be applied: it is set aside
/// ([`Applied::Orphaned`]) and the rest of the batch commits, so one deleted row never stalls
/// every other license's usage. Access-log rows are written whatever became of their license.
pub fn commit(
    conn: &mut Connection,
    charges: &[Charge],
    logs: &[AccessLog],
    now: i64,
    meters: &[crate::config::Meter],
) -> Result<(Vec<Applied>, Written)> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut written = Written::default();
    let mut applied = Vec::with_capacity(charges.len());
    {
        let mut deduct = tx.prepare_cached(&format!(
            "UPDATE licenses SET balance_ms = balance_ms - ?2, used_ms = used_ms + ?5,
                 requests_total = requests_total + ?3, version = version + 1, last_used_at = ?4
             WHERE id = ?1 RETURNING {RETURNED}"
        ))?;
        let mut exists = tx.prepare_cached("SELECT 1 FROM licenses WHERE id = ?1")?;
        let mut forget = tx.prepare_cached("DELETE FROM usage_sessions WHERE id = ?1")?;
        let mut daily = tx.prepare_cached(
            "INSERT INTO usage_daily (license_id, day, charged_ms, requests, bytes_in)
             VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (license_id, day) DO UPDATE SET
                 charged_ms = charged_ms + excluded.charged_ms,
                 requests = requests + excluded.requests,
                 bytes_in = bytes_in + excluded.bytes_in",
        )?;
        let mut session = tx.prepare_cached(
            "INSERT INTO usage_sessions (id, license_id, started_at, last_activity_at, ended_at,
                 charged_ms, requests, bytes_in, bytes_out)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
             ON CONFLICT (id) DO UPDATE SET started_at = excluded.started_at,
                 last_activity_at = excluded.last_activity_at,
                 ended_at = excluded.ended_at, charged_ms = excluded.charged_ms,
                 requests = excluded.requests, bytes_in = excluded.bytes_in,
                 bytes_out = excluded.bytes_out",
        )?;
        for item in charges {
            let u = &item.usage;
            let id = item.license_id;
            let result = if usage::deducts(u) {
                // a plan that includes time: the period's included time first, as committed
                // before this charge (the writer is alone: nothing commits in between)
                let (taken, used_after) = match (item.included_ms, item.period_start) {
                    (Some(i), Some(start)) => {
                        let (used, _) = super::licenses::period_usage(&tx, id, start)?;
                        let split = included::split(i, used, u.time_ms());
                        (split.included_ms, Some((start, used + u.time_ms())))
                    }
                    _ => (0, None),
                };
                // and the prices its included requests and units pay
                let waived = match (item.includes, item.period_start) {
                    (Some(inc), Some(start)) => {
                        let used = period_use(&tx, id, start, meters)?;
                        included::waive(&inc, &used, u, meters)
                    }
                    _ => included::Waived::default(),
                };
                let from_balance = u.charge_ms - taken - waived.ms;
                let state = deduct
                    .query_row(
                        // (used: what was charged, the prices the plan paid not)
                        params![id, from_balance, u.requests, now, u.charge_ms - waived.ms],
                        state_from_row,
                    )
                    .optional()?;
                match state {
                    Some(mut state) => {
                        state.period_used = used_after;
                        written.usage_history +=
                            usage_rows(&tx, item, &state, taken, waived.ms, now)?;
                        priced(&tx, item, &waived, meters, now)?;
                        daily.execute(params![
                            id,
                            day_of(now),
                            u.charge_ms,
                            u.requests,
                            u.bytes_in
                        ])?;
                        Applied::Deducted(state, from_balance)
                    }
                    None => Applied::Orphaned,
                }
            } else if exists.exists([id])? {
                Applied::Written
            } else {
                Applied::Orphaned
            };
            if result != Applied::Orphaned {
                for s in &item.sessions {
                    if s.ended_at.is_some() && s.charged_ms == 0 && s.requests == 0 {
                        // a session whose requests were all given back charged nothing: it
                        // was written while they ran, and is no session at all
                        forget.execute([&*s.id])?;
                        continue;
                    }
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
            applied.push(result);
        }
        written.access_logs = insert_logs(&tx, logs)?;
        roll_up(&tx, logs)?;
        roll_up_endpoints(&tx, logs)?;
        roll_up_keys(&tx, logs)?;
    }
    tx.commit()?;
    Ok((applied, written))
}

/// What of an item's charge is prices, not time: what the balance paid for them marked on its
/// usage row (the row just written or joined: the license's newest plain usage row), and its
/// units written, a row per meter (`usage_units`, with what the plan included of them).
fn priced(
    tx: &Connection,
    item: &Charge,
    waived: &included::Waived,
    meters: &[crate::config::Meter],
    now: i64,
) -> rusqlite::Result<()> {
    let u = &item.usage;
    if u.priced_ms - waived.ms != 0 {
        tx.prepare_cached(
            "UPDATE usage_history SET priced_ms = priced_ms + ?2
             WHERE id = (SELECT max(id) FROM usage_history
                         WHERE license_id = ?1 AND kind = 'usage' AND reason IS NULL)",
        )?
        .execute(params![item.license_id, u.priced_ms - waived.ms])?;
    }
    for (i, m) in meters.iter().enumerate().filter(|&(i, _)| u.units[i] != 0) {
        let (n, inc) = (u.units[i], waived.units[i]);
        tx.prepare_cached(
            "INSERT INTO usage_units (license_id, meter, units, charged_ms, created_at,
                 included_units)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )?
        .execute(params![
            item.license_id,
            m.name,
            n,
            (n - inc).saturating_mul(m.price_ms),
            now,
            inc
        ])?;
    }
    Ok(())
}

/// A period's use as committed (from `start`): its requests and each meter's units, what a
/// plan's included requests and units are split against.
fn period_use(
    tx: &Connection,
    id: i64,
    start: i64,
    meters: &[crate::config::Meter],
) -> Result<included::PeriodUse> {
    let (_, requests) = super::licenses::period_usage(tx, id, start)?;
    let mut out = included::PeriodUse {
        requests,
        ..Default::default()
    };
    let mut st = tx.prepare_cached(
        "SELECT meter, sum(units) FROM usage_units
         WHERE license_id = ?1 AND created_at >= ?2 GROUP BY meter",
    )?;
    let mut rows = st.query(params![id, start])?;
    while let Some(r) = rows.next()? {
        let name: String = r.get(0)?;
        if let Some(i) = meters.iter().position(|m| m.name == name) {
            out.units[i] = r.get(1)?;
        }
    }
    Ok(out)
}

/// Writes the history of one item's deduction, whose balance after is `after`: its usage
/// added to the license's last row where it joins it ([`usage::joins`]), else rows of its own
/// ([`usage::history_rows`]). Returns how many rows were written.
fn usage_rows(
    tx: &Connection,
    item: &Charge,
    after: &LicenseState,
    included_ms: i64,
    waived_ms: i64,
    now: i64,
) -> rusqlite::Result<u64> {
    let id = item.license_id;
    let u = &item.usage;
    let last = tx
        .prepare_cached(
            "SELECT id, kind = 'usage' AND reason IS NULL, created_at FROM usage_history
             WHERE license_id = ?1 ORDER BY id DESC LIMIT 1",
        )?
        .query_row([id], |r| {
            Ok(usage::LastRow {
                id: r.get(0)?,
                usage: r.get(1)?,
                created_at: r.get(2)?,
            })
        })
        .optional()?;
    if let Some(last) = last.filter(|l| usage::joins(Some(l), item, now)) {
        tx.prepare_cached(
            "UPDATE usage_history SET delta_ms = delta_ms - ?2,
                 balance_after_ms = balance_after_ms - ?2, requests = requests + ?3,
                 included_ms = included_ms + ?4
             WHERE id = ?1",
        )?
        .execute(params![
            last.id,
            u.charge_ms - included_ms - waived_ms,
            u.requests,
            included_ms
        ])?;
        return Ok(1);
    }
    let rows = usage::history_rows(u, after.balance_ms, included_ms, waived_ms);
    for r in &rows {
        insert_history(
            tx,
            id,
            "usage",
            r.delta_ms,
            r.balance_before_ms,
            r.requests,
            r.reason,
            now,
        )?;
        if r.included_ms != 0 {
            tx.prepare_cached("UPDATE usage_history SET included_ms = ?2 WHERE id = ?1")?
                .execute(params![tx.last_insert_rowid(), r.included_ms])?;
        }
    }
    Ok(rows.len() as u64)
}

/// Adds refusal counts to `refused_minutes`, in one transaction.
pub fn record_refused(conn: &mut Connection, counts: &[RefusedCount]) -> Result<()> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    {
        let mut st = tx.prepare_cached(
            "INSERT INTO refused_minutes (minute, reason, client_ip, requests)
             VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (minute, reason, client_ip) DO UPDATE SET
                 requests = requests + excluded.requests",
        )?;
        for c in counts {
            let ip = c.client_ip.map(|ip| ip.to_string()).unwrap_or_default();
            st.execute(params![c.minute, c.reason, ip, c.requests])?;
        }
    }
    tx.commit()?;
    Ok(())
}

/// Ends the sessions a crash left open, at their last charged time: run when a gateway starts
/// (the sessions a clean shutdown flushes are ended by that flush).
pub fn close_stale_sessions(conn: &mut Connection) -> Result<usize> {
    Ok(conn.execute(
        "UPDATE usage_sessions SET ended_at = last_activity_at WHERE ended_at IS NULL",
        [],
    )?)
}

/// Rows one retention step deletes: small, so a step holds the write lock for a few
/// milliseconds and the flusher's commits never wait long behind it.
pub const PRUNE_BATCH: usize = 2_000;

/// Deletes up to [`PRUNE_BATCH`] access-log rows older than `before` (Unix ms), oldest first,
/// through the time index. Returns how many went; the daily rollups keep their totals.
pub fn prune_access_logs(conn: &mut Connection, before: i64) -> Result<usize> {
    conn.execute(
        "DELETE FROM refused_minutes WHERE minute IN
           (SELECT DISTINCT minute FROM refused_minutes WHERE minute < ?1 ORDER BY minute
            LIMIT 10)",
        [before],
    )?;
    Ok(conn.execute(
        "DELETE FROM access_logs WHERE id IN
           (SELECT id FROM access_logs WHERE ts < ?1 ORDER BY ts LIMIT ?2)",
        params![before, PRUNE_BATCH as i64],
    )?)
}

/// Guests' rows in the rollup, all together.
pub const GUESTS_ROW: i64 = 0;

static ROLLUP_SQL: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    let h: Vec<String> = (0..LATENCY_BUCKETS).map(|i| format!("h{i}")).collect();
    let params: Vec<String> = (9..9 + LATENCY_BUCKETS).map(|i| format!("?{i}")).collect();
    let add: Vec<String> = h
        .iter()
        .map(|c| format!("{c} = {c} + excluded.{c}"))
        .collect();
    format!(
        "INSERT INTO access_daily (license_id, day, path, calls, ok, duration_us, bytes_in,
             bytes_out, {})
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, {})
         ON CONFLICT (license_id, day, path) DO UPDATE SET calls = calls + excluded.calls,
             ok = ok + excluded.ok, duration_us = duration_us + excluded.duration_us,
             bytes_in = bytes_in + excluded.bytes_in, bytes_out = bytes_out + excluded.bytes_out,
             {}",
        h.join(", "),
        params.join(", "),
        add.join(", ")
    )
});

/// Adds the batch's rows to `access_daily`, one upsert per (license, day, path).
fn roll_up(conn: &Connection, logs: &[AccessLog]) -> rusqlite::Result<()> {
    let tallies = rollup::tally(logs);
    if tallies.is_empty() {
        return Ok(());
    }
    let mut st = conn.prepare_cached(&ROLLUP_SQL)?;
    for ((license, day, path), t) in tallies {
        st.raw_bind_parameter(1, license)?;
        st.raw_bind_parameter(2, day)?;
        st.raw_bind_parameter(3, path)?;
        st.raw_bind_parameter(4, t.calls)?;
        st.raw_bind_parameter(5, t.ok)?;
        st.raw_bind_parameter(6, t.duration_us)?;
        st.raw_bind_parameter(7, t.bytes_in)?;
        st.raw_bind_parameter(8, t.bytes_out)?;
        for (i, n) in t.hist.iter().enumerate() {
            st.raw_bind_parameter(9 + i, *n)?;
        }
        st.raw_execute()?;
    }
    Ok(())
}

/// Adds the batch's rows of keys to `key_daily`, one upsert per (key, day).
fn roll_up_keys(conn: &Connection, logs: &[AccessLog]) -> rusqlite::Result<()> {
    let tallies = rollup::key_tally(logs);
    if tallies.is_empty() {
        return Ok(());
    }
    let mut st = conn.prepare_cached(
        "INSERT INTO key_daily (key_id, day, license_id, calls, ok, duration_us, last_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
         ON CONFLICT (key_id, day) DO UPDATE SET calls = calls + excluded.calls,
             ok = ok + excluded.ok, duration_us = duration_us + excluded.duration_us,
             last_at = max(last_at, excluded.last_at)",
    )?;
    for ((key, day), t) in tallies {
        st.execute(params![
            key,
            day,
            t.license_id,
            t.calls,
            t.ok,
            t.duration_us,
            t.last_at
        ])?;
    }
    Ok(())
}

/// Adds the batch's rows to `endpoint_daily`, one upsert per (owner, day, path, method,
/// status class).
fn roll_up_endpoints(conn: &Connection, logs: &[AccessLog]) -> rusqlite::Result<()> {
    let mut st = conn.prepare_cached(
        "INSERT INTO endpoint_daily (license_id, guest, day, path, method, class, calls,
             bytes_in, bytes_out)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
         ON CONFLICT (license_id, guest, day, path, method, class) DO UPDATE SET
             calls = calls + excluded.calls, bytes_in = bytes_in + excluded.bytes_in,
             bytes_out = bytes_out + excluded.bytes_out",
    )?;
    for ((license, guest, day, path, method, class), t) in rollup::endpoint_tally(logs) {
        st.execute(params![
            license,
            guest,
            day,
            path,
            method,
            class,
            t.calls,
            t.bytes_in,
            t.bytes_out
        ])?;
    }
    Ok(())
}

/// Rows per multi-row `INSERT`: one statement step per 64 rows instead of per row cut the
/// writer's cost per row (benches/flusher.rs).
const LOG_CHUNK: usize = 64;
const LOG_COLUMNS: usize = 16;

fn insert_sql(rows: usize) -> String {
    let one = format!("({})", ["?"; LOG_COLUMNS].join(", "));
    format!(
        "INSERT INTO access_logs (ts, license_id, session_id, method, path, status, outcome,
             duration_us, bytes_in, bytes_out, client_ip, user_agent, guest_id, route, units,
             key_id)
             VALUES {}",
        vec![one; rows].join(", ")
    )
}

static INSERT_CHUNK: std::sync::LazyLock<String> =
    std::sync::LazyLock::new(|| insert_sql(LOG_CHUNK));
static INSERT_ONE: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| insert_sql(1));

fn insert_logs(conn: &Connection, all: &[AccessLog]) -> rusqlite::Result<u64> {
    let mut ip = crate::forwarded::AddressText::default();
    let logs: Vec<&AccessLog> = AccessLog::written(all).collect();
    let mut chunks = logs.chunks_exact(LOG_CHUNK);
    if chunks.len() > 0 {
        let mut st = conn.prepare_cached(&INSERT_CHUNK)?;
        for chunk in &mut chunks {
            for (i, row) in chunk.iter().enumerate() {
                bind_log(&mut st, i * LOG_COLUMNS, row, &mut ip)?;
            }
            st.raw_execute()?;
        }
    }
    let rest = chunks.remainder();
    if !rest.is_empty() {
        let mut st = conn.prepare_cached(&INSERT_ONE)?;
        for row in rest {
            bind_log(&mut st, 0, row, &mut ip)?;
            st.raw_execute()?;
        }
    }
    Ok(logs.len() as u64)
}

/// Binds one row's sixteen values starting after parameter `offset` (parameters count from 1).
fn bind_log(
    st: &mut rusqlite::CachedStatement<'_>,
    offset: usize,
    l: &AccessLog,
    ip: &mut crate::forwarded::AddressText,
) -> rusqlite::Result<()> {
    let p = offset;
    st.raw_bind_parameter(p + 1, l.ts_ms)?;
    st.raw_bind_parameter(p + 2, l.license_id)?;
    st.raw_bind_parameter(p + 3, l.session_id.as_ref().and_then(|v| v.to_str().ok()))?;
    st.raw_bind_parameter(p + 4, l.method.as_str())?;
    st.raw_bind_parameter(p + 5, &*l.path)?;
    st.raw_bind_parameter(p + 6, l.status)?;
    st.raw_bind_parameter(p + 7, l.outcome)?;
    st.raw_bind_parameter(p + 8, l.duration_us as i64)?;
    st.raw_bind_parameter(p + 9, l.bytes_in as i64)?;
    st.raw_bind_parameter(p + 10, l.bytes_out as i64)?;
    st.raw_bind_parameter(p + 11, l.client_ip.map(|a| ip.of(a)))?;
    st.raw_bind_parameter(p + 12, l.user_agent.as_deref())?;
    st.raw_bind_parameter(p + 13, l.guest_id.as_deref())?;
    st.raw_bind_parameter(p + 14, l.route.as_deref())?;
    st.raw_bind_parameter(p + 15, l.units.as_deref())?;
    st.raw_bind_parameter(p + 16, l.key_id)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::clipped;
    use http::{HeaderValue, Method};
    use std::net::{IpAddr, Ipv4Addr};

    #[test]
    fn retention_deletes_old_rows_in_batches_and_keeps_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = crate::store::sqlite::open_migrated(&dir.path().join("t.db")).unwrap();
        let old = PRUNE_BATCH + 500;
        c.execute_batch("BEGIN").unwrap();
        for i in 0..old + 300 {
            // the first `old` rows at 1000 + i ms, the rest at 10_000_000 + i
            let ts = if i < old { 1_000 + i } else { 10_000_000 + i } as i64;
            c.execute(
                "INSERT INTO access_logs (ts, license_id, method, path, status, outcome,
                    duration_us, bytes_in, bytes_out) VALUES (?1, 1, 'GET', '/', 200, 'ok', 1, 0, 0)",
                [ts],
            )
            .unwrap();
        }
        c.execute_batch("COMMIT").unwrap();
        let count = |c: &Connection| -> i64 {
            c.query_row("SELECT count(*) FROM access_logs", [], |r| r.get(0))
                .unwrap()
        };
        assert_eq!(prune_access_logs(&mut c, 5_000_000).unwrap(), PRUNE_BATCH);
        assert_eq!(prune_access_logs(&mut c, 5_000_000).unwrap(), 500);
        assert_eq!(prune_access_logs(&mut c, 5_000_000).unwrap(), 0);
        assert_eq!(count(&c), 300);
        let oldest: i64 = c
            .query_row("SELECT min(ts) FROM access_logs", [], |r| r.get(0))
            .unwrap();
        assert!(oldest >= 10_000_000);
    }

    fn row(i: usize) -> AccessLog {
        AccessLog {
            summary_only: false,
            key_id: None,
            ts_ms: 1_700_000_000_000 + i as i64,
            license_id: (!i.is_multiple_of(3)).then_some(i as i64),
            session_id: Some(HeaderValue::from_static("ses_abc")),
            method: Method::POST,
            path: format!("/p/{i}").into(),
            status: [200, 201, 404, 500, 302][i % 5],
            outcome: "ok",
            duration_us: i as u64 * 10,
            bytes_in: i as u64,
            bytes_out: 2 * i as u64,
            client_ip: i.is_multiple_of(2).then_some(IpAddr::V4(Ipv4Addr::new(
                10,
                0,
                0,
                (i % 250) as u8,
            ))),
            user_agent: (!i.is_multiple_of(4)).then(|| format!("agent {i}").into()),
            guest_id: None,
            route: None,
            units: None,
        }
    }

    #[test]
    fn chunked_and_single_row_inserts_write_every_field_of_every_row() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = crate::store::sqlite::open_migrated(&dir.path().join("t.db")).unwrap();
        // two full chunks of 64 and a remainder of 2
        let logs: Vec<AccessLog> = (0..2 * LOG_CHUNK + 2).map(row).collect();
        let (_, written) = commit(&mut c, &[], &logs, 0, &[]).unwrap();
        assert_eq!(written.access_logs, logs.len() as u64);
        let mut st = c
            .prepare(
                "SELECT ts, license_id, session_id, method, path, status, duration_us, bytes_in,
                        bytes_out, client_ip, user_agent FROM access_logs ORDER BY id",
            )
            .unwrap();
        type Row = (
            i64,
            Option<i64>,
            String,
            String,
            String,
            u16,
            i64,
            i64,
            i64,
            Option<String>,
            Option<String>,
        );
        let got: Vec<Row> = st
            .query_map([], |r| {
                Ok((
                    r.get(0)?,
                    r.get(1)?,
                    r.get(2)?,
                    r.get(3)?,
                    r.get(4)?,
                    r.get(5)?,
                    r.get(6)?,
                    r.get(7)?,
                    r.get(8)?,
                    r.get(9)?,
                    r.get(10)?,
                ))
            })
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        assert_eq!(got.len(), logs.len());
        for (g, l) in got.iter().zip(&logs) {
            let want: Row = (
                l.ts_ms,
                l.license_id,
                "ses_abc".into(),
                "POST".into(),
                l.path.to_string(),
                l.status,
                l.duration_us as i64,
                l.bytes_in as i64,
                l.bytes_out as i64,
                l.client_ip.map(|a| a.to_string()),
                l.user_agent.as_deref().map(str::to_string),
            );
            assert_eq!(g, &want);
        }
    }

    #[test]
    fn the_daily_rollup_adds_up_to_the_licensed_log_rows() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = crate::store::sqlite::open_migrated(&dir.path().join("t.db")).unwrap();
        let logs: Vec<AccessLog> = (0..300).map(row).collect();
        // committed in two batches: the second adds to the first's tallies
        commit(&mut c, &[], &logs[..100], 0, &[]).unwrap();
        commit(&mut c, &[], &logs[100..], 0, &[]).unwrap();
        let from_logs: (i64, i64, i64) = c
            .query_row(
                "SELECT count(*), sum(status < 400), sum(duration_us) FROM access_logs
                 WHERE license_id IS NOT NULL",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .unwrap();
        let from_rollup: (i64, i64, i64) = c
            .query_row(
                "SELECT sum(calls), sum(ok), sum(duration_us) FROM access_daily",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .unwrap();
        assert_eq!(from_logs.0, 200);
        assert_eq!(from_logs, from_rollup);
    }

    #[test]
    fn clipping_keeps_whole_characters() {
        assert_eq!(&*clipped("héllo".as_bytes(), 2), "h");
        assert_eq!(&*clipped(b"abc", 10), "abc");
        assert_eq!(&*clipped(b"a\xffb", 10), "a\u{fffd}b");
    }
}
