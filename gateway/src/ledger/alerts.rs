//! Usage alerts: the thresholds a charge crosses, of a plan period's allowances and of the
//! prepaid balance since its last top-up. Every charge is checked (`Ledger::add_charge`);
//! the flusher takes what was crossed, records it once per period and announces it.

use super::{AccountState, AlertEvent, AlertKind, Ledger};

/// Whether going from `before` to `after` of `allowance` crosses `percent`.
fn crossed(before: i64, after: i64, allowance: i64, percent: u8) -> bool {
    let (b, a, n, p) = (
        i128::from(before),
        i128::from(after),
        i128::from(allowance),
        i128::from(percent),
    );
    n > 0 && b * 100 < p * n && a * 100 >= p * n
}

impl Ledger {
    /// Looks for thresholds this charge (`charge_ms`, `requests` and the meters' `units`)
    /// crossed. Runs under the account's lock; takes the alert list's lock only when one was
    /// crossed.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn check_alerts(
        &self,
        id: i64,
        s: &AccountState,
        counted: bool,
        charge_ms: i64,
        requests: i64,
        units: &crate::meters::Units,
        now: i64,
    ) {
        let mut crossed_now: Vec<AlertEvent> = Vec::new();
        let mut check = |kind, before: i64, after: i64, allowance: i64, period_start| {
            for &t in &self.thresholds {
                if crossed(before, after, allowance, t) {
                    crossed_now.push(AlertEvent {
                        license_id: id,
                        kind,
                        threshold: t,
                        period_start,
                        used: after,
                        allowance,
                        at: now,
                    });
                }
            }
        };
        let limits = &s.plan.limits;
        if let Some(l) = s.limits.as_ref().filter(|_| counted) {
            let p = &l.period;
            if let Some(max) = limits.period.and_then(|p| p.time_ms) {
                check(
                    AlertKind::PeriodTime,
                    p.used_ms - charge_ms,
                    p.used_ms,
                    max,
                    p.start,
                );
            }
            if let Some(max) = limits.period.and_then(|p| p.requests) {
                check(
                    AlertKind::PeriodRequests,
                    p.requests - requests,
                    p.requests,
                    max,
                    p.start,
                );
            }
            for (i, (&max, &n)) in limits.period_units.iter().zip(units).enumerate() {
                if max > 0 && n > 0 {
                    check(
                        AlertKind::PeriodUnits(self.unit_limit_name(i as u8)),
                        p.units[i] - n,
                        p.units[i],
                        max,
                        p.start,
                    );
                }
            }
        }
        if charge_ms > 0 && s.topup_ms > 0 {
            // of the prepaid balance (what a plan includes is not counted: it is spent first,
            // and the prices it pays are not the balance's)
            let (charge, time) = s.activity.as_ref().map_or((0, 0), |a| {
                (
                    a.pending.charge_ms - a.pending.waived_ms,
                    a.pending.time_ms(),
                )
            });
            let used = s.topup_ms - s.prepaid_left_ms(charge, time);
            let before =
                s.topup_ms - s.prepaid_left_ms(charge - charge_ms, (time - charge_ms).max(0));
            check(AlertKind::Balance, before, used, s.topup_ms, s.topup_at);
        }
        if !crossed_now.is_empty() {
            self.alerts
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend(crossed_now);
        }
    }

    /// Takes the thresholds crossed since the last call (the flusher records them).
    pub fn take_alerts(&self) -> Vec<AlertEvent> {
        std::mem::take(&mut *self.alerts.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Puts alerts back after a failed write, to be recorded by the next flush.
    pub fn restore_alerts(&self, mut events: Vec<AlertEvent>) {
        let mut alerts = self.alerts.lock().unwrap_or_else(|e| e.into_inner());
        events.append(&mut alerts);
        *alerts = events;
    }
}
