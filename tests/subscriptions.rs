//! Plans sold as Stripe subscriptions, end to end: the real gateway, the fake Stripe checking
//! the subscription Checkout, the portal and the events as Stripe would, and signed webhooks
//! delivered in any order, repeated and at once, on SQLite and on PostgreSQL.

mod common;

use std::time::Duration;

use common::stripe::{deliver, unix_now, FakeStripe};
use common::*;
use serde_json::{json, Value};

on_each_store!(
    a_customer_subscribes_renews_upgrades_and_downgrades_and_each_event_counts_once,
    a_failed_payment_keeps_the_plan_through_the_grace_then_returns_the_license_to_free,
    a_cancelled_subscription_ends_with_what_was_paid_and_its_refund_takes_no_hours,
);

/// `free` allows 3 requests a period; `pro` (20.00 a month, made at Checkout) 8; `enterprise`
/// (a Price of the dashboard) 50; `starter` is not for sale.
const PLANS: &str = r#"
[[plans]]
name = "free"
period_requests = 3

[[plans]]
name = "starter"
period_requests = 5

[[plans]]
name = "pro"
period_requests = 8
price_cents = 2000
interval = "month"
trial_days = 7

[[plans]]
name = "enterprise"
period_requests = 50
price_cents = 9000
stripe_price = "price_enterprise"
"#;

struct Shop {
    up: Upstream,
    stripe: FakeStripe,
    gw: Gateway,
    c: reqwest::Client,
}

async fn shop(store: Store) -> Shop {
    let up = Upstream::start().await;
    let stripe = FakeStripe::start(STRIPE_KEY).await;
    stripe.add_price("price_enterprise", 9000, "usd", Some("month"));
    // pro's price as made in the dashboard (the portal offers Prices, not Checkout's inline one)
    stripe.add_price("price_pro_dashboard", 2000, "usd", Some("month"));
    let gw = Gateway::start(
        up.addr,
        Settings {
            store,
            stripe_api_base: Some(stripe.api_base()),
            plans: PLANS.into(),
            ..Settings::default()
        },
    )
    .await;
    Shop {
        up,
        stripe,
        gw,
        c: client(),
    }
}

