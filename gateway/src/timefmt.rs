//! Time as text: Unix milliseconds as RFC 3339 UTC (for people and JSON; storage keeps
//! integers), and durations as people read them, the one rule the console, the payment page,
//! the CLI and the alert webhook's text share ([`duration`]).

const SECOND: i64 = 1_000;
const MINUTE: i64 = 60 * SECOND;
const HOUR: i64 = 60 * MINUTE;

/// The step a duration of this size is shown to: ms under 0.1 s, tenths of a second under a
/// minute, seconds under an hour, minutes above.
fn step(ms: i64) -> i64 {
    match ms.unsigned_abs() {
        a if a < 100 => 1,
        a if a < MINUTE as u64 => 100,
        a if a < HOUR as u64 => SECOND,
        _ => MINUTE,
    }
}

/// A duration for people: `4 h 59 min`, `12 min 5 s`, `0.3 s`, `40 ms`, `0 s`; a balance
/// overdrawn reads `−1.3 s` (a real minus sign).
///
/// Never rounded up: what is shown is the largest value of its precision that is not more
/// than `ms`, so a balance never reads as more than is left (59 min 59.9 s is `59 min 59 s`,
/// not `1 h`; an overdraft of 1.25 s is `−1.3 s`). A zero lower unit is left out (`1 h`,
/// `12 min`).
pub fn duration(ms: i64) -> String {
    // keep far from overflow; no balance comes near this (a million years)
    let mut v = ms.clamp(-(1 << 55), 1 << 55);
    // flooring can reach the next, coarser step (−59.95 s is −60 s): floor again at that one
    loop {
        let s = step(v);
        let floored = v.div_euclid(s) * s;
        if floored == v {
            break;
        }
        v = floored;
    }
    let sign = if v < 0 { "−" } else { "" };
    let a = v.unsigned_abs() as i64;
    let text = match a {
        0 => return "0 s".into(),
        a if a < 100 => format!("{a} ms"),
        a if a < MINUTE => format!("{}.{} s", a / SECOND, a % SECOND / 100),
        a if a < HOUR => match (a / MINUTE, a % MINUTE / SECOND) {
            (m, 0) => format!("{m} min"),
            (m, s) => format!("{m} min {s} s"),
        },
        a => match (a / HOUR, a % HOUR / MINUTE) {
            (h, 0) => format!("{h} h"),
            (h, m) => format!("{h} h {m} min"),
        },
    };
    format!("{sign}{text}")
}

/// A change of a balance with its sign: `+3 h`, `−0.3 s`, `0 s`. The amount is [`duration`] of
/// its size: never shown as more than it was.
pub fn signed_duration(ms: i64) -> String {
    match ms {
        0 => "0 s".into(),
        ms if ms > 0 => format!("+{}", duration(ms)),
        ms => format!("−{}", duration(ms.saturating_abs())),
    }
}

/// Milliseconds in full, grouped by thousands: `3,599,000 ms` (the exact value behind a
/// [`duration`]).
pub fn exact_ms(ms: i64) -> String {
    format!("{} ms", grouped(ms))
}

/// An integer grouped by thousands: `-1,234,567`.
pub fn grouped(n: i64) -> String {
    let digits = n.unsigned_abs().to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3 + 1);
    if n < 0 {
        out.push('-');
    }
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// `1700000000000` → `2023-11-14T22:13:20Z`.
pub fn rfc3339(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Parses RFC 3339 (`2024-05-01T12:00:00Z`, `2024-05-01T14:00:00.250+02:00`) or a plain date
/// (`2024-05-01`, midnight UTC) into Unix milliseconds.
pub fn parse_rfc3339(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let d = b.get(r)?;
        d.iter()
            .all(u8::is_ascii_digit)
            .then(|| d.iter().fold(0, |n, c| n * 10 + i64::from(c - b'0')))
    };
    if b.len() < 10 || b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    if !(1..=12).contains(&mo) || d < 1 || d > days_in_month(y, mo as u32) as i64 {
        return None;
    }
    let days = days_from_civil(y, mo as u32, d as u32);
    if b.len() == 10 {
        return Some(days * 86_400_000);
    }
    if b.len() < 20 || !matches!(b[10], b'T' | b't' | b' ') || b[13] != b':' || b[16] != b':' {
        return None;
    }
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    if h > 23 || mi > 59 || sec > 59 {
        return None;
    }
    let mut i = 19;
    let mut ms = 0;
    if b[i] == b'.' {
        let start = i + 1;
        i = start;
        while i < b.len() && b[i].is_ascii_digit() {
            i += 1;
        }
        if i == start {
            return None;
        }
        let frac = &s[start..i.min(start + 3)];
        ms = frac.parse::<i64>().ok()? * 10_i64.pow(3 - frac.len() as u32);
    }
    let offset_s = match &b[i..] {
        [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), _, _, b':', _, _] => {
            let (oh, om) = (num(i + 1..i + 3)?, num(i + 4..i + 6)?);
            if oh > 23 || om > 59 {
                return None;
            }
            let o = oh * 3600 + om * 60;
            if *sign == b'+' {
                o
            } else {
                -o
            }
        }
        _ => return None,
    };
    Some((days * 86_400 + h * 3600 + mi * 60 + sec - offset_s) * 1000 + ms)
}

