//! The API's JSON: every record the admin server (and the CLI's `--json`) shows, as typed
//! views of the store's plain types. The same types give the OpenAPI document its schemas
//! (`crate::openapi`), so the document cannot drift from what is sent. Times are RFC 3339,
//! amounts of time are hours (three decimals) beside their exact milliseconds where a client
//! computes with them. Never a key or its hash.

use gateway::display::BalanceUnit;
use gateway::license::{ms_to_hours, LicenseStatus};
use gateway::limits::{LimitView, Unit};
use gateway::store::{
    Alert, BalanceChange, EndpointStats, GuestStats, HistoryItem, License, MeterStats, Payment,
    SessionRow, SystemStats, UsageStats,
};
use gateway::timefmt;
pub use serde::Serialize;
use serde_json::Number;
use utoipa::ToSchema;

fn time(ms: i64) -> String {
    timefmt::rfc3339(ms)
}

/// Whether a license's key is accepted.
#[derive(Serialize, serde::Deserialize, ToSchema, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Active,
    Revoked,
}

impl From<LicenseStatus> for Status {
    fn from(s: LicenseStatus) -> Status {
        match s {
            LicenseStatus::Active => Status::Active,
            LicenseStatus::Revoked => Status::Revoked,
        }
    }
}

/// A license. Its balance is the one the proxy sees now: the stored balance less usage metered
/// and not yet written.
#[derive(Serialize, ToSchema, Debug)]
pub struct LicenseView {
    #[schema(minimum = 1)]
    pub id: i64,
    /// The key's first characters, to tell keys apart; never the key.
    pub key_prefix: String,
    pub name: String,
    #[schema(required)]
    pub email: Option<String>,
    #[schema(required)]
    pub company: Option<String>,
    pub plan: String,
    pub status: Status,
    /// Hours left, rounded to three decimals (negative when a request finished past zero).
    pub hours_remaining: f64,
    /// Whole seconds left (rounded down): the prepaid balance.
    pub seconds_remaining: i64,
    /// On a plan that includes time: whole seconds of it left this period, spent before the
    /// prepaid balance (absent on other plans).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub included_seconds_remaining: Option<i64>,
    /// The balance as people read it, in the operator's unit (`[display] balance_unit`:
    /// `2 h 17 min`, `137 min`, `1,234 credits`; never rounded up).
    pub balance_display: String,
    pub hours_used: f64,
    #[schema(minimum = 0)]
    pub requests_total: i64,
    #[schema(required, format = DateTime)]
    pub expires_at: Option<String>,
    #[schema(format = DateTime)]
    pub created_at: String,
    #[schema(format = DateTime)]
    pub updated_at: String,
    #[schema(required, format = DateTime)]
    pub last_used_at: Option<String>,
}

impl LicenseView {
    /// The license with `remaining_ms` as its balance, shown in `unit`.
    pub fn new(l: &License, remaining_ms: i64, unit: &BalanceUnit) -> LicenseView {
        LicenseView {
            id: l.id,
            key_prefix: l.key_prefix.clone(),
            name: l.name.clone(),
            email: l.email.clone(),
            company: l.company.clone(),
            plan: l.plan.clone(),
            status: l.status.into(),
            hours_remaining: ms_to_hours(remaining_ms),
            seconds_remaining: remaining_ms.div_euclid(1000),
            included_seconds_remaining: None,
            balance_display: unit.balance(remaining_ms),
            hours_used: ms_to_hours(l.used_ms),
            requests_total: l.requests_total,
            expires_at: l.expires_at.map(time),
            created_at: time(l.created_at),
            updated_at: time(l.updated_at),
            last_used_at: l.last_used_at.map(time),
        }
    }

    /// With what its plan still includes this period (ms), on a plan that includes time.
    pub fn with_included(self, included_ms: Option<i64>) -> LicenseView {
        LicenseView {
            included_seconds_remaining: included_ms.map(|ms| ms.max(0) / 1000),
            ..self
        }
    }

    /// The license as stored (the CLI, which has no proxy beside it).
    pub fn stored(l: &License, unit: &BalanceUnit) -> LicenseView {
        LicenseView::new(l, l.balance_ms, unit)
    }
}

/// A license with its key, which is shown this once (creation and rotation).
#[derive(Serialize, ToSchema, Debug)]
pub struct LicenseWithKey {
    #[serde(flatten)]
    pub license: LicenseView,
    /// The license key. Only its hash is kept: store it now.
    pub license_key: String,
}

