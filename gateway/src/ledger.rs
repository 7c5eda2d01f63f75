//! The ledger: every known key's balance, unflushed usage and open session, in memory.
//!
//! This is the hot path. A request's key hash finds its [`Account`] in a moka cache; admission
//! and the end-of-request tally each take that account's own mutex for a few arithmetic
//! operations, so keys never contend with each other. Nothing here touches the disk: the flusher
//! takes a [`FlushItem`] snapshot of each changed account, commits it to SQLite, and only then
//! subtracts what was committed ([`Ledger::commit`]). A failed commit leaves everything pending
//! for the next try, and a crash loses only what no commit has taken yet: an under-charge, never
//! a double charge.
//!
//! Time comes from a [`Clock`] so sessions and idle timeouts are tested without sleeping.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::HeaderValue;
use rand::Rng;

use crate::config::MeteringMode;
use crate::keys::KeyHash;
use crate::periods::Calendar;

/// Milliseconds since the Unix epoch, from wherever the ledger is told to read them.
pub trait Clock: Send + Sync + 'static {
    fn now_ms(&self) -> i64;
}

/// The wall clock.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        now_ms()
    }
}

/// The current wall-clock time in Unix milliseconds.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// A clock that moves only when told to: for tests.
pub struct ManualClock(AtomicI64);

impl ManualClock {
    pub fn new(start_ms: i64) -> Arc<ManualClock> {
        Arc::new(ManualClock(AtomicI64::new(start_ms)))
    }
    pub fn advance(&self, ms: i64) {
        self.0.fetch_add(ms, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> i64 {
        self.0.load(Ordering::SeqCst)
    }
}

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

/// An admitted request's session and the balance it was admitted with.
#[derive(Clone, Debug)]
pub struct Admission {
    /// The usage session (none for guests, who have no license to record one against).
    pub session_id: Option<HeaderValue>,
    pub remaining_ms: i64,
    /// The plan's body cap, for bodies whose length is not known up front.
    pub max_body_bytes: Option<u64>,
}

/// Usage tallied in memory and not yet committed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// What the balance is charged: session time or request time, by the metering mode.
    pub charge_ms: i64,
    pub requests: i64,
    pub session_ms: i64,
    pub request_ms: i64,
    pub bytes_in: i64,
    pub bytes_out: i64,
}

impl Usage {
    fn is_zero(&self) -> bool {
        *self == Usage::default()
    }

