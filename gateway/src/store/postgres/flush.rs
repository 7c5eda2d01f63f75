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

use super::cluster_charge::{
    flush_committed, one_session, written_span, COUNT_UNITS, RECORD_FLUSH, SPEND_LEASES,
};
use super::{backend, execute, query, PgStore};
use crate::keys::KeyHash;
use crate::license::{LicenseState, LicenseStatus};
use crate::records::{AccessLog, Applied, Charge, RefusedCount, SessionRecord, Written};
use crate::store::included::{PeriodUse, Waived};
use crate::store::rollup::{self, day_of, LATENCY_BUCKETS};
use crate::store::{usage, Committed, FlushBatch, Process, Result, StoreError};

/// The state columns a deduction returns, as `LicenseState` reads them.
pub(crate) const STATE_COLUMNS: &str =
    "id, key_hash, plan, status, expires_at, balance_ms, version, \
     COALESCE(period_anchor,created_at), keys_version";

pub(crate) fn state_from_row(r: &Row) -> LicenseState {
    let hash: Vec<u8> = r.get(1);
    let status: String = r.get(3);
    LicenseState {
        id: r.get(0),
        key_hash: KeyHash(hash.try_into().unwrap_or([0; 32])),
        key_id: 0,
        keys_version: r.get(8),
        plan: r.get(2),
        status: LicenseStatus::parse(&status).unwrap_or(LicenseStatus::Revoked),
        expires_at: r.get(4),
        balance_ms: r.get(5),
        version: r.get(6),
        period_anchor: r.get(7),
        period: None,
        topup: None,
        today: None,
        period_units: Vec::new(),
        key_rules: None,
        period_used: None,
    }
}

/// Locks the licenses of a batch in id order, and reads the plan period each counts.
const LOCK: &str = "SELECT id, period_start, period_used_ms FROM licenses WHERE id = ANY($1)
    ORDER BY id FOR UPDATE";

/// A license's use of a plan period that has ended: its time from `$2` to `$3` (the next
/// period's start), as `licenses::PERIOD_USAGE` counts it.
const PERIOD_USAGE_BEFORE: &str =
    "SELECT coalesce(sum(-delta_ms - priced_ms + included_ms), 0)::bigint
    FROM usage_history
    WHERE license_id = $1 AND kind = 'usage' AND created_at >= $2 AND created_at < $3";

/// Moves a license's row to a new plan period (a flush first in a new period of a plan that
/// includes time), counted again from the usage history by `cluster::new_period`: `$2` the
/// period's start, `$3` and `$4` its use, nothing reserved of it yet.
const NEW_PERIOD: &str = "UPDATE licenses SET period_start = $2, period_used_ms = $3,
        period_requests = $4, period_reserved_ms = 0, period_reserved_requests = 0
    WHERE id = $1";

static DEDUCT: std::sync::LazyLock<String> = std::sync::LazyLock::new(deduct_sql);
static ROLLUP: std::sync::LazyLock<String> = std::sync::LazyLock::new(rollup_sql);

/// Deducts each license's charge, less what its plan's included time took and the prices it
/// paid (`inc`, from the balance only the rest; `used_ms` counts all but those prices); its plan period's counts take it only when the period the row
/// counts began by the flush's time (`$4`): one another node moved on to meanwhile counted
/// itself from the usage history, where this flush's rows (made at `$4`) are not.
fn deduct_sql() -> String {
    let returned: Vec<String> = STATE_COLUMNS
        .split(", ")
        .map(|c| match c {
            "COALESCE(period_anchor,created_at)" => "COALESCE(l.period_anchor,l.created_at)".into(),
            c => format!("l.{c}"),
        })
        .collect();
    format!(
        "UPDATE licenses l SET balance_ms = l.balance_ms - (c.ms - c.inc),
             used_ms = l.used_ms + c.ms - c.waived,
             requests_total = l.requests_total + c.req, version = l.version + 1,
             period_used_ms = l.period_used_ms
                 + CASE WHEN l.period_start <= $4 THEN c.ms - c.priced ELSE 0 END,
             period_requests = l.period_requests
                 + CASE WHEN l.period_start <= $4 THEN c.req ELSE 0 END,
             last_used_at = $4
         FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $5::bigint[], $6::bigint[],
                 $7::bigint[])
             AS c(id, ms, req, priced, inc, waived)
         WHERE l.id = c.id
         RETURNING {}",
        returned.join(", ")
    )
}

