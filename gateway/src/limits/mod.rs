//! A plan's limits, one module each, behind one interface ([`Limit`]): check a request before
//! anything is taken, take what an admitted request books, record what an ended one used, and
//! describe where an account stands (`/usage/limits`).
//!
//! [`PlanLimits`] is a plan's set, built once from the validated config and shared by the
//! ledger (admission, the tally) and the admin server (`/usage/limits`, through the ledger).
//! The per-account state lives in one [`LimitState`], allocated only for plans that need it.
//! Adding a limit: a module here, a field in [`PlanLimits`] and [`LimitState`] if it counts
//! something, its config key, and, if its count must survive a restart, the store's
//! admission read (docs/architecture.md lists the files).

use crate::config::Plan;
use crate::license::{DayUsage, PeriodUsage};

mod body_size;
mod concurrency;
mod daily_upload;
mod key;
mod period;
mod rates;

pub use body_size::MaxBody;
pub use concurrency::MaxConcurrent;
pub use daily_upload::{DailyUpload, UploadDay};
pub use key::{KeyGate, DAILY_LIMIT as KEY_DAILY_LIMIT};
pub use period::PeriodAllowance;
pub use rates::{Rate, Rates, MAX_RATES};

/// The instant a limit is asked at: the wall clock (Unix ms) and the monotonic clock (ms).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct At {
    pub wall: i64,
    pub mono: i64,
}

/// What the limits see of one request at admission.
#[derive(Clone, Copy, Debug, Default)]
pub struct Request {
    /// The body's declared length, when the request says it.
    pub body_len: Option<u64>,
    /// The account's requests already in flight.
    pub in_flight: u32,
    /// The requests those calls will count as when they end (each its route's
    /// `requests_cost`): a period's requests allowance counts them already.
    pub in_flight_requests: i64,
    /// Several nodes: how many live nodes the rates and the concurrency cap are split between
    /// (each enforces its share; 0 or 1 is one node).
    pub nodes: u32,
    /// Several nodes: what this node may still use of the period's allowances, from the
    /// slices it reserved of them (`None` on one node).
    pub period_left: Option<PeriodLeft>,
    /// How many requests the call counts as against the rates and the period's requests
    /// (its route's `requests_cost`; 0 is read as 1).
    pub cost: u32,
}

/// What is left of a node's slices of a plan period's allowances, its own use (pending, and
/// requests in flight) taken off.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeriodLeft {
    pub ms: i64,
    pub requests: i64,
    /// Whether a spent slice may be renewed now (the store is not asked again at once after
    /// it had nothing left to give).
    pub may_ask: bool,
}

impl Request {
    /// The live nodes a limit is split between (at least 1).
    pub fn share(&self) -> u32 {
        self.nodes.max(1)
    }

    /// The requests the call counts as (at least 1).
    pub fn cost(&self) -> i64 {
        i64::from(self.cost.max(1))
    }
}

/// What an ended request used, or a flush charged, for the limits that count it.
#[derive(Clone, Copy, Debug, Default)]
pub struct Used {
    /// When the request was admitted (none: now); a count belongs to the period it began in.
    pub started_wall: Option<i64>,
    /// Time charged (negative: given back).
    pub charge_ms: i64,
    pub requests: i64,
    /// Body bytes of a charged request.
    pub bytes_in: u64,
    /// Units of each meter a priced request was charged.
    pub units: crate::meters::Units,
    /// When it is counted (Unix ms).
    pub ended_wall: i64,
}

/// Why a request is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Denial {
    Revoked,
    Expired,
    InsufficientBalance {
        remaining_ms: i64,
        /// Several nodes: the balance has more, but this node's lease is spent (a new slice
        /// may be had from the store).
        lease_spent: bool,
    },
    /// The body is larger than the plan allows.
    PayloadTooLarge {
        max_bytes: u64,
    },
    /// An allowance of the plan (time or requests in the period, uploaded bytes in the day) is
    /// used up until `resets_at` (Unix ms); `limit` names it as `/usage/limits` does.
    QuotaExceeded {
        resets_at: i64,
        limit: &'static str,
        /// Several nodes: the allowance has more, as far as this node knows, but its slice of
        /// it is spent (a new one may be had from the store).
        lease_spent: bool,
    },
    /// A meter's allowance for the period (`period_units`) has no room for the request.
    UnitsExceeded {
        resets_at: i64,
        /// The meter's index in `[[meters]]`.
        meter: u8,
        /// Several nodes: the allowance has more, as far as this node knows, but its slice of
        /// it is spent.
        lease_spent: bool,
    },
    ConcurrencyLimit {
        max: u32,
    },
    /// A rate limit's bucket is empty; a request is allowed again in `retry_after_ms`.
    RateLimited {
        retry_after_ms: i64,
    },
}

