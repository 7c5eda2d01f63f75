//! Numbers as people read them on the pages: hours, money, instants.

use gateway::timefmt;

/// Hours for people: `12`, `2.5`, `0.125` (three decimals at most).
pub fn hours(ms: i64) -> String {
    // under 0.001 h (3.6 s) but not nothing: enough decimals that it does not read as 0
    let (h, decimals) = if ms != 0 && ms.abs() < 3_600 {
        (ms as f64 / 3_600_000.0, 6)
    } else {
        (gateway::license::ms_to_hours(ms), 3)
    };
    let s = format!("{h:.decimals$}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// A change of balance: `+3`, `−0.5` (with a real minus sign).
pub fn signed_hours(ms: i64) -> String {
    match ms {
        0 => "0".into(),
        ms if ms > 0 => format!("+{}", hours(ms)),
        ms => format!("−{}", hours(-ms)),
    }
}

/// A chart label for an amount of time given in hours: `2.5 h`, `12 min`, `40 s`.
pub fn duration_label(h: f64) -> String {
    if h >= 1.0 {
        format!("{:.1} h", h)
    } else if h * 60.0 >= 1.0 {
        format!("{:.0} min", h * 60.0)
    } else {
        format!("{:.0} s", h * 3_600.0)
    }
}

/// A time for people, to the minute, in UTC.
pub fn when(ms: i64) -> String {
    let t = timefmt::rfc3339(ms);
    format!("{} {} UTC", &t[..10], &t[11..16])
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

/// A share of calls that succeeded: `97.5 %`, or `–` when there were none.
pub fn percent(ok: i64, calls: i64) -> String {
    if calls == 0 {
        "–".into()
    } else {
        format!("{:.1} %", ok as f64 * 100.0 / calls as f64)
    }
}

/// A decimal with at most two places and no trailing zeros.
pub fn trim(v: f64) -> String {
    let s = format!("{v:.2}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hours_and_money_read_as_people_write_them() {
        assert_eq!(hours(3_600_000), "1");
        assert_eq!(hours(9_000_000), "2.5");
        assert_eq!(hours(450_000), "0.125");
        assert_eq!(hours(0), "0");
        assert_eq!(hours(700), "0.000194");
        assert_eq!(signed_hours(-700), "−0.000194");
        assert_eq!(signed_hours(3_600_000), "+1");
        assert_eq!(duration_label(2.5), "2.5 h");
        assert_eq!(duration_label(0.2), "12 min");
        assert_eq!(duration_label(0.005), "18 s");
        assert_eq!(money(1250, "usd"), "12.50 USD");
        assert_eq!(money(-5, "eur"), "-0.05 EUR");
        assert_eq!(percent(0, 0), "–");
        assert_eq!(percent(39, 40), "97.5 %");
        assert_eq!(when(1_700_000_000_000), "2023-11-14 22:13 UTC");
    }
}
