//! The customer's side: hour packages, Stripe Checkout, Stripe's webhook, and the balance,
//! history and usage views (authenticated by the license key). Each handler parses, calls
//! `service`, and renders; the success page, which is a page first, is `ui::pages::receipt`.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use gateway::errors::ErrorCode;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::{self, Customer};
use crate::error::{ApiError, ApiJson, ApiQuery, ApiResult};
use crate::service::licenses::{self, HistoryQuery};
use crate::service::payments::{self, CheckoutBody, SubscribeBody};
use crate::service::{usage, Service};
use crate::stripe;
use crate::views::{
    AlertView, Alerts, Balance, CheckoutCreated, CustomPricing, HistoryPage, LimitLine, Limits, Me,
    PackageView, Packages, PlanOffer, PortalCreated, SubscribeCreated, Unflushed, WebhookAck,
};
use crate::AdminState;

pub fn routes() -> OpenApiRouter<AdminState> {
    OpenApiRouter::new()
        .routes(routes!(packages))
        .routes(routes!(create_checkout))
        .routes(routes!(subscribe))
        .routes(routes!(portal))
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
        plans: c
            .plans
            .iter()
            .filter_map(|p| PlanOffer::of(p, &c.meters))
            .collect(),
    })
}

/// The Idempotency-Key Stripe gets for a customer's request: the client's own key scoped to
/// the license (a retry gets the same session back), else a fresh one.
fn idempotency_key(headers: &HeaderMap, license_id: i64, what: &str) -> ApiResult<String> {
    match headers.get("idempotency-key").and_then(|v| v.to_str().ok()) {
        Some(k) if !k.is_empty() && k.len() <= 255 => {
            let digest = Sha256::digest(format!("{license_id}:{what}{k}"));
            Ok(format!("tollgate-{}", hex::encode(&digest[..16])))
        }
        Some(_) => Err(ApiError::bad_request("Idempotency-Key must be 1–255 bytes")),
        None => Ok(format!(
            "tollgate-{}",
            hex::encode(rand::random::<[u8; 16]>())
        )),
    }
}

/// Subscribes a license to a plan: a Stripe Checkout in `mode=subscription`. The license goes
/// on the plan once Stripe says the first invoice is paid (`invoice.paid`); each renewal paid
/// starts a new period of what the plan includes.
#[utoipa::path(
    post, path = "/payments/subscribe", operation_id = "subscribe", tag = "payments",
    security(("license_key" = []), ()),
    params(("Idempotency-Key" = Option<String>, Header,
        description = "A retry with the same key gets the same Checkout Session back (1–255 bytes).")),
    request_body = SubscribeBody,
    responses((status = 200, description = "The Checkout Session", body = SubscribeCreated)),
    extensions(("x-errors" = json!(["rate_limited", "bad_request", "missing_license_key",
        "invalid_license_key", "license_revoked", "license_expired", "payload_too_large",
        "payments_unavailable", "payment_provider_error", "internal_error"]))),
)]
async fn subscribe(
    State(st): State<AdminState>,
    headers: HeaderMap,
    ApiJson(b): ApiJson<SubscribeBody>,
) -> ApiResult<Json<SubscribeCreated>> {
    let key = b
        .license_key
        .clone()
        .or_else(|| auth::presented_key(&headers, None));
    let license = auth::license_for_key(&st, key.as_deref()).await?;
    // (the plan in it: a key reused for another plan is another request)
    let idempotency_key = idempotency_key(&headers, license.id, &format!("subscribe:{}:", b.plan))?;
    let svc = Service::of(&st.app);
    let created =
        payments::start_subscription(&svc, &st.shared.stripe, &license, &b.plan, &idempotency_key)
            .await?;
    Ok(Json(SubscribeCreated {
        session_id: created.session_id,
        checkout_url: created.url,
        plan: b.plan,
    }))
}

/// The key of a customer's request, from the body or the `X-License-Key` header.
#[derive(Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct PortalBody {
    /// The license; else the `X-License-Key` header.
    pub license_key: Option<String>,
}