/// One of a license's keys (several keys open one license: one balance, one plan). Never the
/// key itself.
#[derive(Serialize, ToSchema, Debug)]
pub struct KeyView {
    #[schema(minimum = 1)]
    pub id: i64,
    #[schema(minimum = 1)]
    pub license_id: i64,
    /// The key's first characters, to tell keys apart.
    pub key_prefix: String,
    /// What the key is for (a developer, an environment, a machine); a license's first key is
    /// `default`.
    pub name: String,
    pub status: Status,
    /// When the key stops working (its license and other keys work on); none: with its
    /// license.
    #[schema(format = DateTime, required)]
    pub expires_at: Option<String>,
    /// The key's own limits, beside its license's plan.
    pub limits: KeyLimitsView,
    /// Its newest request, as the flushes have written it (none: never used).
    #[schema(format = DateTime, required)]
    pub last_used_at: Option<String>,
    #[schema(format = DateTime)]
    pub created_at: String,
    #[schema(format = DateTime)]
    pub updated_at: String,
}

/// A key's own limits (null: none of the key's own; the plan's hold).
#[derive(Serialize, ToSchema, Debug)]
pub struct KeyLimitsView {
    #[schema(required, minimum = 1)]
    pub requests_per_second: Option<u32>,
    #[schema(required, minimum = 1)]
    pub max_concurrent: Option<u32>,
    #[schema(required, minimum = 1)]
    pub max_seconds_per_day: Option<i64>,
}

impl From<&gateway::store::LicenseKey> for KeyView {
    fn from(k: &gateway::store::LicenseKey) -> KeyView {
        let l = &k.limits;
        KeyView {
            id: k.id,
            license_id: k.license_id,
            key_prefix: k.key_prefix.clone(),
            name: k.name.clone(),
            status: k.status.into(),
            expires_at: k.expires_at.map(time),
            limits: KeyLimitsView {
                requests_per_second: l.requests_per_second,
                max_concurrent: l.max_concurrent,
                max_seconds_per_day: l.max_seconds_per_day,
            },
            last_used_at: k.last_used_at.map(time),
            created_at: time(k.created_at),
            updated_at: time(k.updated_at),
        }
    }
}

/// A key with its secret, which is shown this once (a key added or rotated).
#[derive(Serialize, ToSchema, Debug)]
pub struct KeyWithSecret {
    #[serde(flatten)]
    pub key: KeyView,
    /// The license key. Only its hash is kept: store it now.
    pub license_key: String,
}

/// A license's keys, oldest first, revoked ones too.
#[derive(Serialize, ToSchema, Debug)]
pub struct KeyList {
    pub license_id: i64,
    pub keys: Vec<KeyView>,
}

/// A page of licenses, newest first.
#[derive(Serialize, ToSchema, Debug)]
pub struct LicenseList {
    pub licenses: Vec<LicenseView>,
    /// Pass as `cursor` for the next page; null on the last.
    #[schema(required)]
    pub next_cursor: Option<String>,
}

/// The customer's own license, with the usage metered and not yet written.
#[derive(Serialize, ToSchema, Debug)]
pub struct Me {
    #[serde(flatten)]
    pub license: LicenseView,
    /// Present while this node holds usage not yet written to the database.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unflushed: Option<Unflushed>,
    /// Units of each meter the app reported and was charged for, the last 30 days.
    pub meters: Vec<MeterView>,
}

#[derive(Serialize, ToSchema, Debug)]
pub struct Unflushed {
    pub charged_ms: i64,
    pub requests: i64,
}

/// A Checkout payment.
#[derive(Serialize, ToSchema, Debug)]
pub struct PaymentView {
    pub id: i64,
    pub license_id: i64,
    /// Stripe's Checkout Session id.
    pub session_id: String,
    #[schema(required)]
    pub package_id: Option<String>,
    pub hours: f64,
    pub amount_cents: i64,
    pub currency: String,
    /// `pending`, `paid`, `expired`, `refunded`, `partially_refunded` or `disputed`.
    pub status: String,
    pub refunded_cents: i64,
    pub hours_refunded: f64,
    #[schema(format = DateTime)]
    pub created_at: String,
    #[schema(required, format = DateTime)]
    pub paid_at: Option<String>,
    #[schema(required)]
    pub paid_cents: Option<i64>,
    #[schema(required)]
    pub hours_credited: Option<f64>,
    /// Why the amount paid differed from the price, when it did.
    #[schema(required)]
    pub mismatch: Option<String>,
}

