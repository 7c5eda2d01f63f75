//! A flush's usage history, the same for every backend: what rows one charge writes to
//! `usage_history`, given the balance its deduction left, and when its usage joins the
//! license's last row instead.

use crate::records::{Charge, Usage, RETURNED_REASON};
use crate::store::rollup::day_of;

/// How long a usage row takes more usage after it was opened, outside a running session.
pub const JOIN_WINDOW_MS: i64 = 60_000;

/// A license's last `usage_history` row (by id), as a flush finds it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LastRow {
    pub id: i64,
    /// A usage row without a reason (not a give-back, a credit, a debit, …).
    pub usage: bool,
    pub created_at: i64,
}

/// Whether a charge committed at `now` adds its usage to the license's last history row
/// rather than writing its own: at most one usage row a minute of steady use, or one a
/// session, whichever is fewer. The last row takes it while it is a plain usage row (any other
/// row written since closes it, so the balances still chain), opened in the last
/// [`JOIN_WINDOW_MS`] or during the session the charge's usage is still in, on the same UTC
/// day (`usage_daily` and the exports count by day) and in the same plan period (a period's use
/// is recounted from the rows opened in it). A charge with time given back writes rows of its
/// own, so the give-back shows. The balance is committed at every flush all the same: only the
/// history is coalesced.
pub fn joins(last: Option<&LastRow>, charge: &Charge, now: i64) -> bool {
    let Some(last) = last.filter(|l| l.usage) else {
        return false;
    };
    if charge.usage.returned_ms != 0
        || day_of(last.created_at) != day_of(now)
        || charge.period_start.is_some_and(|p| last.created_at < p)
    {
        return false;
    }
    let recent = now - last.created_at < JOIN_WINDOW_MS;
    // the row was opened while the session the charge's usage is in already ran
    let same_session = charge
        .sessions
        .iter()
        .rev()
        .find(|s| s.ended_at.is_none())
        .is_some_and(|s| s.started_at <= last.created_at);
    recent || same_session
}

/// One `usage_history` row of a flush (`kind` is `usage`; `balance_after_ms` is
/// `balance_before_ms + delta_ms`; `included_ms` is what the plan's included allowance took,
/// or got back, beside the balance: the row's time is `-delta_ms - priced_ms + included_ms`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HistoryRow {
    pub delta_ms: i64,
    pub balance_before_ms: i64,
    pub requests: i64,
    pub reason: Option<&'static str>,
    pub included_ms: i64,
}

/// The rows of one charge whose deduction left the balance at `after_ms`, `included_ms` of it
/// taken from (or, negative, given back to) the plan's included allowance
/// ([`crate::store::included::split`]) and the rest from the balance: the usage charged
/// (gross), then the time given back, so the history shows both and each row's balances
/// chain into the next. The allowance's part goes on the row of its sign: what it took on the
/// usage row, what it got back on the give-back (never more than the give-back). The prices
/// the plan's included requests and units pay (`waived_ms`,
/// [`crate::store::included::waive`]) are not taken from the balance either: the usage row's
/// `priced_ms` is what the balance paid for prices.
pub fn history_rows(u: &Usage, after_ms: i64, included_ms: i64, waived_ms: i64) -> Vec<HistoryRow> {
    let gross = u.charge_ms + u.returned_ms;
    let (taken, given_back) = if included_ms >= 0 {
        (included_ms, 0)
    } else {
        (0, included_ms)
    };
    let mut balance = after_ms + u.charge_ms - included_ms - waived_ms;
    let mut rows = Vec::with_capacity(2);
    if gross != 0 || u.requests != 0 {
        let delta_ms = taken + waived_ms - gross;
        rows.push(HistoryRow {
            delta_ms,
            balance_before_ms: balance,
            requests: u.requests,
            reason: None,
            included_ms: taken,
        });
        balance += delta_ms;
    }
    if u.returned_ms != 0 {
        rows.push(HistoryRow {
            delta_ms: u.returned_ms + given_back,
            balance_before_ms: balance,
            requests: 0,
            reason: Some(RETURNED_REASON),
            included_ms: given_back,
        });
    }
    rows
}

