//! The customer's side: hour packages, Stripe Checkout, the success page, Stripe's webhook, and
//! the balance, history and usage views (authenticated by the license key).

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use gateway::errors::ErrorCode;
use gateway::license::ms_to_hours;
use gateway::license::LicenseStatus;
use gateway::limits::LimitState;
use gateway::store::License;
use gateway::store::{EventAction, EventOutcome, Fulfilment, NewPayment, PaidSession};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::{self, Customer};
use crate::error::{ApiError, ApiJson, ApiQuery, ApiResult};
use crate::licenses::{applied, history_page, license_view, live_remaining_ms, HistoryQuery};
use crate::stripe::{self, StripeError};
use crate::views::{
    AlertView, Alerts, Balance, CheckoutCreated, CustomPricing, HistoryPage, LimitLine, Limits, Me,
    PackageView, Packages, Receipt, ReceiptStatus, Unflushed, WebhookAck,
};
use crate::AdminState;

pub fn routes() -> OpenApiRouter<AdminState> {
    OpenApiRouter::new()
        .routes(routes!(packages))
        .routes(routes!(create_checkout))
        .routes(routes!(success))
        .routes(routes!(webhook))
        .routes(routes!(balance))
        .routes(routes!(history))
        .routes(routes!(me))
        .routes(routes!(limits))
        .routes(routes!(alerts))
}

/// The hour packages on sale and the price by the hour.
#[utoipa::path(
    get, path = "/payments/packages", operation_id = "list_packages", tag = "payments",
    responses((status = 200, description = "What is on sale", body = Packages)),
)]
async fn packages(State(st): State<AdminState>) -> Json<Packages> {
    let c = &st.app.config;
    Json(Packages {
        packages: c
            .packages
            .iter()
            .map(|p| PackageView {
                id: p.id.clone(),
                hours: p.hours,
                price_cents: p.price_cents,
                currency: p.currency.clone(),
            })
            .collect(),
        custom: CustomPricing {
            price_per_hour_cents: c.payments.price_per_hour_cents,
            min_hours: c.payments.min_hours,
            max_hours: c.payments.max_hours,
            currency: c.payments.currency.clone(),
        },
    })
}

/// What to buy: a package, or whole hours at the price by the hour (one of the two).
#[derive(Deserialize, Default, ToSchema)]
#[schema(example = json!({"package_id": "small"}))]
#[serde(deny_unknown_fields)]
pub struct CheckoutBody {
    /// The key to credit; else the `X-License-Key` header.
    pub license_key: Option<String>,
    /// Whole hours, within `custom.min_hours` and `custom.max_hours` of `/payments/packages`.
    pub hours: Option<f64>,
    /// A package's id from `/payments/packages`.
    pub package_id: Option<String>,
}

/// A Checkout Session made for a customer.
pub struct Checkout {
    pub session_id: String,
    pub url: String,
    pub hours: i64,
    pub amount_cents: i64,
    pub currency: String,
}

/// What is being bought: whole hours at a price.
struct Order {
    package_id: Option<String>,
    hours: i64,
    amount_cents: i64,
    currency: String,
}

fn order(st: &AdminState, b: &CheckoutBody) -> ApiResult<Order> {
    let c = &st.app.config;
    match (&b.package_id, b.hours) {
        (Some(id), None) => {
            let p = c.packages.iter().find(|p| &p.id == id).ok_or_else(|| {
                let ids: Vec<&str> = c.packages.iter().map(|p| p.id.as_str()).collect();
                ApiError::bad_request(format!(
                    "unknown package {id:?}; the packages are {}",
                    ids.join(", ")
                ))
                .with("packages", ids)
            })?;
            Ok(Order {
                package_id: Some(p.id.clone()),
                hours: p.hours,
                amount_cents: p.price_cents,
                currency: p.currency.clone(),
            })
        }
        (None, Some(h)) => {
            let (min, max) = (c.payments.min_hours, c.payments.max_hours);
            if !h.is_finite() || h.fract() != 0.0 || h < min as f64 || h > max as f64 {
                return Err(ApiError::bad_request(format!(
                    "hours must be a whole number from {min} to {max}"
                )));
            }
            let hours = h as i64;
            Ok(Order {
                package_id: None,
                hours,
                amount_cents: hours * c.payments.price_per_hour_cents,
                currency: c.payments.currency.clone(),
            })
        }
        (Some(_), Some(_)) => Err(ApiError::bad_request("send package_id or hours, not both")),
        (None, None) => Err(ApiError::bad_request(
            "send package_id (see /payments/packages) or hours",
        )),
    }
}

