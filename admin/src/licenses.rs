//! The operator's licenses API (`/api/licenses…`, bearer admin token). Every change is one store
//! transaction with its history row, then applied to the proxy's ledger at once, so a credit or
//! a revocation takes effect on the next proxied request.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use gateway::config::checked_hours_ms;
use gateway::license::LicenseStatus;
use gateway::store::{Adjustment, HistoryKind, License, LicenseFilter, LicensePatch, NewLicense};
use gateway::timefmt;
use serde::{Deserialize, Deserializer};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::Operator;
use crate::error::{ApiError, ApiJson, ApiQuery, ApiResult, LicenseId};
use crate::views::{HistoryItemView, HistoryPage, HistoryType, LicenseList, LicenseView};
use crate::views::{LicenseWithKey, Status};
use crate::AdminState;

pub fn routes() -> OpenApiRouter<AdminState> {
    OpenApiRouter::new()
        .routes(routes!(create, list))
        .routes(routes!(show, patch))
        .routes(routes!(add_hours))
        .routes(routes!(deduct))
        .routes(routes!(correct_units))
        .routes(routes!(revoke))
        .routes(routes!(rotate))
        .routes(routes!(history))
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

/// The license as the API shows it, with the balance the proxy sees now: the stored balance
/// less usage metered and not yet flushed.
pub fn license_view(st: &AdminState, l: &License) -> LicenseView {
    LicenseView::new(l, live_remaining_ms(st, l), &st.app.config.balance_unit)
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
    // PostgreSQL's text cannot hold a NUL (SQLite's can): refused alike on both stores
    if v.as_ref().is_some_and(|s| s.contains('\0')) {
        return Err(ApiError::bad_request(format!(
            "{field} must not contain a NUL character"
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

/// A new license.
#[derive(Deserialize, Default, ToSchema)]
#[schema(example = json!({"name": "Ada Lovelace", "email": "ada@example.com", "hours": 10,
    "plan": "free"}))]
#[serde(deny_unknown_fields)]
pub struct CreateBody {
    /// Who the license is for (trimmed; not empty).
    #[schema(min_length = 1, max_length = 200)]
    pub name: String,
    #[schema(max_length = 254)]
    pub email: Option<String>,
    #[schema(max_length = 200)]
    pub company: Option<String>,
    /// Prepaid hours to start with (default 0); kept as whole milliseconds.
    #[schema(minimum = 0, maximum = 1_000_000)]
    pub hours: Option<f64>,
    /// One of the configured plans (default `free`).
    #[schema(min_length = 1)]
    pub plan: Option<String>,
    /// When the key stops working: an RFC 3339 time (`2025-12-31T23:59:59Z`) or a date
    /// (`2025-12-31`, its start in UTC), in the future.
    pub expires_at: Option<String>,
}

/// Creates a license and its key. The key is in this answer only: store it now.
#[utoipa::path(
    post, path = "/api/licenses", operation_id = "create_license", tag = "licenses",
    security(("admin_token" = [])),
    request_body = CreateBody,
    responses((status = 201, description = "The license, with its key", body = LicenseWithKey)),
    extensions(("x-errors" = json!(["bad_request", "unauthorized", "rate_limited",
        "payload_too_large", "internal_error"]))),
)]
async fn create(
    _: Operator,
    State(st): State<AdminState>,
    ApiJson(b): ApiJson<CreateBody>,
) -> ApiResult<(StatusCode, Json<LicenseWithKey>)> {
    let (license, key) = create_license(&st, b).await?;
    let license = license_view(&st, &license);
    let created = LicenseWithKey {
        license,
        license_key: key,
    };
    Ok((StatusCode::CREATED, Json(created)))
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

/// A list's status filter; empty (as a form sends it) means any.
#[derive(Deserialize, ToSchema, Clone, Copy)]
#[serde(rename_all = "lowercase")]
enum StatusFilter {
    Active,
    Revoked,
    #[serde(rename = "")]
    Any,
}

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
struct ListQuery {
    /// Only licenses in this state (empty: any).
    #[param(inline)]
    status: Option<StatusFilter>,
    /// Only licenses on this plan.
    plan: Option<String>,
    /// Licenses whose name, email, company or key prefix contains this.
    #[param(max_length = 200)]
    q: Option<String>,
    /// Licenses per page (default 50).
    #[param(minimum = 1, maximum = 500)]
    limit: Option<u32>,
    /// The `next_cursor` of the page before.
    cursor: Option<String>,
}

/// Lists licenses, newest first, a page at a time.
#[utoipa::path(
    get, path = "/api/licenses", operation_id = "list_licenses", tag = "licenses",
    security(("admin_token" = [])),
    params(ListQuery),
    responses((status = 200, description = "A page of licenses", body = LicenseList)),
    extensions(("x-errors" = json!(["bad_request", "unauthorized", "rate_limited",
        "internal_error"]))),
)]
async fn list(
    _: Operator,
    State(st): State<AdminState>,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> ApiResult<Json<LicenseList>> {
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
    let status = match q.status {
        None | Some(StatusFilter::Any) => None,
        Some(StatusFilter::Active) => Some(LicenseStatus::Active.as_str().to_string()),
        Some(StatusFilter::Revoked) => Some(LicenseStatus::Revoked.as_str().to_string()),
    };
    let filter = LicenseFilter {
        status,
        plan: q.plan.filter(|s| !s.is_empty()),
        search: text("q", q.q, MAX_TEXT)?,
        before,
        limit,
    };
    let (rows, next) = st.app.store.licenses(filter).await?;
    let licenses = rows.iter().map(|l| license_view(&st, l)).collect();
    Ok(Json(LicenseList {
        licenses,
        next_cursor: next.map(|n| n.to_string()),
    }))
}

/// Shows a license, with the balance the proxy sees now.
#[utoipa::path(
    get, path = "/api/licenses/{id}", operation_id = "get_license", tag = "licenses",
    security(("admin_token" = [])),
    params(LicenseId),
    responses((status = 200, description = "The license", body = LicenseView)),
    extensions(("x-errors" = json!(["not_found", "unauthorized", "rate_limited",
        "internal_error"]))),
)]
async fn show(
    _: Operator,
    State(st): State<AdminState>,
    LicenseId(id): LicenseId,
) -> ApiResult<Json<LicenseView>> {
    let l = st.app.store.license(id).await?;
    Ok(Json(license_view(&st, &l)))
}

