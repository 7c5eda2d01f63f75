//! A fake Stripe for integration tests: Checkout Sessions over HTTP on a loopback port, checked the
//! way Stripe checks them (secret key, form encoding, bracket-nested parameters, allowed and
//! required fields, metadata limits, idempotency keys), and the test's half of Stripe: moving a
//! session to paid, building event envelopes and delivering them signed.
//!
//! What the fake accepts should be a subset of what Stripe accepts, so a request it takes is one
//! Stripe would take too. Errors have Stripe's shape: `{"error": {type, code, param, message}}`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use hmac::{Hmac, Mac};
use rand::distr::Alphanumeric;
use rand::Rng;
use serde_json::{json, Map, Value};
use sha2::Sha256;

/// The API version stamped on events.
pub const API_VERSION: &str = "2024-06-20";

/// A request the fake received, and the status it answered with.
#[derive(Clone, Debug)]
pub struct StripeRequest {
    pub method: String,
    pub path: String,
    /// Lowercase names; a repeated header's values joined with ", ".
    pub headers: HashMap<String, String>,
    pub body: String,
    /// The form expanded into JSON (`a[b][0]=x` → `{"a":{"b":["x"]}}`); `null` if none parsed.
    pub params: Value,
    pub idempotency_key: Option<String>,
    pub status: u16,
}

/// A Stripe API on `addr`; its server task is aborted on drop.
pub struct FakeStripe {
    pub addr: SocketAddr,
    inner: Arc<Mutex<Inner>>,
    task: tokio::task::JoinHandle<()>,
}

struct Inner {
    key: String,
    api_base: String,
    requests: Vec<StripeRequest>,
    sessions: Vec<Value>,
    /// Subscriptions made by completed subscription Checkouts, as Stripe holds them.
    subscriptions: Vec<Value>,
    /// Customers made by those Checkouts.
    customers: Vec<String>,
    /// Prices made in the dashboard (`add_price`), by id.
    prices: HashMap<String, Value>,
    /// Idempotency key → (path, params, the response first made under it).
    saved: HashMap<String, (String, Value, Reply)>,
}

/// A Stripe answer; `replayed` when it comes from an idempotency key.
#[derive(Clone)]
struct Reply {
    status: u16,
    body: Value,
    replayed: bool,
}

/// A failed check answers with the error to send.
type Checked<T> = Result<T, Reply>;

fn reply(status: u16, body: Value) -> Reply {
    Reply {
        status,
        body,
        replayed: false,
    }
}

/// An error without a code or param.
fn error(status: u16, kind: &str, message: impl Into<String>) -> Reply {
    let message: String = message.into();
    reply(status, json!({"error": {"type": kind, "message": message}}))
}

/// A 400 `invalid_request_error` about one parameter.
fn invalid(code: &str, param: &str, message: impl Into<String>) -> Reply {
    let mut r = error(400, "invalid_request_error", message);
    r.body["error"]["code"] = json!(code);
    r.body["error"]["param"] = json!(param);
    r
}

fn missing(param: &str) -> Reply {
    let message = format!("Missing required param: {param}.");
    invalid("parameter_missing", param, message)
}

/// `line_items[0]` + `quantity` → `line_items[0][quantity]`; at the top level just the key.
fn child(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}[{key}]")
    }
}

impl FakeStripe {
    pub async fn start(secret_key: &str) -> FakeStripe {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let inner = Arc::new(Mutex::new(Inner {
            key: secret_key.to_string(),
            api_base: format!("http://{addr}"),
            requests: Vec::new(),
            sessions: Vec::new(),
            subscriptions: Vec::new(),
            customers: Vec::new(),
            prices: HashMap::new(),
            saved: HashMap::new(),
        }));
        let app = axum::Router::new()
            .fallback(serve)
            .with_state(inner.clone());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        FakeStripe { addr, inner, task }
    }

