//! A license's balance history as both pages show it (the console's license page and the
//! customer's payment page): newest first, a page at a time, grouped by UTC day, each day
//! headed by what its rows on the page used. A flush joins a license's usage to its last row
//! for a minute of steady use or a running session (gateway/src/store/usage.rs), so a usage
//! row may stand for many requests: its count shows beside it.

use gateway::store::{BalanceChange, Page};
use gateway::timefmt;
use maud::{html, Markup};

use super::format::{Amount, ChangeIn};
use gateway::display::BalanceUnit;

/// Rows a page of the history shows.
pub const PAGE: u32 = 25;

/// The history table, its days grouped; `reasons`: with the reason column (the operator's);
/// `pager`: the controls to the newest page and the next older one; amounts in `unit`.
pub fn balance_history(page: &Page, reasons: bool, pager: Markup, unit: &BalanceUnit) -> Markup {
    let changes: Vec<&BalanceChange> = super::changes(page).collect();
    if changes.is_empty() {
        return html! { p { "No balance changes yet." } (pager) };
    }
    let cols = if reasons { 5 } else { 4 };
    let days = group_by_day(&changes);
    html! {
        div.table-wrap {
            table.history {
                thead {
                    tr {
                        th scope="col" { "When (UTC)" }
                        th scope="col" { "What" }
                        th scope="col" class="num" { "Change" }
                        th scope="col" class="num" { "Balance after" }
                        @if reasons { th scope="col" { "Reason" } }
                    }
                }
                @for (day, rows) in &days {
                    tbody {
                        tr.day {
                            th scope="rowgroup" colspan=(cols) {
                                (date(*day))
                                span.day-total { (day_summary(rows, unit)) }
                            }
                        }
                        @for c in rows {
                            tr {
                                td { (clock(c.created_at)) }
                                td { (what(c)) }
                                td.num { (ChangeIn(c.delta_ms, unit)) }
                                td.num { (Amount(c.balance_after_ms, unit)) }
                                @if reasons { td { (c.reason.clone().unwrap_or_default()) } }
                            }
                        }
                    }
                }
            }
        }
        (pager)
    }
}

/// The rows of each UTC day, newest day first (the page is newest first).
fn group_by_day<'a>(changes: &[&'a BalanceChange]) -> Vec<(i64, Vec<&'a BalanceChange>)> {
    let mut days: Vec<(i64, Vec<&BalanceChange>)> = Vec::new();
    for c in changes {
        let day = c.created_at.div_euclid(86_400_000);
        match days.last_mut() {
            Some((d, rows)) if *d == day => rows.push(c),
            _ => days.push((day, vec![c])),
        }
    }
    days
}

/// What a day's rows on the page used: `used 1 h 2 min in 120 requests`.
fn day_summary(rows: &[&BalanceChange], unit: &BalanceUnit) -> String {
    let usage = rows.iter().filter(|c| c.kind == "usage");
    let (ms, requests) = usage.fold((0, 0), |(ms, n), c| (ms - c.delta_ms, n + c.requests));
    if ms == 0 && requests == 0 {
        return String::new();
    }
    format!(
        " · used {} in {}",
        unit.amount_text(ms.max(0)),
        requests_text(requests)
    )
}

fn requests_text(n: i64) -> String {
    if n == 1 {
        "1 request".into()
    } else {
        format!("{} requests", timefmt::grouped(n))
    }
}

/// The row's kind, with how many requests a usage row stands for.
fn what(c: &BalanceChange) -> String {
    if c.kind == "usage" && c.requests > 0 {
        format!("usage · {}", requests_text(c.requests))
    } else {
        c.kind.clone()
    }
}

/// `Mon 7 Dec 2026`.
fn date(day: i64) -> String {
    const WEEKDAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let (y, m, d) = timefmt::civil_from_days(day);
    format!(
        "{} {d} {} {y}",
        WEEKDAYS[day.rem_euclid(7) as usize],
        MONTHS[(m - 1) as usize]
    )
}

/// `17:14:39`.
fn clock(ms: i64) -> String {
    timefmt::rfc3339(ms)[11..19].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(id: i64, kind: &str, delta_ms: i64, requests: i64, created_at: i64) -> BalanceChange {
        BalanceChange {
            id,
            kind: kind.into(),
            delta_ms,
            balance_after_ms: 0,
            requests,
            reason: None,
            created_at,
        }
    }

    #[test]
    fn days_group_the_rows_and_sum_their_usage() {
        let day = 20_429; // 2025-12-07, a Sunday
        let at = |h: i64| day * 86_400_000 + h * 3_600_000;
        let rows = [
            change(4, "usage", -60_000, 120, at(30)),
            change(3, "usage", -1_500, 3, at(10)),
            change(2, "purchase", 3_600_000, 0, at(9)),
            change(1, "usage", -500, 1, at(1)),
        ];
        let refs: Vec<&BalanceChange> = rows.iter().collect();
        let days = group_by_day(&refs);
        assert_eq!(days.len(), 2);
        assert_eq!((days[0].0, days[0].1.len()), (day + 1, 1));
        assert_eq!(
            day_summary(&days[1].1, &BalanceUnit::Hours),
            " · used 2.0 s in 4 requests"
        );
        assert_eq!(date(day), "Sun 7 Dec 2025");
        assert_eq!(what(&rows[0]), "usage · 120 requests");
        assert_eq!(clock(at(10) + 61_000), "10:01:01");
    }
}
