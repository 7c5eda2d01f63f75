//! The customers' payment page at `/payments/`: enter a license key (or arrive with
//! `?license_key=`), see the hours left and 30 days of usage, buy a package or a number of hours
//! through Stripe Checkout, and read the usage and payment history.

use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum_extra::extract::cookie::CookieJar;
use gateway::license::LicenseStatus;
use gateway::store::rollup::day_of;
use gateway::store::subscriptions::Subscription;
use gateway::store::{HistoryKind, License};
use gateway::timefmt;
use maud::{html, Markup};
use serde::Deserialize;

use crate::auth;
use crate::service::payments::{self, CheckoutBody};
use crate::service::{usage, Service};
use crate::ui::charts::{day_chart, Unit};
use crate::ui::customer::{checkout_cookie, refused, respond, FormToken};
use crate::ui::format::{money, unit_price, when, Time};
use crate::ui::layout::{csrf_input, notice, table, Field, Tone};
use crate::ui::{form, history, limits, query, see_other};
use crate::AdminState;

const HOUR_MS: i64 = 3_600_000;

fn key_form(
    st: &AdminState,
    token: &FormToken,
    status: StatusCode,
    key: &str,
    error: Option<&str>,
) -> Response {
    let field = Field {
        value: key,
        error,
        required: true,
        autocomplete: Some("off"),
        spellcheck: Some("false"),
        autofocus: true,
        hint: Some("The key you were given, starting with tg_."),
        ..Field::new("license_key", "License key")
    };
    let main = html! {
        section.narrow {
            h1 { "Your hours" }
            p.lead { "See the time left on your license, its usage, and buy more hours." }
            form.card method="post" action="/payments/" {
                (csrf_input(&token.value(st)))
                (field)
                button type="submit" { "Show my account" }
            }
        }
    };
    respond(st, token, status, "Your hours", main)
}

#[derive(Deserialize, Default)]
struct ShowQuery {
    license_key: Option<String>,
}

/// How time is counted, for the customer: the metering mode in a sentence.
fn how_time_counts(m: &gateway::config::MeteringConfig) -> String {
    match m.mode {
        // a session is charged from its first request's start to its last one's end, gaps of up
        // to the idle timeout included (ledger/span.rs, ledger/session.rs)
        gateway::config::MeteringMode::Session => format!(
            "How time is counted: from your first request until your last one ends, pauses of \
             up to {} included; after a longer pause, counting starts again with your next \
             request.",
            timefmt::duration(m.idle_timeout_ms)
        ),
        gateway::config::MeteringMode::RequestTime => "How time is counted: the time your \
            requests take, from when each one arrives until its answer ends."
            .to_string(),
    }
}

/// Under this much time left, the balance is low whatever was bought.
const LOW_MS: i64 = 5 * 60_000;
/// Under this share (in percent) of the balance right after the last top-up, the balance is
/// low: the same base the balance alerts count from.
const LOW_PERCENT: i64 = 10;

/// Where a balance stands, for the notice above the purchase form.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Standing {
    Fine,
    /// Under [`LOW_MS`], or under [`LOW_PERCENT`] of the balance after the last top-up.
    Low,
    /// Nothing left (or overdrawn): requests are refused.
    Out,
}

fn standing(remaining_ms: i64, topup_ms: Option<i64>) -> Standing {
    if remaining_ms <= 0 {
        Standing::Out
    } else if remaining_ms < LOW_MS
        || topup_ms.is_some_and(|t| {
            i128::from(remaining_ms) * 100 < i128::from(t) * i128::from(LOW_PERCENT)
        })
    {
        Standing::Low
    } else {
        Standing::Fine
    }
}

/// The notice above the purchase form, when the balance is low or spent.
fn balance_notice(remaining_ms: i64, topup_ms: Option<i64>) -> Option<Markup> {
    let text = match standing(remaining_ms, topup_ms) {
        Standing::Fine => return None,
        Standing::Out => {
            return Some(html! {
                div #low-balance {
                    (notice(Tone::Error, "No time is left on this license: requests with its \
                        key are refused until you buy more hours."))
                }
            })
        }
        Standing::Low if remaining_ms < LOW_MS => format!(
            "Your balance is low: {} left, less than {}.",
            timefmt::duration(remaining_ms),
            timefmt::duration(LOW_MS)
        ),
        Standing::Low => format!(
            "Your balance is low: {} left, less than {LOW_PERCENT} % of the {} you had after \
             your last top-up.",
            timefmt::duration(remaining_ms),
            timefmt::duration(topup_ms.unwrap_or(0))
        ),
    };
    Some(html! {
        div #low-balance {
            (notice(Tone::Warn, &format!("{text} When it runs out, requests with this key are \
                refused; buy more hours below.")))
        }
    })
}

