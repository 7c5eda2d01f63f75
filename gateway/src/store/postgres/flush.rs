//! The flusher's batch commit on PostgreSQL: the same rows and rules as the SQLite commit
//! (store/sqlite/flush.rs), in one transaction whose round trips do not grow with the batch.
//! Every table is written by one statement over arrays (`unnest`), and the access-log rows by
//! one binary `COPY`. Balances change relatively (`balance_ms = balance_ms - c.ms`), never read
//! and written back, and the licenses are locked first in id order, so two nodes flushing the
//! same licenses wait for each other instead of deadlocking.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;

use deadpool_postgres::{Object, Transaction};
use tokio_postgres::binary_copy::BinaryCopyInWriter;
use tokio_postgres::types::ToSql;
use tokio_postgres::types::Type;
use tokio_postgres::Row;

use super::backend;
use crate::keys::KeyHash;
use crate::license::{LicenseState, LicenseStatus};
use crate::records::{AccessLog, Applied, Charge, SessionRecord, Written};
use crate::store::rollup::{self, day_of, LATENCY_BUCKETS};
use crate::store::{usage, Committed, FlushBatch, Result};

/// The state columns a deduction returns, as `LicenseState` reads them.
pub(crate) const STATE_COLUMNS: &str =
    "id, key_hash, plan, status, expires_at, balance_ms, version, created_at";

pub(crate) fn state_from_row(r: &Row) -> LicenseState {
    let hash: Vec<u8> = r.get(1);
    let status: String = r.get(3);
    LicenseState {
        id: r.get(0),
        key_hash: KeyHash(hash.try_into().unwrap_or([0; 32])),
        plan: r.get(2),
        status: LicenseStatus::parse(&status).unwrap_or(LicenseStatus::Revoked),
        expires_at: r.get(4),
        balance_ms: r.get(5),
        version: r.get(6),
        created_at: r.get(7),
        period: None,
        topup: None,
        today: None,
    }
}

const LOCK: &str = "SELECT id FROM licenses WHERE id = ANY($1) ORDER BY id FOR UPDATE";

static DEDUCT: std::sync::LazyLock<String> = std::sync::LazyLock::new(deduct_sql);
static ROLLUP: std::sync::LazyLock<String> = std::sync::LazyLock::new(rollup_sql);

/// Runs `sql` in `tx` as a statement prepared once per connection.
async fn execute(tx: &Transaction<'_>, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<u64> {
    let st = tx.prepare_cached(sql).await.map_err(backend)?;
    tx.execute(&st, params).await.map_err(backend)
}

async fn query(
    tx: &Transaction<'_>,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Vec<Row>> {
    let st = tx.prepare_cached(sql).await.map_err(backend)?;
    tx.query(&st, params).await.map_err(backend)
}

fn deduct_sql() -> String {
    let returned: Vec<String> = STATE_COLUMNS
        .split(", ")
        .map(|c| format!("l.{c}"))
        .collect();
    format!(
        "UPDATE licenses l SET balance_ms = l.balance_ms - c.ms, used_ms = l.used_ms + c.ms,
             requests_total = l.requests_total + c.req, version = l.version + 1,
             period_used_ms = l.period_used_ms + c.ms,
             period_requests = l.period_requests + c.req, last_used_at = $4
         FROM unnest($1::bigint[], $2::bigint[], $3::bigint[]) AS c(id, ms, req)
         WHERE l.id = c.id
         RETURNING {}",
        returned.join(", ")
    )
}

const HISTORY: &str = "INSERT INTO usage_history (license_id, kind, delta_ms, balance_before_ms,
        balance_after_ms, requests, reason, created_at)
    SELECT id, 'usage', d, b, b + d, r, why, $6
    FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::bigint[], $5::text[])
        WITH ORDINALITY AS h(id, d, b, r, why, n)
    ORDER BY n";

const DAILY: &str = "INSERT INTO usage_daily (license_id, day, charged_ms, requests, bytes_in)
    SELECT id, $5, ms, req, b FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::bigint[])
        AS u(id, ms, req, b)
    ON CONFLICT (license_id, day) DO UPDATE SET
        charged_ms = usage_daily.charged_ms + excluded.charged_ms,
        requests = usage_daily.requests + excluded.requests,
        bytes_in = usage_daily.bytes_in + excluded.bytes_in";