    pub fn api_base(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn requests(&self) -> Vec<StripeRequest> {
        self.inner.lock().unwrap().requests.clone()
    }

    /// Every session created, in creation order, as it is now.
    pub fn sessions(&self) -> Vec<Value> {
        self.inner
            .lock()
            .unwrap()
            .sessions
            .iter()
            .map(public)
            .collect()
    }

    pub fn session(&self, id: &str) -> Option<Value> {
        let inner = self.inner.lock().unwrap();
        inner.sessions.iter().find(|s| s["id"] == id).map(public)
    }

    /// Customer paid by card: status "complete", payment_status "paid", a payment intent.
    /// Returns the updated session.
    pub fn mark_paid(&self, id: &str) -> Value {
        self.update(id, "paid")
    }

    /// Customer chose a delayed method: status "complete", payment_status "unpaid", a payment
    /// intent.
    pub fn mark_pending_async(&self, id: &str) -> Value {
        self.update(id, "unpaid")
    }

    /// The async payment cleared: payment_status "paid".
    pub fn mark_async_succeeded(&self, id: &str) -> Value {
        self.update(id, "paid")
    }

    fn update(&self, id: &str, payment_status: &str) -> Value {
        let mut inner = self.inner.lock().unwrap();
        inner.complete(id, payment_status)
    }

    /// A Price made in Stripe's dashboard: `recurring` by `interval` when given.
    pub fn add_price(&self, id: &str, unit_amount: i64, currency: &str, interval: Option<&str>) {
        let price = json!({
            "id": id, "object": "price", "active": true, "currency": currency,
            "unit_amount": unit_amount, "type": if interval.is_some() { "recurring" } else { "one_time" },
            "recurring": interval.map(|i| json!({"interval": i, "interval_count": 1})),
            "product": format!("prod_test_{}", random(14)), "livemode": false,
        });
        self.inner.lock().unwrap().prices.insert(id.into(), price);
    }

    /// The subscription as Stripe holds it now.
    pub fn subscription(&self, id: &str) -> Value {
        let inner = self.inner.lock().unwrap();
        let found = inner.subscriptions.iter().find(|s| s["id"] == id).cloned();
        found.unwrap_or_else(|| panic!("the fake Stripe has no subscription {id}"))
    }

    fn with_subscription(&self, id: &str, change: impl FnOnce(&mut Value)) -> Value {
        let mut inner = self.inner.lock().unwrap();
        let Some(s) = inner.subscriptions.iter_mut().find(|s| s["id"] == id) else {
            panic!("the fake Stripe has no subscription {id}");
        };
        change(s);
        s.clone()
    }

    /// The invoice of the subscription's current period, paid (`invoice.paid`'s object) or
    /// not (`invoice.payment_failed`'s), as API version 2024-06-20 shapes it.
    pub fn invoice(&self, sub_id: &str, paid: bool) -> Value {
        let s = self.subscription(sub_id);
        let item = &s["items"]["data"][0];
        let amount = if s["status"] == "trialing" {
            0
        } else {
            item["price"]["unit_amount"].as_i64().unwrap_or(0)
        };
        json!({
            "id": format!("in_test_{}", random(24)), "object": "invoice",
            "subscription": s["id"], "customer": s["customer"],
            "status": if paid { "paid" } else { "open" }, "paid": paid,
            "amount_due": amount, "amount_paid": if paid { amount } else { 0 },
            "amount_remaining": if paid { 0 } else { amount },
            "currency": item["price"]["currency"],
            "billing_reason": "subscription_cycle",
            "payment_intent": format!("pi_test_{}", random(24)),
            // the invoice's own period is the one before, for a renewal: Stripe's lines say
            // which period is paid
            "period_start": s["current_period_start"], "period_end": s["current_period_start"],
            "subscription_details": {"metadata": s["metadata"]},
            "lines": {"object": "list", "has_more": false, "data": [{
                "id": format!("il_test_{}", random(14)), "object": "line_item",
                "type": "subscription", "proration": false, "amount": amount,
                "currency": item["price"]["currency"], "quantity": 1,
                "period": {"start": s["current_period_start"], "end": s["current_period_end"]},
                "price": item["price"], "subscription": s["id"],
            }]},
            "created": unix_now(), "livemode": false,
        })
    }

    /// The next billing period begins now (the test's "a month later"): the subscription's
    /// period moves, and its new invoice is returned paid.
    pub fn renew(&self, sub_id: &str) -> Value {
        let now = unix_now();
        self.with_subscription(sub_id, |s| {
            s["status"] = json!("active");
            s["current_period_start"] = json!(now);
            s["current_period_end"] = json!(month_after(now));
        });
        self.invoice(sub_id, true)
    }

    /// The customer switched to `price` in the portal (an upgrade or a downgrade, applied at
    /// once): the subscription as `customer.subscription.updated` carries it.
    pub fn change_price(&self, sub_id: &str, price: &str) -> Value {
        let price = self.inner.lock().unwrap().prices.get(price).cloned();
        let price = price.expect("a price added with add_price");
        self.with_subscription(sub_id, |s| {
            s["items"]["data"][0]["price"] = price;
        })
    }

    /// A payment failed: the subscription is past due.
    pub fn past_due(&self, sub_id: &str) -> Value {
        self.with_subscription(sub_id, |s| s["status"] = json!("past_due"))
    }

    /// Canceled at once (`customer.subscription.deleted`'s object).
    pub fn cancel(&self, sub_id: &str) -> Value {
        self.with_subscription(sub_id, |s| {
            s["status"] = json!("canceled");
            s["canceled_at"] = json!(unix_now());
            s["ended_at"] = json!(unix_now());
        })
    }

    /// An event envelope made at Stripe time `created` (Unix seconds): events are delivered
    /// in any order, and their times say which came first.
    pub fn event_at(&self, event_type: &str, object: Value, created: i64) -> (String, String) {
        let (id, body) = self.event(event_type, object);
        let mut v: Value = serde_json::from_str(&body).unwrap();
        v["created"] = json!(created);
        (id, serde_json::to_string_pretty(&v).unwrap())
    }

    /// An event envelope as Stripe sends it (pretty-printed, as Stripe does): (event id, body).
    pub fn event(&self, event_type: &str, object: Value) -> (String, String) {
        let id = format!("evt_test_{}", random(24));
        let event = json!({
            "id": id,
            "object": "event",
            "api_version": API_VERSION,
            "created": unix_now(),
            "livemode": false,
            "pending_webhooks": 1,
            "request": {"id": null, "idempotency_key": null},
            "type": event_type,
            "data": {"object": object},
        });
        (id, serde_json::to_string_pretty(&event).unwrap())
    }

    /// The charge of a paid session once `amount_refunded` of it (in total, smallest currency
    /// unit) has been refunded, as a `charge.refunded` event carries it.
    pub fn refunded_charge(&self, session_id: &str, amount_refunded: i64) -> Value {
        let session = self
            .session(session_id)
            .expect("a checkout session of this fake");
        assert!(
            !session["payment_intent"].is_null(),
            "{session_id} was never paid"
        );
        let amount = session["amount_total"].as_i64().unwrap();
        json!({
            "id": format!("ch_test_{}", random(24)),
            "object": "charge",
            "amount": amount,
            "amount_captured": amount,
            "amount_refunded": amount_refunded,
            "refunded": amount_refunded == amount,
            "paid": true,
            "status": "succeeded",
            "payment_intent": session["payment_intent"],
            "currency": session["currency"],
            "metadata": {},
            "created": unix_now(),
            "livemode": false,
        })
    }
}

impl Drop for FakeStripe {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The `Stripe-Signature` header for `body` at unix time `t`: HMAC-SHA256 keyed by the whole
/// secret (`whsec_` prefix included) over `"{t}.{body}"`.
pub fn signature_header(secret: &str, t: i64, body: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{t}.{body}").as_bytes());
    format!("t={t},v1={}", hex::encode(mac.finalize().into_bytes()))
}

/// A month after `t` (Unix seconds), as Stripe bills monthly: the same day of the next month,
/// or its last day.
fn month_after(t: i64) -> i64 {
    gateway::periods::Calendar::utc()
        .period(t * 1000, t * 1000)
        .1
        / 1000
}

pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// POSTs `body` to `url` as Stripe delivers a webhook, signed now with `secret`.
pub async fn deliver(
    client: &reqwest::Client,
    url: &str,
    secret: &str,
    body: &str,
) -> reqwest::Response {
    let signature = signature_header(secret, unix_now(), body);
    client
        .post(url)
        .header("Content-Type", "application/json; charset=utf-8")
        .header(
            "User-Agent",
            "Stripe/1.0 (+https://stripe.com/docs/webhooks)",
        )
        .header("Stripe-Signature", signature)
        .body(body.to_string())
        .send()
        .await
        .unwrap()
}

fn random(n: usize) -> String {
    let chars = rand::rng().sample_iter(&Alphanumeric).take(n);
    chars.map(char::from).collect()
}

/// The one handler: answers, then records the request with its status.
async fn serve(
    State(inner): State<Arc<Mutex<Inner>>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let mut inner = inner.lock().unwrap();
    if let Some(id) = uri.path().strip_prefix("/pay/") {
        return inner.hosted_checkout(method.as_str(), id);
    }
    if uri.path().starts_with("/portal/bps_") {
        // the Customer Portal, as far as a browser test needs it: it is Stripe's page
        let page = "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Fake \
            Stripe Customer Portal</title></head><body><h1>Customer Portal</h1></body></html>";
        return (
            StatusCode::OK,
            [("content-type", "text/html; charset=utf-8")],
            page,
        )
            .into_response();
    }
    let mut params = Value::Null;
    let reply = inner.handle(method.as_str(), uri.path(), &headers, &body, &mut params);
    let mut seen: HashMap<String, String> = HashMap::new();
    for (name, value) in &headers {
        let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
        let joined = seen.remove(name.as_str()).map(|v| format!("{v}, {value}"));
        seen.insert(name.to_string(), joined.unwrap_or(value));
    }
    let idempotency_key = seen.get("idempotency-key").cloned();
    inner.requests.push(StripeRequest {
        method: method.to_string(),
        path: uri.path().to_string(),
        headers: seen,
        body: String::from_utf8_lossy(&body).into_owned(),
        params,
        idempotency_key: idempotency_key.clone(),
        status: reply.status,
    });

    let status = StatusCode::from_u16(reply.status).unwrap();
    let body = serde_json::to_string_pretty(&reply.body).unwrap();
    let mut response = (status, [("content-type", "application/json")], body).into_response();
    let out = response.headers_mut();
    out.insert("request-id", format!("req_{}", random(14)).parse().unwrap());
    if let Some(key) = idempotency_key.and_then(|k| k.parse().ok()) {
        out.insert("idempotency-key", key);
    }
    if reply.replayed {
        out.insert("idempotent-replayed", "true".parse().unwrap());
    }
    response
}

fn header<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

impl Inner {
    /// Stripe's hosted checkout page, as far as a browser test needs it: `GET` shows what is
    /// bought and a Pay button; `POST` pays (the session becomes complete and paid) and sends
    /// the browser to the session's success URL with its id filled in, as Stripe does.
    fn hosted_checkout(&mut self, method: &str, id: &str) -> Response {
        if !self.sessions.iter().any(|s| s["id"] == id) {
            return (StatusCode::NOT_FOUND, "no such checkout session").into_response();
        }
        if method == "POST" {
            let session = self.complete(id, "paid");
            let to = session["success_url"]
                .as_str()
                .unwrap_or("")
                .replace("{CHECKOUT_SESSION_ID}", id);
            return (StatusCode::SEE_OTHER, [("location", to)]).into_response();
        }
        let page = format!(
            "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>Fake Stripe \
             Checkout</title></head><body><h1>Pay {} {}</h1><form method=\"post\">\
             <button id=\"pay\" type=\"submit\">Pay</button></form></body></html>",
            self.sessions.iter().find(|s| s["id"] == id).unwrap()["amount_total"],
            self.sessions.iter().find(|s| s["id"] == id).unwrap()["currency"]
        );
        (
            StatusCode::OK,
            [("content-type", "text/html; charset=utf-8")],
            page,
        )
            .into_response()
    }