/// A field that, when present, is `Some` even when it is `null` (a PATCH's "clear this").
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

/// A change to a license: only the fields present change; `null` clears email, company and
/// expires_at.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(min_properties = 1, example = json!({"plan": "free", "expires_at": null}))]
pub struct PatchBody {
    // name, plan and status cannot be cleared: `null` is refused, not taken as absent
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = String, required = false, min_length = 1, max_length = 200)]
    name: Option<String>,
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<String>, max_length = 254)]
    email: Option<Option<String>>,
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<String>, max_length = 200)]
    company: Option<Option<String>>,
    /// One of the configured plans.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = String, required = false, min_length = 1)]
    plan: Option<String>,
    /// As for a new license; `null` for no expiry.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<String>)]
    expires_at: Option<Option<String>>,
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Status, required = false)]
    status: Option<Status>,
}

fn parse_patch(st: &AdminState, b: PatchBody) -> ApiResult<LicensePatch> {
    let now = st.app.ledger.now_ms();
    let p = LicensePatch {
        name: match b.name {
            None => None,
            Some(n) => Some(
                text("name", Some(n), MAX_TEXT)?
                    .ok_or_else(|| ApiError::bad_request("name must not be empty"))?,
            ),
        },
        email: b.email.map(email).transpose()?,
        company: b
            .company
            .map(|c| text("company", c, MAX_TEXT))
            .transpose()?,
        plan: b.plan.map(|p| plan(st, &p)).transpose()?,
        expires_at: b
            .expires_at
            .map(|e| e.as_deref().map(|v| expiry(v, now)).transpose())
            .transpose()?,
        status: b.status.map(|s| match s {
            Status::Active => LicenseStatus::Active,
            Status::Revoked => LicenseStatus::Revoked,
        }),
    };
    if p == LicensePatch::default() {
        return Err(ApiError::bad_request("nothing to change"));
    }
    Ok(p)
}