/// Takes what a flush charged off the node's leases (several nodes): its balance slice and its
/// period slices, and as much out of the licenses' reserved balance and allowances; a charge
/// past a slice (a request that finished past zero) empties it. The licenses are locked
/// already.
const SPEND_LEASES: &str = "WITH locked AS (
        SELECT license_id, amount_ms, period_ms, period_requests FROM leases
        WHERE node_id = $4 AND license_id = ANY($1) ORDER BY license_id FOR UPDATE),
    taken AS (
        SELECT l.license_id, least(l.amount_ms, greatest(c.ms, 0)) AS ms,
            least(l.period_ms, greatest(c.ms, 0)) AS pms,
            least(l.period_requests, greatest(c.req, 0)) AS preq
        FROM locked l
        JOIN unnest($1::bigint[], $2::bigint[], $3::bigint[]) AS c(id, ms, req)
            ON c.id = l.license_id),
    spent AS (
        UPDATE leases l SET amount_ms = l.amount_ms - t.ms, period_ms = l.period_ms - t.pms,
            period_requests = l.period_requests - t.preq
        FROM taken t
        WHERE l.node_id = $4 AND l.license_id = t.license_id)
    UPDATE licenses l SET reserved_ms = greatest(l.reserved_ms - t.ms, 0),
        period_reserved_ms = greatest(l.period_reserved_ms - t.pms, 0),
        period_reserved_requests = greatest(l.period_reserved_requests - t.preq, 0)
    FROM taken t
    WHERE l.id = t.license_id";

const FORGET: &str = "DELETE FROM usage_sessions WHERE id = ANY($1)";

const SESSIONS: &str = "INSERT INTO usage_sessions (id, license_id, started_at, last_activity_at,
        ended_at, charged_ms, requests, bytes_in, bytes_out)
    SELECT * FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::bigint[], $5::bigint[],
        $6::bigint[], $7::bigint[], $8::bigint[], $9::bigint[])
    ON CONFLICT (id) DO UPDATE SET started_at = excluded.started_at,
        last_activity_at = excluded.last_activity_at, ended_at = excluded.ended_at,
        charged_ms = excluded.charged_ms, requests = excluded.requests,
        bytes_in = excluded.bytes_in, bytes_out = excluded.bytes_out";

const LOG_COPY: &str = "COPY access_logs (ts, license_id, session_id, method, path, status,
    outcome, duration_us, bytes_in, bytes_out, client_ip, user_agent, guest_id)
    FROM STDIN (FORMAT binary)";

const LOG_TYPES: [Type; 13] = [
    Type::INT8,
    Type::INT8,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::INT8,
    Type::TEXT,
    Type::INT8,
    Type::INT8,
    Type::INT8,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
];

fn rollup_sql() -> String {
    let h: Vec<String> = (0..LATENCY_BUCKETS).map(|i| format!("h{i}")).collect();
    let arrays: Vec<String> = (1..=3 + 5 + LATENCY_BUCKETS)
        .map(|i| {
            let ty = if i == 3 { "text" } else { "bigint" };
            format!("${i}::{ty}[]")
        })
        .collect();
    let mut add = String::new();
    for c in ["calls", "ok", "duration_us", "bytes_in", "bytes_out"]
        .iter()
        .copied()
        .chain(h.iter().map(String::as_str))
    {
        let _ = write!(add, "{c} = access_daily.{c} + excluded.{c}, ");
    }
    add.truncate(add.len() - 2);
    format!(
        "INSERT INTO access_daily (license_id, day, path, calls, ok, duration_us, bytes_in,
             bytes_out, {h})
         SELECT * FROM unnest({arrays})
         ON CONFLICT (license_id, day, path) DO UPDATE SET {add}",
        h = h.join(", "),
        arrays = arrays.join(", "),
    )
}

/// What a charge of session time over `span` costs when the license's session time is charged
/// until `until` already (0: never): only the time past it, and the gap up to it when the
/// span starts less than `gap_ms` after it (the session goes on across nodes). Never more than
/// `local` plus that gap.
pub fn past_charged(local: i64, span: (i64, i64), until: i64, gap_ms: i64) -> i64 {
    let (from, to) = span;
    if until <= 0 || local <= 0 {
        local
    } else if until >= to {
        0
    } else if until > from {
        local.min(to - until)
    } else if from - until <= gap_ms {
        local + (from - until)
    } else {
        local
    }
}