    /// The customer paid (or, on a trial, just confirmed): a payment session gets its payment
    /// intent; a subscription session its customer and subscription, which Stripe now holds.
    fn complete(&mut self, id: &str, payment_status: &str) -> Value {
        let Some(i) = self.sessions.iter().position(|s| s["id"] == id) else {
            panic!("the fake Stripe has no checkout session {id}");
        };
        let mut session = self.sessions[i].clone();
        let first = session["status"] != "complete";
        session["status"] = json!("complete");
        if session["mode"] == "subscription" {
            if first {
                let customer = format!("cus_test_{}", random(14));
                let sub_id = format!("sub_test_{}", random(24));
                let now = unix_now();
                let trial = session["_trial_days"].as_i64();
                let end = trial.map_or_else(|| month_after(now), |d| now + d * 86_400);
                let subscription = json!({
                    "id": sub_id, "object": "subscription", "customer": customer,
                    "status": if trial.is_some() { "trialing" } else { "active" },
                    "current_period_start": now, "current_period_end": end,
                    "cancel_at_period_end": false, "metadata": session["_subscription_metadata"],
                    "trial_end": trial.map(|_| end),
                    "items": {"object": "list", "data": [{
                        "id": format!("si_test_{}", random(14)), "object": "subscription_item",
                        "price": session["_price"], "quantity": 1,
                        "current_period_start": now, "current_period_end": end,
                    }]},
                    "created": now, "livemode": false,
                });
                self.customers.push(customer.clone());
                self.subscriptions.push(subscription);
                session["customer"] = json!(customer);
                session["subscription"] = json!(sub_id);
                session["payment_status"] = json!(if trial.is_some() {
                    "no_payment_required"
                } else {
                    payment_status
                });
            }
        } else {
            session["payment_status"] = json!(payment_status);
            if session["payment_intent"].is_null() {
                session["payment_intent"] = json!(format!("pi_test_{}", random(24)));
            }
        }
        self.sessions[i] = session.clone();
        public(&session)
    }

