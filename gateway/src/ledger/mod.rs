//! The ledger: every known key's balance, unflushed usage and open session, in memory.
//!
//! This is the hot path. A request's key hash finds its [`Account`] in a quick_cache; admission
//! and the end-of-request tally each take that account's own mutex for a few arithmetic
//! operations, so keys never contend with each other. Nothing here touches the disk: the flusher
//! takes a [`FlushItem`] snapshot of each changed account, commits it to the store, and only then
//! subtracts what was committed ([`Ledger::commit`]). A failed commit leaves everything pending
//! for the next try, and a crash loses only what no commit has taken yet: an under-charge, never
//! a double charge.
//!
//! A request is charged from its admission: every snapshot charges the time each open request
//! has run so far, so a crash loses at most one flush interval even of a request still waiting
//! on the app. A request that then ends in the gateway's own failure gives back what it was
//! charged ([`Ending::Returned`]), and only charged time moves a session: its interval, its idle
//! clock and its end.
//!
//! Time comes from a [`Clock`]: durations from its monotonic side, stored times from its wall
//! side, so sessions and idle timeouts are tested without sleeping and a wall-clock step is
//! never charged.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use http::HeaderValue;
use rand::Rng;

use crate::config::MeteringMode;
use crate::keys::KeyHash;
use crate::periods::Calendar;

mod clock;
mod span;

use clock::Now;
pub use clock::{now_ms, Clock, ManualClock, SystemClock};
use span::{cover, Span};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LicenseStatus {
    Active,
    Revoked,
}

impl LicenseStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            LicenseStatus::Active => "active",
            LicenseStatus::Revoked => "revoked",
        }
    }

    pub fn parse(s: &str) -> Option<LicenseStatus> {
        match s {
            "active" => Some(LicenseStatus::Active),
            "revoked" => Some(LicenseStatus::Revoked),
            _ => None,
        }
    }
}

/// What the ledger needs of a license row. `version` grows with every change to the row, so an
/// older read can never overwrite a newer one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LicenseState {
    pub id: i64,
    pub key_hash: KeyHash,
    pub plan: String,
    pub status: LicenseStatus,
    pub expires_at: Option<i64>,
    pub balance_ms: i64,
    pub version: i64,
    /// The anniversary plan periods are counted from.
    pub created_at: i64,
    /// Usage in the current plan period, when the read that produced this row measured it (the
    /// proxy's cache-miss read does; change polls and flushes do not).
    pub period: Option<PeriodUsage>,
    /// The balance right after the last top-up and when it was (Unix ms), when the read looked
    /// (the cache-miss read): balance alerts are percentages of it.
    pub topup: Option<(i64, i64)>,
}

/// What a usage alert measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AlertKind {
    /// Time used of the plan period's allowance.
    PeriodTime,
    /// Requests used of the plan period's allowance.
    PeriodRequests,
    /// Prepaid time used since the last top-up.
    Balance,
}

impl AlertKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AlertKind::PeriodTime => "period_time",
            AlertKind::PeriodRequests => "period_requests",
            AlertKind::Balance => "balance",
        }
    }
}

/// A threshold crossed by a request, for the flusher to record (once per period: the store
/// keeps one row per license, kind, threshold and period) and to announce.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AlertEvent {
    pub license_id: i64,
    pub kind: AlertKind,
    pub threshold: u8,
    /// The period's start, or the top-up's time for balance alerts.
    pub period_start: i64,
    /// Milliseconds or requests used, and the allowance they are a share of.
    pub used: i64,
    pub allowance: i64,
    pub at: i64,
}

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

/// What a license used in one plan period `[start, end)`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeriodUsage {
    pub start: i64,
    pub end: i64,
    pub used_ms: i64,
    pub requests: i64,
}

/// Why a request with a known key is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Denial {
    Revoked,
    Expired,
    InsufficientBalance {
        remaining_ms: i64,
    },
    /// The body is larger than the plan allows.
    PayloadTooLarge {
        max_bytes: u64,
    },
    /// The plan's allowance for the period is used up until `resets_at` (Unix ms).
    QuotaExceeded {
        resets_at: i64,
    },
    ConcurrencyLimit {
        max: u32,
    },
    /// A rate limit's bucket is empty; a request is allowed again in `retry_after_ms`.
    RateLimited {
        retry_after_ms: i64,
    },
}

/// An admitted request: its ticket, its session and the balance it was admitted with.
#[derive(Clone, Debug)]
pub struct Admission {
    /// Names this request to [`Ledger::finish`]; from admission on, every flush charges the
    /// time it has run so far.
    pub ticket: u64,
    /// The usage session (none for guests, who have no license to record one against).
    pub session_id: Option<HeaderValue>,
    pub remaining_ms: i64,
    /// The plan's body cap, for bodies whose length is not known up front.
    pub max_body_bytes: Option<u64>,
}

/// How an admitted request ended, for the tally.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ending {
    /// Served: charged to its end.
    Charged,
    /// The app answered, then the exchange broke (the app's connection failed mid-response):
    /// what the flushes charged while it ran stays charged, the rest is not.
    Broken,
    /// Never served: the gateway's own failure (the app unreachable, an upstream timeout, a
    /// 502/504 made by the gateway), or refused mid-request (a body past the plan's cap).
    /// Whatever the flushes charged for it is given back.
    Returned(ReturnReason),
}

/// Why charged time was given back (each reason is its own `usage_history` row).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReturnReason {
    /// The app could not be reached or did not answer (or, after it answered, the connection
    /// to it failed): a failure of the gateway's side.
    GatewayFailure,
    /// The request was refused part way (its body crossed the plan's cap).
    Refused,
}

impl ReturnReason {
    /// The `usage_history.reason` of the row that gives the time back.
    pub fn history_reason(self) -> &'static str {
        match self {
            ReturnReason::GatewayFailure => {
                "returned: the app could not be reached, did not answer, or its connection failed"
            }
            ReturnReason::Refused => "returned: the request was refused part way",
        }
    }
}

/// Usage tallied in memory and not yet committed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// What the balance is charged, net of what was given back: session time or request
    /// time, by the metering mode.
    pub charge_ms: i64,
    pub requests: i64,
    pub session_ms: i64,
    pub request_ms: i64,
    pub bytes_in: i64,
    pub bytes_out: i64,
    /// Charged by earlier flushes for requests that then ended in the gateway's own failure,
    /// and given back (already taken off `charge_ms`).
    pub returned_failure_ms: i64,
    /// The same for requests refused part way.
    pub returned_refused_ms: i64,
}

impl Usage {
    fn is_zero(&self) -> bool {
        *self == Usage::default()
    }

    /// What was given back, by reason.
    pub fn returned(&self) -> [(ReturnReason, i64); 2] {
        [
            (ReturnReason::GatewayFailure, self.returned_failure_ms),
            (ReturnReason::Refused, self.returned_refused_ms),
        ]
    }

    fn subtract(&mut self, other: &Usage) {
        self.charge_ms -= other.charge_ms;
        self.requests -= other.requests;
        self.session_ms -= other.session_ms;
        self.request_ms -= other.request_ms;
        self.bytes_in -= other.bytes_in;
        self.bytes_out -= other.bytes_out;
        self.returned_failure_ms -= other.returned_failure_ms;
        self.returned_refused_ms -= other.returned_refused_ms;
    }
}

/// A usage session as it is written to `usage_sessions` (absolute values: rewriting the same
/// record is harmless).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionRecord {
    pub id: Arc<str>,
    pub license_id: i64,
    pub started_at: i64,
    pub last_activity_at: i64,
    pub ended_at: Option<i64>,
    pub charged_ms: i64,
    pub requests: i64,
    pub bytes_in: i64,
    pub bytes_out: i64,
}

struct OpenSession {
    header: HeaderValue,
    record: SessionRecord,
    /// The session time charged so far, flushed or pending (monotonic): it grows as open
    /// requests are charged and as requests end charged, and shrinks back to what is justified
    /// when a request ends uncharged. None: nothing charged, and no idle clock running.
    billed: Option<Span>,
    /// What requests that ended charged justify on their own.
    confirmed: Option<Span>,
    /// The monotonic instant `record.started_at` was taken from.
    started: Option<i64>,
    /// Bumped on every change; the record is rewritten only when it differs from the last write.
    seq: u64,
    written_seq: u64,
}

impl OpenSession {
    /// Brings the record's times in line with the charged span, as the wall clock reads `now`.
    fn sync_times(&mut self, now: Now) {
        self.seq += 1;
        let r = &mut self.record;
        match self.billed {
            Some(b) => {
                if self.started != Some(b.from) {
                    self.started = Some(b.from);
                    r.started_at = now.wall_of(b.from);
                }
                r.last_activity_at = now.wall_of(b.to).max(r.started_at);
            }
            None => r.last_activity_at = r.started_at,
        }
    }
}

/// An admitted request that has not ended: every flush charges it up to the flush's time.
struct Ticket {
    id: u64,
    /// Admission, on the monotonic clock and on the wall clock.
    start: i64,
    start_wall: i64,
    /// How far the flushes have charged it (monotonic); `start` until the first.
    billed_to: i64,
}

/// One license as the proxy sees it.
pub struct Account {
    pub id: i64,
    state: Mutex<AccountState>,
}

struct AccountState {
    key_hash: KeyHash,
    plan: Arc<PlanName>,
    expires_at: Option<i64>,
    /// The balance as last read from or committed to the store.
    balance_ms: i64,
    version: i64,
    /// Present only while the account has uncommitted usage, a session or requests in flight:
    /// most cached keys are idle, and this keeps them small (benches/memory.rs).
    activity: Option<Box<Activity>>,
    /// Rate-limit buckets and the period's usage, for plans that have such limits (allocated at
    /// the first admission, or at load when the load measured the period).
    limits: Option<Box<LimitState>>,
    created_at: i64,
    /// The balance right after the last top-up, and when: balance alerts measure from it.
    topup_ms: i64,
    topup_at: i64,
    /// A guest (no license): limited by its plan, never charged, never flushed.
    guest: bool,
    status: LicenseStatus,
    /// Whether the account is in the ledger's dirty list.
    dirty: bool,
    /// A snapshot of this account is being committed. A row read meanwhile may already hold
    /// that commit's deduction while `pending` still holds it too, so its balance waits in
    /// `deferred` until the commit (or its failure) is applied: remaining never counts one
    /// usage twice.
    flushing: bool,
    deferred: Option<Box<LicenseState>>,
    /// The license is no longer in the store: nothing more is charged or written for it (its
    /// id may be given to a new license).
    gone: bool,
}

