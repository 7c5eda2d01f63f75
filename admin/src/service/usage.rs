//! Where a license stands now, as the proxy sees it: a read of the running gateway's ledger,
//! with the store for what this process has not metered.

use gateway::errors::ErrorCode;
use gateway::limits::{LimitState, LimitView, Unit};
use gateway::server::App;
use gateway::store::License;

use crate::error::{ApiError, ApiResult};

/// Where a license stands against each limit of its plan now: what this process meters of it
/// (with, on several nodes, the others' use of the period from the store), else what the store
/// measured. The API's `/usage/limits` and both consoles show these.
pub async fn limits(app: &App, l: &License) -> ApiResult<Vec<LimitView>> {
    let mut lines = plan_limits(app, l).await?;
    // what the plan includes this period, first: it is spent before the balance
    if let Some(included) = app.config.plan(&l.plan).and_then(|p| p.included_ms) {
        let svc = super::Service::of(app);
        let left = svc.included_left_ms(l).await?.unwrap_or(0);
        let (start, end) = app
            .config
            .metering
            .calendar
            .period(l.period_anchor, app.ledger.now_ms());
        lines.insert(
            0,
            LimitView {
                name: "included_time",
                unit: Unit::Milliseconds,
                max: included,
                used: Some(included - left.max(0)),
                remaining: Some(left.max(0)),
                window_start: Some(start),
                resets_at: Some(end),
            },
        );
    }
    Ok(lines)
}

/// [`limits`] of the plan's limits alone.
async fn plan_limits(app: &App, l: &License) -> ApiResult<Vec<LimitView>> {
    let ledger = &app.ledger;
    let calendar = &app.config.metering.calendar;
    let account = ledger.account(l.id);
    let live = match &account {
        // several nodes: the others' use of the period is in the store
        Some(a) if ledger.lease_slice_ms().is_some() => {
            let row = app
                .store
                .admission_state(l.key_hash, calendar, ledger.now_ms())
                .await?;
            ledger.limits_now_with(a, row.and_then(|r| ledger.measured_period(&r)))
        }
        Some(a) => ledger.limits_now(a),
        None => None,
    };
    match live {
        Some(lines) => Ok(lines),
        None => {
            // not metered here this period: what the store measured, as admission reads it
            let row = app
                .store
                .admission_state(l.key_hash, calendar, ledger.now_ms())
                .await?
                .ok_or_else(|| ApiError::new(ErrorCode::InvalidLicenseKey))?;
            let period = ledger.measured_period(&row).unwrap_or_default();
            let state = LimitState::measured(period, row.today);
            Ok(ledger.limits_of(&ledger.plan(&l.plan), &state))
        }
    }
}