/// Changes a license's details, plan, expiry or status.
#[utoipa::path(
    patch, path = "/api/licenses/{id}", operation_id = "update_license", tag = "licenses",
    security(("admin_token" = [])),
    params(LicenseId),
    request_body = PatchBody,
    responses((status = 200, description = "The license, changed", body = LicenseView)),
    extensions(("x-errors" = json!(["bad_request", "not_found", "unauthorized",
        "rate_limited", "payload_too_large", "internal_error"]))),
)]
async fn patch(
    _: Operator,
    State(st): State<AdminState>,
    LicenseId(id): LicenseId,
    ApiJson(body): ApiJson<PatchBody>,
) -> ApiResult<Json<LicenseView>> {
    let p = parse_patch(&st, body)?;
    let now = st.app.ledger.now_ms();
    let l = st.app.store.update_license(id, p, now).await?;
    applied(&st, &l);
    Ok(Json(license_view(&st, &l)))
}

/// Hours to add or take off, with why.
#[derive(Deserialize, ToSchema)]
#[schema(example = json!({"hours": 2.5, "reason": "goodwill credit"}))]
#[serde(deny_unknown_fields)]
pub struct AdjustBody {
    /// More than zero; kept as whole milliseconds.
    #[schema(exclusive_minimum = 0, maximum = 1_000_000)]
    pub hours: f64,
    /// Kept in the history beside the change.
    #[schema(max_length = 500)]
    pub reason: Option<String>,
    /// A debit only: take the balance below zero if the debit is larger than it (refused
    /// with 402 `insufficient_balance` otherwise).
    #[serde(default)]
    pub allow_overdraft: bool,
}

async fn adjust(
    st: AdminState,
    id: i64,
    how: Adjustment,
    b: AdjustBody,
) -> ApiResult<Json<LicenseView>> {
    let l = adjust_balance(&st, id, how, b).await?;
    Ok(Json(license_view(&st, &l)))
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
    let how = match how {
        Adjustment::Debit if b.allow_overdraft => Adjustment::DebitPastZero,
        Adjustment::Credit if b.allow_overdraft => {
            return Err(ApiError::bad_request(
                "allow_overdraft is for debits (POST /api/licenses/{id}/usage)",
            ))
        }
        how => how,
    };
    if how == Adjustment::Debit {
        // what this node metered and has not written yet is spent too: the store checks
        // the balance it holds, this what is left of it here
        let l = st.app.store.license(id).await?;
        how.delta(ms, live_remaining_ms(st, &l))?;
    }
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

/// Adds hours to a license's balance, in one transaction with its history row.
#[utoipa::path(
    post, path = "/api/licenses/{id}/hours", operation_id = "add_hours", tag = "licenses",
    security(("admin_token" = [])),
    params(LicenseId),
    request_body = AdjustBody,
    responses((status = 200, description = "The license, credited", body = LicenseView)),
    extensions(("x-errors" = json!(["bad_request", "not_found", "unauthorized",
        "rate_limited", "payload_too_large", "internal_error"]))),
)]
async fn add_hours(
    _: Operator,
    State(st): State<AdminState>,
    LicenseId(id): LicenseId,
    ApiJson(b): ApiJson<AdjustBody>,
) -> ApiResult<Json<LicenseView>> {
    adjust(st, id, Adjustment::Credit, b).await
}

