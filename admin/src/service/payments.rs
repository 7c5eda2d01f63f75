//! Payments: what an order costs, Stripe Checkout, and fulfilment, from the success page or
//! from Stripe's events. What each step does to the money is decided in
//! `gateway::store::payments` and applied by the store in one transaction; here the order is
//! priced, Stripe is asked, and the proxy, the metrics and the operator hear of what changed.

use gateway::errors::ErrorCode;
use gateway::store::{
    EventAction, EventOutcome, Fulfilment, License, NewPayment, PaidSession, Payment,
};

use super::licenses::usable;
use super::Service;
use crate::error::{ApiError, ApiResult};
use crate::stripe::{self, StripeError};
use crate::views::ReceiptStatus;
use serde::Deserialize;
use utoipa::ToSchema;

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

fn order(svc: &Service<'_>, b: &CheckoutBody) -> ApiResult<Order> {
    let c = svc.config();
    match (&b.package_id, b.hours) {
        (Some(id), None) => {
            let p = c.packages.iter().find(|p| &p.id == id).ok_or_else(|| {
                let ids: Vec<&str> = c.packages.iter().map(|p| p.id.as_str()).collect();
                ApiError::invalid(
                    "package_id",
                    format!(
                        "unknown package {id:?}; the packages are {}",
                        ids.join(", ")
                    ),
                )
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
                return Err(ApiError::invalid(
                    "hours",
                    format!("hours must be a whole number from {min} to {max}"),
                ));
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

/// Prices the order, creates the Checkout Session at Stripe and records it as pending; the
/// hours are credited once Stripe says the payment is made (its webhook, or the success page,
/// whichever comes first).
pub async fn start_checkout(
    svc: &Service<'_>,
    stripe: &stripe::Client,
    license: &License,
    b: &CheckoutBody,
    idempotency_key: &str,
) -> ApiResult<Checkout> {
    let order = order(svc, b)?;
    usable(license, svc.now())?;
    if !stripe.configured() {
        return Err(ApiError::new(ErrorCode::PaymentsUnavailable));
    }
    let c = svc.config();
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
    let created = stripe
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
    svc.payments.record_pending(pending, svc.now()).await?;
    tracing::info!(license = license.id, session = %created.id, "checkout session created");
    Ok(Checkout {
        session_id: created.id,
        url: created.url,
        hours: order.hours,
        amount_cents: order.amount_cents,
        currency: order.currency,
    })
}

/// The payment of a Checkout Session, if it is ours.
pub async fn by_session(svc: &Service<'_>, session_id: &str) -> ApiResult<Option<Payment>> {
    Ok(svc
        .payments
        .payment_by_session(session_id.to_string())
        .await?)
}

/// The success page's step: reads a recorded session from Stripe and fulfils it if it is
/// paid (the webhook may not have arrived yet; whichever comes first credits, the other finds
/// it done).
pub async fn confirm(
    svc: &Service<'_>,
    stripe: &stripe::Client,
    session_id: &str,
) -> ApiResult<ReceiptStatus> {
    let session = stripe
        .retrieve_session(session_id)
        .await
        .map_err(stripe_failed)?;
    if !stripe::is_paid(&session) {
        return Ok(ReceiptStatus::Processing);
    }
    let mut paid = stripe::paid_session(&session);
    // the row is what we priced; the session only has to be the same one
    paid.session_id = session_id.to_string();
    paid.priced = configured_price(svc, &paid);
    let done = svc.payments.fulfil(paid, svc.now()).await?;
    fulfilled(svc, &done, "the success page");
    Ok(ReceiptStatus::Paid)
}

/// Applies one verified Stripe event, once however often it is delivered. An error leaves no
/// trace, so Stripe's retry is processed as new.
pub async fn apply_event(svc: &Service<'_>, event: stripe::Event) -> ApiResult<EventOutcome> {
    let stripe::Event {
        id,
        event_type,
        mut action,
        price,
    } = event;
    match &mut action {
        EventAction::Fulfil(paid) => paid.priced = configured_price(svc, paid),
        EventAction::Subscription(a) => {
            let c = svc.config();
            a.grace_ms = c.payments.grace_ms;
            a.fallback = FALLBACK_PLAN.into();
            a.calendar = c.metering.calendar.clone();
            let named = a
                .event
                .plan
                .take()
                .filter(|p| plan_for_sale(svc, p).is_some());
            a.event.plan = match &price {
                Some(seen) => stripe::plan_for_price(&c.plans, seen, named.as_deref()),
                None => named,
            };
        }
        _ => {}
    }
    let outcome = svc
        .payments
        .apply_event(id, event_type.clone(), action, svc.now())
        .await;
    let outcome = match outcome {
        Ok(o) => o,
        Err(e) => {
            gateway::metrics::stripe_event(&event_type, "error");
            return Err(e.into());
        }
    };
    if let EventOutcome::Fulfilled(done) = &outcome {
        fulfilled(svc, done, "the webhook");
    } else if let Some(l) = outcome.changed() {
        svc.applied(l);
        if let EventOutcome::Subscription(s) = &outcome {
            tracing::info!(license = l.id, plan = %l.plan, result = s.label, "subscription applied");
        }
    }
    gateway::metrics::stripe_event(&event_type, outcome.label());
    Ok(outcome)
}

/// What the config charges for a paid session's hours, for a session fulfilled without its
/// pending row: its package's price when the metadata names a package of those hours, else the
/// hours at the custom price. None unless `payments.credit_unrecorded_sessions` is on: a session
/// without a pending row is then not ours, and nothing is credited for it.
fn configured_price(svc: &Service<'_>, paid: &PaidSession) -> Option<(i64, String)> {
    let c = svc.config();
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
fn fulfilled(svc: &Service<'_>, done: &Fulfilment, via: &str) {
    let Fulfilment::Credited {
        license,
        payment,
        credited_ms,
    } = done
    else {
        return;
    };
    svc.applied(license);
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

/// How long a subscription's Checkout stays open, in seconds: Stripe's shortest (30 minutes),
/// and a minute for the clocks to differ.
const CHECKOUT_OPEN_S: i64 = 31 * 60;

/// The plan a license returns to when its subscription ends.
pub const FALLBACK_PLAN: &str = "free";

/// The plan of that name, if it is for sale.
pub fn plan_for_sale<'c>(svc: &'c Service<'_>, name: &str) -> Option<&'c gateway::config::Plan> {
    svc.config()
        .plans
        .iter()
        .find(|p| p.name == name && p.price.is_some())
}

/// The plans for sale above `current` ("higher" is later in `[[plans]]`; a plan not in the
/// file is below them all).
pub fn plans_above<'c>(svc: &'c Service<'_>, current: &str) -> Vec<&'c gateway::config::Plan> {
    let plans = &svc.config().plans;
    let from = plans
        .iter()
        .position(|p| p.name == current)
        .map_or(0, |i| i + 1);
    plans[from..].iter().filter(|p| p.price.is_some()).collect()
}

/// What to subscribe to.
#[derive(Deserialize, ToSchema)]
#[schema(example = json!({"plan": "pro"}))]
#[serde(deny_unknown_fields)]
pub struct SubscribeBody {
    /// The license to put on the plan; else the `X-License-Key` header.
    pub license_key: Option<String>,
    /// A plan for sale (see `/payments/packages` `plans`).
    #[schema(min_length = 1, max_length = 64)]
    pub plan: String,
}

/// Starts a Stripe Checkout in `mode=subscription` for a plan; the license goes on the plan
/// when Stripe says its first invoice is paid (`invoice.paid`).
pub async fn start_subscription(
    svc: &Service<'_>,
    stripe: &stripe::Client,
    license: &License,
    plan: &str,
    idempotency_key: &str,
) -> ApiResult<Checkout> {
    let c = svc.config();
    let Some(p) = plan_for_sale(svc, plan) else {
        let names: Vec<&str> = c
            .plans
            .iter()
            .filter(|p| p.price.is_some())
            .map(|p| p.name.as_str())
            .collect();
        return Err(ApiError::invalid(
            "plan",
            format!(
                "{plan:?} is not for sale; the plans for sale are {}",
                names.join(", ")
            ),
        )
        .with("plans", names));
    };
    usable(license, svc.now())?;
    let before = svc.payments.subscription(license.id).await?;
    if let Some(sub) = before.as_ref().filter(|s| s.live()) {
        return Err(ApiError::bad_request(format!(
            "this license is already subscribed to {:?}: change or cancel the plan in the \
             customer portal (POST /payments/portal)",
            sub.plan
        )));
    }
    if !stripe.configured() {
        return Err(ApiError::new(ErrorCode::PaymentsUnavailable));
    }
    // a Checkout still open for this license: the same one again (two would be two
    // subscriptions, billed twice)
    if let Some(open) = svc
        .payments
        .open_subscription_checkout(license.id, svc.now())
        .await?
    {
        if open.plan != p.name {
            return Err(ApiError::bad_request(format!(
                "a Checkout for the {:?} plan is open for this license until {}: finish it, or \
                 subscribe to another plan once it has closed",
                open.plan,
                gateway::timefmt::rfc3339(open.expires_at)
            )));
        }
        let price = p.price.as_ref().expect("for sale");
        return Ok(Checkout {
            session_id: open.session_id,
            url: open.url,
            hours: 0,
            amount_cents: price.cents.unwrap_or(0),
            currency: price.currency.clone(),
        });
    }
    let price = p.price.as_ref().expect("for sale");
    let id = license.id.to_string();
    let expires_s = svc.now() / 1000 + CHECKOUT_OPEN_S;
    let mut form: Vec<(&str, String)> = vec![
        ("mode", "subscription".into()),
        ("success_url", c.stripe.success_url.clone()),
        ("cancel_url", c.stripe.cancel_url.clone()),
        ("client_reference_id", id.clone()),
        ("line_items[0][quantity]", "1".into()),
        ("metadata[tollgate_license_id]", id.clone()),
        ("metadata[tollgate_plan]", p.name.clone()),
        ("subscription_data[metadata][tollgate_license_id]", id),
        ("subscription_data[metadata][tollgate_plan]", p.name.clone()),
        // a Checkout left open is not a second subscription later: it lapses in 30 minutes
        // (Stripe's shortest), and until then the same one is given again
        ("expires_at", expires_s.to_string()),
    ];
    match (&price.stripe_price, price.cents) {
        (Some(stripe_price), _) => form.push(("line_items[0][price]", stripe_price.clone())),
        (None, Some(cents)) => form.extend([
            (
                "line_items[0][price_data][currency]",
                price.currency.clone(),
            ),
            ("line_items[0][price_data][unit_amount]", cents.to_string()),
            (
                "line_items[0][price_data][recurring][interval]",
                price.interval.to_string(),
            ),
            (
                "line_items[0][price_data][product_data][name]",
                format!("The {} plan", p.name),
            ),
        ]),
        (None, None) => unreachable!("a price has cents or a Stripe Price"),
    }
    // a trial once per license: never for one that has had a subscription
    if let Some(days) = p.trial_days.filter(|_| before.is_none()) {
        form.push(("subscription_data[trial_period_days]", days.to_string()));
    }
    // each session closes at its own time, so Stripe gets a key of its own for each (a
    // client's key reused after the first session closed would be the same key with other
    // parameters, which Stripe refuses); retries of one call reuse it
    let key = format!("{idempotency_key}-{expires_s}");
    let created = stripe
        .create_session(&form, &key)
        .await
        .map_err(stripe_failed)?;
    let open = gateway::store::subscriptions::CheckoutRow {
        session_id: created.id.clone(),
        license_id: license.id,
        plan: p.name.clone(),
        url: created.url.clone(),
        expires_at: expires_s * 1000,
    };
    svc.payments
        .record_subscription_checkout(open, svc.now())
        .await?;
    tracing::info!(license = license.id, plan = %p.name, session = %created.id, "subscription checkout created");
    Ok(Checkout {
        session_id: created.id,
        url: created.url,
        hours: 0,
        amount_cents: price.cents.unwrap_or(0),
        currency: price.currency.clone(),
    })
}

/// A Customer Portal session for the license's subscription: where the customer changes plan,
/// updates a card or cancels.
pub async fn portal(
    svc: &Service<'_>,
    stripe: &stripe::Client,
    license: &License,
) -> ApiResult<String> {
    usable(license, svc.now())?;
    let customer = svc
        .payments
        .subscription(license.id)
        .await?
        .and_then(|s| s.customer_id)
        .ok_or_else(|| {
            ApiError::msg(
                ErrorCode::NotFound,
                "This license has no subscription yet: subscribe to a plan first \
                 (POST /payments/subscribe).",
            )
        })?;
    if !stripe.configured() {
        return Err(ApiError::new(ErrorCode::PaymentsUnavailable));
    }
    stripe
        .portal_session(&customer, &svc.config().stripe.cancel_url)
        .await
        .map_err(stripe_failed)
}

/// Ends the subscriptions whose grace or paid period ran out: their licenses return to
/// `free`, and the proxy hears of it.
pub async fn end_due(svc: &Service<'_>) -> ApiResult<usize> {
    let c = svc.config();
    let changed = svc
        .payments
        .end_due_subscriptions(FALLBACK_PLAN.into(), c.metering.calendar.clone(), svc.now())
        .await?;
    for l in &changed {
        tracing::info!(license = l.id, plan = %l.plan, "subscription ended: back on the free plan");
        svc.applied(l);
    }
    Ok(changed.len())
}

/// A license's subscription (the newest live one, else the newest), if it had one.
pub async fn subscription(
    svc: &Service<'_>,
    license_id: i64,
) -> ApiResult<Option<gateway::store::subscriptions::Subscription>> {
    Ok(svc.payments.subscription(license_id).await?)
}

/// A subscription's Checkout Session, as the success page shows it.
pub struct SubscriptionCheckout {
    pub license_id: i64,
    pub plan: String,
    /// Stripe says the customer completed it (the plan applies once the first invoice is
    /// paid, which Stripe reports by webhook).
    pub complete: bool,
}

/// The success page's step for a session with no payment row: one of the subscription
/// Checkouts made here, and whether Stripe says it is complete. Nothing is credited or applied
/// here; the subscription's events do that.
pub async fn subscription_checkout(
    svc: &Service<'_>,
    stripe: &stripe::Client,
    session_id: &str,
) -> ApiResult<Option<SubscriptionCheckout>> {
    let Some(gateway::store::subscriptions::CheckoutRow {
        license_id, plan, ..
    }) = svc
        .payments
        .subscription_checkout(session_id.to_string())
        .await?
    else {
        return Ok(None);
    };
    let session = stripe
        .retrieve_session(session_id)
        .await
        .map_err(stripe_failed)?;
    Ok(Some(SubscriptionCheckout {
        license_id,
        plan,
        complete: session["status"] == "complete",
    }))
}
