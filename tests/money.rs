//! Money against the real gateway and a real SQLite file: every request logged and charged
//! exactly once under concurrency, SIGTERM flushing everything, SIGKILL losing at most one flush
//! interval and never charging twice.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

/// One metered request that must succeed, its body read to the end.
async fn get_ok(c: &reqwest::Client, url: &str, key: &str) {
    let resp = c
        .get(url)
        .header("X-License-Key", key)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    resp.bytes().await.unwrap();
}

/// Sends `per_client` requests from each of `clients` concurrent clients, keys round-robin.
/// Returns how many requests each key sent.
async fn burst(gw: &Gateway, keys: &[String], clients: usize, per_client: usize) -> Vec<i64> {
    let keys = Arc::new(keys.to_vec());
    let url = Arc::new(gw.url("/app/work"));
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (keys, url) = (keys.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            let client = client();
            let mut sent = vec![0i64; keys.len()];
            for i in 0..per_client {
                let k = (c + i) % keys.len();
                get_ok(&client, &url, &keys[k]).await;
                sent[k] += 1;
            }
            sent
        }));
    }
    let mut total = vec![0i64; keys.len()];
    for t in tasks {
        for (k, n) in t.await.unwrap().into_iter().enumerate() {
            total[k] += n;
        }
    }
    total
}

