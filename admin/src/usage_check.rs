//! `POST /usage/check`: asking before sending. The decision the proxy would take now for a
//! request (its method, path, body size and estimate), from the proxy's own code
//! (`routes::ask_for`, `Ledger::check`, `proxy::refusal`), taking nothing.

use std::collections::BTreeMap;

use axum::extract::State;
use axum::Json;
use gateway::config::ChargeMode;
use gateway::errors::ErrorCode;
use serde::Deserialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::Customer;
use crate::error::{ApiError, ApiJson, ApiResult};
use crate::views::{LimitLine, UsageCheck};
use crate::AdminState;

pub fn routes() -> OpenApiRouter<AdminState> {
    OpenApiRouter::new().routes(routes!(check))
}

/// A request the customer may send.
#[derive(Deserialize, ToSchema, Debug)]
#[schema(example = json!({"method": "POST", "path": "/transcribe", "body_bytes": 26214400,
    "estimate": {"audio_seconds": 900}}))]
#[serde(deny_unknown_fields)]
pub struct CheckBody {
    /// The request's method (default `GET`).
    #[schema(max_length = 16)]
    pub method: Option<String>,
    /// Its path, as it would be sent (normalised as the proxy normalises it).
    #[schema(min_length = 1, max_length = 1024)]
    pub path: String,
    /// The body it would carry (its `Content-Length`; default none).
    #[schema(minimum = 0)]
    pub body_bytes: Option<i64>,
    /// What it would send as `Tollgate-Estimate`, by meter.
    pub estimate: Option<BTreeMap<String, i64>>,
}

/// Whether a request would be admitted now, and if not why, as the proxy would answer it: the
/// same code decides, and nothing is taken (no rate token, slot, reservation, charge or log
/// row). On several nodes it answers from this node's view and never asks the database for a
/// slice: advisory there (a spent slice of a balance or allowance that has more is `allowed`,
/// as the proxy would ask for the next).
#[utoipa::path(
    post, path = "/usage/check", operation_id = "check", tag = "usage",
    security(("license_key" = []), ("license_key_query" = [])),
    request_body = CheckBody,
    responses((status = 200, description = "The decision", body = UsageCheck)),
    extensions(("x-errors" = json!(["rate_limited", "bad_request", "payload_too_large",
        "missing_license_key", "invalid_license_key", "store_unavailable", "internal_error"]))),
)]
async fn check(
    State(st): State<AdminState>,
    headers: axum::http::HeaderMap,
    uri: axum::http::Uri,
    Customer(l): Customer,
    ApiJson(b): ApiJson<CheckBody>,
) -> ApiResult<Json<UsageCheck>> {
    let config = &st.app.config;
    let ledger = &st.app.ledger;
    let method = b.method.as_deref().unwrap_or("GET").to_ascii_uppercase();
    if method.is_empty() || method.len() > 16 || !method.bytes().all(|c| c.is_ascii_uppercase()) {
        return Err(ApiError::bad_request("method: not an HTTP method"));
    }
    if !b.path.starts_with('/') || b.path.len() > 1024 {
        return Err(ApiError::bad_request(
            "path: must start with / (at most 1024 bytes)",
        ));
    }
    let body_bytes = match b.body_bytes {
        Some(n) if n < 0 => return Err(ApiError::bad_request("body_bytes: must not be negative")),
        n => n.unwrap_or(0) as u64,
    };
    let normal = gateway::paths::normalize(&b.path);
    let routes = &st.app.routes;
    let route = routes.find(&method, &normal.path).map(|i| routes.get(i));
    let limits = |lines: Vec<gateway::limits::LimitView>| -> Vec<LimitLine> {
        lines.iter().map(LimitLine::from).collect()
    };
    if route.is_some_and(|r| r.charge == ChargeMode::Free) {
        if normal.ambiguous {
            // the proxy refuses a free path it cannot read as the app would
            return Ok(Json(UsageCheck {
                allowed: false,
                status: Some(400),
                error: Some(ErrorCode::BadRequest.code().to_string()),
                message: Some(
                    "The path has an encoded / or \\, or a dot segment with parameters (..;), \
                     in it, which apps read differently."
                        .into(),
                ),
                ..UsageCheck::allowed(Vec::new())
            }));
        }
        return Ok(Json(UsageCheck::allowed(Vec::new())));
    }
    let estimate = b.estimate.as_ref().map(|e| {
        e.iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(", ")
    });
    let ask = gateway::routes::ask_for(
        route,
        &config.meters,
        estimate.as_deref().map(str::as_bytes),
        Some(body_bytes),
    );
    // the key presented (one of the license's keys, with rules of its own perhaps)
    let hash = crate::auth::presented_key(&headers, uri.query())
        .map_or(l.key_hash, |k| gateway::keys::KeyHash::of(k.as_bytes()));
    let (account, key) = match ledger.lookup(&hash) {
        gateway::ledger::Lookup::Known(a, key) => (a, key),
        _ => {
            // as the proxy's cache miss: the row and its period's use
            let row = st
                .app
                .store
                .admission_state(hash, &config.metering.calendar, ledger.now_ms())
                .await?;
            ledger
                .insert_loaded_key(hash, row)
                .ok_or_else(|| ApiError::new(ErrorCode::InvalidLicenseKey))?
        }
    };
    let lines = limits(ledger.limits_now(&account).unwrap_or_default());
    Ok(Json(match ledger.check_key(&account, &key, ask) {
        // several nodes: the proxy would ask the store for the next slice
        Ok(()) => UsageCheck::allowed(lines),
        Err(denial) if denial.lease_spent() => UsageCheck::allowed(lines),
        Err(denial) => {
            let refusal = gateway::proxy::refusal(ledger, l.id, denial);
            let body = gateway::proxy::refusal_body(
                refusal,
                &config.meters,
                config.proxy.purchase_url.as_deref(),
                Some(config.upgrade_url()),
            );
            let body: serde_json::Value = serde_json::from_slice(&body).expect("a refusal is JSON");
            UsageCheck {
                allowed: false,
                status: Some(refusal.code.status()),
                error: body["error"].as_str().map(str::to_string),
                message: body["message"].as_str().map(str::to_string),
                retry_after_s: refusal.retry_after_s,
                limit: refusal.limit.map(str::to_string),
                limits: lines,
            }
        }
    }))
}
