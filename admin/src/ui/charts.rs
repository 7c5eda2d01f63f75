//! Bar charts of one value per day, as inline SVG (no script, nothing fetched), each with the
//! table of its numbers beside it for screen readers and for reading exact values.

use gateway::store::DayStats;
use gateway::timefmt;
use maud::{html, Markup};

/// A bar chart of one value per day over the last `days` days up to `today` (a UTC day number).
pub fn day_chart(
    id: &str,
    title: &str,
    today: i64,
    days: u32,
    data: &[DayStats],
    value: impl Fn(&DayStats) -> f64,
    label: impl Fn(f64) -> String,
) -> Markup {
    let first = today - i64::from(days) + 1;
    let mut values = vec![0.0f64; days as usize];
    for d in data {
        if (first..=today).contains(&d.day) {
            values[(d.day - first) as usize] = value(d);
        }
    }
    let max = values.iter().cloned().fold(0.0f64, f64::max);
    let (w, h, left, bottom, top) = (640.0, 200.0, 8.0, 24.0, 26.0);
    let plot_h = h - bottom - top;
    let slot = (w - 2.0 * left) / f64::from(days);
    let bar_w = (slot * 0.7).max(1.0);
    let date = |day: i64| {
        let (y, m, d) = timefmt::civil_from_days(day);
        format!("{y:04}-{m:02}-{d:02}")
    };
    let title_id = format!("{id}-title");
    let f1 = |v: f64| format!("{v:.1}");
    html! {
        figure.chart {
            figcaption id=(title_id) { (title) }
            svg viewBox={ "0 0 " (w) " " (h) } role="img" aria-labelledby=(title_id)
                preserveAspectRatio="xMidYMid meet" class="bars" {
                // every SVG element is closed explicitly: in HTML, `<line>` alone would swallow
                // what follows it
                line x1=(left) y1=(h - bottom) x2=(w - left) y2=(h - bottom) class="axis" {}
                text x=(left) y="18" class="max" { "max " (label(max)) }
                @for (i, v) in values.iter().enumerate() {
                    @let bh = if max > 0.0 { v / max * plot_h } else { 0.0 };
                    @let x = left + slot * i as f64 + (slot - bar_w) / 2.0;
                    rect x=(f1(x)) y=(f1(h - bottom - bh)) width=(f1(bar_w)) height=(f1(bh))
                        class="bar" {
                        title { (date(first + i as i64)) ": " (label(*v)) }
                    }
                }
                text x=(left) y=(h - 6.0) class="tick" { (date(first)) }
                text x=(w - left) y=(h - 6.0) class="tick end" { (date(today)) }
            }
            details {
                summary { "Show the numbers" }
                div.table-wrap {
                    table {
                        caption.sr-only { (title) }
                        thead { tr { th scope="col" { "Day" } th scope="col" { "Value" } } }
                        tbody {
                            @for (i, v) in values.iter().enumerate().rev() {
                                tr { td { (date(first + i as i64)) } td { (label(*v)) } }
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

    #[test]
    fn a_chart_has_one_bar_per_day_and_escapes_its_labels() {
        let data = [DayStats {
            day: 100,
            calls: 7,
            ok: 7,
            charged_ms: 0,
        }];
        let svg = day_chart(
            "c",
            "Calls <per> day",
            100,
            30,
            &data,
            |d| d.calls as f64,
            |v| format!("{v}"),
        )
        .into_string();
        assert_eq!(svg.matches("<rect").count(), 30);
        assert_eq!(svg.matches("</line>").count(), 1);
        assert!(svg.contains("Calls &lt;per&gt; day"));
        assert!(svg.contains("max 7"));
        assert!(svg.contains("viewBox=\"0 0 640 200\""), "{svg}");
    }
}
