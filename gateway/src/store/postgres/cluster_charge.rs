//! What only several nodes need of a flush, on PostgreSQL: the charge taken off the node's
//! leases (`SPEND_LEASES`) and its meters' slices (`COUNT_UNITS`), the flush's number recorded
//! so a commit whose answer was lost can be looked up (`RECORD_FLUSH`, `flush_committed`), and
//! session time charged by the union of every node's session spans (`one_session`, the rules
//! in `store::session_time`). flush.rs calls these inside its one transaction.

use std::collections::HashMap;
use std::sync::Arc;

use deadpool_postgres::{Object, Transaction};

use super::backend;
use super::query;
use crate::records::{Charge, SessionRecord};
use crate::store::{session_time, Process, Result};

/// Takes what a flush charged off the node's leases (several nodes): its balance slice and its
/// period slices, and as much out of the licenses' reserved balance and allowances; a charge
/// past a slice (a request that finished past zero) empties it. The licenses are locked
/// already.
pub(super) const SPEND_LEASES: &str = "WITH locked AS (
        SELECT license_id, amount_ms, period_ms, period_requests FROM leases
        WHERE node_id = $4 AND license_id = ANY($1)
        ORDER BY license_id FOR UPDATE),
    taken AS (
        SELECT l.license_id, least(l.amount_ms, greatest(c.ms, 0)) AS ms,
            least(l.period_ms, greatest(c.ms - c.priced, 0)) AS pms,
            least(l.period_requests, greatest(c.req, 0)) AS preq
        FROM locked l
        JOIN unnest($1::bigint[], $2::bigint[], $3::bigint[], $5::bigint[])
            AS c(id, ms, req, priced)
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

/// Counts a flush's units in the meters' period allowances (`period_units`; only in a period
/// begun by their time, `$5`: a row another node moved on to the next period meanwhile
/// counts that one again from `usage_units`, where they are not) and takes them off the
/// node's slices of them (`$4`, its key; none on one node), never below nothing. The licenses
/// are locked already; the slices next, as a lease locks them.
pub(super) const COUNT_UNITS: &str = "WITH u AS (
        SELECT lid, m, sum(n)::bigint AS n
        FROM unnest($1::bigint[], $2::text[], $3::bigint[]) AS u(lid, m, n)
        GROUP BY lid, m),
    counted AS (
        UPDATE period_units p SET used = p.used + u.n
        FROM u WHERE p.license_id = u.lid AND p.meter = u.m AND p.period_start <= $5)
    UPDATE lease_units s SET units = greatest(s.units - greatest(u.n, 0), 0)
    FROM u
    WHERE s.node_id = $4 AND s.license_id = u.lid AND s.meter = u.m";

/// A process's last flush: written first in every flush (see `flush_committed`).
pub(super) const RECORD_FLUSH: &str = "INSERT INTO flushes (node_id, seq, at) VALUES ($1, $2, $3)
    ON CONFLICT (node_id) DO UPDATE SET seq = excluded.seq, at = excluded.at";

/// Whether flush `seq` of a process committed, once its COMMIT got no answer. The upsert
/// conflicts with the flush's own row if its transaction still runs (the database has not
/// noticed the connection is gone), so it waits for that transaction to end, then reads the
/// committed row: the flush committed if and only if the row holds its `seq`. (Seqs only grow,
/// and the flusher starts no flush while one is in doubt.) Waiting is bounded by the
/// connection's statement timeout, and the database ends an abandoned transaction within its
/// idle-in-transaction timeout.
pub(super) async fn flush_committed(
    client: &Object,
    me: &Process,
    seq: i64,
    now: i64,
) -> Result<bool> {
    let row = client
        .query_one(
            "INSERT INTO flushes (node_id, seq, at) VALUES ($1, -1, $2)
             ON CONFLICT (node_id) DO UPDATE SET at = flushes.at
             RETURNING seq",
            &[&me.key(), &now],
        )
        .await
        .map_err(backend)?;
    Ok(row.get::<_, i64>(0) == seq)
}

