//! Bar charts of one value per day, as inline SVG (no script, nothing fetched), each with the
//! table of its numbers beside it for screen readers and for reading exact values.
//!
//! The scale names its unit and its maximum as the pages write them (`max 0.4 s`,
//! `max 13 calls`); a day without data is drawn as a grey stub and listed as "no data", apart
//! from a day whose value was zero; the bars' tooltips and the table show the same text.

use gateway::store::DayStats;
use gateway::timefmt;
use maud::{html, Markup};

use super::format::{calls, Amount, Time};
use gateway::display::BalanceUnit;

/// What a chart counts, and so how its values read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit<'a> {
    /// Milliseconds, read as durations.
    Time,
    /// Milliseconds of balance charged, read in the operator's unit (`[display]`).
    Charged(&'a BalanceUnit),
    /// Calls, counted.
    Calls,
}

impl Unit<'_> {
    /// Balance charged, as the operator sells it: time in hours, else minutes or credits.
    pub fn charged(unit: &BalanceUnit) -> Unit<'_> {
        match unit {
            BalanceUnit::Hours => Unit::Time,
            unit => Unit::Charged(unit),
        }
    }

    fn label(self, v: i64) -> String {
        match self {
            Unit::Time => timefmt::duration(v),
            Unit::Charged(unit) => unit.amount_text(v),
            Unit::Calls => calls(v),
        }
    }

    /// A value as the table shows it (a time keeps its exact milliseconds in a `title`).
    fn cell(self, v: i64) -> Markup {
        match self {
            Unit::Time => html! { (Time(v)) },
            Unit::Charged(unit) => html! { (Amount(v, unit)) },
            Unit::Calls => html! { (self.label(v)) },
        }
    }

    fn column(self) -> &'static str {
        match self {
            Unit::Time => "Time",
            Unit::Charged(_) => "Charged",
            Unit::Calls => "Calls",
        }
    }
}

const NO_DATA: &str = "no data";

fn date(day: i64) -> String {
    let (y, m, d) = timefmt::civil_from_days(day);
    format!("{y:04}-{m:02}-{d:02}")
}

/// One value per day over the last `days` days up to `today` (a UTC day number): `None` for a
/// day that has no row in `data`.
fn per_day(
    today: i64,
    days: u32,
    data: &[DayStats],
    value: impl Fn(&DayStats) -> i64,
) -> Vec<Option<i64>> {
    let first = today - i64::from(days) + 1;
    let mut values = vec![None; days as usize];
    for d in data {
        if (first..=today).contains(&d.day) {
            values[(d.day - first) as usize] = Some(value(d));
        }
    }
    values
}