impl From<&Payment> for PaymentView {
    fn from(p: &Payment) -> PaymentView {
        PaymentView {
            id: p.id,
            license_id: p.license_id,
            session_id: p.session_id.clone(),
            package_id: p.package_id.clone(),
            hours: ms_to_hours(p.hours_ms),
            amount_cents: p.amount_cents,
            currency: p.currency.clone(),
            status: p.status.clone(),
            refunded_cents: p.refunded_cents,
            hours_refunded: ms_to_hours(p.refunded_ms),
            created_at: time(p.created_at),
            paid_at: p.paid_at.map(time),
            paid_cents: p.paid_cents,
            hours_credited: p.credited_ms.map(ms_to_hours),
            mismatch: p.mismatch.clone(),
        }
    }
}

/// A change of balance: a credit, a deduction, a refund, a flush's usage.
#[derive(Serialize, ToSchema, Debug)]
pub struct BalanceChangeView {
    pub id: i64,
    /// `usage`, `credit`, `debit`, `payment`, `refund`, …
    pub kind: String,
    pub hours: f64,
    pub delta_ms: i64,
    pub balance_after_hours: f64,
    pub balance_after_ms: i64,
    pub requests: i64,
    #[schema(required)]
    pub reason: Option<String>,
    #[schema(format = DateTime)]
    pub created_at: String,
}

impl From<&BalanceChange> for BalanceChangeView {
    fn from(c: &BalanceChange) -> BalanceChangeView {
        BalanceChangeView {
            id: c.id,
            kind: c.kind.clone(),
            hours: ms_to_hours(c.delta_ms),
            delta_ms: c.delta_ms,
            balance_after_hours: ms_to_hours(c.balance_after_ms),
            balance_after_ms: c.balance_after_ms,
            requests: c.requests,
            reason: c.reason.clone(),
            created_at: time(c.created_at),
        }
    }
}

/// A usage session (session metering).
#[derive(Serialize, ToSchema, Debug)]
pub struct SessionView {
    pub id: String,
    #[schema(format = DateTime)]
    pub started_at: String,
    #[schema(format = DateTime)]
    pub last_activity_at: String,
    #[schema(required, format = DateTime)]
    pub ended_at: Option<String>,
    pub open: bool,
    pub hours: f64,
    pub charged_ms: i64,
    pub requests: i64,
    pub bytes_in: i64,
    pub bytes_out: i64,
}

impl From<&SessionRow> for SessionView {
    fn from(s: &SessionRow) -> SessionView {
        SessionView {
            id: s.id.clone(),
            started_at: time(s.started_at),
            last_activity_at: time(s.last_activity_at),
            ended_at: s.ended_at.map(time),
            open: s.ended_at.is_none(),
            hours: ms_to_hours(s.charged_ms),
            charged_ms: s.charged_ms,
            requests: s.requests,
            bytes_in: s.bytes_in,
            bytes_out: s.bytes_out,
        }
    }
}

/// One entry of a history page: a balance change, a payment or a session (each has fields the
/// others lack: `kind`, `session_id`, `started_at`).
#[derive(Serialize, ToSchema, Debug)]
#[serde(untagged)]
pub enum HistoryItemView {
    Change(BalanceChangeView),
    Payment(PaymentView),
    Session(SessionView),
}

impl From<&HistoryItem> for HistoryItemView {
    fn from(item: &HistoryItem) -> HistoryItemView {
        match item {
            HistoryItem::Change(c) => HistoryItemView::Change(c.into()),
            HistoryItem::Payment(p) => HistoryItemView::Payment(p.into()),
            HistoryItem::Session(s) => HistoryItemView::Session(s.into()),
        }
    }
}

/// A page of a license's history, newest first.
#[derive(Serialize, ToSchema, Debug)]
pub struct HistoryPage {
    pub license_id: i64,
    /// The `type` asked for.
    #[serde(rename = "type")]
    pub kind: HistoryType,
    pub items: Vec<HistoryItemView>,
    /// Pass as `before` for the next page; null on the last.
    #[schema(required)]
    pub next_before: Option<i64>,
}

/// Which entries a history page holds.
#[derive(Serialize, serde::Deserialize, ToSchema, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum HistoryType {
    All,
    Usage,
    Payments,
    Sessions,
}

/// One limit of a plan (`/usage/limits`): its use, what remains and when it resets. Time is in
/// hours (`max`, `used`, `remaining`) beside its exact milliseconds (`*_ms`); counts and bytes
/// are whole numbers.
#[derive(Serialize, ToSchema, Debug)]
pub struct LimitLine {
    /// The config key it comes from (`requests_per_minute`, `max_upload_bytes_per_day`, …).
    pub limit: &'static str,
    #[schema(value_type = f64)]
    pub max: Number,
    /// Absent for limits on one request (the body size).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<f64>)]
    pub used: Option<Number>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<f64>)]
    pub remaining: Option<Number>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_ms: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub used_ms: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remaining_ms: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(format = DateTime)]
    pub period_start: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(format = DateTime)]
    pub resets_at: Option<String>,
}

