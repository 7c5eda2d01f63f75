//! Configuration: the TOML file is read into a table, walked key by key into the runtime
//! [`Config`], and every problem is collected so `check-config` (and `serve`) can name them all at
//! once. Unknown keys are errors too: a typo must not silently fall back to a default.
//!
//! Secrets never come from this file; they are read from the environment by the binary.

use std::collections::BTreeSet;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::{Table, Value};

mod alerts;
mod cluster;
mod listeners;
mod log;
mod metering;
mod meters;
mod payments;
mod plans;
mod proxy;
mod section;
mod storage;

pub use meters::{ChargeMode, Meter, ReportFrom, Route, ALL_STATUSES, BUILT_IN_METERS};

use section::Section;

/// The HTTPS listener.
#[derive(Clone, Debug)]
pub struct TlsListener {
    pub listen: SocketAddr,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// A connection's TLS handshake must end within this (`tls_handshake_timeout_ms`); it
    /// holds its connection place from its accept.
    pub handshake_timeout: Duration,
}

/// How a request picks one of several upstreams (`proxy.balance`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Balance {
    /// In turn.
    RoundRobin,
    /// By license (consistent hashing): a customer stays on one instance while it is up.
    HashLicense,
}

/// How a key's time is charged (`metering.mode`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MeteringMode {
    /// From a session's first request start to its last request end; a session closes after
    /// `idle_timeout` without requests.
    Session,
    /// The sum of request durations.
    RequestTime,
}

