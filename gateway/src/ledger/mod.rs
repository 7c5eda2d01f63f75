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

use crate::config::MeteringMode;
use crate::keys::KeyHash;
use crate::meters::{Units, MAX_METERS};
use crate::periods::Calendar;

mod account;
mod alerts;
mod clock;
mod flush;
mod lease;
mod plans;
mod session;
mod span;
mod units;

pub use crate::license::{LicenseState, LicenseStatus, PeriodUsage};
use crate::limits::{At, LimitState, PeriodAllowance, Request, Used};
pub use crate::limits::{Denial, KeyGate, PlanLimits, Rate};
pub use crate::records::{AlertEvent, AlertKind, Applied, SessionRecord, Usage};
pub use account::Account;
use account::AccountState;
pub use flush::FlushItem;
pub use plans::PlanName;
use plans::Plans;
use session::{new_session, Activity};

use clock::Now;
pub use clock::{now_ms, Clock, ManualClock, SyncedClock, SystemClock};
use span::cover;

/// An admitted request: its ticket, its session and the balance it was admitted with.
#[derive(Clone, Debug)]
pub struct Admission {
    /// Names this request to [`Ledger::finish`]; from admission on, every flush charges the
    /// time it has run so far.
    pub ticket: u64,
    /// The usage session (none for guests, who have no license to record one against).
    pub session_id: Option<HeaderValue>,
    pub remaining_ms: i64,
    /// The most a body of unknown length may carry (the plan's size cap), and the refusal
    /// crossing it earns.
    pub body_allowance: Option<(u64, Denial)>,
    /// A body of unknown length on a plan with a daily upload cap: each chunk takes its bytes
    /// from the day's allowance as it streams ([`Ledger::take_upload`]).
    pub streams_upload: bool,
    /// A priced request's reservation (settled by [`Ledger::settle`]).
    pub priced: Option<Reserve>,
    /// When the key's gate booked it (monotonic ms; the gate's [`KeyGate::finish`] is given it
    /// back); 0 for a key without a gate.
    pub key_since_ms: i64,
}

/// What a request asks of admission: its body, and on a `fixed` or `reported` route the
/// reservation its price is charged from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ask {
    /// The body's declared length (see [`Ledger::admit_request`]).
    pub body_len: Option<u64>,
    pub priced: Option<Reserve>,
    /// How many requests the call counts as (its route's `requests_cost`; 0 is read as 1).
    pub cost: u32,
    /// A `metered` route with a `time_multiplier` (thousandths): the request's time is charged
    /// times it, per request and outside the session.
    pub scale: Option<i64>,
}

impl Ask {
    pub fn body(body_len: Option<u64>) -> Ask {
        Ask {
            body_len,
            priced: None,
            cost: 1,
            scale: None,
        }
    }
}

/// What a priced request (a `fixed` or `reported` route) takes at admission, from the balance
/// and from the period's unit allowances, until its end settles it ([`Ledger::settle`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reserve {
    /// Balance (ms): a `fixed` price, or the reserved units at the meters' prices.
    pub ms: i64,
    /// Units of each meter.
    pub units: Units,
    /// The meters the route may report (bit `i` for meter `i`): their period allowances must
    /// have room for it.
    pub meters: u8,
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
    /// 502/504 made by the gateway). Whatever the flushes charged for it is given back. (A body
    /// refused part way is the client's doing: the app was receiving it, so it is `Charged`,
    /// up to the refusal.)
    Returned,
}

/// What a cache lookup found.
/// How long a license's key change is remembered where no account of it is live: longer than
/// any store read of a key takes (they are bounded by the store's call timeout).
const KEYS_MOVED_TTL: Duration = Duration::from_secs(60);

/// A key in memory: its account, the key, and the license's `keys_version` it was read at.
#[derive(Clone)]
struct CachedKey {
    account: Arc<Account>,
    key: KeyRef,
    keys_version: i64,
}

/// A key of a license as admission sees it: its id (`license_keys.id`; 0 for a guest) and, when
/// it has rules of its own (an expiry, limits), its gate.
#[derive(Clone, Default)]
pub struct KeyRef {
    pub id: i64,
    pub gate: Option<Arc<KeyGate>>,
}

pub enum Lookup {
    /// The key's account, and the key.
    Known(Arc<Account>, KeyRef),
    /// Looked up recently and not found: deny without a disk read.
    Unknown,
    /// Not in memory: read the store, then call [`Ledger::insert_loaded`].
    Miss,
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
    /// Several nodes: admit only from leases of this size (ms of balance); `None` on one node.
    pub lease_slice_ms: Option<i64>,
    /// Several nodes: the most requests of a period allowance a node reserves at a time.
    pub lease_requests: i64,
    /// Lookups that find nothing, a second (`crate::lookups`; 0: no budget).
    pub unknown_lookups_per_second: u64,
    /// The configured meters (`[[meters]]`), for the names a refusal gives.
    pub meters: Vec<crate::config::Meter>,
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
            lease_slice_ms: None,
            lease_requests: 100,
            unknown_lookups_per_second: 0,
            meters: Vec::new(),
        }
    }
}

/// Guests remembered at once; past this the least recently seen are forgotten (and start over).
const GUESTS: u64 = 200_000;

/// Gates of keys with rules of their own kept at once; past this the least recently used are
/// forgotten (read again from the store: what the flushes wrote of their day).
const KEY_GATES: u64 = 100_000;

