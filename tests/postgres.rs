//! The PostgreSQL backend's foundation on a real server the test starts itself
//! (tests/common/postgres.rs): nodes that open one database together migrate it once, the
//! tables hold integers as bigint, and the database answers readiness.

mod common;

use common::postgres::Postgres;
use gateway::store::postgres::{PgStore, MIGRATIONS};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_opening_one_database_together_migrate_it_once() {
    let pg = Postgres::shared();
    let url = pg.database().await;
    // eight nodes at once: the advisory lock lets one migrate, the others find it done
    let opens: Vec<_> = (0..8)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { PgStore::open(&url, 2).await })
        })
        .collect();
    let mut stores = Vec::new();
    for o in opens {
        stores.push(o.await.unwrap().expect("the store opens"));
    }
    let want: Vec<i32> = MIGRATIONS.iter().map(|m| m.0).collect();
    for s in &stores {
        s.ready().await.unwrap();
        assert_eq!(s.migrated().await.unwrap(), want);
    }
    let db = url.rsplit('/').next().unwrap();
    let c = pg.connect(db).await;
    let rows = c
        .query("SELECT count(*) FROM tollgate_migrations", &[])
        .await
        .unwrap();
    assert_eq!(rows[0].get::<_, i64>(0), MIGRATIONS.len() as i64);
    // the same tables as SQLite's, and every amount and time a bigint
    let tables: Vec<String> = c
        .query(
            "SELECT table_name::text FROM information_schema.tables \
             WHERE table_schema = 'public' ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    for t in [
        "access_daily",
        "access_logs",
        "licenses",
        "payment_history",
        "plans",
        "refused_minutes",
        "stripe_events",
        "stripe_refunds",
        "usage_alerts",
        "usage_daily",
        "usage_history",
        "usage_sessions",
    ] {
        assert!(tables.iter().any(|x| x == t), "no table {t}: {tables:?}");
    }
    let odd: Vec<String> = c
        .query(
            "SELECT table_name || '.' || column_name || ' ' || data_type \
             FROM information_schema.columns WHERE table_schema = 'public' \
             AND (column_name LIKE '%\\_ms' OR column_name LIKE '%\\_at' \
                  OR column_name LIKE '%cents' OR column_name LIKE 'bytes%') \
             AND data_type <> 'bigint'",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(odd.is_empty(), "not bigint: {odd:?}");
    // a node opening it later applies nothing
    let later = PgStore::open(&url, 1).await.unwrap();
    assert_eq!(later.migrated().await.unwrap(), want);
    assert!(later.describe().starts_with("PostgreSQL at 127.0.0.1:"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_that_is_down_is_not_ready_and_is_again_once_it_is_back() {
    let pg = Postgres::start();
    let url = pg.database().await;
    let store = PgStore::open(&url, 2).await.unwrap();
    store.ready().await.unwrap();
    pg.pause();
    assert!(
        store.ready().await.is_err(),
        "ready while the database is down"
    );
    pg.resume();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while store.ready().await.is_err() {
        assert!(std::time::Instant::now() < deadline, "{}", pg.log());
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

mod flush {
    use std::net::{IpAddr, Ipv4Addr};
    use std::sync::Arc;

    use gateway::records::{AccessLog, Applied, Charge, SessionRecord, Usage};
    use gateway::store::sqlite::SqliteStore;
    use gateway::store::{FlushBatch, MeterStore};
    use http::{HeaderValue, Method};

    use super::*;

    pub(super) const NOW: i64 = 1_795_000_000_000;

    /// Licenses 1..=3 with 10 h each, the same rows in both databases.
    pub(super) const LICENSES: &str =
        "INSERT INTO licenses (id, key_hash, key_prefix, name, plan, status,
        balance_ms, used_ms, requests_total, version, created_at, updated_at) VALUES
        (1, X'0100000000000000000000000000000000000000000000000000000000000000', 'tg_a', 'a', 'free', 'active', 36000000, 0, 0, 1, 1, 1),
        (2, X'0200000000000000000000000000000000000000000000000000000000000000', 'tg_b', 'b', 'free', 'active', 36000000, 0, 0, 1, 1, 1),
        (3, X'0300000000000000000000000000000000000000000000000000000000000000', 'tg_c', 'c', 'free', 'active', 36000000, 0, 0, 1, 1, 1)";

    fn session(id: &str, license_id: i64, ended: Option<i64>, ms: i64, req: i64) -> SessionRecord {
        SessionRecord {
            id: Arc::from(id),
            license_id,
            started_at: NOW - 60_000,
            last_activity_at: NOW - 1_000,
            ended_at: ended,
            charged_ms: ms,
            requests: req,
            bytes_in: 10 * req,
            bytes_out: 100 * req,
        }
    }

    fn log(i: i64, license_id: Option<i64>, guest: bool) -> AccessLog {
        AccessLog {
            summary_only: false,
            key_id: None,
            ts_ms: NOW - 500 + i,
            license_id,
            session_id: license_id.map(|_| HeaderValue::from_static("s-1")),
            method: if i % 2 == 0 {
                Method::GET
            } else {
                Method::POST
            },
            path: format!("/api/{}", i % 3).into(),
            status: if i % 5 == 0 { 502 } else { 200 },
            outcome: if i % 5 == 0 { "upstream_error" } else { "ok" },
            duration_us: (i as u64 % 7) * 3_000,
            bytes_in: 12,
            bytes_out: 3_400,
            client_ip: Some(IpAddr::V4(Ipv4Addr::new(10, 0, 0, (i % 4) as u8))),
            user_agent: (i % 2 == 0).then(|| "curl/8".into()),
            guest_id: guest.then(|| Arc::from("10.0.0.9")),
            route: None,
            units: None,
        }
    }

    /// A batch with every case the commit handles: usage with time given back, a charge with
    /// only sessions, an ended session that charged nothing, a deleted license's charge, and
    /// log rows of licenses, of a guest and of a refusal without a key.
    pub(super) fn batch() -> FlushBatch {
        let charges = vec![
            Charge {
                license_id: 1,
                usage: Usage {
                    charge_ms: 61_000,
                    requests: 7,
                    session_ms: 61_000,
                    bytes_in: 70,
                    bytes_out: 700,
                    returned_ms: 2_500,
                    ..Usage::default()
                },
                sessions: vec![
                    session("s-1", 1, Some(NOW - 1_000), 61_000, 7),
                    session("s-2", 1, None, 0, 1),
                ],
                period_start: None,
                included_ms: None,
                includes: None,
            },
            Charge {
                license_id: 2,
                usage: Usage::default(),
                sessions: vec![session("s-3", 2, Some(NOW - 2_000), 0, 0)],
                period_start: None,
                included_ms: None,
                includes: None,
            },
            Charge {
                license_id: 3,
                usage: Usage {
                    charge_ms: 1_234,
                    requests: 2,
                    bytes_in: 5_000_000,
                    ..Usage::default()
                },
                sessions: vec![session("s-4", 3, None, 1_234, 2)],
                period_start: None,
                included_ms: None,
                includes: None,
            },
            Charge {
                license_id: 99,
                usage: Usage {
                    charge_ms: 5_000,
                    requests: 1,
                    ..Usage::default()
                },
                sessions: vec![session("s-9", 99, None, 5_000, 1)],
                period_start: None,
                included_ms: None,
                includes: None,
            },
        ];
        let mut logs = Vec::new();
        for i in 0..40 {
            let license = match i % 4 {
                0 => Some(1),
                1 => Some(3),
                2 => None,
                _ => Some(1),
            };
            logs.push(log(i, license, i % 8 == 2));
        }
        FlushBatch {
            charges,
            logs,
            now: NOW,
            process: None,
            seq: 0,
            session_gap_ms: None,
            meters: Default::default(),
        }
    }

    /// Every table the flush writes, as rows of text, in a stable order.
    const TABLES: [(&str, &str); 6] = [
        (
            "licenses",
            "SELECT id, balance_ms, used_ms, requests_total, version, last_used_at \
             FROM licenses ORDER BY id",
        ),
        (
            "usage_history",
            "SELECT license_id, kind, delta_ms, balance_before_ms, balance_after_ms, requests, \
             reason, created_at FROM usage_history ORDER BY id",
        ),
        (
            "usage_sessions",
            "SELECT id, license_id, started_at, last_activity_at, ended_at, charged_ms, \
             requests, bytes_in, bytes_out FROM usage_sessions ORDER BY id",
        ),
        (
            "usage_daily",
            "SELECT license_id, day, charged_ms, requests, bytes_in FROM usage_daily \
             ORDER BY license_id, day",
        ),
        (
            "access_daily",
            "SELECT license_id, day, path, calls, ok, duration_us, bytes_in, bytes_out, h0, h1, \
             h2, h3, h4, h5, h6, h7, h8, h9, h10, h11, h12, h13 FROM access_daily \
             ORDER BY license_id, day, path",
        ),
        (
            "access_logs",
            "SELECT ts, license_id, session_id, method, path, status, outcome, duration_us, \
             bytes_in, bytes_out, client_ip, user_agent, guest_id FROM access_logs ORDER BY id",
        ),
    ];

    pub(super) fn sqlite_rows(c: &rusqlite::Connection, sql: &str) -> Vec<String> {
        let mut st = c.prepare(sql).unwrap();
        let n = st.column_count();
        st.query_map([], |r| {
            let cells: Vec<String> = (0..n)
                .map(|i| match r.get_ref(i).unwrap() {
                    rusqlite::types::ValueRef::Null => "null".into(),
                    rusqlite::types::ValueRef::Integer(v) => v.to_string(),
                    rusqlite::types::ValueRef::Text(t) => String::from_utf8_lossy(t).into(),
                    other => format!("{other:?}"),
                })
                .collect();
            Ok(cells.join("|"))
        })
        .unwrap()
        .map(Result::unwrap)
        .collect()
    }

    pub(super) async fn pg_rows(c: &tokio_postgres::Client, sql: &str) -> Vec<String> {
        // every column as text, so both sides print alike
        let rows = c.simple_query(sql).await.unwrap();
        rows.iter()
            .filter_map(|m| match m {
                tokio_postgres::SimpleQueryMessage::Row(r) => Some(
                    (0..r.len())
                        .map(|i| r.get(i).unwrap_or("null").to_string())
                        .collect::<Vec<_>>()
                        .join("|"),
                ),
                _ => None,
            })
            .collect()
    }

    /// The same batch committed on SQLite and on PostgreSQL leaves the same rows in every
    /// table, and the commit reports the same: which charges were deducted (with the rows as
    /// the deduction left them), which were only written, which were set aside.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_flush_writes_the_same_rows_on_postgres_as_on_sqlite() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let sqlite = SqliteStore::open(&path).unwrap();
        rusqlite::Connection::open(&path)
            .unwrap()
            .execute_batch(LICENSES)
            .unwrap();
        let pg = Postgres::shared();
        let url = pg.database().await;
        let store = PgStore::open(&url, 2).await.unwrap();
        let db = url.rsplit('/').next().unwrap();
        let c = pg.connect(db).await;
        c.batch_execute(&LICENSES.replace("X'0", "'\\x0"))
            .await
            .unwrap();

        let mut b = batch();
        let on_sqlite = sqlite.commit_flush(&mut b).await.unwrap();
        let on_pg = store.commit_flush(&batch()).await.unwrap();
        assert_eq!(on_pg.applied, on_sqlite.applied);
        assert_eq!(on_pg.written, on_sqlite.written);
        assert!(
            matches!(on_pg.applied[0], Applied::Deducted(ref s, _) if s.balance_ms == 36_000_000 - 61_000)
        );
        assert_eq!(on_pg.applied[1], Applied::Written);
        assert_eq!(on_pg.applied[3], Applied::Orphaned);
        assert_eq!(on_pg.written.access_logs, 40);

        // twice: the second flush adds to the rollups and the balances (relative updates)
        let mut again = batch();
        again.charges.truncate(1);
        let mut on_sqlite_again = FlushBatch {
            charges: again.charges.clone(),
            logs: again.logs.clone(),
            now: NOW,
            process: None,
            seq: 0,
            session_gap_ms: None,
            meters: Default::default(),
        };
        sqlite.commit_flush(&mut on_sqlite_again).await.unwrap();
        store.commit_flush(&again).await.unwrap();

        // a minute of steady use is one history row (issue 30, item 10): license 3's next
        // flushes join the row its first opened until a minute has passed, then open the next
        for (at, ms) in [(NOW + 1_000, 100), (NOW + 59_999, 200), (NOW + 60_000, 300)] {
            let mut charge = batch().charges[2].clone();
            charge.sessions.clear(); // (a session still running would keep the row open)
            charge.usage = Usage {
                charge_ms: ms,
                requests: 1,
                ..Usage::default()
            };
            let next = || FlushBatch {
                charges: vec![charge.clone()],
                logs: Vec::new(),
                now: at,
                process: None,
                seq: 0,
                session_gap_ms: None,
                meters: Default::default(),
            };
            sqlite.commit_flush(&mut next()).await.unwrap();
            store.commit_flush(&next()).await.unwrap();
        }

        let lite = rusqlite::Connection::open(&path).unwrap();
        let rows: Vec<(i64, i64, i64, i64)> = lite
            .prepare(
                "SELECT delta_ms, balance_before_ms, balance_after_ms, requests FROM usage_history
                 WHERE license_id = 3 ORDER BY id",
            )
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(
            rows,
            vec![
                (-1_534, 36_000_000, 35_998_466, 4),
                (-300, 35_998_466, 35_998_166, 1)
            ],
            "one row for the minute, its balances chained to the next"
        );
        for (table, sql) in TABLES {
            let want = sqlite_rows(&lite, sql);
            let got = pg_rows(&c, sql).await;
            assert!(!want.is_empty(), "{table} is empty on SQLite");
            assert_eq!(got, want, "{table}");
        }
    }

    /// A plan that includes 10 s a period, charged by flushes of several nodes around a
    /// boundary: each charge is split against the use of the period it was made in, and a
    /// batch made before the boundary but committed after another node began the next period
    /// takes from the old period, not the new one's allowance.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn included_time_is_split_against_the_period_each_flush_was_made_in() {
        const INCLUDED: i64 = 10_000;
        let pg = Postgres::shared();
        let url = pg.database().await;
        let store = PgStore::open(&url, 2).await.unwrap();
        let c = pg.connect(url.rsplit('/').next().unwrap()).await;
        c.batch_execute(&LICENSES.replace("X'0", "'\\x0"))
            .await
            .unwrap();
        let (p1, p2) = (NOW - 100_000, NOW);
        let charge = |ms: i64, start: i64, made: i64| FlushBatch {
            charges: vec![Charge {
                license_id: 1,
                usage: Usage {
                    charge_ms: ms,
                    requests: 1,
                    ..Usage::default()
                },
                sessions: Vec::new(),
                period_start: Some(start),
                included_ms: Some(INCLUDED),
                includes: None,
            }],
            logs: Vec::new(),
            now: made,
            process: None,
            seq: 0,
            session_gap_ms: None,
            meters: Default::default(),
        };
        // in the first period, 8 s, from the allowance
        store
            .commit_flush(&charge(8_000, p1, p1 + 50_000))
            .await
            .unwrap();
        // another node, in the next period: 1 s of its whole allowance (the row moves to it)
        store
            .commit_flush(&charge(1_000, p2, p2 + 1_000))
            .await
            .unwrap();
        // a batch made before the boundary, committed after: 2 s of the first period's
        // allowance were left, the other 2 s from the balance
        let late = store
            .commit_flush(&charge(4_000, p1, p2 - 10))
            .await
            .unwrap();
        assert!(
            matches!(late.applied[0], Applied::Deducted(ref s, 2_000) if s.balance_ms == 36_000_000 - 2_000),
            "{:?}",
            late.applied
        );
        let one = |sql: &'static str| {
            let c = &c;
            async move { c.query_one(sql, &[]).await.unwrap().get::<_, i64>(0) }
        };
        assert_eq!(
            one("SELECT sum(included_ms)::bigint FROM usage_history WHERE license_id = 1").await,
            8_000 + 1_000 + 2_000
        );
        assert_eq!(
            one("SELECT period_used_ms FROM licenses WHERE id = 1").await,
            1_000,
            "the next period counts only its own"
        );
        assert_eq!(
            one("SELECT balance_ms FROM licenses WHERE id = 1").await,
            one("SELECT 36000000 + sum(delta_ms)::bigint FROM usage_history WHERE license_id = 1")
                .await
        );
    }
}

/// The rest of what the proxy and the flusher ask of the store (`MeterStore`), on both
/// backends: the same answers after the same calls.
mod meter {
    use std::net::{IpAddr, Ipv4Addr};

    use gateway::keys::KeyHash;
    use gateway::periods::Calendar;
    use gateway::records::{AlertEvent, AlertKind, RefusedCount};
    use gateway::store::sqlite::SqliteStore;
    use gateway::store::MeterStore;

    use super::flush::{batch, pg_rows, sqlite_rows, LICENSES, NOW};
    use super::*;

    /// A top-up of license 1, for the balance alerts' base.
    const TOPUP: &str = "INSERT INTO usage_history (license_id, kind, delta_ms,
        balance_before_ms, balance_after_ms, requests, reason, created_at)
        VALUES (1, 'credit', 36000000, 0, 36000000, 0, 'bought', 1000)";

    fn alerts() -> Vec<AlertEvent> {
        [
            (1, AlertKind::Balance, 80),
            (1, AlertKind::PeriodRequests, 100),
            (3, AlertKind::PeriodTime, 80),
        ]
        .into_iter()
        .map(|(license_id, kind, threshold)| AlertEvent {
            license_id,
            kind,
            threshold,
            period_start: NOW - 86_400_000,
            used: 80,
            allowance: 100,
            at: NOW,
        })
        .collect()
    }

    fn refused() -> Vec<RefusedCount> {
        let ip = Some(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7)));
        vec![
            RefusedCount {
                minute: NOW - 60_000,
                reason: "invalid_license_key",
                client_ip: ip,
                requests: 3,
            },
            RefusedCount {
                minute: NOW - 60_000,
                reason: "invalid_license_key",
                client_ip: ip,
                requests: 2,
            },
            RefusedCount {
                minute: NOW,
                reason: "missing_license_key",
                client_ip: None,
                requests: 1,
            },
        ]
    }

    // one thread: the reads made together below all wait for one batch task, and go in it
    #[tokio::test]
    async fn admission_polls_alerts_refusals_and_retention_answer_alike_on_both_backends() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let lite = SqliteStore::open(&path).unwrap();
        let lite_db = rusqlite::Connection::open(&path).unwrap();
        lite_db.execute_batch(LICENSES).unwrap();
        lite_db.execute_batch(TOPUP).unwrap();
        let server = Postgres::shared();
        let url = server.database().await;
        let pg = PgStore::open(&url, 3).await.unwrap();
        let c = server.connect(url.rsplit('/').next().unwrap()).await;
        c.batch_execute(&LICENSES.replace("X'0", "'\\x0"))
            .await
            .unwrap();
        c.batch_execute(TOPUP).await.unwrap();
        lite.commit_flush(&mut batch()).await.unwrap();
        MeterStore::commit_flush(&pg, &mut batch()).await.unwrap();

        let calendar = Calendar::utc();
        let mut one = [0u8; 32];
        one[0] = 1;
        for key in [KeyHash(one), KeyHash([7; 32])] {
            let want = lite.admission_state(key, &calendar, NOW).await.unwrap();
            let got = pg.admission_state(key, &calendar, NOW).await.unwrap();
            assert_eq!(got, want);
            assert_eq!(
                pg.license_state(key).await.unwrap(),
                lite.license_state(key).await.unwrap()
            );
        }
        assert!(pg
            .admission_state(KeyHash([7; 32]), &calendar, NOW)
            .await
            .unwrap()
            .is_none());
        // read together, as a node meeting many keys at once reads them (in batches): each
        // read gets its own key's answer, unknown keys and repeats among them
        let keys: Vec<KeyHash> = [9u8, 3, 1, 9, 2, 1, 3, 8]
            .iter()
            .map(|&b| {
                let mut h = [0u8; 32];
                h[0] = b;
                KeyHash(h)
            })
            .collect();
        let together = futures_util::future::join_all(
            keys.iter()
                .map(|&key| pg.admission_state(key, &calendar, NOW)),
        )
        .await;
        for (key, got) in keys.iter().zip(together) {
            let want = lite.admission_state(*key, &calendar, NOW).await.unwrap();
            assert_eq!(got.unwrap(), want, "key {}", key.0[0]);
        }
        assert_eq!(
            pg.changed_since(0).await.unwrap(),
            lite.changed_since(0).await.unwrap()
        );

        // a threshold is recorded once per period, whatever the backend
        let first = pg.record_alerts(alerts()).await.unwrap();
        assert_eq!(first, lite.record_alerts(alerts()).await.unwrap());
        assert_eq!(first.len(), 3);
        assert!(pg.record_alerts(alerts()).await.unwrap().is_empty());
        pg.alert_attempted(first[0].id, None, NOW + 5)
            .await
            .unwrap();
        lite.alert_attempted(first[0].id, None, NOW + 5)
            .await
            .unwrap();
        pg.alert_attempted(first[1].id, Some("503".into()), NOW + 5)
            .await
            .unwrap();
        lite.alert_attempted(first[1].id, Some("503".into()), NOW + 5)
            .await
            .unwrap();
        let undelivered = pg.undelivered_alerts(0).await.unwrap();
        assert_eq!(undelivered, lite.undelivered_alerts(0).await.unwrap());
        assert_eq!(undelivered.len(), 2);

        pg.record_refused(refused()).await.unwrap();
        lite.record_refused(refused()).await.unwrap();
        pg.record_refused(refused()).await.unwrap();
        lite.record_refused(refused()).await.unwrap();

        // retention: rows before the cut go, the rollups keep their totals
        let cut = NOW - 480;
        assert_eq!(
            pg.prune_access_logs(cut).await.unwrap(),
            lite.prune_access_logs(cut).await.unwrap()
        );
        for sql in [
            "SELECT minute, reason, client_ip, requests FROM refused_minutes \
             ORDER BY minute, reason, client_ip",
            "SELECT ts, license_id, path FROM access_logs ORDER BY id",
            "SELECT id, attempts, delivered_at, last_error FROM usage_alerts ORDER BY id",
        ] {
            let want = sqlite_rows(&lite_db, sql);
            assert!(!want.is_empty(), "{sql}");
            assert_eq!(pg_rows(&c, sql).await, want, "{sql}");
        }
        // the net charge: the gross less the time given back
        let lite_usage = gateway::store::LicenseStore::period_usage(&lite, 1, 0)
            .await
            .unwrap();
        assert_eq!(lite_usage, (61_000, 7));
        assert_eq!(pg.period_usage(1, 0).await.unwrap(), lite_usage);
        assert_eq!(pg.close_stale_sessions(NOW).await.unwrap(), 2);
    }
}

