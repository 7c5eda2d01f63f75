//! `cargo bench --bench memory`: resident memory of the ledger with 1,000,000 cached keys and an
//! open session for 100,000 of them (target: under 300 MB).

use std::sync::Arc;
use std::time::Duration;

use gateway::config::MeteringMode;
use gateway::keys::KeyHash;
use gateway::ledger::{Ending, Ledger, LedgerOptions, LicenseState, LicenseStatus, SystemClock};

fn rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn main() {
    // `cargo test --benches` runs this file too; only measure under `cargo bench`.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    const KEYS: usize = 1_000_000;
    const SESSIONS: usize = 100_000;
    let before = rss_kib();
    let ledger = Ledger::new(
        Arc::new(SystemClock),
        LedgerOptions {
            mode: MeteringMode::Session,
            idle_timeout_ms: 300_000,
            // quick_cache sizes itself approximately; leave room so all of them stay cached.
            cache_capacity: KEYS as u64 * 21 / 20,
            negative_ttl: Duration::from_secs(5),
            ..LedgerOptions::default()
        },
    );
    let mut accounts = Vec::with_capacity(SESSIONS);
    for i in 0..KEYS {
        let hash = KeyHash::of(format!("tg_memory_bench_key_{i:012}").as_bytes());
        let state = LicenseState {
            id: i as i64 + 1,
            key_hash: hash,
            key_id: 1,
            keys_version: 0,
            plan: ["free", "starter", "pro", "enterprise"][i % 4].into(),
            status: LicenseStatus::Active,
            expires_at: None,
            balance_ms: 3_600_000,
            version: 1,
            period_anchor: 1_700_000_000_000,
            period: None,
            topup: None,
            today: None,
            period_units: Vec::new(),
            key_rules: None,
            period_used: None,
        };
        let account = ledger.insert_loaded(hash, Some(state)).unwrap();
        if i < SESSIONS {
            accounts.push(account);
        }
    }
    for a in &accounts {
        let adm = ledger.admit(a).unwrap();
        ledger.finish(a, adm.ticket, Ending::Charged, 100, 1_000);
    }
    drop(accounts);
    ledger.prune();
    let after = rss_kib();
    println!(
        "memory: {KEYS} cached keys, {SESSIONS} open sessions: RSS {:.1} MiB ({:.1} MiB above \
         the empty process); cached_keys={}, active_sessions={}",
        after as f64 / 1024.0,
        (after - before) as f64 / 1024.0,
        ledger.cached_keys(),
        ledger.active_sessions(),
    );
}
