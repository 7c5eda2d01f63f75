//! Reads for people: a license's usage statistics, its history pages, the license search. Each
//! query is answered from an index or the daily rollup, never by scanning the access log.

use rusqlite::{params, Connection, Row};
use serde_json::{json, Value};

use super::flush::{day_of, LATENCY_BOUNDS_US, LATENCY_BUCKETS};
use super::licenses::{self, License};
use super::Result;
use crate::timefmt;

/// A license's usage over a window.
#[derive(Clone, Debug, PartialEq)]
pub struct UsageStats {
    pub days: u32,
    pub calls: i64,
    pub ok: i64,
    pub used_ms: i64,
    /// The busiest paths with their call counts, busiest first.
    pub top_endpoints: Vec<(String, i64)>,
    /// Request latency quantiles (ms), estimated from the rollup's histogram.
    pub p50_ms: Option<f64>,
    pub p95_ms: Option<f64>,
    /// One entry per UTC day with calls or usage, oldest first.
    pub daily: Vec<DayStats>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DayStats {
    pub day: i64,
    pub calls: i64,
    pub ok: i64,
    pub charged_ms: i64,
}

fn rate(ok: i64, calls: i64) -> Value {
    if calls == 0 {
        Value::Null
    } else {
        // four decimals; a rate for people, not an amount
        json!((ok as f64 / calls as f64 * 10_000.0).round() / 10_000.0)
    }
}

fn day_text(day: i64) -> String {
    let (y, m, d) = timefmt::civil_from_days(day);
    format!("{y:04}-{m:02}-{d:02}")
}

impl UsageStats {
    pub fn to_json(&self) -> Value {
        let ms = |v: Option<f64>| v.map(|v| (v * 100.0).round() / 100.0);
        json!({
            "days": self.days,
            "calls": self.calls,
            "successful_calls": self.ok,
            "success_rate": rate(self.ok, self.calls),
            "hours_used": licenses::ms_to_hours(self.used_ms),
            "top_endpoints": self.top_endpoints.iter()
                .map(|(path, calls)| json!({"path": path, "calls": calls}))
                .collect::<Vec<_>>(),
            "latency_p50_ms": ms(self.p50_ms),
            "latency_p95_ms": ms(self.p95_ms),
            "daily": self.daily.iter().map(|d| json!({
                "date": day_text(d.day),
                "calls": d.calls,
                "successful_calls": d.ok,
                "hours_used": licenses::ms_to_hours(d.charged_ms),
            })).collect::<Vec<_>>(),
        })
    }
}

/// The `q` quantile (0..1) of a latency histogram, in ms, interpolated within its bucket.
pub fn quantile_ms(hist: &[i64; LATENCY_BUCKETS], q: f64) -> Option<f64> {
    let total: i64 = hist.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = q * total as f64;
    let mut below = 0i64;
    for (i, &n) in hist.iter().enumerate() {
        if n > 0 && (below + n) as f64 >= rank {
            let lower = if i == 0 { 0 } else { LATENCY_BOUNDS_US[i - 1] } as f64;
            let Some(&upper) = LATENCY_BOUNDS_US.get(i) else {
                return Some(lower / 1_000.0); // past the last bound: at least that
            };
            let within = ((rank - below as f64) / n as f64).clamp(0.0, 1.0);
            return Some((lower + (upper as f64 - lower) * within) / 1_000.0);
        }
        below += n;
    }
    None
}

static HIST_SUM: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    (0..LATENCY_BUCKETS)
        .map(|i| format!("coalesce(sum(h{i}), 0)"))
        .collect::<Vec<_>>()
        .join(", ")
});

