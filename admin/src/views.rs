//! The API's JSON: every record the admin server (and the CLI's `--json`) shows, shaped from the
//! store's plain types. Times are RFC 3339, amounts of time are hours (three decimals) beside
//! their exact milliseconds where a client computes with them. Never a key or its hash.

use gateway::license::ms_to_hours;
use gateway::limits::{LimitView, Unit};
use gateway::store::{
    Alert, BalanceChange, HistoryItem, License, Payment, SessionRow, SystemStats, UsageStats,
};
use gateway::timefmt;
use serde_json::{json, Value};

/// A license as stored (the admin server replaces the balance with the live one).
pub fn license(l: &License) -> Value {
    json!({
        "id": l.id,
        "key_prefix": l.key_prefix,
        "name": l.name,
        "email": l.email,
        "company": l.company,
        "plan": l.plan,
        "status": l.status.as_str(),
        "hours_remaining": ms_to_hours(l.balance_ms),
        "seconds_remaining": l.balance_ms.div_euclid(1000),
        "hours_used": ms_to_hours(l.used_ms),
        "requests_total": l.requests_total,
        "expires_at": l.expires_at.map(timefmt::rfc3339),
        "created_at": timefmt::rfc3339(l.created_at),
        "updated_at": timefmt::rfc3339(l.updated_at),
        "last_used_at": l.last_used_at.map(timefmt::rfc3339),
    })
}

pub fn payment(p: &Payment) -> Value {
    json!({
        "id": p.id,
        "license_id": p.license_id,
        "session_id": p.session_id,
        "package_id": p.package_id,
        "hours": ms_to_hours(p.hours_ms),
        "amount_cents": p.amount_cents,
        "currency": p.currency,
        "status": p.status,
        "refunded_cents": p.refunded_cents,
        "hours_refunded": ms_to_hours(p.refunded_ms),
        "created_at": timefmt::rfc3339(p.created_at),
        "paid_at": p.paid_at.map(timefmt::rfc3339),
        "paid_cents": p.paid_cents,
        "hours_credited": p.credited_ms.map(ms_to_hours),
        "mismatch": p.mismatch,
    })
}

fn balance_change(c: &BalanceChange) -> Value {
    json!({
        "id": c.id,
        "kind": c.kind,
        "hours": ms_to_hours(c.delta_ms),
        "delta_ms": c.delta_ms,
        "balance_after_hours": ms_to_hours(c.balance_after_ms),
        "balance_after_ms": c.balance_after_ms,
        "requests": c.requests,
        "reason": c.reason,
        "created_at": timefmt::rfc3339(c.created_at),
    })
}

fn session(s: &SessionRow) -> Value {
    json!({
        "id": s.id,
        "started_at": timefmt::rfc3339(s.started_at),
        "last_activity_at": timefmt::rfc3339(s.last_activity_at),
        "ended_at": s.ended_at.map(timefmt::rfc3339),
        "open": s.ended_at.is_none(),
        "hours": ms_to_hours(s.charged_ms),
        "charged_ms": s.charged_ms,
        "requests": s.requests,
        "bytes_in": s.bytes_in,
        "bytes_out": s.bytes_out,
    })
}

/// One entry of a history page.
pub fn history_item(item: &HistoryItem) -> Value {
    match item {
        HistoryItem::Change(c) => balance_change(c),
        HistoryItem::Payment(p) => payment(p),
        HistoryItem::Session(s) => session(s),
    }
}

/// One line of `/usage/limits`. Time is shown in hours beside its exact milliseconds; a
/// window's start and reset as RFC 3339.
pub fn limit(v: &LimitView) -> Value {
    let mut out = match (v.unit, v.used, v.remaining) {
        (Unit::Milliseconds, Some(used), Some(remaining)) => json!({
            "limit": v.name,
            "max": ms_to_hours(v.max),
            "used": ms_to_hours(used),
            "remaining": ms_to_hours(remaining),
            "max_ms": v.max,
            "used_ms": used,
            "remaining_ms": remaining,
        }),
        (_, Some(used), Some(remaining)) => json!({
            "limit": v.name,
            "max": v.max,
            "used": used,
            "remaining": remaining,
        }),
        _ => json!({"limit": v.name, "max": v.max}),
    };
    if let Some(start) = v.window_start {
        out["period_start"] = timefmt::rfc3339(start).into();
    }
    if let Some(at) = v.resets_at {
        out["resets_at"] = timefmt::rfc3339(at).into();
    }
    out
}

/// The event as the webhook announces it.
pub fn alert(a: &Alert) -> Value {
    gateway::alerts::payload(a)
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

pub fn usage_stats(s: &UsageStats) -> Value {
    let ms = |v: Option<f64>| v.map(|v| (v * 100.0).round() / 100.0);
    json!({
        "days": s.days,
        "calls": s.calls,
        "successful_calls": s.ok,
        "success_rate": rate(s.ok, s.calls),
        "hours_used": ms_to_hours(s.used_ms),
        "top_endpoints": s.top_endpoints.iter()
            .map(|(path, calls)| json!({"path": path, "calls": calls}))
            .collect::<Vec<_>>(),
        "latency_p50_ms": ms(s.p50_ms),
        "latency_p95_ms": ms(s.p95_ms),
        "daily": s.daily.iter().map(|d| json!({
            "date": day_text(d.day),
            "calls": d.calls,
            "successful_calls": d.ok,
            "hours_used": ms_to_hours(d.charged_ms),
        })).collect::<Vec<_>>(),
    })
}

pub fn system_stats(s: &SystemStats) -> Value {
    json!({
        "days": s.days,
        "active_licenses": s.active_licenses,
        "calls": s.licensed_calls + s.guest_calls,
        "licensed_calls": s.licensed_calls,
        "guest_calls": s.guest_calls,
        "success_rate": rate(s.licensed_ok, s.licensed_calls),
        "hours_charged": ms_to_hours(s.charged_ms),
        "charged_ms": s.charged_ms,
        "revenue": s.revenue.iter().map(|(c, cents, n)| json!({
            "currency": c, "amount_cents": cents, "payments": n,
        })).collect::<Vec<_>>(),
        "top_licenses": s.top_licenses.iter().map(|(id, name, plan, ms, req)| json!({
            "license_id": id, "name": name, "plan": plan,
            "hours_used": ms_to_hours(*ms), "requests": req,
        })).collect::<Vec<_>>(),
        "plans": s.plans.iter().map(|(plan, n, active, ms)| json!({
            "plan": plan, "licenses": n, "active_licenses": active,
            "hours_used": ms_to_hours(*ms),
        })).collect::<Vec<_>>(),
    })
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
        };
        let v = license(&l);
        assert_eq!(v["hours_remaining"], 2.0);
        assert_eq!(v["seconds_remaining"], 7_200);
        assert_eq!(v["hours_used"], 0.01);
        let text = v.to_string();
        assert!(!text.contains(&hex::encode([9u8; 32])), "{text}");
        assert!(!text.contains("key_hash"), "{text}");
    }
}
