//! The plain records the proxy and the ledger produce and the store writes: a license's
//! charge (usage, sessions) in one flush, access-log rows, refusal counts and usage alerts.
//! Neither side's internals: the store takes these and nothing of the ledger, so a second
//! backend implements the same commit from the same data.

use std::net::IpAddr;
use std::sync::Arc;

use http::{HeaderValue, Method};

use crate::license::LicenseState;

/// What one flush commits for one license: the usage to deduct and the sessions to write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Charge {
    pub license_id: i64,
    pub usage: Usage,
    /// Closed sessions first, then the open one if it changed. Each record's span
    /// (`started_at` to `last_activity_at`) is the session time its node has charged: where
    /// several writers meter one license, the store charges session time by these spans
    /// (`store::session_time`).
    pub sessions: Vec<SessionRecord>,
    /// The start of the plan period the charge counts in (Unix ms), where the plan has a
    /// period allowance: the usage joins no history row from before it
    /// ([`crate::store::usage::joins`]), so each period's use is a sum of whole rows.
    pub period_start: Option<i64>,
    /// The time the license's plan includes each period (ms), when it includes any: the store
    /// takes the charge's time from what the period (from `period_start`) has left of it first
    /// ([`crate::store::included::split`]), the rest from the balance.
    pub included_ms: Option<i64>,
    /// The requests and units the plan includes each period, when it includes any: the store
    /// takes the prices they pay off the charge ([`crate::store::included::waive`]), against
    /// the period from `period_start`.
    pub includes: Option<crate::store::included::Includes>,
}

/// The `usage_history.reason` of the row that gives back time charged for requests that ended
/// in the gateway's own failure.
pub const RETURNED_REASON: &str =
    "returned: the app could not be reached, did not answer, or its connection failed";

/// Usage tallied in memory and not yet committed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// What the balance is charged, net of what was given back: session time or request
    /// time, by the metering mode.
    pub charge_ms: i64,
    pub requests: i64,
    pub session_ms: i64,
    pub request_ms: i64,
    pub bytes_in: i64,
    pub bytes_out: i64,
    /// Charged by earlier flushes for requests that then ended in the gateway's own failure,
    /// and given back (already taken off `charge_ms`).
    pub returned_ms: i64,
    /// The part of `charge_ms` that is not time: the prices of `fixed` and `reported` routes.
    pub priced_ms: i64,
    /// The part of `priced_ms` that is `fixed` routes' prices (what included requests pay).
    pub fixed_ms: i64,
    /// The requests of `fixed` routes' calls (each its `requests_cost`).
    pub fixed_requests: i64,
    /// This node's estimate of what of `priced_ms` the plan's included requests and units pay
    /// ([`crate::store::included::waive`] against the period as this node counts it): what
    /// its view of the balance leaves out until the store, which decides, has committed.
    pub waived_ms: i64,
    /// What the app reported (or a route's price counted), by meter index.
    pub units: crate::meters::Units,
}

impl Usage {
    pub(crate) fn is_zero(&self) -> bool {
        *self == Usage::default()
    }

    pub(crate) fn subtract(&mut self, other: &Usage) {
        self.charge_ms -= other.charge_ms;
        self.requests -= other.requests;
        self.session_ms -= other.session_ms;
        self.request_ms -= other.request_ms;
        self.bytes_in -= other.bytes_in;
        self.bytes_out -= other.bytes_out;
        self.returned_ms -= other.returned_ms;
        self.priced_ms -= other.priced_ms;
        self.fixed_ms -= other.fixed_ms;
        self.fixed_requests -= other.fixed_requests;
        self.waived_ms -= other.waived_ms;
        for (a, b) in self.units.iter_mut().zip(&other.units) {
            *a -= b;
        }
    }

    /// The time charged: everything charged but the prices of priced routes.
    pub fn time_ms(&self) -> i64 {
        self.charge_ms - self.priced_ms
    }
}

/// A usage session as it is written to `usage_sessions` (absolute values: rewriting the same
/// record is harmless).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionRecord {
    pub id: Arc<str>,
    pub license_id: i64,
    pub started_at: i64,
    pub last_activity_at: i64,
    pub ended_at: Option<i64>,
    pub charged_ms: i64,
    pub requests: i64,
    pub bytes_in: i64,
    pub bytes_out: i64,
}

