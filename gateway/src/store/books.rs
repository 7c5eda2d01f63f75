//! The books, checked (`tollgate books`): for every license, what its row says against what
//! its history and its leases say. A plain function of the rows every backend reads the same
//! way ([`crate::store::Operations::books`]), so the rules are written once.

use crate::meters::MAX_METERS;

/// One license's money as the store holds it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BooksRow {
    pub license_id: i64,
    pub balance_ms: i64,
    pub used_ms: i64,
    pub requests_total: i64,
    /// The sum of every `usage_history` row (credits, debits, usage): the balance.
    pub history_ms: i64,
    /// The usage rows alone: what was used (`-delta_ms`) and counted.
    pub usage_ms: i64,
    pub usage_requests: i64,
    /// The usage rows' prices (`priced_ms`: meters and fixed prices), and what the units
    /// recorded by meter (`usage_units`) were charged: within those prices.
    pub priced_ms: i64,
    pub units_ms: i64,
    /// Several nodes: what the license says is reserved, and what its lease rows hold.
    pub leases: Option<LeaseBooks>,
}

/// A license's reservations (PostgreSQL): the license's own counts and the sums of its lease
/// rows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LeaseBooks {
    pub reserved_ms: i64,
    pub leased_ms: i64,
    pub period_reserved_ms: i64,
    pub leased_period_ms: i64,
    pub period_reserved_requests: i64,
    pub leased_period_requests: i64,
}

/// What a process's lease rows reserve beyond what it holds in memory, row by row: a grant
/// whose answer was lost (the database reserved it, the process never learnt of it), or an
/// account the process forgot. `rows` are its rows (their period slices of the license's
/// current period, `period_start`); `held` what it holds. Never below nothing: a row holding
/// less than memory says is a flush committed in the store and not yet here, which the flush
/// itself settles.
pub fn lease_excess(
    rows: &[crate::store::HeldLease],
    held: &[crate::store::HeldLease],
) -> Vec<crate::store::HeldLease> {
    let mine: std::collections::HashMap<i64, &crate::store::HeldLease> =
        held.iter().map(|h| (h.license_id, h)).collect();
    rows.iter()
        .filter_map(|r| {
            let m = mine.get(&r.license_id);
            let ms = m.map_or(0, |m| m.ms);
            // a slice of another period is worth nothing
            let (pms, preq, units) = m.filter(|m| m.period_start == r.period_start).map_or(
                (0, 0, [0; MAX_METERS]),
                |m| {
                    // (units owed in memory hold nothing)
                    (m.period_ms, m.period_requests, m.units.map(|n| n.max(0)))
                },
            );
            let excess = crate::store::HeldLease {
                license_id: r.license_id,
                ms: (r.ms - ms).max(0),
                period_start: r.period_start,
                period_ms: (r.period_ms - pms).max(0),
                period_requests: (r.period_requests - preq).max(0),
                units: std::array::from_fn(|i| (r.units[i] - units[i]).max(0)),
            };
            (excess.ms > 0
                || excess.period_ms > 0
                || excess.period_requests > 0
                || excess.units.iter().any(|&n| n > 0))
            .then_some(excess)
        })
        .collect()
}

/// What does not add up for one license.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Discrepancy {
    pub license_id: i64,
    /// What was compared, for people: `balance_ms 3600000 != history 3599000`.
    pub what: String,
}

/// Everything that does not add up, license by license, in the order of `rows`.
pub fn check(rows: &[BooksRow]) -> Vec<Discrepancy> {
    let mut out = Vec::new();
    for r in rows {
        let mut differ = |name: &str, have: i64, other: &str, want: i64| {
            if have != want {
                out.push(Discrepancy {
                    license_id: r.license_id,
                    what: format!("{name} {have} != {other} {want}"),
                });
            }
        };
        differ(
            "balance_ms",
            r.balance_ms,
            "the history's sum",
            r.history_ms,
        );
        differ("used_ms", r.used_ms, "the usage rows'", r.usage_ms);
        differ(
            "requests_total",
            r.requests_total,
            "the usage rows'",
            r.usage_requests,
        );
        if let Some(l) = r.leases {
            differ("reserved_ms", l.reserved_ms, "the leases'", l.leased_ms);
            differ(
                "period_reserved_ms",
                l.period_reserved_ms,
                "the leases'",
                l.leased_period_ms,
            );
            differ(
                "period_reserved_requests",
                l.period_reserved_requests,
                "the leases'",
                l.leased_period_requests,
            );
        }
        if r.units_ms > r.priced_ms {
            out.push(Discrepancy {
                license_id: r.license_id,
                what: format!(
                    "the units' prices {} > the usage rows' prices {}",
                    r.units_ms, r.priced_ms
                ),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::HeldLease;

    #[test]
    fn a_row_holding_more_than_memory_gives_back_the_difference_and_never_less_than_nothing() {
        let row = |id, ms, pms| HeldLease {
            license_id: id,
            ms,
            period_start: 100,
            period_ms: pms,
            period_requests: 0,
            units: [0; MAX_METERS],
        };
        let rows = [
            row(1, 5_000, 0),
            row(2, 3_000, 900),
            row(3, 1_000, 0),
            row(4, 700, 50),
        ];
        let held = [
            row(1, 2_000, 0),   // a grant of 3 s whose answer was lost
            row(2, 3_000, 900), // agrees
            row(3, 1_500, 0),   // a flush committed there, not yet here: nothing
            HeldLease {
                period_start: 50, // a slice of the period before: worth nothing
                ..row(4, 700, 50)
            },
        ];
        let excess = lease_excess(&rows, &held);
        assert_eq!(excess, vec![row(1, 3_000, 0), row(4, 0, 50)]);
        // a license this process forgot: all of its row
        assert_eq!(lease_excess(&[row(9, 10, 0)], &[]), vec![row(9, 10, 0)]);
        // a meter's slice, as the period's time
        let units = |n: i64| HeldLease {
            units: [n, 0, 0, 0, 0, 0, 0, 0],
            ..row(5, 0, 0)
        };
        assert_eq!(lease_excess(&[units(30)], &[units(10)]), vec![units(20)]);
        assert_eq!(lease_excess(&[units(10)], &[units(30)]), vec![]);
    }

    #[test]
    fn each_column_is_checked_against_what_explains_it() {
        let good = BooksRow {
            license_id: 1,
            balance_ms: 3_000,
            used_ms: 1_000,
            requests_total: 4,
            history_ms: 3_000,
            usage_ms: 1_000,
            usage_requests: 4,
            priced_ms: 600,
            units_ms: 500,
            leases: Some(LeaseBooks {
                reserved_ms: 500,
                leased_ms: 500,
                ..LeaseBooks::default()
            }),
        };
        assert!(check(std::slice::from_ref(&good)).is_empty());
        let bad = BooksRow {
            license_id: 2,
            balance_ms: 3_005,
            units_ms: 700,
            leases: Some(LeaseBooks {
                reserved_ms: 900,
                leased_ms: 500,
                ..LeaseBooks::default()
            }),
            ..good.clone()
        };
        let found = check(&[good, bad]);
        assert_eq!(found.len(), 3, "{found:?}");
        assert!(found.iter().all(|d| d.license_id == 2));
        assert_eq!(found[0].what, "balance_ms 3005 != the history's sum 3000");
        assert_eq!(found[1].what, "reserved_ms 900 != the leases' 500");
        assert_eq!(
            found[2].what,
            "the units' prices 700 > the usage rows' prices 600"
        );
    }
}
