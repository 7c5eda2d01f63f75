//! The operator's analytics and exports: per-license and system-wide statistics from the
//! rollups, and tables streamed out as CSV or JSON in constant memory.

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::header;
use axum::response::Response;
use axum::Json;
use futures_util::StreamExt;
use gateway::store::exports::{self, ExportRequest, Format};
use gateway::timefmt;
use serde::Deserialize;
use utoipa::IntoParams;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::Operator;
use crate::error::{ApiError, ApiQuery, ApiResult, LicenseId};
use crate::service::Service;
use crate::views::{LicenseStats, SystemStatsView};
use crate::AdminState;

pub fn routes() -> OpenApiRouter<AdminState> {
    OpenApiRouter::new()
        .routes(routes!(license_stats))
        .routes(routes!(system_stats))
        .routes(routes!(export))
}

/// An unknown parameter is a 400: a misspelt filter must not answer for everyone.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct DaysQuery {
    /// The window, in days back from now (default 30).
    #[param(minimum = 1, maximum = 366)]
    days: Option<u32>,
}

/// As [`DaysQuery`], with a guest to answer for.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct SystemQuery {
    /// The window, in days back from now (default 30).
    #[param(minimum = 1, maximum = 366)]
    days: Option<u32>,
    /// Only this guest in `guests` (its id, as in the access log's `guest_id`).
    guest: Option<String>,
}

fn days(q: DaysQuery) -> ApiResult<u32> {
    let d = q.days.unwrap_or(30);
    if !(1..=366).contains(&d) {
        return Err(ApiError::bad_request("days must be between 1 and 366"));
    }
    Ok(d)
}

/// One license's calls, success rate, latency and time used, by day.
#[utoipa::path(
    get, path = "/api/licenses/{id}/stats", operation_id = "license_stats", tag = "analytics",
    security(("admin_token" = [])),
    params(LicenseId, DaysQuery),
    responses((status = 200, description = "The license's statistics", body = LicenseStats)),
    extensions(("x-errors" = json!(["bad_request", "not_found", "unauthorized",
        "rate_limited", "internal_error"]))),
)]
async fn license_stats(
    _: Operator,
    State(st): State<AdminState>,
    LicenseId(id): LicenseId,
    ApiQuery(q): ApiQuery<DaysQuery>,
) -> ApiResult<Json<LicenseStats>> {
    let (days, now) = (days(q)?, st.app.ledger.now_ms());
    let stats = Service::of(&st.app)
        .reports()
        .usage_stats(id, days, now)
        .await?;
    let mut view: crate::views::UsageStatsView = (&stats).into();
    crate::views::name_routes(&mut view.top_endpoints, &st.app.routes);
    Ok(Json(LicenseStats {
        license_id: id,
        stats: view,
    }))
}

/// The whole gateway: calls, time charged, revenue, the busiest licenses, endpoints and
/// guests, and the plans.
#[utoipa::path(
    get, path = "/api/stats", operation_id = "system_stats", tag = "analytics",
    security(("admin_token" = [])),
    params(SystemQuery),
    responses((status = 200, description = "The gateway's statistics", body = SystemStatsView)),
    extensions(("x-errors" = json!(["bad_request", "unauthorized", "rate_limited",
        "internal_error"]))),
)]
async fn system_stats(
    _: Operator,
    State(st): State<AdminState>,
    ApiQuery(q): ApiQuery<SystemQuery>,
) -> ApiResult<Json<SystemStatsView>> {
    let guest = q.guest.filter(|g| !g.is_empty());
    let days = days(DaysQuery { days: q.days })?;
    let now = st.app.ledger.now_ms();
    let reports = Service::of(&st.app).reports();
    let stats = reports.system_stats(days, now).await?;
    let guests = reports.guest_stats(days, now, guest).await?;
    let mut view: SystemStatsView = (&stats).into();
    crate::views::name_routes(&mut view.top_endpoints, &st.app.routes);
    view.guests = guests.iter().map(crate::views::GuestView::from).collect();
    Ok(Json(view))
}

/// An unknown parameter is a 400, not ignored: a misspelt filter would export everything.
#[derive(Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct ExportQuery {
    /// Rows from this time on: RFC 3339 (`2025-01-31T00:00:00Z`) or a date (`2025-01-31`).
    from: Option<String>,
    /// Rows before this time, in the same forms.
    to: Option<String>,
    /// Only this license's rows (for the tables that have a license).
    license: Option<String>,
    /// Only this guest's rows (`access_logs`).
    guest: Option<String>,
}