/// An account against its plan's limits, for people (`/usage/limits`).
#[derive(Clone, Debug)]
pub struct LimitsNow {
    pub plan: Arc<PlanName>,
    pub in_flight: u32,
    pub rates: Vec<RateNow>,
    /// The current period's usage as metered here (unflushed usage included), if the account
    /// has been measured this period.
    pub period: Option<PeriodUsage>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateNow {
    pub rate: Rate,
    /// Requests that would be admitted now, back to back.
    pub remaining: u64,
    /// When the bucket is full again (Unix ms).
    pub full_at: i64,
}

/// Per-account limit state.
struct LimitState {
    /// Theoretical arrival time of each rate of the plan (GCRA), in monotonic nanoseconds.
    tat_ns: [i64; MAX_RATES],
    period: PeriodUsage,
}

#[derive(Default)]
struct Activity {
    pending: Usage,
    session: Option<OpenSession>,
    /// Sessions that ended and still have to be written.
    closed: Vec<SessionRecord>,
    /// Requests admitted and not yet ended.
    open: Vec<Ticket>,
    next_ticket: u64,
}

impl Activity {
    fn has_work(&self) -> bool {
        !self.pending.is_zero()
            || self.session.is_some()
            || !self.closed.is_empty()
            || !self.open.is_empty()
    }

    fn in_flight(&self) -> u32 {
        self.open.len() as u32
    }

    fn open_ticket(&mut self, now: Now) -> u64 {
        self.next_ticket += 1;
        self.open.push(Ticket {
            id: self.next_ticket,
            start: now.mono,
            start_wall: now.wall,
            billed_to: now.mono,
        });
        self.next_ticket
    }

    fn take_ticket(&mut self, id: u64) -> Option<Ticket> {
        let i = self.open.iter().position(|t| t.id == id)?;
        Some(self.open.swap_remove(i))
    }

    /// Whether the open session is over: nothing in flight, and either nothing charged or no
    /// charged time within the idle timeout. Only charged time keeps a session open.
    fn session_expired(&self, mono: i64, idle_timeout_ms: i64) -> bool {
        self.open.is_empty()
            && self
                .session
                .as_ref()
                .is_some_and(|s| s.billed.is_none_or(|b| mono - b.to > idle_timeout_ms))
    }

