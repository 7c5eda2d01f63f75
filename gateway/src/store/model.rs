//! The store's records in the product's terms: licenses, balance changes, payments and their
//! refunds, alerts, and the reports built from the rollups. Plain data, the same for every
//! backend; the API's JSON is shaped from these in `admin`.

use crate::keys::KeyHash;
pub use crate::license::KeyLimits;
use crate::license::{LicenseState, LicenseStatus};
use crate::meters::Units;

/// A license as stored.
#[derive(Clone, Debug)]
pub struct License {
    pub id: i64,
    pub key_hash: KeyHash,
    pub key_prefix: String,
    pub name: String,
    pub email: Option<String>,
    pub company: Option<String>,
    pub plan: String,
    pub status: LicenseStatus,
    pub balance_ms: i64,
    pub used_ms: i64,
    pub requests_total: i64,
    pub version: i64,
    pub expires_at: Option<i64>,
    pub created_at: i64,
    pub updated_at: i64,
    pub last_used_at: Option<i64>,
    /// Grows with every change to the license's keys.
    pub keys_version: i64,
    /// Where its plan periods are counted from, monthly: its creation, or the start of the
    /// billing period its subscription last paid.
    pub period_anchor: i64,
}

/// One of a license's keys (`license_keys`): the key itself is never stored, only its hash
/// and this display prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LicenseKey {
    pub id: i64,
    pub license_id: i64,
    pub key_prefix: String,
    pub name: String,
    pub status: LicenseStatus,
    /// When the key stops working (Unix ms); its license and sibling keys work on.
    pub expires_at: Option<i64>,
    /// Its own limits, checked beside the license's plan.
    pub limits: KeyLimits,
    /// Its newest request (Unix ms), as the per-key rollup has it (written by the flushes).
    pub last_used_at: Option<i64>,
    pub created_at: i64,
    pub updated_at: i64,
}

/// What a new key of a license starts with.
#[derive(Clone, Debug, Default)]
pub struct KeyTerms {
    pub name: String,
    pub expires_at: Option<i64>,
    pub limits: KeyLimits,
}

/// What a new license starts with.
#[derive(Clone, Debug, Default)]
pub struct NewLicense {
    pub name: String,
    pub email: Option<String>,
    pub company: Option<String>,
    pub plan: String,
    /// The initial credit, recorded as a `credit` history row.
    pub balance_ms: i64,
    pub expires_at: Option<i64>,
}

/// Balance changes made by people or payments (usage is written by the flusher).
///
/// A debit (`POST /api/licenses/{id}/usage`, the console's "Deduct hours") counts against the
/// balance only: it is a correction made by hand, not time the app served, so it is not time
/// used, not in the plan's period allowances and not in the daily usage; the statistics show
/// it on its own (`debited_ms`). It may not take the balance below zero unless the operator
/// says so ([`Adjustment::DebitPastZero`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Adjustment {
    Credit,
    /// Refused if it would take the stored balance below zero.
    Debit,
    /// A debit the operator allows to take the balance below zero.
    DebitPastZero,
}

impl Adjustment {
    /// The history row's kind.
    pub fn kind(self) -> &'static str {
        match self {
            Adjustment::Credit => "credit",
            Adjustment::Debit | Adjustment::DebitPastZero => "debit",
        }
    }

    /// What an adjustment of `ms` changes a stored balance of `balance_ms` by, or why it is
    /// refused: the one rule both stores apply, inside the transaction that holds the row.
    pub fn delta(self, ms: i64, balance_ms: i64) -> Result<i64, crate::store::StoreError> {
        if ms <= 0 {
            return Err(crate::store::StoreError::Invalid(
                "hours must be positive".into(),
            ));
        }
        match self {
            Adjustment::Credit => Ok(ms),
            Adjustment::Debit if ms > balance_ms => {
                Err(crate::store::StoreError::Overdraft { balance_ms })
            }
            Adjustment::Debit | Adjustment::DebitPastZero => Ok(-ms),
        }
    }
}

