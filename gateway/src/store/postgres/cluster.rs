//! The nodes sharing the database (`ClusterStore`): a heartbeat row per process, and the
//! leases on balances and period allowances (migrations 0004, 0007), each process's rows its
//! own (keyed `<node_id>#<incarnation>`, `Process::key`, migration 0009). Every transaction
//! that changes leases locks the licenses they are on first, in id order, then the lease rows
//! in license order, as the flush does, so none deadlocks with another (a process's renewal of
//! its own leases is a statement of its own, locking its rows in the same order).

use std::collections::BTreeMap;

use async_trait::async_trait;
use tokio_postgres::types::ToSql;

use super::{backend, PgStore};
use crate::config::MeteringMode;
use crate::meters::{Units, MAX_METERS};
use crate::store::StoreError;
use crate::store::{
    books, ClusterNode, ClusterStore, Grant, HeldLease, LeaseAsk, PeriodGrant, Process, Result,
};

/// The database's clock in Unix ms.
pub(crate) const CLOCK_MS: &str = "(extract(epoch FROM clock_timestamp()) * 1000)::bigint";

const BEAT: &str = "WITH beat AS (
        INSERT INTO cluster_nodes (node_id, proxy, admin, version, started_at, heartbeat_at)
        VALUES ($1, $2, $3, $4, $5, $6)
        ON CONFLICT (node_id) DO UPDATE SET
            proxy = EXCLUDED.proxy, admin = EXCLUDED.admin, version = EXCLUDED.version,
            started_at = EXCLUDED.started_at, heartbeat_at = EXCLUDED.heartbeat_at
        RETURNING node_id)
    SELECT count(*) FROM cluster_nodes
    WHERE heartbeat_at >= $7 AND node_id NOT IN (SELECT node_id FROM beat)";

/// The rows of processes gone for a day are forgotten (`tollgate nodes` shows them as gone
/// until then).
const FORGET_AFTER_MS: i64 = 86_400_000;

/// Ends the sessions of processes gone (no heartbeat since `$1`), at their last charged time:
/// nobody will write them again. (A process that never beat, or one from before processes
/// were told apart, has no row: its sessions are gone too.)
pub(crate) const END_GONE_SESSIONS: &str = "UPDATE usage_sessions s
    SET ended_at = s.last_activity_at
    WHERE s.ended_at IS NULL AND NOT EXISTS (
        SELECT 1 FROM cluster_nodes n
        WHERE n.node_id = s.node_id AND n.heartbeat_at >= $1)";

/// A process's own lease rows (`$1`: its key, `Process::key`).
const MINE: &str = "node_id = $1";
/// Lease rows not renewed in time (`$1`: now).
const EXPIRED: &str = "expires_at < $1";

type Param<'a> = &'a (dyn tokio_postgres::types::ToSql + Sync);

/// Gives back the leases `which` selects (`DELETE FROM leases WHERE …`, with `params`), in
/// one transaction. The licenses they are on are locked first, in id order, as the flush and a
/// grant lock them, then the lease rows: one order everywhere, so these never deadlock.
/// Returns the ms of balance given back (the period allowances they held go back too).
async fn give_back(
    tx: &tokio_postgres::Transaction<'_>,
    which: &str,
    params: &[Param<'_>],
) -> Result<i64> {
    let ids: Vec<i64> = tx
        .query(
            &format!("SELECT DISTINCT license_id FROM leases WHERE {which} ORDER BY license_id"),
            params,
        )
        .await
        .map_err(backend)?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if ids.is_empty() {
        return Ok(0);
    }
    tx.execute(
        "SELECT 1 FROM licenses WHERE id = ANY($1) ORDER BY id FOR UPDATE",
        &[&ids],
    )
    .await
    .map_err(backend)?;
    // per license: balance ms, period ms, period requests
    let mut back: BTreeMap<i64, [i64; 3]> = BTreeMap::new();
    let mut with_ids: Vec<Param<'_>> = params.to_vec();
    with_ids.push(&ids);
    // the lease rows next, in license order, as a renewal locks them: deleted in another
    // order they could deadlock with one
    tx.execute(
        &format!(
            "SELECT 1 FROM leases WHERE {which} AND license_id = ANY(${})
             ORDER BY license_id, node_id FOR UPDATE",
            with_ids.len()
        ),
        &with_ids,
    )
    .await
    .map_err(backend)?;
    for r in tx
        .query(
            &format!(
                "DELETE FROM leases WHERE {which} AND license_id = ANY(${})
                 RETURNING license_id, amount_ms, period_ms, period_requests",
                with_ids.len()
            ),
            &with_ids,
        )
        .await
        .map_err(backend)?
    {
        let b = back.entry(r.get(0)).or_default();
        for (i, v) in b.iter_mut().enumerate() {
            *v += r.get::<_, i64>(i + 1);
        }
    }
    let ids: Vec<i64> = back.keys().copied().collect();
    let col = |i: usize| -> Vec<i64> { back.values().map(|b| b[i]).collect() };
    let (ms, pms, preq) = (col(0), col(1), col(2));
    tx.execute(
        "UPDATE licenses l SET reserved_ms = greatest(l.reserved_ms - b.ms, 0),
             period_reserved_ms = greatest(l.period_reserved_ms - b.pms, 0),
             period_reserved_requests = greatest(l.period_reserved_requests - b.preq, 0)
         FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::bigint[])
             AS b(id, ms, pms, preq)
         WHERE l.id = b.id",
        &[&ids, &ms, &pms, &preq],
    )
    .await
    .map_err(backend)?;
    Ok(ms.iter().sum())
}