/// Takes hours off a license's balance, with its history row: a correction made by hand. It
/// counts against the balance only (not as time used, not in the plan's period allowances,
/// not in the daily usage); the statistics show it as `hours_debited`. A debit larger than the
/// balance is refused (402 `insufficient_balance`) unless `allow_overdraft` is true.
#[utoipa::path(
    post, path = "/api/licenses/{id}/usage", operation_id = "deduct_hours", tag = "licenses",
    security(("admin_token" = [])),
    params(LicenseId),
    request_body = AdjustBody,
    responses((status = 200, description = "The license, debited", body = LicenseView)),
    extensions(("x-errors" = json!(["bad_request", "insufficient_balance", "not_found",
        "unauthorized", "rate_limited", "payload_too_large", "internal_error"]))),
)]
async fn deduct(
    _: Operator,
    State(st): State<AdminState>,
    LicenseId(id): LicenseId,
    ApiJson(b): ApiJson<AdjustBody>,
) -> ApiResult<Json<LicenseView>> {
    adjust(st, id, Adjustment::Debit, b).await
}

/// An operator's correction of a meter's units.
#[derive(Deserialize, ToSchema)]
#[schema(example = json!({"meter": "audio_seconds", "units": -120, "reason": "the app counted a file twice"}))]
#[serde(deny_unknown_fields)]
pub struct UnitsBody {
    /// A configured meter (`[[meters]]`).
    pub meter: String,
    /// Units to add (charged at the meter's price) or, negative, to give back (the balance
    /// gets their price back, and the period's allowance their room); not zero.
    #[schema(minimum = -1_000_000_000, maximum = 1_000_000_000)]
    pub units: i64,
    /// Kept in the history beside the change.
    #[schema(max_length = 500)]
    pub reason: Option<String>,
}

/// Corrects a meter's units (as hours are corrected): the units are added or given back in
/// the period's count, and their price taken from or given back to the balance, in one
/// transaction with a history row (a debit or credit, its `priced_ms` the price) and a
/// `usage_units` row. Charging more may take the balance below zero: it is usage.
#[utoipa::path(
    post, path = "/api/licenses/{id}/units", operation_id = "correct_units", tag = "licenses",
    security(("admin_token" = [])),
    params(LicenseId),
    request_body = UnitsBody,
    responses((status = 200, description = "The license, corrected", body = LicenseView)),
    extensions(("x-errors" = json!(["bad_request", "not_found", "unauthorized",
        "rate_limited", "payload_too_large", "internal_error"]))),
)]
async fn correct_units(
    _: Operator,
    State(st): State<AdminState>,
    LicenseId(id): LicenseId,
    ApiJson(b): ApiJson<UnitsBody>,
) -> ApiResult<Json<LicenseView>> {
    let meters = &st.app.config.meters;
    let Some(i) = meters.iter().position(|m| m.name == b.meter) else {
        let names: Vec<&str> = meters.iter().map(|m| m.name.as_str()).collect();
        return Err(ApiError::bad_request(format!(
            "meter must be one of the configured meters ({})",
            if names.is_empty() {
                "none".to_string()
            } else {
                names.join(", ")
            }
        )));
    };
    if b.units == 0 || b.units.abs() > 1_000_000_000 {
        return Err(ApiError::bad_request(
            "units must be a whole number between -1000000000 and 1000000000, not 0",
        ));
    }
    let reason = text("reason", b.reason, MAX_REASON)?;
    let fix = gateway::store::UnitsFix {
        meter: b.meter,
        units: b.units,
        // within i64: a billion units at a day's price each
        charged_ms: b.units * meters[i].price_ms,
        reason,
    };
    let now = st.app.ledger.now_ms();
    let units = fix.units;
    let l = st.app.store.correct_units(id, fix, now).await?;
    applied(&st, &l);
    st.app.ledger.correct_units(id, i, units);
    tracing::info!(
        license = id,
        meter = meters[i].name,
        units,
        "admin: units corrected"
    );
    Ok(Json(license_view(&st, &l)))
}

