//! Tables streamed out as CSV or JSON in constant memory (`GET /api/export/…`): the allow-list
//! of exportable tables and columns (never a key hash), and the writer that hands its output
//! on in chunks as rows are read.

use std::io::Write;

use rusqlite::types::ValueRef;
use rusqlite::{params, Connection, Row};

use super::Result;

/// A table that may be exported: its columns (never a key hash), the column `from`/`to` filter
/// on, the one `license` filters on, and the order rows come out in.
pub struct Exportable {
    pub table: &'static str,
    columns: &'static str,
    time: &'static str,
    license: Option<&'static str>,
    order: &'static str,
}

impl Exportable {
    /// Whether its rows can be filtered by license.
    pub fn by_license(&self) -> bool {
        self.license.is_some()
    }
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

/// How an export is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Csv,
    Json,
}

/// Bytes handed to the response at a time; the export holds at most a few of these.
const CHUNK: usize = 64 * 1024;

/// The exportable table `name`.
pub fn exportable(name: &str) -> Option<&'static Exportable> {
    EXPORTS.iter().find(|e| e.table == name)
}

/// Writes `spec`'s rows (within `from`..`to` and of `license`, each optional) in `format`,
/// handing `emit` chunks of about 64 KB as they fill; stops early when `emit` returns false
/// (the client went away). Memory use does not depend on the number of rows.
pub fn write(
    c: &Connection,
    spec: &Exportable,
    format: Format,
    (from, to, license): (Option<i64>, Option<i64>, Option<i64>),
    mut emit: impl FnMut(Vec<u8>) -> bool,
) -> Result<()> {
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
    let mut rows = stmt.query(params![from, to, license])?;
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
fn csv_row(buf: &mut Vec<u8>, r: &Row<'_>, n: usize) -> rusqlite::Result<()> {
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

fn json_row(buf: &mut Vec<u8>, r: &Row<'_>, columns: &[&str]) -> rusqlite::Result<()> {
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
