//! `max_concurrent`: how many of an account's requests may be in flight at once. The count is
//! the account's open tickets, so it needs no state of its own.

use super::{At, Denial, Limit, LimitState, LimitView, Request, Unit};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaxConcurrent {
    pub max: u32,
}

impl MaxConcurrent {
    pub fn new(max: u64) -> MaxConcurrent {
        MaxConcurrent {
            max: max.min(u64::from(u32::MAX)) as u32,
        }
    }

    /// This node's share of the cap when `nodes` live nodes split it (rounded up, so each may
    /// run one: together they run at most `max + nodes - 1`).
    fn share(&self, req: &Request) -> u32 {
        self.max.div_ceil(req.share())
    }
}

impl Limit for MaxConcurrent {
    fn check(&self, _: &LimitState, req: &Request, _: At) -> Result<(), Denial> {
        let max = self.share(req);
        if req.in_flight >= max {
            return Err(Denial::ConcurrencyLimit { max });
        }
        Ok(())
    }

    fn describe(&self, _: &LimitState, req: &Request, _: At, out: &mut Vec<LimitView>) {
        let max = self.share(req);
        out.push(LimitView {
            name: "max_concurrent",
            unit: Unit::Requests,
            max: i64::from(max),
            used: Some(i64::from(req.in_flight)),
            remaining: Some(i64::from(max.saturating_sub(req.in_flight))),
            window_start: None,
            resets_at: None,
        });
    }
}