fn stripe_failed(e: StripeError) -> ApiError {
    match e {
        StripeError::NotConfigured => ApiError::new(ErrorCode::PaymentsUnavailable),
        e => {
            tracing::warn!(error = %e, "stripe call failed");
            ApiError::new(ErrorCode::PaymentProviderError)
        }
    }
}

/// Refuses licenses that cannot be used: buying hours for them would take money for nothing.
fn usable(l: &License, now: i64) -> ApiResult<()> {
    if l.status == LicenseStatus::Revoked {
        return Err(ApiError::new(ErrorCode::LicenseRevoked));
    }
    if l.expires_at.is_some_and(|e| e <= now) {
        return Err(ApiError::new(ErrorCode::LicenseExpired));
    }
    Ok(())
}

/// Starts a Stripe Checkout for hours on a license; the hours are credited once Stripe says
/// the payment is made (its webhook, or the success page, whichever comes first).
#[utoipa::path(
    post, path = "/payments/create-checkout", operation_id = "create_checkout", tag = "payments",
    security(("license_key" = []), ()),
    params(("Idempotency-Key" = Option<String>, Header,
        description = "A retry with the same key gets the same Checkout Session back (1–255 bytes).")),
    request_body = CheckoutBody,
    responses((status = 200, description = "The Checkout Session", body = CheckoutCreated)),
    extensions(("x-errors" = json!(["rate_limited", "bad_request", "missing_license_key",
        "invalid_license_key", "license_revoked", "license_expired", "payload_too_large",
        "payments_unavailable", "payment_provider_error", "internal_error"]))),
)]
async fn create_checkout(
    State(st): State<AdminState>,
    headers: HeaderMap,
    ApiJson(b): ApiJson<CheckoutBody>,
) -> ApiResult<Json<CheckoutCreated>> {
    let key = b
        .license_key
        .clone()
        .or_else(|| auth::presented_key(&headers, None));
    let license = auth::license_for_key(&st, key.as_deref()).await?;
    // A client that retries with the same Idempotency-Key gets the same session back.
    let idempotency_key = match headers.get("idempotency-key").and_then(|v| v.to_str().ok()) {
        Some(k) if !k.is_empty() && k.len() <= 255 => {
            let digest = Sha256::digest(format!("{}:{k}", license.id));
            format!("tollgate-{}", hex::encode(&digest[..16]))
        }
        Some(_) => return Err(ApiError::bad_request("Idempotency-Key must be 1–255 bytes")),
        None => format!("tollgate-{}", hex::encode(rand::random::<[u8; 16]>())),
    };
    let created = start_checkout(&st, &license, &b, &idempotency_key).await?;
    Ok(Json(CheckoutCreated {
        session_id: created.session_id,
        checkout_url: created.url,
        hours: created.hours,
        amount_cents: created.amount_cents,
        currency: created.currency,
    }))
}

