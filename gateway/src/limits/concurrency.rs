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
}

impl Limit for MaxConcurrent {
    fn check(&self, _: &LimitState, req: &Request, _: At) -> Result<(), Denial> {
        if req.in_flight >= self.max {
            return Err(Denial::ConcurrencyLimit { max: self.max });
        }
        Ok(())
    }

    fn describe(&self, _: &LimitState, req: &Request, _: At, out: &mut Vec<LimitView>) {
        out.push(LimitView {
            name: "max_concurrent",
            unit: Unit::Requests,
            max: i64::from(self.max),
            used: Some(i64::from(req.in_flight)),
            remaining: Some(i64::from(self.max.saturating_sub(req.in_flight))),
            window_start: None,
            resets_at: None,
        });
    }
}
