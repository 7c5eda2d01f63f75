//! Usage alerts and the customer's view of their limits, on the real gateway: a threshold
//! crossed writes one row and sends one signed webhook; a receiver that is down gets retries,
//! and the proxy's answers do not wait for any of it.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use common::*;
use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;

const ALERT_SECRET: &str = "alert-secret-for-tests";

/// An alert receiver on loopback: answers 503 to its first `fail_first` deliveries, then 200,
/// and keeps every delivery with whether its signature verified.
struct Receiver {
    addr: SocketAddr,
    got: Arc<Mutex<Vec<(Value, bool, StatusCode)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Receiver {
    async fn start(fail_first: usize) -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let got: Arc<Mutex<Vec<(Value, bool, StatusCode)>>> = Arc::default();
        let record = got.clone();
        let app = axum::Router::new().route(
            "/hooks/usage",
            axum::routing::post(move |headers: HeaderMap, body: Bytes| {
                let record = record.clone();
                async move {
                    let verified = headers
                        .get("tollgate-signature")
                        .and_then(|h| h.to_str().ok())
                        .is_some_and(|h| verifies(h, &body));
                    let mut got = record.lock().unwrap();
                    let status = if got.len() < fail_first {
                        StatusCode::SERVICE_UNAVAILABLE
                    } else {
                        StatusCode::OK
                    };
                    got.push((serde_json::from_slice(&body).unwrap(), verified, status));
                    status
                }
            }),
        );
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Receiver { addr, got, task }
    }

    fn url(&self) -> String {
        format!("http://{}/hooks/usage", self.addr)
    }