/// Payments on PostgreSQL: the same outcomes and rows as on SQLite for one story of payments and
/// refunds, and exactly one credit (and one debit) when deliveries race on different
/// connections under READ COMMITTED.
mod payments {
    use std::sync::Arc;

    use gateway::store::sqlite::SqliteStore;
    use gateway::store::{
        EventAction, EventOutcome, Fulfilment, NewPayment, PaidSession, PaymentStore, Refund,
    };

    use super::flush::{pg_rows, sqlite_rows, LICENSES, NOW};
    use super::*;

    const HOUR: i64 = 3_600_000;

    fn pending(session: &str, license_id: i64) -> NewPayment {
        NewPayment {
            license_id,
            session_id: session.into(),
            package_id: Some("small".into()),
            hours_ms: 5 * HOUR,
            amount_cents: 2_500,
            currency: "usd".into(),
        }
    }

    fn paid(session: &str, intent: &str, cents: i64) -> PaidSession {
        PaidSession {
            session_id: session.into(),
            payment_intent: Some(intent.into()),
            license_id: Some(2),
            hours_ms: Some(5 * HOUR),
            package_id: Some("small".into()),
            amount_cents: cents,
            currency: "usd".into(),
            priced: Some((2_500, "usd".into())),
        }
    }

    fn refund(intent: &str, total: i64) -> EventAction {
        EventAction::Refund(Refund {
            payment_intent: intent.into(),
            amount_refunded_cents: total,
        })
    }