const HISTORY: &str = "INSERT INTO usage_history (license_id, kind, delta_ms, balance_before_ms,
        balance_after_ms, requests, reason, created_at, included_ms)
    SELECT id, 'usage', d, b, b + d, r, why, $6, inc
    FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::bigint[], $5::text[],
        $7::bigint[])
        WITH ORDINALITY AS h(id, d, b, r, why, inc, n)
    ORDER BY n";

/// Each license's last history row (by id): the row a flush's usage may join.
const LAST_ROWS: &str = "SELECT l.id, h.id, h.kind = 'usage' AND h.reason IS NULL, h.created_at
    FROM unnest($1::bigint[]) AS l(id)
    CROSS JOIN LATERAL (
        SELECT id, kind, reason, created_at FROM usage_history
        WHERE license_id = l.id ORDER BY id DESC LIMIT 1) h";

/// Adds usage to the rows it joins: `$1` the rows, `$2` what the balance was charged, `$3`
/// the requests, `$4` what the plan's included time took.
const JOIN_HISTORY: &str = "UPDATE usage_history h SET delta_ms = h.delta_ms - u.ms,
        balance_after_ms = h.balance_after_ms - u.ms, requests = h.requests + u.req,
        included_ms = h.included_ms + u.inc
    FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::bigint[]) AS u(id, ms, req, inc)
    WHERE h.id = u.id";

/// Marks the prices in each license's newest plain usage row (the row its flush just wrote or
/// joined): `$1` the licenses, `$2` the prices charged.
const PRICED_HISTORY: &str = "UPDATE usage_history h SET priced_ms = h.priced_ms + u.p
    FROM unnest($1::bigint[], $2::bigint[]) AS u(lid, p)
    WHERE h.id = (SELECT max(id) FROM usage_history
                  WHERE license_id = u.lid AND kind = 'usage' AND reason IS NULL)";

/// A row per license and meter charged units: `$4` what the balance paid for them, `$6` the
/// units the plan included.
const UNITS: &str = "INSERT INTO usage_units (license_id, meter, units, charged_ms, created_at,
        included_units)
    SELECT lid, m, n, ms, $5, inc
    FROM unnest($1::bigint[], $2::text[], $3::bigint[], $4::bigint[], $6::bigint[])
        AS u(lid, m, n, ms, inc)";

/// A license's requests in a plan period (from `$2`, up to `$3`), as `licenses::PERIOD_USAGE`
/// counts them, and each meter's units: what its plan's included requests and units are split
/// against.
const PERIOD_REQUESTS: &str = "SELECT coalesce(sum(requests), 0)::bigint FROM usage_history
    WHERE license_id = $1 AND kind = 'usage' AND created_at >= $2 AND created_at < $3";
const PERIOD_UNITS: &str = "SELECT meter, sum(units)::bigint FROM usage_units
    WHERE license_id = $1 AND created_at >= $2 AND created_at < $3 GROUP BY meter";

const DAILY: &str = "INSERT INTO usage_daily (license_id, day, charged_ms, requests, bytes_in)
    SELECT id, $5, ms, req, b FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::bigint[])
        AS u(id, ms, req, b)
    ON CONFLICT (license_id, day) DO UPDATE SET
        charged_ms = usage_daily.charged_ms + excluded.charged_ms,
        requests = usage_daily.requests + excluded.requests,
        bytes_in = usage_daily.bytes_in + excluded.bytes_in";