/// An operator's correction of a meter's units ([`crate::store::AdminStore::correct_units`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnitsFix {
    pub meter: String,
    /// Units added (charged) or, negative, given back.
    pub units: i64,
    /// What they cost at the meter's price: taken from the balance (given back if negative).
    /// On a plan that includes the meter's units, the store sets it to what the balance pays
    /// beside the allowance ([`UnitsFix::split`]).
    pub charged_ms: i64,
    pub reason: Option<String>,
    /// The license's plan includes units of the meter: the correction is split against the
    /// period's use, as a flush's units are.
    pub included: Option<FixIncluded>,
    /// What of `units` the plan's allowance took (given back if negative), once split.
    pub included_units: i64,
}

/// What a plan includes of the corrected meter, and the period it counts in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FixIncluded {
    pub period_start: i64,
    /// The units the plan includes each period.
    pub units: i64,
    /// The meter's price per unit (ms).
    pub price_ms: i64,
}

impl UnitsFix {
    /// Splits the correction against the period's units used before it (read by the store
    /// in the correction's transaction, the license locked): added units are taken from what
    /// the plan still includes first, and units given back return to the allowance what the
    /// period's use falling back frees of it, the balance only the rest
    /// ([`crate::store::included::split`]): a correction never credits what the plan paid.
    pub fn split(&mut self, used: i64) {
        if let Some(inc) = self.included {
            let s = crate::store::included::split(inc.units, used, self.units);
            self.included_units = s.included_ms;
            self.charged_ms = s.balance_ms.saturating_mul(inc.price_ms);
        }
    }
    /// The history row's kind: money given back is a credit.
    pub fn kind(&self) -> &'static str {
        // (units given back are a credit, also when the plan's allowance takes them all)
        if self.charged_ms < 0 || (self.charged_ms == 0 && self.units < 0) {
            "credit"
        } else {
            "debit"
        }
    }

    /// The history row's reason: the units, and the operator's words.
    pub fn reason_text(&self) -> String {
        let sign = if self.units > 0 { "+" } else { "" };
        match &self.reason {
            Some(r) => format!("units {}{sign}{}: {r}", self.meter, self.units),
            None => format!("units {}{sign}{}", self.meter, self.units),
        }
    }
}

impl License {
    /// The part of the row the ledger keeps.
    pub fn state(&self) -> LicenseState {
        LicenseState {
            id: self.id,
            key_hash: self.key_hash,
            key_id: 0,
            keys_version: self.keys_version,
            plan: self.plan.clone(),
            status: self.status,
            expires_at: self.expires_at,
            balance_ms: self.balance_ms,
            version: self.version,
            period_anchor: self.period_anchor,
            period: None,
            topup: None,
            today: None,
            period_units: Vec::new(),
            key_rules: None,
            period_used: None,
        }
    }
}

/// Changes to a license's details; `None` leaves a field as it is, `Some(None)` clears it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LicensePatch {
    pub name: Option<String>,
    pub email: Option<Option<String>>,
    pub company: Option<Option<String>>,
    pub plan: Option<String>,
    pub expires_at: Option<Option<i64>>,
    pub status: Option<LicenseStatus>,
}

/// A checkout session about to be paid.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewPayment {
    pub license_id: i64,
    pub session_id: String,
    pub package_id: Option<String>,
    pub hours_ms: i64,
    pub amount_cents: i64,
    pub currency: String,
}

/// A `payment_history` row.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Payment {
    pub id: i64,
    pub license_id: i64,
    pub session_id: String,
    pub payment_intent: Option<String>,
    pub package_id: Option<String>,
    pub hours_ms: i64,
    pub amount_cents: i64,
    pub currency: String,
    pub status: String,
    pub refunded_cents: i64,
    pub refunded_ms: i64,
    pub created_at: i64,
    pub paid_at: Option<i64>,
    /// What Stripe said was paid, once fulfilled.
    pub paid_cents: Option<i64>,
    pub paid_currency: Option<String>,
    /// The time credited for it: the hours bought, or fewer when less was paid.
    pub credited_ms: Option<i64>,
    /// Why what was paid differs from what was priced, when it does (for the operator).
    pub mismatch: Option<String>,
}

