//! What may be exported (`GET /api/export/…`): the allow-list of tables and columns (never a
//! key hash), the same on every backend, and the request a backend streams out.

/// A table that may be exported: its columns (never a key hash), the column `from`/`to` filter
/// on, the one `license` filters on, and the order rows come out in.
pub struct Exportable {
    pub table: &'static str,
    pub columns: &'static str,
    pub time: &'static str,
    pub license: Option<&'static str>,
    /// The column `guest` filters on (tables with guests' rows).
    pub guest: Option<&'static str>,
    pub order: &'static str,
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
        guest: None,
        order: "id",
    },
    Exportable {
        table: "license_keys",
        columns: "id, license_id, key_prefix, name, status, expires_at, requests_per_second, \
                  max_concurrent, max_seconds_per_day, created_at, updated_at",
        time: "created_at",
        license: Some("license_id"),
        guest: None,
        order: "id",
    },
    Exportable {
        table: "key_daily",
        columns: "key_id, day, license_id, calls, ok, duration_us, last_at",
        time: "last_at",
        license: Some("license_id"),
        guest: None,
        order: "key_id, day",
    },
    Exportable {
        table: "usage_history",
        columns: "id, license_id, kind, delta_ms, balance_before_ms, balance_after_ms, \
                  requests, reason, created_at, priced_ms, included_ms",
        time: "created_at",
        license: Some("license_id"),
        guest: None,
        order: "id",
    },
    Exportable {
        table: "usage_sessions",
        columns: "id, license_id, started_at, last_activity_at, ended_at, charged_ms, \
                  requests, bytes_in, bytes_out",
        time: "started_at",
        license: Some("license_id"),
        guest: None,
        order: "rowid",
    },
    Exportable {
        table: "payment_history",
        columns: "id, license_id, stripe_session_id, payment_intent, package_id, hours_ms, \
                  amount_cents, currency, status, refunded_cents, refunded_ms, created_at, \
                  paid_at, updated_at",
        time: "created_at",
        license: Some("license_id"),
        guest: None,
        order: "id",
    },
    Exportable {
        table: "subscriptions",
        columns: "id, license_id, customer_id, plan, status, period_start, period_end, \
                  cancel_at_period_end, grace_until, ends_at, event_at, created_at, updated_at",
        time: "created_at",
        license: Some("license_id"),
        guest: None,
        order: "created_at, id",
    },
    Exportable {
        table: "subscription_invoices",
        columns: "id, subscription_id, license_id, payment_intent, amount_cents, currency, \
                  period_start, period_end, paid_at",
        time: "paid_at",
        license: Some("license_id"),
        guest: None,
        order: "paid_at, id",
    },
    Exportable {
        table: "access_logs",
        columns: "id, ts, license_id, guest_id, session_id, method, path, status, outcome, \
                  duration_us, bytes_in, bytes_out, client_ip, user_agent, route, units, key_id",
        time: "ts",
        license: Some("license_id"),
        guest: Some("guest_id"),
        order: "id",
    },
    Exportable {
        table: "usage_units",
        columns: "id, license_id, meter, units, charged_ms, created_at",
        time: "created_at",
        license: Some("license_id"),
        guest: None,
        order: "id",
    },
    Exportable {
        table: "usage_alerts",
        columns: "id, license_id, kind, threshold_percent, period_start, used, allowance, \
                  created_at, attempts, delivered_at, last_error",
        time: "created_at",
        license: Some("license_id"),
        guest: None,
        order: "id",
    },
    Exportable {
        table: "stripe_events",
        columns: "id, type, result, received_at",
        time: "received_at",
        license: None,
        guest: None,
        order: "received_at, id",
    },
];

/// How an export is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Csv,
    Json,
}

/// The exportable table `name`.
pub fn exportable(name: &str) -> Option<&'static Exportable> {
    EXPORTS.iter().find(|e| e.table == name)
}

/// One export: a table, a format, and the optional filters (Unix ms, license id, guest id).
#[derive(Clone)]
pub struct ExportRequest {
    pub table: &'static Exportable,
    pub format: Format,
    pub from: Option<i64>,
    pub to: Option<i64>,
    pub license: Option<i64>,
    pub guest: Option<String>,
}

/// Bytes handed to the response at a time; an export holds at most a few of these.
pub const CHUNK: usize = 64 * 1024;

/// One value of an exported row, as a backend read it.
pub enum Cell<'a> {
    Null,
    Int(i64),
    Real(f64),
    Text(std::borrow::Cow<'a, str>),
}

/// An export's bytes, the same on every backend: CSV (RFC 4180, with formulas defused) or a
/// JSON array of objects, cut into chunks of about [`CHUNK`] as rows come.
pub struct Writer {
    format: Format,
    columns: Vec<&'static str>,
    buf: Vec<u8>,
    first: bool,
}

impl Writer {
    pub fn new(spec: &Exportable, format: Format) -> Writer {
        let columns: Vec<&'static str> = spec.columns.split(',').map(str::trim).collect();
        let mut buf = Vec::with_capacity(CHUNK + 4096);
        match format {
            Format::Csv => {
                buf.extend_from_slice(columns.join(",").as_bytes());
                buf.extend_from_slice(b"\r\n");
            }
            Format::Json => buf.push(b'['),
        }
        Writer {
            format,
            columns,
            buf,
            first: true,
        }
    }

    /// How many cells a row has.
    pub fn width(&self) -> usize {
        self.columns.len()
    }

    /// Adds a row; a chunk to hand on once one has filled.
    pub fn row<'a>(&mut self, cells: impl IntoIterator<Item = Cell<'a>>) -> Option<Vec<u8>> {
        match self.format {
            Format::Csv => self.csv_row(cells),
            Format::Json => self.json_row(cells),
        }
        self.first = false;
        (self.buf.len() >= CHUNK)
            .then(|| std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK + 4096)))
    }

    /// The last chunk.
    pub fn finish(mut self) -> Vec<u8> {
        if self.format == Format::Json {
            self.buf.extend_from_slice(b"]\n");
        }
        self.buf
    }

    /// One CSV line. Text that a spreadsheet would run as a formula (`=`, `+`, `-`, `@` first)
    /// is prefixed with `'`: paths and user agents come from the internet.
    fn csv_row<'a>(&mut self, cells: impl IntoIterator<Item = Cell<'a>>) {
        use std::io::Write;
        let buf = &mut self.buf;
        for (i, cell) in cells.into_iter().enumerate() {
            if i > 0 {
                buf.push(b',');
            }
            match cell {
                Cell::Null => {}
                Cell::Int(v) => {
                    let _ = write!(buf, "{v}");
                }
                Cell::Real(v) => {
                    let _ = write!(buf, "{v}");
                }
                Cell::Text(t) => {
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
    }

    fn json_row<'a>(&mut self, cells: impl IntoIterator<Item = Cell<'a>>) {
        use std::io::Write;
        let buf = &mut self.buf;
        if !self.first {
            buf.push(b',');
        }
        buf.push(b'{');
        for (i, (name, cell)) in self.columns.iter().zip(cells).enumerate() {
            if i > 0 {
                buf.push(b',');
            }
            let _ = write!(buf, "\"{name}\":");
            match cell {
                Cell::Null => buf.extend_from_slice(b"null"),
                Cell::Int(v) => {
                    let _ = write!(buf, "{v}");
                }
                Cell::Real(v) => {
                    let _ = serde_json::to_writer(&mut *buf, &v);
                }
                Cell::Text(t) => {
                    let _ = serde_json::to_writer(&mut *buf, &*t);
                }
            }
        }
        buf.push(b'}');
    }
}