impl MeteringMode {
    /// As `metering.mode` spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            MeteringMode::Session => "session",
            MeteringMode::RequestTime => "request_time",
        }
    }

    /// From `metering.mode`'s spelling.
    pub fn parse(s: &str) -> Option<MeteringMode> {
        match s {
            "session" => Some(MeteringMode::Session),
            "request_time" => Some(MeteringMode::RequestTime),
            _ => None,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Config {
    pub proxy: ProxyConfig,
    pub admin: AdminConfig,
    pub metrics: MetricsConfig,
    pub storage: StorageConfig,
    pub metering: MeteringConfig,
    pub payments: PaymentsConfig,
    pub packages: Vec<Package>,
    pub plans: Vec<Plan>,
    /// Units the app reports (`[[meters]]`), in the file's order.
    pub meters: Vec<Meter>,
    /// How each path is charged: `[[routes]]`, then `proxy.free_paths` as free routes.
    pub routes: Vec<Route>,
    /// How a balance is shown to people (`[display]`).
    pub balance_unit: crate::display::BalanceUnit,
    pub stripe: StripeConfig,
    pub alerts: AlertsConfig,
    pub cluster: ClusterConfig,
    pub log: LogConfig,
}

/// Several nodes on one PostgreSQL database (`[cluster]`); nothing of it runs on SQLite.
#[derive(Clone, Debug)]
pub struct ClusterConfig {
    /// This node's name in `cluster_nodes`: `<hostname>-<pid>` unless set, so unique per
    /// process.
    pub node_id: String,
    /// How often the node writes its heartbeat.
    pub heartbeat_interval: Duration,
    /// A node whose heartbeat is older than this is taken for dead.
    pub node_timeout: Duration,
    /// The slice of a balance a node reserves at a time (ms); of a period's time allowance
    /// too, but no more than a quarter of the node's share of it.
    pub lease_ms: u64,
    /// The slice of a period's request allowance a node reserves at a time, but no more than
    /// a quarter of the node's share of it.
    pub lease_requests: u64,
    /// How long a lease lasts unless its node's heartbeat renews it: a dead node's slices come
    /// back after this.
    pub lease_lifetime: Duration,
}

/// Logging (`[log]`): written to stderr.
#[derive(Clone, Debug)]
pub struct LogConfig {
    /// One JSON object per line (`json`), or text for people (`text`).
    pub json: bool,
    /// A tracing filter (`info`, `warn,gateway=debug`); `RUST_LOG` overrides it.
    pub level: String,
}

/// Usage alerts (`[alerts]`).
#[derive(Clone, Debug)]
pub struct AlertsConfig {
    /// Percentages of the period allowance and of the prepaid balance that raise an alert when
    /// crossed, ascending.
    pub thresholds: Vec<u8>,
    /// Where alert events are POSTed (signed with `TOLLGATE_ALERT_SECRET`); none: rows only.
    pub webhook_url: Option<String>,
    /// Delivery attempts per alert, with backoff doubling from one second.
    pub max_attempts: u32,
}

#[derive(Clone, Debug)]
pub struct ProxyConfig {
    pub listen: SocketAddr,
    /// HTTPS: where to listen, and the certificate chain and key (PEM files). HTTP/2 is offered
    /// by ALPN there.
    pub tls: Option<TlsListener>,
    /// Connect to the upstreams over TLS, verifying their certificates.
    pub upstream_tls: bool,
    /// Speak HTTP/2 to the upstreams (h2c without TLS, ALPN `h2` with it): what an app's
    /// usage trailers need (`report_from = "trailer"`). WebSocket upgrades do not cross it.
    pub upstream_h2: bool,
    /// The name sent in SNI and checked against the upstream's certificate.
    pub upstream_sni: Option<String>,
    /// A PEM file of CA certificates to trust for upstreams (besides the system's).
    pub upstream_ca: Option<PathBuf>,
    /// `host:port` of each instance of the app behind the gateway (`upstream`, a string or a
    /// list).
    pub upstreams: Vec<String>,
    /// How a request picks an instance when there are several.
    pub balance: Balance,
    /// How often each instance is probed (a TCP connect); none: never, all are used.
    pub health_check_interval: Option<Duration>,
    /// Upstream timeouts: connecting, between reads, between writes, and how long an idle
    /// pooled connection is kept.
    pub upstream_connect_timeout: Duration,
    pub upstream_read_timeout: Duration,
    pub upstream_write_timeout: Duration,
    pub upstream_idle_timeout: Duration,
    /// Downstream timeouts: a request's whole head (from the accept, after the TLS handshake
    /// over HTTPS, or from its first byte on a kept-alive connection: a slowloris client is cut
    /// off after this), between reads of a request's body, between writes of a response, and an
    /// idle kept-alive connection (an HTTP/2 one with no request in flight too).
    /// None (`0`): no deadline of Tollgate's on heads, only Pingora's per read.
    pub downstream_header_timeout: Option<Duration>,
    pub downstream_read_timeout: Duration,
    pub downstream_write_timeout: Duration,
    pub downstream_keepalive_timeout: Duration,
    /// Requests whose request line and headers together are larger than this are refused with
    /// 431 before anything else is done with them.
    pub max_header_bytes: usize,
    /// Client connections open at once (kept within 3/8 of the descriptor limit); past this, a
    /// new one is closed as soon as it is accepted.
    pub max_connections: usize,
    /// Client connections open at once from one address.
    pub max_connections_per_client: usize,
    /// Requests one client may have in flight to the app at once (an HTTP/2 connection
    /// carries many; each may hold an upstream socket), within a quarter of the upstream
    /// sockets' share of the descriptor limit; past it, 429 `concurrency_limit`.
    pub max_in_flight_per_client: usize,
    /// Streams an HTTP/2 client connection may have open at once.
    pub h2_max_concurrent_streams: u32,
    /// Paths served without a key and without metering. An entry ending in `*` is a prefix.
    pub free_paths: Vec<String>,
    /// The response header the app reports units in (lower case); never passed on, either way.
    pub usage_header: String,
    pub strip_key: bool,
    pub threads: usize,
    pub cache_capacity: u64,
    pub negative_cache_ttl: Duration,
    /// Lookups that find nothing (made-up keys, cookies, checkout sessions) the database is
    /// asked for at most, a second, in all (`crate::lookups`); 0: no budget.
    pub unknown_lookups_per_second: u64,
    pub grace_period_s: u64,
    pub graceful_shutdown_timeout_s: u64,
    pub upstream_keepalive_pool: usize,
    /// Shown in `insufficient_balance` errors so a customer knows where to buy hours.
    pub purchase_url: Option<String>,
    /// Tell the client where it stands on each answer (`X-Usage-Session`,
    /// `X-Balance-Remaining-Seconds`, `X-Included-Remaining-Seconds`).
    pub response_headers: bool,
    /// `anonymous = "guest"`: requests without a key are metered per client under the `guest`
    /// plan instead of being refused (`"reject"`, the default).
    pub guests: bool,
    /// Identify guests by their `X-Guest-ID` header instead of their IP address (only behind
    /// something that sets it and strips the client's own).
    pub trust_guest_header: bool,
    /// Load balancers whose `X-Forwarded-For` (and `-Proto`, `-Host`) are believed: the
    /// client of a request from one of them is the address it forwarded.
    pub trusted_proxies: crate::forwarded::TrustedProxies,
}

#[derive(Clone, Debug)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    /// Serve the admin listener over HTTPS with this PEM certificate chain and key.
    pub tls: Option<TlsFiles>,
    pub limits: ListenerLimits,
    /// Load balancers in front of the admin listener, whose `X-Forwarded-For` names the
    /// client (the wrong-token throttle and the connection caps count clients by it);
    /// `[proxy] trusted_proxies` unless set.
    pub trusted_proxies: crate::forwarded::TrustedProxies,
}

/// What one client may hold of a side listener (admin, metrics).
#[derive(Clone, Copy, Debug)]
pub struct ListenerLimits {
    /// A request's head must arrive within this, counted from the connection's start (after its
    /// TLS handshake) or from the end of the previous answer: a silent or idle connection is
    /// closed after it.
    pub header_timeout: Duration,
    /// Connections open at once, and from one client address; past either, a new one is
    /// closed as soon as it is accepted.
    pub max_connections: usize,
    pub max_connections_per_client: usize,
}

/// A PEM certificate chain and its private key.
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Clone, Debug)]
pub struct MetricsConfig {
    pub listen: SocketAddr,
    pub limits: ListenerLimits,
}