/// The charges with their session time cut to what is past each license's `charged_until`,
/// which moves on to the end of their spans. Charges that give time back, or have no span,
/// are left as they are. The licenses are locked already.
async fn one_session(tx: &Transaction<'_>, charges: &[Charge], gap_ms: i64) -> Result<Vec<Charge>> {
    let ids: Vec<i64> = charges
        .iter()
        .filter(|c| c.span.is_some())
        .map(|c| c.license_id)
        .collect();
    let mut until: HashMap<i64, i64> = query(
        tx,
        "SELECT id, charged_until FROM licenses WHERE id = ANY($1)",
        &[&ids],
    )
    .await?
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect();
    let mut out = charges.to_vec();
    for c in out.iter_mut() {
        let (Some(span), Some(cu)) = (c.span, until.get_mut(&c.license_id)) else {
            continue;
        };
        let plain = c.usage.returned().iter().all(|(_, ms)| *ms == 0);
        if plain {
            let charged = past_charged(c.usage.charge_ms, span, *cu, gap_ms);
            c.usage.session_ms += charged - c.usage.charge_ms;
            c.usage.charge_ms = charged;
        }
        *cu = (*cu).max(span.1);
    }
    let (ids, to): (Vec<i64>, Vec<i64>) = until.into_iter().unzip();
    execute(
        tx,
        "UPDATE licenses l SET charged_until = greatest(l.charged_until, u.to_ms)
         FROM unnest($1::bigint[], $2::bigint[]) AS u(id, to_ms) WHERE l.id = u.id",
        &[&ids, &to],
    )
    .await?;
    Ok(out)
}

/// Commits a batch in one transaction; what was done with each charge, in order, and the rows
/// written. A charge whose license is gone is set aside ([`Applied::Orphaned`]), as on SQLite.
pub async fn commit(client: &mut Object, batch: &FlushBatch) -> Result<Committed> {
    let now = batch.now;
    let tx = client.transaction().await.map_err(backend)?;
    let mut written = Written::default();

    // the licenses, locked in id order: which exist, and no other flush between
    let mut ids: Vec<i64> = batch.charges.iter().map(|c| c.license_id).collect();
    ids.sort_unstable();
    ids.dedup();
    let present: std::collections::HashSet<i64> = if ids.is_empty() {
        Default::default()
    } else {
        query(&tx, LOCK, &[&ids])
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect()
    };

    // several nodes' one session: each charge's session time only past `charged_until`
    let adjusted;
    let charges: &[Charge] = match batch.session_gap_ms {
        Some(gap) if batch.charges.iter().any(|c| c.span.is_some()) => {
            adjusted = one_session(&tx, &batch.charges, gap).await?;
            &adjusted
        }
        _ => &batch.charges,
    };

    // one deduction per license (a batch has one charge per license; summed if not)
    let mut deduct: BTreeMap<i64, (i64, i64, i64)> = BTreeMap::new();
    for c in charges.iter().filter(|c| usage::deducts(&c.usage)) {
        let d = deduct.entry(c.license_id).or_default();
        d.0 += c.usage.charge_ms;
        d.1 += c.usage.requests;
        d.2 += c.usage.bytes_in;
    }
    let mut states: HashMap<i64, LicenseState> = HashMap::new();
    if !deduct.is_empty() {
        let (ids, ms, req): (Vec<i64>, Vec<i64>, Vec<i64>) = (
            deduct.keys().copied().collect(),
            deduct.values().map(|d| d.0).collect(),
            deduct.values().map(|d| d.1).collect(),
        );
        for r in query(&tx, &DEDUCT, &[&ids, &ms, &req, &now]).await? {
            let s = state_from_row(&r);
            states.insert(s.id, s);
        }
        if let Some(node) = &batch.node {
            // a lease is spent by what the node served (as its ledger counts it), whatever the
            // license was charged for it
            let served = |f: fn(&Charge) -> i64| -> Vec<i64> {
                ids.iter()
                    .map(|id| {
                        batch
                            .charges
                            .iter()
                            .filter(|c| c.license_id == *id)
                            .map(f)
                            .sum()
                    })
                    .collect()
            };
            let (served_ms, served_req) =
                (served(|c| c.usage.charge_ms), served(|c| c.usage.requests));
            execute(
                &tx,
                SPEND_LEASES,
                &[&ids, &served_ms, &served_req, &node.as_ref()],
            )
            .await?;
        }
        let bytes: Vec<i64> = deduct.values().map(|d| d.2).collect();
        let (ids, ms, req, bytes) = only_present(&ids, &ms, &req, &bytes, &states);
        execute(&tx, DAILY, &[&ids, &ms, &req, &bytes, &day_of(now)]).await?;
    }

    let mut applied = Vec::with_capacity(charges.len());
    let mut history = HistoryArrays::default();
    let mut forget: Vec<&str> = Vec::new();
    let mut sessions: Vec<&SessionRecord> = Vec::new();
    for c in charges {
        let id = c.license_id;
        let result = if !present.contains(&id) {
            Applied::Orphaned
        } else if usage::deducts(&c.usage) {
            match states.get(&id) {
                Some(s) => Applied::Deducted(s.clone()),
                None => Applied::Orphaned,
            }
        } else {
            Applied::Written
        };
        if let Applied::Deducted(s) = &result {
            for row in usage::history_rows(&c.usage, s.balance_ms) {
                history.push(id, row);
            }
        }
        if result != Applied::Orphaned {
            for s in &c.sessions {
                if s.ended_at.is_some() && s.charged_ms == 0 && s.requests == 0 {
                    // charged nothing in the end: written while its requests ran, no session
                    forget.push(&s.id);
                } else {
                    sessions.push(s);
                }
            }
        }
        applied.push(result);
    }
    if !history.ids.is_empty() {
        let h = &history;
        execute(
            &tx,
            HISTORY,
            &[&h.ids, &h.deltas, &h.before, &h.requests, &h.reasons, &now],
        )
        .await?;
        written.usage_history = h.ids.len() as u64;
    }
    if !forget.is_empty() {
        execute(&tx, FORGET, &[&forget]).await?;
    }
    if !sessions.is_empty() {
        written.usage_sessions = write_sessions(&tx, &sessions).await?;
    }
    if !batch.logs.is_empty() {
        copy_logs(&tx, &batch.logs).await?;
        roll_up(&tx, &batch.logs).await?;
        written.access_logs = batch.logs.len() as u64;
    }
    tx.commit().await.map_err(backend)?;
    Ok(Committed { applied, written })
}