pub struct Ledger {
    clock: Arc<dyn Clock>,
    mode: MeteringMode,
    idle_timeout_ms: i64,
    /// Known keys. quick_cache rather than moka: with a million keys moka's per-entry
    /// bookkeeping alone took ~350 MB, quick_cache ~100 MB (benches/memory.rs).
    by_hash: quick_cache::sync::Cache<KeyHash, CachedKey>,
    /// Keys looked up and not found, for a short time (moka for its per-entry TTL).
    unknown: moka::sync::Cache<KeyHash, ()>,
    /// The `keys_version` of licenses whose keys changed while no account of theirs was live
    /// here, for a while: a read of one of their keys begun before the change and landing
    /// after it makes an account at the newer version, so the read is not trusted.
    keys_moved: moka::sync::Cache<i64, i64>,
    /// The gates of keys with rules of their own, by key id: one per key, shared by its cached
    /// copies and its requests in flight, so a key read again (its license's keys changed, or
    /// its entry evicted) keeps its counts: its day of request time and its rate. Kept while
    /// the key is used, up to a day idle (by then its day is over).
    key_gates: moka::sync::Cache<i64, Arc<KeyGate>>,
    /// The budget of lookups that find nothing, for the proxy and the admin server alike.
    lookups: crate::lookups::Lookups,
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
    /// Several nodes: the lease slice, and the accounts that want a new one (lease.rs).
    lease_slice_ms: Option<i64>,
    lease_requests: i64,
    wants_lease: Mutex<Vec<Arc<Account>>>,
    /// Several nodes: the live nodes rates and concurrency caps are split between (cluster.rs
    /// sets it at each heartbeat; 1 on one node).
    live_nodes: std::sync::atomic::AtomicU32,
    /// `period_units.<meter>` for each meter: a refusal's `limit` (made once, for the life of
    /// the process).
    unit_limits: Vec<&'static str>,
    /// `included_units.<meter>` for each meter: its `/usage/limits` line.
    included_unit_names: Vec<&'static str>,
    meter_names: Vec<String>,
    /// The configured meters: their prices, for what a plan's included units pay.
    meters: Vec<crate::config::Meter>,
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
            keys_moved: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(KEYS_MOVED_TTL)
                .build(),
            key_gates: moka::sync::Cache::builder()
                .max_capacity(KEY_GATES)
                .time_to_idle(Duration::from_secs(86_400))
                .build(),
            lookups: crate::lookups::Lookups::new(o.unknown_lookups_per_second),
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
            lease_slice_ms: o.lease_slice_ms,
            lease_requests: o.lease_requests.max(1),
            wants_lease: Mutex::new(Vec::new()),
            live_nodes: std::sync::atomic::AtomicU32::new(1),
            meter_names: o.meters.iter().map(|m| m.name.clone()).collect(),
            meters: o.meters.clone(),
            unit_limits: o
                .meters
                .iter()
                .map(|m| &*Box::leak(format!("period_units.{}", m.name).into_boxed_str()))
                .collect(),
            included_unit_names: o
                .meters
                .iter()
                .map(|m| &*Box::leak(format!("included_units.{}", m.name).into_boxed_str()))
                .collect(),
        }
    }

    /// The configured meters' names, by index as units are counted.
    pub fn meter_names(&self) -> &[String] {
        &self.meter_names
    }

    /// The `limit` a refusal names for meter `i`'s period allowance.
    pub fn unit_limit_name(&self, i: u8) -> &'static str {
        self.unit_limits
            .get(usize::from(i))
            .copied()
            .unwrap_or("period_units")
    }

    /// The live nodes sharing the store (1 on one node).
    pub fn live_nodes(&self) -> u32 {
        self.live_nodes.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Sets how many live nodes the rates and concurrency caps are split between.
    pub fn set_live_nodes(&self, nodes: usize) {
        let n = u32::try_from(nodes).unwrap_or(u32::MAX).max(1);
        self.live_nodes
            .store(n, std::sync::atomic::Ordering::Relaxed);
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

    /// The budget of lookups that find nothing (`crate::lookups`).
    pub fn lookups(&self) -> &crate::lookups::Lookups {
        &self.lookups
    }

    pub fn lookup(&self, hash: &KeyHash) -> Lookup {
        if let Some(k) = self.by_hash.get(hash) {
            if k.keys_version == k.account.keys_version() {
                return Lookup::Known(k.account, k.key);
            }
            // the license's keys changed since this one was read: it may be revoked or
            // rotated out, so it is read again
            self.by_hash.remove(hash);
            return Lookup::Miss;
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
                key_id: 0,
                keys_version: 0,
                plan: "guest".into(),
                status: LicenseStatus::Active,
                expires_at: None,
                balance_ms: i64::MAX / 4,
                version: 0,
                period_anchor: now,
                period: None,
                topup: None,
                today: None,
                period_units: Vec::new(),
                key_rules: None,
                period_used: None,
            };
            let a = Account::new(&row, self.plans.intern("guest"));
            a.lock().guest = true;
            Arc::new(a)
        })
    }

    /// Records the result of a store read for `hash`: the account, or a negative entry.
    ///
    /// The read may be older than what the ledger already holds: a key revoked or rotated
    /// while it was in flight. The key is cached only if the license's keys have not changed
    /// since the read (`keys_version`), and the cached entry carries the version it was read
    /// at, so a change that lands after this check still sends the next lookup to the store:
    /// a revoked or rotated-out key never comes back.
    pub fn insert_loaded(&self, hash: KeyHash, row: Option<LicenseState>) -> Option<Arc<Account>> {
        self.insert_loaded_key(hash, row).map(|(a, _)| a)
    }

    /// [`Ledger::insert_loaded`], with the key as admission needs it.
    pub fn insert_loaded_key(
        &self,
        hash: KeyHash,
        row: Option<LicenseState>,
    ) -> Option<(Arc<Account>, KeyRef)> {
        let Some(mut row) = row.filter(|r| r.key_hash == hash) else {
            self.unknown.insert(hash, ());
            return None;
        };
        // the period's units, by name as the store counts them, by index as the ledger does
        row.period = self.measured_period(&row);
        let account = self.account_for(&row);
        if account.keys_version() != row.keys_version {
            return None;
        }
        let key = KeyRef {
            id: row.key_id,
            gate: row.key_rules.map(|r| self.key_gate(row.key_id, &r)),
        };
        self.by_hash.insert(
            hash,
            CachedKey {
                account: account.clone(),
                key: key.clone(),
                keys_version: row.keys_version,
            },
        );
        Some((account, key))
    }

    /// The gate of key `id`, with its rules as just read: the live one if any (its counts
    /// kept), else a new one.
    fn key_gate(&self, id: i64, rules: &crate::license::KeyRules) -> Arc<KeyGate> {
        let mut made = false;
        let g = self.key_gates.get_with(id, || {
            made = true;
            Arc::new(KeyGate::new(id, rules))
        });
        if !made {
            g.update(rules);
        }
        g
    }

    /// Admission through a key: its own rules (if any) beside the license's
    /// ([`Ledger::admit_with`]); a refusal by either takes nothing of the other.
    pub fn admit_key(
        &self,
        account: &Arc<Account>,
        key: &KeyRef,
        ask: Ask,
    ) -> Result<Admission, Denial> {
        match &key.gate {
            None => self.admit_with(account, ask),
            Some(g) => {
                let at = self.at();
                let mut a = g.admit(at, ask.cost.max(1), self.live_nodes(), || {
                    self.admit_with(account, ask)
                })?;
                a.key_since_ms = at.mono;
                Ok(a)
            }
        }
    }

    /// [`Ledger::check`] through a key: its own rules, then the license's; taking nothing.
    pub fn check_key(&self, account: &Arc<Account>, key: &KeyRef, ask: Ask) -> Result<(), Denial> {
        if let Some(g) = &key.gate {
            g.check(self.at(), ask.cost.max(1), self.live_nodes())?;
        }
        self.check(account, ask)
    }

    fn at(&self) -> At {
        let now = self.now();
        At {
            wall: now.wall,
            mono: now.mono,
        }
    }

    /// The live account for a row, made if there is none; the row is applied if newer.
    fn account_for(&self, row: &LicenseState) -> Arc<Account> {
        let mut by_id = self.by_id.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(a) = by_id.get(&row.id).and_then(Weak::upgrade) {
            let keys = a.lock().apply(row, &self.plans, self.clock.now_ms());
            drop(by_id);
            if let Some(v) = keys {
                a.keys_seen(v);
            }
            return a;
        }
        let a = Arc::new(Account::new(row, self.plans.intern(&row.plan)));
        if let Some(v) = self.keys_moved.get(&row.id) {
            a.keys_seen(v);
        }
        if self.lease_slice_ms.is_some() {
            let mut s = a.lock();
            s.held_ms = Some(0);
            s.period_held = Some(lease::PeriodHeld::default());
        }
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
        match live {
            Some(a) => {
                let keys = a.lock().apply(row, &self.plans, self.clock.now_ms());
                if let Some(v) = keys {
                    a.keys_seen(v);
                }
            }
            None if row.keys_version > 0 => {
                // a read of one of its keys may be in flight: it must not be trusted
                let v = self
                    .keys_moved
                    .get(&row.id)
                    .map_or(row.keys_version, |v| v.max(row.keys_version));
                self.keys_moved.insert(row.id, v);
            }
            None => {}
        }
    }

    /// The balance a freshly read row leaves, less the usage metered here and not yet in it:
    /// the row is applied first, so a row that already holds a flush's deduction is never
    /// reduced by that usage a second time.
    pub fn live_remaining_ms(&self, row: &LicenseState) -> i64 {
        self.apply(row);
        self.account(row.id)
            .map_or(row.balance_ms, |a| a.left_ms().0)
    }

    /// Whether a row of license `id` is held back until the flush of it being committed ends
    /// (see `AccountState::flushing`): until then [`Ledger::live_remaining_ms`] shows the
    /// balance from before that row, as a row read during a flush may already hold the
    /// flush's deduction that the pending usage still holds too.
    pub fn holds_back(&self, id: i64) -> bool {
        self.account(id).is_some_and(|a| {
            let s = a.lock();
            s.flushing && s.deferred.is_some()
        })
    }

    /// Forgets a negative entry (a key just created here must work at once).
    pub fn forget_unknown(&self, hash: &KeyHash) {
        self.unknown.invalidate(hash);
    }

    /// Admission without a body length (see [`Ledger::admit_request`]).
    pub fn admit(&self, account: &Arc<Account>) -> Result<Admission, Denial> {
        self.admit_request(account, None)
    }

    /// Admission on status, expiry, balance and the plan's limits (body size, concurrency,
    /// period allowance, daily uploads, rates: [`PlanLimits::admit`]). Every check is made
    /// before anything changes, so a denied request consumes nothing: no rate token, no
    /// concurrency slot, no upload allowance, no session time. On success the
    /// request is in flight under a ticket, joined to the key's session (a new one if none is
    /// open or the last one idled out); it is charged from now on, by every flush, until
    /// [`Ledger::finish`].
    pub fn admit_request(
        &self,
        account: &Arc<Account>,
        body_len: Option<u64>,
    ) -> Result<Admission, Denial> {
        self.admit_with(account, Ask::body(body_len))
    }

    /// Admission as [`Ledger::admit_request`], for a request that may be priced: a priced one
    /// is admitted only if its reservation fits in the balance (and in the period's unit
    /// allowances of its route's meters) beside what the priced requests in flight reserved;
    /// it is then held until [`Ledger::settle`], outside the session.
    pub fn admit_with(&self, account: &Arc<Account>, ask: Ask) -> Result<Admission, Denial> {
        self.decide(account, ask, true)
            .map(|a| a.expect("an admission that takes returns its ticket"))
    }

    /// The decision [`Ledger::admit_with`] would take now, from the same code, taking nothing:
    /// no rate token, concurrency slot, reservation or ticket (`POST /usage/check`). On several
    /// nodes it is this node's view of the whole balance and allowances, as if the store would
    /// give the next slice of either: advisory there.
    pub fn check(&self, account: &Arc<Account>, ask: Ask) -> Result<(), Denial> {
        self.decide(account, ask, false).map(|_| ())
    }

    /// Admission's checks, then (with `take`) the booking: `Ok(None)` when only checking.
    fn decide(
        &self,
        account: &Arc<Account>,
        ask: Ask,
        take: bool,
    ) -> Result<Option<Admission>, Denial> {
        let body_len = ask.body_len;
        let now = self.now();
        let mut guard = account.lock();
        let s = &mut *guard;
        if s.status != LicenseStatus::Active {
            return Err(Denial::Revoked);
        }
        if s.expires_at.is_some_and(|e| e <= now.wall) {
            return Err(Denial::Expired);
        }
        self.renew_included(s, now.wall);
        let remaining_ms = s.remaining_ms();
        let may_ask = now.wall >= s.lease_retry_at;
        let (reserved_ms, reserved_units) = s
            .activity
            .as_ref()
            .map_or((0, [0; MAX_METERS]), |a| a.reserved());
        // a priced request needs room for its reservation, less what the plan's included
        // requests and units are expected to pay of it (a call the plan pays whole needs no
        // room, only a balance not overdrawn); any other, for something
        let reserve_ms = ask.priced.map(|p| {
            let waived = self.reservation_waived(s, &p, ask.cost, &reserved_units, now.wall);
            (p.ms - waived).max(0)
        });
        let need = match (ask.priced, reserve_ms) {
            (Some(p), Some(0)) if p.ms > 0 => 0,
            (Some(p), Some(ms)) => ms.max(1).min(p.ms.max(1)),
            _ => 1,
        };
        // a check (not taking) is this node's view of the whole balance and allowances: the
        // proxy would ask the store for the next slice of either, and usually get it
        let spendable = if take {
            s.spendable_ms()
        } else {
            s.remaining_ms()
        };
        // a price is paid from the prepaid balance (what a plan includes is time)
        let spendable = match ask.priced {
            Some(_) if s.plan.limits.included_ms.is_some() => spendable.min(s.left_ms().0),
            _ => spendable,
        };
        if spendable - reserved_ms < need {
            let lease_spent = s.held_ms.is_some() && remaining_ms - reserved_ms >= need && may_ask;
            if lease_spent && take && need > 0 {
                // the next ask is for room enough, for the requests refused so meanwhile
                // (priced requests arriving together are then admitted after one ask), but
                // never more than a few of this one's: a burst or an outage does not take
                // every unreserved ms here
                s.lease_need_ms = (s.lease_need_ms + need).min(NEED_AT_ONCE * need);
            }
            return Err(Denial::InsufficientBalance {
                remaining_ms,
                lease_spent,
            });
        }
        let limits = &s.plan.limits;
        let at = At {
            wall: now.wall,
            mono: now.mono,
        };
        let cost = ask.cost.max(1);
        let mut req = Request {
            body_len,
            in_flight: s.activity.as_ref().map_or(0, |a| a.in_flight()),
            in_flight_requests: s.activity.as_ref().map_or(0, |a| a.in_flight_requests()),
            nodes: self.live_nodes(),
            period_left: None,
            cost,
        };
        let mut body_allowance = None;
        if limits.has_state() {
            let anchor = s.period_anchor;
            let state = s.limits.get_or_insert_with(|| {
                let (start, end) = self.calendar.period(anchor, now.wall);
                Box::new(LimitState {
                    period: PeriodUsage {
                        start,
                        end,
                        ..PeriodUsage::default()
                    },
                    ..LimitState::default()
                })
            });
            if now.wall >= state.period.end {
                let (start, end) = self.calendar.period(anchor, now.wall);
                state.period = PeriodUsage {
                    start,
                    end,
                    ..PeriodUsage::default()
                };
            }

            if let Some(held) = s.period_held.filter(|_| limits.period.is_some() && take) {
                req.period_left =
                    Some(held.left(state.period.start, s.activity.as_deref(), may_ask));
            }
            if let Some(p) = ask.priced {
                check_units(&limits.period_units, &state.period, &reserved_units, &p)?;
                // several nodes: and from this node's slices of those allowances
                if let Some(held) = s.period_held.filter(|_| take) {
                    let left = held.units_left(state.period.start, s.activity.as_deref());
                    let short = short_of(&limits.period_units, &left, &p);
                    if short != 0 {
                        let may_ask = now.wall >= s.units_retry_at;
                        for i in (0..MAX_METERS).filter(|&i| may_ask && short & (1 << i) != 0) {
                            // the next ask is for room enough in each meter short of it, for
                            // the requests refused so meanwhile (a few of this one's at most)
                            let need = p.units[i].max(1);
                            s.lease_need_units[i] =
                                (s.lease_need_units[i] + need).min(NEED_AT_ONCE * need);
                        }
                        return Err(Denial::UnitsExceeded {
                            resets_at: state.period.end,
                            meter: short.trailing_zeros() as u8,
                            lease_spent: may_ask,
                        });
                    }
                }
            }
            if take {
                if let Err(d) = limits.admit(state, &req, at) {
                    if d.lease_spent() {
                        // the next ask is for room enough for the whole call
                        s.lease_need_requests = i64::from(cost);
                    }
                    return Err(d);
                }
            } else {
                limits.check(state, &req, at)?;
            }
        } else if take {
            limits.admit(&mut LimitState::default(), &req, at)?;
        } else {
            limits.check(&LimitState::default(), &req, at)?;
        }
        if !take {
            return Ok(None);
        }
        if body_len.is_none() {
            body_allowance = limits.body_allowance();
        }
        let streams_upload = body_len.is_none() && limits.upload.is_some();
        let reserved = if limits.upload.is_some() {
            body_len.unwrap_or(0)
        } else {
            0
        };
        if s.guest {
            let ticket = s.activity().open_ticket(
                now,
                reserved,
                ask.priced.zip(reserve_ms),
                cost,
                ask.scale,
            );
            return Ok(Some(Admission {
                ticket,
                session_id: None,
                remaining_ms,
                body_allowance,
                streams_upload,
                priced: ask.priced,
                key_since_ms: 0,
            }));
        }
        s.last_used_at = now.wall;
        let a = s.activity();
        if a.session_expired(now.mono, self.idle_timeout_ms) {
            a.close_session();
        }
        let ticket = a.open_ticket(now, reserved, ask.priced.zip(reserve_ms), cost, ask.scale);
        // a priced or scaled request is outside the session: it neither opens nor extends one
        let session_id = match (ask.priced, ask.scale) {
            (Some(_), _) | (_, Some(_)) => None,
            (None, None) => Some(
                a.session
                    .get_or_insert_with(|| new_session(account.id, now.wall))
                    .header
                    .clone(),
            ),
        };
        self.mark_dirty(account, s);
        Ok(Some(Admission {
            ticket,
            session_id,
            remaining_ms,
            body_allowance,
            streams_upload,
            priced: ask.priced,
            key_since_ms: 0,
        }))
    }

    /// Takes `bytes` of a body streaming without a declared length from the day's upload
    /// allowance, reserved for the request `ticket` until it ends; `Err` (nothing taken) if
    /// they do not fit in what is left: the proxy refuses the request part way.
    pub fn take_upload(
        &self,
        account: &Arc<Account>,
        ticket: u64,
        bytes: u64,
    ) -> Result<(), Denial> {
        let now = self.now();
        let at = At {
            wall: now.wall,
            mono: now.mono,
        };
        let mut guard = account.lock();
        let s = &mut *guard;
        let Some(cap) = s.plan.limits.upload else {
            return Ok(());
        };
        let Some(t) = s.activity.as_mut().and_then(|a| a.ticket_mut(ticket)) else {
            return Ok(()); // ended already: nothing to reserve for
        };
        let Some(state) = s.limits.as_deref_mut() else {
            return Ok(());
        };
        cap.take(&mut state.upload, bytes, at)?;
        t.reserved_bytes += bytes;
        Ok(())
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
        let priced = s
            .activity
            .as_ref()
            .and_then(|a| a.open.iter().find(|t| t.id == ticket))
            .and_then(|t| t.priced);
        if let Some(r) = priced {
            drop(guard);
            // a priced request ended before its answer could be priced (its body refused part
            // way: the app was receiving it): charged its reservation
            let price = (ending == Ending::Charged).then(|| Price::reserved(&r));
            self.settle(account, ticket, price, bytes_in, bytes_out);
            return;
        }
        let Some(t) = s.activity.as_mut().and_then(|a| a.take_ticket(ticket)) else {
            return;
        };
        let end = now.mono.max(t.start);
        if let Some(state) = s.limits.as_mut() {
            // released whatever the plan is now: one changed while the request ran must not
            // keep the reservation for ever
            state.upload.release(t.reserved_bytes);
        }
        if let (Some(scale), false) = (t.scale, s.guest) {
            // charged per request, its time times the route's multiplier, outside the session
            match ending {
                Ending::Charged => {
                    let charge = Charge {
                        scaled_ms: scaled(&t, scale, t.billed_to, end),
                        requests: i64::from(t.cost),
                        bytes_in: bytes_in as i64,
                        bytes_out: bytes_out as i64,
                        started_wall: Some(t.start_wall),
                        outside_session: true,
                        ..Charge::default()
                    };
                    self.add_charge(account.id, s, charge, now);
                }
                // what the flushes charged while the app was answering stays
                Ending::Broken => {}
                Ending::Returned => {
                    let back = scaled(&t, scale, t.start, t.billed_to);
                    self.give_back_scaled(s, back, t.start_wall);
                }
            }
            return;
        }
        if s.guest {
            // no balance and no session: only the plan's limits count, by request time
            if let Some(state) = s.limits.as_mut().filter(|_| ending == Ending::Charged) {
                let used = Used {
                    started_wall: Some(t.start_wall),
                    charge_ms: end - t.start,
                    requests: i64::from(t.cost),
                    bytes_in,
                    ended_wall: now.wall,
                    units: [0; MAX_METERS],
                };
                s.plan.limits.record(state, &used);
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
                    requests: i64::from(t.cost),
                    bytes_in: bytes_in as i64,
                    bytes_out: bytes_out as i64,
                    started_wall: Some(t.start_wall),
                    ..Charge::default()
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
                self.give_back(s, session_ms, 0, t.start_wall);
            }
            Ending::Returned => {
                let session_ms = session.retract(&a.open);
                session.sync_times(now);
                self.give_back(s, session_ms, t.billed_to - t.start, t.start_wall);
            }
        }
    }

    /// Ends a priced request: `Some(price)` charges it (its balance and units, and one
    /// request), `None` charges nothing (the gateway failed, or the answer's status is one its
    /// route does not charge). Either way its reservation is released. What it charges is
    /// what the app reported, even past the reservation (each meter's `max_per_request`
    /// bounds it): the balance may go below zero by what requests in flight report beyond
    /// their reservations, never more.
    pub fn settle(
        &self,
        account: &Arc<Account>,
        ticket: u64,
        price: Option<Price>,
        bytes_in: u64,
        bytes_out: u64,
    ) {
        let now = self.now();
        let mut guard = account.lock();
        let s = &mut *guard;
        let Some(t) = s.activity.as_mut().and_then(|a| a.take_ticket(ticket)) else {
            return;
        };
        if let Some(state) = s.limits.as_mut() {
            state.upload.release(t.reserved_bytes);
        }
        let Some(price) = price else {
            return;
        };
        // a fallback is time, and counts in the period's time allowance as time does
        let time_ms = if price.fallback { price.ms } else { 0 };
        let call = crate::store::included::one_call(t.cost, price.ms, &price.units, price.fallback);
        let waived_ms = self.waived_estimate(s, t.start_wall, &call);
        if let Some(state) = s.limits.as_mut() {
            let used = Used {
                started_wall: Some(t.start_wall),
                charge_ms: time_ms,
                requests: i64::from(t.cost),
                bytes_in,
                units: price.units,
                ended_wall: now.wall,
            };
            s.plan.limits.record(state, &used);
        }
        if s.guest {
            return;
        }
        let p = &mut s.activity().pending;
        p.charge_ms += price.ms;
        p.priced_ms += price.ms - time_ms;
        p.fixed_ms += call.fixed_ms;
        p.fixed_requests += call.fixed_requests;
        p.waived_ms += waived_ms;
        p.request_ms += time_ms;
        crate::meters::add(&mut p.units, &price.units);
        p.requests += i64::from(t.cost);
        p.bytes_in += bytes_in as i64;
        p.bytes_out += bytes_out as i64;
        if !self.thresholds.is_empty() {
            let counted = s
                .limits
                .as_ref()
                .is_some_and(|l| PeriodAllowance::counts(&l.period, Some(t.start_wall)));
            self.check_alerts(
                account.id,
                s,
                counted,
                price.ms - waived_ms,
                i64::from(t.cost),
                &price.units,
                now.wall,
            );
        }
        self.mark_dirty(account, s);
    }

    /// What of a priced call's reservation the plan's included requests and units are
    /// expected to pay, beside the calls in flight (counted as using the period's allowances
    /// first): as [`Ledger::waived_estimate`] at admission.
    fn reservation_waived(
        &self,
        s: &AccountState,
        p: &Reserve,
        cost: u32,
        reserved_units: &Units,
        now: i64,
    ) -> i64 {
        let (Some(inc), Some(state)) = (s.plan.limits.includes, s.limits.as_deref()) else {
            // a period not counted yet here: what the plan includes is whole
            return match s.plan.limits.includes {
                Some(inc) => self.waive_with(&inc, &Default::default(), p, cost),
                None => 0,
            };
        };
        let mut used = crate::store::included::PeriodUse::default();
        if now < state.period.end {
            let a = s.activity.as_deref();
            used.requests = state.period.requests + a.map_or(0, |a| a.in_flight_requests());
            for ((u, n), r) in used
                .units
                .iter_mut()
                .zip(state.period.units)
                .zip(reserved_units)
            {
                *u = n + r;
            }
        }
        self.waive_with(&inc, &used, p, cost)
    }

    fn waive_with(
        &self,
        inc: &crate::store::included::Includes,
        used: &crate::store::included::PeriodUse,
        p: &Reserve,
        cost: u32,
    ) -> i64 {
        let call = crate::store::included::one_call(cost, p.ms, &p.units, false);
        crate::store::included::waive(inc, used, &call, &self.meters).ms
    }

    /// What of a priced call's `price` (counted as `cost` requests) the plan's included
    /// requests and units are expected to pay were it charged now: what its answer says.
    pub fn plan_pays(&self, account: &Arc<Account>, cost: u32, price: &Price) -> i64 {
        let s = account.lock();
        if s.plan.limits.includes.is_none() {
            return 0;
        }
        let call = crate::store::included::one_call(cost, price.ms, &price.units, price.fallback);
        self.waived_estimate(&s, self.now().wall, &call)
    }

    /// What of a priced call (`call`, [`crate::store::included::one_call`]) the plan's
    /// included requests and units pay, as this node counts the period before it
    /// ([`crate::store::included::waive`], the store's rule): its view of the balance until
    /// the store, which decides, has committed the charge. None for a call begun in an
    /// earlier period than the one counted.
    fn waived_estimate(&self, s: &AccountState, started_wall: i64, call: &Usage) -> i64 {
        let (Some(inc), Some(state)) = (s.plan.limits.includes, s.limits.as_deref()) else {
            return 0;
        };
        if !PeriodAllowance::counts(&state.period, Some(started_wall)) {
            return 0;
        }
        let used = crate::store::included::PeriodUse {
            requests: state.period.requests,
            units: state.period.units,
        };
        crate::store::included::waive(&inc, &used, call, &self.meters).ms
    }

    /// Adds charged time to an account: its pending usage, its session's record, its plan
    /// period, and the alert thresholds it crosses. Every charge goes through here, whether a
    /// request's end or a flush charging requests still open.
    fn add_charge(&self, id: i64, s: &mut AccountState, c: Charge, now: Now) {
        let charge_ms = c.scaled_ms
            + match self.mode {
                MeteringMode::Session => c.session_ms,
                MeteringMode::RequestTime => c.request_ms,
            };
        let mut counted = false;
        if let Some(state) = s.limits.as_mut() {
            counted = PeriodAllowance::counts(&state.period, c.started_wall);
            let used = Used {
                started_wall: c.started_wall,
                charge_ms,
                requests: c.requests,
                bytes_in: c.bytes_in.max(0) as u64,
                ended_wall: now.wall,
                units: [0; MAX_METERS],
            };
            s.plan.limits.record(state, &used);
        }
        let a = s.activity();
        if let Some(session) = a.session.as_mut() {
            // a scaled request's charge and counts are outside the session
            let r = &mut session.record;
            r.charged_ms += charge_ms - c.scaled_ms;
            if !c.outside_session {
                r.requests += c.requests;
                r.bytes_in += c.bytes_in;
                r.bytes_out += c.bytes_out;
            }
        }
        let p = &mut a.pending;
        p.charge_ms += charge_ms;
        p.requests += c.requests;
        p.session_ms += c.session_ms;
        p.request_ms += c.request_ms;
        p.bytes_in += c.bytes_in;
        p.bytes_out += c.bytes_out;
        if !self.thresholds.is_empty() && (charge_ms > 0 || c.requests > 0) {
            let none = [0; MAX_METERS];
            self.check_alerts(id, s, counted, charge_ms, c.requests, &none, now.wall);
        }
    }

    /// Takes back what the flushes charged a scaled request (a `time_multiplier` route) that
    /// then ended in the gateway's failure.
    fn give_back_scaled(&self, s: &mut AccountState, back: i64, started_wall: i64) {
        if back <= 0 {
            return;
        }
        if let Some(state) = s.limits.as_mut() {
            let used = Used {
                started_wall: Some(started_wall),
                charge_ms: -back,
                ended_wall: started_wall,
                ..Used::default()
            };
            s.plan.limits.record(state, &used);
        }
        let p = &mut s.activity().pending;
        p.charge_ms -= back;
        p.returned_ms += back;
    }

    /// Takes back time charged for a request that ended uncharged: `session_ms` of session
    /// time and `request_ms` of request time (the mode picks which was charged).
    fn give_back(&self, s: &mut AccountState, session_ms: i64, request_ms: i64, started_wall: i64) {
        let back = match self.mode {
            MeteringMode::Session => session_ms,
            MeteringMode::RequestTime => request_ms,
        };
        if back <= 0 {
            return;
        }
        if let Some(state) = s.limits.as_mut() {
            let back = Used {
                started_wall: Some(started_wall),
                charge_ms: -back,
                ended_wall: started_wall,
                ..Used::default()
            };
            s.plan.limits.record(state, &back);
        }
        let a = s.activity();
        if let Some(session) = a.session.as_mut() {
            session.record.charged_ms -= back;
        }
        let p = &mut a.pending;
        p.charge_ms -= back;
        p.session_ms -= session_ms;
        p.request_ms -= request_ms;
        p.returned_ms += back;
    }

    /// Whether what a running request spends is gone, so its stream should be ended: the
    /// balance, or the plan period's time allowance of the period it began in (`started_wall`;
    /// what it uses counts there, so a stream running into the next period runs on). On
    /// several nodes, when this node's slice of either is spent: a spent slice with more left
    /// in the store is renewed at the next renewal (after the next flush) and the stream runs
    /// on meanwhile, unless the store had nothing for it a moment ago, or no grant came within
    /// [`lease::STREAM_GRACE_MS`] (the database does not answer). So a stream runs at most
    /// that long past its slice.
    pub fn exhausted(&self, account: &Arc<Account>, started_wall: i64) -> Option<Spent> {
        let mut s = account.lock();
        let now = self.clock.now_ms();
        // a stream that runs into a new period runs on what it includes
        self.renew_included(&mut s, now);
        let (what, for_good) = spent(&s, now, started_wall)?;
        if for_good || now < s.lease_retry_at {
            return Some(what);
        }
        match s.lease_wanted_at {
            Some(at) => (now - at > lease::STREAM_GRACE_MS).then_some(what),
            None => {
                s.lease_wanted_at = Some(now);
                self.wants_lease
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(account.clone());
                None
            }
        }
    }

    /// Charges every open request of the account up to `now` (called by the snapshot).
    fn charge_open(&self, id: i64, s: &mut AccountState, now: Now) {
        let Some(a) = s.activity.as_mut() else {
            return;
        };
        let Activity { open, session, .. } = &mut **a;
        let (mut session_ms, mut request_ms, mut scaled_ms) = (0, 0, 0);
        let mut earliest_wall = i64::MAX;
        for t in open
            .iter_mut()
            .filter(|t| now.mono > t.billed_to && t.priced.is_none())
        {
            earliest_wall = earliest_wall.min(t.start_wall);
            match t.scale {
                // outside the session: its time times the route's multiplier
                Some(scale) => scaled_ms += scaled(t, scale, t.billed_to, now.mono),
                None => {
                    request_ms += now.mono - t.billed_to;
                    if let Some(session) = session.as_mut() {
                        session_ms += cover(&mut session.billed, t.start, now.mono);
                    }
                }
            }
            t.billed_to = now.mono;
        }
        if session_ms == 0 && request_ms == 0 && scaled_ms == 0 {
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
            scaled_ms,
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
}

/// What a running request has spent, that ends its stream ([`Ledger::exhausted`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Spent {
    /// The balance.
    Balance,
    /// The plan period's time allowance (`period_hours`, `period_minutes`).
    Allowance,
}

