//! The store: what Tollgate keeps, behind three narrow interfaces in the product's terms.
//!
//! - [`MeterStore`]: what the proxy and the flusher need: a license's admission state by key
//!   hash, the licenses changed since a time, the commit of one flush batch, alerts and
//!   refusal counts.
//! - [`AdminStore`]: what the admin server and the CLI need, in three narrow parts that a
//!   consumer takes alone: [`LicenseStore`] (licenses and their balance changes),
//!   [`PaymentStore`] (payments and Stripe events, each step decided in [`payments`]) and
//!   [`ReportStore`] (statistics, reports and exports as typed rows).
//! - [`Operations`]: migrate, readiness, backup, and the start-up chores.
//!
//! [`Backend`] is all three; the rest of the gateway holds a [`SharedStore`] and never sees SQL.
//! The one implementation today is `sqlite::SqliteStore` (the `sqlite` feature: the binary turns
//! it on, the admin crate does not need it); records are plain data in
//! [`model`] and [`crate::records`], so a second backend implements the same methods from the
//! same types (see docs/architecture.md, "How to add a store backend").

use std::path::Path;
use std::sync::Arc;

use async_trait::async_trait;

use crate::config::{MeteringMode, Plan};
use crate::keys::KeyHash;
use crate::license::LicenseState;
use crate::periods::Calendar;
use crate::records::{AccessLog, AlertEvent, Applied, Charge, RefusedCount, Written};

pub mod books;
pub mod exports;
pub mod included;
pub mod license_keys;
pub mod model;
pub mod payments;
#[cfg(feature = "postgres")]
pub mod postgres;
pub mod rollup;
pub mod session_time;
#[cfg(feature = "sqlite")]
pub mod sqlite;
pub mod subscriptions;
pub mod usage;