    /// One story, told to a backend: what each step answered.
    macro_rules! story {
        ($s:expr) => {{
            let s = $s;
            let mut said: Vec<String> = Vec::new();
            let fulfilled = |f: &Fulfilment| match f {
                Fulfilment::Credited { credited_ms, .. } => format!("credited {credited_ms}"),
                Fulfilment::AlreadyPaid(_) => "already_paid".into(),
                Fulfilment::NotOurs => "not_ours".into(),
            };
            let outcome = |o: &EventOutcome| match o {
                EventOutcome::Fulfilled(f) => fulfilled(f),
                o => o.label().to_string(),
            };
            let p = s.record_pending(pending("cs_a", 1), NOW).await.unwrap();
            said.push(format!("pending {} {}", p.id, p.status));
            s.record_pending(pending("cs_a", 1), NOW + 1).await.unwrap();
            s.record_pending(pending("cs_c", 3), NOW + 2).await.unwrap();
            // the success page, then the webhook of the same session
            said.push(fulfilled(
                &s.fulfil(paid("cs_a", "pi_a", 2_500), NOW + 3)
                    .await
                    .unwrap(),
            ));
            let e = EventAction::Fulfil(paid("cs_a", "pi_a", 2_500));
            said.push(outcome(
                &s.apply_event(
                    "evt_1".into(),
                    "checkout.session.completed".into(),
                    e,
                    NOW + 4,
                )
                .await
                .unwrap(),
            ));
            // a session without its pending row, recorded from its metadata; then redelivered
            for at in [5, 6] {
                let e = EventAction::Fulfil(paid("cs_b", "pi_b", 2_000));
                said.push(outcome(
                    &s.apply_event(
                        "evt_2".into(),
                        "checkout.session.completed".into(),
                        e,
                        NOW + at,
                    )
                    .await
                    .unwrap(),
                ));
            }
            // a refund before its payment completes is held, then taken from the credit
            said.push(outcome(
                &s.apply_event(
                    "evt_3".into(),
                    "charge.refunded".into(),
                    refund("pi_c", 500),
                    NOW + 7,
                )
                .await
                .unwrap(),
            ));
            let e = EventAction::Fulfil(paid("cs_c", "pi_c", 2_500));
            said.push(outcome(
                &s.apply_event(
                    "evt_4".into(),
                    "checkout.session.completed".into(),
                    e,
                    NOW + 8,
                )
                .await
                .unwrap(),
            ));
            // partial refunds by running total, out of order, then in full
            for (id, total) in [("evt_5", 1_000), ("evt_6", 400), ("evt_7", 2_500)] {
                said.push(outcome(
                    &s.apply_event(
                        id.into(),
                        "charge.refunded".into(),
                        refund("pi_a", total),
                        NOW + 9,
                    )
                    .await
                    .unwrap(),
                ));
            }
            said
        }};
    }