fn hours_number(ms: i64) -> Number {
    Number::from_f64(ms_to_hours(ms)).unwrap_or_else(|| Number::from(0))
}

impl From<&LimitView> for LimitLine {
    fn from(v: &LimitView) -> LimitLine {
        let hours = v.unit == Unit::Milliseconds;
        let amount = |x: i64| {
            if hours {
                hours_number(x)
            } else {
                Number::from(x)
            }
        };
        let counted = v.used.zip(v.remaining);
        let ms = |x: Option<i64>| x.filter(|_| hours && counted.is_some());
        LimitLine {
            limit: v.name,
            max: if counted.is_some() {
                amount(v.max)
            } else {
                Number::from(v.max)
            },
            used: counted.map(|(u, _)| amount(u)),
            remaining: counted.map(|(_, r)| amount(r)),
            max_ms: ms(Some(v.max)),
            used_ms: ms(v.used),
            remaining_ms: ms(v.remaining),
            period_start: v.window_start.map(time),
            resets_at: v.resets_at.map(time),
        }
    }
}

/// A usage alert, as its webhook announces it.
#[derive(Serialize, ToSchema, Debug)]
pub struct AlertView {
    pub id: i64,
    /// Always `usage.threshold_crossed`.
    #[serde(rename = "type")]
    pub event: &'static str,
    pub license_id: i64,
    /// `period_time`, `period_requests` or `balance`.
    pub kind: String,
    pub threshold_percent: i64,
    /// Milliseconds or requests, as `kind` says.
    pub used: i64,
    pub allowance: i64,
    #[schema(format = DateTime)]
    pub period_start: String,
    #[schema(format = DateTime)]
    pub created_at: String,
}

impl From<&Alert> for AlertView {
    fn from(a: &Alert) -> AlertView {
        AlertView {
            id: a.id,
            event: gateway::alerts::EVENT_TYPE,
            license_id: a.license_id,
            kind: a.kind.clone(),
            threshold_percent: a.threshold_percent,
            used: a.used,
            allowance: a.allowance,
            period_start: time(a.period_start),
            created_at: time(a.created_at),
        }
    }
}

fn rate(ok: i64, calls: i64) -> Option<f64> {
    // four decimals; a rate for people, not an amount
    (calls != 0).then(|| (ok as f64 / calls as f64 * 10_000.0).round() / 10_000.0)
}

fn day_text(day: i64) -> String {
    let (y, m, d) = timefmt::civil_from_days(day);
    format!("{y:04}-{m:02}-{d:02}")
}

/// A license's usage over the last `days` days, from the rollups.
#[derive(Serialize, ToSchema, Debug)]
pub struct UsageStatsView {
    pub days: u32,
    pub calls: i64,
    pub successful_calls: i64,
    /// Successful calls over calls, four decimals; null without calls.
    #[schema(required)]
    pub success_rate: Option<f64>,
    pub hours_used: f64,
    /// Time deducted by hand in the window (`POST /api/licenses/{id}/usage`): taken off the
    /// balance as a correction, not time used, so not in `hours_used` nor in any plan
    /// allowance.
    pub hours_debited: f64,
    pub debited_ms: i64,
    pub top_endpoints: Vec<EndpointCalls>,
    #[schema(required)]
    pub latency_p50_ms: Option<f64>,
    #[schema(required)]
    pub latency_p95_ms: Option<f64>,
    /// One entry per UTC day with calls or usage, oldest first.
    pub daily: Vec<DayView>,
    /// Units of each meter the app reported and was charged for in the window.
    pub meters: Vec<MeterView>,
    /// Calls by each of the license's keys in the window, busiest first (from the access log,
    /// so within `storage.access_log_retention_days`).
    pub keys: Vec<KeyCalls>,
}

/// One key's calls over a window.
#[derive(Serialize, ToSchema, Debug)]
pub struct KeyCalls {
    pub key_id: i64,
    /// The key's name.
    #[schema(required)]
    pub name: Option<String>,
    pub calls: i64,
    /// Calls answered with a status below 400.
    pub successful_calls: i64,
    /// The request time of its calls, in seconds (three decimals).
    pub request_seconds: f64,
}