    fn subtract(&mut self, other: &Usage) {
        self.charge_ms -= other.charge_ms;
        self.requests -= other.requests;
        self.session_ms -= other.session_ms;
        self.request_ms -= other.request_ms;
        self.bytes_in -= other.bytes_in;
        self.bytes_out -= other.bytes_out;
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
    /// The interval already charged in session mode: first request start to last request end.
    charged: Option<(i64, i64)>,
    /// Bumped on every change; the record is rewritten only when it differs from the last write.
    seq: u64,
    written_seq: u64,
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
    /// Theoretical arrival time of each rate of the plan (GCRA), in Unix nanoseconds.
    tat_ns: [i64; MAX_RATES],
    period: PeriodUsage,
}

#[derive(Default)]
struct Activity {
    pending: Usage,
    session: Option<OpenSession>,
    /// Sessions that ended and still have to be written.
    closed: Vec<SessionRecord>,
    in_flight: u32,
    /// Responses streaming now (long downloads, server-sent events, WebSockets): (ticket,
    /// charged up to). Each flush charges them up to its time, so a connection held open is
    /// paid for while it lasts, not only when it ends.
    streams: Vec<(u64, i64)>,
    next_ticket: u64,
}

impl Activity {
    fn has_work(&self) -> bool {
        !self.pending.is_zero()
            || self.session.is_some()
            || !self.closed.is_empty()
            || self.in_flight > 0
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

    /// Where the account stands against its plan's limits at `now`.
    pub fn limits_now(&self, now: i64) -> LimitsNow {
        let s = self.lock();
        let limits = &s.plan.limits;
        let now_ns = now * 1_000_000;
        let tats = s.limits.as_ref().map(|l| l.tat_ns);
        let rates = limits
            .rates
            .iter()
            .enumerate()
            .map(|(i, rate)| {
                let tat = tats.map_or(0, |t| t[i]).max(now_ns);
                // requests that would pass now, back to back (see `admit_request`)
                let room = (now_ns + rate.tolerance_ns() - tat) / rate.interval_ns() + 1;
                RateNow {
                    rate: *rate,
                    remaining: room.clamp(0, rate.requests as i64) as u64,
                    full_at: (tat + 999_999) / 1_000_000,
                }
            })
            .collect();
        LimitsNow {
            plan: s.plan.clone(),
            in_flight: s.activity.as_ref().map_or(0, |a| a.in_flight),
            rates,
            period: s.limits.as_ref().map(|l| l.period).filter(|p| now < p.end),
        }
    }

    /// The stored balance and its version, as the ledger last saw them.
    pub fn stored(&self) -> (i64, i64) {
        let s = self.lock();
        (s.balance_ms, s.version)
    }
}

impl AccountState {
    /// Applies a row read from the store if it is newer than what we hold.
    fn apply(&mut self, row: &LicenseState, plans: &Plans, now: i64) -> Option<KeyHash> {
        if row.version <= self.version {
            return None;
        }
        self.version = row.version;
        if row.balance_ms > self.balance_ms {
            // credited: balance alerts count from here (a new "period" for them)
            self.topup_ms = row.balance_ms;
            self.topup_at = now;
        }
        self.balance_ms = row.balance_ms;
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

impl Activity {
    fn session_expired(&self, now: i64, idle_timeout_ms: i64) -> bool {
        self.session.as_ref().is_some_and(|s| {
            self.in_flight == 0 && now - s.record.last_activity_at > idle_timeout_ms
        })
    }

    fn close_session(&mut self) {
        if let Some(s) = self.session.take() {
            let mut record = s.record;
            record.ended_at = Some(s.charged.map_or(record.last_activity_at, |(_, to)| to));
            self.closed.push(record);
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

/// What the store reports for a committed [`FlushItem`]: the whole row as the deduction left
/// it. A flush bumps the row's version, so it must carry every field: adopting only the balance
/// at the new version would hide a revocation or rotation committed just before it.
pub type Committed = LicenseState;

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
    pub fn insert_loaded(&self, hash: KeyHash, row: Option<LicenseState>) -> Option<Arc<Account>> {
        let Some(row) = row.filter(|r| r.key_hash == hash) else {
            self.unknown.insert(hash, ());
            return None;
        };
        let account = self.account_for(&row);
        self.by_hash.insert(hash, account.clone());
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
            if let Some(old) = a.lock().apply(row, &self.plans, self.clock.now_ms()) {
                self.by_hash.remove(&old);
            }
        }
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
    /// request joins the key's session (opening one if none is open or the last one idled out)
    /// and counts as in flight.
    pub fn admit_request(
        &self,
        account: &Arc<Account>,
        body_len: Option<u64>,
    ) -> Result<Admission, Denial> {
        let now = self.clock.now_ms();
        let mut guard = account.lock();
        let s = &mut *guard;
        if s.status != LicenseStatus::Active {
            return Err(Denial::Revoked);
        }
        if s.expires_at.is_some_and(|e| e <= now) {
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
            let in_flight = s.activity.as_ref().map_or(0, |a| a.in_flight);
            if in_flight >= max {
                return Err(Denial::ConcurrencyLimit { max });
            }
        }
        if limits.has_state() {
            let created_at = s.created_at;
            let state = s.limits.get_or_insert_with(|| {
                let (start, end) = self.calendar.period(created_at, now);
                Box::new(LimitState {
                    tat_ns: [0; MAX_RATES],
                    period: PeriodUsage {
                        start,
                        end,
                        ..PeriodUsage::default()
                    },
                })
            });
            if now >= state.period.end {
                let (start, end) = self.calendar.period(created_at, now);
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
            let now_ns = now * 1_000_000;
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
            s.activity().in_flight += 1;
            return Ok(Admission {
                session_id: None,
                remaining_ms,
                max_body_bytes,
            });
        }
        let a = s.activity();
        if a.session_expired(now, self.idle_timeout_ms) {
            a.close_session();
        }
        a.in_flight += 1;
        let session = a
            .session
            .get_or_insert_with(|| new_session(account.id, now));
        session.record.last_activity_at = session.record.last_activity_at.max(now);
        let session_id = Some(session.header.clone());
        self.mark_dirty(account, s);
        Ok(Admission {
            session_id,
            remaining_ms,
            max_body_bytes,
        })
    }

    /// Ends an admitted request that ran from `start_ms` to `end_ms`. `charged` is false for the
    /// gateway's own failures: they leave the session open but cost nothing.
    pub fn finish(
        &self,
        account: &Arc<Account>,
        start_ms: i64,
        end_ms: i64,
        charged: bool,
        bytes_in: u64,
        bytes_out: u64,
    ) {
        let end_ms = end_ms.max(start_ms);
        let mut s = account.lock();
        if s.guest {
            // no balance and no session: only the plan's allowance counts, by request time
            let a = s.activity();
            a.in_flight = a.in_flight.saturating_sub(1);
            if let Some(l) = s
                .limits
                .as_mut()
                .filter(|l| charged && start_ms >= l.period.start)
            {
                l.period.used_ms += end_ms - start_ms;
                l.period.requests += 1;
            }
            return;
        }
        let a = s.activity();
        a.in_flight = a.in_flight.saturating_sub(1);
        // Admission always opened one; this only guards against a caller's mistake.
        let session = a
            .session
            .get_or_insert_with(|| new_session(account.id, start_ms));
        session.seq += 1;
        let r = &mut session.record;
        r.last_activity_at = r.last_activity_at.max(end_ms);
        if !charged {
            return;
        }
        let request_ms = end_ms - start_ms;
        let session_ms = match &mut session.charged {
            None => {
                session.charged = Some((start_ms, end_ms));
                request_ms
            }
            Some((from, to)) => {
                let mut added = 0;
                if start_ms < *from {
                    added += *from - start_ms;
                    *from = start_ms;
                }
                if end_ms > *to {
                    added += end_ms - *to;
                    *to = end_ms;
                }
                added
            }
        };
        let charge_ms = match self.mode {
            MeteringMode::Session => session_ms,
            MeteringMode::RequestTime => request_ms,
        };
        let (bytes_in, bytes_out) = (bytes_in as i64, bytes_out as i64);
        let mut counted = false;
        if let Some(l) = s.limits.as_mut() {
            if start_ms >= l.period.start {
                l.period.used_ms += charge_ms;
                l.period.requests += 1;
                counted = true;
            }
        }
        let a = s.activity.as_mut().expect("made above");
        let session = a.session.as_mut().expect("made above");
        let r = &mut session.record;
        r.charged_ms += charge_ms;
        r.requests += 1;
        r.bytes_in += bytes_in;
        r.bytes_out += bytes_out;
        let p = &mut a.pending;
        p.charge_ms += charge_ms;
        p.requests += 1;
        p.session_ms += session_ms;
        p.request_ms += request_ms;
        p.bytes_in += bytes_in;
        p.bytes_out += bytes_out;
        if !self.thresholds.is_empty() {
            self.check_alerts(account.id, &s, counted, charge_ms, end_ms);
        }
    }

    /// Looks for thresholds this request's `charge_ms` (and its one request) crossed. Runs under
    /// the account's lock; takes the alert list's lock only when one was crossed.
    fn check_alerts(&self, id: i64, s: &AccountState, counted: bool, charge_ms: i64, now: i64) {
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
                    p.requests - 1,
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

    /// Marks an admitted request as streaming its response from `start_ms`: from now on each
    /// flush charges it up to the flush's time. End it with [`Ledger::finish_stream`].
    pub fn streaming(&self, account: &Arc<Account>, start_ms: i64) -> u64 {
        let mut s = account.lock();
        let a = s.activity();
        a.next_ticket += 1;
        let ticket = a.next_ticket;
        a.streams.push((ticket, start_ms));
        ticket
    }

    /// Ends a streaming request: what no flush has charged yet is charged as [`Ledger::finish`]
    /// would (`charged` false: the remainder is not).
    pub fn finish_stream(
        &self,
        account: &Arc<Account>,
        ticket: u64,
        end_ms: i64,
        charged: bool,
        bytes_in: u64,
        bytes_out: u64,
    ) {
        let from = {
            let mut s = account.lock();
            let a = s.activity();
            match a.streams.iter().position(|(t, _)| *t == ticket) {
                Some(i) => a.streams.swap_remove(i).1,
                None => end_ms,
            }
        };
        self.finish(account, from, end_ms, charged, bytes_in, bytes_out);
    }

    /// Whether the account's balance is spent (a stream should be ended).
    pub fn exhausted(&self, account: &Arc<Account>) -> bool {
        account.remaining_ms() <= 0
    }

    /// Charges every open stream of the account up to `now` (called by the snapshot).
    fn charge_streams(&self, s: &mut AccountState, now: i64) {
        let mode = self.mode;
        let mut added = 0;
        {
            let a = s.activity();
            let mut earliest = i64::MAX;
            for (_, charged_to) in a.streams.iter_mut() {
                if now > *charged_to {
                    if mode == MeteringMode::RequestTime {
                        added += now - *charged_to;
                    }
                    earliest = earliest.min(*charged_to);
                    *charged_to = now;
                }
            }
            if earliest == i64::MAX {
                return;
            }
            let mut session_ms = 0;
            if let Some(session) = a.session.as_mut() {
                session_ms = match &mut session.charged {
                    None => {
                        session.charged = Some((earliest, now));
                        now - earliest
                    }
                    Some((_, to)) if now > *to => {
                        let d = now - *to;
                        *to = now;
                        d
                    }
                    Some(_) => 0,
                };
                if mode == MeteringMode::Session {
                    added = session_ms;
                }
                session.seq += 1;
                session.record.charged_ms += added;
                session.record.last_activity_at = session.record.last_activity_at.max(now);
            }
            let p = &mut a.pending;
            p.charge_ms += added;
            p.session_ms += session_ms;
            if mode == MeteringMode::RequestTime {
                p.request_ms += added;
            }
        }
        if let Some(l) = s.limits.as_mut() {
            l.period.used_ms += added;
        }
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

    /// Takes a snapshot of every account with uncommitted work, closing sessions that idled
    /// out. Nothing is subtracted until [`Ledger::commit`]; pass failed items to
    /// [`Ledger::abandon`].
    pub fn snapshot(&self) -> Vec<FlushItem> {
        let now = self.clock.now_ms();
        let taken = std::mem::take(&mut *self.dirty.lock().unwrap_or_else(|e| e.into_inner()));
        let mut items = Vec::with_capacity(taken.len());
        let mut keep = Vec::new();
        for account in taken {
            let mut s = account.lock();
            if s.activity.as_ref().is_some_and(|a| !a.streams.is_empty()) {
                self.charge_streams(&mut s, now);
            }
            let Some(a) = s.activity.as_mut() else {
                s.dirty = false;
                continue;
            };
            if a.session_expired(now, self.idle_timeout_ms) {
                a.close_session();
            }
            let mut sessions = a.closed.clone();
            let open_seq = match &a.session {
                Some(o) if o.seq != o.written_seq || o.written_seq == 0 => {
                    sessions.push(o.record.clone());
                    Some(o.seq)
                }
                _ => None,
            };
            if a.pending.is_zero() && sessions.is_empty() {
                if s.has_work() {
                    drop(s);
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
            drop(s);
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

    /// Subtracts what a flush committed. `committed[i]` is the balance after item `i`'s
    /// deduction, or `None` when the item carried no usage.
    pub fn commit(&self, items: Vec<FlushItem>, committed: &[Option<Committed>]) {
        let now = self.clock.now_ms();
        let mut keep = Vec::new();
        for (item, c) in items.into_iter().zip(committed) {
            let mut s = item.account.lock();
            let a = s.activity();
            a.pending.subtract(&item.usage);
            a.closed.drain(..item.closed);
            if let (Some(seq), Some(open)) = (item.open_seq, a.session.as_mut()) {
                open.written_seq = open.written_seq.max(seq);
            }
            if let Some(old) = c.as_ref().and_then(|c| s.apply(c, &self.plans, now)) {
                self.by_hash.remove(&old);
            }
            if s.has_work() {
                drop(s);
                keep.push(item.account);
            } else {
                s.settle();
                s.dirty = false;
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
        let mut dirty = self.dirty.lock().unwrap_or_else(|e| e.into_inner());
        dirty.extend(items.into_iter().map(|i| i.account));
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
                    .is_some_and(|a| a.session.is_some())
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
        charged: None,
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
        let start = clock.now_ms();
        clock.advance(ms);
        l.finish(a, start, clock.now_ms(), true, 10, 20);
        adm
    }

    /// Commits everything as a store would, returning the items' usage.
    fn flush(l: &Ledger) -> Vec<Usage> {
        let items = l.snapshot();
        let committed: Vec<_> = items
            .iter()
            .map(|i| {
                let (bal, ver) = i.account.stored();
                let mut state = row(i.account.id, bal - i.usage.charge_ms);
                state.version = ver + 1;
                Some(state)
            })
            .collect();
        let usage = items.iter().map(|i| i.usage).collect();
        l.commit(items, &committed);
        usage
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
        l.commit(items, &[None]);
        assert!(l.snapshot().is_empty(), "nothing left to write");
        assert_eq!(l.active_sessions(), 0);
    }

    #[test]
    fn a_session_stays_open_while_a_long_request_is_in_flight() {
        let clock = ManualClock::new(START);
        let l = ledger(MeteringMode::Session, &clock);
        let a = load(&l, row(1, 36_000_000));
        let long = l.admit(&a).unwrap();
        let long_start = clock.now_ms();
        clock.advance(400_000);
        flush(&l);
        let short = request(&l, &clock, &a, 1_000);
        assert_eq!(long.session_id, short.session_id);
        l.finish(&a, long_start, clock.now_ms(), true, 0, 0);
        assert_eq!(a.pending().charge_ms, 401_000);
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
        let (s1, s2) = (clock.now_ms(), clock.now_ms() + 100);
        l.admit(&a).unwrap();
        l.admit(&a).unwrap();
        l.finish(&a, s1, s1 + 1_000, true, 0, 0);
        l.finish(&a, s2, s2 + 1_000, true, 0, 0);
        assert_eq!(a.pending().charge_ms, 4_000);
        assert_eq!(a.pending().requests, 4);
    }

    #[test]
    fn gateway_failures_are_not_charged() {
        let clock = ManualClock::new(START);
        let l = ledger(MeteringMode::Session, &clock);
        let a = load(&l, row(1, 3_600_000));
        l.admit(&a).unwrap();
        let start = clock.now_ms();
        clock.advance(2_000);
        l.finish(&a, start, clock.now_ms(), false, 100, 0);
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
        l.commit(items, &[Some(state)]);
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
        l.commit(items, &[Some(after)]);
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
            if l.admit(&a).is_ok() {
                let now = clock.now_ms();
                l.finish(&a, now, now, true, 0, 0);
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
                        if l.admit(&a).is_ok() {
                            admitted.fetch_add(1, Ordering::Relaxed);
                            let now = l.now_ms();
                            l.finish(&a, now, now, true, 0, 0);
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
        l.admit(&a).unwrap();
        assert_eq!(
            l.admit(&a).unwrap_err(),
            Denial::ConcurrencyLimit { max: 1 }
        );
        // an uncharged end (an upstream failure) frees the slot too
        l.finish(&a, START, START, false, 0, 0);
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
}
