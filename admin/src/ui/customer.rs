//! The customers' payment page at `/payments/`: enter a license key (or arrive with
//! `?license_key=`), see the hours left and 30 days of usage, buy a package or a number of hours
//! through Stripe Checkout, and read the usage and payment history.
//!
//! There is no sign-in: the key is the credential, sent in the form body rather than the URL
//! when it is typed. The forms carry a token tied to a `SameSite=Strict` cookie (double submit)
//! and must come from this origin.

use std::fmt::Write as _;

use axum::body::Bytes;
use axum::extract::{RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use gateway::license::LicenseStatus;
use gateway::store::rollup::day_of;
use gateway::store::{HistoryKind, License};

use serde::Deserialize;

use super::operator::table;
use super::{day_chart, esc, hours, money, notice, page, see_other, when, Area, Field};
use crate::auth;
use crate::licenses::live_remaining_ms;
use crate::payments::{start_checkout, CheckoutBody};
use crate::AdminState;

const COOKIE: &str = "tg_form";

pub fn routes() -> Router<AdminState> {
    Router::new()
        .route("/payments/", get(show).post(enter))
        .route("/payments", get(|| async { see_other("/payments/") }))
        .route("/payments/checkout", post(checkout))
}

/// The form token for this browser: the cookie it has, or a new one to set.
struct FormToken {
    cookie: String,
    fresh: bool,
}

impl FormToken {
    fn of(headers: &HeaderMap) -> FormToken {
        match super::cookie(headers, COOKIE).filter(|c| c.len() == 64) {
            Some(c) => FormToken {
                cookie: c.to_string(),
                fresh: false,
            },
            None => FormToken {
                cookie: hex::encode(rand::random::<[u8; 32]>()),
                fresh: true,
            },
        }
    }

    fn value(&self, st: &AdminState) -> String {
        super::tag(st.shared.console.secret(), "payment-form", &self.cookie)
    }

    /// Whether a posted form carries this browser's token and comes from this origin.
    fn accepts(&self, st: &AdminState, headers: &HeaderMap, posted: &str) -> bool {
        !self.fresh && super::same_origin(headers) && super::tokens_match(&self.value(st), posted)
    }

    fn set(&self, st: &AdminState, r: &mut Response) {
        if !self.fresh {
            return;
        }
        let secure = if st.app.config.admin.tls.is_some() {
            "; Secure"
        } else {
            ""
        };
        let c = format!(
            "{COOKIE}={}; Path=/payments/; HttpOnly; SameSite=Strict{secure}",
            self.cookie
        );
        if let Ok(v) = HeaderValue::from_str(&c) {
            r.headers_mut().append(header::SET_COOKIE, v);
        }
    }
}

/// The cookie that lets the browser that started a checkout see its result on the success page
/// (which otherwise says only that the payment was received). `SameSite=Lax`: the success page
/// is reached by a top-level navigation back from Stripe, which a `Strict` cookie would miss.
pub const CHECKOUT_COOKIE: &str = "tg_checkout";

/// The checkout cookie's value for a session: a tag only this server can make.
pub fn checkout_tag(st: &AdminState, session_id: &str) -> String {
    super::tag(st.shared.console.secret(), "checkout", session_id)
}

fn set_checkout_cookie(st: &AdminState, r: &mut Response, session_id: &str) {
    let secure = if st.app.config.admin.tls.is_some() {
        "; Secure"
    } else {
        ""
    };
    let c = format!(
        "{CHECKOUT_COOKIE}={}; Path=/payments/; HttpOnly; SameSite=Lax; Max-Age=86400{secure}",
        checkout_tag(st, session_id)
    );
    if let Ok(v) = HeaderValue::from_str(&c) {
        r.headers_mut().append(header::SET_COOKIE, v);
    }
}

fn respond(
    st: &AdminState,
    token: &FormToken,
    status: StatusCode,
    title: &str,
    main: &str,
) -> Response {
    let mut r = page(status, title, Area::Customer, main);
    token.set(st, &mut r);
    r
}

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
        extra: "required autocomplete=\"off\" spellcheck=\"false\" autofocus",
        hint: Some("The key you were given, starting with tg_."),
        ..Field::new("license_key", "License key")
    };
    let main = format!(
        "<section class=\"narrow\"><h1>Your hours</h1>\
         <p class=\"lead\">See the time left on your license, its usage, and buy more hours.</p>\
         <form method=\"post\" action=\"/payments/\" class=\"card\">\
         <input type=\"hidden\" name=\"csrf\" value=\"{}\">{}\
         <button type=\"submit\">Show my account</button></form></section>",
        esc(&token.value(st)),
        field.render()
    );
    respond(st, token, status, "Your hours", &main)
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
            super::duration_label(m.idle_timeout_ms as f64 / 3_600_000.0)
        ),
        gateway::config::MeteringMode::RequestTime => {
            "Time is counted while your requests run: the time each one takes.".to_string()
        }
    }
}