/// Whether a charge deducts anything (else only its sessions are written).
pub fn deducts(u: &Usage) -> bool {
    u.charge_ms != 0 || u.requests != 0 || u.returned_ms != 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::SessionRecord;
    use std::sync::Arc;

    const T: i64 = 1_700_000_000_000 - 1_700_000_000_000 % 86_400_000 + 3_600_000; // 01:00 UTC

    fn charge(open_session_from: Option<i64>, period_start: Option<i64>) -> Charge {
        Charge {
            included_ms: None,
            includes: None,
            license_id: 1,
            usage: Usage {
                charge_ms: 1_000,
                requests: 1,
                ..Usage::default()
            },
            sessions: open_session_from
                .map(|from| SessionRecord {
                    id: Arc::from("s"),
                    license_id: 1,
                    started_at: from,
                    last_activity_at: T,
                    ended_at: None,
                    charged_ms: 0,
                    requests: 0,
                    bytes_in: 0,
                    bytes_out: 0,
                })
                .into_iter()
                .collect(),
            period_start,
        }
    }

    fn row(created_at: i64) -> LastRow {
        LastRow {
            id: 7,
            usage: true,
            created_at,
        }
    }

    #[test]
    fn usage_joins_the_last_row_for_a_minute_or_a_session() {
        let c = charge(None, None);
        assert!(joins(Some(&row(T)), &c, T + 59_999), "within the minute");
        assert!(
            !joins(Some(&row(T)), &c, T + 60_000),
            "a minute on: a row of its own"
        );
        assert!(!joins(None, &c, T), "no row yet");
        let credit = LastRow {
            usage: false,
            ..row(T)
        };
        assert!(!joins(Some(&credit), &c, T + 1), "a credit since closes it");
        // a session that ran when the row was opened keeps it open, a later one does not
        assert!(joins(
            Some(&row(T)),
            &charge(Some(T - 5), None),
            T + 3_600_000 - 1
        ));
        assert!(!joins(
            Some(&row(T)),
            &charge(Some(T + 1), None),
            T + 60_000
        ));
        // time given back writes its own rows
        let mut back = charge(Some(T), None);
        back.usage.returned_ms = 10;
        assert!(!joins(Some(&row(T)), &back, T + 1));
    }

    #[test]
    fn a_row_closes_at_the_day_and_the_plan_period() {
        let c = charge(Some(T - 3_600_000), None);
        let midnight = T - 3_600_000 + 86_400_000;
        assert!(joins(Some(&row(T)), &c, midnight - 1));
        assert!(!joins(Some(&row(T)), &c, midnight), "a new UTC day");
        let p = charge(None, Some(T + 30_000));
        assert!(!joins(Some(&row(T)), &p, T + 31_000), "a new plan period");
        assert!(joins(Some(&row(T + 30_000)), &p, T + 31_000));
    }

    #[test]
    fn time_given_back_follows_the_gross_charge_and_the_balances_chain() {
        let u = Usage {
            charge_ms: 700,
            requests: 3,
            returned_ms: 300,
            ..Usage::default()
        };
        // the deduction of 700 left 9_300: the gross 1_000 was taken from 10_000, then given back
        let rows = history_rows(&u, 9_300, 0, 0);
        assert_eq!(rows.len(), 2);
        assert_eq!(
            (rows[0].delta_ms, rows[0].balance_before_ms),
            (-1_000, 10_000)
        );
        assert_eq!((rows[1].delta_ms, rows[1].balance_before_ms), (300, 9_000));
        assert_eq!(rows[1].balance_before_ms + rows[1].delta_ms, 9_300);
        assert_eq!(rows.iter().map(|r| r.requests).sum::<i64>(), 3);
        assert!(history_rows(&Usage::default(), 5, 0, 0).is_empty());
    }

    /// The included allowance's part is on the row of its sign; the balances chain, and each
    /// row's time (`-delta + included`) is what it charged.
    #[test]
    fn the_included_part_rides_on_the_row_of_its_sign() {
        let u = Usage {
            charge_ms: 700,
            requests: 3,
            returned_ms: 300,
            ..Usage::default()
        };
        // 500 of the 700 from the allowance: the balance 10_000 went to 9_800
        let rows = history_rows(&u, 9_800, 500, 0);
        assert_eq!((rows[0].delta_ms, rows[0].included_ms), (-500, 500));
        assert_eq!(rows[0].balance_before_ms, 10_000);
        assert_eq!((rows[1].delta_ms, rows[1].included_ms), (300, 0));
        assert_eq!(rows[1].balance_before_ms + rows[1].delta_ms, 9_800);
        let time: i64 = rows.iter().map(|r| -r.delta_ms + r.included_ms).sum();
        assert_eq!(time, 700);
        // a give-back alone, 200 of its 300 back to the allowance: the balance gets 100
        let back = Usage {
            charge_ms: -300,
            returned_ms: 300,
            ..Usage::default()
        };
        let rows = history_rows(&back, 10_100, -200, 0);
        assert_eq!(rows.len(), 1);
        assert_eq!((rows[0].delta_ms, rows[0].included_ms), (100, -200));
        assert_eq!(rows[0].balance_before_ms, 10_000);
    }
}
