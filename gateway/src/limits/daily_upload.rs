//! `max_upload_bytes_per_day`: the request-body bytes a plan takes per UTC day (an audio app's
//! guests 50 MB, its free plan 1 GB). A request whose declared length would cross what is left
//! is refused at admission, before the app sees a byte; a body of unknown length is cut off
//! where it crosses it. Admission reserves the declared length, and a body of unknown length
//! takes its chunks as they stream (`Ledger::take_upload`), so concurrent uploads cannot
//! together pass the cap; the request's end releases the reservation and counts the bytes it
//! carried if it was charged. A request without a body takes nothing, even from a spent
//! allowance. The day's count is kept by the store (`usage_daily.bytes_in`), so a restart
//! starts from it; guests' counts are in memory only.

use super::{At, Denial, Limit, LimitState, LimitView, Request, Unit};
use crate::store::rollup::day_of;

const DAY_MS: i64 = 86_400_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DailyUpload {
    pub max: u64,
}

/// An account's uploads on one UTC day.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UploadDay {
    /// Days since 1970-01-01 (UTC).
    pub day: i64,
    /// Bytes of charged requests that ended that day.
    pub used: u64,
    /// Declared lengths of requests admitted and still running.
    pub reserved: u64,
}

impl UploadDay {
    /// Gives back what admission reserved for a request that has ended, whatever the plan is
    /// now (a plan changed while it ran must not leave its reservation behind).
    pub fn release(&mut self, reserved: u64) {
        self.reserved = self.reserved.saturating_sub(reserved);
    }

    /// Counts the body bytes of a charged request on the UTC day it ended.
    pub fn count(&mut self, bytes_in: u64, ended_wall: i64) {
        if bytes_in == 0 {
            return;
        }
        let today = day_of(ended_wall);
        if self.day != today {
            self.day = today;
            self.used = 0;
        }
        self.used = self.used.saturating_add(bytes_in);
    }

    /// The day's count as of `at` (a new day starts from nothing; reservations stay, as their
    /// requests still run).
    fn at(&self, at: At) -> UploadDay {
        let today = day_of(at.wall);
        if self.day == today {
            *self
        } else {
            UploadDay {
                day: today,
                used: 0,
                reserved: self.reserved,
            }
        }
    }
}

impl DailyUpload {
    /// What is left of today's allowance.
    pub fn left(&self, day: &UploadDay, at: At) -> u64 {
        let d = day.at(at);
        self.max.saturating_sub(d.used.saturating_add(d.reserved))
    }

    /// Reserves `bytes` more for a body that streams without a declared length, if they fit
    /// in what is left today; concurrent streams each take their share, so together they
    /// cannot pass the cap.
    pub fn take(&self, day: &mut UploadDay, bytes: u64, at: At) -> Result<(), Denial> {
        if bytes > self.left(day, at) {
            return Err(self.denial(at));
        }
        let mut d = day.at(at);
        d.reserved = d.reserved.saturating_add(bytes);
        *day = d;
        Ok(())
    }

    pub fn denial(&self, at: At) -> Denial {
        Denial::QuotaExceeded {
            resets_at: (day_of(at.wall) + 1) * DAY_MS,
            limit: "max_upload_bytes_per_day",
            lease_spent: false,
        }
    }
}

impl Limit for DailyUpload {
    fn check(&self, state: &LimitState, req: &Request, at: At) -> Result<(), Denial> {
        let left = self.left(&state.upload, at);
        // a body of unknown length needs at least a byte of room; one of known length, all
        match req.body_len {
            Some(len) if len > left => Err(self.denial(at)),
            None if left == 0 => Err(self.denial(at)),
            _ => Ok(()),
        }
    }

    fn admit(&self, state: &mut LimitState, req: &Request, at: At) {
        let mut d = state.upload.at(at);
        d.reserved = d.reserved.saturating_add(req.body_len.unwrap_or(0));
        state.upload = d;
    }

