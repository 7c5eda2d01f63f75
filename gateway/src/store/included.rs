//! What a plan includes each period (issue 34, first part): the one rule that splits a charge
//! of time between the plan's included allowance and the prepaid balance, the same for every
//! backend and for the ledger's view of what is left. Not wired into the flushes yet: this is
//! the rule they will apply.
//!
//! The split is a plain function of the plan's allowance, what the period had used before the
//! charge and the charge itself. It telescopes: splitting `a` then `b` gives the same totals as
//! splitting `a + b` at once. So the totals do not depend on how charges are batched into
//! flushes, coalesced into history rows, or ordered between nodes, as long as each is split
//! against the period's use as committed before it (a flush reads that with the license's row
//! locked, as it does today for the balance): two nodes crossing a period boundary together
//! each split against the new period's use, and the new allowance is given once.

/// A charge's parts: what the plan's included allowance took and what the prepaid balance
/// took. They add up to the charge; either may be negative for time given back.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Split {
    pub included_ms: i64,
    pub balance_ms: i64,
}

/// What is left of an allowance of `included_ms` after `used_ms` of the period (never below
/// zero, never above the allowance).
pub fn left(included_ms: i64, used_ms: i64) -> i64 {
    included_ms
        .saturating_sub(used_ms)
        .clamp(0, included_ms.max(0))
}

/// Splits a charge of `charge_ms` (a give-back is negative) made when the period had used
/// `used_ms` of time: the allowance takes what it has left, first; the balance the rest. A
/// give-back returns to the allowance what the period's use falling back frees of it, and the
/// rest to the balance (so time given back in a later period than it was charged in returns at
/// most what that period used of its allowance).
pub fn split(included_ms: i64, used_ms: i64, charge_ms: i64) -> Split {
    let from_included =
        left(included_ms, used_ms) - left(included_ms, used_ms.saturating_add(charge_ms));
    Split {
        included_ms: from_included,
        balance_ms: charge_ms - from_included,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HALF_HOUR: i64 = 1_800_000;

    #[test]
    fn the_allowance_is_spent_before_the_balance() {
        assert_eq!(
            split(HALF_HOUR, 0, 60_000),
            Split {
                included_ms: 60_000,
                balance_ms: 0
            }
        );
        // the charge that crosses what is included: the rest from the balance
        assert_eq!(
            split(HALF_HOUR, HALF_HOUR - 1_000, 5_000),
            Split {
                included_ms: 1_000,
                balance_ms: 4_000
            }
        );
        // spent: all from the balance
        assert_eq!(split(HALF_HOUR, HALF_HOUR, 5_000).balance_ms, 5_000);
        assert_eq!(split(HALF_HOUR, 2 * HALF_HOUR, 5_000).included_ms, 0);
        // a plan that includes nothing
        assert_eq!(split(0, 0, 5_000).balance_ms, 5_000);
    }

    #[test]
    fn a_give_back_returns_what_it_took_from_where_it_took_it() {
        let used = HALF_HOUR - 1_000;
        let charged = split(HALF_HOUR, used, 5_000);
        let back = split(HALF_HOUR, used + 5_000, -5_000);
        assert_eq!(back.included_ms, -charged.included_ms);
        assert_eq!(back.balance_ms, -charged.balance_ms);
        // in a later period (its use 2 s): it returns at most what that period used
        let later = split(HALF_HOUR, 2_000, -5_000);
        assert_eq!(
            later,
            Split {
                included_ms: -2_000,
                balance_ms: -3_000
            }
        );
    }

    /// The totals do not depend on how charges are batched: every way of cutting a run of
    /// charges into flushes splits the same.
    #[test]
    fn splitting_telescopes_over_any_batching() {
        let charges = [700_000, -20_000, 900_000, 400_000, -50_000, 300_000];
        let whole = split(HALF_HOUR, 100_000, charges.iter().sum());
        for cut in 0..(1 << (charges.len() - 1)) {
            let (mut used, mut total, mut batch) = (100_000, Split::default(), 0);
            for (i, c) in charges.iter().enumerate() {
                batch += c;
                if i == charges.len() - 1 || cut & (1 << i) != 0 {
                    let s = split(HALF_HOUR, used, batch);
                    total.included_ms += s.included_ms;
                    total.balance_ms += s.balance_ms;
                    used += batch;
                    batch = 0;
                }
            }
            assert_eq!(total, whole, "batching {cut:b}");
        }
    }

    #[test]
    fn what_is_left_is_within_the_allowance() {
        assert_eq!(left(HALF_HOUR, -5), HALF_HOUR, "a period's use below zero");
        assert_eq!(left(HALF_HOUR, HALF_HOUR + 1), 0);
        assert_eq!(left(0, 0), 0);
        assert_eq!(left(HALF_HOUR, 1_000), HALF_HOUR - 1_000);
    }
}