/// Prices the order, creates the Checkout Session at Stripe and records it as pending (the API
/// and the payment page).
pub async fn start_checkout(
    st: &AdminState,
    license: &License,
    b: &CheckoutBody,
    idempotency_key: &str,
) -> ApiResult<Checkout> {
    let order = order(st, b)?;
    usable(license, st.app.ledger.now_ms())?;
    if !st.shared.stripe.configured() {
        return Err(ApiError::new(ErrorCode::PaymentsUnavailable));
    }
    let c = &st.app.config;
    let id = license.id.to_string();
    let hours = order.hours.to_string();
    let mut form: Vec<(&str, String)> = vec![
        ("mode", "payment".into()),
        ("success_url", c.stripe.success_url.clone()),
        ("cancel_url", c.stripe.cancel_url.clone()),
        ("client_reference_id", id.clone()),
        ("line_items[0][quantity]", "1".into()),
        (
            "line_items[0][price_data][currency]",
            order.currency.clone(),
        ),
        (
            "line_items[0][price_data][unit_amount]",
            order.amount_cents.to_string(),
        ),
        (
            "line_items[0][price_data][product_data][name]",
            format!(
                "{} hour{} of access",
                order.hours,
                if order.hours == 1 { "" } else { "s" }
            ),
        ),
        ("metadata[license_id]", id.clone()),
        ("metadata[hours]", hours.clone()),
        ("payment_intent_data[metadata][license_id]", id),
        ("payment_intent_data[metadata][hours]", hours),
    ];
    if let Some(p) = &order.package_id {
        form.push(("metadata[package_id]", p.clone()));
    }
    let created = st
        .shared
        .stripe
        .create_session(&form, idempotency_key)
        .await
        .map_err(stripe_failed)?;
    let pending = NewPayment {
        license_id: license.id,
        session_id: created.id.clone(),
        package_id: order.package_id.clone(),
        hours_ms: order.hours * 3_600_000,
        amount_cents: order.amount_cents,
        currency: order.currency.clone(),
    };
    let now = st.app.ledger.now_ms();
    st.app.store.record_pending(pending, now).await?;
    tracing::info!(license = license.id, session = %created.id, "checkout session created");
    Ok(Checkout {
        session_id: created.id,
        url: created.url,
        hours: order.hours,
        amount_cents: order.amount_cents,
        currency: order.currency,
    })
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct SuccessQuery {
    /// The Checkout Session's id (Stripe puts it in the success URL).
    #[param(min_length = 1, max_length = 255)]
    session_id: String,
    /// The license's key, to see the hours as well as the status.
    license_key: Option<String>,
}

/// The success page for someone who has only the session id: the payment's state, nothing of
/// the license.
fn receipt_only(headers: &HeaderMap, session_id: &str, state: ReceiptStatus) -> Response {
    if wants_json(headers) {
        return Json(Receipt {
            session_id: session_id.to_string(),
            status: state,
            hours: None,
            license_id: None,
            hours_remaining: None,
        })
        .into_response();
    }
    crate::ui::pages::receipt::anonymous(state.as_str())
}

fn wants_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("application/json"))
}

/// Where Stripe sends the customer back. Reads the session from Stripe and fulfils it if paid
/// (the webhook may not have arrived yet; whichever comes first credits, the other finds it
/// done). An HTML page, or JSON with `Accept: application/json`.
#[utoipa::path(
    get, path = "/payments/success", operation_id = "checkout_success", tag = "payments",
    security(("license_key" = []), ()),
    params(SuccessQuery),
    responses((status = 200, description = "The payment's status",
        content((Receipt = "application/json"), (String = "text/html")))),
    extensions(("x-errors" = json!(["rate_limited", "bad_request", "not_found", "payments_unavailable",
        "payment_provider_error", "internal_error"]))),
)]
async fn success(
    State(st): State<AdminState>,
    headers: HeaderMap,
    ApiQuery(q): ApiQuery<SuccessQuery>,
) -> ApiResult<Response> {
    let session_id = Some(q.session_id)
        .filter(|s| !s.is_empty() && s.len() <= 255 && s.bytes().all(|b| b.is_ascii_graphic()))
        .ok_or_else(|| ApiError::bad_request("session_id must be a Checkout Session's id"))?;
    // a made-up id costs one lookup, then none for a while, and none while the budget of
    // lookups that find nothing is spent
    if st.shared.unknown_checkouts.contains(session_id.as_bytes()) {
        return Err(ApiError::not_found("checkout session"));
    }
    let lookups = st.app.ledger.lookups();
    let Some(lookup) = lookups.may_look_up("checkout_session") else {
        return Err(crate::auth::too_many_unknown());
    };
    let known = st.app.store.payment_by_session(session_id.clone()).await?;
    let Some(payment) = known else {
        st.shared.unknown_checkouts.insert(session_id.as_bytes());
        lookup.found_nothing();
        return Err(ApiError::not_found("checkout session"));
    };
    drop(lookup);
    let session = st
        .shared
        .stripe
        .retrieve_session(&session_id)
        .await
        .map_err(stripe_failed)?;
    let state = if stripe::is_paid(&session) {
        let mut paid = stripe::paid_session(&session);
        // the row is what we priced; the session only has to be the same one
        paid.session_id = session_id.clone();
        paid.priced = configured_price(&st.app.config, &paid);
        let now = st.app.ledger.now_ms();
        let done = st.app.store.fulfil(paid, now).await?;
        fulfilled(&st, &done, "the success page");
        ReceiptStatus::Paid
    } else {
        ReceiptStatus::Processing
    };
    let lid = payment.license_id;
    let license = st.app.store.license(lid).await?;
    // a session id alone (in a URL, a log, a referrer) shows only that the payment arrived;
    // the license's key, or the cookie of the browser that started this checkout, shows more
    let key_holder = auth::presented_key(&headers, None)
        .or_else(|| q.license_key.clone())
        .is_some_and(|k| gateway::keys::KeyHash::of(k.as_bytes()) == license.key_hash);
    let checkout_browser = crate::ui::customer::started_checkout(&st, &headers, &session_id);
    if !(key_holder || checkout_browser) {
        return Ok(receipt_only(&headers, &session_id, state));
    }
    let remaining_ms = live_remaining_ms(&st, &license);
    if wants_json(&headers) {
        return Ok(Json(Receipt {
            session_id,
            status: state,
            hours: Some(ms_to_hours(payment.hours_ms)),
            license_id: Some(license.id),
            hours_remaining: Some(ms_to_hours(remaining_ms)),
        })
        .into_response());
    }
    Ok(crate::ui::pages::receipt::for_holder(
        state.as_str(),
        payment.hours_ms,
        remaining_ms,
        &license.key_prefix,
        &st.app.config.balance_unit,
    ))
}

