//! Numbers as people read them on the pages: durations (the one rule of
//! [`gateway::timefmt::duration`], the exact milliseconds a hover away), money, instants.

use gateway::timefmt;
use maud::{html, Markup, Render};

/// An amount of time: `4 h 59 min`, never more than it is, with the exact milliseconds in its
/// `title`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Time(pub i64);

impl Render for Time {
    fn render(&self) -> Markup {
        html! { span.time title=(timefmt::exact_ms(self.0)) { (timefmt::duration(self.0)) } }
    }
}

/// An amount of balance in the operator's unit (`[display] balance_unit`): as [`Time`] in
/// hours, else `2.5 minutes of audio`, with the exact milliseconds in its `title`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Amount<'a>(pub i64, pub &'a gateway::display::BalanceUnit);

impl Render for Amount<'_> {
    fn render(&self) -> Markup {
        match self.1 {
            gateway::display::BalanceUnit::Hours => Time(self.0).render(),
            unit => html! {
                span.time title=(timefmt::exact_ms(self.0)) { (unit.amount_text(self.0)) }
            },
        }
    }
}

/// A change of a balance in the operator's unit: as [`Change`] in hours, else `+2.5 minutes of
/// audio`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChangeIn<'a>(pub i64, pub &'a gateway::display::BalanceUnit);

impl Render for ChangeIn<'_> {
    fn render(&self) -> Markup {
        match self.1 {
            gateway::display::BalanceUnit::Hours => Change(self.0).render(),
            unit => {
                let sign = if self.0 > 0 { "+" } else { "" };
                html! {
                    span.time title=(timefmt::exact_ms(self.0)) {
                        (sign) (unit.amount_text(self.0))
                    }
                }
            }
        }
    }
}

/// A change of a balance: `+3 h`, `−0.3 s`, with the exact milliseconds in its `title`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Change(pub i64);

impl Render for Change {
    fn render(&self) -> Markup {
        let exact = timefmt::exact_ms(self.0);
        let exact = if self.0 > 0 {
            format!("+{exact}")
        } else {
            exact
        };
        html! { span.time title=(exact) { (timefmt::signed_duration(self.0)) } }
    }
}

/// How long one request took, from microseconds: the same rule, exact to the microsecond in
/// its `title`; under a millisecond in microseconds (`420 µs`, not `0 s`).
pub fn request_time(us: i64) -> Markup {
    let text = if (0..1_000).contains(&us) {
        format!("{us} µs")
    } else {
        timefmt::duration(us / 1_000)
    };
    html! {
        span.time title={ (timefmt::grouped(us)) " µs" } { (text) }
    }
}

/// A count of calls: `1 call`, `13 calls`.
pub fn calls(n: i64) -> String {
    if n == 1 {
        "1 call".into()
    } else {
        format!("{} calls", timefmt::grouped(n))
    }
}

/// A time for people, to the minute, in UTC.
pub fn when(ms: i64) -> String {
    let t = timefmt::rfc3339(ms);
    format!("{} {} UTC", &t[..10], &t[11..16])
}

/// An RFC 3339 instant as [`when`] shows it, to the second: `2026-11-23 17:14:39 UTC`.
pub fn when_text(rfc3339: &str) -> String {
    rfc3339.replace('T', " ").replace('Z', " UTC")
}

/// A stored instant (Unix ms) as [`when_text`] shows it, to the second.
pub fn when_exact(ms: i64) -> String {
    when_text(&timefmt::rfc3339(ms))
}

/// An amount of money: `12.50 USD`.
pub fn money(cents: i64, currency: &str) -> String {
    format!(
        "{}{}.{:02} {}",
        if cents < 0 { "-" } else { "" },
        cents.abs() / 100,
        cents.abs() % 100,
        currency.to_uppercase()
    )
}

/// A price of one unit when `cents` buy `units` of them (a minute, a request), with the
/// decimals it needs: two when they are exact (`5.00 USD`), else three significant digits
/// (`0.0833 USD`, `0.000139 USD`), at most eight decimals.
pub fn unit_price(cents: i64, units: i64, currency: &str) -> String {
    let currency = currency.to_uppercase();
    if units <= 0 {
        return format!("– {currency}");
    }
    if cents % units == 0 {
        return money(cents / units, &currency);
    }
    let v = cents as f64 / units as f64 / 100.0;
    // decimals for three significant digits of v, and never fewer than two
    let magnitude = v.abs().log10().floor() as i32;
    let decimals = (2 - magnitude).clamp(2, 8) as usize;
    format!("{v:.decimals$} {currency}")
}

/// A share of calls that succeeded: `97.5 %`, or `–` when there were none.
pub fn percent(ok: i64, calls: i64) -> String {
    if calls == 0 {
        "–".into()
    } else {
        format!("{:.1} %", ok as f64 * 100.0 / calls as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_shows_the_rule_and_keeps_the_exact_value() {
        assert_eq!(
            Time(3_599_000).render().into_string(),
            "<span class=\"time\" title=\"3,599,000 ms\">59 min 59 s</span>"
        );
        assert_eq!(
            Change(-250).render().into_string(),
            "<span class=\"time\" title=\"-250 ms\">−0.2 s</span>"
        );
        assert_eq!(
            Change(3_600_000).render().into_string(),
            "<span class=\"time\" title=\"+3,600,000 ms\">+1 h</span>"
        );
        assert_eq!(
            request_time(22_431).into_string(),
            "<span class=\"time\" title=\"22,431 µs\">22 ms</span>"
        );
        // under a millisecond: not "0 s"
        assert_eq!(
            request_time(420).into_string(),
            "<span class=\"time\" title=\"420 µs\">420 µs</span>"
        );
    }

    #[test]
    fn money_reads_as_people_write_it() {
        assert_eq!(money(1250, "usd"), "12.50 USD");
        assert_eq!(money(-5, "eur"), "-0.05 EUR");
        assert_eq!(money(0, "usd"), "0.00 USD");
    }

    #[test]
    fn unit_prices_have_the_decimals_they_need() {
        // 5.00 USD an hour is 0.0833 USD a minute
        assert_eq!(unit_price(500, 60, "usd"), "0.0833 USD");
        assert_eq!(unit_price(500, 1, "usd"), "5.00 USD");
        assert_eq!(unit_price(600, 60, "usd"), "0.10 USD");
        assert_eq!(unit_price(2_500, 300, "usd"), "0.0833 USD");
        assert_eq!(unit_price(1, 60, "usd"), "0.000167 USD");
        assert_eq!(unit_price(100_000, 60, "eur"), "16.67 EUR");
        assert_eq!(unit_price(5, 0, "usd"), "– USD");
    }

    #[test]
    fn counts_and_instants_read_as_people_write_them() {
        assert_eq!(calls(0), "0 calls");
        assert_eq!(calls(1), "1 call");
        assert_eq!(calls(13), "13 calls");
        assert_eq!(calls(12_345), "12,345 calls");
        assert_eq!(percent(0, 0), "–");
        assert_eq!(percent(39, 40), "97.5 %");
        assert_eq!(when(1_700_000_000_000), "2023-11-14 22:13 UTC");
        assert_eq!(when_text("2023-11-14T22:13:20Z"), "2023-11-14 22:13:20 UTC");
    }
}
