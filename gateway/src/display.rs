//! How a balance is shown to people (`[display]`): the balance stays integer milliseconds, and
//! an operator who sells "credits" or "minutes of audio" shows it that way on the console, the
//! payment page, the API's people-facing fields and the CLI. Never rounded up: a balance never
//! reads as more than is left.

use crate::timefmt;

/// `[display] balance_unit`.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum BalanceUnit {
    /// `2 h 17 min` (the default).
    #[default]
    Hours,
    /// `137 min`.
    Minutes,
    /// Whole credits of `ms` each, named `label` (`1,234 credits`).
    Credits { ms: i64, label: String },
}

impl BalanceUnit {
    /// The unit's name, as `[display] balance_unit` says it.
    pub fn name(&self) -> &'static str {
        match self {
            BalanceUnit::Hours => "hours",
            BalanceUnit::Minutes => "minutes",
            BalanceUnit::Credits { .. } => "credits",
        }
    }

    /// A balance for people, in this unit.
    pub fn balance(&self, ms: i64) -> String {
        match self {
            BalanceUnit::Hours => timefmt::duration(ms),
            BalanceUnit::Minutes => format!("{} min", timefmt::grouped(ms.div_euclid(60_000))),
            BalanceUnit::Credits { ms: each, label } => {
                format!("{} {label}", timefmt::grouped(ms.div_euclid(*each)))
            }
        }
    }

    /// An amount used or changed (a day's charge, a history row), in this unit: to a tenth of
    /// a minute or credit, toward zero (so never more than it is); a sign only when negative.
    pub fn amount_text(&self, ms: i64) -> String {
        let tenths = |each: i64| {
            let t = (i128::from(ms) * 10 / i128::from(each)) as i64;
            let sign = if ms < 0 { "-" } else { "" };
            format!(
                "{sign}{}.{}",
                timefmt::grouped((t / 10).abs()),
                (t % 10).abs()
            )
        };
        match self {
            BalanceUnit::Hours => timefmt::duration(ms),
            BalanceUnit::Minutes => format!("{} min", tenths(60_000)),
            BalanceUnit::Credits { ms: each, label } => format!("{} {label}", tenths(*each)),
        }
    }

    /// A balance as a number of this unit, whole units only for minutes and credits (hours
    /// keep three decimals, as the API's `hours_remaining`).
    pub fn amount(&self, ms: i64) -> f64 {
        match self {
            BalanceUnit::Hours => crate::license::ms_to_hours(ms),
            BalanceUnit::Minutes => ms.div_euclid(60_000) as f64,
            BalanceUnit::Credits { ms: each, .. } => ms.div_euclid(*each) as f64,
        }
    }

    /// What the balance is called on the pages: "Time remaining", "Minutes remaining",
    /// "Credits remaining".
    pub fn remaining_label(&self) -> String {
        match self {
            BalanceUnit::Hours => "Time remaining".into(),
            BalanceUnit::Minutes => "Minutes remaining".into(),
            BalanceUnit::Credits { label, .. } => {
                let mut l = label.clone();
                if let Some(first) = l.get(..1) {
                    l = first.to_uppercase() + &l[1..];
                }
                format!("{l} remaining")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_balance_reads_in_the_operators_unit_and_is_never_rounded_up() {
        let ms = 8_219_999; // 2 h 16 min 59.999 s
        assert_eq!(BalanceUnit::Hours.balance(ms), timefmt::duration(ms));
        assert_eq!(BalanceUnit::Minutes.balance(ms), "136 min");
        assert_eq!(BalanceUnit::Minutes.amount(ms), 136.0);
        let credits = BalanceUnit::Credits {
            ms: 6_000,
            label: "minutes of audio".into(),
        };
        assert_eq!(credits.balance(ms), "1,369 minutes of audio");
        assert_eq!(credits.balance(5_999), "0 minutes of audio");
        assert_eq!(credits.amount(ms), 1_369.0);
        assert_eq!(credits.remaining_label(), "Minutes of audio remaining");
        assert_eq!(credits.balance(-6_000), "-1 minutes of audio");
        assert_eq!(credits.amount_text(9_000), "1.5 minutes of audio");
        assert_eq!(credits.amount_text(5_999), "0.9 minutes of audio");
        assert_eq!(credits.amount_text(-9_000), "-1.5 minutes of audio");
        assert_eq!(credits.amount_text(-500), "-0.0 minutes of audio");
        assert_eq!(BalanceUnit::Minutes.amount_text(8_219_999), "136.9 min");
    }
}