fn is_leap(y: i64) -> bool {
    y % 4 == 0 && (y % 100 != 0 || y % 400 == 0)
}

/// Days in month `m` (1–12) of year `y`.
pub fn days_in_month(y: i64, m: u32) -> u32 {
    match m {
        2 if is_leap(y) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Howard Hinnant's civil-to-days algorithm: days since 1970-01-01.
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Howard Hinnant's days-to-civil algorithm (proleptic Gregorian calendar).
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_at_the_edges_of_each_unit() {
        assert_eq!(duration(0), "0 s");
        assert_eq!(duration(1), "1 ms");
        assert_eq!(duration(99), "99 ms");
        assert_eq!(duration(100), "0.1 s");
        assert_eq!(duration(300), "0.3 s");
        assert_eq!(duration(999), "0.9 s");
        assert_eq!(duration(1_000), "1.0 s");
        assert_eq!(duration(59_950), "59.9 s");
        assert_eq!(duration(59_999), "59.9 s");
        assert_eq!(duration(60_000), "1 min");
        assert_eq!(duration(725_000), "12 min 5 s");
        assert_eq!(duration(725_999), "12 min 5 s");
        assert_eq!(duration(3_599_000), "59 min 59 s");
        assert_eq!(duration(3_599_999), "59 min 59 s");
        assert_eq!(duration(3_600_000), "1 h");
        assert_eq!(duration(3_659_999), "1 h");
        assert_eq!(duration(3_660_000), "1 h 1 min");
        assert_eq!(duration(17_940_000), "4 h 59 min");
        assert_eq!(duration(99 * HOUR + 59 * MINUTE + 59_900), "99 h 59 min");
        assert_eq!(duration(1_000 * HOUR), "1000 h");
    }

    #[test]
    fn a_duration_is_never_shown_as_more_than_it_is() {
        // negative after an overdraft: floored too, so an overdraft never reads smaller
        assert_eq!(duration(-1), "−1 ms");
        assert_eq!(duration(-250), "−0.3 s");
        assert_eq!(duration(-1_250), "−1.3 s");
        assert_eq!(duration(-59_950), "−1 min", "flooring carries into minutes");
        assert_eq!(duration(-61_500), "−1 min 2 s");
        assert_eq!(duration(-3_599_500), "−1 h");
        assert_eq!(duration(-2 * HOUR), "−2 h");
        // every shown value, read back, is at most the value itself
        let read_back = |text: &str| -> i64 {
            let (sign, t) = match text.strip_prefix('−') {
                Some(t) => (-1, t),
                None => (1, text),
            };
            let parts: Vec<&str> = t.split(' ').collect();
            let mut ms = 0.0;
            for pair in parts.chunks(2) {
                let n: f64 = pair[0].parse().unwrap();
                ms += n * match pair[1] {
                    "ms" => 1.0,
                    "s" => 1_000.0,
                    "min" => 60_000.0,
                    "h" => 3_600_000.0,
                    u => panic!("unit {u}"),
                };
            }
            sign * ms.round() as i64
        };
        for ms in (-7_300_000..7_300_000).step_by(7_919) {
            let shown = read_back(&duration(ms));
            assert!(shown <= ms, "{ms} ms shown as {}", duration(ms));
        }
    }

    #[test]
    fn changes_carry_their_sign_and_exact_values_their_digits() {
        assert_eq!(signed_duration(3 * HOUR), "+3 h");
        assert_eq!(signed_duration(-300), "−0.3 s");
        assert_eq!(signed_duration(-97), "−97 ms");
        assert_eq!(signed_duration(0), "0 s");
        assert_eq!(exact_ms(3_599_000), "3,599,000 ms");
        assert_eq!(exact_ms(999), "999 ms");
        assert_eq!(exact_ms(-1_250), "-1,250 ms");
        assert_eq!(grouped(1_000), "1,000");
        assert_eq!(grouped(0), "0");
        assert_eq!(grouped(-100_000), "-100,000");
    }

    #[test]
    fn formats_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000_000), "2023-11-14T22:13:20Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn parses_what_it_formats_and_rejects_the_rest() {
        for ms in [0, 1_700_000_000_000, 951_782_400_000, -86_400_000] {
            assert_eq!(parse_rfc3339(&rfc3339(ms)), Some(ms));
        }
        assert_eq!(parse_rfc3339("2023-11-14"), Some(1_699_920_000_000));
        assert_eq!(
            parse_rfc3339("2023-11-15T00:13:20.5+02:00"),
            Some(1_700_000_000_500)
        );
        for bad in [
            "",
            "2023-13-01",
            "2023-02-29",
            "2023-11-14T25:00:00Z",
            "2023-11-14T22:13:20",
            "2023-11-14T22:13:20+2",
            "tomorrow",
            "2023-11-14T22:13:20.Z",
            "2023-11-14x",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }
}