/// A license's current plan period as the store keeps it (migration 0007).
pub(super) struct PeriodRow {
    pub(super) start: i64,
    pub(super) used_ms: i64,
    pub(super) used_requests: i64,
    pub(super) reserved_ms: i64,
    pub(super) reserved_requests: i64,
}

/// The period rows a lease transaction writes back, as arrays.
#[derive(Default)]
struct PeriodRows {
    ids: Vec<i64>,
    start: Vec<i64>,
    used_ms: Vec<i64>,
    used_requests: Vec<i64>,
    reserved_ms: Vec<i64>,
    reserved_requests: Vec<i64>,
}

impl PeriodRows {
    fn push(&mut self, id: i64, p: &PeriodRow) {
        self.ids.push(id);
        self.start.push(p.start);
        self.used_ms.push(p.used_ms);
        self.used_requests.push(p.used_requests);
        self.reserved_ms.push(p.reserved_ms);
        self.reserved_requests.push(p.reserved_requests);
    }
}

/// A license's plan period that began at `start`, as a lease for it first finds it: what the
/// usage history holds since then (the flushes count it on from here), nothing reserved; the
/// slices of the period before are void. The license is locked already.
pub(super) async fn new_period(
    tx: &tokio_postgres::Transaction<'_>,
    id: i64,
    start: i64,
) -> Result<PeriodRow> {
    let used = tx
        .query_one(super::licenses::PERIOD_USAGE, &[&id, &start])
        .await
        .map_err(backend)?;
    tx.execute(
        "UPDATE leases SET period_ms = 0, period_requests = 0 WHERE license_id = $1",
        &[&id],
    )
    .await
    .map_err(backend)?;
    tx.execute(
        "UPDATE lease_units SET units = 0 WHERE license_id = $1",
        &[&id],
    )
    .await
    .map_err(backend)?;
    Ok(PeriodRow {
        start,
        used_ms: used.get(0),
        used_requests: used.get(1),
        reserved_ms: 0,
        reserved_requests: 0,
    })
}

/// One meter's allowance asked of a license's period (several nodes).
struct UnitsWant {
    license_id: i64,
    /// The meter's index, as the asking node counts meters.
    meter: usize,
    start: i64,
    max: i64,
    asked: i64,
}