/// A meter's use over a window.
#[derive(Serialize, ToSchema, Debug)]
pub struct MeterView {
    pub meter: String,
    pub units: i64,
    /// The balance they took.
    pub charged_ms: i64,
}

impl From<&MeterStats> for MeterView {
    fn from(m: &MeterStats) -> MeterView {
        MeterView {
            meter: m.meter.clone(),
            units: m.units,
            charged_ms: m.charged_ms,
        }
    }
}

/// Calls to one path with one method answered with one status class (so "files uploaded"
/// and "files failed" are a status class apart).
#[derive(Serialize, ToSchema, Debug)]
pub struct EndpointCalls {
    pub path: String,
    #[schema(example = "POST")]
    pub method: String,
    /// `2xx`, `4xx`, …; `none` when no answer was written (the client left first).
    #[schema(example = "2xx")]
    pub status_class: String,
    /// The `[[routes]]` entry the path and method are on now; null: none.
    #[schema(required, example = "/transcribe")]
    pub route: Option<String>,
    pub calls: i64,
}

impl From<&EndpointStats> for EndpointCalls {
    fn from(e: &EndpointStats) -> EndpointCalls {
        EndpointCalls {
            path: e.path.clone(),
            method: e.method.clone(),
            status_class: match e.class {
                1..=5 => format!("{}xx", e.class),
                _ => "none".to_string(),
            },
            route: None,
            calls: e.calls,
        }
    }
}

/// Names each endpoint's route, as the proxy matches it now.
pub fn name_routes(endpoints: &mut [EndpointCalls], routes: &gateway::routes::Routes) {
    for e in endpoints {
        e.route = routes
            .find(&e.method, &e.path)
            .map(|i| routes.get(i).path.clone());
    }
}

/// One guest's calls over the window, and by day (`/api/stats`).
#[derive(Serialize, ToSchema, Debug)]
pub struct GuestView {
    pub guest: String,
    pub calls: i64,
    /// Answered with a status below 400.
    pub successful_calls: i64,
    pub bytes_in: i64,
    pub bytes_out: i64,
    /// One entry per UTC day with calls, oldest first.
    pub daily: Vec<GuestDayView>,
}

#[derive(Serialize, ToSchema, Debug)]
pub struct GuestDayView {
    #[schema(format = Date)]
    pub date: String,
    pub calls: i64,
    pub successful_calls: i64,
    pub bytes_in: i64,
    pub bytes_out: i64,
}

impl From<&GuestStats> for GuestView {
    fn from(g: &GuestStats) -> GuestView {
        GuestView {
            guest: g.guest.clone(),
            calls: g.calls,
            successful_calls: g.ok,
            bytes_in: g.bytes_in,
            bytes_out: g.bytes_out,
            daily: g
                .daily
                .iter()
                .map(|d| GuestDayView {
                    date: day_text(d.day),
                    calls: d.calls,
                    successful_calls: d.ok,
                    bytes_in: d.bytes_in,
                    bytes_out: d.bytes_out,
                })
                .collect(),
        }
    }
}

#[derive(Serialize, ToSchema, Debug)]
pub struct DayView {
    #[schema(format = Date)]
    pub date: String,
    pub calls: i64,
    pub successful_calls: i64,
    pub hours_used: f64,
}

impl From<&UsageStats> for UsageStatsView {
    fn from(s: &UsageStats) -> UsageStatsView {
        let ms = |v: Option<f64>| v.map(|v| (v * 100.0).round() / 100.0);
        UsageStatsView {
            days: s.days,
            calls: s.calls,
            successful_calls: s.ok,
            success_rate: rate(s.ok, s.calls),
            hours_used: ms_to_hours(s.used_ms),
            hours_debited: ms_to_hours(s.debited_ms),
            debited_ms: s.debited_ms,
            top_endpoints: s.top_endpoints.iter().map(EndpointCalls::from).collect(),
            latency_p50_ms: ms(s.p50_ms),
            latency_p95_ms: ms(s.p95_ms),
            daily: s
                .daily
                .iter()
                .map(|d| DayView {
                    date: day_text(d.day),
                    calls: d.calls,
                    successful_calls: d.ok,
                    hours_used: ms_to_hours(d.charged_ms),
                })
                .collect(),
            meters: s.meters.iter().map(MeterView::from).collect(),
            keys: s
                .keys
                .iter()
                .map(|k| KeyCalls {
                    key_id: k.key_id,
                    name: k.name.clone(),
                    calls: k.calls,
                    successful_calls: k.ok,
                    request_seconds: k.duration_ms as f64 / 1_000.0,
                })
                .collect(),
        }
    }
}

