//! The operator console and the customers' payment page in a real browser (headless Chromium
//! over the DevTools protocol) against the real gateway on loopback, with the fake Stripe's
//! hosted checkout page. Each test saves screenshots under `target/screenshots/`.

mod common;

use std::time::Duration;

use common::browser::Browser;
use common::stripe::{deliver, FakeStripe};
use common::*;
use serde_json::{json, Value};

const HOUR_MS: i64 = 3_600_000;

struct Site {
    _up: Upstream,
    stripe: FakeStripe,
    gw: Gateway,
}

async fn site() -> Site {
    let up = Upstream::start().await;
    let stripe = FakeStripe::start(STRIPE_KEY).await;
    let gw = Gateway::start(
        up.addr,
        Settings {
            stripe_api_base: Some(stripe.api_base()),
            ..Settings::default()
        },
    )
    .await;
    Site {
        _up: up,
        stripe,
        gw,
    }
}

async fn sign_in(b: &mut Browser, gw: &Gateway) {
    b.goto(&gw.admin_url("/")).await;
    assert_eq!(b.text("h1").await, "Sign in");
    b.type_into("#f-token", ADMIN_TOKEN).await;
    b.click_and_wait("form[action='/console/sign-in'] button")
        .await;
    assert_eq!(b.text("h1").await, "Dashboard");
}