const FORGET: &str = "DELETE FROM usage_sessions WHERE id = ANY($1)";

const SESSIONS: &str = "INSERT INTO usage_sessions (id, license_id, started_at, last_activity_at,
        ended_at, charged_ms, requests, bytes_in, bytes_out, node_id)
    SELECT *, $10::text FROM unnest($1::text[], $2::bigint[], $3::bigint[],
        $4::bigint[], $5::bigint[], $6::bigint[], $7::bigint[], $8::bigint[], $9::bigint[])
    ON CONFLICT (id) DO UPDATE SET started_at = excluded.started_at,
        last_activity_at = excluded.last_activity_at, ended_at = excluded.ended_at,
        charged_ms = excluded.charged_ms, requests = excluded.requests,
        bytes_in = excluded.bytes_in, bytes_out = excluded.bytes_out";

const LOG_COPY: &str = "COPY access_logs (ts, license_id, session_id, method, path, status,
    outcome, duration_us, bytes_in, bytes_out, client_ip, user_agent, guest_id, route, units,
    key_id)
    FROM STDIN (FORMAT binary)";

const LOG_TYPES: [Type; 16] = [
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
    Type::TEXT,
    Type::TEXT,
    Type::INT8,
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

/// Commits a batch in one transaction; what was done with each charge, in order, and the rows
/// written. A charge whose license is gone is set aside ([`Applied::Orphaned`]), as on SQLite.
pub async fn commit(client: &mut Object, batch: &FlushBatch) -> Result<Committed> {
    let now = batch.now;
    let tx = client.transaction().await.map_err(backend)?;
    let mut written = Written::default();
    if let Some(me) = &batch.process {
        // first: while this transaction runs, a look at whether it committed waits for it
        execute(&tx, RECORD_FLUSH, &[&me.key(), &batch.seq, &now]).await?;
    }

    // the licenses, locked in id order: which exist, and no other flush between
    let mut ids: Vec<i64> = batch.charges.iter().map(|c| c.license_id).collect();
    ids.sort_unstable();
    ids.dedup();
    // each present license, with the plan period its row counts (start, time used)
    let present: HashMap<i64, (i64, i64)> = if ids.is_empty() {
        Default::default()
    } else {
        query(&tx, LOCK, &[&ids])
            .await?
            .iter()
            .map(|r| (r.get(0), (r.get(1), r.get(2))))
            .collect()
    };

    // one session across nodes: session time as the stored spans change, and each session's
    // row what its writes changed
    let adjusted;
    let mut session_charge = HashMap::new();
    let charges: &[Charge] = match batch.session_gap_ms {
        Some(gap) if batch.charges.iter().any(|c| !c.sessions.is_empty()) => {
            (adjusted, session_charge) = one_session(&tx, &batch.charges, gap).await?;
            &adjusted
        }
        _ => &batch.charges,
    };

    // one deduction per license (a batch has one charge per license; summed if not)
    let mut deduct: BTreeMap<i64, (i64, i64, i64, i64)> = BTreeMap::new();
    for c in charges.iter().filter(|c| usage::deducts(&c.usage)) {
        let d = deduct.entry(c.license_id).or_default();
        d.0 += c.usage.charge_ms;
        d.1 += c.usage.requests;
        d.2 += c.usage.bytes_in;
        d.3 += c.usage.priced_ms;
    }
    // a plan that includes time: the period's included time first, as committed before this
    // charge (the row is locked: no other flush between)
    let mut taken = included_taken(&tx, charges, &present, &deduct, now).await?;
    // and the prices its included requests and units pay
    let waived = included_waived(&tx, charges, &present, &deduct, &batch.meters).await?;
    let waived_ms = |id: &i64| waived.get(id).map_or(0, |w| w.ms);
    let mut states: HashMap<i64, LicenseState> = HashMap::new();
    if !deduct.is_empty() {
        let (ids, ms, req): (Vec<i64>, Vec<i64>, Vec<i64>) = (
            deduct.keys().copied().collect(),
            deduct.values().map(|d| d.0).collect(),
            deduct.values().map(|d| d.1).collect(),
        );
        let priced: Vec<i64> = deduct.values().map(|d| d.3).collect();
        // (what the balance does not pay: the included time taken, the prices waived)
        let inc: Vec<i64> = ids
            .iter()
            .map(|id| taken.get(id).map_or(0, |t| t.included_ms) + waived_ms(id))
            .collect();
        let off: Vec<i64> = ids.iter().map(waived_ms).collect();
        for r in query(&tx, &DEDUCT, &[&ids, &ms, &req, &now, &priced, &inc, &off]).await? {
            let mut s = state_from_row(&r);
            s.period_used = taken.get(&s.id).map(|t| (t.start, t.used_after));
            states.insert(s.id, s);
        }
        if let Some(me) = &batch.process {
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
            let (served_ms, served_req, served_priced) = (
                served(|c| c.usage.charge_ms),
                served(|c| c.usage.requests),
                served(|c| c.usage.priced_ms),
            );
            execute(
                &tx,
                SPEND_LEASES,
                &[&ids, &served_ms, &served_req, &me.key(), &served_priced],
            )
            .await?;
        }
        let bytes: Vec<i64> = deduct.values().map(|d| d.2).collect();
        let (ids, ms, req, bytes) = only_present(&ids, &ms, &req, &bytes, &states);
        execute(&tx, DAILY, &[&ids, &ms, &req, &bytes, &day_of(now)]).await?;
    }

    // the last history rows of the licenses charged, which their usage may join
    let last_rows: HashMap<i64, usage::LastRow> = if states.is_empty() {
        HashMap::new()
    } else {
        let ids: Vec<i64> = states.keys().copied().collect();
        query(&tx, LAST_ROWS, &[&ids])
            .await?
            .iter()
            .map(|r| {
                let row = usage::LastRow {
                    id: r.get(1),
                    usage: r.get(2),
                    created_at: r.get(3),
                };
                (r.get::<_, i64>(0), row)
            })
            .collect()
    };
    let mut joined: (Vec<i64>, Vec<i64>, Vec<i64>, Vec<i64>) = Default::default();
    let mut joined_rows = std::collections::HashSet::new();

    let mut applied = Vec::with_capacity(charges.len());
    let mut waived_once = std::collections::HashSet::new();
    let mut history = HistoryArrays::default();
    let mut forget: Vec<&str> = Vec::new();
    let mut sessions: Vec<(&SessionRecord, i64)> = Vec::new();
    for c in charges {
        let id = c.license_id;
        // (what the included time took of a license's charges, on its first charge only: a
        // batch has one charge per license, summed if not)
        let (inc, off) = match usage::deducts(&c.usage) {
            true => (
                taken
                    .get_mut(&id)
                    .map_or(0, |t| std::mem::take(&mut t.included_ms)),
                match waived_once.insert(id) {
                    true => waived_ms(&id),
                    false => 0,
                },
            ),
            false => (0, 0),
        };
        let result = if !present.contains_key(&id) {
            Applied::Orphaned
        } else if usage::deducts(&c.usage) {
            match states.get(&id) {
                Some(s) => Applied::Deducted(s.clone(), c.usage.charge_ms - inc - off),
                None => Applied::Orphaned,
            }
        } else {
            Applied::Written
        };
        if let Applied::Deducted(s, _) = &result {
            match last_rows.get(&id) {
                // (a batch has one charge per license: the row is joined once)
                Some(last) if usage::joins(Some(last), c, now) && joined_rows.insert(last.id) => {
                    joined.0.push(last.id);
                    joined.1.push(c.usage.charge_ms - inc - off);
                    joined.2.push(c.usage.requests);
                    joined.3.push(inc);
                }
                _ => {
                    for row in usage::history_rows(&c.usage, s.balance_ms, inc, off) {
                        history.push(id, row);
                    }
                }
            }
        }
        if result != Applied::Orphaned {
            for s in &c.sessions {
                // what its row holds charged: the database's share where it decided, else
                // what this node measured
                let charged = session_charge.get(&s.id).copied().unwrap_or(s.charged_ms);
                match written_span(s) {
                    // charged nothing in the end: written while its requests ran, no session
                    None if charged == 0 => forget.push(&s.id),
                    _ => sessions.push((s, charged)),
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
            &[
                &h.ids,
                &h.deltas,
                &h.before,
                &h.requests,
                &h.reasons,
                &now,
                &h.included,
            ],
        )
        .await?;
        written.usage_history = h.ids.len() as u64;
    }
    if !joined.0.is_empty() {
        execute(
            &tx,
            JOIN_HISTORY,
            &[&joined.0, &joined.1, &joined.2, &joined.3],
        )
        .await?;
        written.usage_history += joined.0.len() as u64;
    }
    let node = batch.process.as_ref().map(|p| p.key());
    priced(
        &tx,
        charges,
        &applied,
        &waived,
        &batch.meters,
        node.as_deref(),
        now,
    )
    .await?;
    if !forget.is_empty() {
        execute(&tx, FORGET, &[&forget]).await?;
    }
    if !sessions.is_empty() {
        written.usage_sessions = write_sessions(&tx, &sessions, batch.process.as_deref()).await?;
    }
    if !batch.logs.is_empty() {
        written.access_logs = copy_logs(&tx, &batch.logs).await?;
        roll_up(&tx, &batch.logs).await?;
        roll_up_endpoints(&tx, &batch.logs).await?;
        roll_up_keys(&tx, &batch.logs).await?;
    }
    // the COMMIT went out: an error now may come after the database committed it
    tx.commit()
        .await
        .map_err(|e| StoreError::InDoubt(backend(e).to_string()))?;
    Ok(Committed { applied, written })
}

/// What the balance paid for the prices of the charges deducted (on their usage rows), and
/// their units (`usage_units`, with what the plan included of them), as on SQLite; the units
/// counted in the meters' period allowances and taken off `node`'s slices of them (several
/// nodes).
async fn priced(
    tx: &Transaction<'_>,
    charges: &[Charge],
    applied: &[Applied],
    waived: &HashMap<i64, Waived>,
    meters: &[crate::config::Meter],
    node: Option<&str>,
    now: i64,
) -> Result<()> {
    let deducted = charges
        .iter()
        .zip(applied)
        .filter(|(_, a)| matches!(a, Applied::Deducted(..)))
        .map(|(c, _)| c);
    let (mut lid, mut price) = (Vec::new(), Vec::new());
    let (mut ulid, mut meter, mut units, mut ms) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut included = Vec::new();
    let none = Waived::default();
    let mut seen = std::collections::HashSet::new();
    for c in deducted {
        // (what the plan paid, on a license's first charge only, as the deduction took it)
        let w = match seen.insert(c.license_id) {
            true => waived.get(&c.license_id).unwrap_or(&none),
            false => &none,
        };
        if c.usage.priced_ms - w.ms != 0 {
            lid.push(c.license_id);
            price.push(c.usage.priced_ms - w.ms);
        }
        for (i, m) in meters
            .iter()
            .enumerate()
            .filter(|&(i, _)| c.usage.units[i] != 0)
        {
            let (n, inc) = (c.usage.units[i], w.units[i]);
            ulid.push(c.license_id);
            meter.push(m.name.as_str());
            units.push(n);
            ms.push((n - inc).saturating_mul(m.price_ms));
            included.push(inc);
        }
    }
    if !lid.is_empty() {
        execute(tx, PRICED_HISTORY, &[&lid, &price]).await?;
    }
    if !ulid.is_empty() {
        execute(tx, UNITS, &[&ulid, &meter, &units, &ms, &now, &included]).await?;
        execute(tx, COUNT_UNITS, &[&ulid, &meter, &units, &node, &now]).await?;
    }
    Ok(())
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
    included: Vec<i64>,
}

impl HistoryArrays {
    fn push(&mut self, id: i64, r: usage::HistoryRow) {
        self.ids.push(id);
        self.deltas.push(r.delta_ms);
        self.before.push(r.balance_before_ms);
        self.requests.push(r.requests);
        self.reasons.push(r.reason);
        self.included.push(r.included_ms);
    }
}

/// What a plan's included time took of a license's charge, the period it counts in, and that
/// period's use once the charge is in.
struct Taken {
    included_ms: i64,
    start: i64,
    used_after: i64,
}

/// What the included time of each license's plan takes of its charge
/// ([`crate::store::included::split`]), against its period's use as committed: the row's
/// count when it counts the charge's period (or a later one, another node being ahead),
/// else counted again from the usage history, the row then moved to the new period (the
/// first flush in it; a lease first in it does the same). The rows are locked.
async fn included_taken(
    tx: &Transaction<'_>,
    charges: &[Charge],
    present: &HashMap<i64, (i64, i64)>,
    deduct: &BTreeMap<i64, (i64, i64, i64, i64)>,
    now: i64,
) -> Result<HashMap<i64, Taken>> {
    let mut taken = HashMap::new();
    for c in charges {
        let (Some(included), Some(start)) = (c.included_ms, c.period_start) else {
            continue;
        };
        let (Some(&(row_start, row_used)), Some(d)) =
            (present.get(&c.license_id), deduct.get(&c.license_id))
        else {
            continue;
        };
        if taken.contains_key(&c.license_id) {
            continue;
        }
        let (start, used) = if row_start < start {
            // the first in a new period: the row moves to it
            let p = super::cluster::new_period(tx, c.license_id, start).await?;
            execute(
                tx,
                NEW_PERIOD,
                &[&c.license_id, &start, &p.used_ms, &p.used_requests],
            )
            .await?;
            (start, p.used_ms)
        } else if row_start <= now {
            // the period the row counts, which DEDUCT adds this charge to
            (row_start, row_used)
        } else {
            // a batch made before the period the row counts began (another node or a lease
            // moved it meanwhile): the charge is its own period's, which DEDUCT does not add
            // it to the row's count for, so it is split against that period's use
            let r = query(
                tx,
                PERIOD_USAGE_BEFORE,
                &[&c.license_id, &start, &row_start],
            )
            .await?;
            (start, r[0].get::<_, i64>(0))
        };
        let time_ms = d.0 - d.3;
        let split = crate::store::included::split(included, used, time_ms);
        taken.insert(
            c.license_id,
            Taken {
                included_ms: split.included_ms,
                start,
                used_after: used + time_ms,
            },
        );
    }
    Ok(taken)
}

/// What the included requests and units of each license's plan pay of its charge's prices
/// ([`crate::store::included::waive`]), against its period's use as committed (the rows are
/// locked: no other flush between). A batch made before the period the row counts began is
/// split against its own period's use, up to that start.
async fn included_waived(
    tx: &Transaction<'_>,
    charges: &[Charge],
    present: &HashMap<i64, (i64, i64)>,
    deduct: &BTreeMap<i64, (i64, i64, i64, i64)>,
    meters: &[crate::config::Meter],
) -> Result<HashMap<i64, Waived>> {
    let mut out = HashMap::new();
    for c in charges {
        let (Some(includes), Some(start)) = (c.includes, c.period_start) else {
            continue;
        };
        let Some(&(row_start, _)) = present.get(&c.license_id) else {
            continue;
        };
        if !deduct.contains_key(&c.license_id) || out.contains_key(&c.license_id) {
            continue;
        }
        let end = if row_start > start {
            row_start
        } else {
            i64::MAX
        };
        let mut used = PeriodUse {
            requests: query(tx, PERIOD_REQUESTS, &[&c.license_id, &start, &end]).await?[0].get(0),
            ..PeriodUse::default()
        };
        for r in query(tx, PERIOD_UNITS, &[&c.license_id, &start, &end]).await? {
            let name: &str = r.get(0);
            if let Some(i) = meters.iter().position(|m| m.name == name) {
                used.units[i] = r.get(1);
            }
        }
        // (a batch has one charge per license)
        let w = crate::store::included::waive(&includes, &used, &c.usage, meters);
        out.insert(c.license_id, w);
    }
    Ok(out)
}

/// Upserts the sessions, the last record of an id winning (as the SQLite commit's row-by-row
/// upserts do).
async fn write_sessions(
    tx: &Transaction<'_>,
    sessions: &[(&SessionRecord, i64)],
    process: Option<&Process>,
) -> Result<u64> {
    let mut last: HashMap<&str, usize> = HashMap::new();
    for (i, (s, _)) in sessions.iter().enumerate() {
        last.insert(&s.id, i);
    }
    let mut keep: Vec<usize> = last.into_values().collect();
    keep.sort_unstable();
    let pick = |f: &dyn Fn(&SessionRecord) -> i64| -> Vec<i64> {
        keep.iter().map(|&i| f(sessions[i].0)).collect()
    };
    let ids: Vec<&str> = keep.iter().map(|&i| &*sessions[i].0.id).collect();
    let ended: Vec<Option<i64>> = keep.iter().map(|&i| sessions[i].0.ended_at).collect();
    let charged: Vec<i64> = keep.iter().map(|&i| sessions[i].1).collect();
    execute(
        tx,
        SESSIONS,
        &[
            &ids,
            &pick(&|s| s.license_id),
            &pick(&|s| s.started_at),
            &pick(&|s| s.last_activity_at),
            &ended,
            &charged,
            &pick(&|s| s.requests),
            &pick(&|s| s.bytes_in),
            &pick(&|s| s.bytes_out),
            &process.map(Process::key),
        ],
    )
    .await?;
    // as on SQLite, every record written counts (a session written twice in a batch twice)
    Ok(sessions.len() as u64)
}

/// The batch's access-log rows, in one binary `COPY`.
async fn copy_logs(tx: &Transaction<'_>, logs: &[AccessLog]) -> Result<u64> {
    let kept = AccessLog::written(logs).count() as u64;
    if kept == 0 {
        return Ok(0);
    }
    let copy = tx.prepare_cached(LOG_COPY).await.map_err(backend)?;
    let sink = tx.copy_in(&copy).await.map_err(backend)?;
    let mut writer = std::pin::pin!(BinaryCopyInWriter::new(sink, &LOG_TYPES));
    let mut ip = crate::forwarded::AddressText::default();
    for l in AccessLog::written(logs) {
        let status = i64::from(l.status);
        let (duration, bytes_in, bytes_out) =
            (l.duration_us as i64, l.bytes_in as i64, l.bytes_out as i64);
        let session = l.session_id.as_ref().and_then(|v| v.to_str().ok());
        let client_ip = l.client_ip.map(|a| ip.of(a));
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
                &l.route.as_deref(),
                &l.units.as_deref(),
                &l.key_id,
            ])
            .await
            .map_err(backend)?;
    }
    writer.finish().await.map_err(backend)?;
    Ok(kept)
}

/// Adds the batch's rows to `endpoint_daily`, one upsert over arrays, in key order.
async fn roll_up_endpoints(tx: &Transaction<'_>, logs: &[AccessLog]) -> Result<()> {
    let mut tallies: Vec<_> = rollup::endpoint_tally(logs).into_iter().collect();
    if tallies.is_empty() {
        return Ok(());
    }
    tallies.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    let n = tallies.len();
    let (mut license, mut guest, mut day) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let (mut path, mut method, mut class) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let (mut calls, mut bytes_in, mut bytes_out) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for ((l, g, d, p, m, c), t) in &tallies {
        license.push(*l);
        guest.push(*g);
        day.push(*d);
        path.push(*p);
        method.push(*m);
        class.push(*c);
        calls.push(t.calls);
        bytes_in.push(t.bytes_in);
        bytes_out.push(t.bytes_out);
    }
    execute(
        tx,
        "INSERT INTO endpoint_daily (license_id, guest, day, path, method, class, calls,
             bytes_in, bytes_out)
         SELECT * FROM unnest($1::bigint[], $2::text[], $3::bigint[], $4::text[], $5::text[],
             $6::smallint[], $7::bigint[], $8::bigint[], $9::bigint[])
         ON CONFLICT (license_id, guest, day, path, method, class) DO UPDATE SET
             calls = endpoint_daily.calls + excluded.calls,
             bytes_in = endpoint_daily.bytes_in + excluded.bytes_in,
             bytes_out = endpoint_daily.bytes_out + excluded.bytes_out",
        &[
            &license, &guest, &day, &path, &method, &class, &calls, &bytes_in, &bytes_out,
        ],
    )
    .await?;
    Ok(())
}

