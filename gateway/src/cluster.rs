//! Several nodes on one PostgreSQL database: this process's membership. Every
//! `cluster.heartbeat_interval_ms` it takes the database's time (the node's clock follows it:
//! [`SyncedClock`]), writes its heartbeat to `cluster_nodes`, renews its leases, counts the
//! processes alive (`tollgate_cluster_nodes`; the ledger splits rates and concurrency caps by
//! them), and takes its row away when it stops. A beat that fails, or hangs past its timeout,
//! counts as missed; when the leases could expire before the next one lands, the process stops
//! spending them (`Leases::forget`) and gives their rows back before it leases again, so what
//! it holds in memory and what its rows reserve agree again within a beat of the database's
//! return, whatever the outage's length. Nothing of it runs on SQLite (a store without
//! [`crate::store::Operations::cluster`]).

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

use crate::config::ClusterConfig;
use crate::leases::Leases;
use crate::ledger::{Ledger, SyncedClock};
use crate::metrics;
use crate::store::{ClusterNode, ClusterStore, Process, SharedStore, StoreError};

/// This process in the cluster.
pub struct Membership {
    store: SharedStore,
    /// Told the live nodes at each heartbeat: rates and concurrency caps are split by them.
    ledger: Arc<Ledger>,
    /// The ledger's clock, when it follows the database's (the machine's own otherwise: a test's
    /// manual clock).
    clock: Option<Arc<SyncedClock>>,
    leases: Option<Arc<Leases>>,
    config: ClusterConfig,
    node: ClusterNode,
    state: std::sync::Mutex<BeatState>,
}

#[derive(Default)]
struct BeatState {
    /// Whether the clock has been synced once.
    synced: bool,
    /// Until when the last heartbeat that landed renewed this process's leases (the ledger's
    /// clock, which is the database's): they may expire past it.
    renewed_until: Option<i64>,
}