/// What the config charges for a paid session's hours, for a session fulfilled without its
/// pending row: its package's price when the metadata names a package of those hours, else the
/// hours at the custom price. None unless `payments.credit_unrecorded_sessions` is on: a session
/// without a pending row is then not ours, and nothing is credited for it.
fn configured_price(c: &gateway::config::Config, paid: &PaidSession) -> Option<(i64, String)> {
    if !c.payments.credit_unrecorded_sessions {
        return None;
    }
    let hours_ms = paid.hours_ms?;
    let package = paid
        .package_id
        .as_ref()
        .and_then(|id| c.packages.iter().find(|p| &p.id == id))
        .filter(|p| p.hours * 3_600_000 == hours_ms);
    Some(match package {
        Some(p) => (p.price_cents, p.currency.clone()),
        None => (
            hours_ms / 3_600_000 * c.payments.price_per_hour_cents,
            c.payments.currency.clone(),
        ),
    })
}

/// After a fulfilment: the proxy learns the new balance, the metrics and the log hear of it,
/// and a payment whose amount differed from its price is reported to the operator.
fn fulfilled(st: &AdminState, done: &Fulfilment, via: &str) {
    let Fulfilment::Credited {
        license,
        payment,
        credited_ms,
    } = done
    else {
        return;
    };
    applied(st, license);
    gateway::metrics::CREDITED_SECONDS.inc_by(*credited_ms as f64 / 1_000.0);
    if let Some(why) = &payment.mismatch {
        gateway::metrics::PAYMENT_MISMATCHES.inc();
        tracing::error!(
            license = license.id,
            session = %payment.session_id,
            credited_ms,
            mismatch = %why,
            "a payment's amount differs from its price; credited only what was paid for"
        );
    }
    tracing::info!(license = license.id, session = %payment.session_id, credited_ms, "credited from {via}");
}

/// A Stripe event: the fields Tollgate reads (`stripe::parse_event` reads them from the verified
/// bytes; this type gives the document its schema). Events of other types are acknowledged and
/// ignored.
#[derive(Deserialize, ToSchema)]
#[allow(dead_code)]
pub struct StripeEvent {
    /// Stripe's event id (`evt_…`): an event is applied once, however often it comes.
    #[schema(min_length = 1, max_length = 255, example = "evt_1")]
    id: String,
    /// `checkout.session.completed`, `checkout.session.async_payment_succeeded` or
    /// `charge.refunded`.
    #[serde(rename = "type")]
    #[schema(
        min_length = 1,
        max_length = 255,
        example = "checkout.session.completed"
    )]
    kind: String,
    data: StripeEventData,
}

#[derive(Deserialize, ToSchema)]
#[allow(dead_code)]
pub struct StripeEventData {
    /// The Checkout Session or the charge.
    object: serde_json::Map<String, serde_json::Value>,
}