/// Adds the batch's rows of keys to `key_daily`, one upsert over arrays.
async fn roll_up_keys(tx: &Transaction<'_>, logs: &[AccessLog]) -> Result<()> {
    let tallies = rollup::key_tally(logs);
    if tallies.is_empty() {
        return Ok(());
    }
    let mut cols: [Vec<i64>; 7] = Default::default();
    for ((key, day), t) in &tallies {
        let row = [
            *key,
            *day,
            t.license_id,
            t.calls,
            t.ok,
            t.duration_us,
            t.last_at,
        ];
        for (c, v) in cols.iter_mut().zip(row) {
            c.push(v);
        }
    }
    let [key, day, license, calls, ok, duration, last] = &cols;
    execute(
        tx,
        "INSERT INTO key_daily (key_id, day, license_id, calls, ok, duration_us, last_at)
         SELECT * FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::bigint[],
             $5::bigint[], $6::bigint[], $7::bigint[])
         ON CONFLICT (key_id, day) DO UPDATE SET calls = key_daily.calls + excluded.calls,
             ok = key_daily.ok + excluded.ok,
             duration_us = key_daily.duration_us + excluded.duration_us,
             last_at = greatest(key_daily.last_at, excluded.last_at)",
        &[key, day, license, calls, ok, duration, last],
    )
    .await?;
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