/// One license's statistics (`/api/licenses/{id}/stats`).
#[derive(Serialize, ToSchema, Debug)]
pub struct LicenseStats {
    pub license_id: i64,
    #[serde(flatten)]
    pub stats: UsageStatsView,
}

/// The whole gateway's statistics over the last `days` days.
#[derive(Serialize, ToSchema, Debug)]
pub struct SystemStatsView {
    pub days: u32,
    /// Licenses with at least one call in the window.
    pub active_licenses: i64,
    /// Every call in the window: `licensed_calls` + `guest_calls`.
    pub calls: i64,
    pub licensed_calls: i64,
    pub guest_calls: i64,
    /// Of `calls` (licensed and guests alike), those answered `ok`.
    pub successful_calls: i64,
    /// `successful_calls` over `calls`, four decimals; null without calls.
    #[schema(required)]
    pub success_rate: Option<f64>,
    pub hours_charged: f64,
    pub charged_ms: i64,
    /// Time deducted by hand in the window (a correction of balances, not in
    /// `hours_charged`).
    pub hours_debited: f64,
    pub debited_ms: i64,
    /// Paid minus refunded, by currency, for payments paid in the window.
    pub revenue: Vec<Revenue>,
    /// The licenses charged the most time.
    pub top_licenses: Vec<TopLicense>,
    pub plans: Vec<PlanStats>,
    /// Units of each meter the apps reported and were charged for in the window, everyone
    /// together.
    pub meters: Vec<MeterView>,
    /// The busiest endpoints by method and status class, licenses and guests together.
    pub top_endpoints: Vec<EndpointCalls>,
    /// Guests (keyless clients in guest mode), the busiest first, each by day; with `guest`,
    /// that one guest only.
    pub guests: Vec<GuestView>,
}

#[derive(Serialize, ToSchema, Debug)]
pub struct Revenue {
    pub currency: String,
    pub amount_cents: i64,
    pub payments: i64,
}

#[derive(Serialize, ToSchema, Debug)]
pub struct TopLicense {
    pub license_id: i64,
    pub name: String,
    pub plan: String,
    pub hours_used: f64,
    pub requests: i64,
}

#[derive(Serialize, ToSchema, Debug)]
pub struct PlanStats {
    pub plan: String,
    pub licenses: i64,
    pub active_licenses: i64,
    pub hours_used: f64,
}

impl From<&SystemStats> for SystemStatsView {
    fn from(s: &SystemStats) -> SystemStatsView {
        SystemStatsView {
            days: s.days,
            active_licenses: s.active_licenses,
            calls: s.licensed_calls + s.guest_calls,
            licensed_calls: s.licensed_calls,
            guest_calls: s.guest_calls,
            successful_calls: s.licensed_ok + s.guest_ok,
            success_rate: rate(s.licensed_ok + s.guest_ok, s.licensed_calls + s.guest_calls),
            hours_charged: ms_to_hours(s.charged_ms),
            charged_ms: s.charged_ms,
            hours_debited: ms_to_hours(s.debited_ms),
            debited_ms: s.debited_ms,
            revenue: s
                .revenue
                .iter()
                .map(|(currency, cents, n)| Revenue {
                    currency: currency.clone(),
                    amount_cents: *cents,
                    payments: *n,
                })
                .collect(),
            top_licenses: s
                .top_licenses
                .iter()
                .map(|(id, name, plan, ms, requests)| TopLicense {
                    license_id: *id,
                    name: name.clone(),
                    plan: plan.clone(),
                    hours_used: ms_to_hours(*ms),
                    requests: *requests,
                })
                .collect(),
            plans: s
                .plans
                .iter()
                .map(|(plan, n, active, ms)| PlanStats {
                    plan: plan.clone(),
                    licenses: *n,
                    active_licenses: *active,
                    hours_used: ms_to_hours(*ms),
                })
                .collect(),
            meters: s.meters.iter().map(MeterView::from).collect(),
            top_endpoints: s.top_endpoints.iter().map(EndpointCalls::from).collect(),
            guests: Vec::new(),
        }
    }
}

/// An hour package on sale.
#[derive(Serialize, ToSchema, Debug)]
pub struct PackageView {
    pub id: String,
    pub hours: i64,
    pub price_cents: i64,
    pub currency: String,
}

/// Hours bought by the hour, between the bounds.
#[derive(Serialize, ToSchema, Debug)]
pub struct CustomPricing {
    pub price_per_hour_cents: i64,
    pub min_hours: i64,
    pub max_hours: i64,
    pub currency: String,
}