/// Stripe's webhook: verify, dedupe by event id, apply, answer 2xx at once. No call to Stripe
/// is made here; the event carries what fulfilment needs. Each event is applied once, however
/// often it is delivered.
#[utoipa::path(
    post, path = "/payments/webhook", operation_id = "stripe_webhook", tag = "payments",
    params(("Stripe-Signature" = String, Header,
        description = "Stripe's signature of the body (`t=…,v1=…`), checked against STRIPE_WEBHOOK_SECRET.")),
    request_body(content = StripeEvent, description = "A Stripe event, as Stripe sends it",
        content_type = "application/json"),
    responses((status = 200, description = "The event was received", body = WebhookAck)),
    extensions(("x-errors" = json!(["invalid_signature", "bad_request", "payload_too_large",
        "internal_error"]))),
)]
async fn webhook(State(st): State<AdminState>, headers: HeaderMap, body: Bytes) -> Response {
    let now_s = st.app.ledger.now_ms().div_euclid(1000);
    let verified = stripe::verify_signature(
        headers.get("stripe-signature").map(|v| v.as_bytes()),
        &body,
        &st.shared.webhook_secrets,
        st.app.config.stripe.webhook_tolerance_s,
        now_s,
    );
    if let Err(e) = verified {
        gateway::metrics::stripe_event("unverified", "invalid_signature");
        let why = if st.shared.webhook_secrets.is_empty() {
            "STRIPE_WEBHOOK_SECRET is not set: no event can be verified.".to_string()
        } else {
            format!("The Stripe-Signature could not be verified: {e}.")
        };
        return ApiError::msg(ErrorCode::InvalidSignature, why).into_response();
    }
    let event = match stripe::parse_event(&body) {
        Ok(e) => e,
        Err(why) => {
            gateway::metrics::stripe_event("unparsed", "bad_request");
            return ApiError::bad_request(format!("The event is malformed: {why}."))
                .into_response();
        }
    };
    let now = st.app.ledger.now_ms();
    let (id, kind, mut action) = (event.id.clone(), event.event_type.clone(), event.action);
    if let EventAction::Fulfil(paid) = &mut action {
        paid.priced = configured_price(&st.app.config, paid);
    }
    let outcome = st.app.store.apply_event(id, kind, action, now).await;
    match outcome {
        Ok(outcome) => {
            if let EventOutcome::Fulfilled(done) = &outcome {
                fulfilled(&st, done, "the webhook");
            } else if let Some(l) = outcome.changed() {
                applied(&st, l);
            }
            gateway::metrics::stripe_event(&event.event_type, outcome.label());
            let ack = WebhookAck {
                received: true,
                result: outcome.label(),
            };
            (StatusCode::OK, Json(ack)).into_response()
        }
        Err(e) => {
            // not recorded: Stripe retries, and the retry is processed as new
            gateway::metrics::stripe_event(&event.event_type, "error");
            ApiError::from(e).into_response()
        }
    }
}

/// The customer's balance and their last 30 days of use.
#[utoipa::path(
    get, path = "/payments/balance", operation_id = "balance", tag = "usage",
    security(("license_key" = []), ("license_key_query" = [])),
    responses((status = 200, description = "The balance", body = Balance)),
    extensions(("x-errors" = json!(["rate_limited", "missing_license_key", "invalid_license_key",
        "internal_error"]))),
)]
async fn balance(State(st): State<AdminState>, Customer(l): Customer) -> ApiResult<Json<Balance>> {
    let (id, now) = (l.id, st.app.ledger.now_ms());
    let stats = st.app.store.usage_stats(id, 30, now).await?;
    let live = license_view(&st, &l);
    let mut usage_stats: crate::views::UsageStatsView = (&stats).into();
    crate::views::name_routes(&mut usage_stats.top_endpoints, &st.app.routes);
    Ok(Json(Balance {
        license_id: l.id,
        plan: live.plan,
        status: live.status,
        hours_remaining: live.hours_remaining,
        seconds_remaining: live.seconds_remaining,
        balance_display: live.balance_display,
        balance_unit: st.app.config.balance_unit.name(),
        usage_stats,
    }))
}

/// The customer's history: balance changes, payments and sessions, newest first.
#[utoipa::path(
    get, path = "/payments/history", operation_id = "customer_history", tag = "usage",
    security(("license_key" = []), ("license_key_query" = [])),
    params(HistoryQuery),
    responses((status = 200, description = "A page of history", body = HistoryPage)),
    extensions(("x-errors" = json!(["rate_limited", "bad_request", "missing_license_key",
        "invalid_license_key", "internal_error"]))),
)]
async fn history(
    State(st): State<AdminState>,
    Customer(l): Customer,
    ApiQuery(q): ApiQuery<HistoryQuery>,
) -> ApiResult<Json<HistoryPage>> {
    history_page(&st, l.id, q).await
}