pub async fn show(State(st): State<AdminState>, jar: CookieJar, RawQuery(q): RawQuery) -> Response {
    let token = FormToken::of(&jar);
    let key = query::<ShowQuery>(q.as_deref())
        .license_key
        .unwrap_or_default();
    if key.trim().is_empty() {
        return key_form(&st, &token, StatusCode::OK, "", None);
    }
    account(&st, &token, key.trim(), StatusCode::OK, None, None).await
}

#[derive(Deserialize, Default)]
struct KeyForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    license_key: String,
    /// The history's page: the rows older than this one's (the pager's buttons send it).
    #[serde(default)]
    history_before: String,
}

pub async fn enter(
    State(st): State<AdminState>,
    jar: CookieJar,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let token = FormToken::of(&jar);
    let f: KeyForm = form(&body);
    if !token.accepts(&st, &headers, &f.csrf) {
        return refused(&st, &token);
    }
    let key = f.license_key.trim();
    if key.is_empty() {
        return key_form(
            &st,
            &token,
            StatusCode::BAD_REQUEST,
            "",
            Some("Enter your license key."),
        );
    }
    let before = f.history_before.trim().parse().ok();
    account(&st, &token, key, StatusCode::OK, None, before).await
}

/// An error to show on the account page: next to the purchase form's field, or above it.
struct BuyError<'a> {
    field: &'a str,
    message: &'a str,
    /// What the customer had chosen and typed, shown again as it was.
    choice: &'a str,
    hours: &'a str,
}