impl Payment {
    /// The amount refunds are a share of: what Stripe charged (rows fulfilled before that was
    /// recorded: what was priced).
    pub fn charged_cents(&self) -> i64 {
        self.paid_cents.unwrap_or(self.amount_cents)
    }

    /// The time refunds take a share of: what was credited.
    pub fn credited(&self) -> i64 {
        self.credited_ms.unwrap_or(self.hours_ms)
    }
}

/// What Stripe says about a checkout session that has been paid.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PaidSession {
    pub session_id: String,
    pub payment_intent: Option<String>,
    /// From the session's metadata, used only when no pending row exists (the row's values,
    /// priced here, win when it does).
    pub license_id: Option<i64>,
    pub hours_ms: Option<i64>,
    pub package_id: Option<String>,
    /// What Stripe charged (`amount_total`, `currency`).
    pub amount_cents: i64,
    pub currency: String,
    /// The configured price of the metadata's hours, for a session without a pending row
    /// (the caller prices it from the config); none: it cannot be priced, and nothing is
    /// credited for it.
    pub priced: Option<(i64, String)>,
}

/// What fulfilment did.
#[derive(Clone, Debug)]
pub enum Fulfilment {
    /// This call fulfilled the payment: `credited_ms` were added (the hours bought, less what
    /// was not paid for and what was refunded before it completed).
    Credited {
        license: Box<License>,
        payment: Box<Payment>,
        credited_ms: i64,
    },
    /// Someone else already did; nothing changed.
    AlreadyPaid(Box<Payment>),
    /// Not a Tollgate session (no payment row, no license in its metadata): another product
    /// sold through the same Stripe account. Nothing changed.
    NotOurs,
}

/// A refund reported by Stripe for the charge of a payment intent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refund {
    pub payment_intent: String,
    /// The charge's total refunded so far (Stripe reports a running total).
    pub amount_refunded_cents: i64,
}

/// What a refund did.
#[derive(Clone, Debug)]
pub enum Refunded {
    /// This much was debited now.
    Debited {
        license: Box<License>,
        debited_ms: i64,
    },
    /// No paid payment has this intent yet: the refund is kept, and the fulfilment that comes
    /// later credits only the unrefunded share.
    Held,
    /// Already accounted for.
    Nothing,
    /// The refund of a subscription's invoice: it takes nothing back (the plan runs to the end
    /// of the period paid; see `store::subscriptions`).
    OfSubscription,
}

/// What a Stripe event asks of the books.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum EventAction {
    Fulfil(PaidSession),
    Refund(Refund),
    /// A subscription's event, with the rules it is applied under.
    Subscription(Box<SubscriptionAction>),
    /// Acknowledged and recorded, nothing else (unknown types, unpaid sessions).
    Ignore(&'static str),
}

/// A subscription event and what the config says of it (`store::subscriptions`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubscriptionAction {
    pub event: crate::store::subscriptions::SubscriptionEvent,
    /// `payments.grace_days`, in ms.
    pub grace_ms: i64,
    /// The plan a license falls back to.
    pub fallback: String,
    pub calendar: crate::periods::Calendar,
}

/// What a subscription event did.
#[derive(Clone, Debug)]
pub struct Subscribed {
    pub label: &'static str,
    /// The license, when its plan or period anchor changed.
    pub license: Option<Box<License>>,
}

