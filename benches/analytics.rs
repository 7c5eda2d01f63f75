//! `cargo bench --bench analytics`: the analytics queries and an export on a database with
//! 1,000,000 access-log rows (1,000 licenses and guests over 30 days, written through the
//! flusher's own batch commit, so the rollups are what production keeps), 720,000 usage rows
//! and 2,000 payments. Prints the median of 5 runs of each question, and how much anonymous
//! memory (heap, SQLite's page cache) an export of every row adds: it must not grow with the
//! table.

use std::net::{IpAddr, Ipv4Addr};
use std::time::Instant;

use gateway::ledger::now_ms;
use gateway::records::AccessLog;
use gateway::store::exports::{exportable, Format};
use gateway::store::sqlite::exports;
use gateway::store::sqlite::flush;
use gateway::store::sqlite::licenses;
use gateway::store::sqlite::{open_migrated, reports};
use gateway::store::NewLicense;
use http::{HeaderValue, Method};
use rusqlite::params;

const ROWS: usize = 1_000_000;
const LICENSES: i64 = 1_000;
const DAYS: i64 = 30;

fn rss_anon_kib() -> i64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn median_ms(mut f: impl FnMut()) -> f64 {
    let mut times: Vec<f64> = (0..5)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64() * 1_000.0
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[2]
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("analytics.db");
    let mut conn = open_migrated(&path).unwrap();
    let now = now_ms();
    let start = now - DAYS * 86_400_000;

    let t = Instant::now();
    for i in 0..LICENSES {
        licenses::create(
            &mut conn,
            &NewLicense {
                name: format!("Customer {i}"),
                plan: ["free", "starter", "pro", "enterprise"][i as usize % 4].into(),
                balance_ms: 36_000_000,
                ..Default::default()
            },
            start,
        )
        .unwrap();
    }
    let session = HeaderValue::from_static("ses_0123456789abcdef01234567");
    let paths = [
        "/api/v1/transcribe",
        "/api/v1/status",
        "/api/v1/jobs",
        "/api/v1/upload",
        "/health",
    ];
    let batch = 10_000;
    for b in 0..ROWS / batch {
        let logs: Vec<AccessLog> = (0..batch)
            .map(|j| {
                let i = b * batch + j;
                let guest = i % 50 == 0;
                AccessLog {
                    summary_only: false,
                    key_id: None,
                    ts_ms: start + (i as i64 * DAYS * 86_400_000 / ROWS as i64),
                    license_id: (!guest).then_some((i as i64 * 7919) % LICENSES + 1),
                    session_id: Some(session.clone()),
                    method: Method::POST,
                    path: paths[i % paths.len()].into(),
                    status: if i % 40 == 0 { 500 } else { 200 },
                    outcome: "ok",
                    duration_us: 200 + (i as u64 * 7_919) % 400_000,
                    bytes_in: 512,
                    bytes_out: 2_048,
                    client_ip: Some(IpAddr::V4(Ipv4Addr::new(10, 0, (i % 200) as u8, 1))),
                    user_agent: Some("bench-client/1.0".into()),
                    guest_id: guest.then(|| "10.0.0.1".into()),
                    route: None,
                    units: None,
                }
            })
            .collect();
        flush::commit(&mut conn, &[], &logs, now, &[]).unwrap();
    }
    // usage: one row per license per hour, as a busy gateway's history would hold (coarser)
    {
        let tx = conn.transaction().unwrap();
        {
            let mut h = tx
                .prepare(
                    "INSERT INTO usage_history (license_id, kind, delta_ms, balance_before_ms,
                         balance_after_ms, requests, created_at)
                     VALUES (?1, 'usage', -?2, 0, 0, ?3, ?4)",
                )
                .unwrap();
            let mut d = tx
                .prepare(
                    "INSERT INTO usage_daily (license_id, day, charged_ms, requests)
                     VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT (license_id, day) DO UPDATE SET
                         charged_ms = charged_ms + excluded.charged_ms,
                         requests = requests + excluded.requests",
                )
                .unwrap();
            for hour in 0..DAYS * 24 {
                let at = start + hour * 3_600_000;
                for id in 1..=LICENSES {
                    let ms = 1_000 + (id * 37 + hour) % 60_000;
                    h.execute(params![id, ms, 30, at]).unwrap();
                    d.execute(params![id, gateway::store::rollup::day_of(at), ms, 30])
                        .unwrap();
                }
            }
            let mut p = tx
                .prepare(
                    "INSERT INTO payment_history (license_id, stripe_session_id, hours_ms,
                         amount_cents, currency, status, created_at, paid_at, updated_at)
                     VALUES (?1, ?2, 18000000, 2500, 'usd', 'paid', ?3, ?3, ?3)",
                )
                .unwrap();
            for i in 0..2_000i64 {
                let at = start + i * DAYS * 86_400_000 / 2_000;
                p.execute(params![i % LICENSES + 1, format!("cs_bench_{i}"), at])
                    .unwrap();
            }
        }
        tx.commit().unwrap();
    }
    conn.execute_batch("ANALYZE").unwrap();
    let rows: i64 = conn
        .query_row("SELECT count(*) FROM access_logs", [], |r| r.get(0))
        .unwrap();
    let rollup: i64 = conn
        .query_row("SELECT count(*) FROM access_daily", [], |r| r.get(0))
        .unwrap();
    println!(
        "analytics: built {rows} access-log rows ({rollup} rollup rows), 720,000 usage rows, \
         2,000 payments in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    drop(conn);

    // the questions, on a fresh read connection as the admin server's pool has
    let c = gateway::store::sqlite::connect(&path).unwrap();
    let license = median_ms(|| {
        let s = reports::usage_stats(&c, 17, 30, now).unwrap();
        assert!(s.calls > 0 && s.p95_ms.is_some() && !s.daily.is_empty());
    });
    let system = median_ms(|| {
        let s = reports::system_stats(&c, 30, now).unwrap();
        assert!(s.active_licenses > LICENSES / 2 && s.guest_calls > 0);
    });
    let history = median_ms(|| {
        let p = reports::history(&c, 17, gateway::store::HistoryKind::All, 50, None).unwrap();
        assert_eq!(p.items.len(), 50);
    });
    println!("analytics: per-license stats (30 days) {license:.2} ms (median of 5)");
    println!("analytics: system-wide stats (30 days)  {system:.2} ms");
    println!("analytics: a license's history page    {history:.2} ms");

    for (name, filter) in [
        ("all 1,000,000 rows", (None, None, None, None)),
        ("one license (~980 rows)", (None, None, Some(17), None)),
        ("one day", (Some(now - 86_400_000), None, None, None)),
    ] {
        let spec = exportable("access_logs").unwrap();
        let before = rss_anon_kib();
        let mut peak = before;
        let (mut bytes, mut chunks) = (0usize, 0usize);
        let t = Instant::now();
        exports::write(&c, spec, Format::Csv, filter, |chunk| {
            bytes += chunk.len();
            chunks += 1;
            if chunks % 64 == 0 {
                peak = peak.max(rss_anon_kib());
            }
            true
        })
        .unwrap();
        peak = peak.max(rss_anon_kib());
        println!(
            "analytics: export access_logs.csv, {name}: {:.1} MB in {:.0} ms, anonymous memory \
             +{:.1} MiB at most",
            bytes as f64 / 1e6,
            t.elapsed().as_secs_f64() * 1_000.0,
            (peak - before) as f64 / 1024.0
        );
    }
}
