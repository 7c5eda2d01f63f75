//! The nodes sharing the database (`ClusterStore`): a heartbeat row per node, and the leases
//! on balances (migration 0004). Every statement that changes `reserved_ms` locks the licenses
//! it touches in id order, as the flush does, so they never deadlock with it.

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

/// Gives back leases in `(license, ms)` pairs: locks the licenses in id order, then lowers
/// what they hold reserved.
async fn unreserve(tx: &tokio_postgres::Transaction<'_>, back: &BTreeMap<i64, i64>) -> Result<()> {
    if back.is_empty() {
        return Ok(());
    }
    let ids: Vec<i64> = back.keys().copied().collect();
    let ms: Vec<i64> = back.values().copied().collect();
    tx.execute(
        "SELECT 1 FROM licenses WHERE id = ANY($1) ORDER BY id FOR UPDATE",
        &[&ids],
    )
    .await
    .map_err(backend)?;
    tx.execute(
        "UPDATE licenses l SET reserved_ms = greatest(l.reserved_ms - b.ms, 0)
         FROM unnest($1::bigint[], $2::bigint[]) AS b(id, ms) WHERE l.id = b.id",
        &[&ids, &ms],
    )
    .await
    .map_err(backend)?;
    Ok(())
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
        let tx = c.transaction().await.map_err(backend)?;
        // the statement's snapshot does not see its own upsert: the count is of the other
        // live nodes, plus this one
        let others: i64 = tx
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
        tx.execute(
            "UPDATE leases SET expires_at = $2 WHERE node_id = $1",
            &[&node.node_id, &leases_until],
        )
        .await
        .map_err(backend)?;
        // leases nobody renewed: their nodes died, and the balance they held is free again
        let mut back: BTreeMap<i64, i64> = BTreeMap::new();
        for r in tx
            .query(
                "DELETE FROM leases WHERE expires_at < $1 RETURNING license_id, amount_ms",
                &[&node.heartbeat_at],
            )
            .await
            .map_err(backend)?
        {
            *back.entry(r.get(0)).or_default() += r.get::<_, i64>(1);
        }
        if !back.is_empty() {
            tracing::info!(
                licenses = back.len(),
                ms = back.values().sum::<i64>(),
                "leases of stopped nodes expired and were given back"
            );
        }
        unreserve(&tx, &back).await?;
        tx.commit().await.map_err(backend)?;
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

    async fn release(&self, node: &str) -> Result<i64> {
        let mut c = self.client().await?;
        let tx = c.transaction().await.map_err(backend)?;
        let mut back: BTreeMap<i64, i64> = BTreeMap::new();
        for r in tx
            .query(
                "DELETE FROM leases WHERE node_id = $1 RETURNING license_id, amount_ms",
                &[&node],
            )
            .await
            .map_err(backend)?
        {
            *back.entry(r.get(0)).or_default() += r.get::<_, i64>(1);
        }
        unreserve(&tx, &back).await?;
        tx.commit().await.map_err(backend)?;
        Ok(back.values().sum())
    }
}
