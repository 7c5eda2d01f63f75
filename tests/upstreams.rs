//! Several upstream instances: consistent hashing keeps a license on one while it is up, round
//! robin spreads requests, a killed instance's requests go to the other, and a request no
//! instance can take is answered 502 and not charged.

mod common;

use std::collections::HashMap;

use common::*;

fn two(a: &Upstream, b: &Upstream, balance: &str) -> Settings {
    Settings {
        upstreams: Some(vec![a.addr, b.addr]),
        proxy_extra: format!("balance = \"{balance}\"\nhealth_check_interval_ms = 200\n"),
        ..Settings::default()
    }
}

/// Which upstream (0 or 1) saw each license's requests, and how many.
fn placement(a: &Upstream, b: &Upstream) -> HashMap<String, (usize, usize)> {
    let mut out: HashMap<String, (usize, usize)> = HashMap::new();
    for (i, up) in [a, b].into_iter().enumerate() {
        for seen in up.seen.lock().unwrap().iter() {
            if let Some(id) = seen.headers.get("x-tollgate-license-id") {
                let e = out.entry(id.clone()).or_default();
                if i == 0 {
                    e.0 += 1
                } else {
                    e.1 += 1
                }
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn hashing_keeps_each_license_on_one_instance_and_fails_over_when_it_dies() {
    let a = Upstream::start().await;
    let b = Upstream::start().await;
    let gw = Gateway::start(a.addr, two(&a, &b, "hash_license")).await;
    let c = client();
    let keys: Vec<(i64, String)> = (0..20)
        .map(|i| gw.create_key(&format!("k{i}"), "1"))
        .collect();
    for _ in 0..3 {
        for (_, key) in &keys {
            let r = c
                .get(gw.url("/x"))
                .header("X-License-Key", key)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
        }
    }
    let placed = placement(&a, &b);
    assert_eq!(placed.len(), 20);
    assert!(
        placed
            .values()
            .all(|(x, y)| (*x == 3 && *y == 0) || (*x == 0 && *y == 3)),
        "a license moved between instances: {placed:?}"
    );
    let on_b: Vec<String> = placed
        .iter()
        .filter(|(_, (_, y))| *y > 0)
        .map(|(id, _)| id.clone())
        .collect();
    assert!(
        !on_b.is_empty() && on_b.len() < 20,
        "one instance got everything"
    );

    // instance A dies: every request still succeeds, on B; those already on B stay there
    drop(a);
    for (_, key) in &keys {
        let r = c
            .get(gw.url("/y"))
            .header("X-License-Key", key)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let after: Vec<String> = b
        .seen
        .lock()
        .unwrap()
        .iter()
        .filter(|s| s.path == "/y")
        .map(|s| s.headers["x-tollgate-license-id"].clone())
        .collect();
    assert_eq!(after.len(), 20);
    for id in &on_b {
        assert!(after.contains(id));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn round_robin_spreads_and_nothing_is_charged_when_no_instance_answers() {
    let a = Upstream::start().await;
    let b = Upstream::start().await;
    let gw = Gateway::start(a.addr, two(&a, &b, "round_robin")).await;
    let (id, key) = gw.create_key("Ada", "1");
    let c = client();
    for _ in 0..10 {
        let r = c
            .get(gw.url("/rr"))
            .header("X-License-Key", &key)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let (x, y) = placement(&a, &b)[&id.to_string()];
    assert_eq!(x + y, 10);
    assert!(x >= 3 && y >= 3, "not spread: {x} / {y}");

    gw.wait_for(
        &format!("SELECT coalesce(sum(requests), 0) FROM usage_history WHERE license_id = {id}"),
        10,
    )
    .await;
    drop(a);
    drop(b);
    let no_pool = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    for _ in 0..3 {
        let r = no_pool
            .get(gw.url("/rr"))
            .header("X-License-Key", &key)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 502);
    }
    gw.wait_for(
        &format!("SELECT count(*) FROM access_logs WHERE license_id = {id} AND outcome = 'upstream_error'"),
        3,
    )
    .await;
    assert_eq!(
        gw.count(&format!(
            "SELECT coalesce(sum(requests), 0) FROM usage_history WHERE license_id = {id}"
        )),
        10,
        "a failed request was charged"
    );
}