impl Denial {
    /// Whether it is only this node's lease that is spent (several nodes): a slice may be
    /// had from the store, then the request admitted.
    pub fn lease_spent(&self) -> bool {
        matches!(
            self,
            Denial::InsufficientBalance {
                lease_spent: true,
                ..
            } | Denial::QuotaExceeded {
                lease_spent: true,
                ..
            } | Denial::UnitsExceeded {
                lease_spent: true,
                ..
            }
        )
    }
}

/// What a limit counts in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    Requests,
    Milliseconds,
    Bytes,
    /// Units of a meter the app reports (`period_units`).
    Units,
}

/// One line of `/usage/limits`: a limit, its use and when it resets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LimitView {
    /// The config key it comes from (`requests_per_minute`, `max_upload_bytes_per_day`, …).
    pub name: &'static str,
    pub unit: Unit,
    pub max: i64,
    /// None for limits on one request (the body size), which have no use to show.
    pub used: Option<i64>,
    pub remaining: Option<i64>,
    pub window_start: Option<i64>,
    pub resets_at: Option<i64>,
}

/// An account's state against its plan's stateful limits.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LimitState {
    /// Theoretical arrival time of each rate of the plan (GCRA), in monotonic nanoseconds.
    pub tat_ns: [i64; MAX_RATES],
    pub period: PeriodUsage,
    pub upload: UploadDay,
}

impl LimitState {
    /// Counts what a request used in the plan period it began in (a give-back, negative, never
    /// takes the period below zero) and the bytes of a charged one on the day it ended.
    pub fn count(&mut self, used: &Used) {
        let p = &mut self.period;
        if PeriodAllowance::counts(p, used.started_wall) {
            p.used_ms = (p.used_ms + used.charge_ms).max(0);
            p.requests += used.requests;
            crate::meters::add(&mut p.units, &used.units);
        }
        self.upload.count(used.bytes_in, used.ended_wall);
    }

    /// The state of an account loaded with what the store measured: its period's use and
    /// today's uploads (rate buckets start full).
    pub fn measured(period: PeriodUsage, today: Option<DayUsage>) -> LimitState {
        LimitState {
            tat_ns: [0; MAX_RATES],
            period,
            upload: today.map_or_else(UploadDay::default, |d| UploadDay {
                day: d.day,
                used: d.bytes_in,
                reserved: 0,
            }),
        }
    }
}

/// One limit.
pub trait Limit {
    /// Refuses a request, before anything of any limit is taken.
    fn check(&self, state: &LimitState, req: &Request, at: At) -> Result<(), Denial>;

    /// Takes what an admitted request books (a rate's slot, an upload's reservation).
    fn admit(&self, _state: &mut LimitState, _req: &Request, _at: At) {}

    /// Counts what a request used (or a flush charged, or a give-back returned) in a counter
    /// of the limit's own. The period's use and the day's uploads are not the limits' but the
    /// state's ([`LimitState::count`]): they are counted whatever the plan, so a plan changed
    /// later finds them right.
    fn record(&self, _state: &mut LimitState, _used: &Used) {}

    /// Where the account stands against it now (a limit may have several lines).
    fn describe(&self, state: &LimitState, req: &Request, at: At, out: &mut Vec<LimitView>);
}

/// Runs `$body` with `$l` bound to each limit of the plan `$p`, in the order admission checks
/// them: body size, concurrency, period allowance, daily upload, rates. Calls are static (one
/// expansion per limit type), as admission and the tally run this on every request.
macro_rules! each_limit {
    ($p:expr, $l:ident => $body:expr) => {{
        if let Some($l) = &$p.body {
            $body;
        }
        if let Some($l) = &$p.concurrency {
            $body;
        }
        if let Some($l) = &$p.period {
            $body;
        }
        if let Some($l) = &$p.upload {
            $body;
        }
        if !$p.rates.is_empty() {
            let $l = &$p.rates;
            $body;
        }
    }};
}