/// What of the account is spent at `now` (wall ms) for a request admitted at `started_wall`,
/// and whether for good (`false`: only this node's slice of it, which the store may renew).
/// The balance first: it is what a client tops up.
fn spent(s: &AccountState, now: i64, started_wall: i64) -> Option<(Spent, bool)> {
    if s.spendable_ms() <= 0 {
        return Some((Spent::Balance, s.held_ms.is_none() || s.remaining_ms() <= 0));
    }
    let max = s.plan.limits.period.and_then(|p| p.time_ms)?;
    let period = &s.limits.as_deref()?.period;
    if now >= period.end || started_wall < period.start {
        // a new period: what a request admitted now uses counts from nothing, and one
        // admitted in the period before counts there
        return None;
    }
    if period.used_ms >= max {
        return Some((Spent::Allowance, true));
    }
    let held = s.period_held?;
    let left = held.left(period.start, s.activity.as_deref(), true);
    (left.ms <= 0).then_some((Spent::Allowance, false))
}

/// What a priced request is charged at its end: balance (ms) and units of each meter.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Price {
    pub ms: i64,
    pub units: Units,
    /// `ms` is the request's time, charged as time (a report that could not be taken): it
    /// counts in the period's time allowance, not as a price.
    pub fallback: bool,
}