/// What is on sale.
#[derive(Serialize, ToSchema, Debug)]
pub struct Packages {
    pub packages: Vec<PackageView>,
    pub custom: CustomPricing,
    /// The plans sold as subscriptions, in `[[plans]]` order (later is higher).
    pub plans: Vec<PlanOffer>,
}

/// A plan for sale as a subscription (`POST /payments/subscribe`).
#[derive(Serialize, ToSchema, Debug)]
pub struct PlanOffer {
    pub name: String,
    /// Its price each interval, when the config gives the amount (a plan sold by a Stripe
    /// Price alone shows its price at Checkout).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub price_cents: Option<i64>,
    pub currency: String,
    /// `month` or `year`.
    pub interval: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(maximum = 730)]
    pub trial_days: Option<u64>,
    /// Whole minutes of time the plan includes each period (rounded down), spent before
    /// prepaid hours.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub included_minutes: Option<i64>,
    /// Requests the plan includes each period: a `fixed` route's price is not taken for them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub included_requests: Option<u64>,
    /// Units of each meter the plan includes each period, by meter name: not charged at the
    /// meter's price.
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub included_units: std::collections::BTreeMap<String, i64>,
}

impl PlanOffer {
    pub fn of(p: &gateway::config::Plan, meters: &[gateway::config::Meter]) -> Option<PlanOffer> {
        let price = p.price.as_ref()?;
        Some(PlanOffer {
            name: p.name.clone(),
            price_cents: price.cents,
            currency: price.currency.clone(),
            interval: price.interval,
            trial_days: p.trial_days,
            included_minutes: p.included_ms.map(|ms| ms / 60_000),
            included_requests: p.included_requests,
            included_units: meters
                .iter()
                .zip(p.included_units)
                .filter(|(_, n)| *n > 0)
                .map(|(m, n)| (m.name.clone(), n))
                .collect(),
        })
    }
}

/// A subscription Checkout Session made for the customer: send them to `checkout_url`.
#[derive(Serialize, ToSchema, Debug)]
pub struct SubscribeCreated {
    pub session_id: String,
    /// Stripe's page to subscribe on.
    pub checkout_url: String,
    pub plan: String,
}

/// Where the customer manages their subscription.
#[derive(Serialize, ToSchema, Debug)]
pub struct PortalCreated {
    /// Stripe's Customer Portal, for this customer, returning to the payment page.
    pub url: String,
}

/// A license's subscription, as the customer sees it.
#[derive(Serialize, ToSchema, Debug)]
pub struct SubscriptionView {
    pub plan: String,
    /// Stripe's status (`incomplete`, `trialing`, `active`, `past_due`, `unpaid`, `paused`,
    /// `canceled`), or `lapsed` (the grace ran out unpaid: the license is on `free`, and Stripe
    /// may still collect) or `ended` (cancelled, its paid period over).
    pub status: String,
    /// The billing period paid, RFC 3339.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub current_period_end: Option<String>,
    pub cancel_at_period_end: bool,
    /// After a failed payment: until when the plan stays.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grace_until: Option<String>,
    /// When the license returns to `free`, if it will.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ends_at: Option<String>,
}

impl From<&gateway::store::subscriptions::Subscription> for SubscriptionView {
    fn from(s: &gateway::store::subscriptions::Subscription) -> SubscriptionView {
        let at = |t: Option<i64>| t.map(gateway::timefmt::rfc3339);
        SubscriptionView {
            plan: s.plan.clone(),
            status: s.status.clone(),
            current_period_end: at(s.period_end),
            cancel_at_period_end: s.cancel_at_period_end,
            grace_until: at(s.grace_until),
            ends_at: at(s.ends_at),
        }
    }
}

/// A Checkout Session made for the customer: send them to `checkout_url`.
#[derive(Serialize, ToSchema, Debug)]
pub struct CheckoutCreated {
    pub session_id: String,
    /// Stripe's page to pay on.
    pub checkout_url: String,
    pub hours: i64,
    pub amount_cents: i64,
    pub currency: String,
}

/// Whether a Checkout payment has arrived.
#[derive(Serialize, ToSchema, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ReceiptStatus {
    /// Paid and credited (now or before).
    Paid,
    /// Not paid yet (the bank may still be confirming it).
    Processing,
}

impl ReceiptStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ReceiptStatus::Paid => "paid",
            ReceiptStatus::Processing => "processing",
        }
    }
}

/// The success page's answer as JSON. Someone with only the session id learns its status; the
/// license's key (or the browser that started the checkout) also sees the hours.
#[derive(Serialize, ToSchema, Debug)]
pub struct Receipt {
    pub session_id: String,
    pub status: ReceiptStatus,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hours: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub license_id: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hours_remaining: Option<f64>,
}