    fn deliveries(&self) -> Vec<(Value, bool, StatusCode)> {
        self.got.lock().unwrap().clone()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Checks `t=…,v1=…` the way a receiver should: HMAC-SHA256 over "{t}.{body}", recent t.
fn verifies(header: &str, body: &[u8]) -> bool {
    let mut t = None;
    let mut v1 = Vec::new();
    for part in header.split(',') {
        match part.split_once('=') {
            Some(("t", v)) => t = v.parse::<i64>().ok(),
            Some(("v1", v)) => v1.push(v.to_string()),
            _ => {}
        }
    }
    let Some(t) = t else { return false };
    if (stripe::unix_now() - t).abs() > 300 {
        return false;
    }
    let mut mac = Hmac::<Sha256>::new_from_slice(ALERT_SECRET.as_bytes()).unwrap();
    mac.update(format!("{t}.").as_bytes());
    mac.update(body);
    let want = hex_encode(&mac.finalize().into_bytes());
    v1.contains(&want)
}

fn hex_encode(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn settings(plan: &str, receiver: &Receiver) -> Settings {
    let mut s = Settings {
        plans: format!("[[plans]]\nname = \"free\"\n{plan}\n"),
        extra: format!("[alerts]\nwebhook_url = \"{}\"\n", receiver.url()),
        ..Settings::default()
    };
    s.env.push(("TOLLGATE_ALERT_SECRET", ALERT_SECRET.into()));
    s
}

/// `s` on `store`.
fn on(store: Store, s: Settings) -> Settings {
    Settings { store, ..s }
}

async fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn crossing_80_percent_writes_one_row_and_sends_one_signed_webhook(store: Store) {
    let receiver = Receiver::start(0).await;
    let up = Upstream::start().await;
    let gw = Gateway::start(
        up.addr,
        on(store, settings("period_requests = 10", &receiver)),
    )
    .await;
    let (id, key) = gw.create_key("Ada", "10");
    let c = client();
    let get = |path: &'static str| {
        let (c, url, key) = (c.clone(), gw.url(path), key.clone());
        async move {
            c.get(url)
                .header("X-License-Key", key)
                .send()
                .await
                .unwrap()
                .status()
        }
    };
    for _ in 0..9 {
        assert_eq!(get("/work").await, 200);
    }
    // 8 of 10 crossed 80%; the 9th crossed nothing
    wait_until("the 80% webhook", || receiver.deliveries().len() == 1).await;
    let (event, verified, _) = receiver.deliveries()[0].clone();
    assert!(verified, "the signature does not verify: {event}");
    assert_eq!(event["type"], "usage.threshold_crossed");
    assert_eq!(event["license_id"], id);
    assert_eq!(event["kind"], "period_requests");
    assert_eq!(event["threshold_percent"], 80);
    assert_eq!(
        (event["used"].as_i64(), event["allowance"].as_i64()),
        (Some(8), Some(10))
    );
    gw.wait_for(
        &format!("SELECT count(*) FROM usage_alerts WHERE license_id = {id} AND delivered_at IS NOT NULL"),
        1,
    )
    .await;

    // the 10th crosses 100%; the 11th is refused and crosses nothing
    assert_eq!(get("/work").await, 200);
    assert_eq!(get("/work").await, 429);
    wait_until("the 100% webhook", || receiver.deliveries().len() == 2).await;
    assert_eq!(receiver.deliveries()[1].0["threshold_percent"], 100);
    gw.wait_for(
        &format!("SELECT count(*) FROM usage_alerts WHERE license_id = {id}"),
        2,
    )
    .await;

    // the customer sees them, and where each limit stands
    let r = c
        .get(gw.admin_url("/usage/alerts"))
        .header("X-License-Key", &key)
        .send()
        .await
        .unwrap();
    let v: Value = r.json().await.unwrap();
    let thresholds: Vec<i64> = v["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["threshold_percent"].as_i64().unwrap())
        .collect();
    assert_eq!(thresholds, [100, 80]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(receiver.deliveries().len(), 2, "an alert was sent twice");
}

async fn a_receiver_that_is_down_gets_retries_and_requests_never_wait(store: Store) {
    let receiver = Receiver::start(2).await;
    let up = Upstream::start().await;
    let gw = Gateway::start(
        up.addr,
        on(store, settings("period_requests = 10", &receiver)),
    )
    .await;
    let (id, key) = gw.create_key("Ada", "10");
    let c = client();
    // 8 of 10 is 80%: the alert fires and its first deliveries fail while requests go on
    for _ in 0..8 {
        let r = c
            .get(gw.url("/work"))
            .header("X-License-Key", &key)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    wait_until("the first failed delivery", || {
        !receiver.deliveries().is_empty()
    })
    .await;
    let r = c
        .get(gw.url("/work"))
        .header("X-License-Key", &key)
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        200,
        "a request waited on or failed with the alert"
    );
    // 503, 503 (retried after 1 s and 2 s), then accepted
    wait_until("the third delivery of the 80% alert", || {
        receiver
            .deliveries()
            .iter()
            .filter(|(e, _, _)| e["threshold_percent"] == 80)
            .count()
            >= 3
    })
    .await;
    let tries: Vec<(i64, StatusCode, bool)> = receiver
        .deliveries()
        .iter()
        .filter(|(e, _, _)| e["threshold_percent"] == 80)
        .map(|(e, v, s)| (e["id"].as_i64().unwrap(), *s, *v))
        .collect();
    assert_eq!(tries.len(), 3, "{tries:?}");
    assert!(tries
        .iter()
        .all(|(alert, _, verified)| *alert == tries[0].0 && *verified));
    assert_eq!(
        tries.iter().map(|t| t.1.as_u16()).collect::<Vec<_>>(),
        [503, 503, 200]
    );
    gw.wait_for(
        &format!(
            "SELECT count(*) FROM usage_alerts WHERE license_id = {id} AND threshold_percent = 80
             AND attempts = 3 AND delivered_at IS NOT NULL"
        ),
        1,
    )
    .await;
}

// alerts recorded once per period and delivered, on SQLite and on PostgreSQL
on_each_store!(
    crossing_80_percent_writes_one_row_and_sends_one_signed_webhook,
    a_receiver_that_is_down_gets_retries_and_requests_never_wait,
    time_used_by_a_stream_raises_the_balance_alerts,
    the_customer_sees_each_limit_its_use_and_when_it_resets,
);

async fn the_customer_sees_each_limit_its_use_and_when_it_resets(store: Store) {
    let up = Upstream::start().await;
    let gw = Gateway::start(
        up.addr,
        Settings {
            plans: "[[plans]]\nname = \"free\"\nrequests_per_minute = 10\nmax_concurrent = 2\n\
                    max_body_bytes = 1048576\nperiod_requests = 100\nperiod_minutes = 30\n"
                .into(),
            ..Settings::on(store)
        },
    )
    .await;
    let (_, key) = gw.create_key("Ada", "10");
    let c = client();
    let limits = || {
        let (c, url, key) = (c.clone(), gw.admin_url("/usage/limits"), key.clone());
        async move {
            let r = c
                .get(url)
                .header("X-License-Key", key)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            let v: Value = r.json().await.unwrap();
            v["limits"]
                .as_array()
                .unwrap()
                .iter()
                .map(|l| (l["limit"].as_str().unwrap().to_string(), l.clone()))
                .collect::<std::collections::HashMap<_, _>>()
        }
    };
    // before any request: everything left
    let before = limits().await;
    assert_eq!(before["requests_per_minute"]["remaining"], 10);
    assert_eq!(before["period_requests"]["used"], 0);
    assert_eq!(before["max_body_bytes"]["max"], 1048576);
    for _ in 0..3 {
        let r = c
            .get(gw.url("/work"))
            .header("X-License-Key", &key)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    // a request's concurrency slot is given back just after its last byte is sent, so the
    // client may ask a moment before that
    let mut after = limits().await;
    for _ in 0..50 {
        if after["max_concurrent"]["remaining"] == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        after = limits().await;
    }
    let rpm = &after["requests_per_minute"];
    assert_eq!(
        (rpm["used"].as_i64(), rpm["remaining"].as_i64()),
        (Some(3), Some(7)),
        "{rpm}"
    );
    assert!(rpm["resets_at"].as_str().unwrap().ends_with('Z'));
    assert_eq!(after["max_concurrent"]["max"], 2);
    assert_eq!(after["max_concurrent"]["remaining"], 2);
    let pr = &after["period_requests"];
    assert_eq!(
        (pr["used"].as_i64(), pr["remaining"].as_i64()),
        (Some(3), Some(97)),
        "{pr}"
    );
    let ph = &after["period_hours"];
    assert_eq!(ph["max_ms"], 1_800_000);
    assert_eq!(ph["resets_at"], pr["resets_at"]);
    // once flushed, the time used in the period is what the usage history holds
    gw.wait_for(
        "SELECT coalesce(sum(requests), 0) FROM usage_history WHERE kind = 'usage'",
        3,
    )
    .await;
    let used =
        gw.count("SELECT coalesce(sum(-delta_ms), 0) FROM usage_history WHERE kind = 'usage'");
    assert_eq!(limits().await["period_hours"]["used_ms"], used);
    let r = c
        .get(gw.admin_url("/usage/limits"))
        .header("X-License-Key", "tg_nope")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}

/// Issue 16, item 4. Before the fix time charged by the flushes while a response streamed
/// never went through the thresholds: a stream that used 92.7% of a balance, or drained it,
/// wrote no alert and sent no webhook.
async fn time_used_by_a_stream_raises_the_balance_alerts(store: Store) {
    let receiver = Receiver::start(0).await;
    let up = Upstream::start().await;
    let gw = Gateway::start(up.addr, on(store, settings("", &receiver))).await;
    let (id, key) = gw.create_key("Ada", "0.001"); // 3.6 s
    let c = client();
    // events for 6 s: the balance runs out on the way and the stream is cut off
    let r = c
        .get(gw.url("/events?stream_ms=6000"))
        .header("X-License-Key", &key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let _ = r.bytes().await;
    wait_until("both balance webhooks", || receiver.deliveries().len() == 2).await;
    let got: Vec<(String, i64)> = receiver
        .deliveries()
        .iter()
        .map(|(e, verified, _)| {
            assert!(verified);
            (
                e["kind"].as_str().unwrap().to_string(),
                e["threshold_percent"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(got, [("balance".into(), 80), ("balance".into(), 100)]);
    gw.wait_for(
        &format!("SELECT count(*) FROM usage_alerts WHERE license_id = {id} AND kind = 'balance'"),
        2,
    )
    .await;
}
