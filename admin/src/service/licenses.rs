//! Licenses: every change checked, written in one store transaction with its history row, and
//! told to the proxy's ledger, whoever asks (the API, the console, the CLI).

use gateway::config::checked_hours_ms;
use gateway::errors::ErrorCode;
use gateway::license::LicenseStatus;
use gateway::store::{
    Adjustment, HistoryKind, KeyLimits, KeyTerms, License, LicenseFilter, LicenseKey, LicensePatch,
    NewLicense, UnitsFix,
};
use gateway::timefmt;
use serde::{Deserialize, Deserializer};
use utoipa::{IntoParams, ToSchema};

use super::Service;
use crate::error::{ApiError, ApiResult};
use crate::views::{HistoryItemView, HistoryPage, HistoryType, Status};

const MAX_TEXT: usize = 200;
const MAX_REASON: usize = 500;

/// Hours from a person as whole milliseconds (see [`checked_hours_ms`]), positive unless
/// `zero_ok`.
pub fn hours_ms(hours: f64, zero_ok: bool) -> ApiResult<i64> {
    let ms = checked_hours_ms(hours).map_err(|m| ApiError::invalid("hours", m))?;
    if ms == 0 && !zero_ok {
        return Err(ApiError::invalid("hours", "hours must be more than zero"));
    }
    Ok(ms)
}

fn text(field: &'static str, v: Option<String>, max: usize) -> ApiResult<Option<String>> {
    let v = v.map(|s| s.trim().to_string()).filter(|s| !s.is_empty());
    if v.as_ref().is_some_and(|s| s.chars().count() > max) {
        return Err(ApiError::invalid(
            field,
            format!("{field} must be at most {max} characters"),
        ));
    }
    // PostgreSQL's text cannot hold a NUL (SQLite's can): refused alike on both stores
    if v.as_ref().is_some_and(|s| s.contains('\0')) {
        return Err(ApiError::invalid(
            field,
            format!("{field} must not contain a NUL character"),
        ));
    }
    Ok(v)
}

fn name(v: String) -> ApiResult<String> {
    text("name", Some(v), MAX_TEXT)?
        .ok_or_else(|| ApiError::invalid("name", "name must not be empty"))
}

fn email(v: Option<String>) -> ApiResult<Option<String>> {
    let v = text("email", v, 254)?;
    if let Some(e) = &v {
        let valid = e
            .split_once('@')
            .is_some_and(|(user, host)| !user.is_empty() && host.contains('.'))
            && !e.contains(char::is_whitespace);
        if !valid {
            return Err(ApiError::invalid("email", "email is not an email address"));
        }
    }
    Ok(v)
}

fn plan(svc: &Service<'_>, name: &str) -> ApiResult<String> {
    let config = svc.config();
    if config.plan(name).is_none() {
        let known: Vec<&str> = config.plans.iter().map(|p| p.name.as_str()).collect();
        return Err(ApiError::invalid(
            "plan",
            format!("no plan named {name:?}; the plans are {}", known.join(", ")),
        ));
    }
    Ok(name.to_string())
}

