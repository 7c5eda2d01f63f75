//! A license's page in the console: its balance and facts, the forms that change it (add or
//! deduct hours, revoke, rotate the key), 30 days of charts, and its history tables.

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use gateway::license::LicenseStatus;
use gateway::store::rollup::day_of;
use gateway::store::{Adjustment, HistoryKind};

use maud::{html, Markup};
use serde::Deserialize;

use super::{form_field, key_box, license_id, parse_hours, status_badge};
use crate::service::licenses::{self, AdjustBody};
use crate::service::{usage, Service};
use crate::ui::charts::{day_chart, Unit};
use crate::ui::format::{money, percent, request_time, when, when_exact, Time};
use crate::ui::layout::{csrf_input, notice, page, stat, table, Field, Tone};
use crate::ui::operator::{failed, forbidden, not_found, CsrfForm, Signed};
use crate::ui::{form, history, limits, query, see_other};
use crate::AdminState;

#[derive(Deserialize, Default)]
struct ShowQuery {
    done: Option<String>,
    /// The balance history's page: the rows older than this one's.
    history_before: Option<i64>,
}

/// An error to show next to one of the license page's forms.
pub(super) struct FormError<'a> {
    pub(super) form: &'a str,
    pub(super) field: &'a str,
    pub(super) message: &'a str,
}

pub async fn show(
    State(st): State<AdminState>,
    s: Signed,
    Path(raw): Path<String>,
    RawQuery(q): RawQuery,
) -> Response {
    let Some(id) = license_id(&raw) else {
        return not_found();
    };
    let ShowQuery {
        done,
        history_before,
    } = query::<ShowQuery>(q.as_deref());
    let message = match done.as_deref() {
        Some("credited") => Some("The hours were added."),
        Some("deducted") => Some("The hours were deducted."),
        Some("revoked") => Some("The license was revoked: its key no longer works."),
        Some("key-revoked") => Some("The key was revoked: the license's other keys work on."),
        _ => None,
    };
    if let Some(done @ ("rotated" | "key-rotated" | "key-added")) = done.as_deref() {
        let key = st.shared.console.take_key(&s.session, id).await;
        let shown = Some(match (&key, done) {
            (Some(_), "key-added") => "The key was added: it opens this license from now on.",
            (Some(_), _) => "The key was rotated: the old key no longer works.",
            (None, "key-added") => {
                "The new key was shown once and is not kept; revoke it and add another."
            }
            (None, _) => {
                "The new key was shown once and is not kept; rotate again to make another."
            }
        });
        return license_page(
            &st,
            &s,
            id,
            StatusCode::OK,
            shown,
            None,
            key.as_deref(),
            None,
        )
        .await;
    }
    let status = StatusCode::OK;
    license_page(&st, &s, id, status, message, None, None, history_before).await
}

