//! The operator's analytics and exports: per-license and system-wide statistics from the
//! rollups, and tables streamed out as CSV or JSON in constant memory.

use std::io::Write;

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::header;
use axum::response::Response;
use axum::routing::get;
use axum::{Json, Router};
use gateway::store::licenses;
use gateway::store::reports;
use gateway::timefmt;
use rusqlite::types::ValueRef;
use serde::Deserialize;
use serde_json::Value;

use crate::auth::Operator;
use crate::error::{ApiError, ApiQuery, ApiResult, LicenseId};
use crate::AdminState;

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
    let stats = st
        .app
        .store
        .read(move |c| {
            licenses::get(c, id)?;
            reports::usage_stats(c, id, days, now)
        })
        .await?;
    let mut v = stats.to_json();
    v["license_id"] = id.into();
    Ok(Json(v))
}

async fn system_stats(
    _: Operator,
    State(st): State<AdminState>,
    ApiQuery(q): ApiQuery<DaysQuery>,
) -> ApiResult<Json<Value>> {
    let (days, now) = (days(q)?, st.app.ledger.now_ms());
    let stats = st
        .app
        .store
        .read(move |c| reports::system_stats(c, days, now))
        .await?;
    Ok(Json(stats.to_json()))
}

/// A table that may be exported: its columns (never a key hash), the column `from`/`to` filter
/// on, the one `license` filters on, and the order rows come out in.
pub struct Exportable {
    pub table: &'static str,
    columns: &'static str,
    time: &'static str,
    license: Option<&'static str>,
    order: &'static str,
}

