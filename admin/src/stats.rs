//! The operator's analytics and exports: per-license and system-wide statistics from the
//! rollups, and tables streamed out as CSV or JSON in constant memory.

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::header;
use axum::response::Response;
use axum::routing::get;
use axum::{Json, Router};
use futures_util::StreamExt;
use gateway::store::exports::{self, ExportRequest, Format};
use gateway::timefmt;
use serde::Deserialize;
use serde_json::Value;

use crate::auth::Operator;
use crate::error::{ApiError, ApiQuery, ApiResult, LicenseId};
use crate::{views, AdminState};

pub fn routes() -> Router<AdminState> {
    Router::new()
        .route("/api/licenses/{id}/stats", get(license_stats))
        .route("/api/stats", get(system_stats))
        .route("/api/export/{file}", get(export))
}

#[derive(Deserialize)]
struct DaysQuery {
    days: Option<u32>,
}

fn days(q: DaysQuery) -> ApiResult<u32> {
    let d = q.days.unwrap_or(30);
    if !(1..=366).contains(&d) {
        return Err(ApiError::bad_request("days must be between 1 and 366"));
    }
    Ok(d)
}

async fn license_stats(
    _: Operator,
    State(st): State<AdminState>,
    LicenseId(id): LicenseId,
    ApiQuery(q): ApiQuery<DaysQuery>,
) -> ApiResult<Json<Value>> {
    let (days, now) = (days(q)?, st.app.ledger.now_ms());
    let stats = st.app.store.usage_stats(id, days, now).await?;
    let mut v = views::usage_stats(&stats);
    v["license_id"] = id.into();
    Ok(Json(v))
}

async fn system_stats(
    _: Operator,
    State(st): State<AdminState>,
    ApiQuery(q): ApiQuery<DaysQuery>,
) -> ApiResult<Json<Value>> {
    let (days, now) = (days(q)?, st.app.ledger.now_ms());
    let stats = st.app.store.system_stats(days, now).await?;
    Ok(Json(views::system_stats(&stats)))
}

#[derive(Deserialize)]
struct ExportQuery {
    from: Option<String>,
    to: Option<String>,
    license: Option<String>,
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

/// `GET /api/export/{table}.csv|.json?from=&to=&license=`: the table streamed as it is read.
async fn export(
    _: Operator,
    State(st): State<AdminState>,
    Path(file): Path<String>,
    ApiQuery(q): ApiQuery<ExportQuery>,
) -> ApiResult<Response> {
    let not_found = || {
        ApiError::not_found("export (the tables are licenses, usage_history, usage_sessions, payment_history, access_logs, usage_alerts, stripe_events; as .csv or .json)")
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
    let request = ExportRequest {
        table: spec,
        format,
        from,
        to,
        license,
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
