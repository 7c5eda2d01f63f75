//! The operator's licenses API (`/api/licenses…`, bearer admin token). Every change is one store
//! transaction with its history row, then applied to the proxy's ledger at once, so a credit or
//! a revocation takes effect on the next proxied request.

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use gateway::config::checked_hours_ms;
use gateway::license::ms_to_hours;
use gateway::license::LicenseStatus;
use gateway::store::{Adjustment, HistoryKind, License, LicenseFilter, LicensePatch, NewLicense};
use gateway::timefmt;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::auth::Operator;
use crate::error::{ApiError, ApiJson, ApiQuery, ApiResult, LicenseId};
use crate::{views, AdminState};

pub fn routes() -> Router<AdminState> {
    Router::new()
        .route("/api/licenses", post(create).get(list))
        .route("/api/licenses/{id}", get(show).patch(patch))
        .route("/api/licenses/{id}/hours", post(add_hours))
        .route("/api/licenses/{id}/usage", post(deduct))
        .route("/api/licenses/{id}/revoke", post(revoke))
        .route("/api/licenses/{id}/rotate", post(rotate))
        .route("/api/licenses/{id}/history", get(history))
}

const MAX_TEXT: usize = 200;
const MAX_REASON: usize = 500;

/// Hours from a request as whole milliseconds (see [`checked_hours_ms`]), positive unless
/// `zero_ok`.
pub fn hours_ms(hours: f64, zero_ok: bool) -> ApiResult<i64> {
    let ms = checked_hours_ms(hours).map_err(ApiError::bad_request)?;
    if ms == 0 && !zero_ok {
        return Err(ApiError::bad_request("hours must be more than zero"));
    }
    Ok(ms)
}

/// The license as JSON, with the balance the proxy sees now: the stored balance less usage
/// metered and not yet flushed.
pub fn license_json(st: &AdminState, l: &License) -> Value {
    let mut v = views::license(l);
    let live = live_remaining_ms(st, l);
    v["hours_remaining"] = ms_to_hours(live).into();
    v["seconds_remaining"] = live.div_euclid(1000).into();
    v
}

/// The stored balance less the usage the proxy has metered and not yet flushed (the ledger
/// takes the row first, so usage a flush already wrote into it is not subtracted twice).
pub fn live_remaining_ms(st: &AdminState, l: &License) -> i64 {
    st.app.ledger.live_remaining_ms(&l.state())
}

/// Tells the proxy about a change just committed.
pub fn applied(st: &AdminState, l: &License) {
    st.app.ledger.apply(&l.state());
}

fn text(field: &str, v: Option<String>, max: usize) -> ApiResult<Option<String>> {
    let v = v.map(|s| s.trim().to_string()).filter(|s| !s.is_empty());
    if v.as_ref().is_some_and(|s| s.chars().count() > max) {
        return Err(ApiError::bad_request(format!(
            "{field} must be at most {max} characters"
        )));
    }
    Ok(v)
}

fn email(v: Option<String>) -> ApiResult<Option<String>> {
    let v = text("email", v, 254)?;
    if let Some(e) = &v {
        let valid = e
            .split_once('@')
            .is_some_and(|(user, host)| !user.is_empty() && host.contains('.'))
            && !e.contains(char::is_whitespace);
        if !valid {
            return Err(ApiError::bad_request("email is not an email address"));
        }
    }
    Ok(v)
}

fn plan(st: &AdminState, name: &str) -> ApiResult<String> {
    if st.app.config.plan(name).is_none() {
        let known: Vec<&str> = st
            .app
            .config
            .plans
            .iter()
            .map(|p| p.name.as_str())
            .collect();
        return Err(ApiError::bad_request(format!(
            "unknown plan {name:?}; the plans are {}",
            known.join(", ")
        )));
    }
    Ok(name.to_string())
}