async fn account(
    st: &AdminState,
    token: &FormToken,
    key: &str,
    status: StatusCode,
    error: Option<BuyError<'_>>,
    history_before: Option<i64>,
) -> Response {
    let license = match auth::license_for_key(st, Some(key)).await {
        Ok(l) => l,
        Err(e) => {
            let shown: String = key.chars().take(128).collect();
            return key_form(st, token, StatusCode::UNAUTHORIZED, &shown, Some(e.text()));
        }
    };
    let now = st.app.ledger.now_ms();
    let id = license.id;
    let store = &st.app.store;
    let calendar = &st.app.config.metering.calendar;
    let read = tokio::try_join!(
        store.usage_stats(id, 30, now),
        store.history(id, HistoryKind::All, history::PAGE, history_before),
        store.payments_for_license(id, 10, None),
        // the balance after the last top-up, which "low" is a share of
        store.admission_state(license.key_hash, calendar, now),
    );
    let (usage, history, pays, topup) = match read {
        Ok((usage, history, pays, row)) => (usage, history, pays, row.and_then(|r| r.topup)),
        Err(e) => {
            let e = crate::error::ApiError::from(e);
            return key_form(
                st,
                token,
                StatusCode::INTERNAL_SERVER_ERROR,
                "",
                Some(e.text()),
            );
        }
    };
    let lines = match usage::limits(&st.app, &license).await {
        Ok(lines) => lines,
        Err(e) => {
            let status =
                StatusCode::from_u16(e.code.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            return key_form(st, token, status, "", Some(e.text()));
        }
    };
    let subscription = match payments::subscription(&Service::of(&st.app), id).await {
        Ok(s) => s,
        Err(e) => {
            let status =
                StatusCode::from_u16(e.code.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            return key_form(st, token, status, "", Some(e.text()));
        }
    };
    let blocked = limits::blocked_until(&lines);
    let remaining = Service::of(&st.app)
        .settled_remaining_ms(&license, crate::service::ON_VIEW)
        .await;
    let included = match Service::of(&st.app).included_left_ms(&license).await {
        Ok(i) => i,
        Err(e) => {
            let status =
                StatusCode::from_u16(e.code.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            return key_form(st, token, status, "", Some(e.text()));
        }
    };
    let topup_ms = topup.map(|(ms, _)| ms);
    let today = day_of(now);
    let main = html! {
        h1 { "Your hours" }
        div.balances {
            // what the plan includes is spent first, so it is shown first
            @if let Some(left) = included {
                div.balance aria-live="polite" {
                    span.label { "Included this period (spent first)" }
                    span.value #included-remaining title=(timefmt::exact_ms(left)) {
                        (timefmt::duration(left))
                    }
                }
            }
            div.balance aria-live="polite" {
                span.label {
                    (st.app.config.balance_unit.remaining_label())
                    @if included.is_some() { " (prepaid)" }
                }
                span.value #hours-remaining title=(timefmt::exact_ms(remaining)) {
                    (st.app.config.balance_unit.balance(remaining))
                }
            }
        }
        p.lead {
            "License " code { (license.key_prefix) "…" } " · " (license.plan) " plan"
            (state_text(&license, now))
        }
        p #how-time-counts { (how_time_counts(&st.app.config.metering)) }
        (limits::notices(&lines))
        @if let Some(until) = blocked.filter(|_| st.shared.stripe.configured()) {
            p #blocked-note {
                "Hours bought now are added to the balance, but do not lift the plan's limit: \
                 requests with this key are refused until " (when(until)) "."
            }
        }
        (plan_section(st, token, key, &license, now, subscription.as_ref(), error.as_ref()))
        // (what the plan still includes is time left too: the notice counts it)
        (buy_form(st, token, key, &license, now, remaining + included.unwrap_or(0), topup_ms,
            error.as_ref()))
        @if !lines.is_empty() {
            section {
                h2 { "Your plan's limits" }
                (limits::table(&lines))
            }
        }
        section {
            h2 { "Usage, last 30 days" }
            div.charts {
                (day_chart("use-time", "Time used per day", today, 30, &usage.daily,
                    |d| d.charged_ms, Unit::charged(&st.app.config.balance_unit)))
                (day_chart("use-calls", "Calls per day", today, 30, &usage.daily,
                    |d| d.calls, Unit::Calls))
            }
        }
        section {
            h2 { "Payments" }
            (table(
                &["Date", "Time bought", "Amount", "Status"],
                &[false, true, true, false],
                pays.iter().map(|p| vec![
                    when(p.created_at).into(),
                    Time(p.hours_ms).into(),
                    money(p.amount_cents, &p.currency).into(),
                    p.status.as_str().into(),
                ]),
                "No payments yet.",
            ))
        }
        section #balance-history {
            h2 { "Usage and balance history" }
            (history::balance_history(&history, false, html! {
                // the key goes in a form, never in a link's address
                nav.pager aria-label="History pages" {
                    @if history_before.is_some() {
                        (history_button(st, token, key, None, "« Newest"))
                    }
                    @if let Some(n) = history.next_before {
                        (history_button(st, token, key, Some(n), "Older »"))
                    }
                }
            }, &st.app.config.balance_unit))
        }
        p { a href="/payments/" { "Use another key" } }
    };
    respond(st, token, status, "Your hours", main)
}

/// A button that shows another page of the history: the account page again, posted with the
/// key.
fn history_button(
    st: &AdminState,
    token: &FormToken,
    key: &str,
    before: Option<i64>,
    label: &str,
) -> Markup {
    html! {
        form.inline method="post" action="/payments/#balance-history" {
            (csrf_input(&token.value(st)))
            input type="hidden" name="license_key" value=(key);
            @if let Some(b) = before {
                input type="hidden" name="history_before" value=(b);
            }
            button.link type="submit" { (label) }
        }
    }
}

fn state_text(l: &License, now: i64) -> &'static str {
    if l.status == LicenseStatus::Revoked {
        " · revoked"
    } else if l.expires_at.is_some_and(|e| e <= now) {
        " · expired"
    } else {
        ""
    }
}

