//! `tollgate nodes`: the gateway nodes sharing the PostgreSQL database, from their heartbeats.

use std::process::ExitCode;

use anyhow::Context;
use gateway::config::{Config, StoreKind};
use gateway::timefmt::rfc3339;
use serde_json::json;

pub fn run(config: &Config, as_json: bool) -> anyhow::Result<ExitCode> {
    if config.storage.backend != StoreKind::Postgres {
        eprintln!(
            "tollgate nodes lists the nodes sharing a PostgreSQL database; this config keeps its \
             data in SQLite, which one node uses alone"
        );
        return Ok(ExitCode::from(1));
    }
    let store = gateway::server::open_store(config)?;
    let cluster = store.cluster().context("this store has no cluster table")?;
    // heartbeats are stamped on the database's clock: ages are read on it too
    let (nodes, now) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting a runtime")?
        .block_on(async {
            Ok::<_, anyhow::Error>((cluster.nodes().await?, cluster.clock_ms().await?))
        })?;
    store.close();
    let timeout = config.cluster.node_timeout.as_millis() as i64;
    let alive = |heartbeat_at: i64| heartbeat_at >= now - timeout;
    if as_json {
        let rows: Vec<_> = nodes
            .iter()
            .map(|(n, held_ms)| {
                json!({
                    "node_id": n.process.node_id,
                    "incarnation": n.process.incarnation,
                    "alive": alive(n.heartbeat_at),
                    "proxy": n.proxy,
                    "admin": n.admin,
                    "version": n.version,
                    "started_at": rfc3339(n.started_at),
                    "heartbeat_at": rfc3339(n.heartbeat_at),
                    "leased_ms": held_ms,
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({ "nodes": rows }))?
        );
        return Ok(ExitCode::SUCCESS);
    }
    let live = nodes.iter().filter(|(n, _)| alive(n.heartbeat_at)).count();
    println!("{live} node(s) alive on {}", store.describe());
    for (n, held_ms) in &nodes {
        let ago = (now - n.heartbeat_at).max(0) as f64 / 1_000.0;
        println!(
            "  {:<28} {:<5} proxy {:<21} admin {:<21} v{}  heartbeat {ago:.1} s ago, \
             {:.1} s of balance on lease",
            n.process.node_id,
            if alive(n.heartbeat_at) {
                "alive"
            } else {
                "gone"
            },
            n.proxy,
            n.admin,
            n.version,
            *held_ms as f64 / 1_000.0,
        );
    }
    Ok(ExitCode::SUCCESS)
}