/// An expiry time, which must lie ahead: a license that is born expired would be listed as
/// active and refuse every request (to end a license now, revoke it).
fn expiry(v: &str, now: i64) -> ApiResult<i64> {
    let at = timefmt::parse_rfc3339(v).ok_or_else(|| {
        ApiError::bad_request(
            "expires_at must be an RFC 3339 time (2025-12-31T23:59:59Z) or a date (2025-12-31)",
        )
    })?;
    if at <= now {
        return Err(ApiError::bad_request(format!(
            "expires_at must be in the future ({v} has passed); to end a license now, revoke it"
        )));
    }
    Ok(at)
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct CreateBody {
    pub name: String,
    pub email: Option<String>,
    pub company: Option<String>,
    pub hours: Option<f64>,
    pub plan: Option<String>,
    pub expires_at: Option<String>,
}

async fn create(
    _: Operator,
    State(st): State<AdminState>,
    ApiJson(b): ApiJson<CreateBody>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let (license, key) = create_license(&st, b).await?;
    let mut v = license_json(&st, &license);
    v["license_key"] = key.into();
    Ok((StatusCode::CREATED, Json(v)))
}

/// Creates a license (the API and the console): the license and its key, shown once.
pub async fn create_license(st: &AdminState, b: CreateBody) -> ApiResult<(License, String)> {
    let new = NewLicense {
        name: text("name", Some(b.name), MAX_TEXT)?
            .ok_or_else(|| ApiError::bad_request("name must not be empty"))?,
        email: email(b.email)?,
        company: text("company", b.company, MAX_TEXT)?,
        plan: plan(st, b.plan.as_deref().unwrap_or("free"))?,
        balance_ms: hours_ms(b.hours.unwrap_or(0.0), true)?,
        expires_at: b
            .expires_at
            .as_deref()
            .map(|v| expiry(v, st.app.ledger.now_ms()))
            .transpose()?,
    };
    let now = st.app.ledger.now_ms();
    let (license, key) = st.app.store.create_license(new, now).await?;
    st.app.ledger.forget_unknown(&license.key_hash);
    if license.balance_ms > 0 {
        gateway::metrics::CREDITED_SECONDS.inc_by(license.balance_ms as f64 / 1_000.0);
    }
    tracing::info!(license = license.id, "admin: license created");
    Ok((license, key))
}

#[derive(Deserialize)]
struct ListQuery {
    status: Option<String>,
    plan: Option<String>,
    q: Option<String>,
    limit: Option<u32>,
    cursor: Option<String>,
}

async fn list(
    _: Operator,
    State(st): State<AdminState>,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> ApiResult<Json<Value>> {
    if let Some(s) = q.status.as_deref().filter(|s| !s.is_empty()) {
        if LicenseStatus::parse(s).is_none() {
            return Err(ApiError::bad_request("status must be active or revoked"));
        }
    }
    let limit = q.limit.unwrap_or(50);
    if !(1..=500).contains(&limit) {
        return Err(ApiError::bad_request("limit must be between 1 and 500"));
    }
    let before = match q.cursor.as_deref().filter(|c| !c.is_empty()) {
        None => None,
        Some(c) => Some(
            c.parse::<i64>()
                .map_err(|_| ApiError::bad_request("cursor is not one this API gave out"))?,
        ),
    };
    let filter = LicenseFilter {
        status: q.status.filter(|s| !s.is_empty()),
        plan: q.plan.filter(|s| !s.is_empty()),
        search: text("q", q.q, MAX_TEXT)?,
        before,
        limit,
    };
    let (rows, next) = st.app.store.licenses(filter).await?;
    let items: Vec<Value> = rows.iter().map(|l| license_json(&st, l)).collect();
    Ok(Json(serde_json::json!({
        "licenses": items,
        "next_cursor": next.map(|n| n.to_string()),
    })))
}

async fn show(
    _: Operator,
    State(st): State<AdminState>,
    LicenseId(id): LicenseId,
) -> ApiResult<Json<Value>> {
    let l = st.app.store.license(id).await?;
    Ok(Json(license_json(&st, &l)))
}

/// A PATCH body: only the fields present change; `null` clears email, company and expires_at.
fn parse_patch(st: &AdminState, body: Map<String, Value>) -> ApiResult<LicensePatch> {
    let mut p = LicensePatch::default();
    let string = |k: &str, v: &Value| -> ApiResult<String> {
        v.as_str()
            .map(str::to_string)
            .ok_or_else(|| ApiError::bad_request(format!("{k} must be a string")))
    };
    let nullable = |k: &str, v: &Value| -> ApiResult<Option<String>> {
        if v.is_null() {
            Ok(None)
        } else {
            string(k, v).map(Some)
        }
    };
    if body.is_empty() {
        return Err(ApiError::bad_request("nothing to change"));
    }
    for (k, v) in &body {
        match k.as_str() {
            "name" => {
                p.name = Some(
                    text("name", Some(string(k, v)?), MAX_TEXT)?
                        .ok_or_else(|| ApiError::bad_request("name must not be empty"))?,
                )
            }
            "email" => p.email = Some(email(nullable(k, v)?)?),
            "company" => p.company = Some(text("company", nullable(k, v)?, MAX_TEXT)?),
            "plan" => p.plan = Some(plan(st, &string(k, v)?)?),
            "expires_at" => {
                let now = st.app.ledger.now_ms();
                p.expires_at = Some(
                    nullable(k, v)?
                        .as_deref()
                        .map(|v| expiry(v, now))
                        .transpose()?,
                )
            }
            "status" => {
                p.status = Some(
                    LicenseStatus::parse(&string(k, v)?)
                        .ok_or_else(|| ApiError::bad_request("status must be active or revoked"))?,
                )
            }
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown field {other:?}; the fields are name, email, company, plan, \
                     expires_at, status"
                )))
            }
        }
    }
    Ok(p)
}

