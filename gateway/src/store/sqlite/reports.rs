//! Reads for people: a license's usage statistics, its history pages, the license search. Each
//! query is answered from an index or the daily rollup, never by scanning the access log.

use super::licenses;
use super::Result;
use crate::store::rollup::{self, day_of, quantile_ms, LATENCY_BUCKETS};
use crate::store::{
    AccessRow, BalanceChange, DayStats, EndpointStats, GuestDay, GuestStats, HistoryItem,
    HistoryKind, KeyStats, License, LicenseFilter, MeterStats, Page, SessionRow, SystemStats,
    UsageStats,
};
use rusqlite::{params, Connection, Row};

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
    let top_endpoints = endpoint_stats(conn, Some(license_id), since_day)?;
    let day_calls: Vec<(i64, i64, i64)> = conn
        .prepare_cached(
            "SELECT day, sum(calls), sum(ok) FROM access_daily
             WHERE license_id = ?1 AND day >= ?2 GROUP BY day",
        )?
        .query_map(params![license_id, since_day], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })?
        .collect::<rusqlite::Result<_>>()?;
    let charged: Vec<(i64, i64)> = conn
        .prepare_cached(
            "SELECT day, charged_ms FROM usage_daily WHERE license_id = ?1 AND day >= ?2",
        )?
        .query_map(params![license_id, since_day], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })?
        .collect::<rusqlite::Result<_>>()?;
    let used_ms = charged.iter().map(|(_, ms)| ms).sum();
    let debited_ms: i64 = conn
        .prepare_cached(
            "SELECT coalesce(sum(-delta_ms), 0) FROM usage_history
             WHERE license_id = ?1 AND kind = 'debit' AND created_at >= ?2",
        )?
        .query_row(params![license_id, since_day * 86_400_000], |r| r.get(0))?;
    let meters = meter_stats(conn, Some(license_id), since_day * 86_400_000)?;
    let keys = conn
        .prepare_cached(KEY_STATS)?
        .query_map(params![license_id, since_day], |r| {
            Ok(KeyStats {
                key_id: r.get(0)?,
                name: r.get(1)?,
                calls: r.get(2)?,
                ok: r.get(3)?,
                duration_ms: r.get(4)?,
            })
        })?
        .collect::<rusqlite::Result<_>>()?;
    Ok(UsageStats {
        meters,
        keys,
        days,
        calls,
        ok,
        used_ms,
        debited_ms,
        top_endpoints,
        p50_ms: quantile_ms(&hist, 0.5),
        p95_ms: quantile_ms(&hist, 0.95),
        daily: rollup::merge_days(day_calls, charged),
    })
}

/// A license's calls by key since day `?2`, busiest first, from the per-key rollup
/// (postgres/reports.rs reads them alike).
const KEY_STATS: &str =
    "SELECT d.key_id, k.name, sum(d.calls), sum(d.ok), sum(d.duration_us) / 1000
     FROM key_daily d LEFT JOIN license_keys k ON k.id = d.key_id
     WHERE d.license_id = ?1 AND d.day >= ?2
     GROUP BY d.key_id, k.name ORDER BY sum(d.calls) DESC, d.key_id";

/// Units of each meter charged since `since` (Unix ms), of one license or of everyone.
fn meter_stats(conn: &Connection, license: Option<i64>, since: i64) -> Result<Vec<MeterStats>> {
    Ok(conn
        .prepare_cached(
            "SELECT meter, sum(units), sum(charged_ms) FROM usage_units
             WHERE (?1 IS NULL OR license_id = ?1) AND created_at >= ?2
             GROUP BY meter ORDER BY meter",
        )?
        .query_map(params![license, since], |r| {
            Ok(MeterStats {
                meter: r.get(0)?,
                units: r.get(1)?,
                charged_ms: r.get(2)?,
            })
        })?
        .collect::<rusqlite::Result<_>>()?)
}

/// The busiest (path, method, status class) since `since_day`: one license's (guest rows
/// apart), or everyone's.
fn endpoint_stats(
    conn: &Connection,
    license: Option<i64>,
    since_day: i64,
) -> Result<Vec<EndpointStats>> {
    Ok(conn
        .prepare_cached(
            "SELECT path, method, class, sum(calls) AS n FROM endpoint_daily
             WHERE day >= ?1 AND (?2 IS NULL OR (license_id = ?2 AND guest = ''))
             GROUP BY path, method, class ORDER BY n DESC, path, method, class LIMIT ?3",
        )?
        .query_map(params![since_day, license, rollup::TOP_ENDPOINTS], |r| {
            Ok(EndpointStats {
                path: r.get(0)?,
                method: r.get(1)?,
                class: r.get(2)?,
                calls: r.get(3)?,
            })
        })?
        .collect::<rusqlite::Result<_>>()?)
}

