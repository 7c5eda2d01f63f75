//! `[cluster]`: this node's name and heartbeat, and the slices of balances and allowances it
//! leases from the shared database.

use super::*;

/// `[cluster]`: the node's name (`<hostname>-<pid>` unless set), its heartbeat, when a node is
/// taken for dead, and the leases; the bounds of the later keys follow from the earlier ones.
pub(super) fn parse(root: &Table, errors: &mut Vec<String>) -> ClusterConfig {
    let mut s = Section::new(root, "cluster");
    let heartbeat_ms = s.uint("heartbeat_interval_ms", 1_000, 100, 60_000);
    let cluster = ClusterConfig {
        lease_ms: 0,
        lease_requests: 0,
        lease_lifetime: Duration::ZERO,
        node_id: s.opt_string("node_id").unwrap_or_else(default_node_id),
        heartbeat_interval: Duration::from_millis(heartbeat_ms),
        node_timeout: Duration::from_millis(s.uint(
            "node_timeout_ms",
            heartbeat_ms.saturating_mul(2).max(5_000),
            heartbeat_ms.saturating_mul(2),
            600_000,
        )),
    };
    let cluster = ClusterConfig {
        lease_ms: s.uint("lease_ms", 30_000, 100, 86_400_000),
        lease_requests: s.uint("lease_requests", 100, 1, 1_000_000_000),
        lease_lifetime: Duration::from_millis(s.uint(
            "lease_lifetime_ms",
            (cluster.node_timeout.as_millis() as u64 * 2).max(30_000),
            heartbeat_ms.saturating_mul(3),
            3_600_000,
        )),
        ..cluster
    };
    if cluster.node_id.trim().is_empty() {
        s.error("node_id", "must not be empty");
    }
    s.finish(errors);
    cluster
}

/// `<hostname>-<pid>`: a name no other running process has.
fn default_node_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "node".into());
    format!("{host}-{}", std::process::id())
}