/// Grants slices of meters' period allowances (migration 0014), the licenses locked already:
/// for each want, what is granted (never past the allowance less what was used and what every
/// lease holds of it) and what the committed flushes used of it. A meter whose row counts an
/// older period (or none) is counted again from `usage_units` since `start`, and the slices of
/// it are void; one whose row counts a newer period than asked is granted nothing. The grants
/// are written to `lease_units` by [`hold_units`], once the lease rows exist.
async fn grant_units(
    tx: &tokio_postgres::Transaction<'_>,
    meters: &[String],
    wants: &[UnitsWant],
) -> Result<Vec<(i64, i64)>> {
    let ids: Vec<i64> = wants.iter().map(|w| w.license_id).collect();
    let names: Vec<&str> = wants.iter().map(|w| meters[w.meter].as_str()).collect();
    let starts: Vec<i64> = wants.iter().map(|w| w.start).collect();
    // each as the store has it: its period, its use, and what the leases hold of it
    let rows = tx
        .query(
            "SELECT p.period_start, p.used,
                 coalesce((SELECT sum(s.units) FROM lease_units s
                           WHERE s.license_id = w.id AND s.meter = w.m), 0)::bigint
             FROM unnest($1::bigint[], $2::text[]) WITH ORDINALITY AS w(id, m, n)
             LEFT JOIN period_units p ON p.license_id = w.id AND p.meter = w.m
             ORDER BY w.n",
            &[&ids, &names],
        )
        .await
        .map_err(backend)?;
    let mut now: Vec<(Option<i64>, i64, i64)> = rows
        .iter()
        .map(|r| (r.get(0), r.get::<_, Option<i64>>(1).unwrap_or(0), r.get(2)))
        .collect();
    let stale: Vec<usize> = (0..wants.len())
        .filter(|&i| now[i].0.is_none_or(|start| start < wants[i].start))
        .collect();
    if !stale.is_empty() {
        let pick = |f: &dyn Fn(usize) -> i64| -> Vec<i64> { stale.iter().map(|&i| f(i)).collect() };
        let (sid, sstart) = (pick(&|i| ids[i]), pick(&|i| starts[i]));
        let snames: Vec<&str> = stale.iter().map(|&i| names[i]).collect();
        let used = tx
            .query(
                "SELECT coalesce((SELECT sum(u.units) FROM usage_units u
                     WHERE u.license_id = w.id AND u.meter = w.m AND u.created_at >= w.f), 0)::bigint
                 FROM unnest($1::bigint[], $2::text[], $3::bigint[]) WITH ORDINALITY
                     AS w(id, m, f, n)
                 ORDER BY w.n",
                &[&sid, &snames, &sstart],
            )
            .await
            .map_err(backend)?;
        tx.execute(
            "UPDATE lease_units s SET units = 0
             FROM unnest($1::bigint[], $2::text[]) AS w(id, m)
             WHERE s.license_id = w.id AND s.meter = w.m",
            &[&sid, &snames],
        )
        .await
        .map_err(backend)?;
        let used: Vec<i64> = used.iter().map(|r| r.get(0)).collect();
        for (k, &i) in stale.iter().enumerate() {
            now[i] = (Some(wants[i].start), used[k], 0);
        }
        tx.execute(
            "INSERT INTO period_units (license_id, meter, period_start, used)
             SELECT * FROM unnest($1::bigint[], $2::text[], $3::bigint[], $4::bigint[])
             ON CONFLICT (license_id, meter) DO UPDATE SET
                 period_start = excluded.period_start, used = excluded.used",
            &[&sid, &snames, &sstart, &used],
        )
        .await
        .map_err(backend)?;
    }
    Ok(wants
        .iter()
        .zip(&now)
        .map(|(w, &(start, used, reserved))| {
            let granted = if start == Some(w.start) {
                w.asked.min(w.max - used - reserved).max(0)
            } else {
                0
            };
            (granted, used)
        })
        .collect())
}

/// Writes what [`grant_units`] granted to `node`'s slices (its lease rows exist by now).
async fn hold_units(
    tx: &tokio_postgres::Transaction<'_>,
    meters: &[String],
    node: &str,
    wants: &[UnitsWant],
    granted: &[(i64, i64)],
) -> Result<()> {
    let given: Vec<(i64, &str, i64)> = wants
        .iter()
        .zip(granted)
        .filter(|(_, g)| g.0 > 0)
        .map(|(w, g)| (w.license_id, meters[w.meter].as_str(), g.0))
        .collect();
    if given.is_empty() {
        return Ok(());
    }
    let ids: Vec<i64> = given.iter().map(|g| g.0).collect();
    let names: Vec<&str> = given.iter().map(|g| g.1).collect();
    let units: Vec<i64> = given.iter().map(|g| g.2).collect();
    tx.execute(
        "INSERT INTO lease_units (license_id, node_id, meter, units)
         SELECT id, $4, m, n FROM unnest($1::bigint[], $2::text[], $3::bigint[]) AS g(id, m, n)
         ON CONFLICT (license_id, node_id, meter) DO UPDATE SET
             units = lease_units.units + excluded.units",
        &[&ids, &names, &units, &node],
    )
    .await
    .map_err(backend)?;
    Ok(())
}

/// A lease row's slices of meters (`lease_units`, by name; none: nothing), by index as
/// `meters` names them. A meter no longer configured is not counted.
fn units_of(meters: &[String], names: Option<Vec<String>>, units: Option<Vec<i64>>) -> Units {
    let mut out = [0; MAX_METERS];
    for (name, n) in names
        .unwrap_or_default()
        .iter()
        .zip(units.unwrap_or_default())
    {
        if let Some(i) = meters.iter().position(|m| m == name) {
            out[i] += n;
        }
    }
    out
}