#[allow(clippy::too_many_arguments)]
fn buy_form(
    st: &AdminState,
    token: &FormToken,
    key: &str,
    license: &License,
    now: i64,
    remaining_ms: i64,
    topup_ms: Option<i64>,
    error: Option<&BuyError<'_>>,
) -> Markup {
    let c = &st.app.config;
    if license.status == LicenseStatus::Revoked || license.expires_at.is_some_and(|e| e <= now) {
        return html! {
            section {
                h2 { "Buy hours" }
                p { "This license can no longer be used, so no hours can be bought for it." }
            }
        };
    }
    if !st.shared.stripe.configured() {
        // said before any click: there is nothing to pay with here
        return html! {
            section #buy-hours {
                h2 { "Buy hours" }
                @if let Some(n) = balance_notice(remaining_ms, topup_ms) { (n) }
                (notice(Tone::Info, "Hours cannot be bought on this page: payments are not set \
                    up on this gateway. Ask whoever gave you your key to add hours."))
            }
        };
    }
    let above = error.filter(|e| e.field.is_empty());
    let chosen = error.map_or("", |e| e.choice);
    let hint = format!(
        "Whole hours, {} to {}, when you choose another number.",
        c.payments.min_hours, c.payments.max_hours
    );
    let custom = Field {
        kind: "number",
        value: error.map_or("", |e| e.hours),
        error: error.filter(|e| e.field == "hours").map(|e| e.message),
        min: Some(c.payments.min_hours.to_string()),
        max: Some(c.payments.max_hours.to_string()),
        step: Some("1"),
        inputmode: Some("numeric"),
        hint: Some(&hint),
        ..Field::new("hours", "Hours")
    };
    html! {
        section {
            h2 { "Buy hours" }
            @if let Some(n) = balance_notice(remaining_ms, topup_ms) { (n) }
            @if let Some(e) = above { (notice(Tone::Error, e.message)) }
            form.card.buy method="post" action="/payments/checkout" {
                (csrf_input(&token.value(st)))
                input type="hidden" name="license_key" value=(key);
                fieldset {
                    legend { "Choose a package" }
                    @for (i, p) in c.packages.iter().enumerate() {
                        @let value = format!("package:{}", p.id);
                        @let id = format!("pkg-{i}");
                        div.choice {
                            input type="radio" name="choice" id=(id) value=(value)
                                checked[chosen == value || (chosen.is_empty() && i == 0)];
                            label for=(id) {
                                (timefmt::duration(p.hours * HOUR_MS)) " — "
                                (money(p.price_cents, &p.currency))
                                span.hint {
                                    " · "
                                    (unit_price(p.price_cents, p.hours * 60, &p.currency))
                                    " a minute"
                                }
                            }
                        }
                    }
                    div.choice {
                        input type="radio" name="choice" id="pkg-custom" value="custom"
                            checked[c.packages.is_empty() || chosen == "custom"];
                        label for="pkg-custom" {
                            "Another number of hours, at "
                            (money(c.payments.price_per_hour_cents, &c.payments.currency))
                            " an hour ("
                            (unit_price(c.payments.price_per_hour_cents, 60, &c.payments.currency))
                            " a minute)"
                        }
                    }
                    (custom)
                }
                button type="submit" { "Pay with Stripe" }
            }
        }
    }
}

/// The license's plan: its subscription (state, renewal, the portal), and the plans for sale
/// above it, each a button to Stripe Checkout.
fn plan_section(
    st: &AdminState,
    token: &FormToken,
    key: &str,
    license: &License,
    now: i64,
    sub: Option<&Subscription>,
    error: Option<&BuyError<'_>>,
) -> Markup {
    let svc = Service::of(&st.app);
    let meters = &st.app.config.meters;
    let live = sub.filter(|s| s.live());
    let offers = if live.is_some() {
        Vec::new()
    } else {
        payments::plans_above(&svc, &license.plan)
    };
    let usable = license.status != LicenseStatus::Revoked
        && license.expires_at.is_none_or(|e| e > now)
        && st.shared.stripe.configured();
    if live.is_none() && (offers.is_empty() || !usable) {
        return html! {};
    }
    let failed = error.filter(|e| e.field == "plan");
    html! {
        section #your-plan {
            h2 { "Your plan" }
            @if let Some(e) = failed { (notice(Tone::Error, e.message)) }
            @if let Some(s) = live {
                p #subscription-state {
                    "Subscribed to " strong { (s.plan) } " · " (s.status)
                    @if let Some(until) = s.grace_until {
                        " · the last payment failed: the plan stays until " (when(until))
                        ", then the license returns to the free plan"
                    } @else if let Some(end) = s.ends_at {
                        " · ends " (when(end)) ", then the license returns to the free plan"
                    } @else if let Some(end) = s.period_end {
                        @if s.cancel_at_period_end {
                            " · ends " (when(end))
                        } @else {
                            " · renews " (when(end))
                        }
                    }
                }
                @if usable && s.customer_id.is_some() {
                    form.inline method="post" action="/payments/manage" {
                        (csrf_input(&token.value(st)))
                        input type="hidden" name="license_key" value=(key);
                        button #manage-subscription type="submit" {
                            "Change plan, card or cancel"
                        }
                    }
                }
            }
            @if !offers.is_empty() && usable {
                p { "Plans include time each period, spent before your prepaid hours." }
                div.plans {
                    @for p in &offers {
                        @let offer = crate::views::PlanOffer::of(p, meters);
                        form.card.plan method="post" action="/payments/plan" {
                            (csrf_input(&token.value(st)))
                            input type="hidden" name="license_key" value=(key);
                            input type="hidden" name="plan" value=(p.name);
                            h3 { (p.name) }
                            @if let Some(o) = &offer {
                                p.price {
                                    @if let Some(c) = o.price_cents {
                                        (money(c, &o.currency)) " a " (o.interval)
                                    } @else {
                                        "Priced at checkout, by the " (o.interval)
                                    }
                                }
                                @if let Some(m) = o.included_minutes {
                                    p { (timefmt::duration(m * 60_000)) " included each month" }
                                }
                                @if let Some(n) = o.included_requests {
                                    p { (timefmt::grouped(n as i64)) " requests included each month" }
                                }
                                @for (m, n) in meters.iter().zip(p.included_units).filter(|(_, n)| *n > 0) {
                                    p { (timefmt::grouped(n)) " " (m.label) " included each month" }
                                }
                                // (a trial once per license)
                                @if let Some(d) = o.trial_days.filter(|_| sub.is_none()) {
                                    p.hint { (d) " days free to start" }
                                }
                            }
                            button type="submit" id=(format!("subscribe-{}", p.name)) {
                                "Subscribe to " (p.name)
                            }
                        }
                    }
                }
            }
        }
    }
}

