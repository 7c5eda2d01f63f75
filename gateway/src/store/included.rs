//! What a plan includes each period: the one rule that splits a charge between the plan's
//! included allowances and the prepaid balance, the same for every backend and for the
//! ledger's view of what is left. Time by [`split`]; requests and the units of each meter by
//! [`waive`], which says what of a charge's prices the plan pays.
//!
//! The split is a plain function of the plan's allowance, what the period had used before the
//! charge and the charge itself. It telescopes: splitting `a` then `b` gives the same totals as
//! splitting `a + b` at once. So the totals do not depend on how charges are batched into
//! flushes, coalesced into history rows, or ordered between nodes, as long as each is split
//! against the period's use as committed before it (a flush reads that with the license's row
//! locked, as it does today for the balance): two nodes crossing a period boundary together
//! each split against the new period's use, and the new allowance is given once.

use crate::config::Meter;
use crate::meters::{Units, MAX_METERS};
use crate::records::Usage;

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

/// What a plan includes each period besides time: requests (counted as the period counts
/// them, each its route's `requests_cost`) and units of each meter. 0 is none.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Includes {
    pub requests: i64,
    pub units: Units,
}

impl Includes {
    pub fn any(&self) -> bool {
        self.requests > 0 || self.units.iter().any(|&n| n > 0)
    }
}

/// A period's use as committed before a charge: its requests and each meter's units.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeriodUse {
    pub requests: i64,
    pub units: Units,
}

/// What of a charge's prices the plan pays: the requests and units its allowances took, and
/// the balance that is therefore not taken (`ms`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Waived {
    pub ms: i64,
    pub requests: i64,
    pub units: Units,
}

/// The prices of a charge the plan's included requests and units pay for, the period having
/// used `used` before it. Each allowance is spent first, as time's is ([`split`]), so each
/// meter's units are split exactly however charges are batched. Included requests count every
/// request the charge counts (a metered call's too, as `period_requests` does) and pay the
/// `fixed` prices among them: the requests of a charge the allowance covers go to its
/// fixed-price calls first (in the customer's favour: a flush that holds a metered call beside
/// the last included ones does not take their place), so they are paid exactly unless the one
/// charge that crosses the end of what is included holds fixed calls of different prices,
/// which are then paid in proportion (rounded in the customer's favour). Charges are never
/// negative in requests or units (a failed priced call charges nothing), so nothing is given
/// back here.
pub fn waive(includes: &Includes, used: &PeriodUse, usage: &Usage, meters: &[Meter]) -> Waived {
    let mut out = Waived::default();
    if includes.requests > 0 && usage.requests > 0 {
        out.requests = split(includes.requests, used.requests, usage.requests).included_ms;
        let (fixed, calls) = (usage.fixed_ms.max(0), usage.fixed_requests.max(0));
        if calls > 0 {
            // the fixed prices of the fixed calls not covered, rounded down
            let uncovered = calls - out.requests.min(calls);
            let charged = (i128::from(fixed) * i128::from(uncovered) / i128::from(calls)) as i64;
            out.ms = fixed - charged;
        }
    }
    for (i, m) in meters.iter().enumerate().take(MAX_METERS) {
        if includes.units[i] > 0 && usage.units[i] > 0 {
            let n = split(includes.units[i], used.units[i], usage.units[i]).included_ms;
            out.units[i] = n;
            out.ms = out.ms.saturating_add(n.saturating_mul(m.price_ms));
        }
    }
    out
}

