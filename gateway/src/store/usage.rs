//! A flush's usage history, the same for every backend: what rows one charge writes to
//! `usage_history`, given the balance its deduction left.

use crate::records::{Usage, RETURNED_REASON};

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
/// (gross), then the time given back, so the history shows both and each row's balances
/// chain into the next.
pub fn history_rows(u: &Usage, after_ms: i64) -> Vec<HistoryRow> {
    let gross = u.charge_ms + u.returned_ms;
    let mut balance = after_ms + u.charge_ms;
    let mut rows = Vec::with_capacity(2);
    if gross != 0 || u.requests != 0 {
        rows.push(HistoryRow {
            delta_ms: -gross,
            balance_before_ms: balance,
            requests: u.requests,
            reason: None,
        });
        balance -= gross;
    }
    if u.returned_ms != 0 {
        rows.push(HistoryRow {
            delta_ms: u.returned_ms,
            balance_before_ms: balance,
            requests: 0,
            reason: Some(RETURNED_REASON),
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

    #[test]
    fn time_given_back_follows_the_gross_charge_and_the_balances_chain() {
        let u = Usage {
            charge_ms: 700,
            requests: 3,
            returned_ms: 300,
            ..Usage::default()
        };
        // the deduction of 700 left 9_300: the gross 1_000 was taken from 10_000, then given back
        let rows = history_rows(&u, 9_300);
        assert_eq!(rows.len(), 2);
        assert_eq!(
            (rows[0].delta_ms, rows[0].balance_before_ms),
            (-1_000, 10_000)
        );
        assert_eq!((rows[1].delta_ms, rows[1].balance_before_ms), (300, 9_000));
        assert_eq!(rows[1].balance_before_ms + rows[1].delta_ms, 9_300);
        assert_eq!(rows.iter().map(|r| r.requests).sum::<i64>(), 3);
        assert!(history_rows(&Usage::default(), 5).is_empty());
    }
}
