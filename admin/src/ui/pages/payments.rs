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
use gateway::store::{HistoryKind, License};
use maud::{html, Markup};
use serde::Deserialize;

use crate::auth;
use crate::licenses::live_remaining_ms;
use crate::payments::{start_checkout, CheckoutBody};
use crate::ui::charts::day_chart;
use crate::ui::customer::{checkout_cookie, refused, respond, FormToken};
use crate::ui::format::{duration_label, hours, money, signed_hours, when};
use crate::ui::layout::{csrf_input, notice, table, Field, Tone};
use crate::ui::{form, query, see_other};
use crate::AdminState;

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
        gateway::config::MeteringMode::Session => format!(
            "Time is counted from your first request to the end of your last one, pauses \
             included while they last less than {}; a longer pause ends the count until your \
             next request.",
            duration_label(m.idle_timeout_ms as f64 / 3_600_000.0)
        ),
        gateway::config::MeteringMode::RequestTime => {
            "Time is counted while your requests run: the time each one takes.".to_string()
        }
    }
}

pub async fn show(State(st): State<AdminState>, jar: CookieJar, RawQuery(q): RawQuery) -> Response {
    let token = FormToken::of(&jar);
    let key = query::<ShowQuery>(q.as_deref())
        .license_key
        .unwrap_or_default();
    if key.trim().is_empty() {
        return key_form(&st, &token, StatusCode::OK, "", None);
    }
    account(&st, &token, key.trim(), StatusCode::OK, None).await
}

#[derive(Deserialize, Default)]
struct KeyForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    license_key: String,
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
    account(&st, &token, key, StatusCode::OK, None).await
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
    let read = tokio::try_join!(
        store.usage_stats(id, 30, now),
        store.history(id, HistoryKind::All, 20, None),
        store.payments_for_license(id, 10, None),
    );
    let (usage, history, pays) = match read {
        Ok((usage, history, pays)) => (usage, super::super::json_rows(history), pays),
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
    let remaining = live_remaining_ms(st, &license);
    let today = day_of(now);
    let main = html! {
        h1 { "Your hours" }
        div.balance aria-live="polite" {
            span.label { "Hours remaining" }
            span.value #hours-remaining { (hours(remaining)) }
        }
        p.lead {
            "License " code { (license.key_prefix) "…" } " · " (license.plan) " plan"
            (state_text(&license, now))
        }
        p #how-time-counts { (how_time_counts(&st.app.config.metering)) }
        section {
            h2 { "Usage, last 30 days" }
            div.charts {
                (day_chart("use-hours", "Hours used per day", today, 30, &usage.daily,
                    |d| d.charged_ms as f64 / 3_600_000.0, duration_label))
                (day_chart("use-calls", "Calls per day", today, 30, &usage.daily,
                    |d| d.calls as f64, |v| format!("{v:.0}")))
            }
        }
        (buy_form(st, token, key, &license, now, error.as_ref()))
        section {
            h2 { "Payments" }
            (table(
                &["Date", "Hours", "Amount", "Status"],
                &[false, true, true, false],
                pays.iter().map(|p| vec![
                    when(p.created_at),
                    hours(p.hours_ms),
                    money(p.amount_cents, &p.currency),
                    p.status.clone(),
                ]),
                "No payments yet.",
            ))
        }
        section {
            h2 { "Usage and balance history" }
            (table(
                &["When", "What", "Hours", "Balance after"],
                &[false, false, true, true],
                history.items.iter().map(|v| vec![
                    v["created_at"]
                        .as_str()
                        .unwrap_or("")
                        .replace('T', " ")
                        .replace('Z', " UTC"),
                    v["kind"].as_str().unwrap_or("").to_string(),
                    signed_hours(v["delta_ms"].as_i64().unwrap_or(0)),
                    v["balance_after_hours"]
                        .as_f64()
                        .map(|h| hours((h * 3_600_000.0).round() as i64))
                        .unwrap_or_default(),
                ]),
                "Nothing yet.",
            ))
        }
        p { a href="/payments/" { "Use another key" } }
    };
    respond(st, token, status, "Your hours", main)
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

fn buy_form(
    st: &AdminState,
    token: &FormToken,
    key: &str,
    license: &License,
    now: i64,
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
                                (p.hours) " hours — " (money(p.price_cents, &p.currency))
                            }
                        }
                    }
                    div.choice {
                        input type="radio" name="choice" id="pkg-custom" value="custom"
                            checked[c.packages.is_empty() || chosen == "custom"];
                        label for="pkg-custom" {
                            "Another number of hours, at "
                            (money(c.payments.price_per_hour_cents, &c.payments.currency))
                            " an hour"
                        }
                    }
                    (custom)
                }
                button type="submit" { "Pay with Stripe" }
            }
        }
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
    if !token.accepts(&st, &headers, &f.csrf) {
        return refused(&st, &token);
    }
    let key = f.license_key.trim();
    let license = match auth::license_for_key(&st, Some(key)).await {
        Ok(l) => l,
        Err(e) => return key_form(&st, &token, StatusCode::UNAUTHORIZED, "", Some(e.text())),
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
                return account(&st, &token, key, StatusCode::BAD_REQUEST, Some(e)).await;
            }
        }
    };
    let idempotency_key = format!("tollgate-{}", hex::encode(rand::random::<[u8; 16]>()));
    match start_checkout(&st, &license, &order, &idempotency_key).await {
        Ok(c) => (
            CookieJar::new().add(checkout_cookie(&st, &c.session_id)),
            see_other(&c.url),
        )
            .into_response(),
        Err(e) => {
            let status = StatusCode::from_u16(e.code.status()).unwrap_or(StatusCode::BAD_REQUEST);
            let field = if e.text().starts_with("hours") {
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
            account(&st, &token, key, status, Some(e)).await
        }
    }
}
