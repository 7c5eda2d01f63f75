//! The nodes sharing the database (`ClusterStore`): a heartbeat row per node, and the leases
//! on balances (migration 0004). Every transaction that changes leases locks the licenses they
//! are on first, in id order, then the lease rows, as the flush does, so none deadlocks with
//! another (a node's renewal of its own leases is a statement of its own, holding nothing
//! else).

use std::collections::BTreeMap;

use async_trait::async_trait;

use super::{backend, PgStore};
use crate::store::{ClusterNode, ClusterStore, Grant, Result};

const BEAT: &str = "WITH beat AS (
        INSERT INTO cluster_nodes (node_id, proxy, admin, version, started_at, heartbeat_at)
        VALUES ($1, $2, $3, $4, $5, $6)
        ON CONFLICT (node_id) DO UPDATE SET
            proxy = EXCLUDED.proxy, admin = EXCLUDED.admin, version = EXCLUDED.version,
            started_at = EXCLUDED.started_at, heartbeat_at = EXCLUDED.heartbeat_at
        RETURNING node_id)
    SELECT count(*) FROM cluster_nodes
    WHERE heartbeat_at >= $7 AND node_id NOT IN (SELECT node_id FROM beat)";

/// Gives back the leases `which` selects (`DELETE FROM leases WHERE …`, its parameter `$1`), in
/// one transaction. The licenses they are on are locked first, in id order, as the flush and a
/// grant lock them, then the lease rows: one order everywhere, so these never deadlock.
/// Returns the ms given back.
async fn give_back(
    tx: &tokio_postgres::Transaction<'_>,
    which: &str,
    param: &(dyn tokio_postgres::types::ToSql + Sync),
) -> Result<i64> {
    let ids: Vec<i64> = tx
        .query(
            &format!("SELECT DISTINCT license_id FROM leases WHERE {which} ORDER BY license_id"),
            &[param],
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
    let mut back: BTreeMap<i64, i64> = BTreeMap::new();
    for r in tx
        .query(
            &format!(
                "DELETE FROM leases WHERE {which} AND license_id = ANY($2)
                 RETURNING license_id, amount_ms"
            ),
            &[param, &ids],
        )
        .await
        .map_err(backend)?
    {
        *back.entry(r.get(0)).or_default() += r.get::<_, i64>(1);
    }
    let (ids, ms): (Vec<i64>, Vec<i64>) = back.iter().map(|(id, ms)| (*id, *ms)).unzip();
    tx.execute(
        "UPDATE licenses l SET reserved_ms = greatest(l.reserved_ms - b.ms, 0)
         FROM unnest($1::bigint[], $2::bigint[]) AS b(id, ms) WHERE l.id = b.id",
        &[&ids, &ms],
    )
    .await
    .map_err(backend)?;
    Ok(ms.iter().sum())
}

#[async_trait]
impl ClusterStore for PgStore {
    async fn heartbeat(
        &self,
        node: &ClusterNode,
        live_since: i64,
        leases_until: i64,
    ) -> Result<usize> {
        let mut c = self.client().await?;
        // the statement's snapshot does not see its own upsert: the count is of the other
        // live nodes, plus this one
        let others: i64 = c
            .query_one(
                BEAT,
                &[
                    &node.node_id,
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
        // this node's leases renewed on their own (no license locked meanwhile), their rows
        // locked in license order as the flush and a grant lock them
        c.execute(
            "UPDATE leases l SET expires_at = $2 FROM (
                 SELECT license_id FROM leases WHERE node_id = $1
                 ORDER BY license_id FOR UPDATE) o
             WHERE l.node_id = $1 AND l.license_id = o.license_id",
            &[&node.node_id, &leases_until],
        )
        .await
        .map_err(backend)?;
        // leases nobody renewed: their nodes died, and the balance they held is free again
        let tx = c.transaction().await.map_err(backend)?;
        let back = give_back(&tx, "expires_at < $1", &node.heartbeat_at).await?;
        tx.commit().await.map_err(backend)?;
        if back > 0 {
            tracing::info!(
                ms = back,
                "leases of stopped nodes expired and were given back"
            );
        }
        Ok(others as usize + 1)
    }

    async fn leave(&self, node_id: &str) -> Result<()> {
        let c = self.client().await?;
        c.execute("DELETE FROM cluster_nodes WHERE node_id = $1", &[&node_id])
            .await
            .map_err(backend)?;
        Ok(())
    }

    async fn nodes(&self) -> Result<Vec<(ClusterNode, i64)>> {
        let c = self.client().await?;
        let rows = c
            .query(
                "SELECT n.node_id, n.proxy, n.admin, n.version, n.started_at, n.heartbeat_at,
                        coalesce((SELECT sum(amount_ms) FROM leases l
                                  WHERE l.node_id = n.node_id), 0)::bigint
                 FROM cluster_nodes n ORDER BY n.node_id",
                &[],
            )
            .await
            .map_err(backend)?;
        Ok(rows
            .iter()
            .map(|r| {
                (
                    ClusterNode {
                        node_id: r.get(0),
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
    }

    async fn lease(&self, node: &str, asked: &[(i64, i64)], until: i64) -> Result<Vec<Grant>> {
        let mut want: BTreeMap<i64, i64> = BTreeMap::new();
        for &(id, ms) in asked.iter().filter(|(_, ms)| *ms > 0) {
            *want.entry(id).or_default() += ms;
        }
        if want.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<i64> = want.keys().copied().collect();
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(backend)?;
        // the rows locked in id order, read as they are now (READ COMMITTED reads the latest
        // committed version of a row it waited for): what is left unreserved
        let free: BTreeMap<i64, (i64, bool)> = tx
            .query(
                "SELECT id, balance_ms - reserved_ms, status = 'active' FROM licenses
                 WHERE id = ANY($1) ORDER BY id FOR UPDATE",
                &[&ids],
            )
            .await
            .map_err(backend)?
            .iter()
            .map(|r| (r.get(0), (r.get(1), r.get(2))))
            .collect();
        let (mut gids, mut gms) = (Vec::new(), Vec::new());
        for (id, (left, active)) in &free {
            let g = if *active {
                want[id].min(*left).max(0)
            } else {
                0
            };
            gids.push(*id);
            gms.push(g);
        }
        tx.execute(
            "UPDATE licenses l SET reserved_ms = l.reserved_ms + g.ms
             FROM unnest($1::bigint[], $2::bigint[]) AS g(id, ms)
             WHERE l.id = g.id AND g.ms > 0",
            &[&gids, &gms],
        )
        .await
        .map_err(backend)?;
        let held: BTreeMap<i64, i64> = tx
            .query(
                "INSERT INTO leases (license_id, node_id, amount_ms, expires_at)
                 SELECT id, $3, ms, $4 FROM unnest($1::bigint[], $2::bigint[]) AS g(id, ms)
                 ON CONFLICT (license_id, node_id) DO UPDATE SET
                     amount_ms = leases.amount_ms + excluded.amount_ms,
                     expires_at = excluded.expires_at
                 RETURNING license_id, amount_ms",
                &[&gids, &gms, &node, &until],
            )
            .await
            .map_err(backend)?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        tx.commit().await.map_err(backend)?;
        Ok(gids
            .iter()
            .zip(&gms)
            .map(|(id, g)| Grant {
                license_id: *id,
                granted_ms: *g,
                held_ms: held.get(id).copied().unwrap_or(0),
            })
            .collect())
    }

    async fn held(&self, node: &str, ids: &[i64]) -> Result<Vec<(i64, i64)>> {
        let c = self.client().await?;
        Ok(c.query(
            "SELECT license_id, amount_ms FROM leases WHERE node_id = $1 AND license_id = ANY($2)",
            &[&node, &ids],
        )
        .await
        .map_err(backend)?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect())
    }

    async fn release(&self, node: &str) -> Result<i64> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(backend)?;
        let back = give_back(&tx, "node_id = $1", &node).await?;
        tx.commit().await.map_err(backend)?;
        Ok(back)
    }
}