/// What the store did with one [`Charge`].
// one per charge of a flush, in a Vec the flush drops: a box each would be an allocation per
// charge for nothing
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Applied {
    /// The usage was deducted: the whole row as the deduction left it, and the time it
    /// deducted (net of what was given back; on a store several writers share, as the store
    /// decided it, which may differ from what this node measured). A flush bumps the row's
    /// version, so it must carry every field: adopting only the balance at the new version
    /// would hide a revocation or rotation committed just before it.
    Deducted(LicenseState, i64),
    /// No usage to deduct; the item's sessions were written.
    Written,
    /// The license is no longer in the store (deleted under a running gateway): nothing of the
    /// item could be written, and it was set aside so the rest of the batch could commit.
    Orphaned,
}

/// One request as it is written to `access_logs`.
///
/// Path and user agent are small owned copies, not clones of the request's `Uri` and header
/// values: those share Pingora's read buffer, and holding them until the flush kept every
/// connection from reusing its buffer (an allocation per request on the proxy thread, and a
/// cross-thread free on the flusher's).
#[derive(Clone, Debug, Default)]
pub struct AccessLog {
    /// The row counts in the daily rollups (calls, success, latency by license, path, key)
    /// but is not written to `access_logs` (`storage.access_log` keeps only errors, or a
    /// sample).
    pub summary_only: bool,
    pub ts_ms: i64,
    pub license_id: Option<i64>,
    /// The license's key it presented (`license_keys.id`).
    pub key_id: Option<i64>,
    pub session_id: Option<HeaderValue>,
    pub method: Method,
    pub path: Box<str>,
    pub status: u16,
    /// `ok`, `free`, a denial's error code, `upstream_error`, `balance_exhausted` or
    /// `allowance_exhausted` (a stream the gateway ended when the balance or the period's time
    /// allowance ran out) or `client_closed` (the client went away before its answer was
    /// delivered).
    pub outcome: &'static str,
    pub duration_us: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub client_ip: Option<IpAddr>,
    pub user_agent: Option<Box<str>>,
    /// A guest's id (client address or X-Guest-ID), for keyless requests in guest mode.
    pub guest_id: Option<std::sync::Arc<str>>,
    /// The route it was on (`[[routes]]`' path), if any.
    pub route: Option<std::sync::Arc<str>>,
    /// What a priced request was charged: `name=value, …` and `balance_ms=N`.
    pub units: Option<Box<str>>,
}

impl AccessLog {
    /// The rows of a batch that are written to `access_logs`, whole (the others count in the
    /// daily rollups only: `storage.access_log`).
    pub fn written(logs: &[AccessLog]) -> impl Iterator<Item = &AccessLog> {
        logs.iter().filter(|l| !l.summary_only)
    }
}

/// User agents longer than this are cut: a log row is not a place to store a client's essay.
pub const MAX_USER_AGENT: usize = 256;
/// Paths longer than this are cut.
pub const MAX_PATH: usize = 1024;

/// At most `max` bytes of `v` as text (invalid UTF-8 replaced), never cutting a character in
/// half.
pub fn clipped(v: &[u8], max: usize) -> Box<str> {
    let mut end = v.len().min(max);
    if end < v.len() {
        // v[end] is the first byte left out: if it continues a character, leave that one out too
        while end > 0 && v[end] & 0xC0 == 0x80 {
            end -= 1;
        }
    }
    String::from_utf8_lossy(&v[..end]).into()
}

/// Requests refused without a known license in one minute, for one reason and client address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RefusedCount {
    /// The minute's start (Unix ms).
    pub minute: i64,
    pub reason: &'static str,
    pub client_ip: Option<IpAddr>,
    pub requests: i64,
}

/// What a usage alert measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AlertKind {
    /// Time used of the plan period's allowance.
    PeriodTime,
    /// Requests used of the plan period's allowance.
    PeriodRequests,
    /// Prepaid time used since the last top-up.
    Balance,
    /// Units of a meter used of the plan period's allowance (`period_units`); its name is
    /// the kind, `period_units.<meter>`.
    PeriodUnits(&'static str),
}

impl AlertKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AlertKind::PeriodTime => "period_time",
            AlertKind::PeriodRequests => "period_requests",
            AlertKind::Balance => "balance",
            AlertKind::PeriodUnits(name) => name,
        }
    }
}

/// A threshold crossed by a request, for the flusher to record (once per period: the store
/// keeps one row per license, kind, threshold and period) and to announce.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AlertEvent {
    pub license_id: i64,
    pub kind: AlertKind,
    pub threshold: u8,
    /// The period's start, or the top-up's time for balance alerts.
    pub period_start: i64,
    /// Milliseconds or requests used, and the allowance they are a share of.
    pub used: i64,
    pub allowance: i64,
    pub at: i64,
}

/// Row counts of a committed batch, by table.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Written {
    pub usage_history: u64,
    pub usage_sessions: u64,
    pub access_logs: u64,
}