    const TABLES: [&str; 5] = [
        // not the id: PostgreSQL spends one on an insert that conflicts (a replayed pending
        // row), so ids may have gaps there; the order is the same
        "SELECT license_id, stripe_session_id, payment_intent, status, hours_ms, \
         amount_cents, refunded_cents, refunded_ms, paid_cents, credited_ms, mismatch \
         FROM payment_history ORDER BY id",
        "SELECT license_id, kind, delta_ms, balance_before_ms, balance_after_ms, reason \
         FROM usage_history ORDER BY id",
        "SELECT id, balance_ms, version FROM licenses ORDER BY id",
        "SELECT id, type, result FROM stripe_events ORDER BY id",
        "SELECT payment_intent, amount_refunded_cents FROM stripe_refunds ORDER BY 1",
    ];

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn payments_and_refunds_come_out_alike_on_both_backends() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let lite = SqliteStore::open(&path).unwrap();
        let lite_db = rusqlite::Connection::open(&path).unwrap();
        lite_db.execute_batch(LICENSES).unwrap();
        let server = Postgres::shared();
        let url = server.database().await;
        let pg = PgStore::open(&url, 3).await.unwrap();
        let c = server.connect(url.rsplit('/').next().unwrap()).await;
        c.batch_execute(&LICENSES.replace("X'0", "'\\x0"))
            .await
            .unwrap();

        let on_sqlite = story!(&lite);
        let on_pg = story!(&pg);
        assert_eq!(on_pg, on_sqlite);
        assert_eq!(
            on_pg[1..],
            [
                "credited 18000000",
                "already_paid",
                "credited 14400000",
                "duplicate",
                "refund_held",
                "credited 14400000",
                "refunded",
                "refund_noop",
                "refunded",
            ]
        );
        for sql in TABLES {
            let want = sqlite_rows(&lite_db, sql);
            assert!(!want.is_empty(), "{sql}");
            assert_eq!(pg_rows(&c, sql).await, want, "{sql}");
        }
    }

    /// 50 deliveries of one event and 20 success pages of its session, all at once on up to 16
    /// connections, then 10 refund events of one charge at once: one credit, one debit.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn racing_deliveries_on_different_connections_credit_once_and_debit_once() {
        let server = Postgres::shared();
        let url = server.database().await;
        let pg = Arc::new(PgStore::open(&url, 16).await.unwrap());
        let c = server.connect(url.rsplit('/').next().unwrap()).await;
        c.batch_execute(&LICENSES.replace("X'0", "'\\x0"))
            .await
            .unwrap();
        pg.record_pending(pending("cs_r", 1), NOW).await.unwrap();

        let mut tasks = Vec::new();
        for i in 0..70 {
            let pg = pg.clone();
            tasks.push(tokio::spawn(async move {
                let p = paid("cs_r", "pi_r", 2_500);
                if i < 50 {
                    let e = EventAction::Fulfil(p);
                    match pg
                        .apply_event("evt_r".into(), "checkout.session.completed".into(), e, NOW)
                        .await
                        .unwrap()
                    {
                        EventOutcome::Fulfilled(Fulfilment::Credited { .. }) => 1,
                        _ => 0,
                    }
                } else {
                    match pg.fulfil(p, NOW).await.unwrap() {
                        Fulfilment::Credited { .. } => 1,
                        _ => 0,
                    }
                }
            }));
        }
        let mut credits = 0;
        for t in tasks {
            credits += t.await.unwrap();
        }
        assert_eq!(credits, 1, "credited once");
        let one = |sql: &'static str| {
            let c = &c;
            async move { c.query_one(sql, &[]).await.unwrap().get::<_, i64>(0) }
        };
        assert_eq!(
            one("SELECT balance_ms FROM licenses WHERE id = 1").await,
            36_000_000 + 5 * HOUR
        );
        assert_eq!(
            one("SELECT count(*) FROM usage_history WHERE kind = 'purchase'").await,
            1
        );
        assert_eq!(one("SELECT count(*) FROM stripe_events").await, 1);

        let mut tasks = Vec::new();
        for i in 0..10 {
            let pg = pg.clone();
            tasks.push(tokio::spawn(async move {
                let id = format!("evt_refund_{i}");
                match pg
                    .apply_event(id, "charge.refunded".into(), refund("pi_r", 1_250), NOW)
                    .await
                    .unwrap()
                {
                    EventOutcome::Refunded(gateway::store::Refunded::Debited {
                        debited_ms,
                        ..
                    }) => debited_ms,
                    _ => 0,
                }
            }));
        }
        let mut debited = 0;
        for t in tasks {
            debited += t.await.unwrap();
        }
        assert_eq!(debited, 5 * HOUR / 2, "half the hours taken back, once");
        assert_eq!(
            one("SELECT balance_ms FROM licenses WHERE id = 1").await,
            36_000_000 + 5 * HOUR / 2
        );
        assert_eq!(
            one("SELECT count(*) FROM usage_history WHERE kind = 'refund'").await,
            1
        );
    }
}

