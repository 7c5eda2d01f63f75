//! `cargo bench --bench admission`: the proxy's in-memory hot path per request — key
//! extraction, SHA-256, cache hit, admission and the end-of-request tally — for one key and for
//! 100,000 distinct keys. It calls the same `gateway::proxy::gate` the proxy calls. The plan has
//! every limit (four rates, concurrency, body cap, period allowance), set high enough never to
//! deny, so each request pays for all the checks.

use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use gateway::config::{ChargeMode, MeteringMode, Plan, Route};
use gateway::keys::{self, KeyHash};
use gateway::ledger::{
    Ask, Ending, Ledger, LedgerOptions, LicenseState, LicenseStatus, SystemClock,
};
use gateway::proxy::{gate, Gate};
use gateway::routes::Routes;

fn ledger_with(n: usize) -> (Ledger, Vec<String>) {
    let ledger = Ledger::new(
        Arc::new(SystemClock),
        LedgerOptions {
            mode: MeteringMode::Session,
            idle_timeout_ms: 300_000,
            cache_capacity: 2_000_000,
            negative_ttl: Duration::from_secs(5),
            plans: vec![Plan {
                name: "free".into(),
                requests_per_second: Some(1_000_000_000),
                requests_per_minute: Some(60_000_000_000),
                requests_per_hour: Some(3_600_000_000_000),
                requests_per_day: Some(86_400_000_000_000),
                max_concurrent: Some(64),
                max_body_bytes: Some(1 << 30),
                period_ms: Some(i64::MAX / 4),
                period_requests: Some(u64::MAX / 4),
                // left off so the figures compare with earlier runs, which had no such limit
                max_upload_bytes_per_day: None,
                period_units: Default::default(),
                included_ms: None,
                included_requests: None,
                included_units: Default::default(),
                price: None,
                trial_days: None,
            }],
            ..LedgerOptions::default()
        },
    );
    let keys: Vec<String> = (0..n).map(|_| keys::generate().key).collect();
    for (i, k) in keys.iter().enumerate() {
        let hash = KeyHash::of(k.as_bytes());
        let state = LicenseState {
            id: i as i64 + 1,
            key_hash: hash,
            key_id: 1,
            keys_version: 0,
            plan: "free".into(),
            status: LicenseStatus::Active,
            expires_at: None,
            balance_ms: i64::MAX / 4,
            version: 1,
            period_anchor: 1_700_000_000_000,
            period: None,
            topup: None,
            today: None,
            period_units: Vec::new(),
            key_rules: None,
            period_used: None,
        };
        ledger.insert_loaded(hash, Some(state));
    }
    (ledger, keys)
}

fn admission(c: &mut Criterion) {
    let mut group = c.benchmark_group("admission");
    group.throughput(Throughput::Elements(1));
    for n in [1usize, 100_000] {
        let (ledger, keys) = ledger_with(n);
        let mut i = 0usize;
        group.bench_with_input(BenchmarkId::new("keys", n), &n, |b, _| {
            b.iter(|| {
                let key = keys[i % keys.len()].as_bytes();
                i = i.wrapping_add(1);
                match gate(&ledger, Some(key), None, None, Ask::body(Some(1_024))) {
                    Gate::Admitted(m) => {
                        ledger.finish(&m.account, m.admission.ticket, Ending::Charged, 0, 128);
                    }
                    _ => panic!("a known key with a balance is admitted"),
                }
            })
        });
    }
    // the same, with 50 routes matched first (25 exact paths and 25 prefixes, none of which
    // the path is on: every one is looked at), as the proxy matches them on every request
    let routes: Vec<Route> = (0..50)
        .map(|i| {
            let path = if i % 2 == 0 {
                format!("/api/v1/resource{i}")
            } else {
                format!("/api/v1/group{i}/*")
            };
            Route {
                charge: ChargeMode::Metered,
                ..Route::free(&path)
            }
        })
        .collect();
    let routes = Routes::new(&routes);
    let (ledger, keys) = ledger_with(1);
    group.bench_function(BenchmarkId::new("keys_with_50_routes", 1), |b| {
        b.iter(|| {
            let route = routes.find("GET", std::hint::black_box("/api/v1/transcribe/abc"));
            let ask =
                gateway::routes::ask_for(route.map(|i| routes.get(i)), &[], None, Some(1_024));
            match gate(&ledger, Some(keys[0].as_bytes()), None, None, ask) {
                Gate::Admitted(m) => {
                    ledger.finish(&m.account, m.admission.ticket, Ending::Charged, 0, 128);
                }
                _ => panic!("a known key with a balance is admitted"),
            }
        })
    });
    group.finish();
}

criterion_group!(benches, admission);
criterion_main!(benches);
