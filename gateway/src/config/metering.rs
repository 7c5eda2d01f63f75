//! `[metering]` (how a key's time is charged, and in which zone periods turn) and `[display]`
//! (how the balance it draws on is shown to people).

use super::*;

/// `[metering]`: the mode, the idle timeout, the time zone (checked by building its calendar).
pub(super) fn parse(root: &Table, errors: &mut Vec<String>) -> MeteringConfig {
    let mut s = Section::new(root, "metering");
    let mode = match s.string("mode", "session").as_str() {
        "session" => MeteringMode::Session,
        "request_time" => MeteringMode::RequestTime,
        other => {
            s.error(
                "mode",
                &format!("must be \"session\" or \"request_time\", not {other:?}"),
            );
            MeteringMode::Session
        }
    };
    let mut metering = MeteringConfig {
        mode,
        idle_timeout_ms: s.uint("idle_timeout_s", 300, 1, 86_400) as i64 * 1_000,
        timezone: s.string("timezone", "UTC"),
        calendar: crate::periods::Calendar::utc(),
    };
    match crate::periods::Calendar::named(&metering.timezone) {
        Ok(c) => metering.calendar = c,
        Err(e) => s.error("timezone", &e),
    }
    s.finish(errors);
    metering
}

/// `[display]`: the balance unit, and a credit's size and label when it is `credits`.
pub(super) fn display(root: &Table, errors: &mut Vec<String>) -> crate::display::BalanceUnit {
    let mut s = Section::new(root, "display");
    let balance_unit = match s.string("balance_unit", "hours").as_str() {
        "hours" => crate::display::BalanceUnit::Hours,
        "minutes" => crate::display::BalanceUnit::Minutes,
        "credits" => {
            s.require("credit_ms");
            crate::display::BalanceUnit::Credits {
                ms: s.uint("credit_ms", 1_000, 1, 86_400_000) as i64,
                label: s.string("credit_label", "credits"),
            }
        }
        other => {
            s.error(
                "balance_unit",
                &format!("must be \"hours\", \"minutes\" or \"credits\", not {other:?}"),
            );
            crate::display::BalanceUnit::Hours
        }
    };
    let _ = (s.get("credit_ms"), s.get("credit_label"));
    if !matches!(balance_unit, crate::display::BalanceUnit::Credits { .. })
        && (s.table_has("credit_ms") || s.table_has("credit_label"))
    {
        s.error(
            "credit_ms",
            "credit_ms and credit_label go with balance_unit = \"credits\"",
        );
    }
    s.finish(errors);
    balance_unit
}
