//! The PostgreSQL backend's foundation on a real server the test starts itself
//! (tests/common/postgres.rs): nodes that open one database together migrate it once, the
//! tables hold integers as bigint, and the database answers readiness.

mod common;

use common::postgres::Postgres;
use gateway::store::postgres::{PgStore, MIGRATIONS};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_opening_one_database_together_migrate_it_once() {
    let pg = Postgres::start();
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