#[derive(Deserialize, Default)]
struct PlanForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    license_key: String,
    #[serde(default)]
    plan: String,
}

/// A customer's form that acts on a license: its CSRF token checked, and the license its key
/// names; else the page to answer with.
async fn posted_license(
    st: &AdminState,
    token: &FormToken,
    headers: &HeaderMap,
    csrf: &str,
    key: &str,
) -> Result<License, Response> {
    if !token.accepts(st, headers, csrf) {
        return Err(refused(st, token));
    }
    auth::license_for_key(st, Some(key))
        .await
        .map_err(|e| key_form(st, token, StatusCode::UNAUTHORIZED, "", Some(e.text())))
}

/// The plan buttons: a subscription Checkout, or the error on the account page.
pub async fn subscribe(
    State(st): State<AdminState>,
    jar: CookieJar,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let token = FormToken::of(&jar);
    let f: PlanForm = form(&body);
    let key = f.license_key.trim();
    let license = match posted_license(&st, &token, &headers, &f.csrf, key).await {
        Ok(l) => l,
        Err(answer) => return answer,
    };
    let idempotency_key = format!("tollgate-{}", hex::encode(rand::random::<[u8; 16]>()));
    let svc = Service::of(&st.app);
    match payments::start_subscription(&svc, &st.shared.stripe, &license, &f.plan, &idempotency_key)
        .await
    {
        Ok(c) => (
            CookieJar::new().add(checkout_cookie(&st, &c.session_id)),
            see_other(&c.url),
        )
            .into_response(),
        Err(e) => plan_failed(&st, &token, key, e).await,
    }
}

/// The account page again, with why a plan button failed above the plans.
async fn plan_failed(
    st: &AdminState,
    token: &FormToken,
    key: &str,
    e: crate::error::ApiError,
) -> Response {
    let status = StatusCode::from_u16(e.code.status()).unwrap_or(StatusCode::BAD_REQUEST);
    let e = BuyError {
        field: "plan",
        message: e.text(),
        choice: "",
        hours: "",
    };
    account(st, token, key, status, Some(e), None).await
}

/// The portal button: Stripe's Customer Portal, or the error on the account page.
pub async fn manage(
    State(st): State<AdminState>,
    jar: CookieJar,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let token = FormToken::of(&jar);
    let f: KeyForm = form(&body);
    let key = f.license_key.trim();
    let license = match posted_license(&st, &token, &headers, &f.csrf, key).await {
        Ok(l) => l,
        Err(answer) => return answer,
    };
    match payments::portal(&Service::of(&st.app), &st.shared.stripe, &license).await {
        Ok(url) => see_other(&url).into_response(),
        Err(e) => plan_failed(&st, &token, key, e).await,
    }
}

#[derive(Deserialize, Default)]
struct BuyForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    license_key: String,
    #[serde(default)]
    choice: String,
    #[serde(default)]
    hours: String,
}

