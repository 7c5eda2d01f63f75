//! Several nodes on one PostgreSQL database: this process's membership. Every
//! `cluster.heartbeat_interval_ms` it takes the database's time (the node's clock follows it:
//! [`SyncedClock`]), writes its heartbeat to `cluster_nodes`, reads its lease rows (and renews
//! them once a quarter of their lifetime has passed since the last renewal), counts the
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

/// How long a beat may take, for leases of `lifetime` (a quarter of it, 200 ms to 5 s).
fn beat_timeout(lifetime: Duration) -> Duration {
    (lifetime / 4).clamp(Duration::from_millis(200), Duration::from_secs(5))
}

/// How long before its leases expire a process stops spending them unless a beat renewed them:
/// a quarter of their lifetime, and at least three steps of the synced clock (what two nodes'
/// clocks may differ by), but at most half the lifetime.
fn at_risk_margin(lifetime: i64) -> i64 {
    (lifetime / 4)
        .max(3 * SyncedClock::STEP_MS)
        .min(lifetime / 2)
}

/// Whether a beat at `now` renews the lease rows last renewed until `renewed_until`: once a
/// quarter of their `lifetime` has passed, or sooner when the moment they are at risk
/// ([`at_risk_margin`]) is within two beats and a beat's timeout, so a beat that fails or
/// hangs leaves another to renew them; at every beat when the lifetime is that short. Every
/// beat renewed every row before: with 10,000 keys leased, an update of 10,000 rows each
/// second (~100 ms of the database's time, while asks and flush commits waited).
fn renewal_due(
    renewed_until: Option<i64>,
    now: i64,
    lifetime: i64,
    heartbeat: i64,
    beat_timeout: i64,
) -> bool {
    renewed_until.is_none_or(|until| {
        until - now <= lifetime - lifetime / 4
            || until - at_risk_margin(lifetime) - now <= 2 * heartbeat + beat_timeout
    })
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
        beat_timeout(self.config.lease_lifetime)
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
        let live = cluster.heartbeat(&node, live_since).await?;
        self.ledger.set_live_nodes(live);
        metrics::CLUSTER_NODES.set(live as i64);
        let renew = self.renewal_due(now).then_some(leases_until);
        if let Some(l) = &self.leases {
            // every beat: memory clamped to the rows, and what they hold beyond it given back
            let stranded = l.reconcile(renew).await?;
            metrics::LEASES_STRANDED.set(stranded as f64 / 1_000.0);
        }
        if renew.is_some() {
            self.state().renewed_until = Some(leases_until);
        }
        Ok(live)
    }

    /// Whether this beat renews the lease rows (every beat reads them, [`Leases::reconcile`]);
    /// see [`renewal_due`].
    fn renewal_due(&self, now: i64) -> bool {
        renewal_due(
            self.state().renewed_until,
            now,
            self.config.lease_lifetime.as_millis() as i64,
            self.config.heartbeat_interval.as_millis() as i64,
            self.beat_timeout().as_millis() as i64,
        )
    }

    /// When this process must stop spending its leases unless a beat renews them first
    /// ([`at_risk_margin`] before they expire), so no other node is given them while this one
    /// still spends them. None before the first beat has renewed them, or once they are
    /// forgotten.
    fn leases_at_risk_at(&self) -> Option<tokio::time::Instant> {
        self.leases.as_ref().filter(|l| !l.is_forgotten())?;
        let margin = at_risk_margin(self.config.lease_lifetime.as_millis() as i64);
        let until = self.state().renewed_until?;
        let left = (until - margin - self.ledger.now_ms()).max(0) as u64;
        Some(tokio::time::Instant::now() + Duration::from_millis(left))
    }

    /// Stops spending the leases (their deadline passed with no beat renewing them).
    fn forget_leases(&self) {
        if let Some(l) = &self.leases {
            if l.forget() {
                tracing::warn!(
                    "leases not renewed in time: this node stops spending them, and gives their \
                     rows back when the database answers"
                );
            }
        }
    }

    /// One beat, during which the leases are forgotten if their deadline passes first (a beat
    /// that hangs must not keep them spent past it).
    async fn beat_watching_leases(&self) -> crate::store::Result<usize> {
        let beat = self.beat();
        tokio::pin!(beat);
        let Some(at_risk) = self.leases_at_risk_at() else {
            return beat.await;
        };
        tokio::select! {
            r = &mut beat => return r,
            _ = tokio::time::sleep_until(at_risk) => {}
        }
        self.forget_leases();
        beat.await
    }

    async fn run(&self, mut shutdown: ShutdownWatch) {
        let mut tick = tokio::time::interval(self.config.heartbeat_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            // the deadline is watched between beats too: a beat that fails at once must not
            // leave it to the next tick
            let at_risk = self.leases_at_risk_at();
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.changed() => break,
                _ = async { tokio::time::sleep_until(at_risk?).await; Some(()) },
                    if at_risk.is_some() => {
                    self.forget_leases();
                    continue;
                }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// For every lifetime and beat the config allows (a beat at most a third of the
    /// lifetime): the first beat that renews after a renewal is either the very next one or
    /// leaves room before the leases are at risk for it to time out and another beat to try;
    /// with the defaults (30 s, 1 s) it is not every beat.
    #[test]
    fn a_renewal_leaves_room_for_a_retry_and_is_not_at_every_beat() {
        for lifetime in [
            300, 450, 600, 1_000, 1_500, 2_000, 2_999, 3_000, 5_000, 30_000, 600_000,
        ] {
            let mut heartbeat = 100;
            while heartbeat * 3 <= lifetime && heartbeat <= 60_000 {
                let timeout =
                    beat_timeout(Duration::from_millis(lifetime as u64)).as_millis() as i64;
                let deadline = lifetime - at_risk_margin(lifetime);
                let first = (1..)
                    .map(|k| k * heartbeat)
                    .find(|&t| renewal_due(Some(lifetime), t, lifetime, heartbeat, timeout))
                    .unwrap();
                assert!(
                    first == heartbeat || deadline - first >= heartbeat + timeout,
                    "lifetime {lifetime}, beat {heartbeat}: renewed at {first}, at risk at \
                     {deadline}, a beat may take {timeout}"
                );
                heartbeat += 50;
            }
        }
        let first = (1..)
            .map(|k| k * 1_000)
            .find(|&t| renewal_due(Some(30_000), t, 30_000, 1_000, 5_000))
            .unwrap();
        assert_eq!(first, 8_000, "a quarter of the lifetime, not every beat");
        assert!(
            renewal_due(None, 0, 30_000, 1_000, 5_000),
            "the first beat renews"
        );
    }
}
