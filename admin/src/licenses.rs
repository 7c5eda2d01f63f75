//! The operator's licenses API (`/api/licenses…`, bearer admin token): each handler parses its
//! request, calls `service::licenses` (which checks, writes in one store transaction with its
//! history row, and tells the proxy's ledger, so a credit or a revocation takes effect on the
//! next proxied request), and renders the answer.

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use gateway::store::Adjustment;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::Operator;
use crate::error::{ApiJson, ApiQuery, ApiResult, KeyIds, LicenseId};
use crate::service::licenses::{
    self, AdjustBody, CreateBody, HistoryQuery, KeyBody, ListQuery, PatchBody, UnitsBody,
};
use crate::service::Service;
use crate::views::{
    HistoryPage, KeyList, KeyView, KeyWithSecret, LicenseList, LicenseView, LicenseWithKey,
};
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
        .routes(routes!(add_key, list_keys))
        .routes(routes!(revoke_key))
        .routes(routes!(rotate_key))
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
    let svc = Service::of(&st.app);
    let (license, key) = licenses::create(&svc, b).await?;
    let created = LicenseWithKey {
        license: svc.view(&license),
        license_key: key,
    };
    Ok((StatusCode::CREATED, Json(created)))
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
    let svc = Service::of(&st.app);
    let (rows, next) = licenses::list(&svc, q).await?;
    Ok(Json(LicenseList {
        licenses: rows.iter().map(|l| svc.view(l)).collect(),
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
    let svc = Service::of(&st.app);
    let l = licenses::get(&svc, id).await?;
    Ok(Json(svc.settled_view(&l, crate::service::ON_VIEW).await))
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
    let svc = Service::of(&st.app);
    let l = licenses::update(&svc, id, body).await?;
    Ok(Json(svc.view(&l)))
}

async fn adjust(
    st: AdminState,
    id: i64,
    how: Adjustment,
    b: AdjustBody,
) -> ApiResult<Json<LicenseView>> {
    let svc = Service::of(&st.app);
    let l = licenses::adjust(&svc, id, how, b).await?;
    Ok(Json(
        svc.settled_view(&l, crate::service::AFTER_CHANGE).await,
    ))
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
    let svc = Service::of(&st.app);
    let l = licenses::correct_units(&svc, id, b).await?;
    Ok(Json(
        svc.settled_view(&l, crate::service::AFTER_CHANGE).await,
    ))
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
    let svc = Service::of(&st.app);
    let l = licenses::revoke(&svc, id).await?;
    Ok(Json(svc.view(&l)))
}

/// Gives a license a new key in place of its only active one, shown in this answer only; the old
/// key stops working at once. A license with several active keys has one of them rotated
/// (`/api/licenses/{id}/keys/{key_id}/rotate`): this is refused with 400.
#[utoipa::path(
    post, path = "/api/licenses/{id}/rotate", operation_id = "rotate_key", tag = "licenses",
    security(("admin_token" = [])),
    params(LicenseId),
    responses((status = 200, description = "The license, with its new key", body = LicenseWithKey)),
    extensions(("x-errors" = json!(["bad_request", "not_found", "unauthorized", "rate_limited",
        "internal_error"]))),
)]
async fn rotate(
    _: Operator,
    State(st): State<AdminState>,
    LicenseId(id): LicenseId,
) -> ApiResult<Json<LicenseWithKey>> {
    let svc = Service::of(&st.app);
    let (l, key) = licenses::rotate(&svc, id).await?;
    Ok(Json(LicenseWithKey {
        license: svc.view(&l),
        license_key: key,
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
    Ok(Json(licenses::history(&Service::of(&st.app), id, q).await?))
}

/// Adds a key to a license: one more key on the same balance, plan and allowances, to be
/// revoked or rotated on its own (a key per developer, environment or machine). The key is in
/// this answer only: store it now.
#[utoipa::path(
    post, path = "/api/licenses/{id}/keys", operation_id = "add_key", tag = "licenses",
    security(("admin_token" = [])),
    params(LicenseId),
    request_body = KeyBody,
    responses((status = 201, description = "The key, with its secret", body = KeyWithSecret)),
    extensions(("x-errors" = json!(["bad_request", "not_found", "unauthorized",
        "rate_limited", "payload_too_large", "internal_error"]))),
)]
async fn add_key(
    _: Operator,
    State(st): State<AdminState>,
    LicenseId(id): LicenseId,
    ApiJson(b): ApiJson<KeyBody>,
) -> ApiResult<(StatusCode, Json<KeyWithSecret>)> {
    let (_, k, key) = licenses::add_key(&Service::of(&st.app), id, b).await?;
    let added = KeyWithSecret {
        key: KeyView::from(&k),
        license_key: key,
    };
    Ok((StatusCode::CREATED, Json(added)))
}

/// A license's keys, oldest first, revoked ones too.
#[utoipa::path(
    get, path = "/api/licenses/{id}/keys", operation_id = "list_keys", tag = "licenses",
    security(("admin_token" = [])),
    params(LicenseId),
    responses((status = 200, description = "The license's keys", body = KeyList)),
    extensions(("x-errors" = json!(["not_found", "unauthorized", "rate_limited",
        "internal_error"]))),
)]
async fn list_keys(
    _: Operator,
    State(st): State<AdminState>,
    LicenseId(id): LicenseId,
) -> ApiResult<Json<KeyList>> {
    let keys = licenses::keys(&Service::of(&st.app), id).await?;
    Ok(Json(KeyList {
        license_id: id,
        keys: keys.iter().map(KeyView::from).collect(),
    }))
}

/// Revokes one key of a license: it is refused from the next request on every node, while the
/// license's other keys work on.
#[utoipa::path(
    post, path = "/api/licenses/{id}/keys/{key_id}/revoke", operation_id = "revoke_key",
    tag = "licenses",
    security(("admin_token" = [])),
    params(KeyIds),
    responses((status = 200, description = "The key, revoked", body = KeyView)),
    extensions(("x-errors" = json!(["not_found", "unauthorized", "rate_limited",
        "internal_error"]))),
)]
async fn revoke_key(
    _: Operator,
    State(st): State<AdminState>,
    KeyIds(id, key_id): KeyIds,
) -> ApiResult<Json<KeyView>> {
    let (_, k) = licenses::revoke_key(&Service::of(&st.app), id, key_id).await?;
    Ok(Json(KeyView::from(&k)))
}

/// Gives one key of a license a new secret, shown in this answer only; the old one stops
/// working at once, the license's other keys work on.
#[utoipa::path(
    post, path = "/api/licenses/{id}/keys/{key_id}/rotate", operation_id = "rotate_one_key",
    tag = "licenses",
    security(("admin_token" = [])),
    params(KeyIds),
    responses((status = 200, description = "The key, with its new secret", body = KeyWithSecret)),
    extensions(("x-errors" = json!(["bad_request", "not_found", "unauthorized", "rate_limited",
        "internal_error"]))),
)]
async fn rotate_key(
    _: Operator,
    State(st): State<AdminState>,
    KeyIds(id, key_id): KeyIds,
) -> ApiResult<Json<KeyWithSecret>> {
    let (_, k, key) = licenses::rotate_key(&Service::of(&st.app), id, key_id).await?;
    Ok(Json(KeyWithSecret {
        key: KeyView::from(&k),
        license_key: key,
    }))
}