    fn describe(&self, state: &LimitState, _: &Request, at: At, out: &mut Vec<LimitView>) {
        let d = state.upload.at(at);
        let max = self.max.min(i64::MAX as u64) as i64;
        let used = d.used.min(i64::MAX as u64) as i64;
        out.push(LimitView {
            name: "max_upload_bytes_per_day",
            unit: Unit::Bytes,
            max,
            used: Some(used),
            remaining: Some(self.left(&d, at).min(i64::MAX as u64) as i64),
            window_start: Some(d.day * DAY_MS),
            resets_at: Some((d.day + 1) * DAY_MS),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: u64 = 1_000_000;
    const NOON: i64 = 20_000 * DAY_MS + DAY_MS / 2;

    fn at(wall: i64) -> At {
        At { wall, mono: 0 }
    }

    fn upload(len: u64) -> Request {
        Request {
            body_len: Some(len),
            ..Request::default()
        }
    }

    /// Admits `len` and ends it charged with all of it (as `Ledger::finish` does: the
    /// reservation goes back, then the bytes are counted).
    fn carried(cap: &DailyUpload, s: &mut LimitState, len: u64, wall: i64) -> Result<(), Denial> {
        cap.check(s, &upload(len), at(wall))?;
        cap.admit(s, &upload(len), at(wall));
        s.upload.release(len);
        s.upload.count(len, wall);
        Ok(())
    }

    #[test]
    fn uploads_pass_until_the_one_that_would_cross_the_cap() {
        let cap = DailyUpload { max: 50 * MB };
        let mut s = LimitState::default();
        for _ in 0..3 {
            carried(&cap, &mut s, 15 * MB, NOON).unwrap();
        }
        let refused = carried(&cap, &mut s, 6 * MB, NOON).unwrap_err();
        assert_eq!(
            refused,
            Denial::QuotaExceeded {
                resets_at: 20_001 * DAY_MS,
                limit: "max_upload_bytes_per_day",
                lease_spent: false
            }
        );
        assert_eq!(s.upload.used, 45 * MB, "the refused upload took nothing");
        carried(&cap, &mut s, 5 * MB, NOON).unwrap();
        assert_eq!(cap.left(&s.upload, at(NOON)), 0);
        // nothing left: even a body of unknown length is refused up front
        let unknown = Request::default();
        assert!(cap.check(&s, &unknown, at(NOON)).is_err());
    }

    #[test]
    fn concurrent_uploads_cannot_pass_the_cap_together() {
        let cap = DailyUpload { max: 10 * MB };
        let mut s = LimitState::default();
        cap.check(&s, &upload(6 * MB), at(NOON)).unwrap();
        cap.admit(&mut s, &upload(6 * MB), at(NOON));
        // the first still runs: its declared length is reserved
        assert!(cap.check(&s, &upload(6 * MB), at(NOON)).is_err());
        // it fails uncharged: the reservation goes back and nothing is counted
        s.upload.release(6 * MB);
        assert_eq!((s.upload.used, s.upload.reserved), (0, 0));
        cap.check(&s, &upload(6 * MB), at(NOON)).unwrap();
    }

    #[test]
    fn a_new_utc_day_starts_from_nothing() {
        let cap = DailyUpload { max: 10 * MB };
        let mut s = LimitState::default();
        carried(&cap, &mut s, 10 * MB, NOON).unwrap();
        assert!(carried(&cap, &mut s, 1, NOON + DAY_MS / 2 - 1).is_err());
        carried(&cap, &mut s, 10 * MB, NOON + DAY_MS / 2).unwrap();
        let mut lines = Vec::new();
        cap.describe(&s, &Request::default(), at(NOON + DAY_MS / 2), &mut lines);
        assert_eq!(lines[0].used, Some(10 * MB as i64));
        assert_eq!(lines[0].remaining, Some(0));
        assert_eq!(lines[0].resets_at, Some(20_002 * DAY_MS));
    }
}