async fn show(State(st): State<AdminState>, headers: HeaderMap, RawQuery(q): RawQuery) -> Response {
    let token = FormToken::of(&headers);
    let key = super::query::<ShowQuery>(q.as_deref())
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

async fn enter(State(st): State<AdminState>, headers: HeaderMap, body: Bytes) -> Response {
    let token = FormToken::of(&headers);
    let f: KeyForm = serde_urlencoded::from_bytes(&body).unwrap_or_default();
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

fn refused(st: &AdminState, token: &FormToken) -> Response {
    let main = format!(
        "<section class=\"narrow\"><h1>Refused</h1>{}\
         <p><a href=\"/payments/\">Start again</a></p></section>",
        notice(
            "error",
            "This form did not come from this page (its security token is missing or wrong, or \
             it was sent from another site). Nothing was done."
        )
    );
    respond(st, token, StatusCode::FORBIDDEN, "Refused", &main)
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
        Ok((usage, history, pays)) => (usage, super::json_rows(history), pays),
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
    let mut main = String::new();
    let _ = write!(
        main,
        "<h1>Your hours</h1><div class=\"balance\" aria-live=\"polite\">\
         <span class=\"label\">Hours remaining</span>\
         <span class=\"value\" id=\"hours-remaining\">{}</span></div>\
         <p class=\"lead\">License <code>{}…</code> · {} plan{}</p>\
         <p id=\"how-time-counts\">{}</p>",
        hours(remaining),
        esc(&license.key_prefix),
        esc(&license.plan),
        state_text(&license, now),
        how_time_counts(&st.app.config.metering)
    );
    let today = day_of(now);
    main.push_str("<section><h2>Usage, last 30 days</h2><div class=\"charts\">");
    main.push_str(&day_chart(
        "use-hours",
        "Hours used per day",
        today,
        30,
        &usage.daily,
        |d| d.charged_ms as f64 / 3_600_000.0,
        super::duration_label,
    ));
    main.push_str(&day_chart(
        "use-calls",
        "Calls per day",
        today,
        30,
        &usage.daily,
        |d| d.calls as f64,
        |v| format!("{v:.0}"),
    ));
    main.push_str("</div></section>");
    main.push_str(&buy_form(st, token, key, &license, now, error.as_ref()));

    main.push_str("<section><h2>Payments</h2>");
    main.push_str(&table(
        &["Date", "Hours", "Amount", "Status"],
        &[false, true, true, false],
        pays.iter().map(|p| {
            vec![
                when(p.created_at),
                hours(p.hours_ms),
                money(p.amount_cents, &p.currency),
                p.status.clone(),
            ]
        }),
        "No payments yet.",
    ));
    main.push_str("</section><section><h2>Usage and balance history</h2>");
    main.push_str(&table(
        &["When", "What", "Hours", "Balance after"],
        &[false, false, true, true],
        history.items.iter().map(|v| {
            let ms = v["delta_ms"].as_i64().unwrap_or(0);
            vec![
                v["created_at"]
                    .as_str()
                    .unwrap_or("")
                    .replace('T', " ")
                    .replace('Z', " UTC"),
                v["kind"].as_str().unwrap_or("").to_string(),
                super::signed_hours(ms),
                v["balance_after_hours"]
                    .as_f64()
                    .map(|h| hours((h * 3_600_000.0).round() as i64))
                    .unwrap_or_default(),
            ]
        }),
        "Nothing yet.",
    ));
    main.push_str("</section><p><a href=\"/payments/\">Use another key</a></p>");
    respond(st, token, status, "Your hours", &main)
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
) -> String {
    let c = &st.app.config;
    let mut s = String::from("<section><h2>Buy hours</h2>");
    if license.status == LicenseStatus::Revoked || license.expires_at.is_some_and(|e| e <= now) {
        s.push_str("<p>This license can no longer be used, so no hours can be bought for it.</p></section>");
        return s;
    }
    if let Some(e) = error.filter(|e| e.field.is_empty()) {
        s.push_str(&notice("error", e.message));
    }
    let chosen = error.map_or("", |e| e.choice);
    let _ = write!(
        s,
        "<form method=\"post\" action=\"/payments/checkout\" class=\"card buy\">\
         <input type=\"hidden\" name=\"csrf\" value=\"{}\">\
         <input type=\"hidden\" name=\"license_key\" value=\"{}\">\
         <fieldset><legend>Choose a package</legend>",
        esc(&token.value(st)),
        esc(key)
    );
    for (i, p) in c.packages.iter().enumerate() {
        let _ = write!(
            s,
            "<div class=\"choice\"><input type=\"radio\" name=\"choice\" id=\"pkg-{i}\" value=\"package:{}\"{}>\
             <label for=\"pkg-{i}\">{} hours — {}</label></div>",
            esc(&p.id),
            if chosen == format!("package:{}", p.id) || (chosen.is_empty() && i == 0) {
                " checked"
            } else {
                ""
            },
            p.hours,
            esc(&money(p.price_cents, &p.currency))
        );
    }
    let custom_error = error.filter(|e| e.field == "hours").map(|e| e.message);
    let _ = write!(
        s,
        "<div class=\"choice\"><input type=\"radio\" name=\"choice\" id=\"pkg-custom\" value=\"custom\"{}>\
         <label for=\"pkg-custom\">Another number of hours, at {} an hour</label></div>{}</fieldset>\
         <button type=\"submit\">Pay with Stripe</button></form></section>",
        if c.packages.is_empty() || chosen == "custom" {
            " checked"
        } else {
            ""
        },
        esc(&money(c.payments.price_per_hour_cents, &c.payments.currency)),
        Field {
            kind: "number",
            value: error.map_or("", |e| e.hours),
            error: custom_error,
            extra: &format!(
                "min=\"{}\" max=\"{}\" step=\"1\" inputmode=\"numeric\"",
                c.payments.min_hours, c.payments.max_hours
            ),
            hint: Some(&format!(
                "Whole hours, {} to {}, when you choose another number.",
                c.payments.min_hours, c.payments.max_hours
            )),
            ..Field::new("hours", "Hours")
        }
        .render()
    );
    s
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

async fn checkout(State(st): State<AdminState>, headers: HeaderMap, body: Bytes) -> Response {
    let token = FormToken::of(&headers);
    let f: BuyForm = serde_urlencoded::from_bytes(&body).unwrap_or_default();
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
        Ok(c) => {
            let mut r = see_other(&c.url);
            set_checkout_cookie(&st, &mut r, &c.session_id);
            r
        }
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