/// A refund delivered while its payment's completion commits, 30 times over, each pair at once
/// on two connections: whichever commits first, the customer keeps exactly the unrefunded half.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refund_racing_its_payment_s_completion_is_taken_exactly_once() {
    use gateway::store::{EventAction, EventOutcome, NewPayment, PaidSession, Refund};
    use std::sync::Arc;
    const HOUR: i64 = 3_600_000;
    let server = Postgres::shared();
    let url = server.database().await;
    let pg = Arc::new(PgStore::open(&url, 8).await.unwrap());
    let c = server.connect(url.rsplit('/').next().unwrap()).await;
    c.batch_execute(&flush::LICENSES.replace("X'0", "'\\x0"))
        .await
        .unwrap();
    for i in 0..30 {
        let session = format!("cs_{i}");
        let intent = format!("pi_{i}");
        pg.record_pending(
            NewPayment {
                license_id: 1,
                session_id: session.clone(),
                package_id: None,
                hours_ms: 4 * HOUR,
                amount_cents: 2_000,
                currency: "usd".into(),
            },
            flush::NOW,
        )
        .await
        .unwrap();
        let paid = PaidSession {
            session_id: session.clone(),
            payment_intent: Some(intent.clone()),
            license_id: Some(1),
            hours_ms: Some(4 * HOUR),
            package_id: None,
            amount_cents: 2_000,
            currency: "usd".into(),
            priced: None,
        };
        let (a, b) = (pg.clone(), pg.clone());
        let fulfil = tokio::spawn(async move {
            let e = EventAction::Fulfil(paid);
            a.apply_event(
                format!("evt_pay_{i}"),
                "checkout.session.completed".into(),
                e,
                flush::NOW,
            )
            .await
            .unwrap()
        });
        let refund = tokio::spawn(async move {
            let e = EventAction::Refund(Refund {
                payment_intent: intent,
                amount_refunded_cents: 1_000,
            });
            b.apply_event(
                format!("evt_ref_{i}"),
                "charge.refunded".into(),
                e,
                flush::NOW,
            )
            .await
            .unwrap()
        });
        let (f, r) = (fulfil.await.unwrap(), refund.await.unwrap());
        assert!(matches!(f, EventOutcome::Fulfilled(_)), "{f:?}");
        assert!(matches!(r, EventOutcome::Refunded(_)), "{r:?}");
        let row = c
            .query_one(
                "SELECT refunded_ms, credited_ms FROM payment_history WHERE stripe_session_id = $1",
                &[&session],
            )
            .await
            .unwrap();
        assert_eq!(
            (row.get::<_, i64>(0), row.get::<_, i64>(1)),
            (2 * HOUR, 4 * HOUR),
            "round {i}: {f:?} / {r:?}"
        );
    }
    // every round left the customer two of its four hours
    let balance: i64 = c
        .query_one("SELECT balance_ms FROM licenses WHERE id = 1", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(balance, 36_000_000 + 30 * 2 * HOUR);
}