/// A bar chart of `value` per day over the last `days` days up to `today`.
pub fn day_chart(
    id: &str,
    title: &str,
    today: i64,
    days: u32,
    data: &[DayStats],
    value: impl Fn(&DayStats) -> i64,
    unit: Unit,
) -> Markup {
    let first = today - i64::from(days) + 1;
    let values = per_day(today, days, data, value);
    let max = values.iter().flatten().copied().max();
    let scale = match max {
        Some(max) => format!("max {}", unit.label(max)),
        None => format!("{NO_DATA} in these {days} days"),
    };
    let max = max.unwrap_or(0);
    let missing = values.iter().any(Option::is_none);
    let (w, h, left, bottom, top) = (640.0, 200.0, 8.0, 24.0, 26.0);
    let base = h - bottom;
    let plot_h = base - top;
    let slot = (w - 2.0 * left) / f64::from(days);
    let bar_w = (slot * 0.7).max(1.0);
    let title_id = format!("{id}-title");
    let f1 = |v: f64| format!("{v:.1}");
    let text_of = |v: Option<i64>| v.map_or_else(|| NO_DATA.to_string(), |v| unit.label(v));
    html! {
        figure.chart {
            figcaption id=(title_id) { (title) }
            svg viewBox={ "0 0 " (w) " " (h) } role="img" aria-labelledby=(title_id)
                preserveAspectRatio="xMidYMid meet" class="bars" {
                // every SVG element is closed explicitly: in HTML, `<line>` alone would swallow
                // what follows it
                line x1=(left) y1=(top) x2=(w - left) y2=(top) class="grid" {}
                line x1=(left) y1=(base) x2=(w - left) y2=(base) class="axis" {}
                text x=(left) y="18" class="max" { (scale) }
                @for (i, v) in values.iter().enumerate() {
                    @let x = left + slot * i as f64 + (slot - bar_w) / 2.0;
                    @let day = date(first + i as i64);
                    @match v {
                        Some(v) => {
                            @let bh = if max > 0 { *v as f64 / max as f64 * plot_h } else { 0.0 };
                            rect x=(f1(x)) y=(f1(base - bh)) width=(f1(bar_w)) height=(f1(bh))
                                class="bar" {
                                title { (day) ": " (text_of(Some(*v))) }
                            }
                        }
                        None => {
                            rect x=(f1(x)) y=(f1(base - 3.0)) width=(f1(bar_w)) height="3.0"
                                class="nodata" {
                                title { (day) ": " (NO_DATA) }
                            }
                        }
                    }
                }
                text x=(left) y=(h - 6.0) class="tick" { (date(first)) }
                text x=(w - left) y=(h - 6.0) class="tick end" { (date(today)) }
            }
            @if missing {
                p.legend { span.swatch.nodata {} " No data that day" }
            }
            details {
                summary { "Show the numbers" }
                div.table-wrap {
                    table {
                        caption.sr-only { (title) }
                        thead {
                            tr { th scope="col" { "Day" } th.num scope="col" { (unit.column()) } }
                        }
                        tbody {
                            @for (i, v) in values.iter().enumerate().rev() {
                                tr.nodata[v.is_none()] {
                                    td { (date(first + i as i64)) }
                                    td.num {
                                        @match v {
                                            Some(v) => (unit.cell(*v)),
                                            None => (NO_DATA),
                                        }
                                    }
                                }
                            }
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

    fn day(day: i64, calls: i64, charged_ms: i64) -> DayStats {
        DayStats {
            day,
            calls,
            ok: calls,
            charged_ms,
        }
    }

    #[test]
    fn a_chart_has_one_mark_per_day_and_escapes_its_title() {
        let svg = day_chart(
            "c",
            "Calls <per> day",
            100,
            30,
            &[day(100, 7, 0)],
            |d| d.calls,
            Unit::Calls,
        )
        .into_string();
        assert_eq!(svg.matches("class=\"bar\"").count(), 1);
        assert_eq!(svg.matches("height=\"3.0\" class=\"nodata\"").count(), 29);
        assert_eq!(svg.matches("<tr class=\"nodata\">").count(), 29);
        assert_eq!(svg.matches("</line>").count(), 2);
        assert!(svg.contains("Calls &lt;per&gt; day"));
        assert!(svg.contains(">max 7 calls</text>"), "{svg}");
        assert!(svg.contains("viewBox=\"0 0 640 200\""), "{svg}");
        assert!(svg.contains("No data that day"));
    }

    #[test]
    fn the_scale_names_the_unit_and_the_true_maximum() {
        // 0.35 s of time is not "max 0 s" above a full bar
        let data = [day(99, 3, 120), day(100, 13, 350)];
        let svg =
            day_chart("t", "Time", 100, 30, &data, |d| d.charged_ms, Unit::Time).into_string();
        assert!(svg.contains(">max 0.3 s</text>"), "{svg}");
        // the largest bar fills the plot (150 high), the other its share
        assert!(svg.contains("height=\"150.0\" class=\"bar\""), "{svg}");
        assert!(svg.contains("height=\"51.4\" class=\"bar\""), "{svg}");
        let calls = day_chart("c", "Calls", 100, 30, &data, |d| d.calls, Unit::Calls).into_string();
        assert!(calls.contains(">max 13 calls</text>"), "{calls}");
    }

    #[test]
    fn the_table_shows_what_the_bars_show_and_says_which_days_have_no_data() {
        let data = [day(100, 2, 0), day(98, 1, 61_500)];
        let html =
            day_chart("t", "Time", 100, 3, &data, |d| d.charged_ms, Unit::Time).into_string();
        // tooltips
        assert!(html.contains("<title>1970-04-11: 0 s</title>"), "{html}");
        assert!(
            html.contains("<title>1970-04-10: no data</title>"),
            "{html}"
        );
        assert!(
            html.contains("<title>1970-04-09: 1 min 1 s</title>"),
            "{html}"
        );
        // the table, newest first, with the exact value behind each time
        let rows: Vec<&str> = html.split("<tr").skip(2).collect();
        assert_eq!(rows.len(), 3, "{html}");
        assert!(
            rows[0].contains("1970-04-11") && rows[0].contains(">0 s<"),
            "{}",
            rows[0]
        );
        assert!(
            rows[1].contains("class=\"nodata\"") && rows[1].contains(">no data<"),
            "{}",
            rows[1]
        );
        assert!(
            rows[2].contains("title=\"61,500 ms\">1 min 1 s<"),
            "{}",
            rows[2]
        );
    }

    #[test]
    fn a_chart_without_any_data_says_so() {
        let html = day_chart("c", "Calls", 100, 30, &[], |d| d.calls, Unit::Calls).into_string();
        assert!(html.contains(">no data in these 30 days</text>"), "{html}");
        assert!(!html.contains("class=\"bar\""), "{html}");
    }
}
