//! Reads for people on PostgreSQL: the license search, history pages, a license's and the
//! system's statistics from the rollups, the newest access rows and the refusal counts, as
//! store/sqlite/reports.rs. Sums are cast back to `bigint` (PostgreSQL sums `bigint` as
//! `numeric`).

use std::collections::HashMap;

use tokio_postgres::types::ToSql;
use tokio_postgres::Row;

use super::licenses::{license_from_row, LICENSE_COLUMNS};
use super::{backend, PgStore};
use crate::store::rollup::{self, day_of, quantile_ms, LATENCY_BUCKETS};
use crate::store::{
    AccessRow, BalanceChange, DayStats, EndpointStats, GuestDay, GuestStats, HistoryItem,
    HistoryKind, KeyStats, License, LicenseFilter, MeterStats, Page, Result, SessionRow,
    SystemStats, UsageStats,
};

/// How many of the newest access-log rows a per-license look searches (as on SQLite: the log
/// has no per-license index).
pub const RECENT_ACCESS_WINDOW: i64 = 200_000;

impl PgStore {
    pub(super) async fn rows(&self, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>> {
        self.run(async |c| {
            let st = c.prepare_cached(sql).await.map_err(backend)?;
            c.query(&st, params).await.map_err(backend)
        })
        .await
    }

    /// A page of licenses, newest first, and the cursor of the next.
    pub async fn licenses(&self, f: LicenseFilter) -> Result<(Vec<License>, Option<i64>)> {
        let escaped = f.search.as_deref().map(|s| {
            s.replace('\\', "\\\\")
                .replace('%', "\\%")
                .replace('_', "\\_")
        });
        let contains = escaped.as_ref().map(|e| format!("%{e}%"));
        let prefix = escaped.as_ref().map(|e| format!("{e}%"));
        let before = f.before.unwrap_or(i64::MAX);
        let limit = i64::from(f.limit);
        // ILIKE: SQLite's LIKE ignores the case of ASCII letters
        let sql = format!(
            "SELECT {LICENSE_COLUMNS} FROM licenses
             WHERE id < $1 AND ($2::text IS NULL OR status = $2)
               AND ($3::text IS NULL OR plan = $3)
               AND ($4::text IS NULL OR name ILIKE $4 ESCAPE '\\' OR email ILIKE $4 ESCAPE '\\'
                    OR company ILIKE $4 ESCAPE '\\' OR key_prefix ILIKE $5 ESCAPE '\\')
             ORDER BY id DESC LIMIT $6"
        );
        let rows: Vec<License> = self
            .rows(
                &sql,
                &[&before, &f.status, &f.plan, &contains, &prefix, &limit],
            )
            .await?
            .iter()
            .map(license_from_row)
            .collect();
        let next = (rows.len() == f.limit as usize)
            .then(|| rows.last().map(|l| l.id))
            .flatten();
        Ok((rows, next))
    }

    /// A page of a license's history of `kind`, at most `limit` items older than `before`.
    pub async fn history(
        &self,
        id: i64,
        kind: HistoryKind,
        limit: u32,
        before: Option<i64>,
    ) -> Result<Page> {
        self.license(id).await?;
        let before = before.unwrap_or(i64::MAX);
        let n = i64::from(limit);
        let rows: Vec<(i64, HistoryItem)> = match kind {
            HistoryKind::All | HistoryKind::Usage => {
                let only_usage = kind == HistoryKind::Usage;
                self.rows(
                    "SELECT id, kind, delta_ms, balance_after_ms, requests, reason, created_at
                     FROM usage_history
                     WHERE license_id = $1 AND id < $2 AND (NOT $3 OR kind = 'usage')
                     ORDER BY id DESC LIMIT $4",
                    &[&id, &before, &only_usage, &n],
                )
                .await?
                .iter()
                .map(|r| {
                    let id: i64 = r.get(0);
                    let change = BalanceChange {
                        id,
                        kind: r.get(1),
                        delta_ms: r.get(2),
                        balance_after_ms: r.get(3),
                        requests: r.get(4),
                        reason: r.get(5),
                        created_at: r.get(6),
                    };
                    (id, HistoryItem::Change(change))
                })
                .collect()
            }
            HistoryKind::Payments => self
                .payments_for_license(id, limit, Some(before))
                .await?
                .into_iter()
                .map(|p| (p.id, HistoryItem::Payment(p)))
                .collect(),
            HistoryKind::Sessions => self
                .rows(
                    "SELECT seq, id, started_at, last_activity_at, charged_ms, ended_at,
                            requests, bytes_in, bytes_out
                     FROM usage_sessions WHERE license_id = $1 AND seq < $2
                     ORDER BY seq DESC LIMIT $3",
                    &[&id, &before, &n],
                )
                .await?
                .iter()
                .map(|r| {
                    let session = SessionRow {
                        id: r.get(1),
                        started_at: r.get(2),
                        last_activity_at: r.get(3),
                        charged_ms: r.get(4),
                        ended_at: r.get(5),
                        requests: r.get(6),
                        bytes_in: r.get(7),
                        bytes_out: r.get(8),
                    };
                    (r.get(0), HistoryItem::Session(session))
                })
                .collect(),
        };
        Ok(Page::from_rows(rows, limit))
    }

    /// Calls, successes, latency and top endpoints from the daily rollup, time used from the
    /// daily usage rollup, over the last `days` UTC days up to `now` (today included).
    pub async fn usage_stats(&self, id: i64, days: u32, now: i64) -> Result<UsageStats> {
        self.license(id).await?;
        let since_day = day_of(now) - i64::from(days) + 1;
        let hist_sum: Vec<String> = (0..LATENCY_BUCKETS)
            .map(|i| format!("coalesce(sum(h{i}), 0)::bigint"))
            .collect();
        let totals = self
            .rows(
                &format!(
                    "SELECT coalesce(sum(calls), 0)::bigint, coalesce(sum(ok), 0)::bigint, {}
                     FROM access_daily WHERE license_id = $1 AND day >= $2",
                    hist_sum.join(", ")
                ),
                &[&id, &since_day],
            )
            .await?;
        let t = &totals[0];
        let mut hist = [0i64; LATENCY_BUCKETS];
        for (i, h) in hist.iter_mut().enumerate() {
            *h = t.get(2 + i);
        }
        let top_endpoints = self.endpoint_stats(Some(id), since_day).await?;
        let calls: Vec<(i64, i64, i64)> = self
            .rows(
                "SELECT day, sum(calls)::bigint, sum(ok)::bigint FROM access_daily
                 WHERE license_id = $1 AND day >= $2 GROUP BY day",
                &[&id, &since_day],
            )
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect();
        let charged: Vec<(i64, i64)> = self
            .rows(
                "SELECT day, charged_ms FROM usage_daily WHERE license_id = $1 AND day >= $2",
                &[&id, &since_day],
            )
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        let used_ms = charged.iter().map(|(_, ms)| ms).sum();
        let debited_ms: i64 = self
            .rows(
                "SELECT coalesce(sum(-delta_ms), 0)::bigint FROM usage_history
                 WHERE license_id = $1 AND kind = 'debit' AND created_at >= $2",
                &[&id, &(since_day * 86_400_000)],
            )
            .await?[0]
            .get(0);
        let meters = self.meter_stats(Some(id), since_day * 86_400_000).await?;
        let keys = self
            .rows(
                "SELECT d.key_id, k.name, sum(d.calls)::bigint, sum(d.ok)::bigint,
                        (sum(d.duration_us) / 1000)::bigint
                 FROM key_daily d LEFT JOIN license_keys k ON k.id = d.key_id
                 WHERE d.license_id = $1 AND d.day >= $2
                 GROUP BY d.key_id, k.name ORDER BY sum(d.calls) DESC, d.key_id",
                &[&id, &since_day],
            )
            .await?
            .iter()
            .map(|r| KeyStats {
                key_id: r.get(0),
                name: r.get(1),
                calls: r.get(2),
                ok: r.get(3),
                duration_ms: r.get(4),
            })
            .collect();
        Ok(UsageStats {
            meters,
            keys,
            days,
            calls: t.get(0),
            ok: t.get(1),
            used_ms,
            debited_ms,
            top_endpoints,
            p50_ms: quantile_ms(&hist, 0.5),
            p95_ms: quantile_ms(&hist, 0.95),
            daily: rollup::merge_days(calls, charged),
        })
    }

    /// Units of each meter charged since `since` (Unix ms), of one license or of everyone.
    async fn meter_stats(&self, license: Option<i64>, since: i64) -> Result<Vec<MeterStats>> {
        Ok(self
            .rows(
                "SELECT meter, sum(units)::bigint, sum(charged_ms)::bigint FROM usage_units
                 WHERE ($1::bigint IS NULL OR license_id = $1) AND created_at >= $2
                 GROUP BY meter ORDER BY meter",
                &[&license, &since],
            )
            .await?
            .iter()
            .map(|r| MeterStats {
                meter: r.get(0),
                units: r.get(1),
                charged_ms: r.get(2),
            })
            .collect())
    }

    /// The busiest (path, method, status class) since `since_day`: one license's (guest
    /// rows apart), or everyone's.
    async fn endpoint_stats(
        &self,
        license: Option<i64>,
        since_day: i64,
    ) -> Result<Vec<EndpointStats>> {
        Ok(self
            .rows(
                "SELECT path, method, class, sum(calls)::bigint AS n FROM endpoint_daily
                 WHERE day >= $1 AND ($2::bigint IS NULL OR (license_id = $2 AND guest = ''))
                 GROUP BY path, method, class ORDER BY n DESC, path, method, class LIMIT $3",
                &[&since_day, &license, &rollup::TOP_ENDPOINTS],
            )
            .await?
            .iter()
            .map(|r| EndpointStats {
                path: r.get(0),
                method: r.get(1),
                class: r.get(2),
                calls: r.get(3),
            })
            .collect())
    }

    /// Guests' calls by day since the window's first day: the busiest, or the one named.
    pub async fn guest_stats(
        &self,
        days: u32,
        now: i64,
        guest: Option<String>,
    ) -> Result<Vec<GuestStats>> {
        let since_day = day_of(now) - i64::from(days) + 1;
        let rows = self
            .rows(
                "SELECT guest, day, sum(calls)::bigint,
                     sum(CASE WHEN class BETWEEN 1 AND 3 THEN calls ELSE 0 END)::bigint,
                     sum(bytes_in)::bigint, sum(bytes_out)::bigint
                 FROM endpoint_daily
                 WHERE license_id = 0 AND day >= $1 AND guest IN (
                     SELECT guest FROM endpoint_daily
                     WHERE license_id = 0 AND guest <> '' AND day >= $1
                         AND ($2::text IS NULL OR guest = $2)
                     GROUP BY guest ORDER BY sum(calls) DESC, guest LIMIT $3)
                 GROUP BY guest, day",
                &[&since_day, &guest, &(rollup::TOP_GUESTS as i64)],
            )
            .await?;
        Ok(rollup::guests(
            rows.iter().map(|r| {
                (
                    r.get(0),
                    GuestDay {
                        day: r.get(1),
                        calls: r.get(2),
                        ok: r.get(3),
                        bytes_in: r.get(4),
                        bytes_out: r.get(5),
                    },
                )
            }),
            rollup::TOP_GUESTS,
        ))
    }

    /// System-wide numbers from the rollups and the payment and license tables.
    pub async fn system_stats(&self, days: u32, now: i64) -> Result<SystemStats> {
        let since_day = day_of(now) - i64::from(days) + 1;
        let since_ms = since_day * 86_400_000;
        let (mut active, mut licensed, mut licensed_ok, mut guests, mut guest_ok) = (0, 0, 0, 0, 0);
        for r in self
            .rows(
                "SELECT license_id = 0, coalesce(sum(calls), 0)::bigint,
                        coalesce(sum(ok), 0)::bigint, count(DISTINCT license_id)
                 FROM access_daily WHERE day >= $1 GROUP BY license_id = 0",
                &[&since_day],
            )
            .await?
        {
            if r.get::<_, bool>(0) {
                guests = r.get(1);
                guest_ok = r.get(2);
            } else {
                licensed = r.get(1);
                licensed_ok = r.get(2);
                active = r.get(3);
            }
        }
        let charged_ms: i64 = self
            .rows(
                "SELECT coalesce(sum(charged_ms), 0)::bigint FROM usage_daily WHERE day >= $1",
                &[&since_day],
            )
            .await?[0]
            .get(0);
        let debited_ms: i64 = self
            .rows(
                "SELECT coalesce(sum(-delta_ms), 0)::bigint FROM usage_history
                 WHERE kind = 'debit' AND created_at >= $1",
                &[&since_ms],
            )
            .await?[0]
            .get(0);
        let revenue = self
            .rows(
                "SELECT currency, sum(amount_cents - refunded_cents)::bigint, count(*)
                 FROM payment_history WHERE status != 'pending' AND paid_at >= $1
                 GROUP BY currency ORDER BY currency",
                &[&since_ms],
            )
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect();
        let top_licenses = self
            .rows(
                "SELECT u.license_id, l.name, l.plan, sum(u.charged_ms)::bigint AS ms,
                        sum(u.requests)::bigint
                 FROM usage_daily u JOIN licenses l ON l.id = u.license_id
                 WHERE u.day >= $1 GROUP BY u.license_id, l.name, l.plan
                 ORDER BY ms DESC, u.license_id LIMIT 10",
                &[&since_day],
            )
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
            .collect();
        let mut used: HashMap<String, (i64, i64)> = HashMap::new();
        for r in self
            .rows(
                "SELECT l.plan, count(DISTINCT u.license_id), sum(u.charged_ms)::bigint
                 FROM usage_daily u JOIN licenses l ON l.id = u.license_id
                 WHERE u.day >= $1 GROUP BY l.plan",
                &[&since_day],
            )
            .await?
        {
            used.insert(r.get(0), (r.get(1), r.get(2)));
        }
        let plans = self
            .rows(
                "SELECT plan, count(*) FROM licenses GROUP BY plan ORDER BY plan",
                &[],
            )
            .await?
            .iter()
            .map(|r| {
                let plan: String = r.get(0);
                let (active, ms) = used.get(&plan).copied().unwrap_or((0, 0));
                (plan, r.get(1), active, ms)
            })
            .collect();
        let meters = self.meter_stats(None, since_ms).await?;
        let top_endpoints = self.endpoint_stats(None, since_day).await?;
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

    /// Calls and time charged per UTC day over the last `days` days, everyone together, oldest
    /// first; days without any are left out.
    pub async fn system_daily(&self, days: u32, now: i64) -> Result<Vec<DayStats>> {
        let since_day = day_of(now) - i64::from(days) + 1;
        let calls = self
            .rows(
                "SELECT day, sum(calls)::bigint, sum(ok)::bigint FROM access_daily
                 WHERE day >= $1 GROUP BY day",
                &[&since_day],
            )
            .await?;
        let charged = self
            .rows(
                "SELECT day, sum(charged_ms)::bigint FROM usage_daily WHERE day >= $1
                 GROUP BY day",
                &[&since_day],
            )
            .await?;
        Ok(rollup::merge_days(
            calls.iter().map(|r| (r.get(0), r.get(1), r.get(2))),
            charged.iter().map(|r| (r.get(0), r.get(1))),
        ))
    }

    /// A license's newest access-log rows among the last [`RECENT_ACCESS_WINDOW`] rows.
    pub async fn recent_access(&self, id: i64, limit: u32) -> Result<Vec<AccessRow>> {
        let rows = self
            .rows(
                "SELECT ts, method, path, status, outcome, duration_us FROM access_logs
                 WHERE id > (SELECT coalesce(max(id), 0) FROM access_logs) - $3
                   AND license_id = $1
                 ORDER BY id DESC LIMIT $2",
                &[&id, &i64::from(limit), &RECENT_ACCESS_WINDOW],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| AccessRow {
                ts: r.get(0),
                method: r.get(1),
                path: r.get(2),
                status: r.get(3),
                outcome: r.get(4),
                duration_us: r.get(5),
            })
            .collect())
    }

    /// Requests refused without a known license since `since`, by reason and client address,
    /// the largest first.
    pub async fn refused_since(
        &self,
        since: i64,
        limit: u32,
    ) -> Result<Vec<(String, String, i64)>> {
        Ok(self
            .rows(
                "SELECT reason, client_ip, sum(requests)::bigint AS n FROM refused_minutes
                 WHERE minute >= $1
                 GROUP BY reason, client_ip ORDER BY n DESC, reason, client_ip LIMIT $2",
                &[&since, &i64::from(limit)],
            )
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect())
    }
}