/// Calls, successes, latency and top endpoints from the daily rollup, time used from the daily
/// usage rollup, over the last `days` UTC days up to `now` (today included).
pub fn usage_stats(conn: &Connection, license_id: i64, days: u32, now: i64) -> Result<UsageStats> {
    let today = day_of(now);
    let since_day = today - i64::from(days) + 1;
    let mut hist = [0i64; LATENCY_BUCKETS];
    let (calls, ok): (i64, i64) = conn
        .prepare_cached(&format!(
            "SELECT coalesce(sum(calls), 0), coalesce(sum(ok), 0), {} FROM access_daily
             WHERE license_id = ?1 AND day >= ?2",
            *HIST_SUM
        ))?
        .query_row(params![license_id, since_day], |r| {
            for (i, h) in hist.iter_mut().enumerate() {
                *h = r.get(2 + i)?;
            }
            Ok((r.get(0)?, r.get(1)?))
        })?;
    let top_endpoints = conn
        .prepare_cached(
            "SELECT path, sum(calls) AS n FROM access_daily
             WHERE license_id = ?1 AND day >= ?2
             GROUP BY path ORDER BY n DESC, path LIMIT 5",
        )?
        .query_map(params![license_id, since_day], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })?
        .collect::<rusqlite::Result<_>>()?;
    let mut by_day: std::collections::BTreeMap<i64, DayStats> = std::collections::BTreeMap::new();
    let mut st = conn.prepare_cached(
        "SELECT day, sum(calls), sum(ok) FROM access_daily
         WHERE license_id = ?1 AND day >= ?2 GROUP BY day",
    )?;
    let mut rows = st.query(params![license_id, since_day])?;
    while let Some(r) = rows.next()? {
        let day: i64 = r.get(0)?;
        let d = by_day.entry(day).or_insert(DayStats {
            day,
            ..DayStats::default()
        });
        d.calls = r.get(1)?;
        d.ok = r.get(2)?;
    }
    let mut st = conn.prepare_cached(
        "SELECT day, charged_ms FROM usage_daily WHERE license_id = ?1 AND day >= ?2",
    )?;
    let mut rows = st.query(params![license_id, since_day])?;
    let mut used_ms = 0;
    while let Some(r) = rows.next()? {
        let day: i64 = r.get(0)?;
        let charged: i64 = r.get(1)?;
        used_ms += charged;
        by_day
            .entry(day)
            .or_insert(DayStats {
                day,
                ..DayStats::default()
            })
            .charged_ms = charged;
    }
    Ok(UsageStats {
        days,
        calls,
        ok,
        used_ms,
        top_endpoints,
        p50_ms: quantile_ms(&hist, 0.5),
        p95_ms: quantile_ms(&hist, 0.95),
        daily: by_day.into_values().collect(),
    })
}

/// The whole gateway over a window.
#[derive(Clone, Debug, PartialEq)]
pub struct SystemStats {
    pub days: u32,
    /// Licenses with at least one call in the window.
    pub active_licenses: i64,
    pub licensed_calls: i64,
    pub licensed_ok: i64,
    pub guest_calls: i64,
    pub charged_ms: i64,
    /// Paid minus refunded, by currency, for payments paid in the window.
    pub revenue: Vec<(String, i64, i64)>,
    /// (id, name, plan, charged ms, requests), by time charged.
    pub top_licenses: Vec<(i64, String, String, i64, i64)>,
    /// (plan, licenses, active licenses, charged ms in the window).
    pub plans: Vec<(String, i64, i64, i64)>,
}

impl SystemStats {
    pub fn to_json(&self) -> Value {
        json!({
            "days": self.days,
            "active_licenses": self.active_licenses,
            "calls": self.licensed_calls + self.guest_calls,
            "licensed_calls": self.licensed_calls,
            "guest_calls": self.guest_calls,
            "success_rate": rate(self.licensed_ok, self.licensed_calls),
            "hours_charged": licenses::ms_to_hours(self.charged_ms),
            "charged_ms": self.charged_ms,
            "revenue": self.revenue.iter().map(|(c, cents, n)| json!({
                "currency": c, "amount_cents": cents, "payments": n,
            })).collect::<Vec<_>>(),
            "top_licenses": self.top_licenses.iter().map(|(id, name, plan, ms, req)| json!({
                "license_id": id, "name": name, "plan": plan,
                "hours_used": licenses::ms_to_hours(*ms), "requests": req,
            })).collect::<Vec<_>>(),
            "plans": self.plans.iter().map(|(plan, n, active, ms)| json!({
                "plan": plan, "licenses": n, "active_licenses": active,
                "hours_used": licenses::ms_to_hours(*ms),
            })).collect::<Vec<_>>(),
        })
    }
}