#[derive(Clone, Debug)]
pub struct StorageConfig {
    /// Which database holds the data: SQLite at `path` (the default), or PostgreSQL.
    pub backend: StoreKind,
    pub path: PathBuf,
    /// PostgreSQL's URL without a password (`TOLLGATE_DATABASE_URL`, which may hold one, wins).
    pub url: Option<String>,
    /// CA certificates (PEM) trusted for PostgreSQL's TLS certificate, beside the system's.
    pub ca_file: Option<PathBuf>,
    pub flush_interval: Duration,
    pub log_queue_capacity: usize,
    pub access_log_retention_days: u32,
    /// Access-log rows written per second for requests refused without a known license; the
    /// rest are counted (metrics and `refused_minutes`), not written.
    pub unauthenticated_log_rows_per_s: u32,
    /// Which requests get a row of their own in `access_logs` (`access_log`); every request
    /// counts in the daily rollups whatever this says.
    pub access_log: AccessLogRows,
    /// How often the gateway polls SQLite for license changes made by other processes.
    pub refresh_interval: Duration,
    /// PostgreSQL: how long to wait on the database before a call counts as failed.
    pub timeouts: DbTimeouts,
}

/// `[storage] access_log`: which requests are written to `access_logs` row by row.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AccessLogRows {
    /// Every request (the default).
    #[default]
    All,
    /// Refusals, failures and answers of 400 and above only.
    Errors,
    /// Those, and one in N of the rest.
    Sample(u32),
}

impl AccessLogRows {
    /// Whether a request that ended with `status` and `outcome` gets its row; `nth` counts
    /// the requests seen (for a sample).
    pub fn keeps(self, status: u16, outcome: &str, nth: u64) -> bool {
        let error = status >= 400 || status == 0 || !matches!(outcome, "ok" | "free");
        match self {
            AccessLogRows::All => true,
            AccessLogRows::Errors => error,
            AccessLogRows::Sample(n) => error || nth.is_multiple_of(u64::from(n.max(1))),
        }
    }
}

/// `[storage]`'s PostgreSQL timeouts (`connect_timeout_ms`, `statement_timeout_ms`,
/// `keepalive_timeout_ms`, `pool_timeout_ms`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DbTimeouts {
    pub connect: Duration,
    pub statement: Duration,
    pub keepalive: Duration,
    pub pool_wait: Duration,
}

/// `[storage] backend`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreKind {
    Sqlite,
    Postgres,
}

/// The environment variable with PostgreSQL's URL (it may hold the password; never logged).
pub const DATABASE_URL_ENV: &str = "TOLLGATE_DATABASE_URL";