/// The stored spans within the gap of what a flush touches (the sessions it writes, as they
/// are stored and as it writes them), for each license: `unnest($1..$4)` is the flush's
/// (license, session, from, to), `$5` the gap.
pub(super) const NEAR_SPANS: &str = "WITH c AS (
        SELECT * FROM unnest($1::bigint[], $2::text[], $3::bigint[], $4::bigint[])
            AS c(license_id, id, f, t)),
    touched AS (
        SELECT license_id, f, t FROM c WHERE t > f
        UNION ALL
        SELECT s.license_id, s.started_at, s.last_activity_at
        FROM c JOIN usage_sessions s ON s.id = c.id
        WHERE s.last_activity_at > s.started_at),
    w AS (
        SELECT license_id, min(f) - $5 AS lo, max(t) + $5 AS hi FROM touched
        GROUP BY license_id)
    SELECT s.license_id, s.id, s.started_at, s.last_activity_at, s.charged_ms
    FROM w JOIN usage_sessions s ON s.license_id = w.license_id
        AND s.last_activity_at >= w.lo AND s.started_at <= w.hi
        AND s.last_activity_at > s.started_at
    UNION
    SELECT s.license_id, s.id, s.started_at, s.last_activity_at, s.charged_ms
    FROM c JOIN usage_sessions s ON s.id = c.id";

/// Whether a session record is written (its span) or deleted: one that ended having charged
/// and counted nothing is no session at all.
pub(super) fn written_span(s: &SessionRecord) -> Option<(i64, i64)> {
    let gone = s.ended_at.is_some() && s.charged_ms == 0 && s.requests == 0;
    (!gone).then_some((s.started_at, s.last_activity_at))
}

/// Session metering where several writers share the database: each charge's session time is
/// what its sessions' spans change of the license's charged time (`store::session_time`), not
/// what this node measured, so time another node charged is not charged again and a give-back
/// returns only what drops out. Each session's row then records what its writes changed
/// (`session_time::by_session`: its stored charge plus this write's), so the rows add up to
/// what the license was charged. Returns the charges so adjusted and, by session id, the
/// charge its row holds from now on. The licenses are locked already, and only flushes write
/// spans.
pub(super) async fn one_session(
    tx: &Transaction<'_>,
    charges: &[Charge],
    gap_ms: i64,
) -> Result<(Vec<Charge>, HashMap<Arc<str>, i64>)> {
    let (mut lid, mut sid, mut from, mut to) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for c in charges {
        for s in &c.sessions {
            let (f, t) = written_span(s).unwrap_or((0, 0));
            lid.push(c.license_id);
            sid.push(&*s.id);
            from.push(f);
            to.push(t);
        }
    }
    let rows = query(tx, NEAR_SPANS, &[&lid, &sid, &from, &to, &gap_ms]).await?;
    let mut stored: HashMap<i64, Vec<(String, session_time::Span)>> = HashMap::new();
    let mut stored_charge: HashMap<String, i64> = HashMap::new();
    for r in &rows {
        let id: String = r.get(1);
        stored_charge.insert(id.clone(), r.get(4));
        stored
            .entry(r.get(0))
            .or_default()
            .push((id, (r.get(2), r.get(3))));
    }
    let mut out = charges.to_vec();
    let mut session_charge: HashMap<Arc<str>, i64> = HashMap::new();
    for c in out.iter_mut().filter(|c| !c.sessions.is_empty()) {
        let near: Vec<(&str, session_time::Span)> = stored
            .get(&c.license_id)
            .map(|v| v.iter().map(|(id, s)| (id.as_str(), *s)).collect())
            .unwrap_or_default();
        let written: Vec<(&str, Option<session_time::Span>)> = c
            .sessions
            .iter()
            .map(|s| (&*s.id, written_span(s)))
            .collect();
        let time = session_time::flush_charge(&near, &written, gap_ms);
        for (id, delta) in session_time::by_session(&near, &written, gap_ms) {
            let before = stored_charge.get(id).copied().unwrap_or(0);
            session_charge.insert(Arc::from(id), before + delta);
        }
        let u = &mut c.usage;
        // the session time as the database charges it; anything else charged stays
        let other = u.charge_ms - u.session_ms;
        u.session_ms = time.net_ms();
        u.charge_ms = other + time.net_ms();
        u.returned_ms = time.returned_ms;
    }
    Ok((out, session_charge))
}
