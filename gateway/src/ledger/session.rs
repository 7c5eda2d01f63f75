//! Usage sessions and the requests in them: the tickets of admitted requests, the span of
//! session time each session has billed and what its charged requests justify, and the
//! records written to `usage_sessions`. Only charged time moves a session.

use http::HeaderValue;
use rand::Rng;

use super::clock::Now;
use super::span::{self, cover, Span};
use super::{SessionRecord, Usage};

pub(super) struct OpenSession {
    pub(super) header: HeaderValue,
    pub(super) record: SessionRecord,
    /// The session time charged so far, flushed or pending (monotonic): it grows as open
    /// requests are charged and as requests end charged, and shrinks back to what is justified
    /// when a request ends uncharged. None: nothing charged, and no idle clock running.
    pub(super) billed: Option<Span>,
    /// What requests that ended charged justify on their own.
    pub(super) confirmed: Option<Span>,
    /// Bumped on every change; the record is rewritten only when it differs from the last write.
    pub(super) seq: u64,
    pub(super) written_seq: u64,
}

impl OpenSession {
    /// Brings the record's times in line with the charged span, as the wall clock reads `now`:
    /// both ends from the monotonic instants, so the record's span is as long as the session
    /// time charged (where the store charges by spans, `store::session_time`, a step of the
    /// wall clock moves the span and charges nothing).
    pub(super) fn sync_times(&mut self, now: Now) {
        self.seq += 1;
        let r = &mut self.record;
        match self.billed {
            Some(b) => {
                r.started_at = now.wall_of(b.from);
                r.last_activity_at = now.wall_of(b.to).max(r.started_at);
            }
            None => r.last_activity_at = r.started_at,
        }
    }
}

/// An admitted request that has not ended: every flush charges it up to the flush's time.
pub(super) struct Ticket {
    pub(super) id: u64,
    /// Admission, on the monotonic clock and on the wall clock.
    pub(super) start: i64,
    pub(super) start_wall: i64,
    /// How far the flushes have charged it (monotonic); `start` until the first.
    pub(super) billed_to: i64,
    /// What admission reserved of the day's uploads for its declared body.
    pub(super) reserved_bytes: u64,
    /// A `fixed` or `reported` route's request: what admission reserved for it. Such a
    /// request is charged its price at its end, outside time: no flush charges it while it
    /// runs, and it neither opens, extends nor keeps a session.
    pub(super) priced: Option<super::Reserve>,
    /// What of `priced` admission reserved of the balance: the reservation less what the
    /// plan's included requests and units are expected to pay.
    pub(super) reserved_ms: i64,
    /// How many requests it counts as (its route's `requests_cost`).
    pub(super) cost: u32,
    /// A `time_multiplier` route's request (thousandths): its time times that is charged, by
    /// the flushes as it runs, outside the session.
    pub(super) scale: Option<i64>,
}

#[derive(Default)]
pub(super) struct Activity {
    pub(super) pending: Usage,
    pub(super) session: Option<OpenSession>,
    /// Sessions that ended and still have to be written.
    pub(super) closed: Vec<SessionRecord>,
    /// Requests admitted and not yet ended.
    pub(super) open: Vec<Ticket>,
    pub(super) next_ticket: u64,
}

impl Activity {
    pub(super) fn has_work(&self) -> bool {
        !self.pending.is_zero()
            || self.session.is_some()
            || !self.closed.is_empty()
            || !self.open.is_empty()
    }

    pub(super) fn in_flight(&self) -> u32 {
        self.open.len() as u32
    }

    /// The requests the calls in flight will count as (each its `requests_cost`).
    pub(super) fn in_flight_requests(&self) -> i64 {
        self.open.iter().map(|t| i64::from(t.cost)).sum()
    }

    pub(super) fn open_ticket(
        &mut self,
        now: Now,
        reserved_bytes: u64,
        priced: Option<(super::Reserve, i64)>,
        cost: u32,
        scale: Option<i64>,
    ) -> u64 {
        self.next_ticket += 1;
        self.open.push(Ticket {
            id: self.next_ticket,
            start: now.mono,
            start_wall: now.wall,
            billed_to: now.mono,
            reserved_bytes,
            priced: priced.map(|(p, _)| p),
            reserved_ms: priced.map_or(0, |(_, ms)| ms),
            cost,
            scale,
        });
        self.next_ticket
    }

    /// What the priced requests in flight reserved: balance (ms, what the plan is not expected
    /// to pay), and units of each meter.
    pub(super) fn reserved(&self) -> (i64, crate::meters::Units) {
        let mut units = [0; crate::meters::MAX_METERS];
        let mut ms = 0;
        for t in &self.open {
            if let Some(r) = &t.priced {
                ms += t.reserved_ms;
                crate::meters::add(&mut units, &r.units);
            }
        }
        (ms, units)
    }

    pub(super) fn ticket_mut(&mut self, id: u64) -> Option<&mut Ticket> {
        self.open.iter_mut().find(|t| t.id == id)
    }

    pub(super) fn take_ticket(&mut self, id: u64) -> Option<Ticket> {
        let i = self.open.iter().position(|t| t.id == id)?;
        Some(self.open.swap_remove(i))
    }

    /// Whether the open session is over: nothing in flight, and either nothing charged or no
    /// charged time within the idle timeout. Only charged time keeps a session open.
    pub(super) fn session_expired(&self, mono: i64, idle_timeout_ms: i64) -> bool {
        self.open
            .iter()
            .all(|t| t.priced.is_some() || t.scale.is_some())
            && self
                .session
                .as_ref()
                .is_some_and(|s| s.billed.is_none_or(|b| mono - b.to > idle_timeout_ms))
    }

    /// Ends the open session at its last charged time. One that was never charged nor written
    /// is no session at all and leaves nothing behind.
    pub(super) fn close_session(&mut self) {
        if let Some(s) = self.session.take() {
            if s.billed.is_none() && s.written_seq == 0 {
                return;
            }
            let mut record = s.record;
            record.ended_at = Some(record.last_activity_at);
            self.closed.push(record);
        }
    }
}

impl OpenSession {
    /// Shrinks the charged span back to what is justified once a request ended uncharged:
    /// requests that ended charged, and what flushes charged of the requests still `open`.
    /// Returns the session time taken off.
    pub(super) fn retract(&mut self, open: &[Ticket]) -> i64 {
        let mut justified = self.confirmed;
        // (only requests in the session: scaled ones are charged outside it)
        for t in open
            .iter()
            .filter(|t| t.billed_to > t.start && t.scale.is_none())
        {
            cover(&mut justified, t.start, t.billed_to);
        }
        let back = span::len(self.billed) - span::len(justified);
        self.billed = justified;
        back
    }
}

pub(super) fn new_session(license_id: i64, now: i64) -> OpenSession {
    let id = new_session_id();
    OpenSession {
        header: HeaderValue::from_str(&id).expect("session ids are ASCII"),
        record: SessionRecord {
            id: id.into(),
            license_id,
            started_at: now,
            last_activity_at: now,
            ended_at: None,
            charged_ms: 0,
            requests: 0,
            bytes_in: 0,
            bytes_out: 0,
        },
        billed: None,
        confirmed: None,
        seq: 0,
        written_seq: 0,
    }
}

/// `ses_` and 24 hex digits: unique across restarts without asking the store.
fn new_session_id() -> String {
    let bytes: [u8; 12] = rand::rng().random();
    format!("ses_{}", hex::encode(bytes))
}