/// What processing an event did.
#[derive(Clone, Debug)]
pub enum EventOutcome {
    /// The event id was seen before: nothing done.
    Duplicate,
    Fulfilled(Fulfilment),
    Refunded(Refunded),
    Subscription(Subscribed),
    Ignored(&'static str),
}

impl EventOutcome {
    /// The `result` label for metrics and the `stripe_events` row.
    pub fn label(&self) -> &'static str {
        match self {
            EventOutcome::Duplicate => "duplicate",
            EventOutcome::Fulfilled(Fulfilment::Credited { .. }) => "credited",
            EventOutcome::Fulfilled(Fulfilment::AlreadyPaid(_)) => "already_paid",
            EventOutcome::Fulfilled(Fulfilment::NotOurs) => "not_ours",
            EventOutcome::Refunded(Refunded::Debited { .. }) => "refunded",
            EventOutcome::Refunded(Refunded::Held) => "refund_held",
            EventOutcome::Refunded(Refunded::Nothing) => "refund_noop",
            EventOutcome::Refunded(Refunded::OfSubscription) => "subscription_refund",
            EventOutcome::Subscription(s) => s.label,
            EventOutcome::Ignored(why) => why,
        }
    }

    /// The license whose balance changed, if any.
    pub fn changed(&self) -> Option<&License> {
        match self {
            EventOutcome::Fulfilled(Fulfilment::Credited { license, .. })
            | EventOutcome::Refunded(Refunded::Debited { license, .. })
            | EventOutcome::Subscription(Subscribed {
                license: Some(license),
                ..
            }) => Some(license),
            _ => None,
        }
    }
}

/// A license's usage over a window.
#[derive(Clone, Debug, PartialEq)]
pub struct UsageStats {
    pub days: u32,
    pub calls: i64,
    pub ok: i64,
    pub used_ms: i64,
    /// Time deducted by hand in the window (debits: a correction of the balance, not time
    /// used; see [`Adjustment`]).
    pub debited_ms: i64,
    /// The busiest (path, method, status class) with their call counts, busiest first.
    pub top_endpoints: Vec<EndpointStats>,
    /// Request latency quantiles (ms), estimated from the rollup's histogram.
    pub p50_ms: Option<f64>,
    pub p95_ms: Option<f64>,
    /// One entry per UTC day with calls or usage, oldest first.
    pub daily: Vec<DayStats>,
    /// Units of each meter charged in the window (`usage_units`), by meter name.
    pub meters: Vec<MeterStats>,
    /// Calls by each of the license's keys in the window, busiest first, from the access log
    /// (what it still holds: `storage.access_log_retention_days`).
    pub keys: Vec<KeyStats>,
}

/// One key's calls over a window.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyStats {
    pub key_id: i64,
    /// The key's name (none: a key since deleted).
    pub name: Option<String>,
    pub calls: i64,
    /// Calls answered with a status below 400.
    pub ok: i64,
    /// The request time of its calls (ms).
    pub duration_ms: i64,
}

/// A meter's units charged over a window, and the balance they took.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MeterStats {
    pub meter: String,
    pub units: i64,
    pub charged_ms: i64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DayStats {
    pub day: i64,
    pub calls: i64,
    pub ok: i64,
    pub charged_ms: i64,
}

/// The whole gateway over a window.
#[derive(Clone, Debug, PartialEq)]
pub struct SystemStats {
    pub days: u32,
    /// Licenses with at least one call in the window.
    pub active_licenses: i64,
    pub licensed_calls: i64,
    pub licensed_ok: i64,
    pub guest_calls: i64,
    pub guest_ok: i64,
    pub charged_ms: i64,
    /// Time deducted by hand in the window (see [`Adjustment`]).
    pub debited_ms: i64,
    /// Paid minus refunded, by currency, for payments paid in the window.
    pub revenue: Vec<(String, i64, i64)>,
    /// (id, name, plan, charged ms, requests), by time charged.
    pub top_licenses: Vec<(i64, String, String, i64, i64)>,
    /// (plan, licenses, active licenses, charged ms in the window).
    pub plans: Vec<(String, i64, i64, i64)>,
    /// Units of each meter charged in the window, everyone together.
    pub meters: Vec<MeterStats>,
    /// The busiest (path, method, status class), licenses and guests together.
    pub top_endpoints: Vec<EndpointStats>,
}