pub async fn checkout(
    State(st): State<AdminState>,
    jar: CookieJar,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let token = FormToken::of(&jar);
    let f: BuyForm = form(&body);
    let key = f.license_key.trim();
    let license = match posted_license(&st, &token, &headers, &f.csrf, key).await {
        Ok(l) => l,
        Err(answer) => return answer,
    };
    let order = if let Some(id) = f.choice.strip_prefix("package:") {
        CheckoutBody {
            package_id: Some(id.to_string()),
            ..CheckoutBody::default()
        }
    } else {
        match f.hours.trim().parse::<f64>() {
            Ok(h) => CheckoutBody {
                hours: Some(h),
                ..CheckoutBody::default()
            },
            Err(_) => {
                let e = BuyError {
                    field: "hours",
                    message: "Enter a whole number of hours.",
                    choice: &f.choice,
                    hours: &f.hours,
                };
                let status = StatusCode::BAD_REQUEST;
                return account(&st, &token, key, status, Some(e), None).await;
            }
        }
    };
    let idempotency_key = format!("tollgate-{}", hex::encode(rand::random::<[u8; 16]>()));
    match payments::start_checkout(
        &Service::of(&st.app),
        &st.shared.stripe,
        &license,
        &order,
        &idempotency_key,
    )
    .await
    {
        Ok(c) => (
            CookieJar::new().add(checkout_cookie(&st, &c.session_id)),
            see_other(&c.url),
        )
            .into_response(),
        Err(e) => {
            let status = StatusCode::from_u16(e.code.status()).unwrap_or(StatusCode::BAD_REQUEST);
            let field = if e.field() == Some("hours") {
                "hours"
            } else {
                ""
            };
            let e = BuyError {
                field,
                message: e.text(),
                choice: &f.choice,
                hours: &f.hours,
            };
            account(&st, &token, key, status, Some(e), None).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: i64 = 60_000;

    #[test]
    fn a_balance_is_low_under_five_minutes_or_a_tenth_of_the_last_top_up() {
        assert_eq!(standing(5 * MIN, None), Standing::Fine);
        assert_eq!(standing(5 * MIN - 1, None), Standing::Low);
        assert_eq!(
            standing(1, Some(1)),
            Standing::Low,
            "under 5 min whatever was bought"
        );
        // 5 h bought: low under 30 min
        assert_eq!(standing(30 * MIN, Some(300 * MIN)), Standing::Fine);
        assert_eq!(standing(30 * MIN - 1, Some(300 * MIN)), Standing::Low);
        // 59 min 59 s after a top-up to that very balance: fine
        assert_eq!(standing(3_599_000, Some(3_599_000)), Standing::Fine);
        assert_eq!(standing(0, Some(HOUR_MS)), Standing::Out);
        assert_eq!(standing(-1_250, Some(HOUR_MS)), Standing::Out, "overdrawn");
    }

    #[test]
    fn the_low_balance_notice_says_why() {
        assert!(balance_notice(HOUR_MS, Some(HOUR_MS)).is_none());
        let under_5 = balance_notice(4 * MIN + 30_000, Some(HOUR_MS))
            .unwrap()
            .into_string();
        assert!(
            under_5.contains("Your balance is low: 4 min 30 s left, less than 5 min."),
            "{under_5}"
        );
        let share = balance_notice(25 * MIN, Some(5 * HOUR_MS))
            .unwrap()
            .into_string();
        assert!(
            share.contains("25 min left, less than 10 % of the 5 h you had after your last top-up"),
            "{share}"
        );
        let out = balance_notice(-1_250, None).unwrap().into_string();
        assert!(
            out.contains("notice error") && out.contains("No time is left"),
            "{out}"
        );
    }

    #[test]
    fn how_time_counts_follows_the_metering_mode_and_idle_timeout() {
        let mut m = gateway::config::MeteringConfig {
            mode: gateway::config::MeteringMode::Session,
            idle_timeout_ms: 300_000,
            timezone: "UTC".into(),
            calendar: gateway::periods::Calendar::utc(),
        };
        assert!(
            how_time_counts(&m).contains("until your last one ends, pauses of up to 5 min"),
            "{}",
            how_time_counts(&m)
        );
        m.idle_timeout_ms = 90_000;
        assert!(how_time_counts(&m).contains("up to 1 min 30 s"));
        m.mode = gateway::config::MeteringMode::RequestTime;
        assert!(how_time_counts(&m).contains("the time your requests take"));
    }
}