impl Shop {
    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let r = self
            .c
            .post(self.gw.admin_url(path))
            .json(&body)
            .send()
            .await;
        json_of(r.unwrap()).await
    }

    /// Delivers a signed event: the gateway's `result`.
    async fn send(&self, body: &str) -> String {
        let url = self.gw.admin_url("/payments/webhook");
        let r = deliver(&self.c, &url, WEBHOOK_SECRET, body).await;
        assert_eq!(r.status(), 200);
        let v: Value = r.json().await.unwrap();
        v["result"].as_str().unwrap_or_default().to_string()
    }

    async fn event(&self, kind: &str, object: Value) -> String {
        let (_, body) = self.stripe.event(kind, object);
        self.send(&body).await
    }

    /// The license's plan, as stored.
    fn plan(&self, id: i64) -> &'static str {
        let on = |p: &str| {
            let q = format!("SELECT count(*) FROM licenses WHERE id = {id} AND plan = '{p}'");
            self.gw.count(&q) == 1
        };
        ["free", "starter", "pro", "enterprise"]
            .into_iter()
            .find(|p| on(p))
            .expect("one of the plans")
    }

    /// Subscribes `key` to `plan` and completes the Checkout at Stripe: the session and the
    /// subscription's id.
    async fn subscribe(&self, key: &str, plan: &str) -> (Value, String) {
        let (status, v) = self
            .post(
                "/payments/subscribe",
                json!({"license_key": key, "plan": plan}),
            )
            .await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["plan"], plan);
        let session = self.stripe.mark_paid(v["session_id"].as_str().unwrap());
        let sub = session["subscription"].as_str().unwrap().to_string();
        (session, sub)
    }

    /// A request through the proxy: its status, and the plan the app was told.
    async fn call(&self, key: &str) -> (u16, String) {
        let r = self.gw.get_with_key(&self.c, "/x", key).await;
        let status = r.status().as_u16();
        if status != 200 {
            eprintln!("refused: {}", r.text().await.unwrap());
        }
        let plan = self.up.last().headers.get("x-tollgate-plan").cloned();
        (status, plan.unwrap_or_default())
    }

    /// The period's requests left, as `/usage/limits` says.
    async fn requests_left(&self, key: &str) -> i64 {
        let line = limit_line(&self.gw, &self.c, key, "period_requests").await;
        line["remaining"]
            .as_i64()
            .unwrap_or_else(|| panic!("{line}"))
    }

    /// Waits until the period's requests left are `want` (a request's answer reaches the
    /// client before the gateway has counted it); panics after 5 s.
    async fn until_requests_left(&self, key: &str, want: i64) {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let left = self.requests_left(key).await;
            if left == want {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{left} requests left, not {want}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The subscription's grace or paid period runs out now (its end moved to the past, as
    /// days passing would): the sweep returns the license to free.
    async fn run_out(&self, sub: &str, id: i64) {
        self.gw.execute(&format!(
            "UPDATE subscriptions SET ends_at = {} WHERE id = '{sub}'",
            unix_now() * 1000 - 1
        ));
        self.gw
            .wait_for(
                &format!("SELECT count(*) FROM licenses WHERE id = {id} AND plan = 'free'"),
                1,
            )
            .await;
    }

    async fn balance(&self, key: &str) -> Value {
        self.gw
            .customer_json(&self.c, "/payments/balance", key)
            .await
    }
}

async fn a_customer_subscribes_renews_upgrades_and_downgrades_and_each_event_counts_once(
    store: Store,
) {
    let s = shop(store).await;
    let (id, key) = s.gw.create_key("Ada", "1");
    let hours_before = s.gw.books(id).balance_ms;

    // free: 3 requests this period, then a 429 that says where to upgrade
    for _ in 0..3 {
        assert_eq!(s.gw.get_with_key(&s.c, "/x", &key).await.status(), 200);
    }
    let (status, refused) = json_of(s.gw.get_with_key(&s.c, "/x", &key).await).await;
    assert_eq!(
        (status, refused["error"].as_str()),
        (429, Some("quota_exceeded"))
    );
    assert_eq!(
        refused["upgrade_url"].as_str(),
        Some(s.gw.admin_url("/payments").as_str()),
        "{refused}"
    );
    // what is for sale: pro and enterprise, in order, with their prices
    let on_sale = s.gw.customer_json(&s.c, "/payments/packages", &key).await;
    let names: Vec<&str> = on_sale["plans"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["pro", "enterprise"], "{on_sale}");
    assert_eq!(on_sale["plans"][0]["trial_days"], 7);

    // bad input: a plan not for sale, an unknown one, unknown fields; nothing reaches Stripe
    for plan in ["starter", "gold"] {
        let body = json!({"license_key": key, "plan": plan});
        let (status, v) = s.post("/payments/subscribe", body).await;
        assert_eq!(
            (status, v["error"].as_str()),
            (400, Some("bad_request")),
            "{v}"
        );
        assert_eq!(v["plans"], json!(["pro", "enterprise"]), "{v}");
    }
    let (status, _) = s
        .post(
            "/payments/subscribe",
            json!({"license_key": key, "plan": "pro", "x": 1}),
        )
        .await;
    assert_eq!(status, 400);
    let (status, v) = s
        .post(
            "/payments/subscribe",
            json!({"license_key": "tg_nope", "plan": "pro"}),
        )
        .await;
    assert_eq!(
        (status, v["error"].as_str()),
        (401, Some("invalid_license_key"))
    );
    assert!(s.stripe.requests().is_empty());
    // no subscription yet: no portal
    let (status, v) = s
        .post("/payments/portal", json!({"license_key": key}))
        .await;
    assert_eq!(
        (status, v["error"].as_str()),
        (404, Some("not_found")),
        "{v}"
    );

    // subscribe to pro (a second later: Stripe's times are whole seconds): a Checkout in
    // subscription mode, as Stripe wants it
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let pro = json!({"license_key": key, "plan": "pro"});
    let (status, opened) = s.post("/payments/subscribe", pro.clone()).await;
    assert_eq!(status, 200, "{opened}");
    // a second click while that Checkout is open: the same one, not a second subscription
    let (_, again) = s.post("/payments/subscribe", pro).await;
    assert_eq!(again["session_id"], opened["session_id"]);
    assert_eq!(again["checkout_url"], opened["checkout_url"]);
    let other = json!({"license_key": key, "plan": "enterprise"});
    let (status, v) = s.post("/payments/subscribe", other).await;
    assert_eq!(status, 400, "{v}");
    assert!(v["message"].as_str().unwrap().contains("is open"), "{v}");
    assert_eq!(s.stripe.requests().len(), 1);
    let session = s.stripe.mark_paid(opened["session_id"].as_str().unwrap());
    let sub = session["subscription"].as_str().unwrap().to_string();
    let sent = &s.stripe.requests()[0];
    assert_eq!(
        (sent.path.as_str(), sent.status),
        ("/v1/checkout/sessions", 200)
    );
    assert_eq!(sent.headers["stripe-version"], "2024-06-20");
    assert!(sent.idempotency_key.is_some());
    let p = &sent.params;
    assert_eq!(p["mode"], "subscription");
    assert_eq!(p["client_reference_id"], id.to_string());
    let ours = json!({"tollgate_license_id": id.to_string(), "tollgate_plan": "pro"});
    assert_eq!(p["metadata"], ours);
    assert_eq!(
        p["subscription_data"],
        json!({"metadata": ours, "trial_period_days": "7"})
    );
    assert!(
        p["expires_at"].as_str().is_some(),
        "a Checkout left open lapses"
    );
    let price = &p["line_items"][0]["price_data"];
    assert_eq!(
        (price["unit_amount"].as_str(), price["currency"].as_str()),
        (Some("2000"), Some("usd"))
    );
    assert_eq!(price["recurring"]["interval"], "month");
    assert_eq!(session["mode"], "subscription");

    // the session completes: recorded, nothing credited, the plan not yet changed
    let done = s.event("checkout.session.completed", session.clone()).await;
    assert_eq!(done, "subscription_recorded");
    assert_eq!(s.plan(id), "free");
    let purchases =
        format!("SELECT count(*) FROM usage_history WHERE license_id = {id} AND kind = 'purchase'");
    assert_eq!(s.gw.count(&purchases), 0, "no hours for a plan");
    assert!(s.gw.books(id).balance_ms <= hours_before);
    // the trial's $0 invoice is paid: the license is on pro, its period starts now
    let first = s.stripe.invoice(&sub, true);
    assert_eq!(first["amount_paid"], 0, "a trial");
    assert_eq!(s.event("invoice.paid", first).await, "subscription_renewed");
    assert_eq!(s.plan(id), "pro");
    let created = s.stripe.subscription(&sub);
    assert_eq!(
        s.event("customer.subscription.created", created).await,
        "subscription_updated"
    );
    s.gw.wait_for(
        &format!("SELECT count(*) FROM licenses WHERE id = {id} AND plan = 'pro'"),
        1,
    )
    .await;
    // the next request has pro's limits and a new period
    assert_eq!(s.call(&key).await, (200, "pro".into()));
    s.until_requests_left(&key, 7).await;
    let b = s.balance(&key).await;
    assert_eq!(
        (b["plan"].as_str(), b["subscription"]["status"].as_str()),
        (Some("pro"), Some("trialing")),
        "{b}"
    );

    // the portal: for this customer, back to the payment page
    let (status, v) = s
        .post("/payments/portal", json!({"license_key": key}))
        .await;
    assert_eq!(status, 200, "{v}");
    assert!(
        v["url"].as_str().unwrap().contains("/portal/bps_test_"),
        "{v}"
    );
    let asked = s.stripe.requests().last().unwrap().clone();
    assert_eq!(asked.path, "/v1/billing_portal/sessions");
    assert_eq!(asked.params["customer"], session["customer"]);
    assert_eq!(
        asked.params["return_url"].as_str(),
        Some(s.gw.admin_url("/payments").as_str())
    );
    // subscribed: subscribing again is refused (the portal changes plans)
    let (status, v) = s
        .post(
            "/payments/subscribe",
            json!({"license_key": key, "plan": "enterprise"}),
        )
        .await;
    assert_eq!(status, 400, "{v}");

    // a renewal: its invoice.paid delivered 20 times at once, with the subscription's update
    // before and after it; the period restarts once
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let used_before = 8 - s.requests_left(&key).await;
    assert_eq!(used_before, 1);
    let renewal = s.stripe.renew(&sub);
    let updated = s.stripe.subscription(&sub);
    let now = unix_now();
    let (_, update_body) = s
        .stripe
        .event_at("customer.subscription.updated", updated, now);
    let (_, paid_body) = s.stripe.event_at("invoice.paid", renewal.clone(), now);
    assert_eq!(s.send(&update_body).await, "subscription_updated");
    let deliveries = (0..20).map(|_| s.send(&paid_body));
    let results = futures_util::future::join_all(deliveries).await;
    let renewed = results
        .iter()
        .filter(|r| *r == "subscription_renewed")
        .count();
    let duplicates = results.iter().filter(|r| *r == "duplicate").count();
    assert_eq!((renewed, duplicates), (1, 19), "{results:?}");
    assert_eq!(s.send(&update_body).await, "duplicate");
    s.gw.wait_for(
        &format!(
            "SELECT count(*) FROM licenses WHERE id = {id} AND period_anchor = {}",
            renewal["lines"]["data"][0]["period"]["start"]
                .as_i64()
                .unwrap()
                * 1000
        ),
        1,
    )
    .await;
    // the new period is whole (once the node has applied the row: a flush committing at that
    // moment holds it back until it ends)
    s.until_requests_left(&key, 8).await;
    for _ in 0..2 {
        assert_eq!(s.gw.get_with_key(&s.c, "/x", &key).await.status(), 200);
    }
    // the same invoice's other event, and the update again as a new event: nothing resets
    let again = s.event("invoice.paid", renewal.clone()).await;
    assert_eq!(again, "subscription_paid");
    s.until_requests_left(&key, 6).await;
    assert_eq!(
        s.gw.count(&format!(
            "SELECT count(*) FROM subscription_invoices WHERE license_id = {id}"
        )),
        2
    );

    // an upgrade in the portal, mid-period: enterprise's allowance less what the period used
    let up = s.stripe.change_price(&sub, "price_enterprise");
    let (_, up_body) = s
        .stripe
        .event_at("customer.subscription.updated", up, now + 60);
    assert_eq!(s.send(&up_body).await, "subscription_updated");
    assert_eq!(s.plan(id), "enterprise");
    s.gw.wait_for(
        &format!("SELECT count(*) FROM licenses WHERE id = {id} AND plan = 'enterprise'"),
        1,
    )
    .await;
    assert_eq!(s.call(&key).await, (200, "enterprise".into()));
    s.until_requests_left(&key, 50 - 3).await;
    // an older update (the pro one, sent before the upgrade) arrives late: changes nothing
    let old = s.stripe.change_price(&sub, "price_pro_dashboard");
    let (_, old_body) = s
        .stripe
        .event_at("customer.subscription.updated", old.clone(), now + 30);
    assert_eq!(s.send(&old_body).await, "subscription_stale");
    assert_eq!(s.plan(id), "enterprise");
    // the downgrade, applied when Stripe says it (its own schedule deferred it)
    let (_, down_body) = s
        .stripe
        .event_at("customer.subscription.updated", old, now + 90);
    assert_eq!(s.send(&down_body).await, "subscription_updated");
    assert_eq!(
        s.plan(id),
        "pro",
        "matched by amount, currency and interval"
    );

    // the subscription is exported
    let export = s.gw.api_text(&s.c, "/api/export/subscriptions.json").await;
    assert!(
        export.contains(&sub) && export.contains("\"pro\""),
        "{export}"
    );
    // the books, once the last request's flush is in (its rows and the balance commit
    // together; the two reads are apart)
    s.gw.wait_for(
        &format!(
            "SELECT coalesce(sum(requests), 0) FROM usage_history
             WHERE license_id = {id} AND kind = 'usage'"
        ),
        7,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let b = s.gw.books(id);
    assert_eq!(b.history_sum_ms, b.balance_ms, "{b:?}");
}

async fn a_failed_payment_keeps_the_plan_through_the_grace_then_returns_the_license_to_free(
    store: Store,
) {
    let s = shop(store).await;
    let (id, key) = s.gw.create_key("Ada", "1");
    let (session, sub) = s.subscribe(&key, "enterprise").await;
    let sent = &s.stripe.requests()[0].params;
    assert_eq!(sent["line_items"][0]["price"], "price_enterprise");
    // the invoice first, the session's completion after it: any order
    assert_eq!(
        s.event("invoice.paid", s.stripe.invoice(&sub, true)).await,
        "subscription_renewed"
    );
    assert_eq!(
        s.event("checkout.session.completed", session).await,
        "subscription_recorded"
    );
    assert_eq!(s.plan(id), "enterprise");

    // the renewal's payment fails: past due, the plan stays for payments.grace_days (3)
    s.stripe.past_due(&sub);
    let before = unix_now() * 1000;
    let failed = s
        .event("invoice.payment_failed", s.stripe.invoice(&sub, false))
        .await;
    assert_eq!(failed, "grace_started");
    assert_eq!(s.plan(id), "enterprise");
    let b = s.balance(&key).await;
    let grace = gateway::timefmt::parse_rfc3339(b["subscription"]["grace_until"].as_str().unwrap())
        .unwrap();
    let three_days = 3 * 86_400_000;
    assert!(
        (before + three_days - 2_000..=before + three_days + 60_000).contains(&grace),
        "{b}"
    );
    assert_eq!(b["subscription"]["status"], "past_due");
    assert_eq!(s.gw.get_with_key(&s.c, "/x", &key).await.status(), 200);

    // three days pass (the grace's end moved to now): the license falls back to free, once
    s.run_out(&sub, id).await;
    let b = s.balance(&key).await;
    assert_eq!(b["subscription"]["status"], "lapsed", "{b}");
    assert_eq!(s.call(&key).await, (200, "free".into()));
    // lapsed, not over: Stripe may still collect, so the customer pays in the portal rather
    // than subscribing anew (a second subscription, billed twice)
    let again = json!({"license_key": key, "plan": "pro"});
    let (status, v) = s.post("/payments/subscribe", again.clone()).await;
    assert_eq!(status, 400, "{v}");
    // Stripe's retry collects: the plan is back
    let late = s.event("invoice.paid", s.stripe.invoice(&sub, true)).await;
    assert_eq!(late, "subscription_revived");
    assert_eq!(s.plan(id), "enterprise");
    // then it is cancelled, at once, after its period (moved into the past here): over
    assert_eq!(
        s.event("customer.subscription.deleted", s.stripe.cancel(&sub))
            .await,
        "subscription_ending"
    );
    s.run_out(&sub, id).await;
    assert_eq!(s.balance(&key).await["subscription"]["status"], "ended");
    // over: the customer may subscribe again, with no second trial
    let (status, v) = s.post("/payments/subscribe", again).await;
    assert_eq!(status, 200, "{v}");
    let sent = s.stripe.requests().last().unwrap().params.clone();
    assert_eq!(sent["subscription_data"]["trial_period_days"], Value::Null);
}

async fn a_cancelled_subscription_ends_with_what_was_paid_and_its_refund_takes_no_hours(
    store: Store,
) {
    let s = shop(store).await;
    let (id, key) = s.gw.create_key("Ada", "2");
    let (_, sub) = s.subscribe(&key, "enterprise").await;
    let invoice = s.stripe.invoice(&sub, true);
    assert_eq!(
        s.event("invoice.paid", invoice.clone()).await,
        "subscription_renewed"
    );
    let hours = s.gw.books(id).balance_ms;

    // a refund of the invoice: recorded, no hours taken, the plan runs on
    let charge = json!({
        "id": "ch_test_sub", "object": "charge", "amount": 9000, "amount_refunded": 9000,
        "refunded": true, "payment_intent": invoice["payment_intent"], "currency": "usd",
    });
    assert_eq!(
        s.event("charge.refunded", charge).await,
        "subscription_refund"
    );
    assert_eq!(s.gw.books(id).balance_ms, hours);
    assert_eq!(s.plan(id), "enterprise");

    // cancelled: the plan stays to the end of the period paid
    let gone = s.stripe.cancel(&sub);
    let end = gone["current_period_end"].as_i64().unwrap() * 1000;
    assert_eq!(
        s.event("customer.subscription.deleted", gone).await,
        "subscription_ending"
    );
    assert_eq!(s.plan(id), "enterprise");
    let b = s.balance(&key).await;
    assert_eq!(
        b["subscription"]["ends_at"].as_str(),
        Some(gateway::timefmt::rfc3339(end).as_str()),
        "{b}"
    );
    // the period ends: back on free, the prepaid hours untouched
    s.run_out(&sub, id).await;
    assert_eq!(s.gw.books(id).balance_ms, hours);
    let b = s.gw.books(id);
    assert_eq!(b.history_sum_ms, b.balance_ms, "{b:?}");
}
