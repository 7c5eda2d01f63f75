//! A license as the metering core sees it: its status, the row's fields the ledger keeps, and
//! what it used in a plan period. Shared by the ledger, the store and the admin server, so none
//! of them needs the others' types to speak of a license.

use crate::keys::KeyHash;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LicenseStatus {
    Active,
    Revoked,
}

impl LicenseStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            LicenseStatus::Active => "active",
            LicenseStatus::Revoked => "revoked",
        }
    }

    pub fn parse(s: &str) -> Option<LicenseStatus> {
        match s {
            "active" => Some(LicenseStatus::Active),
            "revoked" => Some(LicenseStatus::Revoked),
            _ => None,
        }
    }
}

/// What the ledger needs of a license row. `version` grows with every change to the row, so an
/// older read can never overwrite a newer one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LicenseState {
    pub id: i64,
    /// The key the row was read by (the proxy's read by key), else the license's own key.
    pub key_hash: KeyHash,
    /// The id of the key the row was read by (`license_keys.id`, told to the app as
    /// `X-Tollgate-Key-Id`); 0 when the read was not by key.
    pub key_id: i64,
    /// Grows with every change to the license's keys (added, revoked, rotated): a key held in
    /// memory at an older value is read again before it is trusted.
    pub keys_version: i64,
    pub plan: String,
    pub status: LicenseStatus,
    pub expires_at: Option<i64>,
    pub balance_ms: i64,
    pub version: i64,
    /// Where its plan periods are counted from, monthly: its creation, or the start of the
    /// billing period its subscription last paid.
    pub period_anchor: i64,
    /// Usage in the current plan period, when the read that produced this row measured it (the
    /// proxy's cache-miss read does; change polls and flushes do not).
    pub period: Option<PeriodUsage>,
    /// The balance right after the last top-up and when it was (Unix ms), when the read looked
    /// (the cache-miss read): balance alerts are percentages of it.
    pub topup: Option<(i64, i64)>,
    /// What it uploaded today (UTC), when the read looked (the cache-miss read).
    pub today: Option<DayUsage>,
    /// Units of each meter charged in the current plan period, by meter name, when the read
    /// measured the period (the cache-miss read); the ledger maps them to its meters.
    pub period_units: Vec<(String, i64)>,
    /// The rules of the key the row was read by, when it has any of its own (an expiry or a
    /// limit; the read by key looks).
    pub key_rules: Option<KeyRules>,
    /// The time its plan period (from the start given, Unix ms) had used once a flush's charge
    /// was committed, where that flush measured it (a plan that includes time).
    pub period_used: Option<(i64, i64)>,
}

impl LicenseState {
    /// The period's start and the time it used, as the row measured it (a read that measured
    /// the period, or a committed flush that did), if it did.
    pub fn period_use(&self) -> Option<(i64, i64)> {
        self.period_used
            .or(self.period.map(|p| (p.start, p.used_ms)))
    }
}

/// A key's own limits (`license_keys`), checked beside its license's plan: each bounds the key
/// alone, none gives it more than the plan does. `None` is no limit of the key's own.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KeyLimits {
    pub requests_per_second: Option<u32>,
    pub max_concurrent: Option<u32>,
    /// The request time the key may use in a UTC day, in seconds.
    pub max_seconds_per_day: Option<i64>,
}

impl KeyLimits {
    /// The limits as stored (`requests_per_second`, `max_concurrent`, `max_seconds_per_day`),
    /// read the same on every backend: a value of 0 or below (written by hand) is no limit,
    /// one past `u32` is held to it.
    pub fn from_columns(rps: Option<i64>, concurrent: Option<i64>, seconds: Option<i64>) -> Self {
        let small = |v: Option<i64>| {
            v.filter(|v| *v > 0)
                .map(|v| u32::try_from(v).unwrap_or(u32::MAX))
        };
        KeyLimits {
            requests_per_second: small(rps),
            max_concurrent: small(concurrent),
            max_seconds_per_day: seconds.filter(|v| *v > 0),
        }
    }

    /// Whether the key has a limit of its own.
    pub fn any(&self) -> bool {
        self.requests_per_second.is_some()
            || self.max_concurrent.is_some()
            || self.max_seconds_per_day.is_some()
    }
}

/// What the proxy's read by key found of the key's own rules: its expiry, its limits, and the
/// request time it used on `day` (UTC days since 1970) as the rollup had it, for its daily cap.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KeyRules {
    pub expires_at: Option<i64>,
    pub limits: KeyLimits,
    pub day: i64,
    pub day_used_us: i64,
}

/// What a license used on one UTC day.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DayUsage {
    /// Days since 1970-01-01 (UTC).
    pub day: i64,
    /// Request-body bytes of its charged requests.
    pub bytes_in: u64,
}

/// What a license used in one plan period `[start, end)`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeriodUsage {
    pub start: i64,
    pub end: i64,
    /// Time charged (not the prices of priced routes: those count in `units`).
    pub used_ms: i64,
    pub requests: i64,
    /// Units of each meter charged, by meter index.
    pub units: crate::meters::Units,
}

/// Hours for the API: milliseconds as hours with three decimals (3.6 s), never rounded up, as
/// time reads everywhere (3,599,999 ms is 0.999 h, not 1 h: a balance never reads as more than
/// is left). The exact milliseconds are beside it in every answer.
pub fn ms_to_hours(ms: i64) -> f64 {
    // `+ 0.0` turns a -0.0 into 0.0
    ms.div_euclid(3_600) as f64 / 1_000.0 + 0.0
}

#[cfg(test)]
mod hours_tests {
    use super::ms_to_hours;

    #[test]
    fn hours_are_never_rounded_up() {
        assert_eq!(ms_to_hours(3_599_999), 0.999);
        assert_eq!(ms_to_hours(3_600_000), 1.0);
        assert_eq!(ms_to_hours(5_400_000), 1.5);
        assert_eq!(ms_to_hours(3_599), 0.0);
        assert_eq!(ms_to_hours(-1), -0.001, "an overdraft reads as one");
        assert_eq!(ms_to_hours(0), 0.0);
    }
}
