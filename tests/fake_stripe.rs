//! The fake Stripe refuses what Stripe refuses: these tests hold it to that, so a payments test
//! that passes against it is talking to Stripe correctly.

mod common;

use common::stripe::{deliver, signature_header, unix_now, FakeStripe};
use common::Upstream;
use serde_json::{json, Value};

const KEY: &str = "sk_test_fake_stripe_selftest";
const SUCCESS_URL: &str = "http://127.0.0.1:8081/payments/success?session_id={CHECKOUT_SESSION_ID}";
const NAME: &str = "line_items[0][price_data][product_data][name]";
const AMOUNT: &str = "line_items[0][price_data][unit_amount]";
const CURRENCY: &str = "line_items[0][price_data][currency]";
const QUANTITY: &str = "line_items[0][quantity]";

type Form = Vec<(String, String)>;

/// The form Tollgate sends for the "small" package (5 hours, $25) of license 42.
fn tollgate_form() -> Form {
    [
        ("mode", "payment"),
        ("success_url", SUCCESS_URL),
        ("cancel_url", "http://127.0.0.1:8081/payments/"),
        ("client_reference_id", "42"),
        (QUANTITY, "1"),
        (CURRENCY, "usd"),
        (AMOUNT, "2500"),
        (NAME, "5 hours of access"),
        ("metadata[license_id]", "42"),
        ("metadata[hours]", "5"),
        ("metadata[package_id]", "small"),
        ("payment_intent_data[metadata][license_id]", "42"),
        ("payment_intent_data[metadata][hours]", "5"),
    ]
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .to_vec()
}

/// Tollgate's form with `key` set to `value` (added if absent), or removed when `value` is None.
fn form_with(key: &str, value: Option<&str>) -> Form {
    let mut form: Form = tollgate_form()
        .into_iter()
        .filter(|(k, _)| k != key)
        .collect();
    if let Some(v) = value {
        form.push((key.to_string(), v.to_string()));
    }
    form
}

struct Reply {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: Value,
}

async fn send(req: reqwest::RequestBuilder) -> Reply {
    let r = req.send().await.unwrap();
    let (status, headers) = (r.status().as_u16(), r.headers().clone());
    let body = r.json().await.unwrap();
    Reply {
        status,
        headers,
        body,
    }
}

async fn create(stripe: &FakeStripe, form: &Form, idempotency_key: Option<&str>) -> Reply {
    let url = format!("{}/v1/checkout/sessions", stripe.api_base());
    let mut req = reqwest::Client::new().post(url).bearer_auth(KEY).form(form);
    if let Some(key) = idempotency_key {
        req = req.header("Idempotency-Key", key);
    }
    send(req).await
}

/// Creates with `form` and expects a 400 `invalid_request_error` with `code` about `param`.
async fn refused(stripe: &FakeStripe, form: &Form, code: &str, param: &str) -> Value {
    let r = create(stripe, form, None).await;
    let error = &r.body["error"];
    assert_eq!(r.status, 400, "{}", r.body);
    let got = (
        error["type"].as_str(),
        error["code"].as_str(),
        error["param"].as_str(),
    );
    assert_eq!(
        got,
        (Some("invalid_request_error"), Some(code), Some(param)),
        "{}",
        r.body
    );
    r.body
}