impl StorageConfig {
    /// PostgreSQL's URL: `TOLLGATE_DATABASE_URL`, else `[storage] url`.
    pub fn database_url(&self) -> Result<String, String> {
        let env = std::env::var(DATABASE_URL_ENV)
            .ok()
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty());
        env.or_else(|| self.url.clone()).ok_or_else(|| {
            format!(
                "storage.backend = \"postgres\" needs the database's URL: set \
                 {DATABASE_URL_ENV} (postgres://user:password@host:5432/tollgate) or \
                 [storage] url (without a password)"
            )
        })
    }
}

/// Whether a URL's user part holds a password (`user:password@`).
pub fn url_has_password(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split(['/', '?']).next().unwrap_or("");
    authority
        .rsplit_once('@')
        .is_some_and(|(user, _)| user.contains(':'))
}

#[derive(Clone, Debug)]
pub struct MeteringConfig {
    pub mode: MeteringMode,
    pub idle_timeout_ms: i64,
    /// The zone plan periods are computed in (`timezone`, an IANA name).
    pub timezone: String,
    pub calendar: crate::periods::Calendar,
}

#[derive(Clone, Debug)]
pub struct PaymentsConfig {
    pub price_per_hour_cents: i64,
    pub min_hours: i64,
    pub max_hours: i64,
    pub currency: String,
    /// Credit a paid Checkout Session that has no pending row from `create-checkout` (a crash
    /// between creating it at Stripe and recording it), from its metadata at the configured
    /// price. Off by default: the same Stripe account may sell other things, and Payment Links
    /// let a buyer set `client_reference_id`.
    pub credit_unrecorded_sessions: bool,
    /// How long a subscription whose payment failed keeps its plan (`grace_days`), in ms.
    pub grace_ms: i64,
}

#[derive(Clone, Debug)]
pub struct Package {
    pub id: String,
    pub hours: i64,
    pub price_cents: i64,
    pub currency: String,
}

#[derive(Clone, Debug, Default)]
pub struct Plan {
    pub name: String,
    pub requests_per_second: Option<u64>,
    pub requests_per_minute: Option<u64>,
    pub requests_per_hour: Option<u64>,
    pub requests_per_day: Option<u64>,
    pub max_concurrent: Option<u64>,
    pub max_body_bytes: Option<u64>,
    /// The period allowance of time (`period_hours` in the file), in milliseconds.
    pub period_ms: Option<i64>,
    /// The time the plan includes each period (`included_hours` or `included_minutes`), in
    /// milliseconds: spent before the prepaid balance, given again at each period.
    pub included_ms: Option<i64>,
    /// Requests the plan includes each period (`included_requests`), counted as the period's
    /// requests are (each its route's `requests_cost`): a `fixed` route's price is not taken
    /// for those it covers.
    pub included_requests: Option<u64>,
    /// Units of each meter the plan includes each period (`included_units`), by meter index:
    /// not charged at the meter's price.
    pub included_units: crate::meters::Units,
    pub period_requests: Option<u64>,
    /// Request-body bytes per UTC day.
    pub max_upload_bytes_per_day: Option<u64>,
    /// Units of each meter a period allows (`period_units`; 0: no cap), by meter index.
    pub period_units: crate::meters::Units,
    /// What the plan sells for as a Stripe subscription; none: not for sale.
    pub price: Option<PlanPrice>,
    /// Days of trial a new subscription gets before its first charge.
    pub trial_days: Option<u64>,
}

/// A plan's price as a subscription: an amount by the month or year (Checkout makes the
/// price), or a Price made in Stripe's dashboard (`stripe_price`), or both (the amount is then
/// what the payment page shows, and the Price what Checkout charges).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlanPrice {
    pub cents: Option<i64>,
    pub currency: String,
    /// `month` or `year`.
    pub interval: &'static str,
    pub stripe_price: Option<String>,
}

impl Config {
    /// Where a customer upgrades their plan: `proxy.purchase_url` (the payment page) when set,
    /// else where Checkout sends people back (`stripe.cancel_url`, the payment page too).
    pub fn upgrade_url(&self) -> &str {
        self.proxy
            .purchase_url
            .as_deref()
            .unwrap_or(&self.stripe.cancel_url)
    }
}

#[derive(Clone, Debug)]
pub struct StripeConfig {
    pub api_base: String,
    pub success_url: String,
    pub cancel_url: String,
    pub webhook_tolerance_s: u64,
}