/// The lateral join that gives each lease row `s` its meters' slices as two arrays (`um`,
/// `un`), for [`units_of`].
const LEASE_UNITS: &str = "LEFT JOIN LATERAL (
        SELECT array_agg(u.meter) AS um, array_agg(u.units) AS un FROM lease_units u
        WHERE u.license_id = s.license_id AND u.node_id = s.node_id) x ON true";

#[async_trait]
impl ClusterStore for PgStore {
    async fn clock_ms(&self) -> Result<i64> {
        self.run(async |c| {
            let st = c
                .prepare_cached(&format!("SELECT {CLOCK_MS}"))
                .await
                .map_err(backend)?;
            Ok(c.query_one(&st, &[]).await.map_err(backend)?.get(0))
        })
        .await
    }

    async fn metering(&self, proposed: (MeteringMode, i64)) -> Result<(MeteringMode, i64)> {
        self.run(async |c| {
            // Nodes started together: a row another one inserts while this statement runs is
            // waited for by the ON CONFLICT but not in this statement's snapshot, so the
            // statement can find no row at all; the next one sees it.
            let mut found = None;
            for _ in 0..3 {
                found = c
                    .query_opt(
                        &format!(
                            "WITH new AS (
                             INSERT INTO metering_settings (id, mode, idle_timeout_ms, set_at)
                             VALUES (1, $1, $2, {CLOCK_MS})
                             ON CONFLICT (id) DO NOTHING
                             RETURNING mode, idle_timeout_ms)
                         SELECT mode, idle_timeout_ms FROM new
                         UNION ALL SELECT mode, idle_timeout_ms FROM metering_settings
                         LIMIT 1"
                        ),
                        &[&proposed.0.as_str(), &proposed.1],
                    )
                    .await
                    .map_err(backend)?;
                if found.is_some() {
                    break;
                }
            }
            let r = found.ok_or_else(|| {
                StoreError::Backend("metering_settings: no row after three reads".into())
            })?;
            let mode: String = r.get(0);
            let mode = MeteringMode::parse(&mode)
                .ok_or_else(|| StoreError::Invalid(format!("metering_settings.mode {mode:?}")))?;
            Ok((mode, r.get(1)))
        })
        .await
    }

    async fn set_metering(&self, to: (MeteringMode, i64), live_since: i64, now: i64) -> Result<()> {
        self.run(async |c| {
            let tx = c.transaction().await.map_err(backend)?;
            // no process starts meanwhile: its first metering read waits for this
            tx.execute("LOCK TABLE metering_settings IN EXCLUSIVE MODE", &[])
                .await
                .map_err(backend)?;
            let live: i64 = tx
                .query_one(
                    "SELECT count(*) FROM cluster_nodes WHERE heartbeat_at >= $1",
                    &[&live_since],
                )
                .await
                .map_err(backend)?
                .get(0);
            if live > 0 {
                return Err(StoreError::Invalid(format!(
                    "{live} process(es) on this database are alive: stop every node before \
                     changing how it meters"
                )));
            }
            tx.execute(
                "INSERT INTO metering_settings (id, mode, idle_timeout_ms, set_at)
                 VALUES (1, $1, $2, $3)
                 ON CONFLICT (id) DO UPDATE SET mode = excluded.mode,
                     idle_timeout_ms = excluded.idle_timeout_ms, set_at = excluded.set_at",
                &[&to.0.as_str(), &to.1, &now],
            )
            .await
            .map_err(backend)?;
            tx.commit().await.map_err(backend)
        })
        .await
    }

    async fn heartbeat(&self, node: &ClusterNode, live_since: i64) -> Result<usize> {
        self.run(async |c| {
            let me = &node.process;
            // the statement's snapshot does not see its own upsert: the count is of the other
            // live processes, plus this one
            let others: i64 = c
                .query_one(
                    BEAT,
                    &[
                        &me.key(),
                        &node.proxy,
                        &node.admin,
                        &node.version,
                        &node.started_at,
                        &node.heartbeat_at,
                        &live_since,
                    ],
                )
                .await
                .map_err(backend)?
                .get(0);

            // leases nobody renewed: their processes died, and the balance they held is free again
            let tx = c.transaction().await.map_err(backend)?;
            let back = give_back(&tx, EXPIRED, &[&node.heartbeat_at]).await?;
            tx.commit().await.map_err(backend)?;
            if back > 0 {
                tracing::info!(
                    ms = back,
                    "leases of stopped nodes expired and were given back"
                );
            }
            c.execute(END_GONE_SESSIONS, &[&live_since])
                .await
                .map_err(backend)?;
            c.execute(
                "DELETE FROM cluster_nodes WHERE heartbeat_at < $1",
                &[&(node.heartbeat_at - FORGET_AFTER_MS)],
            )
            .await
            .map_err(backend)?;
            Ok(others as usize + 1)
        })
        .await
    }

    async fn renew(
        &self,
        process: &Process,
        meters: &[String],
        until: Option<i64>,
    ) -> Result<Vec<HeldLease>> {
        // what each row holds, with its license's period and its meters' slices
        let held = format!(
            "SELECT s.license_id, s.amount_ms, c.period_start, s.period_ms,
                 s.period_requests, x.um, x.un
             FROM held s JOIN licenses c ON c.id = s.license_id {LEASE_UNITS}"
        );
        self.run(async |c| {
            let rows = match until {
                // on their own (no license locked meanwhile), the rows locked in license order
                // as the flush and a grant lock them
                Some(until) => {
                    let st = c
                        .prepare_cached(&format!(
                            "WITH held AS (
                             UPDATE leases l SET expires_at = $2 FROM (
                                 SELECT license_id FROM leases WHERE node_id = $1
                                 ORDER BY license_id FOR UPDATE) o
                             WHERE l.node_id = $1 AND l.license_id = o.license_id
                             RETURNING l.license_id, l.node_id, l.amount_ms, l.period_ms,
                                 l.period_requests)
                             {held}"
                        ))
                        .await
                        .map_err(backend)?;
                    c.query(&st, &[&process.key(), &until]).await
                }
                None => {
                    let st = c
                        .prepare_cached(&format!(
                            "WITH held AS (
                             SELECT license_id, node_id, amount_ms, period_ms, period_requests
                             FROM leases WHERE node_id = $1)
                             {held}"
                        ))
                        .await
                        .map_err(backend)?;
                    c.query(&st, &[&process.key()]).await
                }
            }
            .map_err(backend)?;
            Ok(rows
                .iter()
                .map(|r| HeldLease {
                    license_id: r.get(0),
                    ms: r.get(1),
                    period_start: r.get(2),
                    period_ms: r.get(3),
                    period_requests: r.get(4),
                    units: units_of(meters, r.get(5), r.get(6)),
                })
                .collect())
        })
        .await
    }

    async fn leave(&self, process: &Process) -> Result<()> {
        self.run(async |c| {
            c.execute(
                "DELETE FROM cluster_nodes WHERE node_id = $1",
                &[&process.key()],
            )
            .await
            .map_err(backend)?;
            Ok(())
        })
        .await
    }

    async fn nodes(&self) -> Result<Vec<(ClusterNode, i64)>> {
        self.run(async |c| {
            let rows = c
                .query(
                    "SELECT n.node_id, n.proxy, n.admin, n.version, n.started_at, n.heartbeat_at,
                        coalesce((SELECT sum(amount_ms) FROM leases l
                                  WHERE l.node_id = n.node_id), 0)::bigint
                 FROM cluster_nodes n ORDER BY n.node_id, n.started_at",
                    &[],
                )
                .await
                .map_err(backend)?;
            Ok(rows
                .iter()
                .map(|r| {
                    (
                        ClusterNode {
                            process: Process::from_key(r.get(0)),
                            proxy: r.get(1),
                            admin: r.get(2),
                            version: r.get(3),
                            started_at: r.get(4),
                            heartbeat_at: r.get(5),
                        },
                        r.get(6),
                    )
                })
                .collect())
        })
        .await
    }

    async fn lease(
        &self,
        process: &Process,
        meters: &[String],
        asked: &[LeaseAsk],
        until: i64,
    ) -> Result<Vec<Grant>> {
        let mut want: BTreeMap<i64, LeaseAsk> = BTreeMap::new();
        for a in asked {
            let w = want.entry(a.license_id).or_insert(LeaseAsk {
                license_id: a.license_id,
                ..LeaseAsk::default()
            });
            w.ms += a.ms.max(0);
            w.period = a.period.or(w.period);
            w.included = a.included.or(w.included);
        }
        want.retain(|_, w| {
            w.ms > 0
                || w.period
                    .is_some_and(|p| p.ms > 0 || p.requests > 0 || p.units.iter().any(|&n| n > 0))
        });
        if want.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<i64> = want.keys().copied().collect();
        self.run(async |c| {
            let tx = c.transaction().await.map_err(backend)?;
            // the rows locked in id order, read as they are now (READ COMMITTED reads the latest
            // committed version of a row it waited for): what is left unreserved
            let lock = tx
                .prepare_cached(
                    "SELECT id, balance_ms - reserved_ms, status = 'active', period_start,
                        period_used_ms, period_requests, period_reserved_ms,
                        period_reserved_requests
                 FROM licenses WHERE id = ANY($1) ORDER BY id FOR UPDATE",
                )
                .await
                .map_err(backend)?;
            let rows = tx.query(&lock, &[&ids]).await.map_err(backend)?;
            let mut grants = Vec::with_capacity(rows.len());
            let mut periods = PeriodRows::default();
            let mut units = Vec::new();
            for r in &rows {
                let id: i64 = r.get(0);
                let (left, active): (i64, bool) = (r.get(1), r.get(2));
                let ask = want[&id];
                // the plan period the node is in: the first node in a new one counts it
                // again from the usage history
                let mut now = PeriodRow {
                    start: r.get(3),
                    used_ms: r.get(4),
                    used_requests: r.get(5),
                    reserved_ms: r.get(6),
                    reserved_requests: r.get(7),
                };
                let in_period = ask
                    .period
                    .map(|p| p.start)
                    .or(ask.included.map(|i| i.start));
                let mut rolled = false;
                if let Some(start) = in_period.filter(|&s| active && now.start < s) {
                    now = new_period(&tx, id, start).await?;
                    rolled = true;
                }
                // a plan that includes time: what the period still includes is granted from
                // beside the balance (a flush takes a charge from it first)
                // (nothing for a node still in the period before the row's: what the row's
                // period includes is not its to spend)
                let included = ask
                    .included
                    .filter(|i| active && i.start == now.start)
                    .map_or(0, |i| crate::store::included::left(i.ms, now.used_ms));
                let granted_ms = if active {
                    ask.ms.min(left.saturating_add(included)).max(0)
                } else {
                    0
                };
                let mut period = None;
                if let Some(p) = ask.period.filter(|_| active) {
                    if now.start == p.start {
                        let free = |max: Option<i64>, used: i64, reserved: i64, asked: i64| {
                            max.map_or(0, |max| asked.min(max - used - reserved).max(0))
                        };
                        let g = PeriodGrant {
                            start: p.start,
                            ms: free(p.max_ms, now.used_ms, now.reserved_ms, p.ms),
                            requests: free(
                                p.max_requests,
                                now.used_requests,
                                now.reserved_requests,
                                p.requests,
                            ),
                            used_ms: now.used_ms,
                            used_requests: now.used_requests,
                            ..PeriodGrant::default()
                        };
                        for i in 0..meters.len().min(MAX_METERS) {
                            if p.max_units[i] > 0 && p.units[i] > 0 {
                                units.push(UnitsWant {
                                    license_id: id,
                                    meter: i,
                                    start: p.start,
                                    max: p.max_units[i],
                                    asked: p.units[i],
                                });
                            }
                        }
                        now.reserved_ms += g.ms;
                        now.reserved_requests += g.requests;
                        periods.push(id, &now);
                        period = Some(g);
                    }
                }
                if rolled && period.is_none() {
                    // the new period, counted, for the flushes to count on from
                    periods.push(id, &now);
                }
                grants.push(Grant {
                    license_id: id,
                    granted_ms,
                    held_ms: 0,
                    period,
                });
            }
            let units_granted = if units.is_empty() {
                Vec::new()
            } else {
                grant_units(&tx, meters, &units).await?
            };
            for (w, &(n, used)) in units.iter().zip(&units_granted) {
                if let Some(p) = grants
                    .iter_mut()
                    .find(|g| g.license_id == w.license_id)
                    .and_then(|g| g.period.as_mut())
                {
                    p.units[w.meter] = n;
                    p.used_units[w.meter] = used;
                }
            }
            let gids: Vec<i64> = grants.iter().map(|g| g.license_id).collect();
            let gms: Vec<i64> = grants.iter().map(|g| g.granted_ms).collect();
            let pick = |f: fn(&PeriodGrant) -> i64| -> Vec<i64> {
                grants
                    .iter()
                    .map(|g| g.period.as_ref().map_or(0, f))
                    .collect()
            };
            let (pms, preq) = (pick(|p| p.ms), pick(|p| p.requests));
            let reserve = tx
                .prepare_cached(
                    "UPDATE licenses l SET reserved_ms = l.reserved_ms + g.ms
                     FROM unnest($1::bigint[], $2::bigint[]) AS g(id, ms)
                     WHERE l.id = g.id AND g.ms > 0",
                )
                .await
                .map_err(backend)?;
            let periods_set = tx
                .prepare_cached(
                    "UPDATE licenses l SET period_start = p.start, period_used_ms = p.used_ms,
                     period_requests = p.used_req, period_reserved_ms = p.res_ms,
                     period_reserved_requests = p.res_req
                 FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::bigint[],
                     $5::bigint[], $6::bigint[]) AS p(id, start, used_ms, used_req, res_ms, res_req)
                 WHERE l.id = p.id",
                )
                .await
                .map_err(backend)?;
            let hold = tx
                .prepare_cached(
                    "INSERT INTO leases (license_id, node_id, amount_ms, period_ms, period_requests,
                     expires_at)
                 SELECT id, $5, ms, pms, preq, $6
                 FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::bigint[])
                     AS g(id, ms, pms, preq)
                 ON CONFLICT (license_id, node_id) DO UPDATE SET
                     amount_ms = leases.amount_ms + excluded.amount_ms,
                     period_ms = leases.period_ms + excluded.period_ms,
                     period_requests = leases.period_requests + excluded.period_requests,
                     expires_at = excluded.expires_at
                 RETURNING license_id, amount_ms",
                )
                .await
                .map_err(backend)?;
            let node = process.key();
            let reserved: [&(dyn ToSql + Sync); 2] = [&gids, &gms];
            let leased: [&(dyn ToSql + Sync); 6] = [&gids, &gms, &pms, &preq, &node, &until];
            let period_rows: [&(dyn ToSql + Sync); 6] = [
                &periods.ids,
                &periods.start,
                &periods.used_ms,
                &periods.used_requests,
                &periods.reserved_ms,
                &periods.reserved_requests,
            ];
            // the reservations, the periods and the lease rows in one round trip: sent
            // together, in this order, on the transaction's connection (all prepared above, so
            // nothing else goes between them)
            let (_, _, held) = tokio::try_join!(
                tx.execute(&reserve, &reserved),
                async {
                    if periods.ids.is_empty() {
                        Ok(0)
                    } else {
                        tx.execute(&periods_set, &period_rows).await
                    }
                },
                tx.query(&hold, &leased),
            )
            .map_err(backend)?;
            let held: BTreeMap<i64, i64> = held.iter().map(|r| (r.get(0), r.get(1))).collect();
            hold_units(&tx, meters, &process.key(), &units, &units_granted).await?;
            tx.commit().await.map_err(backend)?;
            for g in &mut grants {
                g.held_ms = held.get(&g.license_id).copied().unwrap_or(0);
            }
            Ok(grants)
        })
        .await
    }

    async fn period_units(&self, asked: &[(i64, i64, i64)]) -> Result<Vec<(i64, String, i64)>> {
        let ids: Vec<i64> = asked.iter().map(|a| a.0).collect();
        let from: Vec<i64> = asked.iter().map(|a| a.1).collect();
        let to: Vec<i64> = asked.iter().map(|a| a.2).collect();
        self.run(async |c| {
            let st = c
                .prepare_cached(
                    "SELECT u.license_id, u.meter, sum(u.units)::bigint
                     FROM unnest($1::bigint[], $2::bigint[], $3::bigint[]) AS a(id, f, t)
                     JOIN usage_units u ON u.license_id = a.id
                         AND u.created_at >= a.f AND u.created_at < a.t
                     GROUP BY u.license_id, u.meter",
                )
                .await
                .map_err(backend)?;
            Ok(c.query(&st, &[&ids, &from, &to])
                .await
                .map_err(backend)?
                .iter()
                .map(|r| (r.get(0), r.get(1), r.get(2)))
                .collect())
        })
        .await
    }

    async fn period_requests(&self, asked: &[(i64, i64)]) -> Result<Vec<(i64, i64)>> {
        let ids: Vec<i64> = asked.iter().map(|a| a.0).collect();
        let from: Vec<i64> = asked.iter().map(|a| a.1).collect();
        self.run(async |c| {
            let st = c
                .prepare_cached(
                    "SELECT a.id, coalesce(sum(h.requests), 0)::bigint
                     FROM unnest($1::bigint[], $2::bigint[]) AS a(id, f)
                     LEFT JOIN usage_history h ON h.license_id = a.id AND h.kind = 'usage'
                         AND h.created_at >= a.f
                     GROUP BY a.id",
                )
                .await
                .map_err(backend)?;
            Ok(c.query(&st, &[&ids, &from])
                .await
                .map_err(backend)?
                .iter()
                .map(|r| (r.get(0), r.get(1)))
                .collect())
        })
        .await
    }

    async fn held(&self, process: &Process, ids: &[i64]) -> Result<Vec<(i64, i64)>> {
        self.run(async |c| {
            Ok(c.query(
                "SELECT license_id, amount_ms FROM leases
             WHERE node_id = $1 AND license_id = ANY($2)",
                &[&process.key(), &ids],
            )
            .await
            .map_err(backend)?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect())
        })
        .await
    }

    async fn release(&self, process: &Process) -> Result<i64> {
        self.run(async |c| {
            let tx = c.transaction().await.map_err(backend)?;
            let back = give_back(&tx, MINE, &[&process.key()]).await?;
            tx.commit().await.map_err(backend)?;
            Ok(back)
        })
        .await
    }

    async fn true_up(
        &self,
        process: &Process,
        meters: &[String],
        held: &[HeldLease],
    ) -> Result<i64> {
        let key = process.key();
        self.run(async |c| {
            let tx = c.transaction().await.map_err(backend)?;
            // the licenses first, in id order, as everything that changes leases locks them
            tx.execute(
                "SELECT 1 FROM licenses WHERE id IN (
                     SELECT license_id FROM leases WHERE node_id = $1)
                 ORDER BY id FOR UPDATE",
                &[&key],
            )
            .await
            .map_err(backend)?;
            let rows: Vec<HeldLease> = tx
                .query(
                    &format!(
                        "SELECT s.license_id, s.amount_ms, l.period_start, s.period_ms,
                             s.period_requests, x.um, x.un
                         FROM leases s JOIN licenses l ON l.id = s.license_id {LEASE_UNITS}
                         WHERE s.node_id = $1 ORDER BY s.license_id FOR UPDATE OF s"
                    ),
                    &[&key],
                )
                .await
                .map_err(backend)?
                .iter()
                .map(|r| HeldLease {
                    license_id: r.get(0),
                    ms: r.get(1),
                    period_start: r.get(2),
                    period_ms: r.get(3),
                    period_requests: r.get(4),
                    units: units_of(meters, r.get(5), r.get(6)),
                })
                .collect();
            let excess = books::lease_excess(&rows, held);
            if excess.is_empty() {
                return Ok(0);
            }
            let col = |f: fn(&HeldLease) -> i64| -> Vec<i64> { excess.iter().map(f).collect() };
            let (ids, ms, pms, preq) = (
                col(|e| e.license_id),
                col(|e| e.ms),
                col(|e| e.period_ms),
                col(|e| e.period_requests),
            );
            tx.execute(
                "UPDATE leases s SET amount_ms = s.amount_ms - e.ms,
                     period_ms = s.period_ms - e.pms, period_requests = s.period_requests - e.preq
                 FROM unnest($2::bigint[], $3::bigint[], $4::bigint[], $5::bigint[])
                     AS e(id, ms, pms, preq)
                 WHERE s.node_id = $1 AND s.license_id = e.id",
                &[&key, &ids, &ms, &pms, &preq],
            )
            .await
            .map_err(backend)?;
            tx.execute(
                "UPDATE licenses l SET reserved_ms = greatest(l.reserved_ms - e.ms, 0),
                     period_reserved_ms = greatest(l.period_reserved_ms - e.pms, 0),
                     period_reserved_requests = greatest(l.period_reserved_requests - e.preq, 0)
                 FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::bigint[])
                     AS e(id, ms, pms, preq)
                 WHERE l.id = e.id",
                &[&ids, &ms, &pms, &preq],
            )
            .await
            .map_err(backend)?;
            // the meters' slices (each lease row's locked above; theirs next, as a flush
            // locks them)
            let mut over = (Vec::new(), Vec::new(), Vec::new());
            for e in &excess {
                for (i, &n) in e.units.iter().enumerate().filter(|(_, &n)| n > 0) {
                    over.0.push(e.license_id);
                    over.1.push(meters[i].as_str());
                    over.2.push(n);
                }
            }
            if !over.0.is_empty() {
                tx.execute(
                    "UPDATE lease_units s SET units = greatest(s.units - e.n, 0)
                     FROM unnest($2::bigint[], $3::text[], $4::bigint[]) AS e(id, m, n)
                     WHERE s.node_id = $1 AND s.license_id = e.id AND s.meter = e.m",
                    &[&key, &over.0, &over.1, &over.2],
                )
                .await
                .map_err(backend)?;
            }
            tx.commit().await.map_err(backend)?;
            Ok(ms.iter().sum())
        })
        .await
    }
}
