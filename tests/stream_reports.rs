//! Usage the app reports at the end of its answer, on the real gateway in front of real apps,
//! on both stores: in an HTTP/2 trailer (an h2c app behind `proxy.upstream_h2`), and in the
//! OpenAI style, as the last `usage` object of a JSON answer or an SSE stream. The report
//! never reaches the client, a missing one charges the reservation, and a stream that ends in
//! the app's failure releases its reservation and charges nothing.

mod common;

use common::llm::{ChatApp, H2App};
use common::*;

async fn get(c: &reqwest::Client, gw: &Gateway, key: &str, path: &str) -> reqwest::Response {
    c.get(gw.url(path))
        .header("X-License-Key", key)
        .header("Tollgate-Usage", "tokens=1")
        .send()
        .await
        .unwrap()
}

/// A stream whose price the app tells in a trailer: charged exactly that; the trailer and the
/// client's forged header stay on their sides; a stream without one is charged its
/// reservation; one
/// the app resets part way charges nothing and gives its reservation back (the next request,
/// which needs the whole balance, is admitted).
async fn a_report_in_an_http2_trailer_is_charged_and_a_reset_stream_releases_its_reservation(
    store: Store,
) {
    let app = H2App::start().await;
    let s = Settings {
        store,
        proxy_extra: "upstream_h2 = true\n".into(),
        extra: r#"
[[meters]]
name = "tokens"
price_ms = 10
max_per_request = 100000

[[routes]]
path = "/*"
charge = "reported"
meters = ["tokens"]
reserve = { tokens = 1000 }
report_from = "trailer"
"#
        .into(),
        ..Settings::on(store)
    };
    let gw = Gateway::start(app.addr, s).await;
    let c = client();
    // 10 800 ms: one reservation of 1 000 tokens (10 000 ms) fits, two do not
    let (id, key) = gw.create_key("llm", "0.003");

    // reset part way: an error for the client, nothing charged, the reservation back
    let r = get(&c, &gw, &key, "/reset").await;
    assert!(r.bytes().await.is_err(), "the client sees the stream break");
    assert!(
        app.last_headers().get("tollgate-usage").is_none(),
        "a client's report never reaches the app"
    );
    assert_eq!(app.last_headers()["x-tollgate-reserved"], "tokens=1000");
    gw.wait_for(
        "SELECT count(*) FROM access_logs WHERE outcome = 'upstream_error'",
        1,
    )
    .await;

    let r = get(&c, &gw, &key, "/stream?tokens=42").await;
    assert_eq!(r.status(), 200, "the reservation came back");
    assert!(r.headers().get("tollgate-usage").is_none());
    assert!(
        r.headers().get("x-usage-charged").is_none(),
        "known only at the end"
    );
    assert_eq!(r.text().await.unwrap(), "chunk0chunk1chunk2");
    gw.wait_for(
        &format!("SELECT balance_ms FROM licenses WHERE id = {id}"),
        10_800 - 420,
    )
    .await;
    gw.wait_for(
        "SELECT count(*) FROM access_logs WHERE units = 'tokens=42, balance_ms=420'",
        1,
    )
    .await;

    // the report on the head counts too, on a route that reads trailers
    let r = get(&c, &gw, &key, "/stream?head=7").await;
    assert_eq!(r.headers()["x-usage-charged"], "tokens=7, balance_ms=70");
    r.text().await.unwrap();
    gw.wait_for(
        &format!("SELECT balance_ms FROM licenses WHERE id = {id}"),
        10_800 - 420 - 70,
    )
    .await;

    // no trailer: the reservation (the report's absence never costs less than it), counted
    let r = get(&c, &gw, &key, "/stream?tokens=5&trailer=none").await;
    assert_eq!(r.text().await.unwrap(), "chunk0chunk1chunk2");
    gw.wait_for(
        "SELECT count(*) FROM access_logs WHERE units = 'tokens=1000, balance_ms=10000'",
        1,
    )
    .await;
    gw.wait_for(
        &format!("SELECT balance_ms FROM licenses WHERE id = {id}"),
        10_800 - 420 - 70 - 10_000,
    )
    .await;
    assert_eq!(
        gw.metric("tollgate_usage_reports_refused_total{reason=\"missing\"}")
            .await,
        1.0
    );
    let b = gw.books(id);
    assert_eq!(b.history_sum_ms, b.balance_ms);
}