    fn handle(
        &mut self,
        method: &str,
        path: &str,
        headers: &HeaderMap,
        body: &[u8],
        params: &mut Value,
    ) -> Reply {
        if let Err(reply) = self.authenticate(headers) {
            return reply;
        }
        // a pinned version must be one Stripe has (a date, perhaps with a release name)
        if let Some(v) = header(headers, "stripe-version") {
            let date = v.split('.').next().unwrap_or("");
            let ok = date.len() == 10
                && date.bytes().enumerate().all(|(i, b)| match i {
                    4 | 7 => b == b'-',
                    _ => b.is_ascii_digit(),
                })
                && date >= "2011-01-01";
            if !ok {
                let message = format!("Invalid Stripe API version: {v}");
                return error(400, "invalid_request_error", message);
            }
        }
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        match (method, segments.as_slice()) {
            ("POST", ["v1", "checkout", "sessions"]) => self.create(path, headers, body, params),
            ("POST", ["v1", "billing_portal", "sessions"]) => self.portal(headers, body, params),
            ("GET", ["v1", "checkout", "sessions", id]) if !id.is_empty() => {
                match self.sessions.iter().find(|s| s["id"] == *id) {
                    Some(session) => reply(200, public(session)),
                    None => {
                        let message = format!("No such checkout.session: '{id}'");
                        Reply {
                            status: 404,
                            ..invalid("resource_missing", "id", message)
                        }
                    }
                }
            }
            _ => error(
                404,
                "invalid_request_error",
                format!("Unrecognized request URL ({method}: {path})."),
            ),
        }
    }

