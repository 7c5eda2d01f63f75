//! Long responses are metered while they stream: each flush charges the time so far, so a
//! connection held open is paid for as it goes and a crash mid-stream loses at most one flush
//! interval.

mod common;

use std::time::{Duration, Instant};

use common::*;

async fn charged(gw: &Gateway, id: i64) -> i64 {
    gw.count(&format!(
        "SELECT coalesce(sum(-delta_ms), 0) FROM usage_history WHERE license_id = {id} AND kind = 'usage'"
    ))
}

async fn a_three_second_stream_is_charged_as_it_runs(mode: &'static str) {
    let up = Upstream::start().await;
    let gw = Gateway::start(
        up.addr,
        Settings {
            mode,
            flush_interval_ms: 200,
            ..Settings::default()
        },
    )
    .await;
    let (id, key) = gw.create_key("Ada", "1");
    let c = client();
    let started = Instant::now();
    let stream = {
        let (c, url, key) = (c.clone(), gw.url("/events?stream_ms=3000"), key.clone());
        tokio::spawn(async move {
            let r = c
                .get(url)
                .header("X-License-Key", key)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            let body = r.text().await.unwrap();
            assert!(body.matches("data: tick").count() >= 20, "{body}");
        })
    };
    // half way through, most of the time so far is already committed
    tokio::time::sleep(Duration::from_millis(1_600)).await;
    assert!(!stream.is_finished(), "the stream ended early");
    let so_far = charged(&gw, id).await;
    assert!(
        (1_000..=1_700).contains(&so_far),
        "{so_far} ms charged 1.6 s into the stream ({mode})"
    );
    stream.await.unwrap();
    let lasted = started.elapsed().as_millis() as i64;
    // after the last flush: the whole stream, once
    tokio::time::sleep(Duration::from_millis(600)).await;
    let total = charged(&gw, id).await;
    assert!(
        (2_900..=lasted + 100).contains(&total),
        "{total} ms charged for a stream of {lasted} ms ({mode})"
    );
    let b = books(&gw.db(), id);
    assert_eq!(b.history_sum_ms, b.balance_ms);
    assert_eq!(b.usage_requests, 1, "the stream counts as one request");
    assert_eq!(b.used_ms, total);
}

#[tokio::test(flavor = "multi_thread")]
async fn request_time_charges_a_stream_at_every_flush() {
    a_three_second_stream_is_charged_as_it_runs("request_time").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn session_time_charges_a_stream_at_every_flush() {
    a_three_second_stream_is_charged_as_it_runs("session").await;
}