/// System-wide numbers from the rollups and the payment and license tables.
pub fn system_stats(conn: &Connection, days: u32, now: i64) -> Result<SystemStats> {
    let since_day = day_of(now) - i64::from(days) + 1;
    let since_ms = since_day * 86_400_000;
    let mut st = conn.prepare_cached(
        "SELECT license_id = 0, coalesce(sum(calls), 0), coalesce(sum(ok), 0),
                count(DISTINCT license_id)
         FROM access_daily WHERE day >= ?1 GROUP BY license_id = 0",
    )?;
    let mut rows = st.query([since_day])?;
    let (mut active, mut licensed, mut licensed_ok, mut guests) = (0, 0, 0, 0);
    while let Some(r) = rows.next()? {
        if r.get::<_, bool>(0)? {
            guests = r.get(1)?;
        } else {
            licensed = r.get(1)?;
            licensed_ok = r.get(2)?;
            active = r.get(3)?;
        }
    }
    let charged_ms: i64 = conn
        .prepare_cached("SELECT coalesce(sum(charged_ms), 0) FROM usage_daily WHERE day >= ?1")?
        .query_row([since_day], |r| r.get(0))?;
    let revenue = conn
        .prepare_cached(
            "SELECT currency, sum(amount_cents - refunded_cents), count(*) FROM payment_history
             WHERE status != 'pending' AND paid_at >= ?1 GROUP BY currency ORDER BY currency",
        )?
        .query_map([since_ms], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<rusqlite::Result<_>>()?;
    let top_licenses = conn
        .prepare_cached(
            "SELECT u.license_id, l.name, l.plan, sum(u.charged_ms) AS ms, sum(u.requests)
             FROM usage_daily u JOIN licenses l ON l.id = u.license_id
             WHERE u.day >= ?1 GROUP BY u.license_id ORDER BY ms DESC, u.license_id LIMIT 10",
        )?
        .query_map([since_day], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
        })?
        .collect::<rusqlite::Result<_>>()?;
    let mut used: std::collections::HashMap<String, (i64, i64)> = std::collections::HashMap::new();
    let mut st = conn.prepare_cached(
        "SELECT l.plan, count(DISTINCT u.license_id), sum(u.charged_ms)
         FROM usage_daily u JOIN licenses l ON l.id = u.license_id
         WHERE u.day >= ?1 GROUP BY l.plan",
    )?;
    let mut rows = st.query([since_day])?;
    while let Some(r) = rows.next()? {
        used.insert(r.get(0)?, (r.get(1)?, r.get(2)?));
    }
    let plans = conn
        .prepare_cached("SELECT plan, count(*) FROM licenses GROUP BY plan ORDER BY plan")?
        .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?
        .collect::<rusqlite::Result<Vec<_>>>()?
        .into_iter()
        .map(|(plan, n)| {
            let (active, ms) = used.get(&plan).copied().unwrap_or((0, 0));
            (plan, n, active, ms)
        })
        .collect();
    Ok(SystemStats {
        days,
        active_licenses: active,
        licensed_calls: licensed,
        licensed_ok,
        guest_calls: guests,
        charged_ms,
        revenue,
        top_licenses,
        plans,
    })
}

/// Calls and time charged per UTC day over the last `days` days, all licenses and guests
/// together (the dashboard's charts), oldest first; days without any are left out.
pub fn system_daily(conn: &Connection, days: u32, now: i64) -> Result<Vec<DayStats>> {
    let since_day = day_of(now) - i64::from(days) + 1;
    let mut by_day: std::collections::BTreeMap<i64, DayStats> = std::collections::BTreeMap::new();
    let mut st = conn.prepare_cached(
        "SELECT day, sum(calls), sum(ok) FROM access_daily WHERE day >= ?1 GROUP BY day",
    )?;
    let mut rows = st.query([since_day])?;
    while let Some(r) = rows.next()? {
        let day: i64 = r.get(0)?;
        let d = by_day.entry(day).or_insert(DayStats {
            day,
            ..DayStats::default()
        });
        d.calls = r.get(1)?;
        d.ok = r.get(2)?;
    }
    let mut st = conn.prepare_cached(
        "SELECT day, sum(charged_ms) FROM usage_daily WHERE day >= ?1 GROUP BY day",
    )?;
    let mut rows = st.query([since_day])?;
    while let Some(r) = rows.next()? {
        let day: i64 = r.get(0)?;
        by_day
            .entry(day)
            .or_insert(DayStats {
                day,
                ..DayStats::default()
            })
            .charged_ms = r.get(1)?;
    }
    Ok(by_day.into_values().collect())
}

