//! Stripe: Checkout Sessions over its form-encoded API, webhook signature verification, and
//! turning an event into what it asks of the books.

use std::time::Duration;

use gateway::store::subscriptions::{EventKind, Invoice, SubscriptionEvent};
use gateway::store::{EventAction, PaidSession, Refund, SubscriptionAction};
use hmac::{Hmac, Mac};
use serde::Deserialize;
use serde_json::Value;
use sha2::Sha256;

/// The API version every request is made at (Stripe-Version), and the one the events Tollgate
/// reads are shaped by: set the webhook endpoint's version to it in Stripe's dashboard.
pub const API_VERSION: &str = "2024-06-20";

/// Stripe's API, at `stripe.api_base` (tests point it at a fake on loopback).
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    api_base: String,
    secret_key: Option<String>,
}

/// Why a call to Stripe failed. Messages never contain the secret key.
#[derive(Debug, thiserror::Error)]
pub enum StripeError {
    #[error("STRIPE_SECRET_KEY is not set")]
    NotConfigured,
    #[error("Stripe could not be reached: {0}")]
    Unreachable(String),
    #[error("Stripe answered {status}: {message}")]
    Refused { status: u16, message: String },
}

impl StripeError {
    /// Worth another try with the same idempotency key.
    fn transient(&self) -> bool {
        match self {
            StripeError::Unreachable(_) => true,
            StripeError::Refused { status, .. } => *status == 429 || *status >= 500,
            StripeError::NotConfigured => false,
        }
    }
}

/// A Checkout Session just created: where to send the customer.
#[derive(Clone, Debug, Deserialize)]
pub struct Created {
    pub id: String,
    pub url: String,
}

/// Whether a Checkout Session object is paid (or had nothing to pay): its hours may be credited.
pub fn is_paid(session: &Value) -> bool {
    matches!(
        session["payment_status"].as_str(),
        Some("paid" | "no_payment_required")
    )
}

impl Client {
    pub fn new(api_base: &str, secret_key: Option<String>) -> Client {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(20))
            .build()
            .expect("a reqwest client with rustls builds");
        Client {
            http,
            api_base: api_base.trim_end_matches('/').to_string(),
            secret_key,
        }
    }

    pub fn configured(&self) -> bool {
        self.secret_key.is_some()
    }

    /// Creates a Checkout Session. Retries transient failures with the same idempotency key, so
    /// Stripe makes one session however many attempts reach it.
    pub async fn create_session(
        &self,
        form: &[(&str, String)],
        idempotency_key: &str,
    ) -> Result<Created, StripeError> {
        let key = self.secret_key.as_ref().ok_or(StripeError::NotConfigured)?;
        let url = format!("{}/v1/checkout/sessions", self.api_base);
        let mut attempt = 0;
        loop {
            attempt += 1;
            let sent = self
                .http
                .post(&url)
                .bearer_auth(key)
                .header("Stripe-Version", API_VERSION)
                .header("Idempotency-Key", idempotency_key)
                .form(form)
                .send()
                .await;
            match answer(sent).await {
                Err(e) if e.transient() && attempt < 3 => {
                    tracing::warn!(attempt, error = %e, "stripe: create session failed; retrying");
                    tokio::time::sleep(Duration::from_millis(200 * attempt)).await;
                }
                Err(e) => return Err(e),
                Ok(v) => {
                    return serde_json::from_value(v).map_err(|e| StripeError::Refused {
                        status: 200,
                        message: format!("a session without an id or url: {e}"),
                    })
                }
            }
        }
    }

    /// Reads a Checkout Session back from Stripe, as JSON.
    pub async fn retrieve_session(&self, id: &str) -> Result<Value, StripeError> {
        let key = self.secret_key.as_ref().ok_or(StripeError::NotConfigured)?;
        let url = format!("{}/v1/checkout/sessions/{id}", self.api_base);
        let sent = self
            .http
            .get(&url)
            .bearer_auth(key)
            .header("Stripe-Version", API_VERSION)
            .send()
            .await;
        answer(sent).await
    }

    /// Opens a Customer Portal session for `customer`, returning to `return_url`: its URL.
    pub async fn portal_session(
        &self,
        customer: &str,
        return_url: &str,
    ) -> Result<String, StripeError> {
        let key = self.secret_key.as_ref().ok_or(StripeError::NotConfigured)?;
        let url = format!("{}/v1/billing_portal/sessions", self.api_base);
        let sent = self
            .http
            .post(&url)
            .bearer_auth(key)
            .header("Stripe-Version", API_VERSION)
            .form(&[("customer", customer), ("return_url", return_url)])
            .send()
            .await;
        let v = answer(sent).await?;
        v["url"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| StripeError::Refused {
                status: 200,
                message: "a portal session without a url".into(),
            })
    }
}

