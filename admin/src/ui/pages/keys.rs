//! A license's keys on its console page: each key with its limits, expiry, last use and use in
//! the last 30 days, revoke and rotate for each, and the form that adds one. A new or rotated
//! key is shown once, on the page the form redirects to (held for the session, as the
//! license-level rotation's is).

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use gateway::license::LicenseStatus;
use gateway::store::{KeyStats, LicenseKey};
use maud::{html, Markup};
use serde::Deserialize;

use super::license::{form_failed, license_page, FormError};
use super::license_id;
use crate::service::licenses::{self, KeyBody, KeyLimitsBody};
use crate::service::Service;
use crate::ui::format::{when, Time};
use crate::ui::layout::{csrf_input, notice, table, Cell, Field, Tone};
use crate::ui::operator::{forbidden, not_found, CsrfForm, Signed};
use crate::ui::{form, see_other};
use crate::AdminState;

/// The form that adds a key.
const FORM: &str = "key";

/// The keys section: a row per key (revoked ones too), and the form that adds one.
pub(super) fn section(
    license: &gateway::store::License,
    keys: &[LicenseKey],
    used: &[KeyStats],
    s: &Signed,
    error: Option<&FormError<'_>>,
    now: i64,
) -> Markup {
    let base = format!("/console/licenses/{}/keys", license.id);
    let err = |field: &str| {
        error
            .filter(|e| e.form == FORM && e.field == field)
            .map(|e| e.message)
    };
    let general = error
        .filter(|e| (e.form == FORM || e.form == "keys") && e.field.is_empty())
        .map(|e| notice(Tone::Error, e.message));
    let rows = keys.iter().map(|k| {
        let u = used.iter().find(|u| u.key_id == k.id);
        let state = match k.status {
            LicenseStatus::Revoked => "revoked",
            _ if k.expires_at.is_some_and(|e| e <= now) => "expired",
            _ => "active",
        };
        // an expired key may still be revoked (it is no use rotating it)
        let revocable = k.status == LicenseStatus::Active;
        let active = state == "active" && license.status == LicenseStatus::Active;
        let actions = html! {
            @if active {
                form.inline method="post" action={ (base) "/" (k.id) "/rotate" } {
                    (csrf_input(&s.csrf))
                    button type="submit" aria-label={ "Rotate key " (k.name) } { "Rotate" }
                }
            }
            @if revocable {
                form.inline method="post" action={ (base) "/" (k.id) "/revoke" } {
                    (csrf_input(&s.csrf))
                    button.danger type="submit" aria-label={ "Revoke key " (k.name) } { "Revoke" }
                }
            }
        };
        vec![
            Cell::Markup(html! { code { (k.key_prefix) "…" } }),
            k.name.clone().into(),
            state.into(),
            rules(k).into(),
            k.last_used_at
                .map(when)
                .unwrap_or_else(|| "never".into())
                .into(),
            u.map_or(0, |u| u.calls).to_string().into(),
            Time(u.map_or(0, |u| u.duration_ms)).into(),
            Cell::Markup(actions),
        ]
    });
    html! {
        section #keys {
            h2 { "Keys" }
            p.hint {
                "Each key opens this license: one balance, one plan. A key's own limits bound it \
                 alone, beside the plan."
            }
            @if let Some(n) = general { (n) }
            (table(
                &["Key", "Name", "State", "Own limits", "Last used", "Calls, 30 days",
                  "Request time, 30 days", ""],
                &[false, false, false, false, false, true, true, false],
                rows,
                "No keys.",
            ))
            @if license.status == LicenseStatus::Active {
                details open[error.is_some_and(|e| e.form == FORM)] {
                    summary { "Add a key…" }
                    form.card method="post" action=(base) novalidate {
                        (csrf_input(&s.csrf))
                        (Field {
                            error: err("name"),
                            required: true,
                            maxlength: Some(100),
                            form: FORM,
                            hint: Some("A developer, an environment, a machine."),
                            ..Field::new("name", "Name")
                        })
                        (Field {
                            kind: "date",
                            error: err("expires_at"),
                            form: FORM,
                            hint: Some("Optional: the key stops working then (UTC)."),
                            ..Field::new("expires_at", "Expires")
                        })
                        @for (name, label) in LIMITS {
                            (Field {
                                kind: "number",
                                error: err(name),
                                min: Some("1".into()),
                                step: Some("1"),
                                inputmode: Some("numeric"),
                                form: FORM,
                                hint: Some("Optional."),
                                ..Field::new(name, label)
                            })
                        }
                        button type="submit" { "Add the key" }
                    }
                }
            }
        }
    }
}

