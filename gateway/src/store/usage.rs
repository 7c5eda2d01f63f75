//! A flush's usage history, the same for every backend: what rows one charge writes to
//! `usage_history`, given the balance its deduction left.

use crate::records::Usage;

/// One `usage_history` row of a flush (`kind` is `usage`; `balance_after_ms` is
/// `balance_before_ms + delta_ms`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HistoryRow {
    pub delta_ms: i64,
    pub balance_before_ms: i64,
    pub requests: i64,
    pub reason: Option<&'static str>,
}

/// The rows of one charge whose deduction left the balance at `after_ms`: the usage charged
/// (gross), then one row per reason for time given back, so the history shows both and each
/// row's balances chain into the next.
pub fn history_rows(u: &Usage, after_ms: i64) -> Vec<HistoryRow> {
    let returned: i64 = u.returned().iter().map(|(_, ms)| ms).sum();
    let gross = u.charge_ms + returned;
    let mut balance = after_ms + u.charge_ms;
    let mut rows = Vec::with_capacity(3);
    if gross != 0 || u.requests != 0 {
        rows.push(HistoryRow {
            delta_ms: -gross,
            balance_before_ms: balance,
            requests: u.requests,
            reason: None,
        });
        balance -= gross;
    }
    for (reason, ms) in u.returned() {
        if ms != 0 {
            rows.push(HistoryRow {
                delta_ms: ms,
                balance_before_ms: balance,
                requests: 0,
                reason: Some(reason.history_reason()),
            });
            balance += ms;
        }
    }
    rows
}

/// Whether a charge deducts anything (else only its sessions are written).
pub fn deducts(u: &Usage) -> bool {
    let returned: i64 = u.returned().iter().map(|(_, ms)| ms).sum();
    u.charge_ms != 0 || u.requests != 0 || returned != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_given_back_follows_the_gross_charge_and_the_balances_chain() {
        let u = Usage {
            charge_ms: 700,
            requests: 3,
            returned_failure_ms: 200,
            returned_refused_ms: 100,
            ..Usage::default()
        };
        // the deduction of 700 left 9_300: the gross 1_000 was taken from 10_000, then given back
        let rows = history_rows(&u, 9_300);
        assert_eq!(rows.len(), 3);
        assert_eq!(
            (rows[0].delta_ms, rows[0].balance_before_ms),
            (-1_000, 10_000)
        );
        assert_eq!((rows[1].delta_ms, rows[1].balance_before_ms), (200, 9_000));
        assert_eq!((rows[2].delta_ms, rows[2].balance_before_ms), (100, 9_200));
        assert_eq!(rows[2].balance_before_ms + rows[2].delta_ms, 9_300);
        assert_eq!(rows.iter().map(|r| r.requests).sum::<i64>(), 3);
        assert!(history_rows(&Usage::default(), 5).is_empty());
    }
}