    /// `POST /v1/billing_portal/sessions`: a Customer Portal session for a customer Stripe has.
    fn portal(&mut self, headers: &HeaderMap, body: &[u8], params: &mut Value) -> Reply {
        let content_type = header(headers, "content-type").unwrap_or("");
        if !content_type.starts_with("application/x-www-form-urlencoded") {
            return error(400, "invalid_request_error", "the body must be a form");
        }
        *params = match parse_form(body) {
            Ok(p) => p,
            Err(reply) => return reply,
        };
        let checked = (|| {
            let p = Hash::new(params, "", "customer return_url configuration locale")?;
            let customer = p.required_string("customer")?;
            if !self.customers.iter().any(|c| c == customer) {
                let message = format!("No such customer: '{customer}'");
                return Err(invalid("resource_missing", "customer", message));
            }
            let return_url = url(&p, "return_url")?;
            let id = format!("bps_test_{}", random(24));
            Ok(json!({
                "id": id, "object": "billing_portal.session", "customer": customer,
                "return_url": return_url, "url": format!("{}/portal/{id}", self.api_base),
                "created": unix_now(), "livemode": false,
            }))
        })();
        match checked {
            Ok(v) => reply(200, v),
            Err(r) => r,
        }
    }

    /// `Authorization: Bearer <secret key>`. (Stripe also takes the key as a Basic-auth user
    /// name; Tollgate sends Bearer, so the fake takes only that.)
    fn authenticate(&self, headers: &HeaderMap) -> Checked<()> {
        let given = header(headers, "authorization").unwrap_or("");
        let key = given.strip_prefix("Bearer ").unwrap_or("").trim();
        if key.is_empty() {
            return Err(error(
                401,
                "invalid_request_error",
                "You did not provide an API key. You need to provide your API key in the \
                 Authorization header, using Bearer auth (e.g. 'Authorization: Bearer \
                 YOUR_SECRET_KEY').",
            ));
        }
        if key != self.key {
            // Stripe echoes a wrong key with all but its first 8 and last 4 characters hidden
            let n = key.chars().count();
            let masked: String = (key.chars().enumerate())
                .map(|(i, c)| if i < 8 || i + 4 >= n { c } else { '*' })
                .collect();
            let message = format!("Invalid API Key provided: {masked}");
            return Err(error(401, "invalid_request_error", message));
        }
        Ok(())
    }

    /// `POST /v1/checkout/sessions`.
    fn create(
        &mut self,
        path: &str,
        headers: &HeaderMap,
        body: &[u8],
        params: &mut Value,
    ) -> Reply {
        let content_type = header(headers, "content-type").unwrap_or("");
        let mime = content_type.split(';').next().unwrap_or("").trim();
        if !mime.eq_ignore_ascii_case("application/x-www-form-urlencoded") {
            let message = format!(
                "Invalid request: the body must be application/x-www-form-urlencoded, \
                 not '{content_type}'."
            );
            return error(400, "invalid_request_error", message);
        }
        *params = match parse_form(body) {
            Ok(p) => p,
            Err(reply) => return reply,
        };

        // Stripe saves the first response under a key and replays it for the same request; a
        // different request under that key is an error. A request that fails validation saves
        // nothing, so its key can be used again.
        let key = header(headers, "idempotency-key").map(str::to_string);
        if let Some((first_path, first_params, first)) =
            key.as_ref().and_then(|k| self.saved.get(k))
        {
            if first_path == path && first_params == params {
                return Reply {
                    replayed: true,
                    ..first.clone()
                };
            }
            let message = format!(
                "Keys for idempotent requests can only be used with the same parameters they \
                 were first used with. Try using a key other than '{}' if you meant to execute \
                 a different request.",
                key.as_deref().unwrap_or_default()
            );
            return error(400, "idempotency_error", message);
        }

        let session = match self.new_session(params) {
            Ok(s) => s,
            Err(reply) => return reply,
        };
        self.sessions.push(session.clone());
        let done = reply(200, public(&session));
        if let Some(key) = key {
            self.saved
                .insert(key, (path.to_string(), params.clone(), done.clone()));
        }
        done
    }