/// The customer's own license, with usage this node has metered and not yet written.
#[utoipa::path(
    get, path = "/usage/me", operation_id = "me", tag = "usage",
    security(("license_key" = []), ("license_key_query" = [])),
    responses((status = 200, description = "The license", body = Me)),
    extensions(("x-errors" = json!(["rate_limited", "missing_license_key", "invalid_license_key",
        "internal_error"]))),
)]
async fn me(State(st): State<AdminState>, Customer(l): Customer) -> ApiResult<Json<Me>> {
    let now = st.app.ledger.now_ms();
    let stats = st.app.store.usage_stats(l.id, 30, now).await?;
    let unflushed = st.app.ledger.account(l.id).map(|account| {
        let p = account.pending();
        Unflushed {
            charged_ms: p.charge_ms,
            requests: p.requests,
        }
    });
    Ok(Json(Me {
        license: license_view(&st, &l),
        unflushed,
        meters: crate::views::UsageStatsView::from(&stats).meters,
    }))
}

/// Each limit of the customer's plan: its use, what remains and when it resets.
#[utoipa::path(
    get, path = "/usage/limits", operation_id = "limits", tag = "usage",
    security(("license_key" = []), ("license_key_query" = [])),
    responses((status = 200, description = "The plan's limits", body = Limits)),
    extensions(("x-errors" = json!(["rate_limited", "missing_license_key", "invalid_license_key",
        "internal_error"]))),
)]
async fn limits(State(st): State<AdminState>, Customer(l): Customer) -> ApiResult<Json<Limits>> {
    let lines = limit_views(&st, &l).await?;
    Ok(Json(Limits {
        license_id: l.id,
        plan: l.plan,
        limits: lines.iter().map(LimitLine::from).collect(),
    }))
}

/// Where a license stands against each limit of its plan now: what this process meters of it
/// (with, on several nodes, the others' use of the period from the store), else what the store
/// measured. The API's `/usage/limits` and both pages show these.
pub(crate) async fn limit_views(
    st: &AdminState,
    l: &License,
) -> ApiResult<Vec<gateway::limits::LimitView>> {
    let ledger = &st.app.ledger;
    let calendar = &st.app.config.metering.calendar;
    let account = ledger.account(l.id);
    let live = match &account {
        // several nodes: the others' use of the period is in the store
        Some(a) if ledger.lease_slice_ms().is_some() => {
            let row = st
                .app
                .store
                .admission_state(l.key_hash, calendar, ledger.now_ms())
                .await?;
            ledger.limits_now_with(a, row.and_then(|r| ledger.measured_period(&r)))
        }
        Some(a) => ledger.limits_now(a),
        None => None,
    };
    match live {
        Some(lines) => Ok(lines),
        None => {
            // not metered here this period: what the store measured, as admission reads it
            let row = st
                .app
                .store
                .admission_state(l.key_hash, calendar, ledger.now_ms())
                .await?
                .ok_or_else(|| ApiError::new(ErrorCode::InvalidLicenseKey))?;
            let period = ledger.measured_period(&row).unwrap_or_default();
            let state = LimitState::measured(period, row.today);
            Ok(ledger.limits_of(&ledger.plan(&l.plan), &state))
        }
    }
}

/// The customer's usage alerts (a threshold of a plan's allowance or of the balance crossed),
/// newest first, at most 100.
#[utoipa::path(
    get, path = "/usage/alerts", operation_id = "alerts", tag = "usage",
    security(("license_key" = []), ("license_key_query" = [])),
    responses((status = 200, description = "The alerts", body = Alerts)),
    extensions(("x-errors" = json!(["rate_limited", "missing_license_key", "invalid_license_key",
        "internal_error"]))),
)]
async fn alerts(State(st): State<AdminState>, Customer(l): Customer) -> ApiResult<Json<Alerts>> {
    let rows = st.app.store.alerts_for_license(l.id, 100).await?;
    Ok(Json(Alerts {
        license_id: l.id,
        alerts: rows.iter().map(AlertView::from).collect(),
    }))
}
