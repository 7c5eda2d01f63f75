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

// what the console reads and writes, on SQLite and on PostgreSQL
on_each_store!(
    an_operator_signs_in_creates_a_license_reads_its_key_and_adds_hours,
    a_customer_buys_a_package_through_stripe_and_sees_the_credited_balance,
    the_payment_page_shows_the_time_left_exactly_and_warns_before_it_runs_out,
);

/// A plan that includes time, sold as a subscription, chosen on the payment page.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_customer_subscribes_on_the_payment_page_and_sees_what_the_plan_includes() {
    let up = Upstream::start().await;
    let stripe = FakeStripe::start(STRIPE_KEY).await;
    let gw = Gateway::start(
        up.addr,
        Settings {
            stripe_api_base: Some(stripe.api_base()),
            plans: "[[plans]]\nname = \"free\"\n\
                    [[plans]]\nname = \"pro\"\nincluded_minutes = 30\nprice_cents = 2000\n"
                .into(),
            ..Settings::default()
        },
    )
    .await;
    let (id, key) = gw.create_key("Grace", "1");
    let mut b = Browser::start(1440).await;
    b.goto(&gw.admin_url(&format!("/payments/?license_key={key}")))
        .await;
    let offer = b.text("#your-plan").await;
    assert!(
        offer.contains("pro") && offer.contains("20.00 USD a month") && offer.contains("30 min"),
        "{offer}"
    );
    b.screenshot("plans-offered").await;
    b.click_and_wait("#subscribe-pro").await;
    assert!(b.url().await.starts_with(&stripe.api_base()), "at Stripe");
    let sessions = stripe.sessions();
    assert_eq!(sessions[0]["mode"], "subscription");
    b.click_and_wait("#pay").await;
    assert!(b.url().await.contains("/payments/success?session_id="));
    assert_eq!(b.text("h1").await, "Subscribed to pro");
    // the browser that started it sees the license's plan: not yet pro until Stripe says paid
    assert!(b.text("#plan-now").await.contains("free"));
    b.screenshot("plans-subscribed").await;

    // Stripe reports the first invoice paid
    let session = stripe.session(sessions[0]["id"].as_str().unwrap()).unwrap();
    let sub = session["subscription"].as_str().unwrap();
    let (_, event) = stripe.event("invoice.paid", stripe.invoice(sub, true));
    let r = deliver(
        &client(),
        &gw.admin_url("/payments/webhook"),
        WEBHOOK_SECRET,
        &event,
    )
    .await;
    assert!(r.status().is_success());
    gw.wait_for(
        &format!("SELECT count(*) FROM licenses WHERE id = {id} AND plan = 'pro'"),
        1,
    )
    .await;

    // back on the account page: the plan, what it includes and what is left of both
    b.goto(&gw.admin_url(&format!("/payments/?license_key={key}")))
        .await;
    let state = b.text("#subscription-state").await;
    assert!(
        state.contains("Subscribed to pro") && state.contains("renews"),
        "{state}"
    );
    let text = b.eval("document.body.innerText").await;
    let text = text.as_str().unwrap();
    assert!(
        text.contains("Included this period (spent first)"),
        "{text}"
    );
    assert!(text.contains("30 min"), "{text}");
    // the headline: what the plan includes (spent first) beside the prepaid balance
    assert_eq!(b.text("#included-remaining").await, "30 min");
    assert_eq!(b.text("#hours-remaining").await, "1 h");
    assert!(!b.exists("#subscribe-pro").await, "nothing higher to offer");
    b.screenshot("plans-account").await;
    // the portal, for changing the plan or the card, or cancelling
    b.click_and_wait("#manage-subscription").await;
    assert!(b
        .url()
        .await
        .starts_with(&format!("{}/portal/", stripe.api_base())));
    assert_eq!(b.text("h1").await, "Customer Portal");
}

struct Site {
    _up: Upstream,
    stripe: FakeStripe,
    gw: Gateway,
}