async fn patch(
    _: Operator,
    State(st): State<AdminState>,
    LicenseId(id): LicenseId,
    ApiJson(body): ApiJson<Map<String, Value>>,
) -> ApiResult<Json<Value>> {
    let p = parse_patch(&st, body)?;
    let now = st.app.ledger.now_ms();
    let l = st.app.store.update_license(id, p, now).await?;
    applied(&st, &l);
    Ok(Json(license_json(&st, &l)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdjustBody {
    pub hours: f64,
    pub reason: Option<String>,
}

async fn adjust(st: AdminState, id: i64, how: Adjustment, b: AdjustBody) -> ApiResult<Json<Value>> {
    let l = adjust_balance(&st, id, how, b).await?;
    Ok(Json(license_json(&st, &l)))
}

/// Adds or deducts hours (the API and the console), in one transaction with its history row.
pub async fn adjust_balance(
    st: &AdminState,
    id: i64,
    how: Adjustment,
    b: AdjustBody,
) -> ApiResult<License> {
    let ms = hours_ms(b.hours, false)?;
    let reason = text("reason", b.reason, MAX_REASON)?;
    let now = st.app.ledger.now_ms();
    let l = st
        .app
        .store
        .adjust_balance(id, how, ms, reason, now)
        .await?;
    applied(st, &l);
    if how == Adjustment::Credit {
        gateway::metrics::CREDITED_SECONDS.inc_by(ms as f64 / 1_000.0);
    }
    tracing::info!(license = id, ms, kind = ?how, "admin: balance changed");
    Ok(l)
}

async fn add_hours(
    _: Operator,
    State(st): State<AdminState>,
    LicenseId(id): LicenseId,
    ApiJson(b): ApiJson<AdjustBody>,
) -> ApiResult<Json<Value>> {
    adjust(st, id, Adjustment::Credit, b).await
}

async fn deduct(
    _: Operator,
    State(st): State<AdminState>,
    LicenseId(id): LicenseId,
    ApiJson(b): ApiJson<AdjustBody>,
) -> ApiResult<Json<Value>> {
    adjust(st, id, Adjustment::Debit, b).await
}

async fn revoke(
    _: Operator,
    State(st): State<AdminState>,
    LicenseId(id): LicenseId,
) -> ApiResult<Json<Value>> {
    let l = revoke_license(&st, id).await?;
    Ok(Json(license_json(&st, &l)))
}

/// Revokes a license; the proxy refuses its key from the next request.
pub async fn revoke_license(st: &AdminState, id: i64) -> ApiResult<License> {
    let now = st.app.ledger.now_ms();
    let l = st.app.store.revoke(id, now).await?;
    applied(st, &l);
    tracing::info!(license = id, "admin: license revoked");
    Ok(l)
}

async fn rotate(
    _: Operator,
    State(st): State<AdminState>,
    LicenseId(id): LicenseId,
) -> ApiResult<Json<Value>> {
    let (l, key) = rotate_key(&st, id).await?;
    let mut v = license_json(&st, &l);
    v["license_key"] = key.into();
    Ok(Json(v))
}

/// Gives a license a new key (shown once); the old one stops working at once.
pub async fn rotate_key(st: &AdminState, id: i64) -> ApiResult<(License, String)> {
    let now = st.app.ledger.now_ms();
    let (l, key) = st.app.store.rotate(id, now).await?;
    applied(st, &l);
    st.app.ledger.forget_unknown(&l.key_hash);
    tracing::info!(license = id, "admin: key rotated");
    Ok((l, key))
}

#[derive(Deserialize)]
pub struct HistoryQuery {
    #[serde(rename = "type")]
    pub kind: Option<String>,
    pub limit: Option<u32>,
    pub before: Option<i64>,
}

/// Reads a history page for `license_id` after checking the query.
pub async fn history_page(
    st: &AdminState,
    license_id: i64,
    q: HistoryQuery,
) -> ApiResult<Json<Value>> {
    let kind_name = q.kind.unwrap_or_else(|| "all".into());
    let kind = HistoryKind::parse(&kind_name).ok_or_else(|| {
        ApiError::bad_request("type must be one of all, usage, payments, sessions")
    })?;
    let limit = q.limit.unwrap_or(50);
    if !(1..=500).contains(&limit) {
        return Err(ApiError::bad_request("limit must be between 1 and 500"));
    }
    let page = st
        .app
        .store
        .history(license_id, kind, limit, q.before)
        .await?;
    Ok(Json(serde_json::json!({
        "license_id": license_id,
        "type": kind_name,
        "items": page.items.iter().map(views::history_item).collect::<Vec<_>>(),
        "next_before": page.next_before,
    })))
}

async fn history(
    _: Operator,
    State(st): State<AdminState>,
    LicenseId(id): LicenseId,
    ApiQuery(q): ApiQuery<HistoryQuery>,
) -> ApiResult<Json<Value>> {
    history_page(&st, id, q).await
}