/// Rows one retention step deletes (as on SQLite: a step is short, the flush never waits long
/// behind it).
pub const PRUNE_BATCH: i64 = 2_000;

impl PgStore {
    /// Commits one flush in one transaction (see [`commit`]); on an error nothing of it
    /// was written.
    pub async fn commit_flush(&self, batch: &FlushBatch) -> Result<Committed> {
        let mut client = self.client().await?;
        match tokio::time::timeout(self.call_timeout, commit(&mut client, batch)).await {
            Ok(r) => r,
            Err(_) => {
                // the COMMIT may have gone out: only the flush's row can tell
                let _ = Object::take(client);
                Err(StoreError::InDoubt(self.no_answer().to_string()))
            }
        }
    }

    /// Whether a flush whose commit's answer was lost committed: the licenses' rows when it
    /// did.
    pub async fn flush_outcome(
        &self,
        process: &Process,
        seq: i64,
        ids: &[i64],
        now: i64,
    ) -> Result<Option<Vec<LicenseState>>> {
        let committed = self
            .run(async |c| flush_committed(c, process, seq, now).await)
            .await?;
        if !committed {
            return Ok(None);
        }
        Ok(Some(self.states_of(ids).await?))
    }

    /// Adds refusal counts to their minutes.
    pub async fn record_refused(&self, counts: Vec<RefusedCount>) -> Result<()> {
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

    /// One retention step: access-log rows and refusal minutes older than `before`.
    pub async fn prune_access_logs(&self, before: i64) -> Result<usize> {
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