/// One access-log row, as the console lists it.
#[derive(Clone, Debug, PartialEq)]
pub struct AccessRow {
    pub ts: i64,
    pub method: String,
    pub path: String,
    pub status: i64,
    pub outcome: String,
    pub duration_us: i64,
}

/// How many of the newest access-log rows a per-license look searches: the log has no
/// per-license index (it would slow every flush), so this bounds the read.
pub const RECENT_ACCESS_WINDOW: i64 = 200_000;

/// A license's newest access-log rows among the last [`RECENT_ACCESS_WINDOW`] rows.
pub fn recent_access(conn: &Connection, license_id: i64, limit: u32) -> Result<Vec<AccessRow>> {
    let rows = conn
        .prepare_cached(
            "SELECT ts, method, path, status, outcome, duration_us FROM access_logs
             WHERE id > (SELECT coalesce(max(id), 0) FROM access_logs) - ?3
               AND license_id = ?1
             ORDER BY id DESC LIMIT ?2",
        )?
        .query_map(params![license_id, limit, RECENT_ACCESS_WINDOW], |r| {
            Ok(AccessRow {
                ts: r.get(0)?,
                method: r.get(1)?,
                path: r.get(2)?,
                status: r.get(3)?,
                outcome: r.get(4)?,
                duration_us: r.get(5)?,
            })
        })?
        .collect::<rusqlite::Result<_>>()?;
    Ok(rows)
}

/// Which history a page shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HistoryKind {
    /// Every balance change: usage, credits, debits, purchases, refunds.
    All,
    /// Usage deductions only.
    Usage,
    /// Stripe payments.
    Payments,
    /// Metered sessions.
    Sessions,
}

impl HistoryKind {
    pub fn parse(s: &str) -> Option<HistoryKind> {
        Some(match s {
            "all" => HistoryKind::All,
            "usage" => HistoryKind::Usage,
            "payments" => HistoryKind::Payments,
            "sessions" => HistoryKind::Sessions,
            _ => return None,
        })
    }
}

/// One page of history, newest first; `next_before` is the cursor for the next (older) page.
#[derive(Clone, Debug, PartialEq)]
pub struct Page {
    pub items: Vec<Value>,
    pub next_before: Option<i64>,
}

impl Page {
    fn from_rows(rows: Vec<(i64, Value)>, limit: u32) -> Page {
        let next_before = (rows.len() == limit as usize)
            .then(|| rows.last().map(|(id, _)| *id))
            .flatten();
        Page {
            items: rows.into_iter().map(|(_, v)| v).collect(),
            next_before,
        }
    }
}

fn history_row(r: &Row<'_>) -> rusqlite::Result<(i64, Value)> {
    let id: i64 = r.get(0)?;
    Ok((
        id,
        json!({
            "id": id,
            "kind": r.get::<_, String>(1)?,
            "hours": licenses::ms_to_hours(r.get(2)?),
            "delta_ms": r.get::<_, i64>(2)?,
            "balance_after_hours": licenses::ms_to_hours(r.get(3)?),
            "balance_after_ms": r.get::<_, i64>(3)?,
            "requests": r.get::<_, i64>(4)?,
            "reason": r.get::<_, Option<String>>(5)?,
            "created_at": timefmt::rfc3339(r.get(6)?),
        }),
    ))
}

fn session_row(r: &Row<'_>) -> rusqlite::Result<(i64, Value)> {
    let ended: Option<i64> = r.get(5)?;
    Ok((
        r.get(0)?,
        json!({
            "id": r.get::<_, String>(1)?,
            "started_at": timefmt::rfc3339(r.get(2)?),
            "last_activity_at": timefmt::rfc3339(r.get(3)?),
            "ended_at": ended.map(timefmt::rfc3339),
            "open": ended.is_none(),
            "hours": licenses::ms_to_hours(r.get(4)?),
            "charged_ms": r.get::<_, i64>(4)?,
            "requests": r.get::<_, i64>(6)?,
            "bytes_in": r.get::<_, i64>(7)?,
            "bytes_out": r.get::<_, i64>(8)?,
        }),
    ))
}