    /// Checks the parameters as Stripe does and builds the session.
    fn new_session(&self, params: &Value) -> Checked<Value> {
        let p = Hash::new(params, "", SESSION_PARAMS)?;
        let now = unix_now();

        let mode = p.required_string("mode")?;
        if mode != "payment" && mode != "subscription" {
            let message =
                format!("Invalid mode: {mode} (this fake knows payment and subscription).");
            return Err(invalid("parameter_invalid", "mode", message));
        }
        let subscription = mode == "subscription";
        let success_url = url(&p, "success_url")?.ok_or_else(|| missing("success_url"))?;
        let cancel_url = url(&p, "cancel_url")?;
        let client_reference_id = p.string("client_reference_id")?;
        if client_reference_id.is_some_and(|c| c.chars().count() > 200) {
            let message = "client_reference_id can have at most 200 characters.";
            return Err(invalid("parameter_invalid", "client_reference_id", message));
        }
        let customer_email = p.string("customer_email")?;
        let expires_at = p.integer("expires_at")?;
        if expires_at.is_some_and(|t| t < now + 1800 || t > now + 86_400) {
            let message = "expires_at must be 30 minutes to 24 hours after creation.";
            return Err(invalid("parameter_invalid", "expires_at", message));
        }
        if let Some(code) = p.string("currency")? {
            currency(code, "currency")?;
        }
        let metadata = metadata_of(&p)?;
        if let Some(pi) = p.hash("payment_intent_data", "metadata description")? {
            if subscription {
                let message = "You can only use payment_intent_data in payment mode.";
                return Err(invalid("parameter_invalid", "payment_intent_data", message));
            }
            metadata_of(&pi)?;
            pi.string("description")?;
        }
        let (mut sub_metadata, mut trial_days) = (Map::new(), None);
        if let Some(sd) = p.hash(
            "subscription_data",
            "metadata trial_period_days description",
        )? {
            if !subscription {
                let message = "You can only use subscription_data in subscription mode.";
                return Err(invalid("parameter_invalid", "subscription_data", message));
            }
            sub_metadata = metadata_of(&sd)?;
            sd.string("description")?;
            trial_days = sd.integer("trial_period_days")?;
            if trial_days.is_some_and(|d| !(1..=730).contains(&d)) {
                let param = sd.param("trial_period_days");
                return Err(invalid(
                    "parameter_invalid_integer",
                    &param,
                    "Must be 1 to 730.",
                ));
            }
        }

        let items = match p.map.get("line_items") {
            None => return Err(missing("line_items")),
            Some(Value::Array(items)) if !items.is_empty() => items,
            Some(_) => return Err(invalid("parameter_invalid", "line_items", "Invalid array")),
        };
        let (mut total, mut currency, mut recurring) = (0i64, String::new(), None);
        for (i, item) in items.iter().enumerate() {
            let path = format!("line_items[{i}]");
            let (price, amount) = line_item(item, &path, &self.prices)?;
            if !price["recurring"].is_null() {
                if !subscription {
                    let message = "You must be in subscription mode to use recurring prices.";
                    return Err(invalid("parameter_invalid", &path, message));
                }
                recurring.get_or_insert(price.clone());
            }
            total = total.saturating_add(amount);
            if i == 0 {
                currency = price["currency"].as_str().unwrap_or_default().to_string();
            }
        }
        if subscription && recurring.is_none() {
            let message = "You must provide at least one recurring price in subscription mode.";
            return Err(invalid("parameter_invalid", "line_items", message));
        }

        let id = format!("cs_test_{}", random(24));
        Ok(json!({
            "id": id,
            "object": "checkout.session",
            "url": format!("{}/pay/{id}", self.api_base),
            "status": "open",
            "payment_status": "unpaid",
            "mode": mode,
            "subscription": null,
            "customer": null,
            "_price": recurring,
            "_subscription_metadata": sub_metadata,
            "_trial_days": trial_days,
            "amount_subtotal": total,
            "amount_total": total,
            "currency": currency,
            "client_reference_id": client_reference_id,
            "customer_email": customer_email,
            "metadata": metadata,
            "success_url": success_url,
            "cancel_url": cancel_url,
            "payment_intent": null,
            "created": now,
            "expires_at": expires_at.unwrap_or(now + 86_400),
            "livemode": false,
        }))
    }
}

/// One `line_items[i]`: its price (a Price of the dashboard, or the one `price_data` makes) and
/// its amount (quantity × unit amount).
fn line_item(item: &Value, path: &str, prices: &HashMap<String, Value>) -> Checked<(Value, i64)> {
    let item = Hash::new(item, path, "quantity price price_data")?;
    let quantity = item.required_integer("quantity")?;
    if quantity < 1 {
        let (param, message) = (item.param("quantity"), "This value must be at least 1.");
        return Err(invalid("parameter_invalid_integer", &param, message));
    }
    if let (Some(id), None) = (item.string("price")?, item.map.get("price_data")) {
        let Some(p) = prices.get(id) else {
            let message = format!("No such price: '{id}'");
            return Err(invalid("resource_missing", &item.param("price"), message));
        };
        let amount = p["unit_amount"].as_i64().unwrap_or(0);
        return Ok((p.clone(), quantity.saturating_mul(amount)));
    }
    const PRICE_DATA: &str = "currency unit_amount product product_data recurring";
    let price = item.one_of("price", "price_data", PRICE_DATA)?;
    let recurring = match price.hash("recurring", "interval interval_count")? {
        None => None,
        Some(r) => {
            let interval = r.required_string("interval")?;
            if !["day", "week", "month", "year"].contains(&interval) {
                let message = format!("Invalid interval: {interval}");
                return Err(invalid("parameter_invalid", &r.param("interval"), message));
            }
            Some(
                json!({"interval": interval, "interval_count": r.integer("interval_count")?.unwrap_or(1)}),
            )
        }
    };
    let code = price.required_string("currency")?;
    currency(code, &price.param("currency"))?;
    let unit_amount = price.required_integer("unit_amount")?;
    if !(0..=99_999_999).contains(&unit_amount) {
        let (param, message) = (
            price.param("unit_amount"),
            "This value must be 0 to 99999999.",
        );
        return Err(invalid("parameter_invalid_integer", &param, message));
    }
    let product = price.one_of("product", "product_data", "name description metadata")?;
    product.required_string("name")?;
    product.string("description")?;
    metadata_of(&product)?;
    // Stripe makes an inline Price for price_data: a new id each time
    let made = json!({
        "id": format!("price_test_{}", random(24)), "object": "price", "currency": code,
        "unit_amount": unit_amount, "recurring": recurring, "active": false,
        "type": if recurring.is_some() { "recurring" } else { "one_time" },
    });
    Ok((made, quantity.saturating_mul(unit_amount)))
}

/// Three lowercase letters, as Stripe documents currency codes.
fn currency(code: &str, param: &str) -> Checked<()> {
    if code.len() == 3 && code.bytes().all(|b| b.is_ascii_lowercase()) {
        return Ok(());
    }
    let message = format!("Invalid currency: {code}. Use a lowercase three-letter ISO code.");
    Err(invalid("parameter_invalid", param, message))
}

/// An absolute http(s) URL of at most 5000 characters, if given.
fn url<'a>(p: &Hash<'a>, key: &str) -> Checked<Option<&'a str>> {
    let Some(u) = p.string(key)? else {
        return Ok(None);
    };
    let host = u
        .strip_prefix("https://")
        .or_else(|| u.strip_prefix("http://"));
    if host.is_none_or(|h| h.is_empty() || h.starts_with('/'))
        || u.len() > 5000
        || u.contains(char::is_whitespace)
    {
        return Err(invalid("url_invalid", key, "Not a valid URL"));
    }
    Ok(Some(u))
}