async fn answer(sent: reqwest::Result<reqwest::Response>) -> Result<Value, StripeError> {
    // reqwest's error text names the URL, never the headers, so the key stays out of it
    let resp = sent.map_err(|e| StripeError::Unreachable(e.without_url().to_string()))?;
    let status = resp.status().as_u16();
    let body = resp
        .bytes()
        .await
        .map_err(|e| StripeError::Unreachable(e.to_string()))?;
    if (200..300).contains(&status) {
        return serde_json::from_slice(&body).map_err(|e| StripeError::Refused {
            status,
            message: format!("unexpected answer: {e}"),
        });
    }
    let message = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
        .unwrap_or_else(|| "no error message".into());
    Err(StripeError::Refused { status, message })
}

/// Why a webhook's signature was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("no Stripe-Signature header")]
    Missing,
    #[error("the Stripe-Signature header is malformed")]
    Malformed,
    #[error("the signature's timestamp is outside the tolerance")]
    Stale,
    #[error("no v1 signature matches")]
    NoMatch,
}

/// Verifies a `Stripe-Signature` header over the raw body, as Stripe specifies: HMAC-SHA256 keyed
/// by the whole secret (`whsec_` included) over `"{t}.{body}"`; accepted when any `v1` matches
/// one of the `secrets` (several during a rotation), compared in constant time. `v0` and unknown
/// schemes are ignored; a timestamp further than `tolerance_s` from `now_s` is refused.
pub fn verify_signature(
    header: Option<&[u8]>,
    body: &[u8],
    secrets: &[String],
    tolerance_s: u64,
    now_s: i64,
) -> Result<(), SignatureError> {
    let header = header.ok_or(SignatureError::Missing)?;
    let header = std::str::from_utf8(header).map_err(|_| SignatureError::Malformed)?;
    let mut t: Option<i64> = None;
    let mut v1: Vec<[u8; 32]> = Vec::new();
    for part in header.split(',') {
        let (k, v) = part
            .trim()
            .split_once('=')
            .ok_or(SignatureError::Malformed)?;
        match k {
            "t" => {
                if t.is_some() {
                    return Err(SignatureError::Malformed);
                }
                t = Some(v.parse().map_err(|_| SignatureError::Malformed)?);
            }
            "v1" => {
                // a v1 that is not 32 bytes of hex can match nothing; skip it like a wrong one
                let mut sig = [0u8; 32];
                if hex::decode_to_slice(v, &mut sig).is_ok() {
                    v1.push(sig);
                }
            }
            _ => {}
        }
    }
    let t = t.ok_or(SignatureError::Malformed)?;
    if v1.is_empty() {
        return Err(SignatureError::NoMatch);
    }
    if now_s.abs_diff(t) > tolerance_s {
        return Err(SignatureError::Stale);
    }
    let prefix = format!("{t}.");
    for secret in secrets {
        let Ok(mac) = Hmac::<Sha256>::new_from_slice(secret.as_bytes()) else {
            continue;
        };
        let mut mac = mac;
        mac.update(prefix.as_bytes());
        mac.update(body);
        let expected = mac.finalize().into_bytes();
        // every v1 is compared, each in constant time
        let mut any = subtle::Choice::from(0);
        for sig in &v1 {
            any |= subtle::ConstantTimeEq::ct_eq(&expected[..], &sig[..]);
        }
        if bool::from(any) {
            return Ok(());
        }
    }
    Err(SignatureError::NoMatch)
}