/// One priced call as [`waive`] reads a charge: counted as `cost` requests, `price_ms` its
/// price, `units` what it reported; a price with no units is a `fixed` route's (a report's
/// price is its units'), a fallback (time) none.
pub fn one_call(cost: u32, price_ms: i64, units: &Units, fallback: bool) -> Usage {
    let requests = i64::from(cost.max(1));
    let fixed = !fallback && units.iter().all(|&n| n == 0) && price_ms > 0;
    Usage {
        requests,
        fixed_ms: if fixed { price_ms } else { 0 },
        fixed_requests: if fixed { requests } else { 0 },
        units: if fallback { [0; MAX_METERS] } else { *units },
        ..Usage::default()
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

    fn meters() -> Vec<Meter> {
        vec![Meter {
            name: "audio_seconds".into(),
            label: "seconds of audio".into(),
            price_ms: 100,
            max_per_request: 1_000,
        }]
    }

    /// A charge of `requests`, `fixed` of them fixed calls costing `fixed_ms` together.
    fn usage(requests: i64, fixed: i64, fixed_ms: i64, audio: i64) -> Usage {
        let mut units = [0; MAX_METERS];
        units[0] = audio;
        Usage {
            requests,
            fixed_requests: fixed,
            fixed_ms,
            units,
            priced_ms: fixed_ms + audio * 100,
            charge_ms: fixed_ms + audio * 100,
            ..Usage::default()
        }
    }

    #[test]
    fn included_requests_pay_fixed_prices_until_spent() {
        let inc = Includes {
            requests: 3,
            ..Includes::default()
        };
        let at = |requests| PeriodUse {
            requests,
            ..PeriodUse::default()
        };
        // two calls at 1 s each, none used: both paid by the plan
        let w = waive(&inc, &at(0), &usage(2, 2, 2_000, 0), &meters());
        assert_eq!((w.ms, w.requests), (2_000, 2));
        // two more with one left: one paid, the other from the balance
        let w = waive(&inc, &at(2), &usage(2, 2, 2_000, 0), &meters());
        assert_eq!((w.ms, w.requests), (1_000, 1));
        // spent
        assert_eq!(waive(&inc, &at(3), &usage(1, 1, 1_000, 0), &meters()).ms, 0);
        // fixed calls of different prices across the end: in proportion, in the customer's
        // favour
        let w = waive(&inc, &at(1), &usage(3, 3, 1_001, 0), &meters());
        assert_eq!((w.requests, w.ms), (2, 1_001 - 333));
        // a metered call's request counts too, and pays no price
        assert_eq!(waive(&inc, &at(0), &usage(1, 0, 0, 0), &meters()).ms, 0);
        // three fixed calls and a metered one in one flush, three included: the fixed ones
        // are paid whole, whatever came first
        let w = waive(&inc, &at(0), &usage(4, 3, 1_500, 0), &meters());
        assert_eq!((w.requests, w.ms), (3, 1_500));
    }

    #[test]
    fn included_units_pay_their_meters_price_exactly_however_batched() {
        let mut inc = Includes::default();
        inc.units[0] = 100;
        let at = |audio| {
            let mut u = PeriodUse::default();
            u.units[0] = audio;
            u
        };
        let w = waive(&inc, &at(0), &usage(1, 0, 0, 60), &meters());
        assert_eq!((w.units[0], w.ms), (60, 6_000));
        let w2 = waive(&inc, &at(60), &usage(1, 0, 0, 60), &meters());
        assert_eq!((w2.units[0], w2.ms), (40, 4_000));
        // the same two reports in one charge
        let both = waive(&inc, &at(0), &usage(2, 0, 0, 120), &meters());
        assert_eq!(both.ms, w.ms + w2.ms);
        // a plan including nothing of this meter pays nothing
        assert_eq!(
            waive(&Includes::default(), &at(0), &usage(1, 0, 0, 60), &meters()),
            Waived::default()
        );
    }

    #[test]
    fn what_is_left_is_within_the_allowance() {
        assert_eq!(left(HALF_HOUR, -5), HALF_HOUR, "a period's use below zero");
        assert_eq!(left(HALF_HOUR, HALF_HOUR + 1), 0);
        assert_eq!(left(0, 0), 0);
        assert_eq!(left(HALF_HOUR, 1_000), HALF_HOUR - 1_000);
    }
}
