//! Several nodes on one PostgreSQL database: this node's membership. It writes its heartbeat
//! to `cluster_nodes` every `cluster.heartbeat_interval_ms`, counts the nodes alive
//! (`tollgate_cluster_nodes`; the ledger splits rates and concurrency caps by them), and takes
//! its row away when it stops. Nothing of it runs on SQLite (a store without
//! [`crate::store::Operations::cluster`]).

use std::sync::Arc;

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

use crate::config::ClusterConfig;
use crate::ledger::{now_ms, Ledger};
use crate::metrics;
use crate::store::{ClusterNode, SharedStore};

/// This node in the cluster.
pub struct Membership {
    store: SharedStore,
    /// Told the live nodes at each heartbeat: rates and concurrency caps are split by them.
    ledger: Arc<Ledger>,
    config: ClusterConfig,
    node: ClusterNode,
}

impl Membership {
    /// The membership of a node whose proxy and admin server listen at `proxy` and `admin`;
    /// `None` on a store no other node can share.
    pub fn new(
        store: SharedStore,
        ledger: Arc<Ledger>,
        config: &ClusterConfig,
        proxy: String,
        admin: String,
    ) -> Option<Arc<Membership>> {
        store.cluster()?;
        let now = now_ms();
        Some(Arc::new(Membership {
            node: ClusterNode {
                node_id: config.node_id.clone(),
                proxy,
                admin,
                version: env!("CARGO_PKG_VERSION").to_string(),
                started_at: now,
                heartbeat_at: now,
            },
            config: config.clone(),
            store,
            ledger,
        }))
    }

    /// Writes one heartbeat; returns the nodes alive.
    pub async fn beat(&self) -> crate::store::Result<usize> {
        let Some(cluster) = self.store.cluster() else {
            return Ok(1);
        };
        let now = now_ms();
        let node = ClusterNode {
            heartbeat_at: now,
            ..self.node.clone()
        };
        let live_since = now - self.config.node_timeout.as_millis() as i64;
        let leases_until = now + self.config.lease_lifetime.as_millis() as i64;
        let live = cluster.heartbeat(&node, live_since, leases_until).await?;
        self.ledger.set_live_nodes(live);
        metrics::CLUSTER_NODES.set(live as i64);
        Ok(live)
    }

    async fn run(&self, mut shutdown: ShutdownWatch) {
        let mut tick = tokio::time::interval(self.config.heartbeat_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        let mut renewed = std::time::Instant::now();
        let mut forgot = false;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.changed() => break,
            }
            match self.beat().await {
                Ok(live) => {
                    if failing {
                        tracing::info!(live, "cluster heartbeat written again");
                    }
                    failing = false;
                    forgot = false;
                    renewed = std::time::Instant::now();
                }
                Err(e) => {
                    if !failing {
                        metrics::STORE_ERRORS.inc();
                        tracing::warn!(error = %e, "cluster heartbeat failed; retrying");
                    }
                    failing = true;
                    // not renewed for their lifetime: another node's heartbeat may have given
                    // them back, and other nodes leased them again
                    if !forgot && renewed.elapsed() >= self.config.lease_lifetime {
                        tracing::warn!(
                            "leases not renewed for their lifetime: this node stops spending them"
                        );
                        self.ledger.drop_leases();
                        forgot = true;
                    }
                }
            }
        }
        if let Some(cluster) = self.store.cluster() {
            match cluster.leave(&self.node.node_id).await {
                Ok(()) => tracing::info!(node = %self.node.node_id, "left the cluster"),
                Err(e) => tracing::warn!(error = %e, "could not take this node's row away"),
            }
        }
    }
}

/// The membership as a Pingora background service.
pub struct MembershipService(pub Arc<Membership>);

#[async_trait]
impl BackgroundService for MembershipService {
    async fn start(&self, shutdown: ShutdownWatch) {
        self.0.run(shutdown).await;
    }
}
