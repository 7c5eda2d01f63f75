//! Monthly quota periods: a license's allowance resets on the anniversary of its creation each
//! month, in the configured time zone. A license created on the 31st resets on the last day of
//! shorter months (Feb 28, or 29 in a leap year) and on the 31st again when the month has one:
//! every boundary is computed from the creation time, never from the previous boundary.

use jiff::tz::TimeZone;
use jiff::{Timestamp, ToSpan, Zoned};

/// The time zone periods are computed in (`metering.timezone`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Calendar {
    tz: TimeZone,
}

impl Default for Calendar {
    fn default() -> Self {
        Calendar::utc()
    }
}

impl Calendar {
    pub fn utc() -> Calendar {
        Calendar { tz: TimeZone::UTC }
    }

    /// A calendar in the IANA zone `name` (`UTC`, `Europe/Paris`, …).
    pub fn named(name: &str) -> Result<Calendar, String> {
        TimeZone::get(name)
            .map(|tz| Calendar { tz })
            .map_err(|e| format!("unknown time zone {name:?}: {e}"))
    }

    fn zoned(&self, ms: i64) -> Zoned {
        Timestamp::from_millisecond(ms)
            .unwrap_or(Timestamp::UNIX_EPOCH)
            .to_zoned(self.tz.clone())
    }

    /// Start of the `n`th monthly period of a license created at `anchor` (Unix ms).
    fn boundary(&self, anchor: &Zoned, n: i64) -> i64 {
        anchor
            .checked_add(n.months())
            .map_or(i64::MAX, |z| z.timestamp().as_millisecond())
    }

    /// The period `[start, end)` containing `now` for a license created at `anchor_ms`. Before
    /// the creation time (a clock set back) it is the first period.
    pub fn period(&self, anchor_ms: i64, now_ms: i64) -> (i64, i64) {
        let anchor = self.zoned(anchor_ms);
        let now = self.zoned(now_ms.max(anchor_ms));
        let mut n = (i64::from(now.year()) - i64::from(anchor.year())) * 12
            + i64::from(now.month())
            - i64::from(anchor.month());
        // the month difference is at most one too many (now is before this month's anniversary)
        while n > 0 && self.boundary(&anchor, n) > now_ms {
            n -= 1;
        }
        while self.boundary(&anchor, n + 1) <= now_ms {
            n += 1;
        }
        (self.boundary(&anchor, n), self.boundary(&anchor, n + 1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(s: &str) -> i64 {
        crate::timefmt::parse_rfc3339(s).unwrap()
    }

    fn text(ms: i64) -> String {
        crate::timefmt::rfc3339(ms)
    }

    #[test]
    fn created_on_the_31st_resets_at_each_months_end_and_back_on_the_31st() {
        let c = Calendar::utc();
        let created = ms("2025-01-31T10:00:00Z");
        let p = |now: &str| {
            let (a, b) = c.period(created, ms(now));
            (text(a), text(b))
        };
        assert_eq!(
            p("2025-02-01T00:00:00Z"),
            ("2025-01-31T10:00:00Z".into(), "2025-02-28T10:00:00Z".into())
        );
        assert_eq!(
            p("2025-02-28T10:00:00Z"),
            ("2025-02-28T10:00:00Z".into(), "2025-03-31T10:00:00Z".into())
        );
        assert_eq!(
            p("2025-04-30T09:59:59Z"),
            ("2025-03-31T10:00:00Z".into(), "2025-04-30T10:00:00Z".into())
        );
        // a leap year: February 29
        let leap = ms("2024-01-31T00:00:00Z");
        let (_, end) = c.period(leap, ms("2024-02-10T00:00:00Z"));
        assert_eq!(text(end), "2024-02-29T00:00:00Z");
        let (start, end) = c.period(leap, ms("2024-03-01T00:00:00Z"));
        assert_eq!(
            (text(start), text(end)),
            ("2024-02-29T00:00:00Z".into(), "2024-03-31T00:00:00Z".into())
        );
        // years later, and before the creation time
        let (start, _) = c.period(created, ms("2031-07-31T10:00:00Z"));
        assert_eq!(text(start), "2031-07-31T10:00:00Z");
        assert_eq!(c.period(created, created - 1).0, created);
    }

    #[test]
    fn periods_follow_the_configured_zone() {
        // 02:00 UTC on March 31 is 22:00 on March 30 in New York: the anniversary is the 31st
        // in UTC and the 30th in New York
        let created = ms("2025-03-31T02:00:00Z");
        let (_, utc) = Calendar::utc().period(created, created + 1);
        assert_eq!(text(utc), "2025-04-30T02:00:00Z");
        let ny = Calendar::named("America/New_York").unwrap();
        let (_, local) = ny.period(created, created + 1);
        assert_eq!(text(local), "2025-05-01T02:00:00Z");
        assert!(Calendar::named("Mars/Olympus_Mons").is_err());
    }
}
