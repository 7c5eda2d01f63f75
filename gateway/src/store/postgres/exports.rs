//! The export writer on PostgreSQL: an allow-listed table (see `store::exports`) streamed out
//! as CSV or JSON in constant memory, as store/sqlite/exports.rs, its rows read as the server
//! sends them.

use tokio_postgres::types::ToSql;

use super::{backend, PgStore};
use crate::store::Result;

impl PgStore {
    /// Streams an allow-listed table out as CSV or JSON (see `store::exports`), in chunks as
    /// rows arrive from the server; stops when the receiver is gone.
    pub async fn export(
        &self,
        request: crate::store::exports::ExportRequest,
        sink: tokio::sync::mpsc::Sender<bytes::Bytes>,
    ) -> Result<()> {
        use crate::store::exports::{Cell, Writer};
        use futures_util::TryStreamExt;
        use tokio_postgres::types::Type;
        let spec = request.table;
        // SQLite orders sessions by rowid; here `seq` is that order
        let order = if spec.order == "rowid" {
            "seq"
        } else {
            spec.order
        };
        // Only names from the allow-list go into the SQL; values are bound.
        let sql = format!(
            "SELECT {cols} FROM {table} WHERE ($1::bigint IS NULL OR {time} >= $1) \
             AND ($2::bigint IS NULL OR {time} < $2) AND ($3::bigint IS NULL OR {lic} = $3) \
             AND ($4::text IS NULL OR {guest} = $4) ORDER BY {order}",
            cols = spec.columns,
            table = spec.table,
            time = spec.time,
            lic = spec.license.unwrap_or("NULL"),
            guest = spec.guest.unwrap_or("NULL"),
        );
        self.run(async |c| {
            let params: [&(dyn ToSql + Sync); 4] =
                [&request.from, &request.to, &request.license, &request.guest];
            let rows = c
                .query_raw(sql.as_str(), params.iter().copied())
                .await
                .map_err(backend)?;
            let mut rows = std::pin::pin!(rows);
            let mut out = Writer::new(spec, request.format);
            while let Some(r) = rows.try_next().await.map_err(backend)? {
                let cells: Vec<Cell> = (0..out.width())
                    .map(|i| {
                        let ty = r.columns()[i].type_();
                        let cell = if *ty == Type::INT8 {
                            r.get::<_, Option<i64>>(i).map(Cell::Int)
                        } else if *ty == Type::INT4 {
                            r.get::<_, Option<i32>>(i).map(|v| Cell::Int(v.into()))
                        } else if *ty == Type::FLOAT8 {
                            r.get::<_, Option<f64>>(i).map(Cell::Real)
                        } else if *ty == Type::BOOL {
                            r.get::<_, Option<bool>>(i).map(|v| Cell::Int(v.into()))
                        } else {
                            r.get::<_, Option<String>>(i).map(|t| Cell::Text(t.into()))
                        };
                        cell.unwrap_or(Cell::Null)
                    })
                    .collect();
                if let Some(chunk) = out.row(cells) {
                    if sink.send(chunk.into()).await.is_err() {
                        return Ok(());
                    }
                }
            }
            let _ = sink.send(out.finish().into()).await;
            Ok(())
        })
        .await
    }
}