/// Revokes a license: the proxy refuses its key from the next request.
#[utoipa::path(
    post, path = "/api/licenses/{id}/revoke", operation_id = "revoke_license", tag = "licenses",
    security(("admin_token" = [])),
    params(LicenseId),
    responses((status = 200, description = "The license, revoked", body = LicenseView)),
    extensions(("x-errors" = json!(["not_found", "unauthorized", "rate_limited",
        "internal_error"]))),
)]
async fn revoke(
    _: Operator,
    State(st): State<AdminState>,
    LicenseId(id): LicenseId,
) -> ApiResult<Json<LicenseView>> {
    let l = revoke_license(&st, id).await?;
    Ok(Json(license_view(&st, &l)))
}

/// Revokes a license; the proxy refuses its key from the next request.
pub async fn revoke_license(st: &AdminState, id: i64) -> ApiResult<License> {
    let now = st.app.ledger.now_ms();
    let l = st.app.store.revoke(id, now).await?;
    applied(st, &l);
    tracing::info!(license = id, "admin: license revoked");
    Ok(l)
}

/// Gives a license a new key, shown in this answer only; the old key stops working at once.
#[utoipa::path(
    post, path = "/api/licenses/{id}/rotate", operation_id = "rotate_key", tag = "licenses",
    security(("admin_token" = [])),
    params(LicenseId),
    responses((status = 200, description = "The license, with its new key", body = LicenseWithKey)),
    extensions(("x-errors" = json!(["not_found", "unauthorized", "rate_limited",
        "internal_error"]))),
)]
async fn rotate(
    _: Operator,
    State(st): State<AdminState>,
    LicenseId(id): LicenseId,
) -> ApiResult<Json<LicenseWithKey>> {
    let (l, key) = rotate_key(&st, id).await?;
    let license = license_view(&st, &l);
    Ok(Json(LicenseWithKey {
        license,
        license_key: key,
    }))
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

#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct HistoryQuery {
    /// Which entries (default `all`).
    #[serde(rename = "type")]
    #[param(rename = "type", inline)]
    pub kind: Option<HistoryType>,
    /// Entries per page (default 50).
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<u32>,
    /// The `next_before` of the page before.
    pub before: Option<i64>,
}

/// Reads a history page for `license_id` after checking the query.
pub async fn history_page(
    st: &AdminState,
    license_id: i64,
    q: HistoryQuery,
) -> ApiResult<Json<HistoryPage>> {
    let shown = q.kind.unwrap_or(HistoryType::All);
    let kind = match shown {
        HistoryType::All => HistoryKind::All,
        HistoryType::Usage => HistoryKind::Usage,
        HistoryType::Payments => HistoryKind::Payments,
        HistoryType::Sessions => HistoryKind::Sessions,
    };
    let limit = q.limit.unwrap_or(50);
    if !(1..=500).contains(&limit) {
        return Err(ApiError::bad_request("limit must be between 1 and 500"));
    }
    let page = st
        .app
        .store
        .history(license_id, kind, limit, q.before)
        .await?;
    Ok(Json(HistoryPage {
        license_id,
        kind: shown,
        items: page.items.iter().map(HistoryItemView::from).collect(),
        next_before: page.next_before,
    }))
}

/// A license's history: balance changes, payments and sessions, newest first.
#[utoipa::path(
    get, path = "/api/licenses/{id}/history", operation_id = "license_history", tag = "licenses",
    security(("admin_token" = [])),
    params(LicenseId, HistoryQuery),
    responses((status = 200, description = "A page of history", body = HistoryPage)),
    extensions(("x-errors" = json!(["bad_request", "not_found", "unauthorized",
        "rate_limited", "internal_error"]))),
)]
async fn history(
    _: Operator,
    State(st): State<AdminState>,
    LicenseId(id): LicenseId,
    ApiQuery(q): ApiQuery<HistoryQuery>,
) -> ApiResult<Json<HistoryPage>> {
    history_page(&st, id, q).await
}
