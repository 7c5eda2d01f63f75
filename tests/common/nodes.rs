//! Several gateway nodes on one PostgreSQL database, for the tests of several nodes: real
//! `tollgate serve` processes sharing a database of the test binary's server.

use std::time::{Duration, Instant};

use serde_json::Value;

use super::postgres::Postgres;
use super::{Gateway, Settings};

/// `n` nodes in front of `upstream`, on one new database of `server`. Their poll for license
/// changes is slowed to a minute: what reaches them sooner came by the database's notices.
pub async fn nodes(
    server: &Postgres,
    upstream: std::net::SocketAddr,
    n: usize,
) -> (Vec<Gateway>, String) {
    nodes_with(server, upstream, n, Settings::default()).await
}

/// As [`nodes`], each on `base` (its storage keys and environment added to); also the
/// database's name.
pub async fn nodes_with(
    server: &Postgres,
    upstream: std::net::SocketAddr,
    n: usize,
    base: Settings,
) -> (Vec<Gateway>, String) {
    let url = server.database().await;
    let mut nodes = Vec::new();
    for _ in 0..n {
        let mut s = Settings {
            storage_extra: "backend = \"postgres\"".into(),
            refresh_interval_ms: 60_000,
            ..base.clone()
        };
        s.env.push(("TOLLGATE_DATABASE_URL", url.clone()));
        nodes.push(Gateway::start(upstream, s).await);
    }
    (nodes, url.rsplit('/').next().unwrap().to_string())
}

/// Stops every node with SIGTERM; each must exit cleanly within `secs`.
pub async fn stop_nodes(nodes: &mut [Gateway], secs: u64) {
    for n in nodes {
        n.signal("TERM");
        let status = n.wait_exit(Duration::from_secs(secs)).await;
        assert!(status.success(), "{status:?}: {}", n.log());
    }
}

/// The nodes' (proxy, admin) addresses, for the balancer.
pub fn addresses(nodes: &[Gateway]) -> Vec<(std::net::SocketAddr, std::net::SocketAddr)> {
    nodes.iter().map(|n| (n.proxy, n.admin)).collect()
}

/// The sum of every sample of `name` (all its labels) on `node`.
pub async fn metric_sum(node: &Gateway, name: &str) -> f64 {
    node.metrics_text()
        .await
        .lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// How long until `node` answers `key` with `want` (panics past `within`).
pub async fn until_status(
    node: &Gateway,
    c: &reqwest::Client,
    key: &str,
    want: u16,
    within: Duration,
) -> Duration {
    let started = Instant::now();
    loop {
        let got = node.get_with_key(c, "/app", key).await.status().as_u16();
        if got == want {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < within,
            "still {got}, not {want}, after {within:?}:\n{}",
            node.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub async fn ok_json(r: reqwest::RequestBuilder) -> Value {
    let r = r.send().await.unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    r.json().await.unwrap()
}