impl Price {
    /// A reservation charged whole (a priced request that ended without an answer to price:
    /// the client gone, its body refused part way).
    pub fn reserved(r: &Reserve) -> Price {
        Price {
            ms: r.ms,
            units: r.units,
            fallback: false,
        }
    }
}

/// Refuses a priced request whose route's meters have no room left in the period's unit
/// allowances, the reservations of requests in flight counted as used.
fn check_units(
    caps: &Units,
    period: &PeriodUsage,
    in_flight: &Units,
    ask: &Reserve,
) -> Result<(), Denial> {
    for i in 0..MAX_METERS {
        let cap = caps[i];
        if cap <= 0 || ask.meters & (1 << i) == 0 {
            continue;
        }
        let used = period.units[i] + in_flight[i];
        if used >= cap || used + ask.units[i] > cap {
            return Err(Denial::UnitsExceeded {
                resets_at: period.end,
                meter: i as u8,
                lease_spent: false,
            });
        }
    }
    Ok(())
}

/// Several nodes: the meters of a priced request's route (bit `i` for meter `i`) whose slice
/// held here (`left` of it, in-flight reservations and unflushed units taken off) has no room
/// for the request's reservation.
fn short_of(caps: &Units, left: &Units, ask: &Reserve) -> u8 {
    (0..MAX_METERS)
        .filter(|&i| {
            caps[i] > 0 && ask.meters & (1 << i) != 0 && (left[i] <= 0 || left[i] < ask.units[i])
        })
        .fold(0, |bits, i| bits | (1 << i))
}

/// Several nodes: how many of a priced request's reservations the next lease ask may be for
/// at most, for the requests refused together for want of room in this node's slices.
const NEED_AT_ONCE: i64 = 4;

/// What a scaled request's time from `from` to `to` (monotonic ms) is charged: its time since
/// admission times the multiplier (thousandths), rounded down, less what the time before
/// `from` was; so flushes that charge it bit by bit add up to exactly the whole.
fn scaled(t: &session::Ticket, scale: i64, from: i64, to: i64) -> i64 {
    let upto = |at: i64| (at - t.start).max(0).saturating_mul(scale) / 1000;
    upto(to) - upto(from)
}

/// Time and counts added to an account by one charge.
#[derive(Clone, Copy, Debug, Default)]
struct Charge {
    session_ms: i64,
    request_ms: i64,
    /// A scaled request's time times its route's multiplier: charged whatever the mode.
    scaled_ms: i64,
    /// The end of a scaled request: its counts are not the session's.
    outside_session: bool,
    requests: i64,
    bytes_in: i64,
    bytes_out: i64,
    /// When the charged request started, for the plan period it counts in; none: the current.
    started_wall: Option<i64>,
}

#[cfg(test)]
mod tests;