/// An expiry time, which must lie ahead: a license that is born expired would be listed as
/// active and refuse every request (to end a license now, revoke it).
fn expiry(v: &str, now: i64) -> ApiResult<i64> {
    let at = timefmt::parse_rfc3339(v).ok_or_else(|| {
        ApiError::invalid(
            "expires_at",
            "expires_at must be an RFC 3339 time (2025-12-31T23:59:59Z) or a date (2025-12-31)",
        )
    })?;
    if at <= now {
        return Err(ApiError::invalid(
            "expires_at",
            format!(
                "expires_at must be in the future ({v} has passed); to end a license now, \
                 revoke it"
            ),
        ));
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

/// Creates a license and its key: the license, and the key to show once.
pub async fn create(svc: &Service<'_>, b: CreateBody) -> ApiResult<(License, String)> {
    let now = svc.now();
    let new = NewLicense {
        name: name(b.name)?,
        email: email(b.email)?,
        company: text("company", b.company, MAX_TEXT)?,
        plan: plan(svc, b.plan.as_deref().unwrap_or("free"))?,
        balance_ms: hours_ms(b.hours.unwrap_or(0.0), true)?,
        expires_at: b
            .expires_at
            .as_deref()
            .map(|v| expiry(v, now))
            .transpose()?,
    };
    let (license, key) = svc.licenses.create_license(new, now).await?;
    svc.key_issued(&license);
    if license.balance_ms > 0 {
        gateway::metrics::CREDITED_SECONDS.inc_by(license.balance_ms as f64 / 1_000.0);
    }
    tracing::info!(license = license.id, "admin: license created");
    Ok((license, key))
}

/// A list's status filter; empty (as a form sends it) means any.
#[derive(Deserialize, ToSchema, Clone, Copy)]
#[serde(rename_all = "lowercase")]
pub enum StatusFilter {
    Active,
    Revoked,
    #[serde(rename = "")]
    Any,
}

#[derive(Deserialize, IntoParams, Default)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// Only licenses in this state (empty: any).
    #[param(inline)]
    pub status: Option<StatusFilter>,
    /// Only licenses on this plan.
    pub plan: Option<String>,
    /// Licenses whose name, email, company or key prefix contains this.
    #[param(max_length = 200)]
    pub q: Option<String>,
    /// Licenses per page (default 50).
    #[param(minimum = 1, maximum = 500)]
    pub limit: Option<u32>,
    /// The `next_cursor` of the page before.
    pub cursor: Option<String>,
}

fn page_limit(limit: Option<u32>) -> ApiResult<u32> {
    let limit = limit.unwrap_or(50);
    if !(1..=500).contains(&limit) {
        return Err(ApiError::invalid(
            "limit",
            "limit must be between 1 and 500",
        ));
    }
    Ok(limit)
}

/// A page of licenses, newest first, and the cursor of the next page.
pub async fn list(svc: &Service<'_>, q: ListQuery) -> ApiResult<(Vec<License>, Option<i64>)> {
    let limit = page_limit(q.limit)?;
    let before = match q.cursor.as_deref().filter(|c| !c.is_empty()) {
        None => None,
        Some(c) => Some(
            c.parse::<i64>()
                .map_err(|_| ApiError::invalid("cursor", "cursor is not one this API gave out"))?,
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
    search(svc, filter).await
}

/// A page of the licenses a filter selects (the console builds its filter from its form).
pub async fn search(
    svc: &Service<'_>,
    filter: LicenseFilter,
) -> ApiResult<(Vec<License>, Option<i64>)> {
    Ok(svc.licenses.licenses(filter).await?)
}

/// A field that, when present, is `Some` even when it is `null` (a PATCH's "clear this").
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

/// A change to a license: only the fields present change; `null` clears email, company and
/// expires_at.
#[derive(Deserialize, ToSchema, Default)]
#[serde(deny_unknown_fields)]
#[schema(min_properties = 1, example = json!({"plan": "free", "expires_at": null}))]
pub struct PatchBody {
    // name, plan and status cannot be cleared: `null` is refused, not taken as absent
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = String, required = false, min_length = 1, max_length = 200)]
    pub name: Option<String>,
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<String>, max_length = 254)]
    pub email: Option<Option<String>>,
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<String>, max_length = 200)]
    pub company: Option<Option<String>>,
    /// One of the configured plans.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = String, required = false, min_length = 1)]
    pub plan: Option<String>,
    /// As for a new license; `null` for no expiry.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<String>)]
    pub expires_at: Option<Option<String>>,
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Status, required = false)]
    pub status: Option<Status>,
}