/// A page of a license's history of `kind`, at most `limit` items older than `before`.
pub fn history(
    conn: &Connection,
    license_id: i64,
    kind: HistoryKind,
    limit: u32,
    before: Option<i64>,
) -> Result<Page> {
    let before = before.unwrap_or(i64::MAX);
    let rows: Vec<(i64, Value)> = match kind {
        HistoryKind::All | HistoryKind::Usage => {
            let only_usage = kind == HistoryKind::Usage;
            conn.prepare_cached(
                "SELECT id, kind, delta_ms, balance_after_ms, requests, reason, created_at
                 FROM usage_history
                 WHERE license_id = ?1 AND id < ?2 AND (?3 = 0 OR kind = 'usage')
                 ORDER BY id DESC LIMIT ?4",
            )?
            .query_map(params![license_id, before, only_usage, limit], history_row)?
            .collect::<rusqlite::Result<_>>()?
        }
        HistoryKind::Payments => {
            super::payments::list_for_license(conn, license_id, limit, Some(before))?
                .into_iter()
                .map(|p| (p.id, p.to_json()))
                .collect()
        }
        HistoryKind::Sessions => conn
            .prepare_cached(
                "SELECT rowid, id, started_at, last_activity_at, charged_ms, ended_at, requests,
                        bytes_in, bytes_out
                 FROM usage_sessions WHERE license_id = ?1 AND rowid < ?2
                 ORDER BY rowid DESC LIMIT ?3",
            )?
            .query_map(params![license_id, before, limit], session_row)?
            .collect::<rusqlite::Result<_>>()?,
    };
    Ok(Page::from_rows(rows, limit))
}

/// Which licenses a list shows.
#[derive(Clone, Debug, Default)]
pub struct LicenseFilter {
    pub status: Option<String>,
    pub plan: Option<String>,
    /// Matches a substring of the name, email or company, or the start of the key prefix.
    pub search: Option<String>,
    /// Only ids below this (the cursor from the previous page).
    pub before: Option<i64>,
    pub limit: u32,
}

/// A page of licenses, newest first.
pub fn licenses(conn: &Connection, f: &LicenseFilter) -> Result<(Vec<License>, Option<i64>)> {
    let pattern = f.search.as_deref().map(|s| {
        let escaped = s
            .replace('\\', "\\\\")
            .replace('%', "\\%")
            .replace('_', "\\_");
        (format!("%{escaped}%"), format!("{escaped}%"))
    });
    let (contains, prefix) = match &pattern {
        Some((c, p)) => (Some(c.as_str()), Some(p.as_str())),
        None => (None, None),
    };
    let mut st = conn.prepare_cached(&format!(
        "SELECT {} FROM licenses
         WHERE id < ?1 AND (?2 IS NULL OR status = ?2) AND (?3 IS NULL OR plan = ?3)
           AND (?4 IS NULL OR name LIKE ?4 ESCAPE '\\' OR email LIKE ?4 ESCAPE '\\'
                OR company LIKE ?4 ESCAPE '\\' OR key_prefix LIKE ?5 ESCAPE '\\')
         ORDER BY id DESC LIMIT ?6",
        licenses::COLUMNS
    ))?;
    let rows: Vec<License> = st
        .query_map(
            params![
                f.before.unwrap_or(i64::MAX),
                f.status,
                f.plan,
                contains,
                prefix,
                f.limit
            ],
            licenses::from_row,
        )?
        .collect::<rusqlite::Result<_>>()?;
    let next = (rows.len() == f.limit as usize)
        .then(|| rows.last().map(|l| l.id))
        .flatten();
    Ok((rows, next))
}