pub use model::*;
#[cfg(feature = "sqlite")]
pub use sqlite::SqliteStore;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database refused or failed a statement (the backend's own words).
    #[error("{0}")]
    Backend(String),
    #[error("the store's writer has stopped")]
    WriterGone,
    #[error("not found")]
    NotFound,
    #[error("{0}")]
    Invalid(String),
    /// A debit larger than the stored balance, not allowed to take it below zero.
    #[error("the debit is larger than the balance ({balance_ms} ms)")]
    Overdraft { balance_ms: i64 },
    /// A flush's COMMIT was sent and no answer came back: it may have committed or not, and
    /// only [`MeterStore::flush_committed`] can tell.
    #[error("the commit's outcome is unknown: {0}")]
    InDoubt(String),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// The store as the running gateway holds it.
pub type SharedStore = Arc<dyn Backend>;

/// One flush: every license's charge and the access-log rows, committed in one transaction.
#[derive(Debug, Default)]
pub struct FlushBatch {
    pub charges: Vec<Charge>,
    pub logs: Vec<AccessLog>,
    /// The commit's time (Unix ms): `last_used_at`, history rows, the rollups' day.
    pub now: i64,
    /// A store several processes share: the process whose leases the charges are taken off,
    /// and whose flushes `seq` numbers (`None` on SQLite).
    pub process: Option<std::sync::Arc<Process>>,
    /// This flush's number in its process, increasing (a retry of an abandoned flush gets a
    /// new one).
    pub seq: i64,
    /// Session metering on a store several writers share (PostgreSQL): the idle timeout (ms).
    /// Each charge's session time is then what its sessions' spans change of the license's
    /// charged time (`store::session_time`), not what this node measured.
    pub session_gap_ms: Option<i64>,
    /// The configured meters, by index as `Usage::units` counts them: what `usage_units`
    /// rows are written under.
    pub meters: std::sync::Arc<[crate::config::Meter]>,
}

/// What the store did with a [`FlushBatch`]: per charge, in order, and the rows written.
#[derive(Debug, Default)]
pub struct Committed {
    pub applied: Vec<Applied>,
    pub written: Written,
}

/// What the proxy and the flusher need.
#[async_trait]
pub trait MeterStore: Send + Sync {
    /// A license by key hash, with its current plan period's usage (for admission).
    async fn admission_state(
        &self,
        key: KeyHash,
        calendar: &Calendar,
        now: i64,
    ) -> Result<Option<LicenseState>>;

    /// A license by key hash, without period usage.
    async fn license_state(&self, key: KeyHash) -> Result<Option<LicenseState>>;

    /// Licenses changed since `since` (Unix ms), for the ledger to adopt.
    async fn changed_since(&self, since: i64) -> Result<Vec<LicenseState>>;

    /// License changes as the database announces them, batch by batch, for a store that can
    /// (PostgreSQL's `LISTEN/NOTIFY`; started on the caller's runtime). `None`: polling
    /// [`MeterStore::changed_since`] is the only way. The poll stays as the fallback either way.
    fn license_changes(&self) -> Option<tokio::sync::mpsc::Receiver<Vec<LicenseState>>> {
        None
    }

    /// Commits one flush in one transaction; on an error nothing of it was written, except
    /// for [`StoreError::InDoubt`]: the COMMIT went out and its answer was lost, and
    /// [`MeterStore::flush_committed`] says which. The batch is left as it was, for the caller
    /// to recycle its buffers or retry (a backend that lost it, its writer gone, leaves it
    /// empty).
    async fn commit_flush(&self, batch: &mut FlushBatch) -> Result<Committed>;

    /// After a commit ended [`StoreError::InDoubt`]: whether flush `seq` of `process`
    /// committed, waiting for its transaction to end if the database still runs it, and making
    /// sure it never commits later. Committed: the rows of licenses `ids` as they are now
    /// (holding the flush's deductions); not: none.
    async fn flush_outcome(
        &self,
        process: &Process,
        seq: i64,
        ids: &[i64],
        now: i64,
    ) -> Result<Option<Vec<LicenseState>>> {
        let _ = (process, seq, ids, now);
        Err(StoreError::Invalid(
            "this store's commits are never in doubt".into(),
        ))
    }

    /// Records crossed thresholds once per period; returns the ones new to the store.
    async fn record_alerts(&self, events: Vec<AlertEvent>) -> Result<Vec<Alert>>;
    /// Alerts not yet delivered, created since `since`.
    async fn undelivered_alerts(&self, since: i64) -> Result<Vec<Alert>>;
    /// Notes one delivery attempt (`error` none: delivered).
    async fn alert_attempted(&self, id: i64, error: Option<String>, now: i64) -> Result<()>;

    /// Adds per-minute counts of requests refused without a known license.
    async fn record_refused(&self, counts: Vec<RefusedCount>) -> Result<()>;
    /// One bounded step of access-log retention; returns the rows deleted.
    async fn prune_access_logs(&self, before: i64) -> Result<usize>;
}

/// Licenses and their balances: what the admin service and the CLI change and read.
#[async_trait]
pub trait LicenseStore: Send + Sync {
    /// Creates a license; its key is returned once and stored only as a hash.
    async fn create_license(&self, new: NewLicense, now: i64) -> Result<(License, String)>;
    async fn license(&self, id: i64) -> Result<License>;
    /// The license one of whose active, unexpired keys has this hash (customers sign in with
    /// their key).
    async fn license_by_key(&self, key: KeyHash) -> Result<Option<License>>;
    /// A page of licenses, newest first, and the cursor of the next.
    async fn licenses(&self, filter: LicenseFilter) -> Result<(Vec<License>, Option<i64>)>;
    /// Every license, oldest first (the CLI's list).
    async fn all_licenses(&self) -> Result<Vec<License>>;
    async fn update_license(&self, id: i64, patch: LicensePatch, now: i64) -> Result<License>;
    /// A credit or debit with its history row, in one transaction.
    async fn adjust_balance(
        &self,
        id: i64,
        how: Adjustment,
        ms: i64,
        reason: Option<String>,
        now: i64,
    ) -> Result<License>;
    /// An operator's correction of a meter's units (`units`, either sign; the balance moves
    /// by `-charged_ms`, below zero too: it is usage), in one transaction with its history row
    /// (a credit or a debit whose `priced_ms` is the charge) and its `usage_units` row, so the
    /// period allowance counts it.
    async fn correct_units(&self, id: i64, fix: UnitsFix, now: i64) -> Result<License>;
    async fn revoke(&self, id: i64, now: i64) -> Result<License>;
    /// A new key for the license in place of its only active one (refused when it has
    /// several: which one is meant is for the caller to say, with `rotate_key`).
    async fn rotate(&self, id: i64, now: i64) -> Result<(License, String)>;
    /// The license's keys, oldest first, revoked ones too.
    async fn keys(&self, id: i64) -> Result<Vec<LicenseKey>>;
    /// A new key for the license (its name trimmed, not empty), returned once; the license's
    /// `keys_version` moves on, in the same transaction.
    async fn add_key(
        &self,
        id: i64,
        key: KeyTerms,
        now: i64,
    ) -> Result<(License, LicenseKey, String)>;
    /// Revokes one of the license's keys; the others work on.
    async fn revoke_key(&self, id: i64, key_id: i64, now: i64) -> Result<(License, LicenseKey)>;
    /// Replaces one of the license's keys: the old one stops working, the new one is returned
    /// once.
    async fn rotate_key(
        &self,
        id: i64,
        key_id: i64,
        now: i64,
    ) -> Result<(License, LicenseKey, String)>;
    /// Time and requests used since `start` (the plan period's usage).
    async fn period_usage(&self, id: i64, start: i64) -> Result<(i64, i64)>;
    /// A page of a license's history of `kind`, older than `before`.
    async fn history(
        &self,
        id: i64,
        kind: HistoryKind,
        limit: u32,
        before: Option<i64>,
    ) -> Result<Page>;
    async fn alerts_for_license(&self, id: i64, limit: u32) -> Result<Vec<Alert>>;
}

/// Payments and Stripe events: what the admin service records and applies, each step decided in
/// [`payments`] and applied in one transaction.
#[async_trait]
pub trait PaymentStore: Send + Sync {
    /// Records a checkout session about to be paid.
    async fn record_pending(&self, payment: NewPayment, now: i64) -> Result<Payment>;
    async fn payment_by_session(&self, session_id: String) -> Result<Option<Payment>>;
    async fn payments_for_license(
        &self,
        id: i64,
        limit: u32,
        before: Option<i64>,
    ) -> Result<Vec<Payment>>;
    /// Credits a paid session once (the success page's path; webhooks use `apply_event`).
    async fn fulfil(&self, paid: PaidSession, now: i64) -> Result<Fulfilment>;
    /// Applies a Stripe event exactly once: its effect and its id in one transaction.
    async fn apply_event(
        &self,
        event_id: String,
        event_type: String,
        action: EventAction,
        now: i64,
    ) -> Result<EventOutcome>;
    /// Records a subscription Checkout Session made for a license (the same session again
    /// changes nothing).
    async fn record_subscription_checkout(
        &self,
        checkout: subscriptions::CheckoutRow,
        now: i64,
    ) -> Result<()>;
    /// A subscription Checkout Session made here, if `session_id` is one.
    async fn subscription_checkout(
        &self,
        session_id: String,
    ) -> Result<Option<subscriptions::CheckoutRow>>;
    /// The license's newest subscription Checkout Session still open at `now`, if any.
    async fn open_subscription_checkout(
        &self,
        license_id: i64,
        now: i64,
    ) -> Result<Option<subscriptions::CheckoutRow>>;
    /// A license's subscription: the newest still live, else the newest; none if it never had
    /// one.
    async fn subscription(&self, license_id: i64) -> Result<Option<subscriptions::Subscription>>;
    /// Ends the subscriptions whose grace or paid period ran out by `now`, their licenses back
    /// on `fallback` (see [`subscriptions::end_due`]): the licenses that changed.
    async fn end_due_subscriptions(
        &self,
        fallback: String,
        calendar: Calendar,
        now: i64,
    ) -> Result<Vec<License>>;
}

/// Statistics, history for people, and exports: reads for the API's reports and the console.
#[async_trait]
pub trait ReportStore: Send + Sync {
    async fn usage_stats(&self, id: i64, days: u32, now: i64) -> Result<UsageStats>;
    async fn system_stats(&self, days: u32, now: i64) -> Result<SystemStats>;
    /// Guests' calls over the window, by day: the busiest ([`rollup::TOP_GUESTS`]), or the one
    /// named.
    async fn guest_stats(
        &self,
        days: u32,
        now: i64,
        guest: Option<String>,
    ) -> Result<Vec<GuestStats>>;
    async fn system_daily(&self, days: u32, now: i64) -> Result<Vec<DayStats>>;
    async fn recent_access(&self, id: i64, limit: u32) -> Result<Vec<AccessRow>>;
    /// Refusals without a known license since `since`: (reason, client address, requests).
    async fn refused_since(&self, since: i64, limit: u32) -> Result<Vec<(String, String, i64)>>;
    /// Streams an export in chunks to `sink` as rows are read, in constant memory; stops early
    /// when the receiver goes away.
    async fn export(
        &self,
        request: exports::ExportRequest,
        sink: tokio::sync::mpsc::Sender<bytes::Bytes>,
    ) -> Result<()>;
}

/// What the admin server and the CLI need: licenses, payments and reports.
pub trait AdminStore: LicenseStore + PaymentStore + ReportStore {}

impl<T: LicenseStore + PaymentStore + ReportStore + ?Sized> AdminStore for T {}

/// Running the store.
#[async_trait]
pub trait Operations: Send + Sync {
    /// Whether the database answers (`/ready`).
    async fn ready(&self) -> Result<()>;
    /// Ends the sessions a crash left open, at their last charged time; returns how many. On a
    /// store several processes share, only those of processes that are gone (none alive
    /// since `live_since`).
    async fn close_stale_sessions(&self, live_since: i64) -> Result<usize>;
    /// Writes the configured plans to the `plans` table.
    async fn sync_plans(&self, plans: Vec<Plan>, now: i64) -> Result<()>;
    /// Every license's money as its row, its history and its leases say it, by id (for
    /// [`books::check`]), read in one consistent snapshot.
    async fn books(&self) -> Result<Vec<books::BooksRow>>;
    /// A consistent copy of the database to a new file `dest`.
    async fn backup(&self, dest: &Path) -> Result<()>;
    /// Stops accepting writes once the queued ones are done.
    fn close(&self);
    /// Lets go of idle connections. Called when a runtime that used the store ends: a
    /// connection's driving task ends with the runtime it was made on.
    fn release_idle(&self) {}
    /// Where the data lives, for logs (never a password).
    fn describe(&self) -> String;
    /// The nodes sharing the database, for a store several nodes can share (PostgreSQL).
    fn cluster(&self) -> Option<&dyn ClusterStore> {
        None
    }
    /// The console's sign-ins, for a store several nodes can share (PostgreSQL); `None`: the
    /// admin server keeps them in memory.
    fn console(&self) -> Option<&dyn ConsoleStore> {
        None
    }
}

/// The console's sign-ins in the database, by the SHA-256 digest of the session id.
#[async_trait]
pub trait ConsoleStore: Send + Sync {
    /// Records a session valid until `expires_at`; forgets those expired by `now`.
    async fn open_console_session(&self, digest: [u8; 32], expires_at: i64, now: i64)
        -> Result<()>;
    /// Whether the session is signed in and not expired at `now`.
    async fn console_session_valid(&self, digest: [u8; 32], now: i64) -> Result<bool>;
    /// Signs the session out, with the key it held.
    async fn close_console_session(&self, digest: [u8; 32]) -> Result<()>;
    /// Signs every session out, with the keys they held.
    async fn close_all_console_sessions(&self) -> Result<()>;
    /// Keeps a sealed key for the session's next page (replacing one it held).
    async fn hold_console_key(&self, digest: [u8; 32], license: i64, sealed: Vec<u8>)
        -> Result<()>;
    /// The sealed key held for this session and license, once.
    async fn take_console_key(&self, digest: [u8; 32], license: i64) -> Result<Option<Vec<u8>>>;
}

/// Several nodes on one database: which processes are alive, and what each holds on lease.
/// Every time here is on the database's clock ([`ClusterStore::clock_ms`]), which the nodes
/// follow.
#[async_trait]
pub trait ClusterStore: Send + Sync {
    /// The database's clock (Unix ms).
    async fn clock_ms(&self) -> Result<i64>;
    /// How the database meters (mode and idle timeout, ms), one way for every process on it:
    /// what the first process to ask wrote (`proposed`, from its config), or set since by
    /// [`ClusterStore::set_metering`].
    async fn metering(&self, proposed: (MeteringMode, i64)) -> Result<(MeteringMode, i64)>;
    /// Sets how the database meters; refused while any process is alive (a heartbeat at or
    /// after `live_since`), as processes metering two ways would charge one session two ways.
    async fn set_metering(&self, to: (MeteringMode, i64), live_since: i64, now: i64) -> Result<()>;
    /// Records `node` alive at its `heartbeat_at`; gives back the leases of processes that
    /// stopped renewing (expired before `heartbeat_at`) and ends the sessions of processes gone
    /// since before `live_since`. Returns how many processes are alive (a heartbeat at or after
    /// `live_since`), this one included.
    async fn heartbeat(&self, node: &ClusterNode, live_since: i64) -> Result<usize>;
    /// Renews `process`'s leases to `until` (`None`: reads them only); returns what each of
    /// its rows holds now (a row given back meanwhile, expired, is not there).
    /// (`meters`: the names of the meters by index, as [`HeldLease::units`] counts them.)
    async fn renew(
        &self,
        process: &Process,
        meters: &[String],
        until: Option<i64>,
    ) -> Result<Vec<HeldLease>>;
    /// Takes a stopped process's row away.
    async fn leave(&self, process: &Process) -> Result<()>;
    /// Every process's row, live or not, by node id, with what each holds on lease.
    async fn nodes(&self) -> Result<Vec<(ClusterNode, i64)>>;
    /// Reserves for `process` up to the asked ms of each license's unreserved balance, and of
    /// its plan period's unreserved allowances (what is left, if less; nothing for a license
    /// not active), in one transaction, its lease on each valid until `until`. Returns a grant
    /// per license asked for that exists. Each meter's allowance (`lease_units`, by name in
    /// `meters`) is leased as the period's time and requests are.
    async fn lease(
        &self,
        process: &Process,
        meters: &[String],
        asked: &[LeaseAsk],
        until: i64,
    ) -> Result<Vec<Grant>>;
    /// Gives back everything `process` holds; returns the ms given back.
    async fn release(&self, process: &Process) -> Result<i64>;
    /// What `process` holds on lease of each of these licenses now (none: nothing).
    async fn held(&self, process: &Process, ids: &[i64]) -> Result<Vec<(i64, i64)>>;
    /// Gives back what `process`'s lease rows reserve beyond what it holds (`held`, all it
    /// holds; `books::lease_excess`), in one transaction; returns the ms of balance given back.
    async fn true_up(
        &self,
        process: &Process,
        meters: &[String],
        held: &[HeldLease],
    ) -> Result<i64>;
    /// Every process's committed units of each meter, for each (license, from, to) asked
    /// (`usage_units` rows created from `from`, before `to`): (license, meter, units).
    async fn period_units(&self, asked: &[(i64, i64, i64)]) -> Result<Vec<(i64, String, i64)>>;
    /// Every process's committed requests in the plan period from `start`, for each (license,
    /// start) asked, read whole (a usage row's requests grow while its session joins it, so
    /// they are not folded as units are): (license, requests).
    async fn period_requests(&self, asked: &[(i64, i64)]) -> Result<Vec<(i64, i64)>>;
}

/// Every interface of one store.
pub trait Backend: MeterStore + AdminStore + Operations {}
impl<T: MeterStore + AdminStore + Operations> Backend for T {}

/// Opens (creating and migrating if needed) the SQLite database at `path`.
#[cfg(feature = "sqlite")]
pub fn open_sqlite(path: &Path) -> Result<SharedStore> {
    Ok(Arc::new(SqliteStore::open(path)?))
}

/// Applies the migrations not yet applied to the database at `path`; returns how many ran.
#[cfg(feature = "sqlite")]
pub fn migrate_sqlite(path: &Path) -> Result<usize> {
    sqlite::migrate_path(path)
}