/// The interleaving the race above can hit, made to happen: a refund is in flight (its total
/// written, not committed) when the completion of its payment claims the row. The completion
/// waits for the refund to commit and then credits only the unrefunded half; without the
/// intent's lock it read the total before the refund committed and credited all of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completion_waits_for_a_refund_in_flight_and_credits_only_what_it_leaves() {
    use gateway::store::{NewPayment, PaidSession};
    use std::sync::Arc;
    use std::time::Duration;
    const HOUR: i64 = 3_600_000;
    let server = Postgres::shared();
    let url = server.database().await;
    let db = url.rsplit('/').next().unwrap().to_string();
    let pg = Arc::new(PgStore::open(&url, 4).await.unwrap());
    let c = server.connect(&db).await;
    c.batch_execute(&flush::LICENSES.replace("X'0", "'\\x0"))
        .await
        .unwrap();
    pg.record_pending(
        NewPayment {
            license_id: 1,
            session_id: "cs_w".into(),
            package_id: None,
            hours_ms: 4 * HOUR,
            amount_cents: 2_000,
            currency: "usd".into(),
        },
        flush::NOW,
    )
    .await
    .unwrap();
    // the refund in flight, as refund_in begins it
    let mut refund = server.connect(&db).await;
    let tx = refund.transaction().await.unwrap();
    tx.execute("SELECT pg_advisory_xact_lock(2, hashtext('pi_w'))", &[])
        .await
        .unwrap();
    tx.execute(
        "INSERT INTO stripe_refunds (payment_intent, amount_refunded_cents, received_at,
             updated_at) VALUES ('pi_w', 1000, 1, 1)",
        &[],
    )
    .await
    .unwrap();
    let store = pg.clone();
    let completion = tokio::spawn(async move {
        let paid = PaidSession {
            session_id: "cs_w".into(),
            payment_intent: Some("pi_w".into()),
            license_id: Some(1),
            hours_ms: Some(4 * HOUR),
            package_id: None,
            amount_cents: 2_000,
            currency: "usd".into(),
            priced: None,
        };
        store.fulfil(paid, flush::NOW).await.unwrap()
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !completion.is_finished(),
        "the completion waits for the refund in flight"
    );
    // the refund finds no paid payment yet (it is held), and commits
    let paid_rows = tx
        .query(
            "SELECT 1 FROM payment_history WHERE payment_intent = 'pi_w' AND status <> 'pending'",
            &[],
        )
        .await
        .unwrap();
    assert!(paid_rows.is_empty());
    tx.commit().await.unwrap();
    completion.await.unwrap();
    let row = c
        .query_one(
            "SELECT refunded_ms, credited_ms, status FROM payment_history
             WHERE stripe_session_id = 'cs_w'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, i64>(0), 2 * HOUR, "the refunded half");
    assert_eq!(row.get::<_, String>(2), "partially_refunded");
    let balance: i64 = c
        .query_one("SELECT balance_ms FROM licenses WHERE id = 1", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(balance, 36_000_000 + 2 * HOUR);
}

/// The operator's changes to licenses on both backends: the same rows and the same answers,
/// errors included; a rotated key finds its license and the old one nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn license_changes_come_out_alike_on_both_backends() {
    use gateway::license::LicenseStatus;
    use gateway::store::sqlite::SqliteStore;
    use gateway::store::{Adjustment, LicensePatch, LicenseStore, NewLicense, StoreError};

    macro_rules! story {
        ($s:expr) => {{
            let s = $s;
            let t = flush::NOW;
            let mut said: Vec<String> = Vec::new();
            let new = |name: &str, ms: i64| NewLicense {
                name: name.into(),
                email: Some(format!("{name}@example.com")),
                plan: "free".into(),
                balance_ms: ms,
                ..NewLicense::default()
            };
            let (ada, _) = s.create_license(new(" Ada ", 7_200_000), t).await.unwrap();
            let (bob, _) = s.create_license(new("Bob", 0), t + 1).await.unwrap();
            let e = s.create_license(new("  ", 0), t).await.unwrap_err();
            said.push(format!("{e}"));
            let l = s
                .adjust_balance(
                    ada.id,
                    Adjustment::Credit,
                    5_400_000,
                    Some("goodwill".into()),
                    t + 2,
                )
                .await
                .unwrap();
            said.push(format!("{} {}", l.balance_ms, l.version));
            let l = s
                .adjust_balance(ada.id, Adjustment::Debit, 900_000, None, t + 3)
                .await
                .unwrap();
            said.push(format!("{} {}", l.balance_ms, l.version));
            let patch = LicensePatch {
                plan: Some("pro".into()),
                email: Some(None),
                company: Some(Some("Engines".into())),
                expires_at: Some(Some(t + 86_400_000)),
                ..LicensePatch::default()
            };
            let l = s.update_license(ada.id, patch, t + 4).await.unwrap();
            said.push(format!(
                "{} {:?} {:?} {:?}",
                l.plan, l.email, l.company, l.expires_at
            ));
            let l = s.revoke(bob.id, t + 5).await.unwrap();
            said.push(format!("{:?} {}", l.status, l.version));
            let back = LicensePatch {
                status: Some(LicenseStatus::Active),
                ..LicensePatch::default()
            };
            said.push(format!(
                "{:?}",
                s.update_license(bob.id, back, t + 6).await.unwrap().status
            ));
            let (before, _) = (s.license(ada.id).await.unwrap(), ());
            let (l, key) = s.rotate(ada.id, t + 7).await.unwrap();
            said.push(format!("{} {}", l.version, l.key_hash != before.key_hash));
            let found = s
                .license_by_key(gateway::keys::KeyHash::of(key.as_bytes()))
                .await
                .unwrap();
            said.push(format!("{:?}", found.map(|l| l.id)));
            said.push(format!(
                "{:?}",
                s.license_by_key(before.key_hash)
                    .await
                    .unwrap()
                    .map(|l| l.id)
            ));
            for e in [
                s.adjust_balance(999, Adjustment::Credit, 1, None, t)
                    .await
                    .unwrap_err(),
                s.revoke(999, t).await.unwrap_err(),
                s.update_license(999, LicensePatch::default(), t)
                    .await
                    .unwrap_err(),
                s.adjust_balance(ada.id, Adjustment::Credit, 0, None, t)
                    .await
                    .unwrap_err(),
            ] {
                said.push(match e {
                    StoreError::NotFound => "not found".into(),
                    StoreError::Invalid(m) => m,
                    e => panic!("{e}"),
                });
            }
            said.push(format!("{}", s.all_licenses().await.unwrap().len()));
            said
        }};
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.db");
    let lite = SqliteStore::open(&path).unwrap();
    let server = Postgres::shared();
    let url = server.database().await;
    let pg = PgStore::open(&url, 2).await.unwrap();
    stamp_with_the_writers_clock(server, &url).await;
    let on_sqlite = story!(&lite);
    let on_pg = story!(&pg);
    assert_eq!(on_pg, on_sqlite);
    assert_eq!(on_pg[1], "12600000 2");
    let c = server.connect(url.rsplit('/').next().unwrap()).await;
    let lite_db = rusqlite::Connection::open(&path).unwrap();
    for sql in [
        "SELECT id, length(key_prefix), name, email, company, plan, status, balance_ms, used_ms, \
         version, expires_at, created_at, updated_at FROM licenses ORDER BY id",
        "SELECT license_id, kind, delta_ms, balance_before_ms, balance_after_ms, reason, \
         created_at FROM usage_history ORDER BY id",
    ] {
        let want = flush::sqlite_rows(&lite_db, sql);
        assert!(!want.is_empty());
        assert_eq!(flush::pg_rows(&c, sql).await, want, "{sql}");
    }
}

/// The reads for people (statistics, history pages, the license search, the refusal counts,
/// the newest access rows) and every export in both formats: the same on both backends after
/// the same writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_history_and_exports_read_alike_on_both_backends() {
    use gateway::store::exports::{exportable, ExportRequest, Format};
    use gateway::store::sqlite::SqliteStore;
    use gateway::store::{Backend, HistoryKind, LicenseFilter};

    async fn read_all(s: &dyn Backend) -> Vec<String> {
        let t = flush::NOW;
        let mut out = vec![
            format!("{:?}", s.usage_stats(1, 30, t).await.unwrap()),
            format!("{:?}", s.usage_stats(3, 1, t).await.unwrap()),
            format!("{:?}", s.system_stats(30, t).await.unwrap()),
            format!("{:?}", s.system_daily(30, t).await.unwrap()),
            format!("{:?}", s.recent_access(1, 5).await.unwrap()),
            format!("{:?}", s.refused_since(0, 10).await.unwrap()),
            format!(
                "{:?}",
                s.usage_stats(999, 30, t).await.map(|_| ()).unwrap_err()
            ),
        ];
        for kind in [
            HistoryKind::All,
            HistoryKind::Usage,
            HistoryKind::Payments,
            HistoryKind::Sessions,
        ] {
            let first = s.history(1, kind, 2, None).await.unwrap();
            let next = s.history(1, kind, 2, first.next_before).await.unwrap();
            out.push(format!("{kind:?} {first:?} {next:?}"));
        }
        for search in [None, Some("A"), Some("tg_"), Some("%")] {
            let f = LicenseFilter {
                search: search.map(String::from),
                limit: 2,
                ..LicenseFilter::default()
            };
            out.push(format!("{:?}", s.licenses(f).await.unwrap()));
        }
        for table in [
            "licenses",
            "usage_history",
            "usage_sessions",
            "access_logs",
            "usage_alerts",
        ] {
            for format in [Format::Csv, Format::Json] {
                let (tx, mut rx) = tokio::sync::mpsc::channel::<axum::body::Bytes>(4);
                let request = ExportRequest {
                    table: exportable(table).unwrap(),
                    format,
                    from: Some(t - 450),
                    to: None,
                    license: (table != "licenses").then_some(1),
                    guest: None,
                };
                let reader = tokio::spawn(async move {
                    let mut all = Vec::new();
                    while let Some(b) = rx.recv().await {
                        all.extend_from_slice(&b);
                    }
                    all
                });
                s.export(request, tx).await.unwrap();
                let bytes = reader.await.unwrap();
                out.push(format!(
                    "{table} {format:?}: {}",
                    String::from_utf8_lossy(&bytes)
                ));
            }
        }
        out
    }

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.db");
    let lite = SqliteStore::open(&path).unwrap();
    let lite_db = rusqlite::Connection::open(&path).unwrap();
    lite_db.execute_batch(flush::LICENSES).unwrap();
    let server = Postgres::shared();
    let url = server.database().await;
    let pg = PgStore::open(&url, 3).await.unwrap();
    stamp_with_the_writers_clock(server, &url).await;
    let c = server.connect(url.rsplit('/').next().unwrap()).await;
    c.batch_execute(&flush::LICENSES.replace("X'0", "'\\x0"))
        .await
        .unwrap();
    for s in [&lite as &dyn Backend, &pg as &dyn Backend] {
        s.commit_flush(&mut flush::batch()).await.unwrap();
        let counts = vec![gateway::records::RefusedCount {
            minute: flush::NOW,
            reason: "invalid_license_key",
            client_ip: None,
            requests: 4,
        }];
        s.record_refused(counts).await.unwrap();
        s.adjust_balance(
            1,
            gateway::store::Adjustment::Credit,
            1_000,
            None,
            flush::NOW,
        )
        .await
        .unwrap();
    }
    let on_sqlite = read_all(&lite).await;
    let on_pg = read_all(&pg).await;
    assert_eq!(on_sqlite.len(), on_pg.len());
    for (want, got) in on_sqlite.iter().zip(&on_pg) {
        assert_eq!(got, want);
    }
    assert!(on_pg[0].contains("calls: 20"), "{}", on_pg[0]);
}