/// `h[metadata]`: string → string, at most 50 keys of ≤ 40 characters, values ≤ 500. An empty
/// value unsets a key, so it is not stored.
fn metadata_of(h: &Hash) -> Checked<Map<String, Value>> {
    let path = h.param("metadata");
    let Some(value) = h.map.get("metadata") else {
        return Ok(Map::new());
    };
    let map = value
        .as_object()
        .ok_or_else(|| invalid("parameter_invalid", &path, "Invalid hash"))?;
    if map.len() > 50 {
        let message = format!("Invalid metadata: at most 50 keys, not {}.", map.len());
        return Err(invalid("parameter_invalid", &path, message));
    }
    let mut out = Map::new();
    for (key, value) in map {
        let fail = |message: &str| Err(invalid("parameter_invalid", &child(&path, key), message));
        let Some(s) = value.as_str() else {
            return fail("Invalid metadata: values are strings, not hashes or arrays.");
        };
        if key.chars().count() > 40 {
            return fail("Invalid metadata: keys can have at most 40 characters.");
        }
        if s.chars().count() > 500 {
            return fail("Invalid metadata: values can have at most 500 characters.");
        }
        if !s.is_empty() {
            out.insert(key.clone(), json!(s));
        }
    }
    Ok(out)
}

/// The parameters a Checkout Session takes (a few of Stripe's many; enough for Tollgate).
const SESSION_PARAMS: &str = "mode success_url cancel_url client_reference_id customer_email \
    line_items metadata payment_intent_data subscription_data expires_at currency";

/// A hash of parameters at `path` (empty at the top level), with only the `allowed` keys
/// (space-separated names).
struct Hash<'a> {
    map: &'a Map<String, Value>,
    path: String,
}

impl<'a> Hash<'a> {
    fn new(value: &'a Value, path: &str, allowed: &str) -> Checked<Hash<'a>> {
        let Some(map) = value.as_object() else {
            return Err(invalid("parameter_invalid", path, "Invalid hash"));
        };
        let allowed: Vec<&str> = allowed.split_whitespace().collect();
        if let Some(unknown) = map.keys().find(|k| !allowed.contains(&k.as_str())) {
            let param = child(path, unknown);
            let message = format!("Received unknown parameter: {param}");
            return Err(invalid("parameter_unknown", &param, message));
        }
        Ok(Hash {
            map,
            path: path.to_string(),
        })
    }

    fn param(&self, key: &str) -> String {
        child(&self.path, key)
    }

    fn hash(&self, key: &str, allowed: &str) -> Checked<Option<Hash<'a>>> {
        let value = self.map.get(key);
        value
            .map(|v| Hash::new(v, &self.param(key), allowed))
            .transpose()
    }

    /// Exactly one of `id` (an existing object, which the fake never has) and `data` (a hash).
    fn one_of(&self, id: &str, data: &str, allowed: &str) -> Checked<Hash<'a>> {
        match (self.string(id)?, self.hash(data, allowed)?) {
            (None, Some(hash)) => Ok(hash),
            (None, None) => Err(missing(&self.param(data))),
            (Some(_), Some(_)) => {
                let message =
                    format!("You may only specify one of these parameters: {id}, {data}.");
                Err(invalid("parameter_invalid", &self.path, message))
            }
            (Some(v), None) => {
                let message = format!("No such {id}: '{v}'");
                Err(invalid("resource_missing", &self.param(id), message))
            }
        }
    }

    /// A string parameter if given. Stripe reads an empty string as "unset", which a create
    /// request cannot do, so it refuses one.
    fn string(&self, key: &str) -> Checked<Option<&'a str>> {
        let param = self.param(key);
        match self.map.get(key) {
            None => Ok(None),
            Some(Value::String(s)) if s.is_empty() => {
                let message = format!(
                    "You passed an empty string for '{param}'. We assume empty values are an \
                     attempt to unset a parameter; however '{param}' cannot be unset. You should \
                     remove '{param}' from your request or supply a non-empty value."
                );
                Err(invalid("parameter_invalid_empty", &param, message))
            }
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(invalid(
                "parameter_invalid",
                &param,
                "Invalid string: a hash",
            )),
        }
    }

    fn required_string(&self, key: &str) -> Checked<&'a str> {
        self.string(key)?.ok_or_else(|| missing(&self.param(key)))
    }

    fn integer(&self, key: &str) -> Checked<Option<i64>> {
        let Some(s) = self.string(key)? else {
            return Ok(None);
        };
        let message = format!("Invalid integer: {s}");
        let n = s.parse::<i64>();
        Ok(Some(n.map_err(|_| {
            invalid("parameter_invalid_integer", &self.param(key), message)
        })?))
    }

    fn required_integer(&self, key: &str) -> Checked<i64> {
        self.integer(key)?.ok_or_else(|| missing(&self.param(key)))
    }
}