    /// Ends the open session at its last charged time. One that was never charged nor written
    /// is no session at all and leaves nothing behind.
    fn close_session(&mut self) {
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

impl Account {
    fn new(s: &LicenseState, plan: Arc<PlanName>) -> Account {
        let limits = s.period.filter(|_| plan.limits.has_state()).map(|period| {
            Box::new(LimitState {
                tat_ns: [0; MAX_RATES],
                period,
            })
        });
        Account {
            id: s.id,
            state: Mutex::new(AccountState {
                key_hash: s.key_hash,
                plan,
                status: s.status,
                expires_at: s.expires_at,
                balance_ms: s.balance_ms,
                version: s.version,
                activity: None,
                limits,
                created_at: s.created_at,
                topup_ms: s.topup.map_or(s.balance_ms, |(ms, _)| ms.max(s.balance_ms)),
                topup_at: s.topup.map_or(s.created_at, |(_, at)| at),
                guest: false,
                dirty: false,
                flushing: false,
                deferred: None,
                gone: false,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, AccountState> {
        // A panic while holding an account lock leaves plain integers behind; keep metering.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The balance left: stored balance minus unflushed charges.
    pub fn remaining_ms(&self) -> i64 {
        self.lock().remaining_ms()
    }

    pub fn plan(&self) -> Arc<PlanName> {
        self.lock().plan.clone()
    }

    /// Unflushed usage (for tests and the admin view).
    pub fn pending(&self) -> Usage {
        self.lock()
            .activity
            .as_ref()
            .map_or_else(Usage::default, |a| a.pending)
    }

    /// The stored balance and its version, as the ledger last saw them.
    pub fn stored(&self) -> (i64, i64) {
        let s = self.lock();
        (s.balance_ms, s.version)
    }
}

impl AccountState {
    /// Applies a row read from the store if it is newer than what we hold. While a flush of
    /// this account is being committed, only the fields a flush never changes are applied now;
    /// the balance waits for the commit (see `flushing`).
    fn apply(&mut self, row: &LicenseState, plans: &Plans, now: i64) -> Option<KeyHash> {
        self.apply_after(row, 0, plans, now)
    }

    /// [`AccountState::apply`] for the row a flush's deduction of `deducted_ms` left (negative
    /// when the flush gave time back): only a balance above what that deduction explains is a
    /// top-up.
    fn apply_after(
        &mut self,
        row: &LicenseState,
        deducted_ms: i64,
        plans: &Plans,
        now: i64,
    ) -> Option<KeyHash> {
        // a row held back during a flush is newer than `version` already: an older one must
        // not undo it
        let newest = self
            .deferred
            .as_ref()
            .map_or(self.version, |d| d.version.max(self.version));
        if row.version <= newest {
            return None;
        }
        if self.flushing {
            if self
                .deferred
                .as_ref()
                .is_none_or(|d| d.version < row.version)
            {
                self.deferred = Some(Box::new(row.clone()));
            }
            return self.apply_details(row, plans);
        }
        self.version = row.version;
        if row.balance_ms > self.balance_ms - deducted_ms {
            // credited: balance alerts count from here (a new "period" for them)
            self.topup_ms = row.balance_ms;
            self.topup_at = now;
        }
        self.balance_ms = row.balance_ms;
        self.apply_details(row, plans)
    }

    /// Status, expiry, plan and key: returns the key hash replaced, if the key was rotated.
    fn apply_details(&mut self, row: &LicenseState, plans: &Plans) -> Option<KeyHash> {
        self.status = row.status;
        self.expires_at = row.expires_at;
        if *self.plan.name != *row.plan {
            self.plan = plans.intern(&row.plan);
            // the new plan's rates are other buckets; the period's usage stays counted
            if let Some(l) = self.limits.as_mut() {
                l.tat_ns = [0; MAX_RATES];
            }
        }
        if self.key_hash != row.key_hash {
            let old = self.key_hash;
            self.key_hash = row.key_hash;
            return Some(old);
        }
        None
    }

    /// The flush taken of this account is done (committed or failed): a row held back while it
    /// ran can be applied now. Returns a key hash replaced, as [`AccountState::apply`] does.
    fn end_flush(&mut self, plans: &Plans, now: i64) -> Option<KeyHash> {
        self.flushing = false;
        let row = self.deferred.take()?;
        self.apply(&row, plans, now)
    }

    /// Ends a flush whose row is `row`, the deduction of `deducted_ms` applied in it; a row
    /// held back meanwhile is applied after it when newer.
    fn end_flush_with(
        &mut self,
        row: &LicenseState,
        deducted_ms: i64,
        plans: &Plans,
        now: i64,
    ) -> Vec<KeyHash> {
        self.flushing = false;
        let deferred = self.deferred.take();
        let mut replaced: Vec<KeyHash> = self
            .apply_after(row, deducted_ms, plans, now)
            .into_iter()
            .collect();
        if let Some(d) = deferred {
            replaced.extend(self.apply(&d, plans, now));
        }
        replaced
    }

    fn remaining_ms(&self) -> i64 {
        self.balance_ms - self.activity.as_ref().map_or(0, |a| a.pending.charge_ms)
    }

    fn activity(&mut self) -> &mut Activity {
        self.activity.get_or_insert_with(Box::default)
    }

    fn has_work(&self) -> bool {
        self.activity.as_ref().is_some_and(|a| a.has_work())
    }

    /// Frees the activity state once everything in it is committed.
    fn settle(&mut self) {
        if !self.has_work() {
            self.activity = None;
        }
    }
}

/// What a cache lookup found.
pub enum Lookup {
    Known(Arc<Account>),
    /// Looked up recently and not found: deny without a disk read.
    Unknown,
    /// Not in memory: read the store, then call [`Ledger::insert_loaded`].
    Miss,
}

/// A snapshot of one account's uncommitted work, taken by the flusher.
pub struct FlushItem {
    pub account: Arc<Account>,
    pub usage: Usage,
    /// Closed sessions first, then the open one if it changed.
    pub sessions: Vec<SessionRecord>,
    closed: usize,
    open_seq: Option<u64>,
}

/// What the store did with one [`FlushItem`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Applied {
    /// The usage was deducted: the whole row as the deduction left it. A flush bumps the row's
    /// version, so it must carry every field: adopting only the balance at the new version
    /// would hide a revocation or rotation committed just before it.
    Deducted(LicenseState),
    /// No usage to deduct; the item's sessions were written.
    Written,
    /// The license is no longer in the store (deleted under a running gateway): nothing of the
    /// item could be written, and it was set aside so the rest of the batch could commit.
    Orphaned,
}

pub struct LedgerOptions {
    pub mode: MeteringMode,
    pub idle_timeout_ms: i64,
    pub cache_capacity: u64,
    pub negative_ttl: Duration,
    /// The configured plans; none means no limits at all.
    pub plans: Vec<crate::config::Plan>,
    /// The zone plan periods are computed in.
    pub calendar: Calendar,
    /// Alert thresholds in percent, ascending; empty: no alerts.
    pub alert_thresholds: Vec<u8>,
}

impl Default for LedgerOptions {
    fn default() -> Self {
        LedgerOptions {
            mode: MeteringMode::Session,
            idle_timeout_ms: 300_000,
            cache_capacity: 1_000_000,
            negative_ttl: Duration::from_secs(5),
            plans: Vec::new(),
            calendar: Calendar::utc(),
            alert_thresholds: Vec::new(),
        }
    }
}

/// A plan as the hot path sees it: its name, the same as a header value ready for
/// `X-Tollgate-Plan`, and its limits.
#[derive(Debug)]
pub struct PlanName {
    pub name: Box<str>,
    pub header: HeaderValue,
    pub limits: PlanLimits,
}

/// Guests remembered at once; past this the least recently seen are forgotten (and start over).
const GUESTS: u64 = 200_000;

/// At most this many rate limits per plan (per second, minute, hour, day).
pub const MAX_RATES: usize = 4;

/// One rate limit: a bucket of `requests`, refilled at `requests` per `window_ms` (GCRA): a
/// burst of `requests`, then a steady `requests` per window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    pub requests: u64,
    pub window_ms: i64,
    /// `second`, `minute`, `hour` or `day`.
    pub per: &'static str,
    /// Time between two requests at the steady rate, in nanoseconds (computed once: admission
    /// runs on every request).
    interval_ns: i64,
    /// How far ahead of now the bucket may be booked: a full bucket is a burst of `requests`.
    tolerance_ns: i64,
}

impl Rate {
    pub fn new(requests: u64, window_ms: i64, per: &'static str) -> Rate {
        let interval_ns = (window_ms * 1_000_000 / requests.max(1) as i64).max(1);
        Rate {
            requests,
            window_ms,
            per,
            interval_ns,
            tolerance_ns: window_ms * 1_000_000 - interval_ns,
        }
    }

    fn interval_ns(&self) -> i64 {
        self.interval_ns
    }

    fn tolerance_ns(&self) -> i64 {
        self.tolerance_ns
    }
}

/// A plan's limits (`[[plans]]`); `None` and an empty list are unlimited.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PlanLimits {
    pub rates: Vec<Rate>,
    pub max_concurrent: Option<u32>,
    pub max_body_bytes: Option<u64>,
    pub period_ms: Option<i64>,
    pub period_requests: Option<i64>,
}

impl PlanLimits {
    pub fn from_plan(p: &crate::config::Plan) -> PlanLimits {
        let rates = [
            (p.requests_per_second, 1_000, "second"),
            (p.requests_per_minute, 60_000, "minute"),
            (p.requests_per_hour, 3_600_000, "hour"),
            (p.requests_per_day, 86_400_000, "day"),
        ]
        .into_iter()
        .filter_map(|(n, window_ms, per)| {
            n.filter(|n| *n > 0)
                .map(|requests| Rate::new(requests, window_ms, per))
        })
        .collect();
        PlanLimits {
            rates,
            max_concurrent: p.max_concurrent.map(|n| n.min(u32::MAX as u64) as u32),
            max_body_bytes: p.max_body_bytes,
            period_ms: p.period_ms,
            period_requests: p.period_requests.map(|n| n as i64),
        }
    }

    /// Whether an account on this plan keeps limit state (buckets or a period).
    pub fn has_state(&self) -> bool {
        !self.rates.is_empty() || self.has_period()
    }

    pub fn has_period(&self) -> bool {
        self.period_ms.is_some() || self.period_requests.is_some()
    }
}

/// Plans by name, shared: a million accounts on four plans hold four of them. A license whose
/// plan is not in the config is limited as `free`.
#[derive(Default)]
struct Plans {
    configured: Vec<crate::config::Plan>,
    interned: Mutex<Vec<Arc<PlanName>>>,
}

impl Plans {
    fn intern(&self, name: &str) -> Arc<PlanName> {
        let mut plans = self.interned.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = plans.iter().find(|p| *p.name == *name) {
            return p.clone();
        }
        let header = HeaderValue::from_str(name)
            .unwrap_or_else(|_| HeaderValue::from_static("invalid-plan-name"));
        let limits = self
            .configured
            .iter()
            .find(|p| p.name == name)
            .or_else(|| self.configured.iter().find(|p| p.name == "free"))
            .map(PlanLimits::from_plan)
            .unwrap_or_default();
        let p = Arc::new(PlanName {
            name: name.into(),
            header,
            limits,
        });
        plans.push(p.clone());
        p
    }
}

pub struct Ledger {
    clock: Arc<dyn Clock>,
    mode: MeteringMode,
    idle_timeout_ms: i64,
    /// Known keys. quick_cache rather than moka: with a million keys moka's per-entry
    /// bookkeeping alone took ~350 MB, quick_cache ~100 MB (benches/memory.rs).
    by_hash: quick_cache::sync::Cache<KeyHash, Arc<Account>>,
    /// Keys looked up and not found, for a short time (moka for its per-entry TTL).
    unknown: moka::sync::Cache<KeyHash, ()>,
    /// Guests by client id, kept while they keep coming (a month without requests forgets one).
    guests: moka::sync::Cache<String, Arc<Account>>,
    plans: Plans,
    /// Every live account by license id, so a key read again after eviction, a rotated key, and
    /// a change from the admin API all reach the one account that holds the pending usage.
    by_id: Mutex<HashMap<i64, Weak<Account>>>,
    /// Accounts with pending usage or sessions: what the flusher visits.
    dirty: Mutex<Vec<Arc<Account>>>,
    calendar: Calendar,
    thresholds: Vec<u8>,
    /// Thresholds crossed since the flusher last took them.
    alerts: Mutex<Vec<AlertEvent>>,
}

impl Ledger {
    pub fn new(clock: Arc<dyn Clock>, o: LedgerOptions) -> Ledger {
        Ledger {
            clock,
            mode: o.mode,
            idle_timeout_ms: o.idle_timeout_ms,
            by_hash: quick_cache::sync::Cache::new(o.cache_capacity as usize),
            unknown: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(o.negative_ttl.max(Duration::from_millis(1)))
                .build(),
            guests: moka::sync::Cache::builder()
                .max_capacity(GUESTS)
                .time_to_idle(Duration::from_secs(32 * 86_400))
                .build(),
            plans: Plans {
                configured: o.plans,
                interned: Mutex::default(),
            },
            by_id: Mutex::new(HashMap::new()),
            dirty: Mutex::new(Vec::new()),
            calendar: o.calendar,
            thresholds: o.alert_thresholds,
            alerts: Mutex::new(Vec::new()),
        }
    }

    pub fn now_ms(&self) -> i64 {
        self.clock.now_ms()
    }

    fn now(&self) -> Now {
        Now::read(&*self.clock)
    }

    pub fn mode(&self) -> MeteringMode {
        self.mode
    }

    pub fn lookup(&self, hash: &KeyHash) -> Lookup {
        if let Some(a) = self.by_hash.get(hash) {
            return Lookup::Known(a);
        }
        if self.unknown.contains_key(hash) {
            return Lookup::Unknown;
        }
        Lookup::Miss
    }

    /// The account of guest `id` (a client address or `X-Guest-ID`), on the `guest` plan.
    pub fn guest(&self, id: &str) -> Arc<Account> {
        self.guests.get_with_by_ref(id, || {
            let now = self.clock.now_ms();
            let row = LicenseState {
                id: 0,
                key_hash: KeyHash([0; 32]),
                plan: "guest".into(),
                status: LicenseStatus::Active,
                expires_at: None,
                balance_ms: i64::MAX / 4,
                version: 0,
                created_at: now,
                period: None,
                topup: None,
            };
            let a = Account::new(&row, self.plans.intern("guest"));
            a.lock().guest = true;
            Arc::new(a)
        })
    }

    /// Records the result of a store read for `hash`: the account, or a negative entry.
    ///
    /// The read may be older than what the ledger already holds: a rotation applied while it
    /// was in flight has moved the account to another key. The hash is cached only if it is
    /// still the account's key, checked and inserted under the account's lock, so a rotated-out
    /// key never comes back.
    pub fn insert_loaded(&self, hash: KeyHash, row: Option<LicenseState>) -> Option<Arc<Account>> {
        let Some(row) = row.filter(|r| r.key_hash == hash) else {
            self.unknown.insert(hash, ());
            return None;
        };
        let account = self.account_for(&row);
        let s = account.lock();
        if s.key_hash != hash {
            return None;
        }
        self.by_hash.insert(hash, account.clone());
        drop(s);
        Some(account)
    }

    /// The live account for a row, made if there is none; the row is applied if newer.
    fn account_for(&self, row: &LicenseState) -> Arc<Account> {
        let mut by_id = self.by_id.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(a) = by_id.get(&row.id).and_then(Weak::upgrade) {
            let old = a.lock().apply(row, &self.plans, self.clock.now_ms());
            drop(by_id);
            if let Some(old) = old {
                self.by_hash.remove(&old);
            }
            return a;
        }
        let a = Arc::new(Account::new(row, self.plans.intern(&row.plan)));
        by_id.insert(row.id, Arc::downgrade(&a));
        a
    }

    /// Applies a license change made elsewhere (admin API, CLI, another process) to the live
    /// account, if any. A rotated key's old hash stops working at once.
    pub fn apply(&self, row: &LicenseState) {
        self.unknown.invalidate(&row.key_hash);
        let live = {
            let by_id = self.by_id.lock().unwrap_or_else(|e| e.into_inner());
            by_id.get(&row.id).and_then(Weak::upgrade)
        };
        if let Some(a) = live {
            let old = a.lock().apply(row, &self.plans, self.clock.now_ms());
            if let Some(old) = old {
                self.by_hash.remove(&old);
            }
        }
    }

    /// The balance a freshly read row leaves, less the usage metered here and not yet in it:
    /// the row is applied first, so a row that already holds a flush's deduction is never
    /// reduced by that usage a second time.
    pub fn live_remaining_ms(&self, row: &LicenseState) -> i64 {
        self.apply(row);
        self.account(row.id)
            .map_or(row.balance_ms, |a| a.remaining_ms())
    }

    /// Forgets a negative entry (a key just created here must work at once).
    pub fn forget_unknown(&self, hash: &KeyHash) {
        self.unknown.invalidate(hash);
    }

    /// Admission without a body length (see [`Ledger::admit_request`]).
    pub fn admit(&self, account: &Arc<Account>) -> Result<Admission, Denial> {
        self.admit_request(account, None)
    }

    /// Admission on status, expiry, balance and the plan's limits (body size, period allowance,
    /// concurrency, rates). Every check is made before anything changes, so a denied request
    /// consumes nothing: no rate token, no concurrency slot, no session time. On success the
    /// request is in flight under a ticket, joined to the key's session (a new one if none is
    /// open or the last one idled out); it is charged from now on, by every flush, until
    /// [`Ledger::finish`].
    pub fn admit_request(
        &self,
        account: &Arc<Account>,
        body_len: Option<u64>,
    ) -> Result<Admission, Denial> {
        let now = self.now();
        let mut guard = account.lock();
        let s = &mut *guard;
        if s.status != LicenseStatus::Active {
            return Err(Denial::Revoked);
        }
        if s.expires_at.is_some_and(|e| e <= now.wall) {
            return Err(Denial::Expired);
        }
        let remaining_ms = s.remaining_ms();
        if remaining_ms <= 0 {
            return Err(Denial::InsufficientBalance { remaining_ms });
        }
        let limits = &s.plan.limits;
        if let (Some(max), Some(len)) = (limits.max_body_bytes, body_len) {
            if len > max {
                return Err(Denial::PayloadTooLarge { max_bytes: max });
            }
        }
        if let Some(max) = limits.max_concurrent {
            let in_flight = s.activity.as_ref().map_or(0, |a| a.in_flight());
            if in_flight >= max {
                return Err(Denial::ConcurrencyLimit { max });
            }
        }
        if limits.has_state() {
            let created_at = s.created_at;
            let state = s.limits.get_or_insert_with(|| {
                let (start, end) = self.calendar.period(created_at, now.wall);
                Box::new(LimitState {
                    tat_ns: [0; MAX_RATES],
                    period: PeriodUsage {
                        start,
                        end,
                        ..PeriodUsage::default()
                    },
                })
            });
            if now.wall >= state.period.end {
                let (start, end) = self.calendar.period(created_at, now.wall);
                state.period = PeriodUsage {
                    start,
                    end,
                    ..PeriodUsage::default()
                };
            }
            let p = &state.period;
            let over_time = limits.period_ms.is_some_and(|max| p.used_ms >= max);
            let over_count = limits.period_requests.is_some_and(|max| p.requests >= max);
            if over_time || over_count {
                return Err(Denial::QuotaExceeded { resets_at: p.end });
            }
            // every bucket must have room before any is booked
            let now_ns = now.mono * 1_000_000;
            let mut wait_ns = 0;
            for (rate, tat) in limits.rates.iter().zip(&state.tat_ns) {
                wait_ns = wait_ns.max(tat - rate.tolerance_ns() - now_ns);
            }
            if wait_ns > 0 {
                return Err(Denial::RateLimited {
                    retry_after_ms: (wait_ns + 999_999) / 1_000_000,
                });
            }
            for (rate, tat) in limits.rates.iter().zip(&mut state.tat_ns) {
                *tat = (*tat).max(now_ns) + rate.interval_ns();
            }
        }
        let max_body_bytes = limits.max_body_bytes;
        if s.guest {
            let ticket = s.activity().open_ticket(now);
            return Ok(Admission {
                ticket,
                session_id: None,
                remaining_ms,
                max_body_bytes,
            });
        }
        let a = s.activity();
        if a.session_expired(now.mono, self.idle_timeout_ms) {
            a.close_session();
        }
        let ticket = a.open_ticket(now);
        let session = a
            .session
            .get_or_insert_with(|| new_session(account.id, now.wall));
        let session_id = Some(session.header.clone());
        self.mark_dirty(account, s);
        Ok(Admission {
            ticket,
            session_id,
            remaining_ms,
            max_body_bytes,
        })
    }

    /// Ends an admitted request now. What it is charged depends on how it ended: see
    /// [`Ending`]. Only a charged ending counts the request, its bytes and its time against
    /// the plan; an uncharged one gives back what flushes charged for it and leaves the
    /// session's interval and idle clock where charged requests put them.
    pub fn finish(
        &self,
        account: &Arc<Account>,
        ticket: u64,
        ending: Ending,
        bytes_in: u64,
        bytes_out: u64,
    ) {
        let now = self.now();
        let mut guard = account.lock();
        let s = &mut *guard;
        let Some(t) = s.activity.as_mut().and_then(|a| a.take_ticket(ticket)) else {
            return;
        };
        let end = now.mono.max(t.start);
        if s.guest {
            // no balance and no session: only the plan's allowance counts, by request time
            if let Some(l) = s
                .limits
                .as_mut()
                .filter(|l| ending == Ending::Charged && t.start_wall >= l.period.start)
            {
                l.period.used_ms += end - t.start;
                l.period.requests += 1;
            }
            return;
        }
        let a = s.activity.as_mut().expect("the ticket was in it");
        // Admission always opened one; a session closed at shutdown while its request still
        // ran charged it up to `billed_to`, so a new one starts from there.
        let fresh = a.session.is_none();
        let from = if fresh { t.billed_to } else { t.start };
        let session = a
            .session
            .get_or_insert_with(|| new_session(account.id, now.wall));
        match ending {
            Ending::Charged => {
                cover(&mut session.confirmed, from, end);
                let session_ms = cover(&mut session.billed, from, end);
                session.sync_times(now);
                let charge = Charge {
                    session_ms,
                    request_ms: end - t.billed_to,
                    requests: 1,
                    bytes_in: bytes_in as i64,
                    bytes_out: bytes_out as i64,
                    started_wall: Some(t.start_wall),
                };
                self.add_charge(account.id, s, charge, now);
            }
            Ending::Broken => {
                // what the flushes charged while the app was answering stays
                if t.billed_to > t.start {
                    cover(&mut session.confirmed, t.start, t.billed_to);
                }
                let session_ms = session.retract(&a.open);
                session.sync_times(now);
                self.give_back(s, session_ms, 0, ReturnReason::GatewayFailure, t.start_wall);
            }
            Ending::Returned(reason) => {
                let session_ms = session.retract(&a.open);
                session.sync_times(now);
                self.give_back(s, session_ms, t.billed_to - t.start, reason, t.start_wall);
            }
        }
    }

    /// Adds charged time to an account: its pending usage, its session's record, its plan
    /// period, and the alert thresholds it crosses. Every charge goes through here, whether a
    /// request's end or a flush charging requests still open.
    fn add_charge(&self, id: i64, s: &mut AccountState, c: Charge, now: Now) {
        let charge_ms = match self.mode {
            MeteringMode::Session => c.session_ms,
            MeteringMode::RequestTime => c.request_ms,
        };
        let mut counted = false;
        if let Some(l) = s.limits.as_mut() {
            if c.started_wall.is_none_or(|w| w >= l.period.start) {
                l.period.used_ms += charge_ms;
                l.period.requests += c.requests;
                counted = true;
            }
        }
        let a = s.activity();
        if let Some(session) = a.session.as_mut() {
            let r = &mut session.record;
            r.charged_ms += charge_ms;
            r.requests += c.requests;
            r.bytes_in += c.bytes_in;
            r.bytes_out += c.bytes_out;
        }
        let p = &mut a.pending;
        p.charge_ms += charge_ms;
        p.requests += c.requests;
        p.session_ms += c.session_ms;
        p.request_ms += c.request_ms;
        p.bytes_in += c.bytes_in;
        p.bytes_out += c.bytes_out;
        if !self.thresholds.is_empty() && (charge_ms > 0 || c.requests > 0) {
            self.check_alerts(id, s, counted, charge_ms, c.requests, now.wall);
        }
    }

    /// Takes back time charged for a request that ended uncharged: `session_ms` of session
    /// time and `request_ms` of request time (the mode picks which was charged).
    fn give_back(
        &self,
        s: &mut AccountState,
        session_ms: i64,
        request_ms: i64,
        reason: ReturnReason,
        started_wall: i64,
    ) {
        let back = match self.mode {
            MeteringMode::Session => session_ms,
            MeteringMode::RequestTime => request_ms,
        };
        if back <= 0 {
            return;
        }
        if let Some(l) = s.limits.as_mut() {
            if started_wall >= l.period.start {
                l.period.used_ms = (l.period.used_ms - back).max(0);
            }
        }
        let a = s.activity();
        if let Some(session) = a.session.as_mut() {
            session.record.charged_ms -= back;
        }
        let p = &mut a.pending;
        p.charge_ms -= back;
        p.session_ms -= session_ms;
        p.request_ms -= request_ms;
        match reason {
            ReturnReason::GatewayFailure => p.returned_failure_ms += back,
            ReturnReason::Refused => p.returned_refused_ms += back,
        }
    }

    /// Looks for thresholds this charge (`charge_ms` and `requests`) crossed. Runs under the
    /// account's lock; takes the alert list's lock only when one was crossed.
    fn check_alerts(
        &self,
        id: i64,
        s: &AccountState,
        counted: bool,
        charge_ms: i64,
        requests: i64,
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
            if let Some(max) = limits.period_ms {
                check(
                    AlertKind::PeriodTime,
                    p.used_ms - charge_ms,
                    p.used_ms,
                    max,
                    p.start,
                );
            }
            if let Some(max) = limits.period_requests {
                check(
                    AlertKind::PeriodRequests,
                    p.requests - requests,
                    p.requests,
                    max,
                    p.start,
                );
            }
        }
        if charge_ms > 0 && s.topup_ms > 0 {
            let used = s.topup_ms - s.remaining_ms();
            check(
                AlertKind::Balance,
                used - charge_ms,
                used,
                s.topup_ms,
                s.topup_at,
            );
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

    /// Whether the account's balance is spent (a stream should be ended).
    pub fn exhausted(&self, account: &Arc<Account>) -> bool {
        account.remaining_ms() <= 0
    }

    /// Charges every open request of the account up to `now` (called by the snapshot).
    fn charge_open(&self, id: i64, s: &mut AccountState, now: Now) {
        let Some(a) = s.activity.as_mut() else {
            return;
        };
        let Activity { open, session, .. } = &mut **a;
        let (mut session_ms, mut request_ms) = (0, 0);
        let mut earliest_wall = i64::MAX;
        for t in open.iter_mut().filter(|t| now.mono > t.billed_to) {
            earliest_wall = earliest_wall.min(t.start_wall);
            request_ms += now.mono - t.billed_to;
            if let Some(session) = session.as_mut() {
                session_ms += cover(&mut session.billed, t.start, now.mono);
            }
            t.billed_to = now.mono;
        }
        if session_ms == 0 && request_ms == 0 {
            return;
        }
        if let Some(session) = session.as_mut() {
            session.sync_times(now);
        }
        // counted in the plan period as request ends are: only for requests that began in it
        // (a give-back follows the same rule, so the period's use never drifts)
        let charge = Charge {
            session_ms,
            request_ms,
            started_wall: Some(earliest_wall),
            ..Charge::default()
        };
        self.add_charge(id, s, charge, now);
    }

    /// Lock order: an account's lock, then the dirty list's (never the reverse).
    fn mark_dirty(&self, account: &Arc<Account>, s: &mut AccountState) {
        if !s.dirty {
            s.dirty = true;
            self.dirty
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(account.clone());
        }
    }

    /// Takes a snapshot of every account with uncommitted work: requests still open are
    /// charged up to now, and sessions that idled out are closed. Nothing is subtracted until
    /// [`Ledger::commit`]; pass failed items to [`Ledger::abandon`].
    pub fn snapshot(&self) -> Vec<FlushItem> {
        self.snapshot_closing(false)
    }

    /// The snapshot of the last flush before the process exits: every open session ends, at
    /// its last charged time.
    pub fn final_snapshot(&self) -> Vec<FlushItem> {
        self.snapshot_closing(true)
    }

    fn snapshot_closing(&self, close_all: bool) -> Vec<FlushItem> {
        let now = self.now();
        let taken = std::mem::take(&mut *self.dirty.lock().unwrap_or_else(|e| e.into_inner()));
        let mut items = Vec::with_capacity(taken.len());
        let mut keep = Vec::new();
        for account in taken {
            let mut guard = account.lock();
            let s = &mut *guard;
            if s.gone {
                // its requests still in flight charge nothing: there is nobody to charge
                s.activity = None;
                s.dirty = false;
                continue;
            }
            self.charge_open(account.id, s, now);
            let Some(a) = s.activity.as_mut() else {
                s.dirty = false;
                continue;
            };
            if close_all || a.session_expired(now.mono, self.idle_timeout_ms) {
                a.close_session();
            }
            let mut sessions = a.closed.clone();
            let open_seq = match &a.session {
                Some(o) if o.billed.is_some() && o.seq != o.written_seq => {
                    sessions.push(o.record.clone());
                    Some(o.seq)
                }
                _ => None,
            };
            if a.pending.is_zero() && sessions.is_empty() {
                if s.has_work() {
                    drop(guard);
                    keep.push(account);
                } else {
                    s.settle();
                    s.dirty = false;
                }
                continue;
            }
            let item = FlushItem {
                usage: a.pending,
                closed: a.closed.len(),
                sessions,
                open_seq,
                account: account.clone(),
            };
            s.flushing = true;
            drop(guard);
            items.push(item);
        }
        if !keep.is_empty() {
            self.dirty
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend(keep);
        }
        items
    }

    /// Subtracts what a flush committed: `applied[i]` says what the store did with item `i`.
    /// An item the store could not apply (its license is gone) is set aside: its usage is
    /// dropped, as there is nothing left to charge it to, and its key stops working.
    pub fn commit(&self, items: Vec<FlushItem>, applied: &[Applied]) {
        let now = self.clock.now_ms();
        let mut keep = Vec::new();
        let mut forgotten = Vec::new();
        for (item, applied) in items.into_iter().zip(applied) {
            let mut s = item.account.lock();
            let a = s.activity();
            a.pending.subtract(&item.usage);
            a.closed.drain(..item.closed);
            if let (Some(seq), Some(open)) = (item.open_seq, a.session.as_mut()) {
                open.written_seq = open.written_seq.max(seq);
            }
            let mut replaced = Vec::new();
            match applied {
                Applied::Deducted(row) => {
                    replaced = s.end_flush_with(row, item.usage.charge_ms, &self.plans, now);
                }
                Applied::Written => replaced.extend(s.end_flush(&self.plans, now)),
                Applied::Orphaned => {
                    // nothing of it can be written, now or later: the account is gone, and
                    // what its requests still in flight use is dropped with it
                    s.gone = true;
                    s.status = LicenseStatus::Revoked;
                    if let Some(a) = s.activity.as_mut() {
                        a.session = None;
                        a.closed.clear();
                        a.pending = Usage::default();
                    }
                    replaced.extend(s.end_flush(&self.plans, now));
                    forgotten.push((item.account.id, s.key_hash));
                }
            }
            if s.has_work() {
                drop(s);
                keep.push(item.account);
            } else {
                s.settle();
                s.dirty = false;
            }
            for old in replaced {
                self.by_hash.remove(&old);
            }
        }
        if !forgotten.is_empty() {
            let mut by_id = self.by_id.lock().unwrap_or_else(|e| e.into_inner());
            for (id, hash) in forgotten {
                by_id.remove(&id);
                self.by_hash.remove(&hash);
            }
        }
        if !keep.is_empty() {
            self.dirty
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend(keep);
        }
    }

    /// Puts back items whose commit failed: their usage stays pending and is retried.
    pub fn abandon(&self, items: Vec<FlushItem>) {
        self.abandon_accounts(items.into_iter().map(|i| i.account).collect());
    }

    /// [`Ledger::abandon`] for a batch whose items were lost with the write that failed (the
    /// store's writer is gone): the accounts it held go back to being flushed.
    pub fn abandon_accounts(&self, accounts: Vec<Arc<Account>>) {
        let now = self.clock.now_ms();
        for account in &accounts {
            let old = account.lock().end_flush(&self.plans, now);
            if let Some(old) = old {
                self.by_hash.remove(&old);
            }
        }
        let mut dirty = self.dirty.lock().unwrap_or_else(|e| e.into_inner());
        dirty.extend(accounts);
    }

    /// Open sessions across all accounts with work (for the `tollgate_active_sessions` gauge).
    pub fn active_sessions(&self) -> usize {
        let dirty = self.dirty.lock().unwrap_or_else(|e| e.into_inner()).clone();
        dirty
            .iter()
            .filter(|a| {
                a.lock()
                    .activity
                    .as_ref()
                    .is_some_and(|a| a.session.as_ref().is_some_and(|s| s.billed.is_some()))
            })
            .count()
    }

    /// Cached keys (for the `tollgate_cached_keys` gauge).
    pub fn cached_keys(&self) -> u64 {
        self.by_hash.len() as u64
    }

    /// Drops registry entries of accounts nothing refers to any more.
    pub fn prune(&self) {
        let mut by_id = self.by_id.lock().unwrap_or_else(|e| e.into_inner());
        by_id.retain(|_, w| w.strong_count() > 0);
    }

    /// The live account for a license id, if it is in memory.
    pub fn account(&self, id: i64) -> Option<Arc<Account>> {
        let by_id = self.by_id.lock().unwrap_or_else(|e| e.into_inner());
        by_id.get(&id).and_then(Weak::upgrade)
    }

    /// Where an account stands against its plan's limits now.
    pub fn limits_now(&self, account: &Account) -> LimitsNow {
        let now = self.now();
        let s = account.lock();
        let limits = &s.plan.limits;
        let now_ns = now.mono * 1_000_000;
        let tats = s.limits.as_ref().map(|l| l.tat_ns);
        let rates = limits
            .rates
            .iter()
            .enumerate()
            .map(|(i, rate)| {
                let tat = tats.map_or(0, |t| t[i]).max(now_ns);
                // requests that would pass now, back to back (see `admit_request`): the next
                // passes while `now + tolerance >= tat`, and each books one interval more.
                // Rounded down, as admission decides: a bucket one request short of room
                // has none.
                let room = (now_ns + rate.tolerance_ns() - tat).div_euclid(rate.interval_ns()) + 1;
                RateNow {
                    rate: *rate,
                    remaining: room.clamp(0, rate.requests as i64) as u64,
                    full_at: now.wall + (tat - now_ns + 999_999) / 1_000_000,
                }
            })
            .collect();
        LimitsNow {
            plan: s.plan.clone(),
            in_flight: s.activity.as_ref().map_or(0, |a| a.in_flight()),
            rates,
            period: s
                .limits
                .as_ref()
                .map(|l| l.period)
                .filter(|p| now.wall < p.end),
        }
    }
}

/// Time and counts added to an account by one charge.
#[derive(Clone, Copy, Debug, Default)]
struct Charge {
    session_ms: i64,
    request_ms: i64,
    requests: i64,
    bytes_in: i64,
    bytes_out: i64,
    /// When the charged request started, for the plan period it counts in; none: the current.
    started_wall: Option<i64>,
}

impl OpenSession {
    /// Shrinks the charged span back to what is justified once a request ended uncharged:
    /// requests that ended charged, and what flushes charged of the requests still `open`.
    /// Returns the session time taken off.
    fn retract(&mut self, open: &[Ticket]) -> i64 {
        let mut justified = self.confirmed;
        for t in open.iter().filter(|t| t.billed_to > t.start) {
            cover(&mut justified, t.start, t.billed_to);
        }
        let back = span::len(self.billed) - span::len(justified);
        self.billed = justified;
        back
    }
}

fn new_session(license_id: i64, now: i64) -> OpenSession {
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
        started: None,
        seq: 0,
        written_seq: 0,
    }
}

/// `ses_` and 24 hex digits: unique across restarts without asking the store.
fn new_session_id() -> String {
    let bytes: [u8; 12] = rand::rng().random();
    format!("ses_{}", hex::encode(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicI64, Ordering};

    const START: i64 = 1_700_000_000_000;

    fn ledger(mode: MeteringMode, clock: &Arc<ManualClock>) -> Ledger {
        Ledger::new(
            clock.clone(),
            LedgerOptions {
                mode,
                idle_timeout_ms: 300_000,
                cache_capacity: 1_000,
                negative_ttl: Duration::from_secs(5),
                ..LedgerOptions::default()
            },
        )
    }

    fn row(id: i64, balance_ms: i64) -> LicenseState {
        LicenseState {
            id,
            key_hash: KeyHash::of(format!("key-{id}").as_bytes()),
            plan: "free".into(),
            status: LicenseStatus::Active,
            expires_at: None,
            balance_ms,
            version: 1,
            created_at: START,
            period: None,
            topup: None,
        }
    }

    fn load(l: &Ledger, r: LicenseState) -> Arc<Account> {
        l.insert_loaded(r.key_hash, Some(r)).unwrap()
    }

    /// Runs one request of `ms` milliseconds starting now, and advances the clock past it.
    fn request(l: &Ledger, clock: &ManualClock, a: &Arc<Account>, ms: i64) -> Admission {
        let adm = l.admit(a).expect("admitted");
        clock.advance(ms);
        l.finish(a, adm.ticket, Ending::Charged, 10, 20);
        adm
    }

    /// Commits everything as a store would, returning the items' usage.
    fn flush(l: &Ledger) -> Vec<Usage> {
        flush_with_sessions(l).0
    }

    /// [`flush`], with the session records it wrote.
    fn flush_with_sessions(l: &Ledger) -> (Vec<Usage>, Vec<SessionRecord>) {
        let items = l.snapshot();
        let sessions = items.iter().flat_map(|i| i.sessions.clone()).collect();
        let committed: Vec<_> = items
            .iter()
            .map(|i| {
                let (bal, ver) = i.account.stored();
                let mut state = row(i.account.id, bal - i.usage.charge_ms);
                state.version = ver + 1;
                Applied::Deducted(state)
            })
            .collect();
        let usage = items.iter().map(|i| i.usage).collect();
        l.commit(items, &committed);
        (usage, sessions)
    }

    #[test]
    fn a_session_charges_from_first_start_to_last_end_including_short_gaps() {
        let clock = ManualClock::new(START);
        let l = ledger(MeteringMode::Session, &clock);
        let a = load(&l, row(1, 3_600_000));
        let first = request(&l, &clock, &a, 1_000);
        clock.advance(60_000);
        let second = request(&l, &clock, &a, 2_000);
        assert_eq!(first.session_id, second.session_id);
        assert_eq!(a.pending().charge_ms, 63_000);
        assert_eq!(a.pending().request_ms, 3_000);
        assert_eq!(a.pending().requests, 2);
        assert_eq!(a.remaining_ms(), 3_600_000 - 63_000);
    }

    #[test]
    fn idle_timeout_closes_the_session_and_time_between_sessions_is_not_charged() {
        let clock = ManualClock::new(START);
        let l = ledger(MeteringMode::Session, &clock);
        let a = load(&l, row(1, 3_600_000));
        let first = request(&l, &clock, &a, 5_000);
        clock.advance(300_001);
        let second = request(&l, &clock, &a, 7_000);
        assert_ne!(first.session_id, second.session_id);
        assert_eq!(a.pending().charge_ms, 12_000);

        let items = l.snapshot();
        assert_eq!(items.len(), 1);
        let sessions = &items[0].sessions;
        assert_eq!(sessions.len(), 2);
        assert_eq!(sessions[0].charged_ms, 5_000);
        assert_eq!(sessions[0].ended_at, Some(START + 5_000));
        assert_eq!(sessions[1].charged_ms, 7_000);
        assert_eq!(sessions[1].ended_at, None);
    }

    #[test]
    fn the_flusher_closes_an_idle_session_without_a_new_request() {
        let clock = ManualClock::new(START);
        let l = ledger(MeteringMode::Session, &clock);
        let a = load(&l, row(1, 3_600_000));
        request(&l, &clock, &a, 1_000);
        flush(&l);
        clock.advance(300_001);
        let items = l.snapshot();
        assert_eq!(items.len(), 1);
        assert_eq!(items[0].sessions[0].ended_at, Some(START + 1_000));
        assert!(items[0].usage.is_zero());
        l.commit(items, &[Applied::Written]);
        assert!(l.snapshot().is_empty(), "nothing left to write");
        assert_eq!(l.active_sessions(), 0);
    }

    #[test]
    fn a_session_stays_open_while_a_long_request_is_in_flight() {
        let clock = ManualClock::new(START);
        let l = ledger(MeteringMode::Session, &clock);
        let a = load(&l, row(1, 36_000_000));
        let long = l.admit(&a).unwrap();
        clock.advance(400_000);
        let flushed: i64 = flush(&l).iter().map(|u| u.charge_ms).sum();
        let short = request(&l, &clock, &a, 1_000);
        assert_eq!(long.session_id, short.session_id);
        l.finish(&a, long.ticket, Ending::Charged, 0, 0);
        assert_eq!(flushed + a.pending().charge_ms, 401_000);
    }

    #[test]
    fn request_time_mode_charges_the_sum_of_durations() {
        let clock = ManualClock::new(START);
        let l = ledger(MeteringMode::RequestTime, &clock);
        let a = load(&l, row(1, 3_600_000));
        request(&l, &clock, &a, 1_500);
        clock.advance(10_000);
        request(&l, &clock, &a, 500);
        // two overlapping requests are both charged in full
        let first = l.admit(&a).unwrap();
        clock.advance(100);
        let second = l.admit(&a).unwrap();
        clock.advance(900);
        l.finish(&a, first.ticket, Ending::Charged, 0, 0);
        clock.advance(100);
        l.finish(&a, second.ticket, Ending::Charged, 0, 0);
        assert_eq!(a.pending().charge_ms, 4_000);
        assert_eq!(a.pending().requests, 4);
    }

    #[test]
    fn gateway_failures_are_not_charged() {
        let clock = ManualClock::new(START);
        let l = ledger(MeteringMode::Session, &clock);
        let a = load(&l, row(1, 3_600_000));
        let adm = l.admit(&a).unwrap();
        clock.advance(2_000);
        l.finish(
            &a,
            adm.ticket,
            Ending::Returned(ReturnReason::GatewayFailure),
            100,
            0,
        );
        assert_eq!(a.pending().charge_ms, 0);
        assert_eq!(a.pending().requests, 0);
    }

    #[test]
    fn running_out_mid_session_denies_the_next_request_with_the_overdraft() {
        let clock = ManualClock::new(START);
        let l = ledger(MeteringMode::Session, &clock);
        let a = load(&l, row(1, 5_000));
        request(&l, &clock, &a, 3_000);
        clock.advance(1_000);
        request(&l, &clock, &a, 2_000); // admitted with 2 s left, ends 1 s past zero
        assert_eq!(
            l.admit(&a).unwrap_err(),
            Denial::InsufficientBalance {
                remaining_ms: -1_000
            }
        );
        flush(&l);
        assert_eq!(a.stored().0, -1_000, "the overdraft is recorded");
        assert_eq!(
            l.admit(&a).unwrap_err(),
            Denial::InsufficientBalance {
                remaining_ms: -1_000
            }
        );
    }

    #[test]
    fn revoked_and_expired_keys_are_denied() {
        let clock = ManualClock::new(START);
        let l = ledger(MeteringMode::Session, &clock);
        let a = load(&l, row(1, 5_000));
        let mut r = row(1, 5_000);
        r.version = 2;
        r.expires_at = Some(START);
        l.apply(&r);
        assert_eq!(l.admit(&a).unwrap_err(), Denial::Expired);
        r.version = 3;
        r.status = LicenseStatus::Revoked;
        l.apply(&r);
        assert_eq!(l.admit(&a).unwrap_err(), Denial::Revoked);
    }

    #[test]
    fn an_older_row_never_overwrites_a_newer_balance() {
        let clock = ManualClock::new(START);
        let l = ledger(MeteringMode::Session, &clock);
        let a = load(&l, row(1, 5_000));
        let mut newer = row(1, 9_000);
        newer.version = 5;
        l.apply(&newer);
        l.apply(&row(1, 1)); // version 1: stale
        assert_eq!(a.stored(), (9_000, 5));
    }

    #[test]
    fn a_failed_commit_keeps_usage_pending_and_a_later_one_takes_it_once() {
        let clock = ManualClock::new(START);
        let l = ledger(MeteringMode::RequestTime, &clock);
        let a = load(&l, row(1, 100_000));
        request(&l, &clock, &a, 1_000);
        let items = l.snapshot();
        l.abandon(items);
        request(&l, &clock, &a, 2_000);
        let usage = flush(&l);
        assert_eq!(usage[0].charge_ms, 3_000);
        assert_eq!(a.pending(), Usage::default());
        assert_eq!(a.stored().0, 97_000);
        assert!(flush(&l).iter().all(|u| u.is_zero()));
    }

    #[test]
    fn usage_tallied_during_a_flush_stays_pending_after_its_commit() {
        let clock = ManualClock::new(START);
        let l = ledger(MeteringMode::RequestTime, &clock);
        let a = load(&l, row(1, 100_000));
        request(&l, &clock, &a, 1_000);
        let items = l.snapshot();
        request(&l, &clock, &a, 2_000); // lands between snapshot and commit
        let mut state = row(1, 99_000);
        state.version = 2;
        l.commit(items, &[Applied::Deducted(state)]);
        assert_eq!(a.pending().charge_ms, 2_000);
        assert_eq!(a.remaining_ms(), 97_000);
        assert_eq!(flush(&l)[0].charge_ms, 2_000);
    }

    #[test]
    fn a_flush_committed_after_a_revocation_carries_the_revocation() {
        let clock = ManualClock::new(START);
        let l = ledger(MeteringMode::RequestTime, &clock);
        let r = row(1, 100_000);
        let a = load(&l, r.clone());
        request(&l, &clock, &a, 1_000);
        let items = l.snapshot();
        // Another process revoked and rotated (version 2); the flush then committed (version 3).
        let mut after = r.clone();
        after.status = LicenseStatus::Revoked;
        after.key_hash = KeyHash::of(b"rotated");
        after.balance_ms = 99_000;
        after.version = 3;
        l.commit(items, &[Applied::Deducted(after)]);
        assert_eq!(l.admit(&a).unwrap_err(), Denial::Revoked);
        assert!(
            matches!(l.lookup(&r.key_hash), Lookup::Miss),
            "old key forgotten"
        );
        assert_eq!(a.stored(), (99_000, 3));
    }

    #[test]
    fn a_reloaded_key_finds_the_account_holding_its_pending_usage() {
        let clock = ManualClock::new(START);
        let l = ledger(MeteringMode::RequestTime, &clock);
        let r = row(1, 100_000);
        let a = load(&l, r.clone());
        request(&l, &clock, &a, 1_000);
        l.by_hash.remove(&r.key_hash); // as an eviction would
        let again = load(&l, r);
        assert!(Arc::ptr_eq(&a, &again));
        assert_eq!(again.remaining_ms(), 99_000);
    }

    #[test]
    fn a_rotated_key_stops_working_and_unknown_keys_are_cached_negatively() {
        let clock = ManualClock::new(START);
        let l = ledger(MeteringMode::Session, &clock);
        let r = row(1, 100_000);
        load(&l, r.clone());
        let mut rotated = r.clone();
        rotated.key_hash = KeyHash::of(b"new");
        rotated.version = 2;
        l.apply(&rotated);
        assert!(matches!(l.lookup(&r.key_hash), Lookup::Miss));
        l.insert_loaded(r.key_hash, None);
        assert!(matches!(l.lookup(&r.key_hash), Lookup::Unknown));
    }

    fn limited(clock: &Arc<ManualClock>, plan: crate::config::Plan) -> Ledger {
        Ledger::new(
            clock.clone(),
            LedgerOptions {
                mode: MeteringMode::RequestTime,
                plans: vec![crate::config::Plan {
                    name: "free".into(),
                    ..plan
                }],
                ..LedgerOptions::default()
            },
        )
    }

    #[test]
    fn a_rate_admits_a_burst_then_its_steady_rate_and_denials_cost_nothing() {
        let clock = ManualClock::new(START);
        let l = limited(
            &clock,
            crate::config::Plan {
                requests_per_second: Some(5),
                ..Default::default()
            },
        );
        let a = load(&l, row(1, 3_600_000));
        for _ in 0..5 {
            request(&l, &clock, &a, 0);
        }
        // the bucket is empty: the next fits in 200 ms, and asking again and again does not
        // push that further out
        for _ in 0..3 {
            assert_eq!(
                l.admit(&a).unwrap_err(),
                Denial::RateLimited {
                    retry_after_ms: 200
                }
            );
        }
        clock.advance(199);
        assert!(l.admit(&a).is_err());
        clock.advance(1);
        request(&l, &clock, &a, 0);
        // over 3 s of steady hammering: the burst of 5, then one every 200 ms
        let mut admitted = 6;
        for _ in 0..2_800 {
            clock.advance(1);
            if let Ok(adm) = l.admit(&a) {
                l.finish(&a, adm.ticket, Ending::Charged, 0, 0);
                admitted += 1;
            }
        }
        assert_eq!(admitted, 6 + 14);
    }

    #[test]
    fn a_frozen_clock_and_64_threads_get_exactly_the_burst() {
        let clock = ManualClock::new(START);
        let l = Arc::new(limited(
            &clock,
            crate::config::Plan {
                requests_per_second: Some(5),
                requests_per_minute: Some(100),
                ..Default::default()
            },
        ));
        let a = load(&l, row(1, 3_600_000));
        let admitted = Arc::new(AtomicI64::new(0));
        let threads: Vec<_> = (0..64)
            .map(|_| {
                let (l, a, admitted) = (l.clone(), a.clone(), admitted.clone());
                std::thread::spawn(move || {
                    for _ in 0..100 {
                        if let Ok(adm) = l.admit(&a) {
                            admitted.fetch_add(1, Ordering::Relaxed);
                            l.finish(&a, adm.ticket, Ending::Charged, 0, 0);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(admitted.load(Ordering::Relaxed), 5);
        assert_eq!(a.pending().requests, 5);
    }

    #[test]
    fn concurrency_slots_are_taken_at_admission_and_freed_at_finish() {
        let clock = ManualClock::new(START);
        let l = limited(
            &clock,
            crate::config::Plan {
                max_concurrent: Some(1),
                ..Default::default()
            },
        );
        let a = load(&l, row(1, 3_600_000));
        let adm = l.admit(&a).unwrap();
        assert_eq!(
            l.admit(&a).unwrap_err(),
            Denial::ConcurrencyLimit { max: 1 }
        );
        // an uncharged end (an upstream failure) frees the slot too
        l.finish(
            &a,
            adm.ticket,
            Ending::Returned(ReturnReason::GatewayFailure),
            0,
            0,
        );
        l.admit(&a).unwrap();
    }

    #[test]
    fn bodies_over_the_cap_are_refused_before_anything_is_taken() {
        let clock = ManualClock::new(START);
        let l = limited(
            &clock,
            crate::config::Plan {
                max_body_bytes: Some(25 * 1024 * 1024),
                max_concurrent: Some(1),
                ..Default::default()
            },
        );
        let a = load(&l, row(1, 3_600_000));
        assert_eq!(
            l.admit_request(&a, Some(26 * 1024 * 1024)).unwrap_err(),
            Denial::PayloadTooLarge {
                max_bytes: 25 * 1024 * 1024
            }
        );
        let adm = l.admit_request(&a, Some(25 * 1024 * 1024)).unwrap();
        assert_eq!(adm.max_body_bytes, Some(25 * 1024 * 1024));
    }

    #[test]
    fn the_period_allowance_counts_loaded_and_new_usage_and_resets_on_the_anniversary() {
        let clock = ManualClock::new(START);
        let l = limited(
            &clock,
            crate::config::Plan {
                period_ms: Some(60_000),
                period_requests: Some(100),
                ..Default::default()
            },
        );
        let (start, end) = Calendar::utc().period(START - 86_400_000, START);
        let mut r = row(1, 3_600_000);
        r.created_at = START - 86_400_000;
        // 50 s already used this period, as the cache-miss read measured it
        r.period = Some(PeriodUsage {
            start,
            end,
            used_ms: 50_000,
            requests: 7,
        });
        let a = load(&l, r);
        request(&l, &clock, &a, 9_000);
        request(&l, &clock, &a, 1_500); // admitted at 59 s, finishes past the allowance
        assert_eq!(
            l.admit(&a).unwrap_err(),
            Denial::QuotaExceeded { resets_at: end }
        );
        assert_eq!(a.pending().requests, 2, "a refused request is not counted");
        clock.advance(end - clock.now_ms());
        request(&l, &clock, &a, 1_000);
    }

    #[test]
    fn the_request_allowance_is_a_count() {
        let clock = ManualClock::new(START);
        let l = limited(
            &clock,
            crate::config::Plan {
                period_requests: Some(3),
                ..Default::default()
            },
        );
        let a = load(&l, row(1, 3_600_000));
        for _ in 0..3 {
            request(&l, &clock, &a, 1);
        }
        assert!(matches!(
            l.admit(&a).unwrap_err(),
            Denial::QuotaExceeded { .. }
        ));
    }

    #[test]
    fn balance_alerts_fire_once_per_threshold_and_rearm_at_a_top_up() {
        let clock = ManualClock::new(START);
        let l = Ledger::new(
            clock.clone(),
            LedgerOptions {
                mode: MeteringMode::RequestTime,
                alert_thresholds: vec![80, 100],
                ..LedgerOptions::default()
            },
        );
        let a = load(&l, row(1, 10_000));
        let kinds = |events: Vec<AlertEvent>| -> Vec<(AlertKind, u8, i64)> {
            events
                .into_iter()
                .map(|e| (e.kind, e.threshold, e.period_start))
                .collect()
        };
        request(&l, &clock, &a, 5_000);
        assert!(l.take_alerts().is_empty());
        request(&l, &clock, &a, 3_000); // 80%
        request(&l, &clock, &a, 500); // 85%: nothing new
        assert_eq!(kinds(l.take_alerts()), [(AlertKind::Balance, 80, START)]);
        request(&l, &clock, &a, 2_000); // past 100%
        assert_eq!(kinds(l.take_alerts()), [(AlertKind::Balance, 100, START)]);

        // a top-up: the alerts count from the new balance, as a new period
        flush(&l);
        let mut credited = row(1, 20_000);
        credited.version = 10;
        l.apply(&credited);
        let topped_up_at = clock.now_ms();
        request(&l, &clock, &a, 17_000);
        assert_eq!(
            kinds(l.take_alerts()),
            [(AlertKind::Balance, 80, topped_up_at)]
        );
    }

    /// Everything committed or pending for an account: what it has been charged in all.
    fn charged_in_all(flushed: &[Usage], a: &Account) -> i64 {
        flushed.iter().map(|u| u.charge_ms).sum::<i64>() + a.pending().charge_ms
    }

    fn fail(l: &Ledger, a: &Arc<Account>, adm: &Admission, ending: Ending) {
        l.finish(a, adm.ticket, ending, 0, 0);
    }

    #[test]
    fn requests_that_are_not_charged_never_keep_a_session_open() {
        let clock = ManualClock::new(START);
        let l = Ledger::new(
            clock.clone(),
            LedgerOptions {
                idle_timeout_ms: 3_000,
                ..LedgerOptions::default()
            },
        );
        let a = load(&l, row(1, 3_600_000));
        let mut flushed = Vec::new();
        let mut sessions = Vec::new();
        let first = request(&l, &clock, &a, 1);
        // the app is down for 12 s: a retry every 2 s, each failing after 500 ms, through
        // flushes; every uncharged ending is tried
        let endings = [
            Ending::Returned(ReturnReason::GatewayFailure),
            Ending::Returned(ReturnReason::Refused),
            Ending::Returned(ReturnReason::GatewayFailure),
            Ending::Returned(ReturnReason::GatewayFailure),
            Ending::Returned(ReturnReason::Refused),
            Ending::Returned(ReturnReason::GatewayFailure),
        ];
        for ending in endings {
            clock.advance(1_500);
            let adm = l.admit(&a).unwrap();
            clock.advance(250);
            // charged provisionally while it waits
            let (usage, written) = flush_with_sessions(&l);
            flushed.extend(usage);
            sessions.extend(written);
            clock.advance(250);
            fail(&l, &a, &adm, ending);
        }
        assert_eq!(
            a.pending().returned_failure_ms + a.pending().returned_refused_ms,
            250
        );
        clock.advance(1_000);
        let back = request(&l, &clock, &a, 1);
        assert_ne!(
            first.session_id, back.session_id,
            "the outage ended the session"
        );
        assert_eq!(charged_in_all(&flushed, &a), 2, "1 ms before, 1 ms after");
        // what the flushes wrote: the first session ended at its last charged time; the ones
        // the retries opened charged nothing (and are deleted as they close); the new one
        let mut written: HashMap<Arc<str>, SessionRecord> = HashMap::new();
        for s in sessions.into_iter().chain(l.snapshot().remove(0).sessions) {
            written.insert(s.id.clone(), s);
        }
        let id = |adm: &Admission| -> Arc<str> {
            adm.session_id.as_ref().unwrap().to_str().unwrap().into()
        };
        assert_eq!(written[&id(&first)].ended_at, Some(START + 1));
        assert_eq!(written[&id(&first)].charged_ms, 1);
        assert_eq!(written[&id(&back)].charged_ms, 1);
        assert_eq!(written[&id(&back)].started_at, START + 1 + 13_000);
        for (sid, s) in &written {
            if *sid != id(&first) && *sid != id(&back) {
                assert_eq!((s.charged_ms, s.requests), (0, 0), "{s:?}");
                assert!(s.ended_at.is_some());
            }
        }
    }

    #[test]
    fn a_request_waiting_on_the_app_is_charged_by_each_flush_and_given_back_if_it_fails() {
        for mode in [MeteringMode::Session, MeteringMode::RequestTime] {
            let clock = ManualClock::new(START);
            let l = ledger(mode, &clock);
            let a = load(&l, row(1, 3_600_000));
            let slow = l.admit(&a).unwrap();
            let mut flushed = Vec::new();
            for _ in 0..5 {
                clock.advance(1_000);
                flushed.extend(flush(&l));
            }
            assert_eq!(
                charged_in_all(&flushed, &a),
                5_000,
                "{mode:?}: charged as it waits"
            );
            // a short request inside it is served; then the slow one fails in the gateway
            let short = request(&l, &clock, &a, 300);
            clock.advance(700);
            fail(
                &l,
                &a,
                &slow,
                Ending::Returned(ReturnReason::GatewayFailure),
            );
            let p = a.pending();
            assert_eq!(p.returned_failure_ms, 5_000, "{mode:?}");
            assert_eq!(
                charged_in_all(&flushed, &a),
                300,
                "{mode:?}: only the short one"
            );
            flushed.extend(flush(&l));
            assert_eq!(a.stored().0, 3_600_000 - 300, "{mode:?}");
            // the session is the short request's alone
            clock.advance(300_001);
            let items = l.snapshot();
            let s = &items[0].sessions[0];
            assert_eq!(
                Some(&*s.id),
                short.session_id.as_ref().and_then(|h| h.to_str().ok())
            );
            assert_eq!((s.charged_ms, s.requests), (300, 1), "{mode:?}");
            assert_eq!(s.started_at, START + 5_000, "{mode:?}");
            assert_eq!(s.ended_at, Some(START + 5_300), "{mode:?}");
        }
    }

    #[test]
    fn a_stream_that_breaks_after_the_app_answered_keeps_what_the_flushes_charged() {
        let clock = ManualClock::new(START);
        let l = ledger(MeteringMode::Session, &clock);
        let a = load(&l, row(1, 3_600_000));
        let ws = l.admit(&a).unwrap();
        clock.advance(2_000);
        let mut flushed = flush(&l);
        clock.advance(500);
        fail(&l, &a, &ws, Ending::Broken);
        flushed.extend(flush(&l));
        assert_eq!(charged_in_all(&flushed, &a), 2_000);
        assert_eq!(a.pending().returned_failure_ms, 0);
    }

    #[test]
    fn a_wall_clock_step_is_never_charged() {
        for mode in [MeteringMode::Session, MeteringMode::RequestTime] {
            let clock = ManualClock::new(START);
            let l = Ledger::new(
                clock.clone(),
                LedgerOptions {
                    mode,
                    idle_timeout_ms: 60_000,
                    ..LedgerOptions::default()
                },
            );
            let a = load(&l, row(1, 36_000_000));
            let first = request(&l, &clock, &a, 1_000);
            // back an hour in the middle of a session, and of a request
            let adm = l.admit(&a).unwrap();
            clock.advance(1_000);
            clock.step_wall(-3_600_000);
            clock.advance(1_000);
            l.finish(&a, adm.ticket, Ending::Charged, 0, 0);
            // forward an hour between two requests: no idle gap, the same session
            clock.advance(5_000);
            clock.step_wall(3_600_000);
            let last = request(&l, &clock, &a, 1_000);
            assert_eq!(first.session_id, last.session_id, "{mode:?}");
            let want = match mode {
                MeteringMode::Session => 9_000,
                MeteringMode::RequestTime => 4_000,
            };
            assert_eq!(a.pending().charge_ms, want, "{mode:?}");
            let items = l.snapshot();
            let s = &items[0].sessions[0];
            assert_eq!(
                s.started_at, START,
                "{mode:?}: stored times stay wall times"
            );
            assert_eq!(s.charged_ms, want);
        }
    }

    #[test]
    fn a_rotated_out_key_read_before_the_rotation_never_comes_back() {
        let clock = ManualClock::new(START);
        let l = ledger(MeteringMode::Session, &clock);
        let k1 = row(1, 100_000);
        // two cache-miss reads of K1 are in flight; the first lands
        let a = load(&l, k1.clone());
        // the key is rotated and the change applied
        let mut rotated = k1.clone();
        rotated.key_hash = KeyHash::of(b"K2");
        rotated.version = 2;
        l.apply(&rotated);
        // the second read, taken before the rotation, lands now
        assert!(l.insert_loaded(k1.key_hash, Some(k1.clone())).is_none());
        assert!(matches!(l.lookup(&k1.key_hash), Lookup::Miss));
        assert_eq!(a.stored().1, 2, "the account keeps the newer row");
        // and K2 works
        let again = l.insert_loaded(rotated.key_hash, Some(rotated)).unwrap();
        assert!(Arc::ptr_eq(&a, &again));
    }

    #[test]
    fn a_row_read_while_a_flush_commits_never_counts_its_usage_twice() {
        let clock = ManualClock::new(START);
        let l = ledger(MeteringMode::RequestTime, &clock);
        let a = load(&l, row(1, 100_000));
        request(&l, &clock, &a, 1_000);
        let items = l.snapshot();
        // the writer committed the flush (version 2, 99 s); before the ledger hears of it, the
        // admin server reads the row and hands it over
        let mut flushed = row(1, 99_000);
        flushed.version = 2;
        l.apply(&flushed);
        assert_eq!(a.remaining_ms(), 99_000);
        assert_eq!(l.live_remaining_ms(&flushed), 99_000);
        // a credit lands too, read after the flush (version 3)
        let mut credited = row(1, 199_000);
        credited.version = 3;
        assert_eq!(
            l.live_remaining_ms(&credited),
            99_000,
            "not yet, never twice"
        );
        l.commit(items, &[Applied::Deducted(flushed)]);
        assert_eq!(a.remaining_ms(), 199_000);
        assert_eq!(a.stored(), (199_000, 3));

        // a failed flush: the row read meanwhile cannot hold its usage
        request(&l, &clock, &a, 1_000);
        let items = l.snapshot();
        let mut credited = row(1, 299_000);
        credited.version = 4;
        l.apply(&credited);
        assert_eq!(a.remaining_ms(), 198_000);
        l.abandon(items);
        assert_eq!(a.remaining_ms(), 298_000);
    }

    #[test]
    fn a_revocation_read_while_a_flush_commits_applies_at_once() {
        let clock = ManualClock::new(START);
        let l = ledger(MeteringMode::RequestTime, &clock);
        let a = load(&l, row(1, 100_000));
        request(&l, &clock, &a, 1_000);
        let items = l.snapshot();
        let mut revoked = row(1, 100_000);
        revoked.status = LicenseStatus::Revoked;
        revoked.version = 2;
        l.apply(&revoked);
        assert_eq!(l.admit(&a).unwrap_err(), Denial::Revoked);
        let mut committed = revoked.clone();
        committed.balance_ms = 99_000;
        committed.version = 3;
        l.commit(items, &[Applied::Deducted(committed)]);
        assert_eq!(l.admit(&a).unwrap_err(), Denial::Revoked);
        assert_eq!(a.remaining_ms(), 99_000);
    }

    #[test]
    fn an_item_whose_license_is_gone_is_set_aside_and_its_key_forgotten() {
        let clock = ManualClock::new(START);
        let l = ledger(MeteringMode::RequestTime, &clock);
        let r = row(1, 100_000);
        let a = load(&l, r.clone());
        request(&l, &clock, &a, 1_000);
        let items = l.snapshot();
        l.commit(items, &[Applied::Orphaned]);
        assert_eq!(a.pending(), Usage::default());
        assert!(matches!(l.lookup(&r.key_hash), Lookup::Miss));
        assert!(l.account(1).is_none());
        assert!(l.snapshot().is_empty(), "nothing retried");
    }

    #[test]
    fn the_last_snapshot_ends_every_open_session_at_its_last_charged_time() {
        let clock = ManualClock::new(START);
        let l = ledger(MeteringMode::Session, &clock);
        let a = load(&l, row(1, 3_600_000));
        request(&l, &clock, &a, 2_000);
        clock.advance(10_000);
        let items = l.final_snapshot();
        assert_eq!(items[0].sessions.len(), 1);
        assert_eq!(items[0].sessions[0].ended_at, Some(START + 2_000));
        l.commit(items, &[Applied::Written]);
        assert_eq!(l.active_sessions(), 0);
    }

    #[test]
    fn the_limits_view_agrees_with_the_next_admission_at_every_edge() {
        let clock = ManualClock::new(START);
        let l = limited(
            &clock,
            crate::config::Plan {
                requests_per_second: Some(5),
                requests_per_hour: Some(50),
                ..Default::default()
            },
        );
        let a = load(&l, row(1, 3_600_000));
        // a millisecond at a time for 12 s: whatever the view says, admission agrees
        for _ in 0..12_000 {
            let view = l.limits_now(&a);
            let room = view.rates.iter().map(|r| r.remaining).min().unwrap();
            match l.admit(&a) {
                Ok(adm) => {
                    assert!(room >= 1, "admitted with {room} remaining: {view:?}");
                    l.finish(&a, adm.ticket, Ending::Charged, 0, 0);
                }
                Err(Denial::RateLimited { .. }) => {
                    assert_eq!(room, 0, "refused with {room} remaining: {view:?}")
                }
                Err(d) => panic!("{d:?}"),
            }
            clock.advance(1);
        }
    }

    #[test]
    fn time_given_back_is_not_a_top_up_for_the_balance_alerts() {
        let clock = ManualClock::new(START);
        let l = Ledger::new(
            clock.clone(),
            LedgerOptions {
                mode: MeteringMode::RequestTime,
                alert_thresholds: vec![80],
                ..LedgerOptions::default()
            },
        );
        let a = load(&l, row(1, 10_000));
        let slow = l.admit(&a).unwrap();
        clock.advance(5_000);
        flush(&l); // 5 s charged while it waited
        fail(
            &l,
            &a,
            &slow,
            Ending::Returned(ReturnReason::GatewayFailure),
        );
        clock.advance(1_000);
        flush(&l); // and given back: the balance rises, but nobody paid
        request(&l, &clock, &a, 8_000);
        let alerts = l.take_alerts();
        assert_eq!(alerts.len(), 1);
        assert_eq!(
            alerts[0].period_start, START,
            "still measured from the real top-up"
        );
    }

    #[test]
    fn an_older_row_arriving_during_a_flush_never_undoes_a_newer_one() {
        let clock = ManualClock::new(START);
        let l = ledger(MeteringMode::RequestTime, &clock);
        let a = load(&l, row(1, 100_000));
        request(&l, &clock, &a, 1_000);
        let items = l.snapshot();
        let mut revoked = row(1, 100_000);
        revoked.status = LicenseStatus::Revoked;
        revoked.version = 3;
        l.apply(&revoked);
        let mut older = row(1, 100_000);
        older.version = 2;
        l.apply(&older);
        assert_eq!(l.admit(&a).unwrap_err(), Denial::Revoked);
        l.abandon(items);
        assert_eq!(l.admit(&a).unwrap_err(), Denial::Revoked);
        assert_eq!(a.stored(), (100_000, 3));
    }

    #[test]
    fn a_request_outliving_its_session_at_shutdown_is_not_charged_twice() {
        let clock = ManualClock::new(START);
        let l = ledger(MeteringMode::Session, &clock);
        let a = load(&l, row(1, 3_600_000));
        let long = l.admit(&a).unwrap();
        clock.advance(4_000);
        let items = l.final_snapshot(); // charges the 4 s and ends the session
        let charged: i64 = items.iter().map(|i| i.usage.charge_ms).sum();
        let committed: Vec<_> = items
            .iter()
            .map(|i| {
                let (bal, ver) = i.account.stored();
                let mut r = row(1, bal - i.usage.charge_ms);
                r.version = ver + 1;
                Applied::Deducted(r)
            })
            .collect();
        l.commit(items, &committed);
        clock.advance(1_000);
        l.finish(&a, long.ticket, Ending::Charged, 0, 0);
        assert_eq!(charged, 4_000);
        assert_eq!(
            a.pending().charge_ms,
            1_000,
            "only the second after the last flush"
        );
    }

    #[test]
    fn a_gone_license_charges_nothing_more_for_its_requests_in_flight() {
        let clock = ManualClock::new(START);
        let l = ledger(MeteringMode::RequestTime, &clock);
        let a = load(&l, row(1, 100_000));
        let running = l.admit(&a).unwrap();
        clock.advance(1_000);
        let items = l.snapshot();
        l.commit(items, &[Applied::Orphaned]);
        clock.advance(1_000);
        l.finish(&a, running.ticket, Ending::Charged, 0, 0);
        assert!(
            l.snapshot().is_empty(),
            "nothing for a new license with the same id"
        );
        assert_eq!(l.admit(&a).unwrap_err(), Denial::Revoked);
    }
}
