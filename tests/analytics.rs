//! Analytics and exports on the real gateway: per-license and system-wide numbers match the
//! traffic and payments the test made, and exports stream exactly the rows asked for.

mod common;

use common::*;
use gateway::store::{NewPayment, PaidSession};
use reqwest::Method;
use serde_json::Value;

async fn get_json(gw: &Gateway, c: &reqwest::Client, path: &str) -> (u16, Value) {
    let r = gw.api(c, Method::GET, path).send().await.unwrap();
    (r.status().as_u16(), r.json().await.unwrap())
}

// the rollups, the statistics and the exports, on SQLite and on PostgreSQL
on_each_store!(stats_and_exports_match_the_traffic_and_payments);

async fn stats_and_exports_match_the_traffic_and_payments(store: Store) {
    let up = Upstream::start().await;
    let gw = Gateway::start(
        up.addr,
        Settings {
            store,
            proxy_extra: "anonymous = \"guest\"\n".into(),
            plans: "[[plans]]\nname = \"free\"\n[[plans]]\nname = \"guest\"\n".into(),
            extra: "[[routes]]\npath = \"/a\"\nmethods = [\"GET\"]\n".into(),
            ..Settings::default()
        },
    )
    .await;
    let c = client();
    let (a, key_a) = gw.create_key("Ada", "5");
    let (b, key_b) = gw.create_key("Bob", "5");
    for i in 0..10 {
        let path = if i < 8 { "/a" } else { "/b" };
        let r = c
            .get(gw.url(path))
            .header("X-License-Key", &key_a)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    for _ in 0..3 {
        c.get(gw.url("/a"))
            .header("X-License-Key", &key_b)
            .send()
            .await
            .unwrap();
    }
    for _ in 0..2 {
        assert_eq!(c.get(gw.url("/guest")).send().await.unwrap().status(), 200);
    }
    // a paid purchase for Ada, recorded the way the webhook would
    {
        let store = gw.store().await;
        let now = gateway::ledger::now_ms();
        store
            .record_pending(
                NewPayment {
                    license_id: a,
                    session_id: "cs_test_1".into(),
                    package_id: Some("small".into()),
                    hours_ms: 18_000_000,
                    amount_cents: 2_500,
                    currency: "usd".into(),
                },
                now,
            )
            .await
            .unwrap();
        let paid = PaidSession {
            session_id: "cs_test_1".into(),
            payment_intent: Some("pi_1".into()),
            license_id: None,
            hours_ms: None,
            package_id: None,
            amount_cents: 2_500,
            currency: "usd".into(),
            priced: None,
        };
        store.fulfil(paid, now).await.unwrap();
        store.close();
    }
    gw.wait_for(
        "SELECT coalesce(sum(calls), 0) FROM access_daily WHERE license_id IN (0, 1, 2)",
        15,
    )
    .await;
    gw.wait_for("SELECT count(DISTINCT license_id) FROM usage_daily", 2)
        .await;

    let (status, s) = get_json(&gw, &c, &format!("/api/licenses/{a}/stats?days=7")).await;
    assert_eq!(status, 200, "{s}");
    assert_eq!(
        (s["calls"].as_i64(), s["successful_calls"].as_i64()),
        (Some(10), Some(10))
    );
    assert_eq!(s["success_rate"], 1.0);
    assert_eq!(
        s["top_endpoints"][0],
        serde_json::json!({"path": "/a", "method": "GET", "status_class": "2xx",
            "route": "/a", "calls": 8})
    );
    assert_eq!(
        s["top_endpoints"][1],
        serde_json::json!({"path": "/b", "method": "GET", "status_class": "2xx",
            "route": null, "calls": 2})
    );
    let p50 = s["latency_p50_ms"].as_f64().unwrap();
    let p95 = s["latency_p95_ms"].as_f64().unwrap();
    assert!(p50 > 0.0 && p50 <= p95 && p95 < 1_000.0, "{s}");
    let daily = s["daily"].as_array().unwrap();
    assert_eq!(daily.len(), 1, "{s}");
    assert_eq!(daily[0]["calls"], 10);
    assert!(daily[0]["date"].as_str().unwrap().len() == 10);
    // the customer's balance shows the same numbers
    let r = c
        .get(gw.admin_url("/payments/balance"))
        .header("X-License-Key", &key_a)
        .send()
        .await
        .unwrap();
    let bal: Value = r.json().await.unwrap();
    assert_eq!(bal["usage_stats"]["calls"], 10);
    assert_eq!(bal["usage_stats"]["latency_p50_ms"], s["latency_p50_ms"]);

    let (status, sys) = get_json(&gw, &c, "/api/stats?days=30").await;
    assert_eq!(status, 200, "{sys}");
    assert_eq!(sys["active_licenses"], 2, "{sys}");
    assert_eq!(sys["licensed_calls"], 13);
    assert_eq!(sys["guest_calls"], 2);
    assert_eq!(sys["calls"], 15);
    assert_eq!(
        sys["top_endpoints"][0],
        serde_json::json!({"path": "/a", "method": "GET", "status_class": "2xx",
            "route": "/a", "calls": 11})
    );
    // each guest's totals, by day; one guest asked for; a filter misspelt is refused
    let guests = sys["guests"].as_array().unwrap();
    assert_eq!(guests.len(), 1, "{sys}");
    assert_eq!(
        (guests[0]["guest"].as_str(), guests[0]["calls"].as_i64()),
        (Some("127.0.0.1"), Some(2))
    );
    assert_eq!(guests[0]["successful_calls"], 2);
    assert_eq!(guests[0]["daily"][0]["calls"], 2);
    let (_, one) = get_json(&gw, &c, "/api/stats?guest=127.0.0.1").await;
    assert_eq!(one["guests"].as_array().unwrap().len(), 1);
    let (_, none) = get_json(&gw, &c, "/api/stats?guest=10.9.9.9").await;
    assert_eq!(none["guests"], serde_json::json!([]));
    let (status, bad) = get_json(&gw, &c, "/api/stats?gust=127.0.0.1").await;
    assert_eq!((status, bad["error"].as_str()), (400, Some("bad_request")));
    assert_eq!(
        sys["revenue"],
        serde_json::json!([{"currency": "usd", "amount_cents": 2500, "payments": 1}])
    );
    let top: Vec<i64> = sys["top_licenses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["license_id"].as_i64().unwrap())
        .collect();
    assert_eq!(top.len(), 2);
    assert!(top.contains(&a) && top.contains(&b));
    assert_eq!(sys["plans"][0]["plan"], "free");
    assert_eq!(sys["plans"][0]["licenses"], 2);
    let charged =
        gw.count("SELECT coalesce(sum(-delta_ms), 0) FROM usage_history WHERE kind = 'usage'");
    assert!(charged > 0);
    assert_eq!(sys["charged_ms"], charged);

    // exports
    let export = |path: String| {
        let req = gw.api(&c, Method::GET, &path);
        async move {
            let r = req.send().await.unwrap();
            let status = r.status().as_u16();
            let ct = r
                .headers()
                .get("content-type")
                .map(|v| v.to_str().unwrap().to_string())
                .unwrap_or_default();
            (status, ct, r.text().await.unwrap())
        }
    };
    let (status, ct, csv) = export(format!("/api/export/access_logs.csv?license={a}")).await;
    assert_eq!((status, ct.as_str()), (200, "text/csv; charset=utf-8"));
    let lines: Vec<&str> = csv.lines().collect();
    assert!(
        lines[0].starts_with("id,ts,license_id,guest_id,"),
        "{}",
        lines[0]
    );
    assert_eq!(lines.len(), 11, "{csv}");
    assert!(lines[1..]
        .iter()
        .all(|l| l.split(',').nth(2) == Some(&*a.to_string())));
    let (status, _, json) = export(format!("/api/export/access_logs.json?license={b}")).await;
    assert_eq!(status, 200);
    let rows: Vec<Value> = serde_json::from_str(&json).unwrap();
    assert_eq!(rows.len(), 3);
    assert!(rows
        .iter()
        .all(|r| r["license_id"] == b && r["path"] == "/a"));
    let (_, _, guests) = export("/api/export/access_logs.json".into()).await;
    let all: Vec<Value> = serde_json::from_str(&guests).unwrap();
    assert_eq!(
        all.iter().filter(|r| r["guest_id"] == "127.0.0.1").count(),
        2
    );
    let (status, _, json) = export("/api/export/access_logs.json?guest=127.0.0.1".into()).await;
    assert_eq!(status, 200);
    let rows: Vec<Value> = serde_json::from_str(&json).unwrap();
    assert_eq!(rows.len(), 2);
    assert!(rows.iter().all(|r| r["guest_id"] == "127.0.0.1"));
    let (status, _, _) = export("/api/export/usage_units.csv?guest=127.0.0.1".into()).await;
    assert_eq!(status, 400, "a table without guests");
    let (_, _, future) = export("/api/export/access_logs.csv?from=2999-01-01".into()).await;
    assert_eq!(future.lines().count(), 1, "only the header");
    let (status, _, lic) = export("/api/export/licenses.csv".into()).await;
    assert_eq!(status, 200);
    assert!(!lic.contains("key_hash") && !lic.contains(&key_a) && !lic.contains(&key_b));
    assert_eq!(lic.lines().count(), 3);
    let (_, _, pay) = export("/api/export/payment_history.json".into()).await;
    assert_eq!(
        serde_json::from_str::<Value>(&pay).unwrap()[0]["amount_cents"],
        2500
    );

    for (path, want) in [
        ("/api/export/secrets.csv", 404),
        ("/api/export/access_logs.xml", 404),
        ("/api/export/access_logs", 404),
        ("/api/export/sqlite_master.csv", 404),
        ("/api/export/access_logs.csv?from=yesterday", 400),
        ("/api/export/access_logs.csv?license=1%20OR%201=1", 400),
        ("/api/export/stripe_events.csv?license=1", 400),
        ("/api/stats?days=0", 400),
        ("/api/stats?days=9999", 400),
        ("/api/licenses/999/stats", 404),
    ] {
        let (status, _, body) = export(path.into()).await;
        assert_eq!(status, want, "{path}: {body}");
    }
    let r = c
        .get(gw.admin_url("/api/export/access_logs.csv"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}

on_each_store!(access_log_errors_writes_only_failed_requests_and_the_rollups_count_all);

/// `storage.access_log = "errors"` (issue 35's option trading detail for speed): answered
/// requests get no row of their own in `access_logs`, refusals do, and the daily rollups and
/// the license's stats still count every request.
async fn access_log_errors_writes_only_failed_requests_and_the_rollups_count_all(store: Store) {
    let up = Upstream::start().await;
    let gw = Gateway::start(
        up.addr,
        Settings {
            store,
            storage_extra: "access_log = \"errors\"\n".into(),
            ..Settings::default()
        },
    )
    .await;
    let c = client();
    let (id, key) = gw.create_key("Ada", "1");
    for _ in 0..10 {
        assert_eq!(gw.get_with_key(&c, "/ok", &key).await.status(), 200);
    }
    for _ in 0..2 {
        assert_eq!(
            gw.get_with_key(&c, "/ok", "tg_notakeyofanyone0000000000000000")
                .await
                .status(),
            401
        );
    }
    gw.wait_for(
        &format!("SELECT coalesce(sum(calls), 0) FROM access_daily WHERE license_id = {id}"),
        10,
    )
    .await;
    gw.wait_for(
        "SELECT count(*) FROM access_logs WHERE path = '/ok' AND status = 401",
        2,
    )
    .await;
    assert_eq!(
        gw.count("SELECT count(*) FROM access_logs WHERE path = '/ok'"),
        2
    );
    assert_eq!(
        gw.count(&format!(
            "SELECT count(*) FROM access_logs WHERE license_id = {id}"
        )),
        0,
        "no row for an answered request"
    );
    let (status, s) = get_json(&gw, &c, &format!("/api/licenses/{id}/stats?days=7")).await;
    assert_eq!(status, 200, "{s}");
    assert_eq!(s["calls"].as_i64(), Some(10), "{s}");
}