async fn site(store: Store) -> Site {
    let up = Upstream::start().await;
    let stripe = FakeStripe::start(STRIPE_KEY).await;
    let gw = Gateway::start(
        up.addr,
        Settings {
            stripe_api_base: Some(stripe.api_base()),
            ..Settings::on(store)
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

/// The milliseconds of an exact value as the pages write it in a `title`: `3,599,000 ms`.
fn exact_ms(title: &Value) -> i64 {
    let t = title.as_str().expect("a title");
    t.strip_suffix(" ms")
        .unwrap_or_else(|| panic!("{t:?} is no exact value"))
        .replace(',', "")
        .parse()
        .unwrap_or_else(|_| panic!("{t:?} is no exact value"))
}

/// A chart's scale, today's bar's tooltip and the first row of its table (today), which
/// must all say the same; and how many days are marked as without data.
async fn chart(b: &mut Browser, id: &str) -> (String, String, String, u64) {
    let fig = format!("document.getElementById('{id}-title').closest('figure')");
    let q = |sel: &str, what: &str| format!("{fig}.querySelector('{sel}').{what}");
    let scale = b.eval(&q("text.max", "textContent")).await;
    let bar = b
        .eval(&q("svg .bar:last-of-type title", "textContent"))
        .await;
    let cell = b
        .eval(&q("tbody tr:first-child td:last-child", "textContent"))
        .await;
    let missing = b
        .eval(&format!("{fig}.querySelectorAll('svg rect.nodata').length"))
        .await;
    (
        scale.as_str().unwrap().to_string(),
        bar.as_str().unwrap().to_string(),
        cell.as_str().unwrap().to_string(),
        missing.as_u64().unwrap(),
    )
}

/// The console's keys section: an operator adds a key with a limit of its own (shown once,
/// working at the proxy at once), is told what is wrong with a key without a name, revokes the
/// new key (refused at once, its sibling served) and rotates the first one (the old secret
/// refused, the new one served); the table shows each key's state, limits and use.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_operator_adds_revokes_and_rotates_a_key_of_a_license() {
    let s = site(Store::Sqlite).await;
    let gw = &s.gw;
    let c = client();
    let (status, created) = json_of(
        gw.api(&c, reqwest::Method::POST, "/api/licenses")
            .json(&json!({"name": "Team", "hours": 1}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 201);
    let id = created["id"].as_i64().unwrap();
    let first = created["license_key"].as_str().unwrap().to_string();
    use_key(gw, &first, 3).await;

    let mut b = Browser::start(1440).await;
    sign_in(&mut b, gw).await;
    b.goto(&gw.admin_url(&format!("/console/licenses/{id}")))
        .await;
    assert_eq!(b.text("#keys h2").await, "Keys");
    assert!(b.text("#keys table").await.contains("default"));

    // a key without a name: the form says so, nothing is added
    b.click("#keys summary").await;
    b.click_and_wait("form[action$='/keys'] button").await;
    assert!(b.exists("#f-key-name-error").await, "the name is required");
    assert_eq!(
        gw.count(&format!(
            "SELECT count(*) FROM license_keys WHERE license_id = {id}"
        )),
        1
    );

    // a key with a rate of its own: shown once, working at once
    b.type_into("#f-key-name", "laptop").await;
    b.type_into("#f-key-requests_per_second", "5").await;
    b.click_and_wait("form[action$='/keys'] button").await;
    assert!(b.text(".notice.ok").await.contains("key was added"));
    let added = b.eval("document.querySelector('#new-key').value").await;
    let added = added.as_str().unwrap().to_string();
    assert!(added.starts_with("tg_"), "{added}");
    assert_eq!(proxy_status(gw, &added).await, 200);
    let table = b.text("#keys table").await;
    assert!(table.contains("laptop") && table.contains("5/s"), "{table}");
    b.screenshot("console-license-keys").await;
    let key_id = |name: &str| {
        gw.count(&format!(
            "SELECT id FROM license_keys WHERE license_id = {id} AND name = '{name}'"
        ))
    };
    let (first_id, added_id) = (key_id("default"), key_id("laptop"));

    // revoke the new key: refused at once, the first served
    b.click_and_wait(&format!("form[action$='/keys/{added_id}/revoke'] button"))
        .await;
    assert!(b.text(".notice.ok").await.contains("key was revoked"));
    assert_eq!(proxy_status(gw, &added).await, 401);
    assert_eq!(proxy_status(gw, &first).await, 200);
    assert!(
        !b.exists(&format!("form[action$='/keys/{added_id}/revoke']"))
            .await
    );

    // rotate the first: the old secret refused, the new one served, the same license
    b.click_and_wait(&format!("form[action$='/keys/{first_id}/rotate'] button"))
        .await;
    assert!(b.text(".notice.ok").await.contains("key was rotated"));
    let rotated = b.eval("document.querySelector('#new-key').value").await;
    let rotated = rotated.as_str().unwrap().to_string();
    assert_eq!(proxy_status(gw, &first).await, 401);
    assert_eq!(proxy_status(gw, &rotated).await, 200);
    // loading it again shows the page, not the key (without the #keys fragment, which would
    // only scroll)
    let here = b.url().await;
    let here = here.split('#').next().unwrap().to_string();
    b.goto(&here).await;
    assert!(!b.exists("#new-key").await, "the key is shown once");
    // the first key's use, once flushed, in its row
    gw.wait_for(
        &format!("SELECT count(*) FROM key_daily WHERE key_id = {first_id}"),
        1,
    )
    .await;
    b.goto(&gw.admin_url(&format!("/console/licenses/{id}")))
        .await;
    let row = b
        .eval(
            "[...document.querySelectorAll('#keys tbody tr')]\
             .find(r => r.textContent.includes('default')).textContent",
        )
        .await;
    assert!(!row.as_str().unwrap().contains("never"), "last used: {row}");
}

async fn proxy_status(gw: &Gateway, key: &str) -> u16 {
    gw.get_with_key(&client(), "/x", key)
        .await
        .status()
        .as_u16()
}

async fn an_operator_signs_in_creates_a_license_reads_its_key_and_adds_hours(store: Store) {
    let s = site(store).await;
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
    let before = gw.books(id).balance_ms;
    b.type_into("#f-hours-hours", "3").await;
    b.type_into("#f-hours-reason", "goodwill").await;
    b.click_and_wait("form[action$='/hours'] button").await;
    assert!(b.text(".notice.ok").await.contains("hours were added"));
    assert_eq!(gw.books(id).balance_ms, before + 3 * HOUR_MS);
    // 5 h less the fraction of a second 13 requests took: never rounded up to "5 h", and the
    // exact milliseconds a hover away
    let shown = b.text(".stats .stat:first-child .value").await;
    let shown_ms = exact_ms(
        &b.eval("document.querySelector('.stats .stat:first-child .value .time').title")
            .await,
    );
    let live = gw.books(id);
    assert_eq!(shown, "4 h 59 min", "{shown_ms} ms");
    assert!(
        (shown_ms - live.balance_ms).abs() <= 1_000 && shown_ms < 5 * HOUR_MS,
        "the page shows {shown_ms} ms, the books {} ms",
        live.balance_ms
    );
    let used = b.text(".stats .stat:nth-child(2) .value").await;
    let used_ms = exact_ms(
        &b.eval("document.querySelector('.stats .stat:nth-child(2) .value .time').title")
            .await,
    );
    assert_eq!(used_ms, live.used_ms);
    assert!(
        used_ms < 60_000 && used == format!("{}.{} s", used_ms / 1000, used_ms % 1000 / 100),
        "{used} for {used_ms} ms used"
    );
    let live = live.balance_ms;
    // charts: the scale names its unit and the true maximum, the bar and the table agree with
    // it, and the 29 days before today (the license is new) show as days without data
    assert_eq!(
        b.eval("document.querySelectorAll('svg.bars').length").await,
        2
    );
    assert!(
        b.eval("document.querySelectorAll('svg.bars rect.bar:not([height=\"0.0\"])').length")
            .await
            .as_u64()
            .unwrap()
            >= 1
    );
    let (scale, bar, cell, missing) = chart(&mut b, "lic-calls").await;
    assert_eq!(scale, "max 13 calls");
    assert!(bar.ends_with(": 13 calls"), "{bar}");
    assert_eq!(cell, "13 calls");
    assert_eq!(missing, 29);
    let (scale, bar, cell, missing) = chart(&mut b, "lic-time").await;
    assert_eq!(scale, format!("max {used}"), "today is all the time used");
    assert!(bar.ends_with(&format!(": {used}")), "{bar}");
    assert_eq!(cell, used);
    assert_eq!(missing, 29);
    let page_text = b.eval("document.body.innerText").await;
    let page_text = page_text.as_str().unwrap();
    for expected in [
        "Recent requests",
        "GET /api/items/0",
        "goodwill",
        "Sessions",
        "+3 h",
        "+2 h",
        "No data that day",
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
    assert_eq!(gw.books(id).balance_ms, live);

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
    let s = site(Store::Sqlite).await;
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

async fn a_customer_buys_a_package_through_stripe_and_sees_the_credited_balance(store: Store) {
    let s = site(store).await;
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
    // 1 h less the fraction of a second 8 requests took reads as such, not as "1"
    let shown = b.text("#hours-remaining").await;
    let shown_ms = exact_ms(
        &b.eval("document.querySelector('#hours-remaining').title")
            .await,
    );
    assert!(
        (3_599_000..HOUR_MS).contains(&shown_ms),
        "{shown_ms} ms remaining"
    );
    assert_eq!(shown, "59 min 59 s", "{shown_ms} ms");
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
    let after = b.text("#hours-remaining").await;
    let after_ms = exact_ms(
        &b.eval("document.querySelector('#hours-remaining').title")
            .await,
    );
    assert_eq!(after_ms, shown_ms + 5 * HOUR_MS, "{after} after paying");
    assert_eq!(after, "5 h 59 min");
    assert!(b.text(".notice.ok").await.contains("5 h were added"));
    b.screenshot("payments-success").await;
    let books_after = gw.books(id);
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
    assert_eq!(gw.books(id).balance_ms, books_after.balance_ms);

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

async fn the_payment_page_shows_the_time_left_exactly_and_warns_before_it_runs_out(store: Store) {
    let s = site(store).await;
    let gw = &s.gw;
    // 59 min 59 s: 3599/3600 of an hour
    let (id, key) = gw.create_key("Lin", "0.9997222222222222");
    assert_eq!(gw.books(id).balance_ms, 3_599_000);
    let account = gw.admin_url(&format!("/payments/?license_key={key}"));
    let mut b = Browser::start(1440).await;
    b.goto(&account).await;
    assert_eq!(b.text("#hours-remaining").await, "59 min 59 s");
    assert_eq!(
        b.eval("document.querySelector('#hours-remaining').title")
            .await,
        "3,599,000 ms"
    );
    assert!(
        !b.exists("#low-balance").await,
        "the whole of the last top-up is left"
    );
    // session mode with the default 300 s idle timeout, said as the customer reads it
    let how = b.text("#how-time-counts").await;
    assert!(
        how.contains("from your first request until your last one ends, pauses of up to 5 min"),
        "{how}"
    );
    // prices per hour and per minute, with the decimals they need
    let text = b.eval("document.body.innerText").await;
    let text = text.as_str().unwrap().to_string();
    assert!(
        text.contains("5 h — 25.00 USD · 0.0833 USD a minute"),
        "{text}"
    );
    assert!(
        text.contains("5.00 USD an hour (0.0833 USD a minute)"),
        "{text}"
    );
    // no usage yet: both charts say so
    for id in ["use-time", "use-calls"] {
        let fig = format!("document.getElementById('{id}-title').closest('figure')");
        let scale = b
            .eval(&format!("{fig}.querySelector('text.max').textContent"))
            .await;
        assert_eq!(scale, "no data in these 30 days");
    }

    // under 5 minutes left: said above the purchase form
    let deduct = |hours: f64| {
        gw.api(
            &client(),
            reqwest::Method::POST,
            &format!("/api/licenses/{id}/usage"),
        )
        .json(&json!({"hours": hours, "reason": "test"}))
        .send()
    };
    assert!(deduct(3_329.0 / 3_600.0)
        .await
        .unwrap()
        .status()
        .is_success());
    assert_eq!(gw.books(id).balance_ms, 270_000);
    b.goto(&account).await;
    assert_eq!(b.text("#hours-remaining").await, "4 min 30 s");
    let low = b.text("#low-balance").await;
    assert!(
        low.contains("Your balance is low: 4 min 30 s left, less than 5 min."),
        "{low}"
    );
    assert_eq!(
        b.eval(
            "!!(document.querySelector('#low-balance').compareDocumentPosition(\
             document.querySelector('form[action=\"/payments/checkout\"]')) & \
             Node.DOCUMENT_POSITION_FOLLOWING)"
        )
        .await,
        true,
        "the notice comes before the purchase form"
    );
    let history = b.eval("document.body.innerText").await;
    assert!(
        history.as_str().unwrap().contains("−55 min 29 s"),
        "the deduction in the history: {history}"
    );
    b.screenshot("payments-low-balance").await;

    // a top-up to 5 h 4 min 30 s, then under a tenth of it left: low again
    let credit = gw
        .api(
            &client(),
            reqwest::Method::POST,
            &format!("/api/licenses/{id}/hours"),
        )
        .json(&json!({"hours": 5}))
        .send()
        .await
        .unwrap();
    assert!(credit.status().is_success());
    b.goto(&account).await;
    assert_eq!(b.text("#hours-remaining").await, "5 h 4 min");
    assert!(!b.exists("#low-balance").await);
    // leave 25 min
    assert!(deduct((18_270_000.0 - 1_500_000.0) / 3_600_000.0)
        .await
        .unwrap()
        .status()
        .is_success());
    b.goto(&account).await;
    assert_eq!(b.text("#hours-remaining").await, "25 min");
    let low = b.text("#low-balance").await;
    assert!(
        low.contains("25 min left, less than 10 % of the 5 h 4 min you had after your last top-up"),
        "{low}"
    );

    // overdrawn (a debit past the balance, allowed explicitly): a negative balance, never
    // shown as more than it is, and requests refused
    let overdraw = gw
        .api(
            &client(),
            reqwest::Method::POST,
            &format!("/api/licenses/{id}/usage"),
        )
        .json(&json!({"hours": 1_501_250.0 / 3_600_000.0, "allow_overdraft": true}))
        .send()
        .await
        .unwrap();
    assert!(overdraw.status().is_success());
    b.goto(&account).await;
    assert_eq!(b.text("#hours-remaining").await, "−1.3 s");
    assert!(b.text("#low-balance").await.contains("No time is left"));
    assert_eq!(proxy_status(gw, &key).await, 402);
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
    let s = site(Store::Sqlite).await;
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
    let s = site(Store::Sqlite).await;
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

/// Issue 30, items 9 and 10. A key whose plan allowance for the period is spent is refused
/// (429) whatever its balance: both pages say so and until when, and show the plan's
/// allowances and their use (before: "Time remaining 1 h 58 min", more hours offered, the
/// console "active" with no period use). The balance history is grouped by day and paged on
/// both pages (before: the last 20 rows, unpaged).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_key_its_plan_refuses_says_so_on_both_pages_and_the_history_pages() {
    let up = Upstream::start().await;
    let gw = Gateway::start(
        up.addr,
        Settings {
            plans: "[[plans]]\nname = \"free\"\nperiod_requests = 3\nperiod_hours = 10\n".into(),
            ..Settings::default()
        },
    )
    .await;
    let (id, key) = gw.create_key("Joan", "2");
    let c = client();
    // 30 balance changes: more than a page of history
    for i in 0..30 {
        let r = gw
            .api(
                &c,
                reqwest::Method::POST,
                &format!("/api/licenses/{id}/hours"),
            )
            .json(&json!({"hours": 0.01, "reason": format!("credit {i}")}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    for _ in 0..3 {
        assert_eq!(proxy_status(&gw, &key).await, 200);
    }
    assert_eq!(
        proxy_status(&gw, &key).await,
        429,
        "the period's requests are spent"
    );
    gw.wait_for(
        &format!("SELECT coalesce(sum(requests), 0) FROM usage_history WHERE license_id = {id}"),
        3,
    )
    .await;

    let mut b = Browser::start(1440).await;
    b.goto(&gw.admin_url("/payments/")).await;
    b.type_into("#f-license_key", &key).await;
    b.click_and_wait("form[action='/payments/'] button").await;
    let notices = b.text("#limit-notices").await;
    assert!(
        notices.contains("Requests this period is used up") && notices.contains("refused until"),
        "{notices}"
    );
    assert!(
        b.exists("#blocked-note").await,
        "buying hours is said not to help"
    );
    assert!(
        b.exists("#plan-limits tr[data-limit='period_requests'].spent")
            .await,
        "the spent allowance is marked"
    );
    let time_row = b.text("#plan-limits tr[data-limit='period_hours']").await;
    assert!(time_row.contains("10 h"), "{time_row}");
    b.screenshot("payments-blocked").await;
    // the history: a page of 25 rows under their day, then the older ones
    let rows = "document.querySelectorAll('#balance-history tbody tr:not(.day)').length";
    assert_eq!(b.eval(rows).await, 25);
    assert!(b.text("#balance-history tr.day").await.contains("used"));
    b.click_and_wait("#balance-history form.inline button")
        .await;
    assert!(
        !b.url().await.contains(&key),
        "the key stays out of the URL"
    );
    // 30 credits, the license's creation and its usage: 32 rows, 7 of them older
    assert_eq!(b.eval(rows).await, 7);
    assert!(b.text("#balance-history .pager").await.contains("Newest"));

    sign_in(&mut b, &gw).await;
    b.goto(&gw.admin_url(&format!("/console/licenses/{id}")))
        .await;
    assert!(b.text("#blocked-badge").await.contains("refused until"));
    assert!(b
        .text("#plan-limits-section")
        .await
        .contains("Requests this period is used up"));
    assert!(
        b.exists("#plan-limits tr[data-limit='period_requests'].spent")
            .await
    );
    assert_eq!(b.eval(rows).await, 25);
    b.click_and_wait("#balance-history a[rel='next']").await;
    assert_eq!(b.eval(rows).await, 7);
    b.screenshot("console-license-blocked").await;

    // issue 30, item 13: the list's filter row lines its fields and its button up
    b.goto(&gw.admin_url("/console/licenses")).await;
    let bottoms = b
        .eval(
            "Array.from(document.querySelectorAll('form.filters input, form.filters select, \
             form.filters button')).map(e => Math.round(e.getBoundingClientRect().bottom))",
        )
        .await;
    let bottoms: Vec<i64> = bottoms
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_i64().unwrap())
        .collect();
    assert!(bottoms.len() >= 3, "{bottoms:?}");
    assert!(
        bottoms.iter().all(|b| (b - bottoms[0]).abs() <= 1),
        "the filter row's controls end at {bottoms:?}"
    );
    b.screenshot("console-licenses").await;
}
