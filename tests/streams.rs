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

async fn a_three_second_stream_is_charged_as_it_runs(mode: &'static str, store: Store) {
    let up = Upstream::start().await;
    let gw = Gateway::start(
        up.addr,
        Settings {
            mode,
            flush_interval_ms: 200,
            ..Settings::on(store)
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
    let b = gw.books(id);
    assert_eq!(b.history_sum_ms, b.balance_ms);
    assert_eq!(b.usage_requests, 1, "the stream counts as one request");
    assert_eq!(b.used_ms, total);
    // issue 30, item 10: each flush committed the balance, and the history has one row for
    // the stream, not one a flush (before: 15 rows of about 200 ms)
    let rows = gw.count(&format!(
        "SELECT count(*) FROM usage_history WHERE license_id = {id} AND kind = 'usage'"
    ));
    assert_eq!(rows, 1, "{rows} usage rows for one stream of 3 s ({mode})");
}

// charged as they run, on SQLite and on PostgreSQL
on_each_store!(
    request_time_charges_a_stream_at_every_flush,
    session_time_charges_a_stream_at_every_flush,
    a_stream_is_ended_within_a_flush_interval_of_the_balance_running_out,
    streams_are_ended_when_the_period_time_allowance_is_spent,
);

async fn request_time_charges_a_stream_at_every_flush(store: Store) {
    a_three_second_stream_is_charged_as_it_runs("request_time", store).await;
}

async fn session_time_charges_a_stream_at_every_flush(store: Store) {
    a_three_second_stream_is_charged_as_it_runs("session", store).await;
}

async fn a_stream_is_ended_within_a_flush_interval_of_the_balance_running_out(store: Store) {
    let up = Upstream::start().await;
    let gw = Gateway::start(
        up.addr,
        Settings {
            mode: "request_time",
            flush_interval_ms: 200,
            ..Settings::on(store)
        },
    )
    .await;
    // 2 seconds of prepaid time
    let (id, key) = gw.create_key("Ada", "0.00055556");
    assert_eq!(gw.books(id).balance_ms, 2_000);
    let c = client();
    let started = Instant::now();
    let r = c
        .get(gw.url("/events?stream_ms=10000"))
        .header("X-License-Key", &key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut r = r;
    let mut ticks = 0;
    // read until the gateway ends the stream (an error or the end: either way it stops)
    while let Ok(Some(chunk)) = r.chunk().await {
        ticks += String::from_utf8_lossy(&chunk)
            .matches("data: tick")
            .count();
    }
    let lasted = started.elapsed().as_millis() as i64;
    assert!(
        (1_900..=3_000).contains(&lasted),
        "the stream lasted {lasted} ms on 2 s of balance"
    );
    assert!(ticks >= 15, "{ticks} events");
    gw.wait_for(
        &format!(
            "SELECT count(*) FROM access_logs WHERE license_id = {id} AND outcome = 'balance_exhausted'"
        ),
        1,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    // ended on purpose, not an error (before: "Fail to proxy ... status: 502" at ERROR)
    assert!(!gw.log().contains("Fail to proxy"), "{}", gw.log());
    let total = charged(&gw, id).await;
    // the time it ran is charged (a bounded overdraft of at most a flush interval or so)
    assert!(
        (1_900..=lasted + 100).contains(&total),
        "{total} ms charged"
    );
    let next = c
        .get(gw.url("/x"))
        .header("X-License-Key", &key)
        .send()
        .await
        .unwrap();
    assert_eq!(next.status(), 402);
    let b = gw.books(id);
    assert_eq!(b.history_sum_ms, b.balance_ms);
}

/// Issue 30, item 8: a plan's time allowance for the period ends a running stream (a busy one
/// and a quiet one) as a spent balance does; before, they ran to their end (10 s on a 3.6 s
/// allowance), and the next request was refused only after.
async fn streams_are_ended_when_the_period_time_allowance_is_spent(store: Store) {
    let up = Upstream::start().await;
    let gw = Gateway::start(
        up.addr,
        Settings {
            mode: "request_time",
            flush_interval_ms: 200,
            plans: "[[plans]]\nname = \"free\"\nperiod_hours = 0.001\n".into(), // 3.6 s
            ..Settings::on(store)
        },
    )
    .await;
    let (id, key) = gw.create_key("Ada", "1");
    let c = client();
    let started = Instant::now();
    // two streams at once: one busy (an event every 100 ms), one quiet after its first
    let run = |path: &'static str| {
        let (c, url, key) = (c.clone(), gw.url(path), key.clone());
        tokio::spawn(async move {
            let mut r = c
                .get(url)
                .header("X-License-Key", key)
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            while let Ok(Some(_)) = r.chunk().await {}
            started.elapsed().as_millis() as i64
        })
    };
    let (busy, quiet) = (
        run("/events?stream_ms=10000"),
        run("/events?quiet_ms=10000"),
    );
    let (busy, quiet) = (busy.await.unwrap(), quiet.await.unwrap());
    // two streams spend 3.6 s of allowance in 1.8 s; ended within a flush interval or two
    for lasted in [busy, quiet] {
        assert!(
            (1_700..=3_000).contains(&lasted),
            "a stream lasted {lasted} ms on a 3.6 s allowance shared by two"
        );
    }
    gw.wait_for(
        &format!(
            "SELECT count(*) FROM access_logs WHERE license_id = {id} AND outcome = 'allowance_exhausted'"
        ),
        2,
    )
    .await;
    let next = c
        .get(gw.url("/x"))
        .header("X-License-Key", &key)
        .send()
        .await
        .unwrap();
    assert_eq!(
        next.status(),
        429,
        "the allowance is spent until next period"
    );
    let v: serde_json::Value = next.json().await.unwrap();
    assert_eq!(v["error"], "quota_exceeded");
    // what ran is charged (past the allowance by at most the flush interval or so), once the
    // streams' last charges are flushed: a few flush intervals, longer on a loaded machine
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut total = charged(&gw, id).await;
    while total < 3_500 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        total = charged(&gw, id).await;
    }
    assert!((3_500..=4_600).contains(&total), "{total} ms charged");
    let b = gw.books(id);
    assert_eq!(b.history_sum_ms, b.balance_ms);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_quiet_stream_is_ended_when_the_balance_runs_out() {
    let up = Upstream::start().await;
    let gw = Gateway::start(
        up.addr,
        Settings {
            mode: "request_time",
            flush_interval_ms: 200,
            ..Settings::default()
        },
    )
    .await;
    let (id, key) = gw.create_key("Ada", "0.00055556"); // 2 s
    let c = client();
    let started = Instant::now();
    // one event, then silence for 20 s: nothing passes for the body filter to act on
    let mut r = c
        .get(gw.url("/events?quiet_ms=20000"))
        .header("X-License-Key", &key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut events = 0;
    while let Ok(Some(chunk)) = r.chunk().await {
        events += String::from_utf8_lossy(&chunk)
            .matches("data: hello")
            .count();
    }
    let lasted = started.elapsed().as_millis() as i64;
    assert_eq!(events, 1);
    assert!(
        (1_900..=3_000).contains(&lasted),
        "the quiet stream lasted {lasted} ms on 2 s of balance"
    );
    gw.wait_for(
        &format!(
            "SELECT count(*) FROM access_logs WHERE license_id = {id} AND outcome = 'balance_exhausted'"
        ),
        1,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let total = charged(&gw, id).await;
    assert!(
        (1_900..=lasted + 100).contains(&total),
        "{total} ms charged"
    );
    let b = gw.books(id);
    assert_eq!(b.history_sum_ms, b.balance_ms);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_quiet_stream_that_ends_by_itself_leaves_its_connection_usable() {
    // The watch on an open-ended response stops when the response ends: the next request on
    // the same keep-alive connections works, and the stream is charged as usual.
    let up = Upstream::start().await;
    let gw = Gateway::start(up.addr, Settings::default()).await;
    let (id, key) = gw.create_key("Ada", "1");
    let c = client();
    for _ in 0..3 {
        let r = c
            .get(gw.url("/events?quiet_ms=300"))
            .header("X-License-Key", &key)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.text().await.unwrap(), "data: hello\n\n");
        let r = c
            .get(gw.url("/x"))
            .header("X-License-Key", &key)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    gw.wait_for(
        &format!("SELECT count(*) FROM access_logs WHERE license_id = {id} AND outcome = 'ok'"),
        6,
    )
    .await;
}

mod websocket {
    use super::*;
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
    use tokio_tungstenite::tungstenite::Message;

    /// A WebSocket echo app on loopback.
    async fn echo_app() -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                tokio::spawn(common::ws::echo(tcp));
            }
        });
        (addr, task)
    }

    /// Opens a WebSocket through the gateway with `key`, sends a message every 100 ms for up
    /// to `secs` seconds, and returns how it ended: the close code if the gateway closed it.
    async fn talk(gw: &Gateway, key: &str, secs: u64) -> (Option<CloseCode>, Duration, usize) {
        // A connection that fails before anything was exchanged is tried once more (seen once
        // under a loaded machine, not reproduced since); one that ran is what the test checks.
        let first = talk_once(gw, key, secs).await;
        if first.0.is_none() && first.2 == 0 && first.1 < Duration::from_millis(50) {
            eprintln!("websocket ended before any exchange; trying again");
            return talk_once(gw, key, secs).await;
        }
        first
    }

    async fn talk_once(gw: &Gateway, key: &str, secs: u64) -> (Option<CloseCode>, Duration, usize) {
        let mut ws = common::ws::connect(gw, key).await;
        let started = Instant::now();
        let mut echoed = 0;
        while started.elapsed() < Duration::from_secs(secs) {
            if let Err(e) = ws.send(Message::text("ping")).await {
                eprintln!("websocket send failed: {e}");
                break;
            }
            match tokio::time::timeout(Duration::from_millis(500), ws.next()).await {
                Ok(Some(Ok(Message::Text(_)))) => echoed += 1,
                Ok(Some(Ok(Message::Close(frame)))) => {
                    return (frame.map(|f| f.code), started.elapsed(), echoed)
                }
                Ok(Some(Ok(_))) => {}
                other => {
                    eprintln!("websocket ended: {other:?}");
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let _ = ws.close(None).await;
        (None, started.elapsed(), echoed)
    }

    fn ws_settings() -> Settings {
        Settings {
            mode: "request_time",
            flush_interval_ms: 200,
            ..Settings::default()
        }
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_three_second_websocket_is_charged_three_seconds() {
        let (app, _task) = echo_app().await;
        let gw = Gateway::start(app, ws_settings()).await;
        let (id, key) = gw.create_key("Ada", "1");
        let (closed, lasted, echoed) = talk(&gw, &key, 3).await;
        assert_eq!(closed, None);
        assert!(echoed >= 20, "{echoed} echoes");
        gw.wait_for(
            &format!(
                "SELECT count(*) FROM access_logs WHERE license_id = {id} AND path = '/socket'"
            ),
            1,
        )
        .await;
        tokio::time::sleep(Duration::from_millis(400)).await;
        let total = charged(&gw, id).await;
        let lasted = lasted.as_millis() as i64;
        assert!(
            (2_800..=lasted + 400).contains(&total),
            "{total} ms charged for a {lasted} ms connection"
        );
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_websocket_is_closed_with_1008_when_the_balance_runs_out() {
        let (app, _task) = echo_app().await;
        let gw = Gateway::start(app, ws_settings()).await;
        let (id, key) = gw.create_key("Ada", "0.00055556"); // 2 s
        let (closed, lasted, _) = talk(&gw, &key, 10).await;
        assert_eq!(closed, Some(CloseCode::Policy), "ended after {lasted:?}");
        assert!(
            (Duration::from_millis(1_900)..=Duration::from_millis(3_000)).contains(&lasted),
            "cut off after {lasted:?} on 2 s of balance"
        );
        gw.wait_for(
            &format!(
                "SELECT count(*) FROM access_logs WHERE license_id = {id} AND outcome = 'balance_exhausted'"
            ),
            1,
        )
        .await;
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_quiet_websocket_is_closed_with_1008_when_the_balance_runs_out() {
        let (app, _task) = echo_app().await;
        let gw = Gateway::start(app, ws_settings()).await;
        let (id, key) = gw.create_key("Ada", "0.00055556"); // 2 s
        common::ws::expect_quiet_websocket_cut_off(&gw, id, &key).await;
    }
}

/// Issue 16, item 9. Before the fix a request its client abandoned was logged as status 0 with
/// outcome `ok`, and Pingora logged it at ERROR.
#[tokio::test(flavor = "multi_thread")]
async fn a_request_its_client_abandons_is_logged_as_client_closed() {
    let up = Upstream::start().await;
    let gw = Gateway::start(up.addr, Settings::default()).await;
    let (id, key) = gw.create_key("Ada", "1");
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let r = impatient
        .get(gw.url("/slow?sleep_ms=1500"))
        .header("X-License-Key", &key)
        .send()
        .await;
    assert!(r.is_err(), "the client gave up");
    gw.wait_for(
        &format!(
            "SELECT count(*) FROM access_logs WHERE license_id = {id} AND outcome = 'client_closed'"
        ),
        1,
    )
    .await;
    assert!(!gw.log().contains("Fail to proxy"), "{}", gw.log());
}

/// Issue 34: a plan that includes 2 s a period, no prepaid hours, the period ending 1.2 s
/// into a 2.6-second stream: the stream runs on into the next period's allowance instead of
/// being ended for the old one's, and each period's allowance is taken once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stream_runs_on_into_the_next_periods_included_time() {
    let up = Upstream::start().await;
    let gw = Gateway::start(
        up.addr,
        Settings {
            mode: "request_time",
            flush_interval_ms: 200,
            refresh_interval_ms: 100,
            plans: "[[plans]]\nname = \"free\"\nincluded_hours = 0.00055556\n".into(),
            ..Settings::default()
        },
    )
    .await;
    let (id, key) = gw.create_key("Ada", "0");
    // the period ends 1.2 s after the stream begins: an anchor with a monthly boundary there
    let anchor = anchor_ending_at(wall_ms() + 1_700);
    gw.execute(&format!(
        "UPDATE licenses SET period_anchor = {anchor}, version = version + 1, updated_at = {} \
         WHERE id = {id}",
        wall_ms()
    ));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let c = client();
    let started = Instant::now();
    let r = c
        .get(gw.url("/events?stream_ms=2600"))
        .header("X-License-Key", &key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body = r.text().await.unwrap_or_default();
    let lasted = started.elapsed().as_millis() as i64;
    assert!(
        lasted >= 2_500,
        "the stream was ended after {lasted} ms: the new period's allowance was not given"
    );
    assert!(
        body.matches("data: tick").count() >= 20,
        "{lasted} ms: {body}"
    );
    gw.wait_for(
        &format!("SELECT requests_total FROM licenses WHERE id = {id}"),
        1,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let included = gw.count(&format!(
        "SELECT coalesce(sum(included_ms), 0) FROM usage_history WHERE license_id = {id}"
    ));
    let b = gw.books(id);
    assert_eq!(b.history_sum_ms, b.balance_ms, "{b:?}");
    assert_eq!(b.used_ms, included - b.balance_ms, "{b:?}");
    // about 1.2 s of the first period's 2 s, and the rest of the 2.6 s from the next one's
    // (with what was pending at the boundary): more than one period's allowance, none from
    // the balance
    assert!(
        (2_400..=3_000).contains(&included),
        "{included} ms included, {b:?}"
    );
    assert_eq!(b.balance_ms, 0, "nothing from the (empty) balance: {b:?}");
}