/// Calls to one path with one method answered with one status class, over a window.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EndpointStats {
    pub path: String,
    pub method: String,
    /// The status divided by 100 (2: 2xx); 0: no answer was written.
    pub class: i16,
    pub calls: i64,
}

/// One guest's calls over a window, and by day.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GuestStats {
    pub guest: String,
    pub calls: i64,
    /// Answered with a status below 400.
    pub ok: i64,
    pub bytes_in: i64,
    pub bytes_out: i64,
    /// Oldest first.
    pub daily: Vec<GuestDay>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuestDay {
    pub day: i64,
    pub calls: i64,
    pub ok: i64,
    pub bytes_in: i64,
    pub bytes_out: i64,
}

/// One access-log row, as the console lists it.
#[derive(Clone, Debug, PartialEq)]
pub struct AccessRow {
    pub ts: i64,
    pub method: String,
    pub path: String,
    pub status: i64,
    pub outcome: String,
    pub duration_us: i64,
}

/// Which history a page shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HistoryKind {
    /// Every balance change: usage, credits, debits, purchases, refunds.
    All,
    /// Usage deductions only.
    Usage,
    /// Stripe payments.
    Payments,
    /// Metered sessions.
    Sessions,
}

impl HistoryKind {
    pub fn parse(s: &str) -> Option<HistoryKind> {
        Some(match s {
            "all" => HistoryKind::All,
            "usage" => HistoryKind::Usage,
            "payments" => HistoryKind::Payments,
            "sessions" => HistoryKind::Sessions,
            _ => return None,
        })
    }
}

/// One page of history, newest first; `next_before` is the cursor for the next (older) page.
#[derive(Clone, Debug, PartialEq)]
pub struct Page {
    pub items: Vec<HistoryItem>,
    pub next_before: Option<i64>,
}

impl Page {
    /// A page of `rows` (cursor, item) that asked for `limit`: a full page may have more.
    pub fn from_rows(rows: Vec<(i64, HistoryItem)>, limit: u32) -> Page {
        let next_before = (rows.len() == limit as usize)
            .then(|| rows.last().map(|(id, _)| *id))
            .flatten();
        Page {
            items: rows.into_iter().map(|(_, v)| v).collect(),
            next_before,
        }
    }
}

/// One entry of a license's history.
#[derive(Clone, Debug, PartialEq)]
pub enum HistoryItem {
    /// A `usage_history` row: usage, a credit or debit, a purchase or a refund.
    Change(BalanceChange),
    Payment(Payment),
    Session(SessionRow),
}

/// A balance change as recorded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BalanceChange {
    pub id: i64,
    pub kind: String,
    pub delta_ms: i64,
    pub balance_after_ms: i64,
    pub requests: i64,
    pub reason: Option<String>,
    pub created_at: i64,
}

/// A metered session as recorded (open while `ended_at` is none).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionRow {
    pub id: String,
    pub started_at: i64,
    pub last_activity_at: i64,
    pub ended_at: Option<i64>,
    pub charged_ms: i64,
    pub requests: i64,
    pub bytes_in: i64,
    pub bytes_out: i64,
}

/// Which licenses a list shows.
#[derive(Clone, Debug, Default)]
pub struct LicenseFilter {
    pub status: Option<String>,
    pub plan: Option<String>,
    /// Matches a substring of the name, email or company, or the start of the key prefix.
    pub search: Option<String>,
    /// Only ids below this (the cursor from the previous page).
    pub before: Option<i64>,
    pub limit: u32,
}

/// A recorded alert.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Alert {
    pub id: i64,
    pub license_id: i64,
    pub kind: String,
    pub threshold_percent: i64,
    pub period_start: i64,
    pub used: i64,
    pub allowance: i64,
    pub created_at: i64,
    pub attempts: i64,
    pub delivered_at: Option<i64>,
}

