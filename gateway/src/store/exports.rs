//! What may be exported (`GET /api/export/…`): the allow-list of tables and columns (never a
//! key hash), the same on every backend, and the request a backend streams out.

/// A table that may be exported: its columns (never a key hash), the column `from`/`to` filter
/// on, the one `license` filters on, and the order rows come out in.
pub struct Exportable {
    pub table: &'static str,
    pub columns: &'static str,
    pub time: &'static str,
    pub license: Option<&'static str>,
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

/// The exportable table `name`.
pub fn exportable(name: &str) -> Option<&'static Exportable> {
    EXPORTS.iter().find(|e| e.table == name)
}

/// One export: a table, a format, and the optional filters (Unix ms, license id).
#[derive(Clone, Copy)]
pub struct ExportRequest {
    pub table: &'static Exportable,
    pub format: Format,
    pub from: Option<i64>,
    pub to: Option<i64>,
    pub license: Option<i64>,
}