/// The real binary on PostgreSQL: `check-config`, `migrate`, `serve` with the URL in
/// `TOLLGATE_DATABASE_URL`, a license made through the admin API, proxied requests metered and
/// flushed to the database, SIGTERM committing the rest, the CLI reading it back, and `backup`
/// refusing with the pg_dump advice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_meters_into_postgres_and_its_commands_work_on_it() {
    use common::*;
    use std::time::Duration;
    let server = Postgres::shared();
    let url = server.database().await;
    let up = Upstream::start().await;
    let mut s = Settings {
        storage_extra: "backend = \"postgres\"".into(),
        ..Settings::default()
    };
    s.env.push(("TOLLGATE_DATABASE_URL", url.clone()));
    let mut gw = Gateway::start(up.addr, s).await;
    let c = client();
    let (id, key) = gw
        .create_license(&c, serde_json::json!({"name": "Ada", "hours": 2}))
        .await;
    for i in 0..20 {
        let r = keyed_get(&c, &gw.url(&format!("/work/{i}")), &key).await;
        assert_eq!(r.status(), 200);
    }
    assert_eq!(up.count(), 20);
    gw.signal("TERM");
    assert!(
        gw.wait_exit(Duration::from_secs(15)).await.success(),
        "{}",
        gw.log()
    );

    let db = server.connect(url.rsplit('/').next().unwrap()).await;
    assert_eq!(
        Postgres::scalar(
            &db,
            &format!("SELECT count(*) FROM access_logs WHERE license_id = {id}")
        )
        .await,
        20
    );
    assert_eq!(Postgres::license(&db, id, "requests_total").await, 20);
    let used = Postgres::license(&db, id, "used_ms").await;
    let balance = Postgres::license(&db, id, "balance_ms").await;
    let history = Postgres::scalar(
        &db,
        &format!(
            "SELECT coalesce(sum(delta_ms), 0)::bigint FROM usage_history WHERE license_id = {id}"
        ),
    )
    .await;
    assert!(used > 0);
    assert_eq!(balance, 7_200_000 - used);
    assert_eq!(
        history, balance,
        "the books add up: the history sums to the balance"
    );

    // the commands, on the same database
    let out = gw.cli(&["keys", "show", &id.to_string(), "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let shown: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(shown["requests_total"], 20);
    let out = gw.cli(&["check-config"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = gw.cli(&["migrate"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("PostgreSQL at 127.0.0.1:"));
    let out = gw.cli(&["backup", "/tmp/never-written.db"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("pg_dump"));

    // back up again: the admin API reads the database
    gw.spawn().await;
    let me: serde_json::Value = c
        .get(gw.admin_url("/usage/me"))
        .header("x-license-key", &key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(me["requests_total"], 20);
    let csv = gw
        .api(
            &c,
            reqwest::Method::GET,
            &format!("/api/export/access_logs.csv?license={id}"),
        )
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(csv.lines().count(), 21, "{csv}");
    assert!(!gw.log().contains(&url), "the URL is never logged");
}

/// PostgreSQL stopped under steady load and started again: the gateway keeps admitting the key
/// it holds, `/ready` says not ready while the database is away, and once it is back every
/// answered request is in `access_logs` and the books add up, nothing lost, nothing doubled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_outage_under_load_loses_and_doubles_nothing() {
    use common::*;
    use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};
    let server = Postgres::start();
    let url = server.database().await;
    let up = Upstream::start().await;
    let mut s = Settings {
        storage_extra: "backend = \"postgres\"".into(),
        ..Settings::default()
    };
    s.env.push(("TOLLGATE_DATABASE_URL", url.clone()));
    let mut gw = Gateway::start(up.addr, s).await;
    let c = client();
    let (id, key) = gw
        .create_license(&c, serde_json::json!({"name": "Ada", "hours": 5}))
        .await;
    // the key is in memory before the outage; a second one is not
    assert_eq!(keyed_get(&c, &gw.url("/warm"), &key).await.status(), 200);
    let (_, cold_key) = gw
        .create_license(&c, serde_json::json!({"name": "Bob", "hours": 1}))
        .await;

    // steady load: one client, requests back to back, counted by answer
    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicI64::new(1));
    let load = {
        let (stop, answered, url, key, c) = (
            stop.clone(),
            answered.clone(),
            gw.url("/steady"),
            key.clone(),
            c.clone(),
        );
        tokio::spawn(async move {
            let mut refused = 0;
            for _ in 0..100_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let r = keyed_get(&c, &url, &key).await;
                if r.status() == 200 {
                    answered.fetch_add(1, Ordering::Relaxed);
                } else {
                    refused += 1;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            refused
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    server.pause();
    let during = answered.load(Ordering::Relaxed);
    // ten seconds without a database
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut saw_not_ready = false;
    while Instant::now() < deadline {
        let r = c.get(gw.admin_url("/ready")).send().await.unwrap();
        saw_not_ready |= r.status() == 503;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let served_in_outage = answered.load(Ordering::Relaxed) - during;
    // what could not be committed waits in memory, and says so
    assert_eq!(gw.metric("tollgate_pending_charges").await, 1.0);
    let waiting = gw.metric("tollgate_pending_charge_seconds").await;
    assert!(waiting > 0.0, "{waiting} s of usage pending");
    assert!(gw.metric("tollgate_pending_log_rows").await >= served_in_outage as f64);
    // a key the gateway does not hold cannot be checked: 503 store_unavailable, come back soon
    let r = keyed_get(&c, &gw.url("/cold"), &cold_key).await;
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "2");
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["error"], "store_unavailable");
    server.resume();
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    stop.store(true, Ordering::Relaxed);
    let refused = load.await.unwrap();
    assert_eq!(
        refused, 0,
        "a key held in memory is admitted through the outage"
    );
    // and once the database is back, the other key is looked up and admitted
    assert_eq!(
        keyed_get(&c, &gw.url("/cold"), &cold_key).await.status(),
        200
    );
    assert!(
        saw_not_ready,
        "/ready said not ready while the database was down"
    );
    assert!(
        served_in_outage > 100,
        "served {served_in_outage} during the outage"
    );
    // the retries (backing off to at most 8 s apart) commit it all while the gateway runs
    let answered_so_far = answered.load(Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(20);
    while gw.metric("tollgate_pending_charges").await != 0.0
        || gw.metric("tollgate_pending_log_rows").await != 0.0
    {
        assert!(Instant::now() < deadline, "still pending:\n{}", gw.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let committed: i64 = server
        .connect(url.rsplit('/').next().unwrap())
        .await
        .query_one(
            "SELECT count(*) FROM access_logs WHERE license_id = $1 AND status = 200",
            &[&id],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        committed, answered_so_far,
        "what was answered before and during the outage is committed before any shutdown"
    );
    gw.signal("TERM");
    assert!(
        gw.wait_exit(Duration::from_secs(30)).await.success(),
        "{}",
        gw.log()
    );

    let total = answered.load(Ordering::Relaxed);
    let db = server.connect(url.rsplit('/').next().unwrap()).await;
    assert_eq!(
        Postgres::scalar(
            &db,
            &format!("SELECT count(*) FROM access_logs WHERE license_id = {id} AND status = 200")
        )
        .await,
        total,
        "every answered request is logged once"
    );
    assert_eq!(Postgres::license(&db, id, "requests_total").await, total);
    let balance = Postgres::license(&db, id, "balance_ms").await;
    let history = Postgres::scalar(
        &db,
        &format!(
            "SELECT coalesce(sum(delta_ms), 0)::bigint FROM usage_history WHERE license_id = {id}"
        ),
    )
    .await;
    assert_eq!(history, balance, "the books add up");
    eprintln!("outage: {total} answered, {served_in_outage} while the database was down");
}

/// `sslmode=require` speaks TLS to the database with rustls, and the server's certificate must
/// chain to a trusted root: the system's, or a private CA in `[storage] ca_file`. Checked on the
/// server's side (`pg_stat_ssl`), and through the real binary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sslmode_require_is_tls_to_a_certificate_the_configured_ca_signed() {
    use common::*;
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "Tollgate test database CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
        .unwrap()
        .signed_by(&key, &ca, &ca_key)
        .unwrap();
    let pki = tempfile::tempdir().unwrap();
    let ca_file = pki.path().join("db-ca.pem");
    std::fs::write(&ca_file, ca.pem()).unwrap();

    let server = Postgres::start_tls(&leaf.pem(), &key.serialize_pem());
    let url = server.database().await;
    let db = url.rsplit('/').next().unwrap().to_string();
    let tls_url = format!("{url}?sslmode=require");
    let tls_sessions = || async {
        server
            .connect(&db)
            .await
            .query_one(
                "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
                 WHERE a.datname = current_database() AND s.ssl AND a.pid != pg_backend_pid()",
                &[],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
    };

    // a certificate no trusted root signed is refused, and the error says why
    let Err(e) = PgStore::open(&tls_url, 1).await else {
        panic!("a certificate of an unknown CA was accepted")
    };
    assert!(e.to_string().contains("certificate"), "{e}");
    eprintln!("refused: {e}");
    // a CA file that is not one is a clear error too
    let bad = pki.path().join("empty.pem");
    std::fs::write(&bad, "not a certificate\n").unwrap();
    let Err(e) = PgStore::open_trusting(&tls_url, 1, Some(&bad)).await else {
        panic!("an empty CA file was taken")
    };
    assert!(e.to_string().contains("no PEM certificate"), "{e}");

    // trusting the CA: migrated and answering, over TLS
    let store = PgStore::open_trusting(&tls_url, 2, Some(&ca_file))
        .await
        .unwrap();
    store.ready().await.unwrap();
    assert!(tls_sessions().await >= 1, "the store's connection is TLS");
    store.close();

    // the binary, with `ca_file` in its config and the URL in the environment
    let up = Upstream::start().await;
    let mut s = Settings {
        storage_extra: format!(
            "backend = \"postgres\"\nca_file = {:?}",
            ca_file.display().to_string()
        ),
        ..Settings::default()
    };
    s.env.push(("TOLLGATE_DATABASE_URL", tls_url));
    let gw = Gateway::start(up.addr, s).await;
    let c = client();
    let (id, key) = gw
        .create_license(&c, serde_json::json!({"name": "Ada", "hours": 1}))
        .await;
    assert_eq!(
        keyed_get(&c, &gw.url("/over-tls"), &key).await.status(),
        200
    );
    let logged = || async {
        server
            .connect(&db)
            .await
            .query_one(
                "SELECT count(*) FROM access_logs WHERE license_id = $1",
                &[&id],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while logged().await != 1 {
        assert!(std::time::Instant::now() < deadline, "{}", gw.log());
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(
        tls_sessions().await >= 1,
        "the gateway's connections are TLS"
    );
    assert!(!gw.log().contains("could not be recycled"), "{}", gw.log());
}

/// PostgreSQL stamps a license's `updated_at` with its own clock (migration 0009, so the poll
/// misses no change made by a process whose clock is behind: tests/cluster_money.rs). The
/// comparisons with SQLite compare what the writes said instead: the stamping is turned off in
/// their database.
async fn stamp_with_the_writers_clock(server: &Postgres, url: &str) {
    server
        .connect(url.rsplit('/').next().unwrap())
        .await
        .batch_execute("ALTER TABLE licenses DISABLE TRIGGER licenses_stamp_changes")
        .await
        .unwrap();
}

/// Several nodes, at the store: a meter's period allowance is granted in slices that never
/// add up past the cap less what was used (two processes asking at once for more than is
/// left); a flush counts its units in the period only when the period began by its time (one
/// made before the period began, committed after another node moved the count on, is the
/// period before's) and spends its process's slice; a process giving its leases back gives
/// its slices back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_meters_allowance_is_leased_in_slices_never_past_its_cap() {
    use gateway::records::{Charge, Usage};
    use gateway::store::{ClusterStore, FlushBatch, LeaseAsk, PeriodAsk, Process};
    use std::sync::Arc;
    let server = Postgres::shared();
    let url = server.database().await;
    let pg = Arc::new(PgStore::open(&url, 4).await.unwrap());
    let c = server.connect(url.rsplit('/').next().unwrap()).await;
    c.batch_execute(&flush::LICENSES.replace("X'0", "'\\x0"))
        .await
        .unwrap();
    let meters = vec!["audio_seconds".to_string()];
    let (a, b) = (
        Arc::new(Process::new("a", flush::NOW)),
        Arc::new(Process::new("b", flush::NOW)),
    );
    let start = flush::NOW - 1_000;
    let until = flush::NOW + 600_000;
    let ask = |n: i64| {
        let mut period = PeriodAsk {
            start,
            ..PeriodAsk::default()
        };
        period.max_units[0] = 1_800;
        period.units[0] = n;
        [LeaseAsk {
            license_id: 1,
            ms: 0,
            period: Some(period),
            included: None,
        }]
    };
    let units = |g: Vec<gateway::store::Grant>| g[0].period.map_or(0, |p| p.units[0]);
    let (ask_a, ask_b) = (ask(1_200), ask(1_200));
    let (ga, gb) = tokio::join!(
        pg.lease(&a, &meters, &ask_a, until),
        pg.lease(&b, &meters, &ask_b, until)
    );
    let (ga, gb) = (units(ga.unwrap()), units(gb.unwrap()));
    assert_eq!(ga + gb, 1_800, "{ga} + {gb}: the cap, never more");
    let held = |node: &Process| {
        format!(
            "SELECT coalesce(sum(units), 0) FROM lease_units WHERE node_id = '{}'",
            node.key()
        )
    };
    let used = "SELECT used FROM period_units WHERE license_id = 1";
    // a flush of a's: 600 units, made at `at`
    let flush_at = |at: i64| FlushBatch {
        charges: vec![Charge {
            license_id: 1,
            usage: Usage {
                charge_ms: 600_000,
                priced_ms: 600_000,
                requests: 1,
                units: [600, 0, 0, 0, 0, 0, 0, 0],
                ..Usage::default()
            },
            sessions: Vec::new(),
            period_start: None,
            included_ms: None,
            includes: None,
        }],
        logs: Vec::new(),
        now: at,
        process: Some(a.clone()),
        seq: at,
        session_gap_ms: None,
        meters: vec![gateway::config::Meter {
            name: "audio_seconds".into(),
            label: "seconds of audio".into(),
            price_ms: 1_000,
            max_per_request: 3_600,
        }]
        .into(),
    };
    pg.commit_flush(&flush_at(start + 10)).await.unwrap();
    assert_eq!(Postgres::scalar(&c, used).await, 600, "counted");
    assert_eq!(Postgres::scalar(&c, &held(&a)).await, ga - 600.min(ga));
    // made before the period began: the period before's, not counted in this one
    pg.commit_flush(&flush_at(start - 10)).await.unwrap();
    assert_eq!(Postgres::scalar(&c, used).await, 600, "not this period's");
    // what was used and what the leases hold leave only the rest to grant
    let before = Postgres::scalar(&c, &held(&a)).await;
    let g = units(pg.lease(&a, &meters, &ask(600), until).await.unwrap());
    assert_eq!(g, 600.min(1_800 - 600 - gb - before));
    let held_a = Postgres::scalar(&c, &held(&a)).await;
    assert_eq!(held_a, before + g);
    // b gives its leases back: its slices go with them, and a may have them
    pg.release(&b).await.unwrap();
    assert_eq!(Postgres::scalar(&c, &held(&b)).await, 0);
    let g = units(pg.lease(&a, &meters, &ask(1_800), until).await.unwrap());
    let held_a_now = Postgres::scalar(&c, &held(&a)).await;
    assert_eq!(held_a_now, held_a + g);
    assert_eq!(600 + held_a_now, 1_800, "everything not used, to a");
}