const EXPORTS: &[Exportable] = &[
    Exportable {
        table: "licenses",
        columns: "id, key_prefix, name, email, company, plan, status, balance_ms, used_ms, \
                  requests_total, expires_at, created_at, updated_at, last_used_at",
        time: "created_at",
        license: Some("id"),
        order: "id",
    },
    Exportable {
        table: "usage_history",
        columns: "id, license_id, kind, delta_ms, balance_before_ms, balance_after_ms, \
                  requests, reason, created_at",
        time: "created_at",
        license: Some("license_id"),
        order: "id",
    },
    Exportable {
        table: "usage_sessions",
        columns: "id, license_id, started_at, last_activity_at, ended_at, charged_ms, \
                  requests, bytes_in, bytes_out",
        time: "started_at",
        license: Some("license_id"),
        order: "rowid",
    },
    Exportable {
        table: "payment_history",
        columns: "id, license_id, stripe_session_id, payment_intent, package_id, hours_ms, \
                  amount_cents, currency, status, refunded_cents, refunded_ms, created_at, \
                  paid_at, updated_at",
        time: "created_at",
        license: Some("license_id"),
        order: "id",
    },
    Exportable {
        table: "access_logs",
        columns: "id, ts, license_id, guest_id, session_id, method, path, status, outcome, \
                  duration_us, bytes_in, bytes_out, client_ip, user_agent",
        time: "ts",
        license: Some("license_id"),
        order: "id",
    },
    Exportable {
        table: "usage_alerts",
        columns: "id, license_id, kind, threshold_percent, period_start, used, allowance, \
                  created_at, attempts, delivered_at, last_error",
        time: "created_at",
        license: Some("license_id"),
        order: "id",
    },
    Exportable {
        table: "stripe_events",
        columns: "id, type, result, received_at",
        time: "received_at",
        license: None,
        order: "received_at, id",
    },
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Csv,
    Json,
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

/// Bytes handed to the response at a time; the export holds at most a few of these.
const CHUNK: usize = 64 * 1024;

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
    let spec = exportable(name).ok_or_else(not_found)?;
    let from = time_param("from", q.from)?;
    let to = time_param("to", q.to)?;
    let license = match q.license.as_deref().filter(|s| !s.is_empty()) {
        None => None,
        Some(_) if spec.license.is_none() => {
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
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    let store = st.app.store.clone();
    tokio::task::spawn_blocking(move || {
        let done = store.read_blocking(|c| {
            Ok(write_export(
                c,
                spec,
                format,
                (from, to, license),
                |chunk| tx.blocking_send(Ok(Bytes::from(chunk))).is_ok(),
            )?)
        });
        if let Err(e) = done {
            tracing::error!(error = %e, "export failed part way");
            let _ = tx.blocking_send(Err(std::io::Error::other("the export failed")));
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
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

/// The exportable table `name`.
pub fn exportable(name: &str) -> Option<&'static Exportable> {
    EXPORTS.iter().find(|e| e.table == name)
}

/// Writes `spec`'s rows (within `from`..`to` and of `license`, each optional) in `format`,
/// handing `emit` chunks of about 64 KB as they fill; stops early when `emit` returns false
/// (the client went away). Memory use does not depend on the number of rows.
pub fn write_export(
    c: &rusqlite::Connection,
    spec: &Exportable,
    format: Format,
    (from, to, license): (Option<i64>, Option<i64>, Option<i64>),
    mut emit: impl FnMut(Vec<u8>) -> bool,
) -> rusqlite::Result<()> {
    // Only names from the allow-list go into the SQL; values are bound.
    let sql = format!(
        "SELECT {cols} FROM {table} WHERE (?1 IS NULL OR {time} >= ?1) \
         AND (?2 IS NULL OR {time} < ?2) AND (?3 IS NULL OR {lic} = ?3) ORDER BY {order}",
        cols = spec.columns,
        table = spec.table,
        time = spec.time,
        lic = spec.license.unwrap_or("NULL"),
        order = spec.order,
    );
    let columns: Vec<&str> = spec.columns.split(',').map(str::trim).collect();
    let mut stmt = c.prepare(&sql)?;
    let mut rows = stmt.query(rusqlite::params![from, to, license])?;
    let mut buf = Vec::with_capacity(CHUNK + 4096);
    let mut first = true;
    match format {
        Format::Csv => {
            buf.extend_from_slice(columns.join(",").as_bytes());
            buf.extend_from_slice(b"\r\n");
        }
        Format::Json => buf.push(b'['),
    }
    while let Some(r) = rows.next()? {
        match format {
            Format::Csv => csv_row(&mut buf, r, columns.len())?,
            Format::Json => {
                if !first {
                    buf.push(b',');
                }
                json_row(&mut buf, r, &columns)?;
            }
        }
        first = false;
        if buf.len() >= CHUNK {
            let chunk = std::mem::replace(&mut buf, Vec::with_capacity(CHUNK + 4096));
            if !emit(chunk) {
                return Ok(());
            }
        }
    }
    if format == Format::Json {
        buf.extend_from_slice(b"]\n");
    }
    emit(buf);
    Ok(())
}

/// One CSV line (RFC 4180). Text that a spreadsheet would run as a formula (`=`, `+`, `-`, `@`
/// first) is prefixed with `'`: paths and user agents come from the internet.
fn csv_row(buf: &mut Vec<u8>, r: &rusqlite::Row<'_>, n: usize) -> rusqlite::Result<()> {
    for i in 0..n {
        if i > 0 {
            buf.push(b',');
        }
        match r.get_ref(i)? {
            ValueRef::Null => {}
            ValueRef::Integer(v) => {
                let _ = write!(buf, "{v}");
            }
            ValueRef::Real(v) => {
                let _ = write!(buf, "{v}");
            }
            ValueRef::Text(t) | ValueRef::Blob(t) => {
                let t = String::from_utf8_lossy(t);
                let formula = t.starts_with(['=', '+', '-', '@']);
                if formula || t.contains([',', '"', '\n', '\r']) {
                    buf.push(b'"');
                    if formula {
                        buf.push(b'\'');
                    }
                    buf.extend_from_slice(t.replace('"', "\"\"").as_bytes());
                    buf.push(b'"');
                } else {
                    buf.extend_from_slice(t.as_bytes());
                }
            }
        }
    }
    buf.extend_from_slice(b"\r\n");
    Ok(())
}

fn json_row(buf: &mut Vec<u8>, r: &rusqlite::Row<'_>, columns: &[&str]) -> rusqlite::Result<()> {
    buf.push(b'{');
    for (i, name) in columns.iter().enumerate() {
        if i > 0 {
            buf.push(b',');
        }
        let _ = write!(buf, "\"{name}\":");
        match r.get_ref(i)? {
            ValueRef::Null => buf.extend_from_slice(b"null"),
            ValueRef::Integer(v) => {
                let _ = write!(buf, "{v}");
            }
            ValueRef::Real(v) => {
                let _ = serde_json::to_writer(&mut *buf, &v);
            }
            ValueRef::Text(t) | ValueRef::Blob(t) => {
                let _ = serde_json::to_writer(&mut *buf, &String::from_utf8_lossy(t));
            }
        }
    }
    buf.push(b'}');
    Ok(())
}
