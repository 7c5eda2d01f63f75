//! `cargo bench --bench flusher`: access-log rows per second committed by the flusher's batch
//! transaction into a real SQLite file in WAL mode, at batch sizes 100, 1,000 and 10,000, and
//! into a real PostgreSQL (a throwaway server the bench starts, as the tests do, or the one
//! `TOLLGATE_TEST_DATABASE_URL` names) at 1,000 and 10,000, in the same run.

#[allow(dead_code)]
#[path = "../tests/common/postgres.rs"]
mod postgres;

use std::net::{IpAddr, Ipv4Addr};

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use gateway::ledger::now_ms;
use gateway::records::AccessLog;
use gateway::store::sqlite::flush;
use gateway::store::sqlite::open_migrated;
use http::{HeaderValue, Method};

fn rows(n: usize) -> Vec<AccessLog> {
    let session = HeaderValue::from_static("ses_0123456789abcdef01234567");
    (0..n)
        .map(|i| AccessLog {
            summary_only: false,
            key_id: None,
            ts_ms: now_ms(),
            license_id: Some((i % 1_000) as i64 + 1),
            session_id: Some(session.clone()),
            method: Method::POST,
            path: "/api/v1/transcribe".into(),
            status: 200,
            outcome: "ok",
            duration_us: 1_234,
            bytes_in: 512,
            bytes_out: 2_048,
            client_ip: Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1))),
            user_agent: Some("bench-client/1.0".into()),
            guest_id: None,
            route: None,
            units: None,
        })
        .collect()
}

fn flusher(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let mut conn = open_migrated(&dir.path().join("bench.db")).unwrap();
    gateway::store::sqlite::tune_writer(&conn).unwrap();
    let mut group = c.benchmark_group("flusher_access_logs");
    group.sample_size(20);
    for batch in [100usize, 1_000, 10_000] {
        group.throughput(Throughput::Elements(batch as u64));
        let template = rows(batch);
        group.bench_with_input(BenchmarkId::new("batch", batch), &batch, |b, _| {
            b.iter_batched(
                || template.clone(),
                |logs| flush::commit(&mut conn, &[], &logs, now_ms(), &[]).unwrap(),
                BatchSize::LargeInput,
            )
        });
    }
    group.finish();
}

fn flusher_postgres(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let pg = postgres::Postgres::start();
    let store = rt.block_on(async {
        let url = pg.database().await;
        gateway::store::postgres::PgStore::open(&url, 2)
            .await
            .unwrap()
    });
    let mut group = c.benchmark_group("flusher_access_logs_postgres");
    group.sample_size(20);
    for batch in [1_000usize, 10_000] {
        group.throughput(Throughput::Elements(batch as u64));
        let template = rows(batch);
        group.bench_with_input(BenchmarkId::new("batch", batch), &batch, |b, _| {
            b.iter_batched(
                || gateway::store::FlushBatch {
                    charges: Vec::new(),
                    logs: template.clone(),
                    now: now_ms(),
                    process: None,
                    seq: 0,
                    session_gap_ms: None,
                    meters: Default::default(),
                },
                |batch| rt.block_on(store.commit_flush(&batch)).unwrap(),
                BatchSize::LargeInput,
            )
        });
    }
    group.finish();
    drop(store);
    drop(pg);
}

criterion_group!(benches, flusher, flusher_postgres);
criterion_main!(benches);