/// A form key's parts: `line_items[0][quantity]` → `["line_items", "0", "quantity"]`; `None` for
/// a malformed key (unbalanced or nested brackets, an empty part, text after a `]`).
fn split_key(key: &str) -> Option<Vec<&str>> {
    let (head, mut rest) = key.split_at(key.find('[').unwrap_or(key.len()));
    if head.is_empty() || head.contains(']') {
        return None;
    }
    let mut parts = vec![head];
    while !rest.is_empty() {
        let inner = rest.strip_prefix('[')?;
        let (part, after) = inner.split_once(']')?;
        if part.is_empty() || part.contains('[') {
            return None;
        }
        parts.push(part);
        rest = after;
    }
    Some(parts)
}

/// The form before it becomes JSON: a value, or named children.
enum Node {
    Leaf(String),
    Branch(BTreeMap<String, Node>),
}

/// Puts `value` at `parts`; `Err` when a value and children would share a name (`a=1&a[b]=2`).
fn insert(map: &mut BTreeMap<String, Node>, parts: &[&str], value: String) -> Result<(), ()> {
    let (first, rest) = parts.split_first().unwrap();
    if rest.is_empty() {
        return match map.insert(first.to_string(), Node::Leaf(value)) {
            None => Ok(()),
            Some(_) => Err(()),
        };
    }
    match map
        .entry(first.to_string())
        .or_insert_with(|| Node::Branch(BTreeMap::new()))
    {
        Node::Branch(children) => insert(children, rest, value),
        Node::Leaf(_) => Err(()),
    }
}

/// The body as Stripe reads it: form pairs, each key once, brackets expanded to hashes, and
/// hashes whose keys are all numbers to arrays (indices exactly 0..n).
fn parse_form(body: &[u8]) -> Checked<Value> {
    let pairs: Vec<(String, String)> = serde_urlencoded::from_bytes(body)
        .map_err(|e| error(400, "invalid_request_error", format!("Invalid form: {e}")))?;
    let (mut seen, mut root) = (HashSet::new(), BTreeMap::new());
    for (key, value) in pairs {
        let fail = |what: &str| invalid("parameter_invalid", &key, format!("{what}: {key}"));
        if !seen.insert(key.clone()) {
            return Err(fail("Received a parameter more than once"));
        }
        let parts = split_key(&key).ok_or_else(|| fail("Invalid parameter name"))?;
        insert(&mut root, &parts, value)
            .map_err(|()| fail("A parameter is both a value and a hash"))?;
    }
    Ok(Value::Object(object("", root)?))
}

fn object(path: &str, map: BTreeMap<String, Node>) -> Checked<Map<String, Value>> {
    let mut out = Map::new();
    for (key, node) in map {
        let value = to_json(&child(path, &key), &key, node)?;
        out.insert(key, value);
    }
    Ok(out)
}

/// `name` is the node's own key: metadata stays a hash even when its keys are numbers.
fn to_json(path: &str, name: &str, node: Node) -> Checked<Value> {
    let map = match node {
        Node::Leaf(s) => return Ok(Value::String(s)),
        Node::Branch(map) => map,
    };
    if name == "metadata" || !map.keys().all(|k| k.bytes().all(|b| b.is_ascii_digit())) {
        return Ok(Value::Object(object(path, map)?));
    }
    let bad_array = || invalid("parameter_invalid", path, "Invalid array");
    let mut items = Vec::with_capacity(map.len());
    for (key, node) in map {
        // "01" is not index 1
        let index = key.parse::<usize>().ok().filter(|i| i.to_string() == key);
        let value = to_json(&child(path, &key), &key, node)?;
        items.push((index.ok_or_else(bad_array)?, value));
    }
    items.sort_by_key(|(index, _)| *index);
    if items.iter().enumerate().any(|(i, (index, _))| i != *index) {
        return Err(bad_array());
    }
    Ok(Value::Array(items.into_iter().map(|(_, v)| v).collect()))
}

/// A session as Stripe shows it: without the fake's own bookkeeping (keys starting with `_`).
fn public(session: &Value) -> Value {
    let mut v = session.clone();
    if let Some(m) = v.as_object_mut() {
        m.retain(|k, _| !k.starts_with('_'));
    }
    v
}
