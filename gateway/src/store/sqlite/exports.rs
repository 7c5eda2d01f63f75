//! The export writer on SQLite: an allow-listed table (see `store::exports`) streamed out as
//! CSV or JSON in constant memory, its output handed on in chunks as rows are read.

use std::io::Write;

use rusqlite::types::ValueRef;
use rusqlite::{params, Connection, Row};

use crate::store::exports::{Exportable, Format};
use crate::store::Result;

/// Bytes handed to the response at a time; the export holds at most a few of these.
const CHUNK: usize = 64 * 1024;

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