/// The webhook's answer: the event was received, and what it did.
#[derive(Serialize, ToSchema, Debug)]
pub struct WebhookAck {
    pub received: bool,
    /// `credited`, `already_paid`, `not_ours`, `duplicate`, `refunded`, `refund_held`,
    /// `refund_noop`, or why the event was ignored.
    pub result: &'static str,
}

/// The customer's balance and last 30 days.
#[derive(Serialize, ToSchema, Debug)]
pub struct Balance {
    pub license_id: i64,
    pub plan: String,
    pub status: Status,
    pub hours_remaining: f64,
    /// Whole seconds of the prepaid balance left.
    pub seconds_remaining: i64,
    /// On a plan that includes time: whole seconds of it left this period, spent first.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub included_seconds_remaining: Option<i64>,
    /// The balance as people read it, in the operator's unit (`[display] balance_unit`).
    pub balance_display: String,
    /// That unit: `hours`, `minutes` or `credits`.
    pub balance_unit: &'static str,
    /// The license's subscription, if it has had one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subscription: Option<SubscriptionView>,
    pub usage_stats: UsageStatsView,
}

/// The customer's plan limits.
#[derive(Serialize, ToSchema, Debug)]
pub struct Limits {
    pub license_id: i64,
    pub plan: String,
    pub limits: Vec<LimitLine>,
}

/// `POST /usage/check`: whether the request would be admitted now, and if not, the proxy's
/// answer to it (its status, error code, message, `Retry-After` and the allowance spent).
#[derive(Serialize, ToSchema, Debug)]
pub struct UsageCheck {
    pub allowed: bool,
    /// The status the proxy would answer (refused only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after_s: Option<i64>,
    /// The allowance used up (its `/usage/limits` name), for `quota_exceeded`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<String>,
    /// Where the license stands against each limit of its plan now.
    pub limits: Vec<LimitLine>,
}

impl UsageCheck {
    pub fn allowed(limits: Vec<LimitLine>) -> UsageCheck {
        UsageCheck {
            allowed: true,
            status: None,
            error: None,
            message: None,
            retry_after_s: None,
            limit: None,
            limits,
        }
    }
}

/// The customer's usage alerts, newest first.
#[derive(Serialize, ToSchema, Debug)]
pub struct Alerts {
    pub license_id: i64,
    pub alerts: Vec<AlertView>,
}

/// `/health`: the process answers.
#[derive(Serialize, ToSchema, Debug)]
pub struct Health {
    /// Always `ok`.
    pub status: &'static str,
}

/// `/ready`: whether the database answers.
#[derive(Serialize, ToSchema, Debug)]
pub struct Ready {
    /// `ready`, or `unavailable` (with status 503).
    pub status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<&'static str>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use gateway::keys::KeyHash;
    use gateway::license::LicenseStatus;

    #[test]
    fn a_license_never_shows_its_key_hash_and_reads_in_hours() {
        let l = License {
            id: 7,
            key_hash: KeyHash([9; 32]),
            key_prefix: "tg_abcd".into(),
            name: "Ada".into(),
            email: None,
            company: None,
            plan: "free".into(),
            status: LicenseStatus::Active,
            balance_ms: 7_200_000,
            used_ms: 36_000,
            requests_total: 3,
            version: 1,
            expires_at: None,
            created_at: 0,
            updated_at: 0,
            last_used_at: None,
            keys_version: 0,
            period_anchor: 0,
        };
        let v = serde_json::to_value(LicenseView::stored(&l, &BalanceUnit::Hours)).unwrap();
        assert_eq!(v["hours_remaining"], 2.0);
        assert_eq!(v["seconds_remaining"], 7_200);
        assert_eq!(v["hours_used"], 0.01);
        let text = v.to_string();
        assert!(!text.contains(&hex::encode([9u8; 32])), "{text}");
        assert!(!text.contains("key_hash"), "{text}");
    }

    #[test]
    fn an_alert_reads_in_the_api_as_its_webhook_announces_it() {
        let a = Alert {
            id: 3,
            license_id: 7,
            kind: "period_time".into(),
            threshold_percent: 80,
            period_start: 1_700_000_000_000,
            used: 2_880_000,
            allowance: 3_600_000,
            created_at: 1_700_000_100_000,
            attempts: 1,
            delivered_at: None,
        };
        let listed = serde_json::to_value(AlertView::from(&a)).unwrap();
        assert_eq!(listed, gateway::alerts::payload(&a));
    }
}