fn assert_books_balance(gw: &Gateway, id: i64, credited_ms: i64) -> Books {
    let b = books(&gw.db(), id);
    assert_eq!(
        b.history_sum_ms, b.balance_ms,
        "history sums to the balance: {b:?}"
    );
    assert_eq!(b.balance_ms, credited_ms - b.used_ms, "{b:?}");
    assert_eq!(b.usage_ms, b.used_ms, "{b:?}");
    assert_eq!(b.usage_requests, b.requests_total, "{b:?}");
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_request_is_logged_once_and_deductions_add_up_to_the_tallies() {
    let up = Upstream::start().await;
    let gw = Gateway::start(up.addr, Settings::default()).await;
    let keys: Vec<(i64, String)> = (0..8)
        .map(|i| gw.create_key(&format!("k{i}"), "100"))
        .collect();
    let key_strings: Vec<String> = keys.iter().map(|(_, k)| k.clone()).collect();

    let sent = burst(&gw, &key_strings, 64, 50).await;
    let total: i64 = sent.iter().sum();
    assert_eq!(total, 3_200);

    gw.wait_for(
        "SELECT count(*) FROM access_logs WHERE path != '/__ready'",
        total,
    )
    .await;
    gw.wait_for(
        "SELECT coalesce(sum(requests), 0) FROM usage_history WHERE kind = 'usage'",
        total,
    )
    .await;
    // one more interval: nothing further may appear
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        gw.count("SELECT count(*) FROM access_logs WHERE path != '/__ready'"),
        total
    );
    assert_eq!(up.count() as i64, total);

    let c = gw.db();
    for ((id, _), n) in keys.iter().zip(&sent) {
        let b = assert_books_balance(&gw, *id, 360_000_000);
        assert_eq!(b.requests_total, *n, "license {id}");
        let logged: i64 = c
            .query_row(
                "SELECT count(*) FROM access_logs WHERE path != '/__ready' AND license_id = ?1 AND status = 200",
                [id],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(logged, *n, "license {id}");
        let (session_ms, session_requests): (i64, i64) = c
            .query_row(
                "SELECT sum(charged_ms), sum(requests) FROM usage_sessions WHERE license_id = ?1",
                [id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!(session_ms, b.used_ms, "sessions hold what was charged");
        assert_eq!(session_requests, *n);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_right_after_a_burst_commits_every_request_before_exit() {
    let up = Upstream::start().await;
    let settings = Settings {
        // long enough that only the shutdown flush can have written the tail of the burst
        flush_interval_ms: 5_000,
        ..Settings::default()
    };
    let mut gw = Gateway::start(up.addr, settings).await;
    let (id, key) = gw.create_key("Ada", "10");
    let sent = burst(&gw, &[key], 32, 25).await[0];
    gw.signal("TERM");
    let status = gw.wait_exit(Duration::from_secs(15)).await;
    assert!(status.success(), "{status}\n{}", gw.log());

    assert_eq!(
        gw.count("SELECT count(*) FROM access_logs WHERE path != '/__ready'"),
        sent
    );
    let b = assert_books_balance(&gw, id, 36_000_000);
    assert_eq!(b.requests_total, sent);
    assert!(b.used_ms > 0);
    assert_eq!(
        gw.count("SELECT count(*) FROM usage_sessions WHERE license_id = 1"),
        1,
        "one session"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_loses_at_most_one_flush_interval_and_never_charges_twice() {
    const FLUSH_MS: i64 = 250;
    const REQUEST_MS: u64 = 20;
    let up = Upstream::start().await;
    let settings = Settings {
        flush_interval_ms: FLUSH_MS as u64,
        mode: "request_time",
        ..Settings::default()
    };
    let mut gw = Gateway::start(up.addr, settings).await;
    let (id, key) = gw.create_key("Ada", "10");
    let credited = 36_000_000;
    let c = client();
    let url = gw.url(&format!("/app/work?sleep_ms={REQUEST_MS}"));

    // A steady stream of one-at-a-time requests for ~1.5 s, then a hard kill.
    let mut client_ms = 0i64;
    let mut sent = 0i64;
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(1_500) {
        let t = Instant::now();
        get_ok(&c, &url, &key).await;
        client_ms += t.elapsed().as_millis() as i64;
        sent += 1;
    }
    gw.signal("KILL");
    gw.wait_exit(Duration::from_secs(5)).await;

    let b = assert_books_balance(&gw, id, credited);
    let logged = gw.count("SELECT count(*) FROM access_logs WHERE path != '/__ready'");
    assert!(
        b.used_ms <= client_ms,
        "never more than the time used: {b:?}, {client_ms}"
    );
    // What the kill lost is the last interval's worth: at most FLUSH_MS of usage, and the
    // requests that fit in it (plus one straddling the flush).
    let lost_ms = client_ms - b.used_ms;
    let overhead_ms = sent * 3; // client-side time the gateway rightly does not see
    assert!(
        lost_ms <= FLUSH_MS + overhead_ms,
        "lost {lost_ms} ms of {client_ms} ({sent} requests): {b:?}"
    );
    let lost_requests = sent - logged;
    assert!(
        (0..=FLUSH_MS / REQUEST_MS as i64 + 1).contains(&lost_requests),
        "lost {lost_requests} of {sent} log rows"
    );
    assert!((b.requests_total - logged).abs() <= 1, "{b:?} vs {logged}");

    // Restart: the database opens clean, the balance is what was committed, metering goes on.
    gw.spawn().await;
    let before = books(&gw.db(), id);
    assert_eq!(before, b, "nothing replayed or charged twice on restart");
    for _ in 0..10 {
        get_ok(&c, &url, &key).await;
    }
    gw.signal("TERM");
    assert!(gw.wait_exit(Duration::from_secs(15)).await.success());
    let after = assert_books_balance(&gw, id, credited);
    assert_eq!(after.requests_total, b.requests_total + 10);
    assert!(after.used_ms >= b.used_ms + 10 * REQUEST_MS as i64);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idle_session_closes_and_the_next_request_opens_a_new_one() {
    let up = Upstream::start().await;
    let settings = Settings {
        idle_timeout_s: 1,
        flush_interval_ms: 100,
        ..Settings::default()
    };
    let gw = Gateway::start(up.addr, settings).await;
    let (id, key) = gw.create_key("Ada", "1");
    let c = client();
    let session =
        |r: &reqwest::Response| r.headers()["x-usage-session"].to_str().unwrap().to_string();
    let get = || {
        c.get(gw.url("/app?sleep_ms=50"))
            .header("X-License-Key", &key)
            .send()
    };

    let first = get().await.unwrap();
    let s1 = session(&first);
    let again = get().await.unwrap();
    assert_eq!(session(&again), s1, "within the idle timeout: same session");
    gw.wait_for(
        "SELECT count(*) FROM usage_sessions WHERE ended_at IS NOT NULL",
        1,
    )
    .await;
    let third = get().await.unwrap();
    assert_ne!(session(&third), s1, "after the idle timeout: a new session");

    gw.wait_for(
        &format!("SELECT coalesce(sum(requests), 0) FROM usage_history WHERE license_id = {id}"),
        3,
    )
    .await;
    let b = assert_books_balance(&gw, id, 3_600_000);
    let (first_ms, gap_ms): (i64, i64) = gw
        .db()
        .query_row(
            "SELECT a.charged_ms, b.started_at - a.ended_at FROM usage_sessions a, usage_sessions b
             WHERE a.id = ?1 AND b.id != ?1",
            [&s1],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert!(
        gap_ms >= 1_000,
        "the sessions are more than the idle timeout apart"
    );
    assert!(
        b.used_ms < first_ms + 1_000,
        "the gap between sessions was not charged: {b:?}"
    );
}
