//! Where a license stands against its plan's limits, as both pages show it (the console's
//! license page and the customer's payment page): every limit with its use, what is left and
//! when it resets, and a notice for each allowance that refuses requests now or soon. A key
//! whose balance has hours but whose period allowance is spent is refused (429) all the same:
//! the pages say so, and until when, rather than show the hours alone.

use gateway::limits::{LimitView, Unit};
use gateway::timefmt;
use maud::{html, Markup};

use super::format::{when, Time};
use super::layout::{notice, Tone};

/// An allowance this share used (or more) is nearly spent.
const NEARLY_PERCENT: i64 = 80;

/// The allowances that refuse requests for a while once spent (rates and the concurrency cap
/// refuse only for a moment; the body cap, one request).
fn is_allowance(name: &str) -> bool {
    matches!(
        name,
        "period_hours" | "period_requests" | "max_upload_bytes_per_day"
    ) || name.starts_with("period_units.")
}

/// What a limit is, for people.
fn label(name: &str) -> std::borrow::Cow<'static, str> {
    let meter = |m: &str| {
        let mut l = m.replace('_', " ");
        if let Some(first) = l.get(..1) {
            l = first.to_uppercase() + &l[1..];
        }
        l
    };
    if let Some(m) = name.strip_prefix("period_units.") {
        return format!("{} this period", meter(m)).into();
    }
    if let Some(m) = name.strip_prefix("included_units.") {
        return format!("{} included this period (spent first)", meter(m)).into();
    }
    match name {
        "included_time" => "Included this period (spent first)",
        "included_requests" => "Requests included this period (spent first)",
        "period_hours" => "Time this period",
        "period_requests" => "Requests this period",
        "max_upload_bytes_per_day" => "Uploads today (UTC)",
        "requests_per_second" => "Requests per second",
        "requests_per_minute" => "Requests per minute",
        "requests_per_hour" => "Requests per hour",
        "requests_per_day" => "Requests per day",
        "max_concurrent" => "Requests at once",
        "max_body_bytes" => "Largest request body",
        _ => "Limit",
    }
    .into()
}

fn amount(unit: Unit, n: i64) -> Markup {
    match unit {
        Unit::Milliseconds => html! { (Time(n)) },
        Unit::Requests | Unit::Units => html! { (timefmt::grouped(n)) },
        Unit::Bytes => html! { (bytes(n)) },
    }
}

/// `1.5 MB`, `512 B`.
fn bytes(n: i64) -> String {
    const UNITS: [&str; 4] = ["KB", "MB", "GB", "TB"];
    if n < 1_000 {
        return format!("{n} B");
    }
    let mut v = n as f64;
    let mut unit = "B";
    for u in UNITS {
        if v < 1_000.0 {
            break;
        }
        v /= 1_000.0;
        unit = u;
    }
    format!("{v:.1} {unit}")
}

/// How an allowance stands: spent (refused until it resets), nearly spent, or fine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Standing {
    Spent,
    Nearly,
    Fine,
}

pub fn standing(v: &LimitView) -> Standing {
    let (Some(used), true) = (v.used, is_allowance(v.name)) else {
        return Standing::Fine;
    };
    if v.max <= 0 || used >= v.max {
        Standing::Spent
    } else if i128::from(used) * 100 >= i128::from(v.max) * i128::from(NEARLY_PERCENT) {
        Standing::Nearly
    } else {
        Standing::Fine
    }
}

/// The latest time a spent allowance refuses requests until, if any is spent.
pub fn blocked_until(lines: &[LimitView]) -> Option<i64> {
    lines
        .iter()
        .filter(|v| standing(v) == Standing::Spent)
        .filter_map(|v| v.resets_at)
        .max()
}

/// A notice for each allowance that is spent or nearly so.
pub fn notices(lines: &[LimitView]) -> Markup {
    html! {
        div #limit-notices {
            @for v in lines {
                @let until = v.resets_at.map(when).unwrap_or_else(|| "it resets".into());
                @match standing(v) {
                    Standing::Spent => (notice(Tone::Error, &format!(
                        "{} is used up: requests with this key are refused until {until}, \
                         whatever the balance.",
                        label(v.name)
                    ))),
                    Standing::Nearly => (notice(Tone::Warn, &format!(
                        "{} is nearly used up ({} %); it resets {until}.",
                        label(v.name),
                        v.used.unwrap_or(0) * 100 / v.max.max(1)
                    ))),
                    Standing::Fine => {}
                }
            }
        }
    }
}

/// The plan's limits in a table: each with its use, what is left and when it resets.
pub fn table(lines: &[LimitView]) -> Markup {
    if lines.is_empty() {
        return html! { p { "The plan has no limits besides the balance." } };
    }
    html! {
        div.table-wrap {
            table #plan-limits {
                thead {
                    tr {
                        th scope="col" { "Limit" }
                        th scope="col" class="num" { "Used" }
                        th scope="col" class="num" { "Allowed" }
                        th scope="col" class="num" { "Left" }
                        th scope="col" { "Resets" }
                    }
                }
                tbody {
                    @for v in lines {
                        tr data-limit=(v.name) class=[match standing(v) {
                            Standing::Spent => Some("spent"),
                            Standing::Nearly => Some("nearly"),
                            Standing::Fine => None,
                        }] {
                            th scope="row" { (label(v.name)) }
                            td.num { @if let Some(u) = v.used { (amount(v.unit, u)) } @else { "–" } }
                            td.num { (amount(v.unit, v.max)) }
                            td.num {
                                @if let Some(r) = v.remaining { (amount(v.unit, r)) } @else { "–" }
                            }
                            td { (v.resets_at.map(when).unwrap_or_else(|| "–".into())) }
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(name: &'static str, max: i64, used: i64) -> LimitView {
        LimitView {
            name,
            unit: Unit::Milliseconds,
            max,
            used: Some(used),
            remaining: Some((max - used).max(0)),
            window_start: Some(0),
            resets_at: Some(86_400_000),
        }
    }

    #[test]
    fn allowances_are_spent_nearly_or_fine_and_rates_never_block() {
        assert_eq!(standing(&line("period_hours", 100, 100)), Standing::Spent);
        assert_eq!(standing(&line("period_hours", 100, 80)), Standing::Nearly);
        assert_eq!(standing(&line("period_hours", 100, 79)), Standing::Fine);
        assert_eq!(standing(&line("requests_per_second", 5, 5)), Standing::Fine);
        let lines = [line("period_requests", 10, 10), line("period_hours", 10, 1)];
        assert_eq!(blocked_until(&lines), Some(86_400_000));
        assert_eq!(blocked_until(&lines[1..]), None);
        assert_eq!(bytes(1_500_000), "1.5 MB");
        assert_eq!(bytes(999), "999 B");
    }
}