/// Guests' calls by day since the window's first day: the busiest, or the one named.
pub fn guest_stats(
    conn: &Connection,
    days: u32,
    now: i64,
    guest: Option<&str>,
) -> Result<Vec<GuestStats>> {
    let since_day = day_of(now) - i64::from(days) + 1;
    let rows = conn
        .prepare_cached(
            "SELECT guest, day, sum(calls), sum(CASE WHEN class BETWEEN 1 AND 3 THEN calls ELSE 0 END),
                 sum(bytes_in), sum(bytes_out)
             FROM endpoint_daily
             WHERE license_id = 0 AND day >= ?1 AND guest IN (
                 SELECT guest FROM endpoint_daily
                 WHERE license_id = 0 AND guest <> '' AND day >= ?1 AND (?2 IS NULL OR guest = ?2)
                 GROUP BY guest ORDER BY sum(calls) DESC, guest LIMIT ?3)
             GROUP BY guest, day",
        )?
        .query_map(params![since_day, guest, rollup::TOP_GUESTS as i64], |r| {
            Ok((
                r.get(0)?,
                GuestDay {
                    day: r.get(1)?,
                    calls: r.get(2)?,
                    ok: r.get(3)?,
                    bytes_in: r.get(4)?,
                    bytes_out: r.get(5)?,
                },
            ))
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(rollup::guests(rows, rollup::TOP_GUESTS))
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
    let (mut active, mut licensed, mut licensed_ok, mut guests, mut guest_ok) = (0, 0, 0, 0, 0);
    while let Some(r) = rows.next()? {
        if r.get::<_, bool>(0)? {
            guests = r.get(1)?;
            guest_ok = r.get(2)?;
        } else {
            licensed = r.get(1)?;
            licensed_ok = r.get(2)?;
            active = r.get(3)?;
        }
    }
    let charged_ms: i64 = conn
        .prepare_cached("SELECT coalesce(sum(charged_ms), 0) FROM usage_daily WHERE day >= ?1")?
        .query_row([since_day], |r| r.get(0))?;
    let debited_ms: i64 = conn
        .prepare_cached(
            "SELECT coalesce(sum(-delta_ms), 0) FROM usage_history
             WHERE kind = 'debit' AND created_at >= ?1",
        )?
        .query_row([since_ms], |r| r.get(0))?;
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
    let meters = meter_stats(conn, None, since_ms)?;
    let top_endpoints = endpoint_stats(conn, None, since_day)?;
    Ok(SystemStats {
        top_endpoints,
        meters,
        days,
        active_licenses: active,
        licensed_calls: licensed,
        licensed_ok,
        guest_calls: guests,
        guest_ok,
        charged_ms,
        debited_ms,
        revenue,
        top_licenses,
        plans,
    })
}

/// Calls and time charged per UTC day over the last `days` days, all licenses and guests
/// together (the dashboard's charts), oldest first; days without any are left out.
pub fn system_daily(conn: &Connection, days: u32, now: i64) -> Result<Vec<DayStats>> {
    let since_day = day_of(now) - i64::from(days) + 1;
    let calls: Vec<(i64, i64, i64)> = conn
        .prepare_cached(
            "SELECT day, sum(calls), sum(ok) FROM access_daily WHERE day >= ?1 GROUP BY day",
        )?
        .query_map([since_day], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
        .collect::<rusqlite::Result<_>>()?;
    let charged: Vec<(i64, i64)> = conn
        .prepare_cached(
            "SELECT day, sum(charged_ms) FROM usage_daily WHERE day >= ?1 GROUP BY day",
        )?
        .query_map([since_day], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?;
    Ok(rollup::merge_days(calls, charged))
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

fn history_row(r: &Row<'_>) -> rusqlite::Result<(i64, HistoryItem)> {
    let id: i64 = r.get(0)?;
    Ok((
        id,
        HistoryItem::Change(BalanceChange {
            id,
            kind: r.get(1)?,
            delta_ms: r.get(2)?,
            balance_after_ms: r.get(3)?,
            requests: r.get(4)?,
            reason: r.get(5)?,
            created_at: r.get(6)?,
        }),
    ))
}

fn session_row(r: &Row<'_>) -> rusqlite::Result<(i64, HistoryItem)> {
    Ok((
        r.get(0)?,
        HistoryItem::Session(SessionRow {
            id: r.get(1)?,
            started_at: r.get(2)?,
            last_activity_at: r.get(3)?,
            charged_ms: r.get(4)?,
            ended_at: r.get(5)?,
            requests: r.get(6)?,
            bytes_in: r.get(7)?,
            bytes_out: r.get(8)?,
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
    let rows: Vec<(i64, HistoryItem)> = match kind {
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
                .map(|p| (p.id, HistoryItem::Payment(p)))
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
    use crate::store::sqlite::open_migrated;
    use crate::store::{Adjustment, NewLicense};

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
        let HistoryItem::Change(newest) = &p.items[0] else {
            panic!("{:?}", p.items[0]);
        };
        assert_eq!(newest.delta_ms, 5000);
        let rest = history(&c, l.id, HistoryKind::All, 3, p.next_before).unwrap();
        assert_eq!(rest.items.len(), 2);
        assert_eq!(rest.next_before, None);
        assert!(history(&c, l.id, HistoryKind::Usage, 3, None)
            .unwrap()
            .items
            .is_empty());
    }
}