/// One process of a gateway node sharing the database: the node's id, and the incarnation that
/// tells this process from any other that runs or ran under the same id (a restart, the other
/// side of a graceful upgrade). What a process reserves, opens and flushes is its own.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Process {
    /// `[cluster] node_id`: unique per process by default.
    pub node_id: String,
    /// The process's start (Unix ms) and a random tag.
    pub incarnation: String,
}

impl Process {
    /// A new incarnation of `node_id`, started at `started_at`.
    pub fn new(node_id: &str, started_at: i64) -> Process {
        let tag: u32 = rand::random();
        Process {
            node_id: node_id.to_string(),
            incarnation: format!("{started_at}-{tag:08x}"),
        }
    }
}

impl Process {
    /// How the database names this process (migration 0009): `<node_id>#<incarnation>`.
    pub fn key(&self) -> String {
        format!("{}#{}", self.node_id, self.incarnation)
    }

    /// The process a database key names (a plain node id: a process of an earlier build).
    pub fn from_key(key: &str) -> Process {
        let (node_id, incarnation) = key.rsplit_once('#').unwrap_or((key, ""));
        Process {
            node_id: node_id.to_string(),
            incarnation: incarnation.to_string(),
        }
    }
}

impl std::fmt::Display for Process {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.node_id, self.incarnation)
    }
}

/// One gateway process sharing the database (`cluster_nodes`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterNode {
    pub process: Process,
    /// Where its proxy and admin server listen, as configured.
    pub proxy: String,
    pub admin: String,
    /// The build it runs (`CARGO_PKG_VERSION`).
    pub version: String,
    pub started_at: i64,
    pub heartbeat_at: i64,
}

/// What a node asks to reserve of one license: a slice of its balance, and of its plan
/// period's allowances when the plan has any.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LeaseAsk {
    pub license_id: i64,
    /// Of the balance (0: none wanted).
    pub ms: i64,
    pub period: Option<PeriodAsk>,
    /// On a plan that includes time: the period the node is in (by its start) and what the
    /// plan includes in it. Slices of the balance are then granted from the balance and what
    /// the period still includes together (`store::included`), the period counted again from
    /// the usage history when the node is the first in it.
    pub included: Option<IncludedAsk>,
}

/// The included allowance a lease ask is for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IncludedAsk {
    pub start: i64,
    pub ms: i64,
}

/// A slice of a plan period's allowances: the period (by its start, as the node's calendar
/// computes it), the plan's allowances in it, and how much of each is asked for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeriodAsk {
    pub start: i64,
    pub max_ms: Option<i64>,
    pub max_requests: Option<i64>,
    pub ms: i64,
    pub requests: i64,
    /// Each meter's allowance (`period_units`; 0: none), by index as the ledger counts
    /// meters, and the units asked of each.
    pub max_units: Units,
    pub units: Units,
}

/// What a process holds of one license's lease, in memory or in its row: of the balance, and
/// of the plan period that began at `period_start`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HeldLease {
    pub license_id: i64,
    pub ms: i64,
    pub period_start: i64,
    pub period_ms: i64,
    pub period_requests: i64,
    /// Of each meter's allowance in the period (`lease_units`), by index.
    pub units: Units,
}

/// What a lease request got for one license.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Grant {
    pub license_id: i64,
    /// Reserved by this request (0: nothing unreserved was left).
    pub granted_ms: i64,
    /// What the node now holds of the license in all.
    pub held_ms: i64,
    /// Of the period's allowances, when asked for.
    pub period: Option<PeriodGrant>,
}

/// What a lease request got of a plan period's allowances.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeriodGrant {
    /// The period it is of (the one asked for; nothing is granted of an older one).
    pub start: i64,
    pub ms: i64,
    pub requests: i64,
    /// What every node's committed flushes used of the period so far.
    pub used_ms: i64,
    pub used_requests: i64,
    /// Of each meter's allowance, by index: granted, and what every node's committed flushes
    /// used of it (known only for the meters asked for).
    pub units: Units,
    pub used_units: Units,
}