/// Proxied requests with `key`, so the charts and tables have something to show.
async fn use_key(gw: &Gateway, key: &str, n: usize) {
    let c = client();
    for i in 0..n {
        let r = c
            .get(gw.url(&format!("/api/items/{}?sleep_ms=20", i % 3)))
            .header("X-License-Key", key)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
}

async fn proxy_status(gw: &Gateway, key: &str) -> u16 {
    gw.get_with_key(&client(), "/x", key)
        .await
        .status()
        .as_u16()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_operator_signs_in_creates_a_license_reads_its_key_and_adds_hours() {
    let s = site().await;
    let gw = &s.gw;
    let mut b = Browser::start(1440).await;
    sign_in(&mut b, gw).await;

    // the token lives only in the server's memory: an HttpOnly, SameSite=Strict session cookie,
    // nothing in the URL, nothing readable by scripts, nothing in storage
    let cookies = b.cookies().await;
    let session = cookies
        .iter()
        .find(|c| c["name"] == "tg_session")
        .expect("a session cookie");
    assert_eq!(session["httpOnly"], true);
    assert_eq!(session["sameSite"], "Strict");
    assert!(!session["value"].as_str().unwrap().contains(ADMIN_TOKEN));
    assert!(!b.url().await.contains(ADMIN_TOKEN));
    assert_eq!(b.eval("document.cookie").await, "");
    assert_eq!(
        b.eval("localStorage.length + sessionStorage.length").await,
        0
    );
    b.screenshot("console-dashboard").await;

    // create a license; the key is shown once, with a copy button
    b.click_and_wait("a[href='/console/licenses']").await;
    b.click_and_wait("a[href='/console/licenses/new']").await;
    b.type_into("#f-name", "Ada Lovelace").await;
    b.type_into("#f-email", "ada@example.com").await;
    b.type_into("#f-company", "Analytical Engines").await;
    b.type_into("#f-hours", "2").await;
    b.click_and_wait("form[action='/console/licenses'] button")
        .await;
    assert_eq!(b.text("h1").await, "License created");
    let key = b.eval("document.querySelector('#new-key').value").await;
    let key = key.as_str().unwrap().to_string();
    assert!(key.starts_with("tg_"), "{key}");
    assert_eq!(
        b.eval("document.querySelector('button.copy').hidden").await,
        false,
        "the copy button is shown when scripts run"
    );
    b.click("button.copy").await;
    b.wait_for("document.querySelector('.copied').textContent.includes('Copied')")
        .await;
    b.screenshot("console-license-created").await;
    // the form's answer was a redirect: reloading shows the page again, not the key, and makes
    // no second license
    let here = b.url().await;
    b.goto(&here).await;
    assert_eq!(b.text("h1").await, "License created");
    assert!(!b.exists("#new-key").await, "the key is shown once");
    assert_eq!(
        gw.count("SELECT count(*) FROM licenses WHERE name = 'Ada Lovelace'"),
        1
    );

    // the key read off the page works at the proxy
    assert_eq!(proxy_status(gw, &key).await, 200);
    use_key(gw, &key, 12).await;
    let id: i64 = gw.count("SELECT id FROM licenses WHERE name = 'Ada Lovelace'");
    gw.wait_for(
        &format!("SELECT count(*) FROM access_logs WHERE license_id = {id}"),
        13,
    )
    .await;

    // add hours on the license page and see the balance change
    b.click_and_wait(&format!("a[href='/console/licenses/{id}']"))
        .await;
    assert_eq!(b.text("h1").await, "Ada Lovelace");
    let before = books(&gw.db(), id).balance_ms;
    b.type_into("#f-hours-hours", "3").await;
    b.type_into("#f-hours-reason", "goodwill").await;
    b.click_and_wait("form[action$='/hours'] button").await;
    assert!(b.text(".notice.ok").await.contains("hours were added"));
    assert_eq!(books(&gw.db(), id).balance_ms, before + 3 * HOUR_MS);
    let shown = b.text(".stats .stat:first-child .value").await;
    let shown_ms = (shown.parse::<f64>().unwrap() * HOUR_MS as f64).round() as i64;
    let live = books(&gw.db(), id).balance_ms;
    assert!(
        // three decimals of an hour: within 1.8 s
        (shown_ms - live).abs() <= 1_800 && shown_ms > 4 * HOUR_MS,
        "the page shows {shown} hours, the books {live} ms"
    );
    // charts, sessions, requests and history are on the page
    assert_eq!(
        b.eval("document.querySelectorAll('svg.bars').length").await,
        2
    );
    assert!(
        b.eval("document.querySelectorAll('svg.bars rect[height]:not([height=\"0.0\"])').length")
            .await
            .as_u64()
            .unwrap()
            >= 1
    );
    let page_text = b.eval("document.body.innerText").await;
    let page_text = page_text.as_str().unwrap();
    for expected in [
        "Recent requests",
        "GET /api/items/0",
        "goodwill",
        "Sessions",
    ] {
        assert!(page_text.contains(expected), "no {expected:?} on the page");
    }
    b.screenshot("console-license-page").await;

    // a wrong amount is explained next to the field, and changes nothing
    b.type_into("#f-deduct-hours", "0").await;
    b.click_and_wait("form[action$='/deduct'] button").await;
    assert!(b
        .text("#f-deduct-hours-error")
        .await
        .contains("more than zero"));
    assert_eq!(
        b.eval("document.querySelector('#f-deduct-hours').getAttribute('aria-invalid')")
            .await,
        "true"
    );
    assert_eq!(books(&gw.db(), id).balance_ms, live);

    // the list finds it by search and filters it out by status
    b.goto(&gw.admin_url("/console/licenses?q=Lovelace")).await;
    assert!(b.text("table.licenses").await.contains("Ada Lovelace"));
    b.goto(&gw.admin_url("/console/licenses?status=revoked"))
        .await;
    assert!(!b.exists("table.licenses").await);

    // rotate the key: the new one is shown once and works, the old one no longer does
    b.goto(&gw.admin_url(&format!("/console/licenses/{id}")))
        .await;
    b.click_and_wait("form[action$='/rotate'] button").await;
    let rotated = b.eval("document.querySelector('#new-key').value").await;
    let rotated = rotated.as_str().unwrap().to_string();
    assert_ne!(rotated, key);
    assert_eq!(proxy_status(gw, &rotated).await, 200);
    assert_eq!(proxy_status(gw, &key).await, 401);
    let here = b.url().await;
    b.goto(&here).await;
    assert!(!b.exists("#new-key").await, "a rotated key is shown once");
    let key = rotated;

    // revoke from the license page: the key stops working
    b.goto(&gw.admin_url(&format!("/console/licenses/{id}")))
        .await;
    b.click("details summary").await;
    b.click_and_wait("form[action$='/revoke'] button").await;
    assert_eq!(b.text(".badge").await, "revoked");
    assert_eq!(proxy_status(gw, &key).await, 403);

    // readable on a phone: nothing wider than the screen but the tables' own scrolling
    b.set_width(375).await;
    b.goto(&gw.admin_url(&format!("/console/licenses/{id}")))
        .await;
    let overflow = b
        .eval("document.documentElement.scrollWidth - window.innerWidth")
        .await;
    assert!(
        overflow.as_i64().unwrap() <= 0,
        "the page is {overflow} px too wide at 375 px"
    );
    b.screenshot("console-license-page-375").await;
    b.set_width(1440).await;

    // pagination: 30 more licenses make two pages
    for i in 0..30 {
        gw.create_key(&format!("Bulk {i:02}"), "1");
    }
    b.goto(&gw.admin_url("/console/licenses?q=Bulk")).await;
    assert_eq!(
        b.eval("document.querySelectorAll('table.licenses tbody tr').length")
            .await,
        25
    );
    b.click_and_wait("a[rel='next']").await;
    assert_eq!(
        b.eval("document.querySelectorAll('table.licenses tbody tr').length")
            .await,
        5
    );
    assert!(b.url().await.contains("q=Bulk"), "the search is kept");

    // signing out ends the session
    b.click_and_wait("form[action='/console/sign-out'] button")
        .await;
    assert_eq!(b.text("h1").await, "Sign in");
    b.goto(&gw.admin_url("/console/licenses")).await;
    assert_eq!(b.text("h1").await, "Sign in");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_token_shows_an_error_and_grants_nothing() {
    let s = site().await;
    let gw = &s.gw;
    let mut b = Browser::start(1440).await;
    b.goto(&gw.admin_url("/")).await;
    b.type_into("#f-token", "not-the-token").await;
    b.click_and_wait("form[action='/console/sign-in'] button")
        .await;
    assert_eq!(b.text("h1").await, "Sign in");
    assert!(b
        .text("#f-token-error")
        .await
        .contains("not the admin token"));
    assert!(b.cookies().await.iter().all(|c| c["name"] != "tg_session"));
    b.screenshot("console-wrong-token").await;
    b.goto(&gw.admin_url("/console/licenses")).await;
    assert_eq!(b.text("h1").await, "Sign in", "no way in without the token");

    // the same over plain HTTP: 401 and no cookie
    let c = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let r = c
        .post(gw.admin_url("/console/sign-in"))
        .form(&[("token", "not-the-token")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.headers().get("set-cookie").is_none());
    // a made-up session cookie is no session
    let r = c
        .get(gw.admin_url("/console/licenses"))
        .header("Cookie", format!("tg_session={}", "ab".repeat(32)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(r.headers()["location"], "/");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_customer_buys_a_package_through_stripe_and_sees_the_credited_balance() {
    let s = site().await;
    let gw = &s.gw;
    let (id, key) = gw.create_key("Grace", "1");
    use_key(gw, &key, 8).await;
    gw.wait_for(
        &format!("SELECT count(*) FROM access_logs WHERE license_id = {id}"),
        8,
    )
    .await;

    let mut b = Browser::start(1440).await;
    b.goto(&gw.admin_url("/payments/")).await;
    assert_eq!(b.text("h1").await, "Your hours");
    // a wrong key is explained next to the field
    b.type_into("#f-license_key", "tg_not_a_key").await;
    b.click_and_wait("form[action='/payments/'] button").await;
    assert!(b.text("#f-license_key-error").await.contains("not valid"));
    b.type_into("#f-license_key", &key).await;
    b.click_and_wait("form[action='/payments/'] button").await;
    assert!(
        !b.url().await.contains(&key),
        "a typed key stays out of the URL"
    );
    let shown: f64 = b.text("#hours-remaining").await.parse().unwrap();
    assert!((0.99..=1.0).contains(&shown), "{shown} hours shown");
    assert_eq!(
        b.eval("document.querySelectorAll('svg.bars').length").await,
        2
    );
    b.screenshot("payments-account").await;

    // custom hours left empty: the error is next to the field
    b.click("#pkg-custom").await;
    b.click_and_wait("form[action='/payments/checkout'] button")
        .await;
    assert!(b.text("#f-hours-error").await.contains("whole number"));
    assert!(s.stripe.sessions().is_empty());

    // the choice and the error are kept; then the first package (5 hours), paid on the fake
    // Stripe's hosted page
    assert_eq!(
        b.eval("document.querySelector('#pkg-custom').checked")
            .await,
        true
    );
    b.click("#pkg-0").await;
    b.click_and_wait("form[action='/payments/checkout'] button")
        .await;
    assert!(b.url().await.starts_with(&s.stripe.api_base()), "at Stripe");
    b.screenshot("payments-stripe").await;
    b.click_and_wait("#pay").await;
    assert!(b.url().await.contains("/payments/success?session_id="));
    assert_eq!(b.text("h1").await, "Payment paid");
    let after: f64 = b.text("#hours-remaining").await.parse().unwrap();
    assert!((5.99..=6.0).contains(&after), "{after} hours after paying");
    b.screenshot("payments-success").await;
    let books_after = books(&gw.db(), id);
    assert_eq!(books_after.history_sum_ms, books_after.balance_ms);

    // Stripe's webhook for the same session arrives too: still credited once
    let sessions = s.stripe.sessions();
    assert_eq!(sessions.len(), 1);
    let paid = s
        .stripe
        .session(sessions[0]["id"].as_str().unwrap())
        .unwrap();
    assert_eq!(paid["metadata"]["hours"], "5");
    let (_, event) = s.stripe.event("checkout.session.completed", paid);
    let r = deliver(
        &client(),
        &gw.admin_url("/payments/webhook"),
        WEBHOOK_SECRET,
        &event,
    )
    .await;
    assert!(r.status().is_success());
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        gw.count(&format!(
            "SELECT count(*) FROM usage_history WHERE license_id = {id} AND kind = 'purchase'"
        )),
        1
    );
    assert_eq!(books(&gw.db(), id).balance_ms, books_after.balance_ms);

    // back on the account page: the payment is listed as paid
    b.goto(&gw.admin_url(&format!("/payments/?license_key={key}")))
        .await;
    let text = b.eval("document.body.innerText").await;
    let text = text.as_str().unwrap();
    assert!(
        text.contains("25.00 USD") && text.contains("paid"),
        "{text}"
    );
    b.set_width(375).await;
    b.goto(&gw.admin_url(&format!("/payments/?license_key={key}")))
        .await;
    let overflow = b
        .eval("document.documentElement.scrollWidth - window.innerWidth")
        .await;
    assert!(
        overflow.as_i64().unwrap() <= 0,
        "{overflow} px too wide at 375 px"
    );
    b.screenshot("payments-account-375").await;
}

/// A page on another origin (another port of loopback: same site, so SameSite cookies are
/// sent along) whose form posts itself to the gateway as soon as it loads.
async fn attacker(
    form_action: &str,
    fields: &[(&str, &str)],
) -> (String, tokio::task::JoinHandle<()>) {
    let inputs: String = fields
        .iter()
        .map(|(k, v)| format!("<input type=\"hidden\" name=\"{k}\" value=\"{v}\">"))
        .collect();
    let html = format!(
        "<!doctype html><html><body><form id=\"f\" method=\"post\" action=\"{form_action}\">\
         {inputs}</form><script>document.getElementById('f').submit();</script></body></html>"
    );
    let app = axum::Router::new().route(
        "/",
        axum::routing::get(move || {
            let html = html.clone();
            async move { axum::response::Html(html) }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/", listener.local_addr().unwrap());
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (url, task)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cross_site_form_post_is_refused() {
    let s = site().await;
    let gw = &s.gw;
    let (id, key) = gw.create_key("Target", "1");
    let mut b = Browser::start(1440).await;
    sign_in(&mut b, gw).await;

    // another site's form, posted with the operator's session cookie
    let revoke = gw.admin_url(&format!("/console/licenses/{id}/revoke"));
    let (evil, _task) = attacker(&revoke, &[("csrf", "guess")]).await;
    b.goto(&evil).await;
    b.wait_for("location.href.includes('/revoke') && document.readyState === 'complete'")
        .await;
    assert_eq!(b.text("h1").await, "Refused");
    b.screenshot("console-csrf-refused").await;
    assert_eq!(
        gw.count(&format!(
            "SELECT count(*) FROM licenses WHERE id = {id} AND status = 'active'"
        )),
        1
    );
    assert_eq!(proxy_status(gw, &key).await, 200);

    // even with the right token, a post from another origin is refused
    let csrf = {
        b.goto(&gw.admin_url(&format!("/console/licenses/{id}")))
            .await;
        b.eval("document.querySelector('input[name=csrf]').value")
            .await
    };
    let (evil, _task2) = attacker(&revoke, &[("csrf", csrf.as_str().unwrap())]).await;
    b.goto(&evil).await;
    b.wait_for("location.href.includes('/revoke') && document.readyState === 'complete'")
        .await;
    assert_eq!(b.text("h1").await, "Refused");
    assert_eq!(proxy_status(gw, &key).await, 200);

    // the customers' checkout form too, even with this browser's real form token: no
    // Checkout Session is made
    b.goto(&gw.admin_url(&format!("/payments/?license_key={key}")))
        .await;
    let token = b
        .eval("document.querySelector('input[name=csrf]').value")
        .await;
    let checkout = gw.admin_url("/payments/checkout");
    let (evil, _task3) = attacker(
        &checkout,
        &[
            ("license_key", &key),
            ("choice", "package:small"),
            ("csrf", token.as_str().unwrap()),
        ],
    )
    .await;
    b.goto(&evil).await;
    b.wait_for(
        "location.href.includes('/payments/checkout') && document.readyState === 'complete'",
    )
    .await;
    assert_eq!(b.text("h1").await, "Refused");
    assert!(s.stripe.sessions().is_empty());

    // and the same forms from the console itself go through
    b.goto(&gw.admin_url(&format!("/console/licenses/{id}")))
        .await;
    b.click("details summary").await;
    b.click_and_wait("form[action$='/revoke'] button").await;
    assert_eq!(b.text(".badge").await, "revoked");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_license_named_like_a_script_is_shown_as_text() {
    let s = site().await;
    let gw = &s.gw;
    let name = "<script>alert(1)</script>";
    let r = gw
        .api(&client(), reqwest::Method::POST, "/api/licenses")
        .json(&json!({"name": name, "company": "<img src=x onerror=alert(2)>", "hours": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let id = r.json::<Value>().await.unwrap()["id"].as_i64().unwrap();
    let mut b = Browser::start(1440).await;
    sign_in(&mut b, gw).await;
    for path in [
        "/console/licenses".to_string(),
        format!("/console/licenses/{id}"),
    ] {
        b.goto(&gw.admin_url(&path)).await;
        let text = b.eval("document.body.innerText").await;
        assert!(
            text.as_str().unwrap().contains(name),
            "{path}: not shown as text"
        );
        assert_eq!(
            b.eval("document.querySelectorAll('main script, main img').length")
                .await,
            0,
            "{path}: markup from the name became elements"
        );
    }
    assert_eq!(b.text("h1").await, name);
    b.screenshot("console-xss-as-text").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    b.eval("1").await; // collects any dialog event
    assert!(b.dialogs.is_empty(), "a dialog opened: {:?}", b.dialogs);
}