/// Changes a license's details, plan, expiry or status.
pub async fn update(svc: &Service<'_>, id: i64, b: PatchBody) -> ApiResult<License> {
    let now = svc.now();
    let p = LicensePatch {
        name: b.name.map(name).transpose()?,
        email: b.email.map(email).transpose()?,
        company: b
            .company
            .map(|c| text("company", c, MAX_TEXT))
            .transpose()?,
        plan: b.plan.map(|p| plan(svc, &p)).transpose()?,
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
    let l = svc.licenses.update_license(id, p, now).await?;
    svc.applied(&l);
    Ok(l)
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

/// Adds or deducts hours, in one transaction with its history row.
pub async fn adjust(
    svc: &Service<'_>,
    id: i64,
    how: Adjustment,
    b: AdjustBody,
) -> ApiResult<License> {
    let ms = hours_ms(b.hours, false)?;
    let reason = text("reason", b.reason, MAX_REASON)?;
    let how = match how {
        Adjustment::Debit if b.allow_overdraft => Adjustment::DebitPastZero,
        Adjustment::Credit if b.allow_overdraft => {
            return Err(ApiError::invalid(
                "allow_overdraft",
                "allow_overdraft is for debits (POST /api/licenses/{id}/usage)",
            ))
        }
        how => how,
    };
    if how == Adjustment::Debit {
        // what this node metered and has not written yet is spent too: the store checks
        // the balance it holds, this what is left of it here
        let l = svc.licenses.license(id).await?;
        how.delta(ms, svc.settled_remaining_ms(&l, super::ON_VIEW).await)?;
    }
    let l = svc
        .licenses
        .adjust_balance(id, how, ms, reason, svc.now())
        .await?;
    svc.applied(&l);
    if how == Adjustment::Credit {
        gateway::metrics::CREDITED_SECONDS.inc_by(ms as f64 / 1_000.0);
    }
    tracing::info!(license = id, ms, kind = ?how, "admin: balance changed");
    Ok(l)
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

/// Corrects a meter's units: added or given back in the period's count, their price taken
/// from or given back to the balance, in one transaction with a history row and a
/// `usage_units` row.
pub async fn correct_units(svc: &Service<'_>, id: i64, b: UnitsBody) -> ApiResult<License> {
    let meters = &svc.config().meters;
    let Some(i) = meters.iter().position(|m| m.name == b.meter) else {
        let names: Vec<&str> = meters.iter().map(|m| m.name.as_str()).collect();
        return Err(ApiError::invalid(
            "meter",
            format!(
                "meter must be one of the configured meters ({})",
                if names.is_empty() {
                    "none".to_string()
                } else {
                    names.join(", ")
                }
            ),
        ));
    };
    if b.units == 0 || b.units.abs() > 1_000_000_000 {
        return Err(ApiError::invalid(
            "units",
            "units must be a whole number between -1000000000 and 1000000000, not 0",
        ));
    }
    let reason = text("reason", b.reason, MAX_REASON)?;
    // a plan that includes the meter's units: split against the period's use, by the store
    let l = svc.licenses.license(id).await?;
    let config = svc.config();
    let included = config
        .plan(&l.plan)
        .map_or(0, |p| p.included_units[i])
        .max(0);
    let fix = UnitsFix {
        meter: b.meter,
        units: b.units,
        // within i64: a billion units at a day's price each
        charged_ms: b.units * meters[i].price_ms,
        reason,
        included: (included > 0).then(|| gateway::store::FixIncluded {
            period_start: config
                .metering
                .calendar
                .period(l.period_anchor, svc.now())
                .0,
            units: included,
            price_ms: meters[i].price_ms,
        }),
        included_units: 0,
    };
    let units = fix.units;
    let l = svc.licenses.correct_units(id, fix, svc.now()).await?;
    svc.applied(&l);
    if let Some(ledger) = svc.ledger {
        ledger.correct_units(id, i, units);
    }
    tracing::info!(
        license = id,
        meter = meters[i].name,
        units,
        "admin: units corrected"
    );
    Ok(l)
}

/// Revokes a license; the proxy refuses its key from the next request.
pub async fn revoke(svc: &Service<'_>, id: i64) -> ApiResult<License> {
    let l = svc.licenses.revoke(id, svc.now()).await?;
    svc.applied(&l);
    tracing::info!(license = id, "admin: license revoked");
    Ok(l)
}

/// Gives a license a new key (shown once); the old one stops working at once.
pub async fn rotate(svc: &Service<'_>, id: i64) -> ApiResult<(License, String)> {
    let (l, key) = svc.licenses.rotate(id, svc.now()).await?;
    svc.applied(&l);
    svc.key_issued(&l);
    tracing::info!(license = id, "admin: key rotated");
    Ok((l, key))
}

/// A new key for a license.
#[derive(Deserialize, Default, ToSchema)]
#[schema(example = json!({"name": "ci", "expires_at": "2030-01-01",
    "limits": {"requests_per_second": 5, "max_concurrent": 2, "max_seconds_per_day": 3600}}))]
#[serde(deny_unknown_fields)]
pub struct KeyBody {
    /// What the key is for: a developer, an environment, a machine (trimmed; not empty).
    #[schema(min_length = 1, max_length = 100)]
    pub name: String,
    /// When the key stops working (its license and other keys work on): an RFC 3339 time or
    /// a date, in the future.
    pub expires_at: Option<String>,
    /// The key's own limits, checked beside its license's plan.
    pub limits: Option<KeyLimitsBody>,
}

/// A key's own limits: each bounds the key alone, beside its license's plan (which still
/// holds); none gives it more than the plan does. Left out: no limit of the key's own.
#[derive(Deserialize, Default, ToSchema, Clone, Copy)]
#[serde(deny_unknown_fields)]
pub struct KeyLimitsBody {
    /// Requests a second (a burst of as many, then that rate).
    #[schema(minimum = 1, maximum = 1_000_000)]
    pub requests_per_second: Option<u32>,
    /// Requests of the key in flight at once.
    #[schema(minimum = 1, maximum = 1_000_000)]
    pub max_concurrent: Option<u32>,
    /// Request time the key may use in a UTC day, in seconds.
    #[schema(minimum = 1, maximum = 86_400_000)]
    pub max_seconds_per_day: Option<i64>,
}