fn time_param(name: &str, v: Option<String>) -> ApiResult<Option<i64>> {
    match v.as_deref().filter(|s| !s.is_empty()) {
        None => Ok(None),
        Some(s) => timefmt::parse_rfc3339(s).map(Some).ok_or_else(|| {
            ApiError::bad_request(format!(
                "{name} must be an RFC 3339 time (2025-01-31T00:00:00Z) or a date (2025-01-31)"
            ))
        }),
    }
}

/// A table streamed as it is read, as CSV or as a JSON array of rows: `licenses`,
/// `license_keys` (prefixes and names, never a key), `key_daily`, `usage_history`,
/// `usage_sessions`, `payment_history`, `subscriptions`, `subscription_invoices`,
/// `access_logs`, `usage_units`, `usage_alerts` or `stripe_events`, with `.csv` or `.json` (`/api/export/access_logs.csv`).
#[utoipa::path(
    get, path = "/api/export/{file}", operation_id = "export_table", tag = "analytics",
    security(("admin_token" = [])),
    params(
        ("file" = String, Path, description = "The table and the format, `<table>.csv` or `<table>.json`.",
            example = "licenses.json"),
        ExportQuery,
    ),
    responses((status = 200, description = "The table's rows",
        content(
            (String = "text/csv", example = "id,name\n1,Ada\n"),
            (Vec<serde_json::Map<String, serde_json::Value>> = "application/json"),
        ),
        headers(("Content-Disposition" = String, description = "attachment; filename=\"<table>.<ext>\"")))),
    extensions(("x-errors" = json!(["bad_request", "not_found", "unauthorized",
        "rate_limited", "internal_error"]))),
)]
async fn export(
    _: Operator,
    State(st): State<AdminState>,
    Path(file): Path<String>,
    ApiQuery(q): ApiQuery<ExportQuery>,
) -> ApiResult<Response> {
    let not_found = || {
        ApiError::not_found("export (the tables are licenses, license_keys, key_daily, usage_history, usage_sessions, payment_history, subscriptions, subscription_invoices, access_logs, usage_units, usage_alerts, stripe_events; as .csv or .json)")
    };
    let (name, ext) = file.rsplit_once('.').ok_or_else(not_found)?;
    let format = match ext {
        "csv" => Format::Csv,
        "json" => Format::Json,
        _ => return Err(not_found()),
    };
    let spec = exports::exportable(name).ok_or_else(not_found)?;
    let from = time_param("from", q.from)?;
    let to = time_param("to", q.to)?;
    let license = match q.license.as_deref().filter(|s| !s.is_empty()) {
        None => None,
        Some(_) if !spec.by_license() => {
            return Err(ApiError::bad_request(format!(
                "{} cannot be filtered by license",
                spec.table
            )))
        }
        Some(s) => Some(
            s.parse::<i64>()
                .map_err(|_| ApiError::bad_request("license must be a license id"))?,
        ),
    };
    let guest = match q.guest.filter(|s| !s.is_empty()) {
        Some(_) if spec.guest.is_none() => {
            return Err(ApiError::bad_request(format!(
                "{} cannot be filtered by guest",
                spec.table
            )))
        }
        g => g,
    };
    let request = ExportRequest {
        table: spec,
        format,
        from,
        to,
        license,
        guest,
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
    let (failed_tx, failed) = tokio::sync::oneshot::channel::<()>();
    let store = st.app.store.clone();
    tokio::spawn(async move {
        if let Err(e) = store.export(request, tx).await {
            tracing::error!(error = %e, "export failed part way");
            let _ = failed_tx.send(());
        }
    });
    // the chunks, then an error if the export failed part way (so the client sees a broken
    // download, not a short file that looks whole)
    let chunks = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, std::io::Error>(b), rx))
    });
    let tail = futures_util::stream::once(async move {
        match failed.await {
            Ok(()) => Some(Err(std::io::Error::other("the export failed"))),
            Err(_) => None,
        }
    })
    .filter_map(|e| async move { e });
    let stream = chunks.chain(tail);
    let content_type = match format {
        Format::Csv => "text/csv; charset=utf-8",
        Format::Json => "application/json",
    };
    Response::builder()
        .header(header::CONTENT_TYPE, content_type)
        .header(
            header::CONTENT_DISPOSITION,
            format!("attachment; filename=\"{}.{ext}\"", spec.table),
        )
        .body(Body::from_stream(stream))
        .map_err(|_| ApiError::new(gateway::errors::ErrorCode::Internal))
}