/// The daily rows of the licenses the deduction found (a license deleted under the gateway has
/// none).
fn only_present(
    ids: &[i64],
    ms: &[i64],
    req: &[i64],
    bytes: &[i64],
    states: &HashMap<i64, LicenseState>,
) -> (Vec<i64>, Vec<i64>, Vec<i64>, Vec<i64>) {
    let mut out = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..ids.len() {
        if states.contains_key(&ids[i]) {
            out.0.push(ids[i]);
            out.1.push(ms[i]);
            out.2.push(req[i]);
            out.3.push(bytes[i]);
        }
    }
    out
}

#[derive(Default)]
struct HistoryArrays {
    ids: Vec<i64>,
    deltas: Vec<i64>,
    before: Vec<i64>,
    requests: Vec<i64>,
    reasons: Vec<Option<&'static str>>,
}

impl HistoryArrays {
    fn push(&mut self, id: i64, r: usage::HistoryRow) {
        self.ids.push(id);
        self.deltas.push(r.delta_ms);
        self.before.push(r.balance_before_ms);
        self.requests.push(r.requests);
        self.reasons.push(r.reason);
    }
}

/// Upserts the sessions, the last record of an id winning (as the SQLite commit's row-by-row
/// upserts do).
async fn write_sessions(tx: &Transaction<'_>, sessions: &[&SessionRecord]) -> Result<u64> {
    let mut last: HashMap<&str, usize> = HashMap::new();
    for (i, s) in sessions.iter().enumerate() {
        last.insert(&s.id, i);
    }
    let mut keep: Vec<usize> = last.into_values().collect();
    keep.sort_unstable();
    let pick = |f: &dyn Fn(&SessionRecord) -> i64| -> Vec<i64> {
        keep.iter().map(|&i| f(sessions[i])).collect()
    };
    let ids: Vec<&str> = keep.iter().map(|&i| &*sessions[i].id).collect();
    let ended: Vec<Option<i64>> = keep.iter().map(|&i| sessions[i].ended_at).collect();
    execute(
        tx,
        SESSIONS,
        &[
            &ids,
            &pick(&|s| s.license_id),
            &pick(&|s| s.started_at),
            &pick(&|s| s.last_activity_at),
            &ended,
            &pick(&|s| s.charged_ms),
            &pick(&|s| s.requests),
            &pick(&|s| s.bytes_in),
            &pick(&|s| s.bytes_out),
        ],
    )
    .await?;
    // as on SQLite, every record written counts (a session written twice in a batch twice)
    Ok(sessions.len() as u64)
}

