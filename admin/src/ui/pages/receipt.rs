//! The page Stripe sends the customer back to (`/payments/success`): the payment's state, and
//! the new balance for whoever may see it; JSON instead when asked. It fulfils the payment if
//! Stripe says it is paid (`service::payments::confirm`).

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use gateway::license::ms_to_hours;
use gateway::timefmt;
use maud::html;
use serde::Deserialize;
use utoipa::IntoParams;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth;
use crate::error::{ApiError, ApiQuery, ApiResult};
use crate::service::{licenses, payments, Service};
use crate::ui::customer::started_checkout;
use crate::ui::layout::{notice, page, Area, Tone};
use crate::views::{Receipt, ReceiptStatus};
use crate::AdminState;

/// The success page's route, with its part of the OpenAPI document.
pub fn routes() -> OpenApiRouter<AdminState> {
    OpenApiRouter::new().routes(routes!(success))
}

fn tone(state: &str) -> Tone {
    if state == "paid" {
        Tone::Ok
    } else {
        Tone::Info
    }
}

const PROCESSING: &str =
    "Your payment is being processed; the hours are added as soon as it clears.";

/// For someone who has only the session id: the payment's state, nothing of the license.
pub fn anonymous(state: &str) -> Response {
    let message = if state == "paid" {
        "Thank you: the payment was received. Open your account page with your license key to \
         see your balance."
    } else {
        PROCESSING
    };
    let title = format!("Payment {state}");
    let main = html! {
        section.narrow {
            h1 { (title) }
            (notice(tone(state), message))
            p { a href="/payments/" { "Your account" } }
        }
    };
    page(StatusCode::OK, &title, Area::Customer, main)
}

/// For the license's holder (its key, or the browser that started the checkout): what was
/// added, when paid, and the balance now.
pub fn for_holder(
    state: &str,
    added_ms: i64,
    remaining_ms: i64,
    key_prefix: &str,
    unit: &gateway::display::BalanceUnit,
) -> Response {
    let message = if state == "paid" {
        format!(
            "Thank you. {} were added to your license.",
            unit.balance(added_ms)
        )
    } else {
        PROCESSING.to_string()
    };
    let title = format!("Payment {state}");
    let main = html! {
        section.narrow {
            h1 { (title) }
            (notice(tone(state), &message))
            div.balance {
                span.label { (unit.remaining_label()) }
                span.value #hours-remaining title=(timefmt::exact_ms(remaining_ms)) {
                    (unit.balance(remaining_ms))
                }
            }
            p { "License " code { (key_prefix) "…" } }
            p { a href="/payments/" { "Back to your account" } }
        }
    };
    page(StatusCode::OK, &title, Area::Customer, main)
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
    anonymous(state.as_str())
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
    let svc = Service::of(&st.app);
    let known = payments::by_session(&svc, &session_id).await?;
    let Some(payment) = known else {
        // a subscription's Checkout has no payment row: Stripe says whether it is ours
        if let Some(sub) =
            payments::subscription_checkout(&svc, &st.shared.stripe, &session_id).await?
        {
            drop(lookup);
            return subscribed(&st, &headers, &session_id, sub).await;
        }
        st.shared.unknown_checkouts.insert(session_id.as_bytes());
        lookup.found_nothing();
        return Err(ApiError::not_found("checkout session"));
    };
    drop(lookup);
    let state = payments::confirm(&svc, &st.shared.stripe, &session_id).await?;
    let lid = payment.license_id;
    let license = licenses::get(&svc, lid).await?;
    // a session id alone (in a URL, a log, a referrer) shows only that the payment arrived;
    // the license's key, or the cookie of the browser that started this checkout, shows more
    // (any of the license's active keys)
    let presented = auth::presented_key(&headers, None).or_else(|| q.license_key.clone());
    let key_holder = match presented.as_deref() {
        None => false,
        Some(k) if gateway::keys::KeyHash::of(k.as_bytes()) == license.key_hash => true,
        Some(k) => auth::license_for_key(&st, Some(k))
            .await
            .is_ok_and(|l| l.id == license.id),
    };
    let checkout_browser = started_checkout(&st, &headers, &session_id);
    if !(key_holder || checkout_browser) {
        return Ok(receipt_only(&headers, &session_id, state));
    }
    let remaining_ms = svc
        .settled_remaining_ms(&license, crate::service::ON_VIEW)
        .await;
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
    Ok(for_holder(
        state.as_str(),
        payment.hours_ms,
        remaining_ms,
        &license.key_prefix,
        &st.app.config.balance_unit,
    ))
}

/// The success page of a subscription's Checkout: the plan chosen and, for whoever holds the
/// license (its key, or the browser that started the checkout), the plan the license is on now
/// (it changes when Stripe reports the first invoice paid, usually within seconds).
async fn subscribed(
    st: &AdminState,
    headers: &HeaderMap,
    session_id: &str,
    sub: payments::SubscriptionCheckout,
) -> ApiResult<Response> {
    let status = if sub.complete {
        ReceiptStatus::Paid
    } else {
        ReceiptStatus::Processing
    };
    let svc = Service::of(&st.app);
    let license = licenses::get(&svc, sub.license_id).await?;
    let presented = auth::presented_key(headers, None);
    let key_holder = match presented.as_deref() {
        None => false,
        Some(k) => auth::license_for_key(st, Some(k))
            .await
            .is_ok_and(|l| l.id == license.id),
    };
    let holder = key_holder || started_checkout(st, headers, session_id);
    if wants_json(headers) {
        return Ok(Json(Receipt {
            session_id: session_id.to_string(),
            status,
            hours: None,
            license_id: holder.then_some(license.id),
            hours_remaining: None,
        })
        .into_response());
    }
    let title = if sub.complete {
        format!("Subscribed to {}", sub.plan)
    } else {
        "Subscription being processed".to_string()
    };
    let message = if sub.complete {
        format!(
            "Thank you: your subscription to the {} plan is set up. It applies as soon as \
             Stripe confirms the first payment, usually within seconds.",
            sub.plan
        )
    } else {
        PROCESSING.to_string()
    };
    let main = html! {
        section.narrow {
            h1 { (title) }
            (notice(tone(status.as_str()), &message))
            @if holder {
                p #plan-now { "Your license is on the " strong { (license.plan) } " plan now." }
                p { "License " code { (license.key_prefix) "…" } }
            }
            p { a href="/payments/" { "Your account" } }
        }
    };
    Ok(page(StatusCode::OK, &title, Area::Customer, main))
}