impl Membership {
    /// The membership of `process`, whose proxy and admin server listen at `proxy` and `admin`;
    /// `None` on a store no other node can share.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: SharedStore,
        ledger: Arc<Ledger>,
        clock: Option<Arc<SyncedClock>>,
        leases: Option<Arc<Leases>>,
        config: &ClusterConfig,
        process: Process,
        proxy: String,
        admin: String,
    ) -> Option<Arc<Membership>> {
        store.cluster()?;
        let now = ledger.now_ms();
        Some(Arc::new(Membership {
            node: ClusterNode {
                process,
                proxy,
                admin,
                version: env!("CARGO_PKG_VERSION").to_string(),
                started_at: now,
                heartbeat_at: now,
            },
            config: config.clone(),
            store,
            ledger,
            clock,
            leases,
            state: std::sync::Mutex::default(),
        }))
    }

    /// How long a beat may take before it counts as missed: a database that drops packets
    /// must not hold the beat while the leases run out.
    fn beat_timeout(&self) -> Duration {
        (self.config.lease_lifetime / 4).clamp(Duration::from_millis(200), Duration::from_secs(5))
    }

    /// Takes the database's time for the clock: the first reading sets it, later ones move it
    /// only when the two have parted (a clock stepped on either side).
    async fn sync_clock(&self, cluster: &dyn ClusterStore) -> crate::store::Result<()> {
        let Some(clock) = &self.clock else {
            return Ok(());
        };
        let sent = clock.mono_now();
        let db = cluster.clock_ms().await?;
        let received = clock.mono_now();
        let first = !self.state().synced;
        let step = clock.sync(db, sent, received, first);
        if first {
            self.state().synced = true;
            if step.abs() > SyncedClock::STEP_MS {
                tracing::warn!(
                    offset_ms = step,
                    "this machine's clock is off the database's; the node follows the database"
                );
            }
        } else if step != 0 {
            tracing::warn!(
                step_ms = step,
                "the database's clock and this node's parted; the node follows the database"
            );
        }
        Ok(())
    }

    fn state(&self) -> std::sync::MutexGuard<'_, BeatState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes one heartbeat (bounded by its timeout); returns the processes alive.
    pub async fn beat(&self) -> crate::store::Result<usize> {
        if self.store.cluster().is_none() {
            return Ok(1);
        }
        match tokio::time::timeout(self.beat_timeout(), self.beat_once()).await {
            Ok(r) => r,
            Err(_) => Err(StoreError::Backend(format!(
                "the heartbeat did not end within {} ms",
                self.beat_timeout().as_millis()
            ))),
        }
    }

    async fn beat_once(&self) -> crate::store::Result<usize> {
        let Some(cluster) = self.store.cluster() else {
            return Ok(1);
        };
        self.sync_clock(cluster).await?;
        if let Some(l) = &self.leases {
            // leases forgotten in an outage go back before any are renewed or asked for
            l.settle().await?;
        }
        let now = self.ledger.now_ms();
        let node = ClusterNode {
            heartbeat_at: now,
            ..self.node.clone()
        };
        let live_since = now - self.config.node_timeout.as_millis() as i64;
        let leases_until = now + self.config.lease_lifetime.as_millis() as i64;
        let beat = cluster.heartbeat(&node, live_since, leases_until).await?;
        self.state().renewed_until = Some(leases_until);
        self.ledger.set_live_nodes(beat.live);
        metrics::CLUSTER_NODES.set(beat.live as i64);
        if let Some(l) = &self.leases {
            // what this process's rows reserve and it does not hold: nothing, but for a grant
            // landing between the two readings, or one whose answer was lost, which the
            // true-up gives back
            let held = self.ledger.leases_held().1;
            metrics::LEASES_STRANDED.set((beat.leased_ms - held).max(0) as f64 / 1_000.0);
            if l.needs_true_up(beat.leased_ms) {
                let back = l.true_up().await?;
                if back > 0 {
                    tracing::warn!(
                        ms = back,
                        "lease rows held more than this node did (a grant's answer was lost): \
                         the rest given back"
                    );
                }
            }
        }
        Ok(beat.live)
    }

    /// When this process must stop spending its leases unless a beat renews them first: a
    /// quarter of their lifetime before they expire, so no other node is given them while
    /// this one still spends them (none before the first beat has landed).
    fn leases_at_risk_at(&self) -> Option<std::time::Instant> {
        let margin = self.config.lease_lifetime.as_millis() as i64 / 4;
        let until = self.state().renewed_until?;
        let left = (until - margin - self.ledger.now_ms()).max(0) as u64;
        Some(std::time::Instant::now() + Duration::from_millis(left))
    }

    /// One beat, during which the leases are forgotten if their deadline passes first (a beat
    /// that hangs must not keep them spent past it).
    async fn beat_watching_leases(&self) -> crate::store::Result<usize> {
        let beat = self.beat();
        tokio::pin!(beat);
        let at_risk = self.leases.as_ref().and_then(|_| self.leases_at_risk_at());
        let Some(at_risk) = at_risk else {
            return beat.await;
        };
        tokio::select! {
            r = &mut beat => return r,
            _ = tokio::time::sleep_until(at_risk.into()) => {}
        }
        if let Some(l) = &self.leases {
            if l.forget() {
                tracing::warn!(
                    "leases not renewed in time: this node stops spending them, and gives their \
                     rows back when the database answers"
                );
            }
        }
        beat.await
    }

    async fn run(&self, mut shutdown: ShutdownWatch) {
        let mut tick = tokio::time::interval(self.config.heartbeat_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.changed() => break,
            }
            match self.beat_watching_leases().await {
                Ok(live) => {
                    if failing {
                        tracing::info!(live, "cluster heartbeat written again");
                    }
                    failing = false;
                }
                Err(e) => {
                    if !failing {
                        metrics::STORE_ERRORS.inc();
                        tracing::warn!(error = %e, "cluster heartbeat failed; retrying");
                    }
                    failing = true;
                }
            }
        }
        if let Some(cluster) = self.store.cluster() {
            match cluster.leave(&self.node.process).await {
                Ok(()) => tracing::info!(node = %self.node.process, "left the cluster"),
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