/// An OpenAI-style app's last `usage` object prices the call, in a JSON answer and at the end
/// of an SSE stream (past more than the tail the gateway keeps), input and output tokens at
/// their own prices; the answer reaches the client whole; the app is asked for no compression;
/// an answer without usage is charged its reservation.
async fn the_last_usage_object_of_an_openai_answer_prices_the_call(store: Store) {
    let app = ChatApp::start().await;
    let s = Settings {
        store,
        extra: r#"
[[meters]]
name = "input_tokens"
price_ms = 1
max_per_request = 1000000

[[meters]]
name = "completion_tokens"
price_ms = 3
max_per_request = 1000000

[[routes]]
path = "/v1/*"
methods = ["POST"]
charge = "reported"
meters = ["input_tokens", "completion_tokens"]
reserve = { input_tokens = 4000, completion_tokens = 4000 }
report_from = "openai"
"#
        .into(),
        ..Settings::on(store)
    };
    let gw = Gateway::start(app.addr, s).await;
    let c = client();
    let (id, key) = gw.create_key("llm", "1");
    let chat = |q: &str| {
        c.post(gw.url(&format!("/v1/chat/completions?{q}")))
            .header("Authorization", format!("Bearer {key}"))
            .header("Accept-Encoding", "gzip, br")
            .body(r#"{"model":"m","messages":[]}"#)
            .send()
    };
    let r = chat("prompt=100&completion=200").await.unwrap();
    assert_eq!(r.status(), 200);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["usage"]["total_tokens"], 300, "untouched: {body}");
    assert!(app.last_headers().get("accept-encoding").is_none());
    gw.wait_for(
        &format!("SELECT balance_ms FROM licenses WHERE id = {id}"),
        3_600_000 - 700,
    )
    .await;

    // 40 events of 1 000 bytes: far more than the 16 KiB the gateway keeps
    let r = chat("stream=1&events=40&pad=1000&prompt=9&completion=12")
        .await
        .unwrap();
    let text = r.text().await.unwrap();
    assert!(text.ends_with("data: [DONE]\n\n"));
    assert_eq!(text.matches("data: ").count(), 42, "every event arrives");
    gw.wait_for(
        &format!("SELECT balance_ms FROM licenses WHERE id = {id}"),
        3_600_000 - 700 - 45,
    )
    .await;
    gw.wait_for(
        "SELECT count(*) FROM access_logs \
         WHERE units = 'input_tokens=9, completion_tokens=12, balance_ms=45'",
        1,
    )
    .await;

    // a stream without usage (the client did not ask for it): the reservation
    let r = chat("stream=1&usage=none").await.unwrap();
    r.text().await.unwrap();
    gw.wait_for(
        &format!("SELECT balance_ms FROM licenses WHERE id = {id}"),
        3_600_000 - 700 - 45 - 16_000,
    )
    .await;
    assert_eq!(
        gw.metric("tollgate_usage_reports_refused_total{reason=\"missing\"}")
            .await,
        1.0
    );
    gw.wait_for(
        "SELECT coalesce(sum(units), 0) FROM usage_units WHERE meter = 'completion_tokens'",
        4_212,
    )
    .await;
    let b = gw.books(id);
    assert_eq!(b.history_sum_ms, b.balance_ms);
}

on_each_store!(
    a_report_in_an_http2_trailer_is_charged_and_a_reset_stream_releases_its_reservation,
    the_last_usage_object_of_an_openai_answer_prices_the_call,
);
