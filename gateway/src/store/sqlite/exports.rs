//! The export writer on SQLite: an allow-listed table (see `store::exports`) streamed out as
//! CSV or JSON in constant memory, its output handed on in chunks as rows are read.

use rusqlite::types::ValueRef;
use rusqlite::{params, Connection};

use crate::store::exports::{Cell, Exportable, Format, Writer};
use crate::store::Result;

/// Writes `spec`'s rows (within `from`..`to`, of `license` and of `guest`, each optional) in
/// `format`,
/// handing `emit` chunks of about 64 KB as they fill; stops early when `emit` returns false
/// (the client went away). Memory use does not depend on the number of rows.
pub fn write(
    c: &Connection,
    spec: &Exportable,
    format: Format,
    (from, to, license, guest): (Option<i64>, Option<i64>, Option<i64>, Option<&str>),
    mut emit: impl FnMut(Vec<u8>) -> bool,
) -> Result<()> {
    // Only names from the allow-list go into the SQL; values are bound.
    let sql = format!(
        "SELECT {cols} FROM {table} WHERE (?1 IS NULL OR {time} >= ?1) \
         AND (?2 IS NULL OR {time} < ?2) AND (?3 IS NULL OR {lic} = ?3) \
         AND (?4 IS NULL OR {guest} = ?4) ORDER BY {order}",
        cols = spec.columns,
        table = spec.table,
        time = spec.time,
        lic = spec.license.unwrap_or("NULL"),
        guest = spec.guest.unwrap_or("NULL"),
        order = spec.order,
    );
    let mut out = Writer::new(spec, format);
    let width = out.width();
    let mut stmt = c.prepare(&sql)?;
    let mut rows = stmt.query(params![from, to, license, guest])?;
    while let Some(r) = rows.next()? {
        let mut cells = Vec::with_capacity(width);
        for i in 0..width {
            cells.push(match r.get_ref(i)? {
                ValueRef::Null => Cell::Null,
                ValueRef::Integer(v) => Cell::Int(v),
                ValueRef::Real(v) => Cell::Real(v),
                ValueRef::Text(t) | ValueRef::Blob(t) => Cell::Text(String::from_utf8_lossy(t)),
            });
        }
        if let Some(chunk) = out.row(cells) {
            if !emit(chunk) {
                return Ok(());
            }
        }
    }
    emit(out.finish());
    Ok(())
}