/// The add form's limit fields: their names (as the API's `limits` has them) and labels.
const LIMITS: [(&str, &str); 3] = [
    ("requests_per_second", "Requests a second"),
    ("max_concurrent", "Requests at once"),
    ("max_seconds_per_day", "Request time a day (seconds)"),
];

/// A key's own limits and expiry, as a short line ("–": none).
fn rules(k: &LicenseKey) -> String {
    let text = gateway::store::license_keys::rules_text(k, when);
    if text.is_empty() {
        "–".into()
    } else {
        text
    }
}

#[derive(Deserialize, Default)]
struct AddForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    expires_at: String,
    #[serde(default)]
    requests_per_second: String,
    #[serde(default)]
    max_concurrent: String,
    #[serde(default)]
    max_seconds_per_day: String,
}

/// A whole number typed into a limit field: empty is none.
fn limit<T: std::str::FromStr>(
    field: &'static str,
    text: &str,
) -> Result<Option<T>, FormError<'static>> {
    let t = text.trim();
    if t.is_empty() {
        return Ok(None);
    }
    t.parse().map(Some).map_err(|_| FormError {
        form: FORM,
        field,
        message: "Enter a whole number above 0, or leave it empty.",
    })
}

pub async fn add(
    State(st): State<AdminState>,
    s: Signed,
    headers: HeaderMap,
    Path(raw): Path<String>,
    body: Bytes,
) -> Response {
    let Some(id) = license_id(&raw) else {
        return not_found();
    };
    let f: AddForm = form(&body);
    if !s.check(&headers, &f.csrf) {
        return forbidden();
    }
    let limits = (|| {
        Ok(KeyLimitsBody {
            requests_per_second: limit("requests_per_second", &f.requests_per_second)?,
            max_concurrent: limit("max_concurrent", &f.max_concurrent)?,
            max_seconds_per_day: limit("max_seconds_per_day", &f.max_seconds_per_day)?,
        })
    })();
    let limits = match limits {
        Ok(l) => l,
        Err(e) => {
            return license_page(
                &st,
                &s,
                id,
                StatusCode::BAD_REQUEST,
                None,
                Some(e),
                None,
                None,
            )
            .await
        }
    };
    let b = KeyBody {
        name: f.name,
        expires_at: Some(f.expires_at.trim().to_string()).filter(|e| !e.is_empty()),
        limits: Some(limits),
    };
    match licenses::add_key(&Service::of(&st.app), id, b).await {
        Ok((_, _, key)) => {
            st.shared.console.hold_key(&s.session, id, key).await;
            see_other(&format!("/console/licenses/{id}?done=key-added#keys"))
        }
        Err(e) => {
            // the form's field the error names (the API's `limits.x` is the form's `x`)
            let named = e.field().map(|f| f.strip_prefix("limits.").unwrap_or(f));
            let field = ["name", "expires_at"]
                .into_iter()
                .chain(LIMITS.map(|(n, _)| n))
                .find(|n| Some(*n) == named)
                .unwrap_or("");
            form_failed(&st, &s, id, FORM, field, e).await
        }
    }
}

/// The ids of a key's path (`/console/licenses/{id}/keys/{key_id}/…`).
fn ids(raw: &(String, String)) -> Option<(i64, i64)> {
    Some((license_id(&raw.0)?, license_id(&raw.1)?))
}

pub async fn revoke(
    State(st): State<AdminState>,
    s: Signed,
    headers: HeaderMap,
    Path(raw): Path<(String, String)>,
    body: Bytes,
) -> Response {
    let Some((id, key_id)) = ids(&raw) else {
        return not_found();
    };
    let f: CsrfForm = form(&body);
    if !s.check(&headers, &f.csrf) {
        return forbidden();
    }
    match licenses::revoke_key(&Service::of(&st.app), id, key_id).await {
        Ok(_) => see_other(&format!("/console/licenses/{id}?done=key-revoked#keys")),
        Err(e) => form_failed(&st, &s, id, "keys", "", e).await,
    }
}

pub async fn rotate(
    State(st): State<AdminState>,
    s: Signed,
    headers: HeaderMap,
    Path(raw): Path<(String, String)>,
    body: Bytes,
) -> Response {
    let Some((id, key_id)) = ids(&raw) else {
        return not_found();
    };
    let f: CsrfForm = form(&body);
    if !s.check(&headers, &f.csrf) {
        return forbidden();
    }
    match licenses::rotate_key(&Service::of(&st.app), id, key_id).await {
        Ok((_, _, key)) => {
            st.shared.console.hold_key(&s.session, id, key).await;
            see_other(&format!("/console/licenses/{id}?done=key-rotated#keys"))
        }
        Err(e) => form_failed(&st, &s, id, "keys", "", e).await,
    }
}