/// Requests refused without a known license since `since` (Unix ms), by reason and client
/// address, the largest first: (reason, client address or "", requests).
pub fn refused_since(
    conn: &Connection,
    since: i64,
    limit: u32,
) -> Result<Vec<(String, String, i64)>> {
    let mut st = conn.prepare_cached(
        "SELECT reason, client_ip, sum(requests) AS n FROM refused_minutes WHERE minute >= ?1
         GROUP BY reason, client_ip ORDER BY n DESC, reason, client_ip LIMIT ?2",
    )?;
    let rows = st.query_map(rusqlite::params![since, limit], |r| {
        Ok((r.get(0)?, r.get(1)?, r.get(2)?))
    })?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::licenses::{Adjustment, NewLicense};
    use crate::store::open_migrated;

    fn db() -> (tempfile::TempDir, Connection) {
        let dir = tempfile::tempdir().unwrap();
        let c = open_migrated(&dir.path().join("t.db")).unwrap();
        (dir, c)
    }

    fn make(c: &mut Connection, name: &str, email: &str) -> License {
        licenses::create(
            c,
            &NewLicense {
                name: name.into(),
                email: Some(email.into()),
                plan: "free".into(),
                ..Default::default()
            },
            1,
        )
        .unwrap()
        .0
    }

    #[test]
    fn the_license_search_filters_escapes_and_pages() {
        let (_d, mut c) = db();
        for i in 0..5 {
            make(&mut c, &format!("Ada {i}"), &format!("ada{i}@example.com"));
        }
        let odd = make(&mut c, "100% Bob_", "bob@example.org");
        licenses::revoke(&mut c, odd.id, 2).unwrap();
        let list = |f: LicenseFilter| {
            licenses(&c, &LicenseFilter { limit: 50, ..f })
                .unwrap()
                .0
                .iter()
                .map(|l| l.name.clone())
                .collect::<Vec<_>>()
        };
        let search = |s: &str| LicenseFilter {
            search: Some(s.into()),
            ..Default::default()
        };
        assert_eq!(list(search("example.org")), ["100% Bob_"]);
        // LIKE's wildcards are matched literally
        assert_eq!(list(search("%")), ["100% Bob_"]);
        assert_eq!(list(search("_")), ["100% Bob_"]);
        assert_eq!(list(search(&odd.key_prefix[..6])).len(), 1);
        let revoked = LicenseFilter {
            status: Some("revoked".into()),
            ..Default::default()
        };
        assert_eq!(list(revoked), ["100% Bob_"]);
        // pages of two, newest first, every license once
        let mut seen = Vec::new();
        let mut before = None;
        loop {
            let (page, next) = licenses(
                &c,
                &LicenseFilter {
                    before,
                    limit: 2,
                    ..Default::default()
                },
            )
            .unwrap();
            seen.extend(page.iter().map(|l| l.id));
            match next {
                Some(n) => before = Some(n),
                None => break,
            }
        }
        assert_eq!(seen, (1..=6).rev().collect::<Vec<i64>>());
    }

    #[test]
    fn quantiles_interpolate_within_their_bucket() {
        let mut h = [0i64; LATENCY_BUCKETS];
        assert_eq!(quantile_ms(&h, 0.5), None);
        h[0] = 50; // <= 1 ms
        h[2] = 50; // 2.5..5 ms
        assert_eq!(quantile_ms(&h, 0.5), Some(1.0));
        assert_eq!(quantile_ms(&h, 0.75), Some(3.75));
        assert_eq!(quantile_ms(&h, 1.0), Some(5.0));
        let mut slow = [0i64; LATENCY_BUCKETS];
        slow[LATENCY_BUCKETS - 1] = 1;
        assert_eq!(quantile_ms(&slow, 0.95), Some(10_000.0));
    }

    #[test]
    fn history_pages_are_newest_first_and_filtered_by_kind() {
        let (_d, mut c) = db();
        let l = make(&mut c, "Ada", "a@example.com");
        for i in 1..=5 {
            licenses::adjust(&mut c, l.id, Adjustment::Credit, i * 1000, None, i).unwrap();
        }
        let p = history(&c, l.id, HistoryKind::All, 3, None).unwrap();
        assert_eq!(p.items.len(), 3);
        assert_eq!(p.items[0]["delta_ms"], 5000);
        let rest = history(&c, l.id, HistoryKind::All, 3, p.next_before).unwrap();
        assert_eq!(rest.items.len(), 2);
        assert_eq!(rest.next_before, None);
        assert!(history(&c, l.id, HistoryKind::Usage, 3, None)
            .unwrap()
            .items
            .is_empty());
    }
}
