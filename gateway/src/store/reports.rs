//! Reads for people: a license's usage statistics, its history pages, the license search. Each
//! query is answered from an index or the daily rollup, never by scanning the access log.

use rusqlite::{params, Connection, Row};
use serde_json::{json, Value};

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
}

impl UsageStats {
    pub fn to_json(&self) -> Value {
        json!({
            "days": self.days,
            "calls": self.calls,
            "successful_calls": self.ok,
            "success_rate": if self.calls == 0 {
                Value::Null
            } else {
                // four decimals; a rate for people, not an amount
                json!((self.ok as f64 / self.calls as f64 * 10_000.0).round() / 10_000.0)
            },
            "hours_used": licenses::ms_to_hours(self.used_ms),
            "top_endpoints": self.top_endpoints.iter()
                .map(|(path, calls)| json!({"path": path, "calls": calls}))
                .collect::<Vec<_>>(),
        })
    }
}

/// Calls, successes and top endpoints from the daily rollup, time used from the usage history,
/// over the last `days` days up to `now` (whole UTC days for calls, exact for time).
pub fn usage_stats(conn: &Connection, license_id: i64, days: u32, now: i64) -> Result<UsageStats> {
    let since_ms = now - i64::from(days) * 86_400_000;
    let since_day = super::flush::day_of(since_ms);
    let (calls, ok): (i64, i64) = conn
        .prepare_cached(
            "SELECT coalesce(sum(calls), 0), coalesce(sum(ok), 0) FROM access_daily
             WHERE license_id = ?1 AND day >= ?2",
        )?
        .query_row(params![license_id, since_day], |r| {
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
    let used_ms: i64 = conn
        .prepare_cached(
            "SELECT coalesce(sum(-delta_ms), 0) FROM usage_history
             WHERE license_id = ?1 AND kind = 'usage' AND created_at >= ?2",
        )?
        .query_row(params![license_id, since_ms], |r| r.get(0))?;
    Ok(UsageStats {
        days,
        calls,
        ok,
        used_ms,
        top_endpoints,
    })
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