#[tokio::test(flavor = "multi_thread")]
async fn tollgates_checkout_form_creates_a_session() {
    let stripe = FakeStripe::start(KEY).await;
    let r = create(&stripe, &tollgate_form(), Some("checkout-42-1")).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.headers.get("idempotent-replayed").is_none());
    let s = &r.body;
    let id = s["id"].as_str().unwrap();
    assert!(id.starts_with("cs_test_") && id.len() == 8 + 24, "{id}");
    assert!((s["created"].as_i64().unwrap() - unix_now()).abs() < 5);
    let expected = json!({
        "id": id,
        "object": "checkout.session",
        "url": format!("{}/pay/{id}", stripe.api_base()),
        "status": "open",
        "payment_status": "unpaid",
        "mode": "payment",
        "amount_total": 2500,
        "currency": "usd",
        "client_reference_id": "42",
        "metadata": {"license_id": "42", "hours": "5", "package_id": "small"},
        "success_url": SUCCESS_URL,
        "cancel_url": "http://127.0.0.1:8081/payments/",
        "payment_intent": null,
        "livemode": false,
    });
    for (field, value) in expected.as_object().unwrap() {
        assert_eq!(&s[field], value, "{field}");
    }
    assert_eq!(stripe.sessions(), vec![s.clone()]);
    assert_eq!(stripe.session(id).as_ref(), Some(s));

    let sent = &stripe.requests()[0];
    assert_eq!(
        (sent.method.as_str(), sent.path.as_str()),
        ("POST", "/v1/checkout/sessions")
    );
    assert_eq!(sent.status, 200);
    assert_eq!(sent.headers["authorization"], format!("Bearer {KEY}"));
    assert_eq!(
        sent.headers["content-type"],
        "application/x-www-form-urlencoded"
    );
    assert_eq!(sent.idempotency_key.as_deref(), Some("checkout-42-1"));
    assert!(
        sent.body.contains("line_items%5B0%5D%5Bquantity%5D=1"),
        "{}",
        sent.body
    );
    let item = json!({"quantity": "1", "price_data": {"currency": "usd", "unit_amount": "2500",
        "product_data": {"name": "5 hours of access"}}});
    assert_eq!(sent.params["line_items"], json!([item]));
    let intent = json!({"metadata": {"license_id": "42", "hours": "5"}});
    assert_eq!(sent.params["payment_intent_data"], intent);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_secret_key_is_required_and_checked() {
    let stripe = FakeStripe::start(KEY).await;
    let url = format!("{}/v1/checkout/sessions", stripe.api_base());
    let c = reqwest::Client::new();
    let message = |r: &Reply| r.body["error"]["message"].as_str().unwrap().to_string();

    let r = send(
        c.post(&url)
            .bearer_auth("sk_test_not_the_right_key")
            .form(&tollgate_form()),
    )
    .await;
    assert_eq!(
        (r.status, r.body["error"]["type"].as_str()),
        (401, Some("invalid_request_error"))
    );
    assert!(
        message(&r).starts_with("Invalid API Key provided: sk_test_"),
        "{}",
        r.body
    );
    assert!(
        !message(&r).contains("not_the_right"),
        "the key is masked: {}",
        r.body
    );

    let r = send(c.post(&url).form(&tollgate_form())).await;
    assert_eq!(r.status, 401);
    assert!(
        message(&r).starts_with("You did not provide an API key"),
        "{}",
        r.body
    );

    let r = send(
        c.get(format!("{url}/cs_test_x"))
            .bearer_auth("sk_test_wrong"),
    )
    .await;
    assert_eq!(r.status, 401);
    assert!(stripe.sessions().is_empty());
    let statuses: Vec<u16> = stripe.requests().iter().map(|r| r.status).collect();
    assert_eq!(statuses, [401, 401, 401]);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_body_must_be_a_form() {
    let stripe = FakeStripe::start(KEY).await;
    let url = format!("{}/v1/checkout/sessions", stripe.api_base());
    let body = json!({"mode": "payment", "success_url": "https://example.com/ok"});
    let r = send(
        reqwest::Client::new()
            .post(url)
            .bearer_auth(KEY)
            .json(&body),
    )
    .await;
    assert_eq!(
        (r.status, r.body["error"]["type"].as_str()),
        (400, Some("invalid_request_error"))
    );
    assert!(stripe.sessions().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_parameters_are_refused_at_every_level() {
    let stripe = FakeStripe::start(KEY).await;
    let body = refused(
        &stripe,
        &form_with("foo", Some("x")),
        "parameter_unknown",
        "foo",
    )
    .await;
    assert_eq!(body["error"]["message"], "Received unknown parameter: foo");
    for key in [
        "line_items[0][price_data][amount]",
        "payment_intent_data[currency]",
    ] {
        refused(
            &stripe,
            &form_with(key, Some("1")),
            "parameter_unknown",
            key,
        )
        .await;
    }
    assert!(stripe.sessions().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn required_parameters_are_named_when_missing() {
    let stripe = FakeStripe::start(KEY).await;
    for param in [CURRENCY, AMOUNT, NAME, QUANTITY, "mode", "success_url"] {
        // a description keeps product_data there when its name is the one removed
        let mut form = form_with(param, None);
        let description = "line_items[0][price_data][product_data][description]";
        form.push((description.into(), "hours".into()));
        let body = refused(&stripe, &form, "parameter_missing", param).await;
        assert_eq!(
            body["error"]["message"],
            format!("Missing required param: {param}.")
        );
    }
    let product = "line_items[0][price_data][product_data]";
    refused(
        &stripe,
        &form_with(NAME, None),
        "parameter_missing",
        product,
    )
    .await;
    let mut no_items = tollgate_form();
    no_items.retain(|(k, _)| !k.starts_with("line_items"));
    refused(&stripe, &no_items, "parameter_missing", "line_items").await;
    assert!(stripe.sessions().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn values_are_checked() {
    let stripe = FakeStripe::start(KEY).await;
    let long_key = format!("metadata[{}]", "x".repeat(41));
    let (long_id, long_value) = ("9".repeat(201), "5".repeat(501));
    let soon = (unix_now() + 60).to_string();
    // (parameter, value, code); the error names the parameter
    let cases = [
        ("mode", "setup", "parameter_invalid"),
        ("success_url", "ftp://example.com/", "url_invalid"),
        ("success_url", "/payments/success", "url_invalid"),
        ("cancel_url", "", "parameter_invalid_empty"),
        (QUANTITY, "0", "parameter_invalid_integer"),
        (QUANTITY, "one", "parameter_invalid_integer"),
        (CURRENCY, "USD", "parameter_invalid"),
        (AMOUNT, "-1", "parameter_invalid_integer"),
        (AMOUNT, "25.00", "parameter_invalid_integer"),
        (NAME, "", "parameter_invalid_empty"),
        ("client_reference_id", long_id.as_str(), "parameter_invalid"),
        ("expires_at", soon.as_str(), "parameter_invalid"),
        (long_key.as_str(), "v", "parameter_invalid"),
        ("metadata[hours]", long_value.as_str(), "parameter_invalid"),
    ];
    for (key, value, code) in cases {
        refused(&stripe, &form_with(key, Some(value)), code, key).await;
    }
    // errors about an enclosing hash
    for (key, param) in [
        ("metadata[deep][er]", "metadata[deep]"),
        (
            "payment_intent_data[metadata][x][y]",
            "payment_intent_data[metadata][x]",
        ),
        ("line_items[0][price]", "line_items[0]"), // both price and price_data
    ] {
        refused(
            &stripe,
            &form_with(key, Some("1")),
            "parameter_invalid",
            param,
        )
        .await;
    }
    let mut flat = tollgate_form();
    flat.retain(|(k, _)| !k.starts_with("metadata"));
    flat.push(("metadata".into(), "flat".into()));
    let body = refused(&stripe, &flat, "parameter_invalid", "metadata").await;
    assert_eq!(body["error"]["message"], "Invalid hash");

    // 50 metadata keys are fine, 51 are not
    let mut form = tollgate_form();
    form.extend((3..50).map(|i| (format!("metadata[k{i}]"), "v".to_string())));
    assert_eq!(create(&stripe, &form, None).await.status, 200);
    form.push(("metadata[k50]".into(), "v".into()));
    refused(&stripe, &form, "parameter_invalid", "metadata").await;

    // several items add up; an expiry in range is kept
    let mut form = tollgate_form();
    for (key, value) in tollgate_form()
        .into_iter()
        .filter(|(k, _)| k.starts_with("line_items"))
    {
        let value = if key == QUANTITY { "3".into() } else { value };
        form.push((key.replace("[0]", "[1]"), value));
    }
    let expires = unix_now() + 3600;
    form.push(("expires_at".into(), expires.to_string()));
    let r = create(&stripe, &form, None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        (
            r.body["amount_total"].as_i64(),
            r.body["expires_at"].as_i64()
        ),
        (Some(10_000), Some(expires))
    );
    assert_eq!(stripe.sessions().len(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn arrays_need_indices_from_zero_without_gaps() {
    let stripe = FakeStripe::start(KEY).await;
    let renumber = |to: &str| -> Form {
        let items = tollgate_form()
            .into_iter()
            .filter(|(k, _)| k.starts_with("line_items"));
        items.map(|(k, v)| (k.replace("[0]", to), v)).collect()
    };
    let mut gap = tollgate_form();
    gap.extend(renumber("[2]"));
    let mut no_zero = tollgate_form();
    no_zero.retain(|(k, _)| !k.starts_with("line_items"));
    let mut padded = no_zero.clone();
    no_zero.extend(renumber("[1]"));
    padded.extend(renumber("[00]"));
    for form in [gap, no_zero, padded] {
        refused(&stripe, &form, "parameter_invalid", "line_items").await;
    }
    assert!(stripe.sessions().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_or_repeated_keys_are_refused() {
    let stripe = FakeStripe::start(KEY).await;
    let malformed = [
        "metadata[a",
        "metadata]x",
        "metadata[]x",
        "metadata[]",
        "metadata[a]b",
        "metadata[a[b]]",
        "[x]",
    ];
    for key in malformed {
        refused(
            &stripe,
            &form_with(key, Some("1")),
            "parameter_invalid",
            key,
        )
        .await;
    }
    let mut twice = tollgate_form();
    twice.push(("metadata[hours]".into(), "6".into()));
    refused(&stripe, &twice, "parameter_invalid", "metadata[hours]").await;
    // a value and a hash under one name
    let key = "line_items[0][price_data]";
    refused(
        &stripe,
        &form_with(key, Some("x")),
        "parameter_invalid",
        key,
    )
    .await;
    assert!(stripe.sessions().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idempotency_key_replays_the_first_response() {
    let stripe = FakeStripe::start(KEY).await;
    let first = create(&stripe, &tollgate_form(), Some("order-77")).await;
    assert_eq!(first.status, 200);
    // the same parameters in another order are the same request
    let mut reordered = tollgate_form();
    reordered.reverse();
    let again = create(&stripe, &reordered, Some("order-77")).await;
    assert_eq!((again.status, &again.body), (200, &first.body));
    assert_eq!(again.headers["idempotent-replayed"], "true");
    assert_eq!(again.headers["idempotency-key"], "order-77");
    assert_eq!(stripe.sessions().len(), 1);

    let other = create(
        &stripe,
        &form_with("metadata[hours]", Some("6")),
        Some("order-77"),
    )
    .await;
    assert_eq!(
        (other.status, other.body["error"]["type"].as_str()),
        (400, Some("idempotency_error"))
    );
    let message = other.body["error"]["message"].as_str().unwrap();
    assert!(message
        .starts_with("Keys for idempotent requests can only be used with the same parameters"));

    // a request refused by validation saves nothing: its key can still be used
    let bad = create(&stripe, &form_with("mode", None), Some("order-78")).await;
    assert_eq!(bad.status, 400);
    assert_eq!(
        create(&stripe, &tollgate_form(), Some("order-78"))
            .await
            .status,
        200
    );
    // without a key, each request is a new session
    create(&stripe, &tollgate_form(), None).await;
    create(&stripe, &tollgate_form(), None).await;
    assert_eq!(stripe.sessions().len(), 4);
    let keys: Vec<Option<String>> = stripe
        .requests()
        .into_iter()
        .map(|r| r.idempotency_key)
        .collect();
    assert_eq!(keys[0].as_deref(), Some("order-77"));
    assert_eq!(keys[5..], [None, None]);
}

#[tokio::test(flavor = "multi_thread")]
async fn sessions_are_retrieved_and_move_through_payment() {
    let stripe = FakeStripe::start(KEY).await;
    let c = reqwest::Client::new();
    let base = stripe.api_base();
    let get = |id: &str| {
        send(
            c.get(format!("{base}/v1/checkout/sessions/{id}"))
                .bearer_auth(KEY),
        )
    };
    let id = create(&stripe, &tollgate_form(), None).await.body["id"]
        .as_str()
        .unwrap()
        .to_string();

    let r = get(&id).await;
    assert_eq!((r.status, &r.body), (200, &stripe.session(&id).unwrap()));
    let r = get("cs_test_nope").await;
    assert_eq!(
        (r.status, r.body["error"]["code"].as_str()),
        (404, Some("resource_missing"))
    );
    assert_eq!(
        r.body["error"]["message"],
        "No such checkout.session: 'cs_test_nope'"
    );
    let r = send(c.post(format!("{base}/v1/customers")).bearer_auth(KEY)).await;
    assert_eq!(
        (r.status, r.body["error"]["type"].as_str()),
        (404, Some("invalid_request_error"))
    );

    let paid = stripe.mark_paid(&id);
    assert_eq!(
        (paid["status"].as_str(), paid["payment_status"].as_str()),
        (Some("complete"), Some("paid"))
    );
    assert!(paid["payment_intent"]
        .as_str()
        .unwrap()
        .starts_with("pi_test_"));
    assert_eq!(get(&id).await.body, paid);

    let id = create(&stripe, &tollgate_form(), None).await.body["id"]
        .as_str()
        .unwrap()
        .to_string();
    let pending = stripe.mark_pending_async(&id);
    assert_eq!(
        (
            pending["status"].as_str(),
            pending["payment_status"].as_str()
        ),
        (Some("complete"), Some("unpaid"))
    );
    assert!(pending["payment_intent"].is_string());
    let cleared = stripe.mark_async_succeeded(&id);
    assert_eq!(cleared["payment_status"], "paid");
    assert_eq!(cleared["payment_intent"], pending["payment_intent"]);

    let charge = stripe.refunded_charge(&id, 625);
    assert_eq!(charge["object"], "charge");
    assert_eq!(
        (
            charge["amount"].as_i64(),
            charge["amount_refunded"].as_i64()
        ),
        (Some(2500), Some(625))
    );
    assert_eq!(charge["refunded"], false);
    assert_eq!(charge["payment_intent"], cleared["payment_intent"]);
    assert_eq!(stripe.refunded_charge(&id, 2500)["refunded"], true);
}

#[tokio::test(flavor = "multi_thread")]
async fn events_are_signed_as_stripe_signs_them() {
    let body = "{\n  \"id\": \"evt_test_webhook\",\n  \"object\": \"event\"\n}";
    assert_eq!(
        signature_header("whsec_test_secret", 1700000000, body),
        "t=1700000000,v1=4f1cd7feda9826e746b7d482c4badebb657398df1099e1046364f6196a230150"
    );

    let stripe = FakeStripe::start(KEY).await;
    let (id, body) = stripe.event("checkout.session.completed", json!({"id": "cs_test_1"}));
    assert!(
        id.starts_with("evt_test_") && body.contains("\n  \"id\""),
        "pretty-printed: {body}"
    );
    let event: Value = serde_json::from_str(&body).unwrap();
    let expected = json!({"id": id, "object": "event", "type": "checkout.session.completed",
        "api_version": "2024-06-20", "livemode": false, "pending_webhooks": 1,
        "data": {"object": {"id": "cs_test_1"}}});
    for (field, value) in expected.as_object().unwrap() {
        assert_eq!(&event[field], value, "{field}");
    }

    // delivered with Stripe's headers and a signature over exactly the body sent
    let up = Upstream::start().await;
    let url = format!("http://{}/hook", up.addr);
    let r = deliver(&reqwest::Client::new(), &url, "whsec_test_secret", &body).await;
    assert_eq!(r.status(), 200);
    let seen = up.last();
    assert_eq!(
        (seen.method.as_str(), seen.path.as_str()),
        ("POST", "/hook")
    );
    assert_eq!(
        seen.headers["content-type"],
        "application/json; charset=utf-8"
    );
    assert_eq!(
        seen.headers["user-agent"],
        "Stripe/1.0 (+https://stripe.com/docs/webhooks)"
    );
    let signature = &seen.headers["stripe-signature"];
    let t: i64 = signature[2..signature.find(',').unwrap()].parse().unwrap();
    assert!((t - unix_now()).abs() < 5);
    assert_eq!(signature, &signature_header("whsec_test_secret", t, &body));
}

/// The form Tollgate sends to subscribe license 42 to "pro" ($20 a month, a 7-day trial).
fn subscription_form() -> Form {
    [
        ("mode", "subscription"),
        ("success_url", SUCCESS_URL),
        ("cancel_url", "http://127.0.0.1:8081/payments/"),
        ("client_reference_id", "42"),
        (QUANTITY, "1"),
        (CURRENCY, "usd"),
        (AMOUNT, "2000"),
        ("line_items[0][price_data][recurring][interval]", "month"),
        (NAME, "The pro plan"),
        ("metadata[license_id]", "42"),
        ("metadata[plan]", "pro"),
        ("subscription_data[metadata][license_id]", "42"),
        ("subscription_data[metadata][plan]", "pro"),
        ("subscription_data[trial_period_days]", "7"),
    ]
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .to_vec()
}

fn changed(mut form: Form, key: &str, value: Option<&str>) -> Form {
    form.retain(|(k, _)| k != key);
    if let Some(v) = value {
        form.push((key.to_string(), v.to_string()));
    }
    form
}

#[tokio::test(flavor = "multi_thread")]
async fn subscription_checkouts_need_recurring_prices_and_make_a_subscription_when_completed() {
    let stripe = FakeStripe::start(KEY).await;
    let r = create(&stripe, &subscription_form(), Some("sub-42")).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        (r.body["mode"].as_str(), r.body["subscription"].as_str()),
        (Some("subscription"), None)
    );
    assert!(
        r.body
            .as_object()
            .unwrap()
            .keys()
            .all(|k| !k.starts_with('_')),
        "{}",
        r.body
    );
    // what Stripe refuses in subscription mode, and recurring prices in payment mode
    let recurring = "line_items[0][price_data][recurring][interval]";
    let payment_only = "payment_intent_data[metadata][license_id]";
    refused(
        &stripe,
        &changed(subscription_form(), payment_only, Some("42")),
        "parameter_invalid",
        "payment_intent_data",
    )
    .await;
    refused(
        &stripe,
        &changed(subscription_form(), recurring, None),
        "parameter_invalid",
        "line_items",
    )
    .await;
    refused(
        &stripe,
        &changed(subscription_form(), recurring, Some("fortnight")),
        "parameter_invalid",
        recurring,
    )
    .await;
    refused(
        &stripe,
        &changed(tollgate_form(), recurring, Some("month")),
        "parameter_invalid",
        "line_items[0]",
    )
    .await;
    refused(
        &stripe,
        &changed(
            tollgate_form(),
            "subscription_data[trial_period_days]",
            Some("7"),
        ),
        "parameter_invalid",
        "subscription_data",
    )
    .await;
    refused(
        &stripe,
        &changed(
            subscription_form(),
            "subscription_data[trial_period_days]",
            Some("0"),
        ),
        "parameter_invalid_integer",
        "subscription_data[trial_period_days]",
    )
    .await;
    // a Price of the dashboard: only one that exists
    let by_price: Form = changed(
        changed(
            changed(changed(subscription_form(), AMOUNT, None), CURRENCY, None),
            NAME,
            None,
        ),
        recurring,
        None,
    );
    let with = |id: &str| changed(by_price.clone(), "line_items[0][price]", Some(id));
    refused(
        &stripe,
        &with("price_nope"),
        "resource_missing",
        "line_items[0][price]",
    )
    .await;
    stripe.add_price("price_pro", 2000, "usd", Some("month"));
    assert_eq!(create(&stripe, &with("price_pro"), None).await.status, 200);
    stripe.add_price("price_once", 2000, "usd", None);
    refused(
        &stripe,
        &with("price_once"),
        "parameter_invalid",
        "line_items",
    )
    .await;
    // a Stripe-Version that is no version
    let url = format!("{}/v1/checkout/sessions", stripe.api_base());
    let bad = reqwest::Client::new()
        .post(&url)
        .bearer_auth(KEY)
        .header("Stripe-Version", "latest")
        .form(&subscription_form());
    assert_eq!(send(bad).await.status, 400);

    // completed: a customer and a subscription on its trial, as events carry them
    let id = r.body["id"].as_str().unwrap();
    let done = stripe.mark_paid(id);
    assert_eq!(done["payment_status"], "no_payment_required", "a trial");
    let sub = stripe.subscription(done["subscription"].as_str().unwrap());
    assert_eq!(sub["status"], "trialing");
    assert_eq!(sub["customer"], done["customer"]);
    assert_eq!(sub["metadata"], json!({"license_id": "42", "plan": "pro"}));
    assert_eq!(sub["items"]["data"][0]["price"]["unit_amount"], 2000);
    let period =
        sub["current_period_end"].as_i64().unwrap() - sub["current_period_start"].as_i64().unwrap();
    assert_eq!(period, 7 * 86_400);
    let invoice = stripe.invoice(sub["id"].as_str().unwrap(), true);
    assert_eq!(invoice["amount_paid"], 0);
    assert_eq!(invoice["subscription_details"]["metadata"]["plan"], "pro");
    assert_eq!(
        invoice["lines"]["data"][0]["period"]["end"],
        sub["current_period_end"]
    );
    // completing it again makes nothing new
    let again = stripe.mark_paid(id);
    assert_eq!(again["subscription"], done["subscription"]);

    // the portal: for a customer Stripe has, with a valid return URL
    let portal = |customer: &str, back: &str| {
        let url = format!("{}/v1/billing_portal/sessions", stripe.api_base());
        reqwest::Client::new()
            .post(url)
            .bearer_auth(KEY)
            .form(&[("customer", customer), ("return_url", back)])
    };
    let ok = send(portal(
        done["customer"].as_str().unwrap(),
        "http://127.0.0.1:8081/payments/",
    ))
    .await;
    assert_eq!(ok.status, 200, "{}", ok.body);
    assert!(ok.body["url"]
        .as_str()
        .unwrap()
        .contains("/portal/bps_test_"));
    let unknown = send(portal("cus_nobody", "http://127.0.0.1:8081/payments/")).await;
    assert_eq!(
        (unknown.status, unknown.body["error"]["code"].as_str()),
        (400, Some("resource_missing"))
    );
    let bad_url = send(portal(done["customer"].as_str().unwrap(), "/payments/")).await;
    assert_eq!(bad_url.body["error"]["code"], "url_invalid");
}