/// A plan's limits (`[[plans]]`); a limit left out is unlimited.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PlanLimits {
    pub rates: Rates,
    pub concurrency: Option<MaxConcurrent>,
    pub body: Option<MaxBody>,
    pub period: Option<PeriodAllowance>,
    pub upload: Option<DailyUpload>,
    /// Units of each meter a period allows (`period_units`; 0: no cap), checked by the
    /// ledger for priced requests.
    pub period_units: crate::meters::Units,
    /// The time the plan includes each period (ms), spent before the balance.
    pub included_ms: Option<i64>,
    /// The requests and units the plan includes each period, when it includes any: the
    /// prices they pay are not taken from the balance.
    pub includes: Option<crate::store::included::Includes>,
}

impl PlanLimits {
    pub fn from_plan(p: &Plan) -> PlanLimits {
        PlanLimits {
            rates: Rates::from_plan(p),
            concurrency: p.max_concurrent.map(MaxConcurrent::new),
            body: p.max_body_bytes.map(|max| MaxBody { max }),
            period: PeriodAllowance::from_plan(p),
            upload: p.max_upload_bytes_per_day.map(|max| DailyUpload { max }),
            period_units: p.period_units,
            included_ms: p.included_ms.filter(|&ms| ms > 0),
            includes: Some(crate::store::included::Includes {
                requests: p
                    .included_requests
                    .map_or(0, |n| n.min(i64::MAX as u64) as i64),
                units: p.included_units,
            })
            .filter(|i| i.any()),
        }
    }

    /// Whether an account on this plan keeps a [`LimitState`].
    pub fn has_state(&self) -> bool {
        !self.rates.is_empty()
            || self.period.is_some()
            || self.upload.is_some()
            || self.period_units.iter().any(|&n| n > 0)
            || self.included_ms.is_some()
            || self.includes.is_some()
    }

    /// Checks every limit, then books the request with each: nothing is taken unless all
    /// pass. `state` is the account's (plans without stateful limits have none).
    pub fn admit(&self, state: &mut LimitState, req: &Request, at: At) -> Result<(), Denial> {
        each_limit!(self, l => l.check(state, req, at)?);
        each_limit!(self, l => l.admit(state, req, at));
        Ok(())
    }

    /// Checks every limit, booking nothing (`POST /usage/check`).
    pub fn check(&self, state: &LimitState, req: &Request, at: At) -> Result<(), Denial> {
        each_limit!(self, l => l.check(state, req, at)?);
        Ok(())
    }

    /// Counts what a request used: the state's period and day counts, then every limit's own.
    pub fn record(&self, state: &mut LimitState, used: &Used) {
        state.count(used);
        each_limit!(self, l => l.record(state, used));
    }

    /// Where an account stands against each limit (`/usage/limits`): rates, concurrency,
    /// body size, the period's allowances, the day's uploads.
    pub fn describe(&self, state: &LimitState, req: &Request, at: At) -> Vec<LimitView> {
        let mut out = Vec::new();
        let listed: [Option<&dyn Limit>; 5] = [
            (!self.rates.is_empty()).then_some(&self.rates as &dyn Limit),
            self.concurrency.as_ref().map(|l| l as &dyn Limit),
            self.body.as_ref().map(|l| l as &dyn Limit),
            self.period.as_ref().map(|l| l as &dyn Limit),
            self.upload.as_ref().map(|l| l as &dyn Limit),
        ];
        for l in listed.into_iter().flatten() {
            l.describe(state, req, at, &mut out);
        }
        out
    }

    /// The most a body of unknown length may carry, and the refusal crossing it earns: the
    /// plan's size cap. (What it takes of the day's uploads is reserved as it streams:
    /// [`DailyUpload::take`].)
    pub fn body_allowance(&self) -> Option<(u64, Denial)> {
        self.body
            .map(|b| (b.max, Denial::PayloadTooLarge { max_bytes: b.max }))
    }
}