/// Every problem found in a config file, each naming its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<String>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

impl Config {
    /// Reads and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigErrors(vec![format!("{}: cannot read: {e}", path.display())]))?;
        Self::parse(&text)
    }

    /// Parses TOML text; an empty text gives every default.
    pub fn parse(text: &str) -> Result<Config, ConfigErrors> {
        let table: Table = text
            .parse()
            .map_err(|e: toml::de::Error| ConfigErrors(vec![format!("invalid TOML: {e}")]))?;
        let mut errors = Vec::new();
        let config = Self::from_table(&table, &mut errors);
        if errors.is_empty() {
            Ok(config)
        } else {
            Err(ConfigErrors(errors))
        }
    }

    /// Every section, read in the order its errors are listed in; a reader that depends on an
    /// earlier section is given what that one read (`[proxy]` to `[admin]`, `[[routes]]` and
    /// the plans; `[payments]` to `[[packages]]`; `[[meters]]` to the routes and the plans).
    fn from_table(root: &Table, errors: &mut Vec<String>) -> Config {
        let known = [
            "proxy", "admin", "metrics", "storage", "metering", "payments", "packages", "plans",
            "stripe", "alerts", "cluster", "log", "meters", "routes", "display",
        ];
        for key in root.keys() {
            if !known.contains(&key.as_str()) {
                errors.push(format!("{key}: unknown section"));
            }
        }

        let proxy = proxy::parse(root, errors);
        let admin = listeners::admin(root, errors, &proxy);
        let metrics = listeners::metrics(root, errors);
        let storage = storage::parse(root, errors);
        let metering = metering::parse(root, errors);
        let payments = payments::parse(root, errors);
        let packages = payments::packages(root, errors, &payments);

        let meters = meters::parse_meters(root, errors);
        let routes = meters::parse_routes(root, errors, &meters, &proxy.free_paths);
        for r in &routes {
            if r.report_from == ReportFrom::Trailer && !proxy.upstream_h2 {
                errors.push(format!(
                    "routes: {:?} takes reports from trailers, which need \
                     proxy.upstream_h2 = true (HTTP/1 trailers are dropped)",
                    r.path
                ));
            }
        }
        let plans = plans::parse(root, errors, proxy.guests, &meters, &payments.currency);

        let stripe = payments::stripe(root, errors, &admin);
        let alerts = alerts::parse(root, errors);
        let cluster = cluster::parse(root, errors);
        let balance_unit = metering::display(root, errors);
        let log = log::parse(root, errors);

        Config {
            proxy,
            admin,
            metrics,
            storage,
            metering,
            payments,
            packages,
            plans,
            meters,
            routes,
            balance_unit,
            stripe,
            alerts,
            cluster,
            log,
        }
    }

    pub fn plan(&self, name: &str) -> Option<&Plan> {
        self.plans.iter().find(|p| p.name == name)
    }
}

impl Default for Config {
    fn default() -> Self {
        Config::parse("").expect("the built-in defaults are valid")
    }
}

/// Converts hours written by people (possibly with decimals) to whole milliseconds.
pub fn hours_to_ms(hours: f64) -> i64 {
    (hours * 3_600_000.0).round() as i64
}

/// More hours than this in one change is a typo, not a sale (114 years).
pub const MAX_HOURS: f64 = 1_000_000.0;

/// Hours typed by a person (the CLI, the admin API) as whole milliseconds: finite and within
/// `0..=MAX_HOURS`, or a message saying what is wrong.
pub fn checked_hours_ms(hours: f64) -> Result<i64, String> {
    if !hours.is_finite() || hours < 0.0 {
        return Err(format!("hours must be a positive number, not {hours}"));
    }
    if hours > MAX_HOURS {
        return Err(format!("hours must be at most {MAX_HOURS}, not {hours}"));
    }
    Ok(hours_to_ms(hours))
}

fn unique<'a>(
    errors: &mut Vec<String>,
    section: &str,
    names: impl Iterator<Item = &'a str>,
    field: &str,
) {
    let mut seen = BTreeSet::new();
    for (i, name) in names.enumerate() {
        if !name.is_empty() && !seen.insert(name) {
            errors.push(format!("{section}[{i}].{field}: {name:?} is defined twice"));
        }
    }
}

#[cfg(test)]
mod tests;