/// A new key's terms from the body, checked as the store checks them.
fn key_terms(b: KeyBody, now: i64) -> ApiResult<KeyTerms> {
    let expires_at = match b.expires_at.as_deref() {
        None => None,
        Some(v) => Some(timefmt::parse_rfc3339(v).ok_or_else(|| {
            ApiError::invalid(
                "expires_at",
                "expires_at must be an RFC 3339 time (2030-12-31T23:59:59Z) or a date (2030-12-31)",
            )
        })?),
    };
    let l = b.limits.unwrap_or_default();
    let terms = KeyTerms {
        name: b.name,
        expires_at,
        limits: KeyLimits {
            requests_per_second: l.requests_per_second,
            max_concurrent: l.max_concurrent,
            max_seconds_per_day: l.max_seconds_per_day,
        },
    };
    gateway::store::license_keys::checked_terms(terms, now)
        .map_err(|e| ApiError::invalid(e.field, e.message))
}

/// A key that is not found: no such license, or no such key of it.
fn no_such_key(e: gateway::store::StoreError) -> ApiError {
    match e {
        gateway::store::StoreError::NotFound => ApiError::not_found("license key"),
        e => e.into(),
    }
}

/// A license's keys, oldest first, revoked ones too.
pub async fn keys(svc: &Service<'_>, id: i64) -> ApiResult<Vec<LicenseKey>> {
    Ok(svc.licenses.keys(id).await?)
}

/// Adds a key to a license: the same balance, plan and allowances, a key of its own to
/// revoke or rotate. The key is returned once.
pub async fn add_key(
    svc: &Service<'_>,
    id: i64,
    b: KeyBody,
) -> ApiResult<(License, LicenseKey, String)> {
    let terms = key_terms(b, svc.now())?;
    let (l, k, key) = svc.licenses.add_key(id, terms, svc.now()).await?;
    svc.applied(&l);
    svc.key_made(&key);
    tracing::info!(license = id, key = k.id, "admin: key added");
    Ok((l, k, key))
}

/// Revokes one key of a license: refused from the next request, on every node; the license's
/// other keys work on.
pub async fn revoke_key(
    svc: &Service<'_>,
    id: i64,
    key_id: i64,
) -> ApiResult<(License, LicenseKey)> {
    let (l, k) = svc
        .licenses
        .revoke_key(id, key_id, svc.now())
        .await
        .map_err(no_such_key)?;
    svc.applied(&l);
    tracing::info!(license = id, key = key_id, "admin: key revoked");
    Ok((l, k))
}

/// Replaces one key of a license (the new one returned once); the old one stops working at
/// once, the license's other keys work on.
pub async fn rotate_key(
    svc: &Service<'_>,
    id: i64,
    key_id: i64,
) -> ApiResult<(License, LicenseKey, String)> {
    let (l, k, key) = svc
        .licenses
        .rotate_key(id, key_id, svc.now())
        .await
        .map_err(no_such_key)?;
    svc.applied(&l);
    svc.key_made(&key);
    tracing::info!(license = id, key = key_id, "admin: key rotated");
    Ok((l, k, key))
}

/// A license's stored row.
pub async fn get(svc: &Service<'_>, id: i64) -> ApiResult<License> {
    Ok(svc.licenses.license(id).await?)
}

/// A license's usage alerts, newest first.
pub async fn alerts(
    svc: &Service<'_>,
    id: i64,
    limit: u32,
) -> ApiResult<Vec<gateway::store::Alert>> {
    Ok(svc.licenses.alerts_for_license(id, limit).await?)
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

/// A page of a license's history: balance changes, payments and sessions, newest first.
pub async fn history(
    svc: &Service<'_>,
    license_id: i64,
    q: HistoryQuery,
) -> ApiResult<HistoryPage> {
    let shown = q.kind.unwrap_or(HistoryType::All);
    let kind = match shown {
        HistoryType::All => HistoryKind::All,
        HistoryType::Usage => HistoryKind::Usage,
        HistoryType::Payments => HistoryKind::Payments,
        HistoryType::Sessions => HistoryKind::Sessions,
    };
    let limit = page_limit(q.limit)?;
    let page = svc
        .licenses
        .history(license_id, kind, limit, q.before)
        .await?;
    Ok(HistoryPage {
        license_id,
        kind: shown,
        items: page.items.iter().map(HistoryItemView::from).collect(),
        next_before: page.next_before,
    })
}

/// A license that cannot be used: buying hours for it would take money for nothing.
pub fn usable(l: &License, now: i64) -> ApiResult<()> {
    if l.status == LicenseStatus::Revoked {
        return Err(ApiError::new(ErrorCode::LicenseRevoked));
    }
    if l.expires_at.is_some_and(|e| e <= now) {
        return Err(ApiError::new(ErrorCode::LicenseExpired));
    }
    Ok(())
}