/// A verified event's parts.
#[derive(Debug, PartialEq, Eq)]
pub struct Event {
    pub id: String,
    pub event_type: String,
    pub action: EventAction,
    /// The price a subscription event carries, for the caller to resolve to a plan with the
    /// config (`plan_for_price`).
    pub price: Option<PriceSeen>,
}

/// A subscription's price as an event carries it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PriceSeen {
    pub id: Option<String>,
    pub unit_amount: Option<i64>,
    pub currency: Option<String>,
    pub interval: Option<String>,
}

impl PriceSeen {
    fn of(price: &Value) -> Option<PriceSeen> {
        if !price.is_object() {
            return None;
        }
        Some(PriceSeen {
            id: id_of(&price["id"]),
            unit_amount: price["unit_amount"].as_i64(),
            currency: price["currency"].as_str().map(str::to_ascii_lowercase),
            interval: price["recurring"]["interval"].as_str().map(str::to_string),
        })
    }
}

/// The plan a subscription's price is: the plan whose `stripe_price` it is, else the plan of
/// the same amount, currency and interval (the metadata's when several are), else none.
pub fn plan_for_price(
    plans: &[gateway::config::Plan],
    price: &PriceSeen,
    metadata_plan: Option<&str>,
) -> Option<String> {
    let by_id = plans.iter().find(|p| {
        p.price
            .as_ref()
            .is_some_and(|x| x.stripe_price.is_some() && x.stripe_price == price.id)
    });
    if let Some(p) = by_id {
        return Some(p.name.clone());
    }
    let same: Vec<&gateway::config::Plan> = plans
        .iter()
        .filter(|p| {
            p.price.as_ref().is_some_and(|x| {
                x.cents.is_some()
                    && x.cents == price.unit_amount
                    && price.currency.as_deref() == Some(x.currency.as_str())
                    && price.interval.as_deref() == Some(x.interval)
            })
        })
        .collect();
    same.iter()
        .find(|p| Some(p.name.as_str()) == metadata_plan)
        .or((same.len() == 1).then(|| &same[0]))
        .map(|p| p.name.clone())
}

/// Reads an event and decides what it asks for. Malformed events (no id, type or object) are
/// errors; unknown types are fine and ask for nothing.
pub fn parse_event(body: &[u8]) -> Result<Event, String> {
    let v: Value = serde_json::from_slice(body).map_err(|e| format!("not JSON: {e}"))?;
    let id = v["id"]
        .as_str()
        .filter(|s| !s.is_empty() && s.len() <= 255)
        .ok_or("the event has no id")?
        .to_string();
    let event_type = v["type"]
        .as_str()
        .filter(|s| !s.is_empty() && s.len() <= 255)
        .ok_or("the event has no type")?
        .to_string();
    let object = &v["data"]["object"];
    if !object.is_object() {
        return Err("the event has no data.object".into());
    }
    let at = v["created"].as_i64().unwrap_or(0).saturating_mul(1000);
    let mut price = None;
    let action = match event_type.as_str() {
        "checkout.session.completed" if object["mode"] == "subscription" => {
            match subscription_event(EventKind::Checkout, object, at)? {
                Some((ev, _)) => subscription(ev),
                None => EventAction::Ignore("not_ours"),
            }
        }
        "invoice.paid"
        | "invoice.payment_failed"
        | "customer.subscription.created"
        | "customer.subscription.updated"
        | "customer.subscription.deleted" => {
            let kind = match event_type.as_str() {
                "invoice.paid" => EventKind::InvoicePaid,
                "invoice.payment_failed" => EventKind::PaymentFailed,
                "customer.subscription.deleted" => EventKind::Deleted,
                _ => EventKind::Updated,
            };
            match subscription_event(kind, object, at)? {
                Some((ev, seen)) => {
                    price = seen;
                    subscription(ev)
                }
                None => EventAction::Ignore("not_ours"),
            }
        }
        "checkout.session.completed" => {
            if is_paid(object) {
                EventAction::Fulfil(paid_session_checked(object)?)
            } else {
                // a delayed payment method: credited on async_payment_succeeded
                EventAction::Ignore("awaiting_payment")
            }
        }
        "checkout.session.async_payment_succeeded" => {
            EventAction::Fulfil(paid_session_checked(object)?)
        }
        "charge.refunded" => {
            let intent = id_of(&object["payment_intent"]);
            let refunded = object["amount_refunded"].as_i64();
            match (intent, refunded) {
                (Some(payment_intent), Some(amount_refunded_cents)) => {
                    EventAction::Refund(Refund {
                        payment_intent,
                        amount_refunded_cents,
                    })
                }
                _ => EventAction::Ignore("not_ours"),
            }
        }
        _ => EventAction::Ignore("ignored"),
    };
    Ok(Event {
        id,
        event_type,
        action,
        price,
    })
}