/// Opens Stripe's Customer Portal for the license's subscription (change plan, update the
/// card, cancel); it returns to the payment page.
#[utoipa::path(
    post, path = "/payments/portal", operation_id = "portal", tag = "payments",
    security(("license_key" = []), ()),
    request_body = PortalBody,
    responses((status = 200, description = "The portal", body = PortalCreated)),
    extensions(("x-errors" = json!(["rate_limited", "bad_request", "missing_license_key",
        "invalid_license_key", "license_revoked", "license_expired", "not_found",
        "payload_too_large", "payments_unavailable", "payment_provider_error",
        "internal_error"]))),
)]
async fn portal(
    State(st): State<AdminState>,
    headers: HeaderMap,
    ApiJson(b): ApiJson<PortalBody>,
) -> ApiResult<Json<PortalCreated>> {
    let key = b
        .license_key
        .or_else(|| auth::presented_key(&headers, None));
    let license = auth::license_for_key(&st, key.as_deref()).await?;
    let url = payments::portal(&Service::of(&st.app), &st.shared.stripe, &license).await?;
    Ok(Json(PortalCreated { url }))
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
    let idempotency_key = idempotency_key(&headers, license.id, "")?;
    let svc = Service::of(&st.app);
    let created =
        payments::start_checkout(&svc, &st.shared.stripe, &license, &b, &idempotency_key).await?;
    Ok(Json(CheckoutCreated {
        session_id: created.session_id,
        checkout_url: created.url,
        hours: created.hours,
        amount_cents: created.amount_cents,
        currency: created.currency,
    }))
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
    /// `checkout.session.completed`, `checkout.session.async_payment_succeeded`,
    /// `charge.refunded`, and for subscriptions `invoice.paid`, `invoice.payment_failed`,
    /// `customer.subscription.created`, `.updated` and `.deleted` (API version 2024-06-20).
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
    match payments::apply_event(&Service::of(&st.app), event).await {
        Ok(outcome) => {
            let ack = WebhookAck {
                received: true,
                result: outcome.label(),
            };
            (StatusCode::OK, Json(ack)).into_response()
        }
        // not recorded: Stripe retries, and the retry is processed as new
        Err(e) => e.into_response(),
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
    let stats = Service::of(&st.app)
        .reports()
        .usage_stats(id, 30, now)
        .await?;
    let live = Service::of(&st.app).view_with_included(&l).await?;
    let subscription = payments::subscription(&Service::of(&st.app), l.id).await?;
    let mut usage_stats: crate::views::UsageStatsView = (&stats).into();
    crate::views::name_routes(&mut usage_stats.top_endpoints, &st.app.routes);
    Ok(Json(Balance {
        license_id: l.id,
        plan: live.plan,
        status: live.status,
        hours_remaining: live.hours_remaining,
        seconds_remaining: live.seconds_remaining,
        included_seconds_remaining: live.included_seconds_remaining,
        balance_display: live.balance_display,
        balance_unit: st.app.config.balance_unit.name(),
        subscription: subscription.as_ref().map(Into::into),
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
    Ok(Json(
        licenses::history(&Service::of(&st.app), l.id, q).await?,
    ))
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
    let stats = Service::of(&st.app)
        .reports()
        .usage_stats(l.id, 30, now)
        .await?;
    let unflushed = st.app.ledger.account(l.id).map(|account| {
        let p = account.pending();
        Unflushed {
            charged_ms: p.charge_ms,
            requests: p.requests,
        }
    });
    Ok(Json(Me {
        license: Service::of(&st.app).view_with_included(&l).await?,
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
    let lines = usage::limits(&st.app, &l).await?;
    Ok(Json(Limits {
        license_id: l.id,
        plan: l.plan,
        limits: lines.iter().map(LimitLine::from).collect(),
    }))
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
    let rows = licenses::alerts(&Service::of(&st.app), l.id, 100).await?;
    Ok(Json(Alerts {
        license_id: l.id,
        alerts: rows.iter().map(AlertView::from).collect(),
    }))
}