/// The forms that change the license: add or deduct hours, revoke, rotate the key.
fn actions(l: &gateway::store::License, s: &Signed, error: Option<&FormError<'_>>) -> Markup {
    let err = |form: &str, field: &str| {
        error
            .filter(|e| e.form == form && e.field == field)
            .map(|e| e.message)
    };
    let general = |form: &str| {
        error
            .filter(|e| e.form == form && e.field.is_empty())
            .map(|e| notice(Tone::Error, e.message))
    };
    let base = format!("/console/licenses/{}", l.id);
    html! {
        section.actions {
            h2 { "Actions" }
            div.action-grid {
                @for (form, title) in [("hours", "Add hours"), ("deduct", "Deduct hours")] {
                    form.card method="post" action={ (base) "/" (form) } novalidate {
                        h3 { (title) }
                        @if let Some(n) = general(form) { (n) }
                        (csrf_input(&s.csrf))
                        (Field {
                            kind: "number",
                            error: err(form, "hours"),
                            required: true,
                            min: Some("0".into()),
                            step: Some("any"),
                            inputmode: Some("decimal"),
                            form,
                            ..Field::new("hours", "Hours")
                        })
                        (Field {
                            error: err(form, "reason"),
                            maxlength: Some(500),
                            form,
                            ..Field::new("reason", "Reason (optional)")
                        })
                        @if form == "deduct" {
                            p.hint {
                                "A correction of the balance: not counted as time used nor \
                                 against the plan's allowances."
                            }
                            div.choice {
                                input type="checkbox" name="allow_overdraft" id="f-allow_overdraft";
                                label for="f-allow_overdraft" {
                                    "Allow the balance to go below zero"
                                }
                            }
                        }
                        button type="submit" { (title) }
                    }
                }
                div.card {
                    h3 { "Key and access" }
                    @if let Some(n) = general("access") { (n) }
                    @if l.status == LicenseStatus::Revoked {
                        p { "This license is revoked." }
                    } @else {
                        details {
                            summary { "Revoke this license…" }
                            p { "Its key stops working at once. This cannot be undone from here." }
                            form method="post" action={ (base) "/revoke" } {
                                (csrf_input(&s.csrf))
                                button.danger type="submit" { "Revoke the license" }
                            }
                        }
                    }
                    details {
                        summary { "Rotate the key…" }
                        p { "A new key is made and shown once; the old one stops working at once." }
                        form method="post" action={ (base) "/rotate" } {
                            (csrf_input(&s.csrf))
                            button type="submit" { "Rotate the key" }
                        }
                    }
                }
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
pub(super) async fn license_page(
    st: &AdminState,
    s: &Signed,
    id: i64,
    status: StatusCode,
    done: Option<&str>,
    error: Option<FormError<'_>>,
    new_key: Option<&str>,
    history_before: Option<i64>,
) -> Response {
    let now = st.app.ledger.now_ms();
    let store = &st.app.store;
    let read = tokio::try_join!(
        store.license(id),
        store.usage_stats(id, 30, now),
        store.history(id, HistoryKind::Sessions, 10, None),
        store.history(id, HistoryKind::All, history::PAGE, history_before),
        store.recent_access(id, 20),
        store.payments_for_license(id, 10, None),
        store.alerts_for_license(id, 10),
        store.keys(id),
    );
    let (l, usage, sessions, history, access, pays, alerts, keys) = match read {
        Ok(read) => read,
        Err(gateway::store::StoreError::NotFound) => return not_found(),
        Err(e) => return failed(e.into()),
    };
    let lines = match usage::limits(&st.app, &l).await {
        Ok(lines) => lines,
        Err(e) => return failed(e),
    };
    let blocked = limits::blocked_until(&lines);
    let remaining = Service::of(&st.app)
        .settled_remaining_ms(&l, crate::service::ON_VIEW)
        .await;
    let included = match Service::of(&st.app).included_left_ms(&l).await {
        Ok(i) => i,
        Err(e) => return failed(e),
    };
    let subscription = match crate::service::payments::subscription(&Service::of(&st.app), id).await
    {
        Ok(s) => s,
        Err(e) => return failed(e),
    };
    let opt = |v: &Option<String>| v.clone().unwrap_or_else(|| "–".into());
    let never = |v: Option<i64>| v.map(when).unwrap_or_else(|| "never".into());
    let calls = format!("{} ({} ok)", usage.calls, percent(usage.ok, usage.calls));
    let today = day_of(now);
    let base = format!("/console/licenses/{}", l.id);
    let main = html! {
        p.crumbs { a href="/console/licenses" { "Licenses" } " › " (l.name) }
        div.title-row {
            h1 { (l.name) }
            span.badges {
                (status_badge(&l, now))
                @if let Some(until) = blocked {
                    span.badge.warn #blocked-badge { "refused until " (when(until)) }
                }
            }
        }
        @if let Some(m) = done { (notice(Tone::Ok, m)) }
        @if let Some(key) = new_key {
            (key_box(key))
        }
        div.stats {
            @if let Some(left) = included {
                (stat("Included left this period (spent first)", Time(left)))
            }
            @if st.app.config.balance_unit == gateway::display::BalanceUnit::Hours {
                (stat(if included.is_some() { "Prepaid time remaining" } else { "Time remaining" },
                    Time(remaining)))
            } @else {
                (stat(&st.app.config.balance_unit.remaining_label(),
                    st.app.config.balance_unit.balance(remaining)))
            }
            (stat("Time used", Time(l.used_ms)))
            (stat("Requests", l.requests_total))
            (stat("Calls, 30 days", calls))
            @if usage.debited_ms != 0 {
                (stat("Deducted by hand, 30 days", Time(usage.debited_ms)))
            }
        }
        dl.facts {
            dt { "License id" } dd { (l.id) }
            dt { "Key" } dd { code { (l.key_prefix) "…" } }
            dt { "Plan" } dd {
                (l.plan)
                @if let Some(s) = &subscription {
                    " · subscription " (s.status)
                    @if let Some(end) = s.ends_at.or(s.grace_until) {
                        ", ends " (when(end))
                    } @else if let Some(end) = s.period_end {
                        ", paid to " (when(end))
                    }
                }
            }
            dt { "Email" } dd { (opt(&l.email)) }
            dt { "Company" } dd { (opt(&l.company)) }
            dt { "Created" } dd { (when(l.created_at)) }
            dt { "Last used" } dd { (never(l.last_used_at)) }
            dt { "Expires" } dd { (never(l.expires_at)) }
        }
        (actions(&l, s, error.as_ref()))
        (super::keys::section(&l, &keys, &usage.keys, s, error.as_ref(), now))
        @if !lines.is_empty() {
            section #plan-limits-section {
                h2 { "Plan limits" }
                (limits::notices(&lines))
                (limits::table(&lines))
            }
        }
        section {
            h2 { "Usage, last 30 days" }
            div.charts {
                (day_chart("lic-time", "Time per day", today, 30, &usage.daily,
                    |d| d.charged_ms, Unit::charged(&st.app.config.balance_unit)))
                (day_chart("lic-calls", "Calls per day", today, 30, &usage.daily,
                    |d| d.calls, Unit::Calls))
            }
            @if !usage.meters.is_empty() {
                h3 { "Units the app reported" }
                (table(
                    &["Meter", "Units", "Balance taken"],
                    &[false, true, true],
                    usage.meters.iter().map(|m| vec![
                        meter_label(st, &m.meter).into(),
                        gateway::timefmt::grouped(m.units).into(),
                        Time(m.charged_ms).into(),
                    ]),
                    "",
                ))
            }
        }
        section #balance-history {
            h2 { "Balance history" }
            (history::balance_history(&history, true, html! {
                nav.pager aria-label="Balance history pages" {
                    @if history_before.is_some() {
                        a href={ (base) "#balance-history" } { "« Newest" }
                    }
                    @if let Some(n) = history.next_before {
                        a href={ (base) "?history_before=" (n) "#balance-history" } rel="next" {
                            "Older »"
                        }
                    }
                }
            }, &st.app.config.balance_unit))
        }
        section {
            h2 { "Sessions" }
            (table(
                &["Started", "Last activity", "Time", "Requests", "State"],
                &[false, false, true, true, false],
                super::super::sessions(&sessions).map(|s| vec![
                    when_exact(s.started_at).into(),
                    when_exact(s.last_activity_at).into(),
                    Time(s.charged_ms).into(),
                    s.requests.to_string().into(),
                    if s.ended_at.is_none() { "open".into() } else { "ended".into() },
                ]),
                "No sessions yet.",
            ))
        }
        section {
            h2 { "Recent requests" }
            (table(
                &["When", "Request", "Status", "Outcome", "Time"],
                &[false, false, true, false, true],
                access.iter().map(|a| vec![
                    when(a.ts).into(),
                    format!("{} {}", a.method, a.path).into(),
                    a.status.to_string().into(),
                    a.outcome.as_str().into(),
                    request_time(a.duration_us).into(),
                ]),
                "No requests among the most recent ones.",
            ))
        }
        section {
            h2 { "Payments" }
            (table(
                &["Created", "Time bought", "Amount", "Status", "Refunded"],
                &[false, true, true, false, true],
                pays.iter().map(|p| vec![
                    when(p.created_at).into(),
                    Time(p.hours_ms).into(),
                    money(p.amount_cents, &p.currency).into(),
                    match &p.mismatch {
                        Some(why) => format!("{} (amount mismatch: {why})", p.status).into(),
                        None => p.status.as_str().into(),
                    },
                    if p.refunded_cents > 0 {
                        money(p.refunded_cents, &p.currency).into()
                    } else {
                        "–".into()
                    },
                ]),
                "No payments yet.",
            ))
        }
        section {
            h2 { "Alerts" }
            (table(
                &["When", "Kind", "Threshold", "Delivered"],
                &[false, false, true, false],
                alerts.iter().map(|a| vec![
                    when(a.created_at).into(),
                    a.kind.as_str().into(),
                    format!("{} %", a.threshold_percent).into(),
                    a.delivered_at
                        .map(when)
                        .unwrap_or_else(|| format!("not yet ({} attempts)", a.attempts))
                        .into(),
                ]),
                "No alerts.",
            ))
        }
    };
    page(status, &l.name, s.area("Licenses"), main)
}

// ---- actions on a license -------------------------------------------------------------------

#[derive(Deserialize, Default)]
struct AdjustForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    hours: String,
    #[serde(default)]
    reason: String,
    /// The deduct form's box: the balance may go below zero.
    #[serde(default)]
    allow_overdraft: String,
}

async fn adjust(
    st: AdminState,
    s: Signed,
    headers: HeaderMap,
    raw: String,
    body: Bytes,
    how: Adjustment,
) -> Response {
    let Some(id) = license_id(&raw) else {
        return not_found();
    };
    let f: AdjustForm = form(&body);
    if !s.check(&headers, &f.csrf) {
        return forbidden();
    }
    let (form_name, done) = if how == Adjustment::Credit {
        ("hours", "credited")
    } else {
        ("deduct", "deducted")
    };
    let hours = match parse_hours(&f.hours, false) {
        Ok(Some(h)) => h,
        Ok(None) | Err(_) => {
            let m = parse_hours(&f.hours, false)
                .err()
                .unwrap_or_else(|| "Enter a number of hours.".into());
            let e = FormError {
                form: form_name,
                field: "hours",
                message: &m,
            };
            let status = StatusCode::BAD_REQUEST;
            return license_page(&st, &s, id, status, None, Some(e), None, None).await;
        }
    };
    let reason = Some(f.reason.trim().to_string()).filter(|r| !r.is_empty());
    let body = AdjustBody {
        hours,
        reason,
        allow_overdraft: f.allow_overdraft == "on",
    };
    match licenses::adjust(&Service::of(&st.app), id, how, body).await {
        Ok(_) => see_other(&format!("/console/licenses/{id}?done={done}")),
        Err(e) => form_failed(&st, &s, id, form_name, form_field(&e), e).await,
    }
}

pub async fn add_hours(
    State(st): State<AdminState>,
    s: Signed,
    headers: HeaderMap,
    Path(raw): Path<String>,
    body: Bytes,
) -> Response {
    adjust(st, s, headers, raw, body, Adjustment::Credit).await
}

pub async fn deduct(
    State(st): State<AdminState>,
    s: Signed,
    headers: HeaderMap,
    Path(raw): Path<String>,
    body: Bytes,
) -> Response {
    adjust(st, s, headers, raw, body, Adjustment::Debit).await
}

/// What a form of the license page failed with, shown by that form (by `field` when the form
/// has it, else above it), with the error's status.
pub(super) async fn form_failed(
    st: &AdminState,
    s: &Signed,
    id: i64,
    form: &str,
    field: &str,
    e: crate::error::ApiError,
) -> Response {
    let status = StatusCode::from_u16(e.code.status()).unwrap_or(StatusCode::BAD_REQUEST);
    let e = FormError {
        form,
        field,
        message: e.text(),
    };
    license_page(st, s, id, status, None, Some(e), None, None).await
}

pub async fn revoke(
    State(st): State<AdminState>,
    s: Signed,
    headers: HeaderMap,
    Path(raw): Path<String>,
    body: Bytes,
) -> Response {
    let Some(id) = license_id(&raw) else {
        return not_found();
    };
    let f: CsrfForm = form(&body);
    if !s.check(&headers, &f.csrf) {
        return forbidden();
    }
    match licenses::revoke(&Service::of(&st.app), id).await {
        Ok(_) => see_other(&format!("/console/licenses/{id}?done=revoked")),
        Err(e) => form_failed(&st, &s, id, "access", "", e).await,
    }
}

pub async fn rotate(
    State(st): State<AdminState>,
    s: Signed,
    headers: HeaderMap,
    Path(raw): Path<String>,
    body: Bytes,
) -> Response {
    let Some(id) = license_id(&raw) else {
        return not_found();
    };
    let f: CsrfForm = form(&body);
    if !s.check(&headers, &f.csrf) {
        return forbidden();
    }
    match licenses::rotate(&Service::of(&st.app), id).await {
        // shown once, on the page this redirects to
        Ok((_, key)) => {
            st.shared.console.hold_key(&s.session, id, key).await;
            see_other(&format!("/console/licenses/{id}?done=rotated"))
        }
        Err(e) => form_failed(&st, &s, id, "access", "", e).await,
    }
}

/// A meter's label as the config gives it (its name, for one no longer configured).
fn meter_label(st: &AdminState, name: &str) -> String {
    st.app
        .config
        .meters
        .iter()
        .find(|m| m.name == name)
        .map_or_else(|| name.to_string(), |m| m.label.clone())
}