/// The metadata keys Tollgate gives a subscription's Checkout Session and the subscription:
/// which license it pays for, on which plan.
pub const META_LICENSE: &str = "tollgate_license_id";
pub const META_PLAN: &str = "tollgate_plan";

/// A subscription event's action, its config-given parts left for the caller to fill.
fn subscription(event: SubscriptionEvent) -> EventAction {
    EventAction::Subscription(Box::new(SubscriptionAction {
        event,
        grace_ms: 0,
        fallback: String::new(),
        calendar: gateway::periods::Calendar::utc(),
    }))
}

/// Unix seconds to ms.
fn ms(v: &Value) -> Option<i64> {
    v.as_i64().map(|s| s.saturating_mul(1000))
}

/// What a Checkout Session (`mode=subscription`), an invoice or a subscription object says of
/// its subscription, and the price it carries. None when it is not a subscription's (an
/// invoice of no subscription); an error when it is malformed.
fn subscription_event(
    kind: EventKind,
    object: &Value,
    at: i64,
) -> Result<Option<(SubscriptionEvent, Option<PriceSeen>)>, String> {
    let (sub_id, meta) = match kind {
        EventKind::Checkout => (id_of(&object["subscription"]), &object["metadata"]),
        EventKind::InvoicePaid | EventKind::PaymentFailed => (
            id_of(&object["subscription"]),
            &object["subscription_details"]["metadata"],
        ),
        EventKind::Updated | EventKind::Deleted => (id_of(&object["id"]), &object["metadata"]),
    };
    let Some(subscription_id) = sub_id else {
        return match kind {
            EventKind::Updated | EventKind::Deleted => Err("the subscription has no id".into()),
            // an invoice of no subscription, or a session not yet subscribed: not ours
            _ => Ok(None),
        };
    };
    // Tollgate's own metadata keys, never client_reference_id (a Payment Link's buyer sets
    // that): another product's subscription on the same Stripe account is not ours
    let license_id = meta[META_LICENSE]
        .as_str()
        .and_then(|s| s.parse::<i64>().ok());
    let mut ev = SubscriptionEvent {
        kind,
        subscription_id,
        customer_id: id_of(&object["customer"]),
        license_id,
        plan: meta[META_PLAN].as_str().map(str::to_string),
        status: None,
        period: None,
        cancel_at_period_end: None,
        invoice: None,
        checkout_session: None,
        at,
    };
    let mut price = None;
    match kind {
        EventKind::Checkout => ev.checkout_session = id_of(&object["id"]),
        EventKind::InvoicePaid | EventKind::PaymentFailed => {
            // the subscription's own line for the latest period; an invoice of prorations
            // only (an upgrade invoiced at once) starts no period and names no plan
            let lines = object["lines"]["data"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let line = lines
                .iter()
                .filter(|l| l["type"] == "subscription" && l["proration"] != true)
                .max_by_key(|l| l["period"]["start"].as_i64());
            if let Some(l) = line {
                ev.period = ms(&l["period"]["start"]).zip(ms(&l["period"]["end"]));
                price = PriceSeen::of(&l["price"]);
            }
            if kind == EventKind::InvoicePaid {
                let id = id_of(&object["id"]).ok_or("the invoice has no id")?;
                ev.invoice = Some(Invoice {
                    id,
                    payment_intent: id_of(&object["payment_intent"]),
                    amount_cents: object["amount_paid"].as_i64().unwrap_or(0),
                    currency: object["currency"].as_str().unwrap_or("usd").to_string(),
                });
            }
        }
        EventKind::Updated | EventKind::Deleted => {
            ev.status = object["status"].as_str().map(str::to_string);
            ev.cancel_at_period_end = object["cancel_at_period_end"].as_bool();
            let item = &object["items"]["data"][0];
            // the period is the subscription's (API 2024-06-20), or its item's (later versions)
            let period =
                |o: &Value| ms(&o["current_period_start"]).zip(ms(&o["current_period_end"]));
            ev.period = period(object).or_else(|| period(item));
            price = PriceSeen::of(&item["price"]);
        }
    }
    Ok(Some((ev, price)))
}

fn paid_session_checked(object: &Value) -> Result<PaidSession, String> {
    if object["id"].as_str().is_none_or(str::is_empty) {
        return Err("the session has no id".into());
    }
    Ok(paid_session(object))
}

/// A string id, or the id of an expanded object.
fn id_of(v: &Value) -> Option<String> {
    v.as_str()
        .or_else(|| v["id"].as_str())
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

/// What fulfilment needs from a Checkout Session object.
pub fn paid_session(object: &Value) -> PaidSession {
    let meta = &object["metadata"];
    let license_id = meta["license_id"]
        .as_str()
        .or(object["client_reference_id"].as_str())
        .and_then(|s| s.parse::<i64>().ok());
    let hours_ms = meta["hours"]
        .as_str()
        .and_then(|s| s.parse::<i64>().ok())
        .filter(|h| (1..=1_000_000).contains(h))
        .map(|h| h * 3_600_000);
    PaidSession {
        session_id: object["id"].as_str().unwrap_or_default().to_string(),
        payment_intent: id_of(&object["payment_intent"]),
        license_id,
        hours_ms,
        package_id: meta["package_id"].as_str().map(str::to_string),
        amount_cents: object["amount_total"].as_i64().unwrap_or(0),
        currency: object["currency"].as_str().unwrap_or("usd").to_string(),
        // priced by the caller, which has the config
        priced: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BODY: &str = "{\n  \"id\": \"evt_test_webhook\",\n  \"object\": \"event\"\n}";
    const SIG: &str = "4f1cd7feda9826e746b7d482c4badebb657398df1099e1046364f6196a230150";
    const T: i64 = 1_700_000_000;

    fn secrets(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| s.to_string()).collect()
    }

    fn check(header: &str, body: &str, secret: &[&str], now: i64) -> Result<(), SignatureError> {
        verify_signature(
            Some(header.as_bytes()),
            body.as_bytes(),
            &secrets(secret),
            300,
            now,
        )
    }

    fn sign(secret: &str, t: i64, body: &str) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
        mac.update(format!("{t}.{body}").as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }

    #[test]
    fn the_test_vector_verifies() {
        assert_eq!(BODY.len(), 51);
        assert_eq!(sign("whsec_test_secret", T, BODY), SIG);
        let header = format!("t={T},v1={SIG}");
        assert_eq!(check(&header, BODY, &["whsec_test_secret"], T), Ok(()));
        // within the tolerance either way
        assert_eq!(
            check(&header, BODY, &["whsec_test_secret"], T + 300),
            Ok(())
        );
        assert_eq!(
            check(&header, BODY, &["whsec_test_secret"], T - 300),
            Ok(())
        );
    }

    #[test]
    fn everything_else_is_refused() {
        let good = format!("t={T},v1={SIG}");
        let s = &["whsec_test_secret"][..];
        // a wrong secret, and the secret without its whsec_ prefix
        assert_eq!(
            check(&good, BODY, &["whsec_other"], T),
            Err(SignatureError::NoMatch)
        );
        assert_eq!(
            check(&good, BODY, &["test_secret"], T),
            Err(SignatureError::NoMatch)
        );
        // a tampered body, and the same JSON re-serialized
        let tampered = BODY.replace("evt_test_webhook", "evt_test_webhooK");
        assert_eq!(check(&good, &tampered, s, T), Err(SignatureError::NoMatch));
        let reserialized = serde_json::to_string(&serde_json::from_str::<Value>(BODY).unwrap());
        assert_eq!(
            check(&good, &reserialized.unwrap(), s, T),
            Err(SignatureError::NoMatch)
        );
        // only a v0 (the legacy scheme): ignored, so nothing matches
        assert_eq!(
            check(&format!("t={T},v0={SIG}"), BODY, s, T),
            Err(SignatureError::NoMatch)
        );
        // malformed headers
        for bad in [
            "",
            "garbage",
            &format!("v1={SIG}"),
            &format!("t=soon,v1={SIG}"),
            &format!("t={T},t={T},v1={SIG}"),
            &format!("t={T};v1={SIG}"),
        ] {
            assert!(check(bad, BODY, s, T).is_err(), "{bad:?} passed");
        }
        assert_eq!(
            verify_signature(None, BODY.as_bytes(), &secrets(s), 300, T),
            Err(SignatureError::Missing)
        );
        // past the tolerance, either way
        assert_eq!(check(&good, BODY, s, T + 301), Err(SignatureError::Stale));
        assert_eq!(check(&good, BODY, s, T - 301), Err(SignatureError::Stale));
    }

    #[test]
    fn an_extra_bad_v1_and_a_rolled_secret_pass() {
        let s = &["whsec_test_secret"][..];
        let bad = "0".repeat(64);
        for header in [
            format!("t={T},v1={bad},v1={SIG}"),
            format!("t={T},v1={SIG},v1={bad}"),
            format!("t={T}, v0={bad}, v1=nothex, v1={SIG}"),
        ] {
            assert_eq!(check(&header, BODY, s, T), Ok(()), "{header}");
        }
        // during a rotation both the old and the new secret are configured; Stripe signs with
        // either (or both)
        let rolled = ["whsec_old", "whsec_test_secret"];
        assert_eq!(check(&format!("t={T},v1={SIG}"), BODY, &rolled, T), Ok(()));
        let by_old = sign("whsec_old", T, BODY);
        assert_eq!(
            check(&format!("t={T},v1={by_old}"), BODY, &rolled, T),
            Ok(())
        );
        assert_eq!(
            check(&format!("t={T},v1={by_old}"), BODY, s, T),
            Err(SignatureError::NoMatch)
        );
    }

    #[test]
    fn subscription_events_read_tollgates_metadata_and_the_subscriptions_own_line() {
        let event = |t: &str, obj: Value| {
            let body = serde_json::json!({"id": "evt_1", "type": t, "created": 1_700_000_000,
                "data": {"object": obj}});
            parse_event(body.to_string().as_bytes()).unwrap()
        };
        let line = |kind: &str, proration: bool, start: i64, amount: i64| {
            serde_json::json!({"type": kind, "proration": proration,
                "period": {"start": start, "end": start + 100},
                "price": {"id": "price_x", "unit_amount": amount, "currency": "usd",
                          "recurring": {"interval": "month"}}})
        };
        let invoice = |lines: Vec<Value>, meta: Value| {
            serde_json::json!({"id": "in_1", "subscription": "sub_1", "customer": "cus_1",
                "amount_paid": 2000, "currency": "usd", "payment_intent": "pi_1",
                "client_reference_id": "9",
                "subscription_details": {"metadata": meta}, "lines": {"data": lines}})
        };
        let ours = serde_json::json!({"tollgate_license_id": "7", "tollgate_plan": "pro"});
        let e = event(
            "invoice.paid",
            invoice(
                vec![
                    line("invoiceitem", true, 10, -500),
                    line("subscription", false, 20, 2000),
                ],
                ours.clone(),
            ),
        );
        let EventAction::Subscription(a) = &e.action else {
            panic!("{e:?}")
        };
        assert_eq!(a.event.period, Some((20_000, 120_000)));
        assert_eq!(
            (a.event.license_id, a.event.plan.as_deref()),
            (Some(7), Some("pro"))
        );
        assert_eq!(a.event.at, 1_700_000_000_000);
        assert_eq!(e.price.as_ref().unwrap().unit_amount, Some(2000));
        // prorations only (an upgrade invoiced at once): no period, no price
        let e = event(
            "invoice.paid",
            invoice(
                vec![
                    line("invoiceitem", true, 10, -500),
                    line("invoiceitem", true, 10, 900),
                ],
                ours,
            ),
        );
        let EventAction::Subscription(a) = &e.action else {
            panic!("{e:?}")
        };
        assert_eq!((a.event.period, &e.price), (None, &None));
        // another product's subscription: generic metadata and client_reference_id are not ours
        let generic = serde_json::json!({"license_id": "7", "plan": "pro"});
        let e = event(
            "invoice.paid",
            invoice(vec![line("subscription", false, 20, 2000)], generic),
        );
        let EventAction::Subscription(a) = &e.action else {
            panic!("{e:?}")
        };
        assert_eq!((a.event.license_id, &a.event.plan), (None, &None));
    }

    #[test]
    fn events_become_actions() {
        let event = |t: &str, obj: Value| {
            let body = serde_json::json!({"id": "evt_1", "type": t, "data": {"object": obj}});
            parse_event(body.to_string().as_bytes()).map(|e| e.action)
        };
        let session = |status: &str| {
            serde_json::json!({"id": "cs_1", "payment_status": status, "amount_total": 2500,
                "currency": "usd", "payment_intent": "pi_1",
                "metadata": {"license_id": "7", "hours": "5"}})
        };
        let want = PaidSession {
            session_id: "cs_1".into(),
            payment_intent: Some("pi_1".into()),
            license_id: Some(7),
            hours_ms: Some(18_000_000),
            package_id: None,
            amount_cents: 2500,
            currency: "usd".into(),
            priced: None,
        };
        assert_eq!(
            event("checkout.session.completed", session("paid")),
            Ok(EventAction::Fulfil(want.clone()))
        );
        assert_eq!(
            event("checkout.session.completed", session("unpaid")),
            Ok(EventAction::Ignore("awaiting_payment"))
        );
        assert_eq!(
            event("checkout.session.async_payment_succeeded", session("paid")),
            Ok(EventAction::Fulfil(want))
        );
        assert_eq!(
            event(
                "charge.refunded",
                serde_json::json!({"payment_intent": {"id": "pi_1"}, "amount_refunded": 500})
            ),
            Ok(EventAction::Refund(Refund {
                payment_intent: "pi_1".into(),
                amount_refunded_cents: 500
            }))
        );
        assert_eq!(
            event("customer.created", serde_json::json!({"id": "cus_1"})),
            Ok(EventAction::Ignore("ignored"))
        );
        assert!(parse_event(b"{\"type\": \"x\"}").is_err());
        assert!(parse_event(b"[1, 2]").is_err());
        assert!(event(
            "checkout.session.completed",
            serde_json::json!({"payment_status": "paid"})
        )
        .is_err());
    }
}
