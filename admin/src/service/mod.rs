//! What the admin side decides, once, for every driver: the API's handlers, the console's pages
//! and the CLI each parse their input, call one function here per operation, and render what it
//! returns. A function here validates its input (errors carry the field they are about), makes
//! the write in one store transaction, and tells the proxy's ledger, so no driver can forget a
//! step or check a field its own way.
//!
//! - [`licenses`]: create, list, change, credit and debit, correct units, revoke, rotate, history.
//! - [`payments`]: what is on sale, Checkout, fulfilment from the success page and from
//!   Stripe's events (the money itself is decided in `gateway::store::payments`).
//! - [`usage`]: where a license stands against its plan's limits now.
//!
//! Nothing here knows HTTP or HTML; the drivers (`crate::licenses`, `crate::payments`,
//! `crate::ui`, the binary's `keys` command) do not import one another.

use gateway::config::Config;
use gateway::ledger::Ledger;
use gateway::server::App;
use gateway::store::{AdminStore, License, LicenseStore, PaymentStore, ReportStore};

use crate::views::LicenseView;

pub mod licenses;
pub mod payments;
pub mod usage;

/// How long the answer to a change waits for a flush of its license that is being committed
/// ([`Service::settled_remaining_ms`]; a commit is far shorter, and a store that hangs must
/// not hang the answer).
pub const AFTER_CHANGE: std::time::Duration = std::time::Duration::from_secs(5);
/// As [`AFTER_CHANGE`], for a page or read that shows a license (a flush whose commit's
/// answer was lost stays in doubt for seconds: a view does not wait it out).
pub const ON_VIEW: std::time::Duration = std::time::Duration::from_secs(1);

/// What an operation may use: the store's licenses, payments and reports (not the whole backend), the
/// config, and the proxy's ledger when the gateway runs in this process (the admin server).
/// Without one (the CLI, on the database directly) a running gateway picks the changes up at
/// its next refresh.
#[derive(Clone, Copy)]
pub struct Service<'a> {
    licenses: &'a dyn LicenseStore,
    payments: &'a dyn PaymentStore,
    reports: &'a dyn ReportStore,
    config: &'a Config,
    ledger: Option<&'a Ledger>,
}

impl<'a> Service<'a> {
    /// The service of a running gateway.
    pub fn of(app: &'a App) -> Service<'a> {
        Service {
            licenses: &*app.store,
            payments: &*app.store,
            reports: &*app.store,
            config: &app.config,
            ledger: Some(&app.ledger),
        }
    }

    /// The service straight on a store, with no proxy in this process (the CLI).
    pub fn offline(store: &'a dyn AdminStore, config: &'a Config) -> Service<'a> {
        Service {
            licenses: store,
            payments: store,
            reports: store,
            config,
            ledger: None,
        }
    }

    /// The store's reports (statistics, history for people, exports): reads, decided nowhere.
    pub fn reports(&self) -> &'a dyn ReportStore {
        self.reports
    }

    pub fn config(&self) -> &'a Config {
        self.config
    }

    /// Now, by the ledger's clock when there is one (tests move it).
    pub fn now(&self) -> i64 {
        self.ledger
            .map_or_else(gateway::ledger::now_ms, |l| l.now_ms())
    }

    /// The stored balance less the usage this process has metered and not yet flushed (the
    /// ledger takes the row first, so usage a flush already wrote into it is not subtracted
    /// twice).
    pub fn live_remaining_ms(&self, l: &License) -> i64 {
        self.ledger
            .map_or(l.balance_ms, |ledger| ledger.live_remaining_ms(&l.state()))
    }

    /// [`Service::live_remaining_ms`] for a license just changed: while a flush of it is
    /// being committed the ledger holds the change back (it never counts one usage twice), so
    /// this waits for that flush to end first, at most `wait` ([`AFTER_CHANGE`],
    /// [`ON_VIEW`]), and the answer to a credit or debit shows it.
    pub async fn settled_remaining_ms(&self, l: &License, wait: std::time::Duration) -> i64 {
        if let Some(ledger) = self.ledger {
            ledger.apply(&l.state());
            let deadline = std::time::Instant::now() + wait;
            while ledger.holds_back(l.id) && std::time::Instant::now() < deadline {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        }
        self.live_remaining_ms(l)
    }

    /// [`Service::view`] for a license just changed (see [`Service::settled_remaining_ms`]).
    pub async fn settled_view(&self, l: &License, wait: std::time::Duration) -> LicenseView {
        let remaining = self.settled_remaining_ms(l, wait).await;
        LicenseView::new(l, remaining, &self.config.balance_unit)
    }

    /// The license as people are shown it, with the balance the proxy sees now.
    pub fn view(&self, l: &License) -> LicenseView {
        LicenseView::new(l, self.live_remaining_ms(l), &self.config.balance_unit)
    }

    /// [`Service::settled_view`] with what the plan still includes this period.
    pub async fn view_with_included(&self, l: &License) -> crate::error::ApiResult<LicenseView> {
        let included = self.included_left_ms(l).await?;
        Ok(self.settled_view(l, ON_VIEW).await.with_included(included))
    }

    /// What the license's plan still includes this period (none: its plan includes no time),
    /// less what the proxy has metered of it and not yet written: the live account's view
    /// when one is in memory, else the store's count of the period.
    pub async fn included_left_ms(&self, l: &License) -> crate::error::ApiResult<Option<i64>> {
        let Some(included) = self.config.plan(&l.plan).and_then(|p| p.included_ms) else {
            return Ok(None);
        };
        if let Some(account) = self.ledger.and_then(|ledger| ledger.account(l.id)) {
            if let (_, Some(left)) = account.left_ms() {
                return Ok(Some(left));
            }
        }
        let (start, _) = self
            .config
            .metering
            .calendar
            .period(l.period_anchor, self.now());
        let (used, _) = self.licenses.period_usage(l.id, start).await?;
        Ok(Some(gateway::store::included::left(included, used)))
    }

    /// Tells the proxy about a change just committed. Private to the service: every write is
    /// made here, and each one calls it.
    fn applied(&self, l: &License) {
        if let Some(ledger) = self.ledger {
            ledger.apply(&l.state());
        }
    }

    /// A new or rotated key: the proxy must not keep refusing it as unknown.
    fn key_issued(&self, l: &License) {
        if let Some(ledger) = self.ledger {
            ledger.forget_unknown(&l.key_hash);
        }
    }

    /// A key just made (added or rotated), as its holder will present it.
    fn key_made(&self, key: &str) {
        if let Some(ledger) = self.ledger {
            ledger.forget_unknown(&gateway::keys::KeyHash::of(key.as_bytes()));
        }
    }
}