/// The batch's access-log rows, in one binary `COPY`.
async fn copy_logs(tx: &Transaction<'_>, logs: &[AccessLog]) -> Result<()> {
    let copy = tx.prepare_cached(LOG_COPY).await.map_err(backend)?;
    let sink = tx.copy_in(&copy).await.map_err(backend)?;
    let mut writer = std::pin::pin!(BinaryCopyInWriter::new(sink, &LOG_TYPES));
    let mut ip = String::new();
    for l in logs {
        ip.clear();
        if let Some(addr) = l.client_ip {
            let _ = write!(ip, "{addr}");
        }
        let status = i64::from(l.status);
        let (duration, bytes_in, bytes_out) =
            (l.duration_us as i64, l.bytes_in as i64, l.bytes_out as i64);
        let session = l.session_id.as_ref().and_then(|v| v.to_str().ok());
        let client_ip = (!ip.is_empty()).then_some(ip.as_str());
        writer
            .as_mut()
            .write(&[
                &l.ts_ms,
                &l.license_id,
                &session,
                &l.method.as_str(),
                &&*l.path,
                &status,
                &l.outcome,
                &duration,
                &bytes_in,
                &bytes_out,
                &client_ip,
                &l.user_agent.as_deref(),
                &l.guest_id.as_deref(),
            ])
            .await
            .map_err(backend)?;
    }
    writer.finish().await.map_err(backend)?;
    Ok(())
}

/// Adds the batch's rows to `access_daily`, one upsert over arrays.
async fn roll_up(tx: &Transaction<'_>, logs: &[AccessLog]) -> Result<()> {
    let tallies = rollup::tally(logs);
    if tallies.is_empty() {
        return Ok(());
    }
    // in key order, so the upsert walks the primary key's index from one end to the other
    let mut tallies: Vec<_> = tallies.into_iter().collect();
    tallies.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    let n = tallies.len();
    let mut license = Vec::with_capacity(n);
    let mut day = Vec::with_capacity(n);
    let mut path = Vec::with_capacity(n);
    let mut sums: [Vec<i64>; 5] = Default::default();
    let mut hist: Vec<Vec<i64>> = (0..LATENCY_BUCKETS)
        .map(|_| Vec::with_capacity(n))
        .collect();
    for ((l, d, p), t) in &tallies {
        license.push(*l);
        day.push(*d);
        path.push(*p);
        for (v, x) in sums
            .iter_mut()
            .zip([t.calls, t.ok, t.duration_us, t.bytes_in, t.bytes_out])
        {
            v.push(x);
        }
        for (v, x) in hist.iter_mut().zip(t.hist.iter()) {
            v.push(*x);
        }
    }
    let mut params: Vec<&(dyn ToSql + Sync)> = vec![&license, &day, &path];
    for v in &sums {
        params.push(v);
    }
    for v in &hist {
        params.push(v);
    }
    execute(tx, &ROLLUP, &params).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::past_charged;

    const GAP: i64 = 300_000;

    #[test]
    fn session_time_is_charged_only_past_what_another_node_charged() {
        // the first charge of a license: as measured
        assert_eq!(past_charged(1_000, (0, 1_000), 0, GAP), 1_000);
        // another node charged up to 1 s already: the same second costs nothing more
        assert_eq!(past_charged(1_000, (0, 1_000), 1_000, GAP), 0);
        assert_eq!(past_charged(1_000, (0, 1_000), 5_000, GAP), 0);
        // overlapping: only what is past it
        assert_eq!(past_charged(1_000, (500, 1_500), 1_000, GAP), 500);
        // never more than measured, even if the span is wider (time given back inside it)
        assert_eq!(past_charged(300, (0, 1_000), 200, GAP), 300);
        // starting after it within the idle timeout: the session goes on, the gap charged
        assert_eq!(past_charged(1_000, (5_000, 6_000), 1_000, GAP), 5_000);
        // past the idle timeout: a new session, as measured
        assert_eq!(past_charged(1_000, (400_000, 401_000), 1_000, GAP), 1_000);
        // one node's consecutive flushes: each from where the last ended, as measured (even
        // when the wall clock drifted a millisecond from the monotonic one meanwhile)
        assert_eq!(past_charged(1_000, (1_000, 2_000), 1_000, GAP), 1_000);
        assert_eq!(past_charged(1_001, (1_000, 2_000), 1_000, GAP), 1_001);
    }
}
