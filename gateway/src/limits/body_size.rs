//! `max_body_bytes`: the largest request body a plan takes. A declared length over it is
//! refused at admission; a body of unknown length is cut off where it crosses it (the proxy's
//! body filter, through [`super::PlanLimits::body_allowance`]).

use super::{At, Denial, Limit, LimitState, LimitView, Request, Unit};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaxBody {
    pub max: u64,
}

impl Limit for MaxBody {
    fn check(&self, _: &LimitState, req: &Request, _: At) -> Result<(), Denial> {
        match req.body_len {
            Some(len) if len > self.max => Err(Denial::PayloadTooLarge {
                max_bytes: self.max,
            }),
            _ => Ok(()),
        }
    }

    fn describe(&self, _: &LimitState, _: &Request, _: At, out: &mut Vec<LimitView>) {
        out.push(LimitView {
            name: "max_body_bytes",
            unit: Unit::Bytes,
            max: self.max.min(i64::MAX as u64) as i64,
            used: None,
            remaining: None,
            window_start: None,
            resets_at: None,
        });
    }
}
