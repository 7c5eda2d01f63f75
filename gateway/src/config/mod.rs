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

mod meters;
mod plans;
mod section;

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

/// `<hostname>-<pid>`: a name no other running process has.
fn default_node_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "node".into());
    format!("{host}-{}", std::process::id())
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
    /// How often the gateway polls SQLite for license changes made by other processes.
    pub refresh_interval: Duration,
    /// PostgreSQL: how long to wait on the database before a call counts as failed.
    pub timeouts: DbTimeouts,
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
    pub period_requests: Option<u64>,
    /// Request-body bytes per UTC day.
    pub max_upload_bytes_per_day: Option<u64>,
    /// Units of each meter a period allows (`period_units`; 0: no cap), by meter index.
    pub period_units: crate::meters::Units,
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

        let mut s = Section::new(root, "proxy");
        let proxy = ProxyConfig {
            listen: s.addr("listen", "127.0.0.1:8080"),
            tls: {
                let listen = s.opt_string("tls_listen");
                let cert = s.opt_string("tls_cert");
                let key = s.opt_string("tls_key");
                let handshake_timeout = s.millis("tls_handshake_timeout_ms", 10_000);
                match (listen, cert, key) {
                    (None, None, None) => None,
                    (Some(l), Some(cert), Some(key)) => match l.parse() {
                        Ok(listen) => Some(TlsListener {
                            listen,
                            cert: cert.into(),
                            key: key.into(),
                            handshake_timeout,
                        }),
                        Err(_) => {
                            s.error("tls_listen", "must be an IP:port address");
                            None
                        }
                    },
                    _ => {
                        s.error("tls_listen", "tls_listen, tls_cert and tls_key go together");
                        None
                    }
                }
            },
            upstream_tls: s.bool("upstream_tls", false),
            upstream_h2: s.bool("upstream_h2", false),
            upstream_sni: s.opt_string("upstream_sni"),
            upstream_ca: s.opt_string("upstream_ca").map(PathBuf::from),
            upstreams: s.host_port_list("upstream", "127.0.0.1:3000"),
            balance: match s.string("balance", "round_robin").as_str() {
                "round_robin" => Balance::RoundRobin,
                "hash_license" => Balance::HashLicense,
                other => {
                    s.error(
                        "balance",
                        &format!("must be \"round_robin\" or \"hash_license\", not {other:?}"),
                    );
                    Balance::RoundRobin
                }
            },
            health_check_interval: match s.uint("health_check_interval_ms", 1_000, 0, 3_600_000) {
                0 => None,
                ms => Some(Duration::from_millis(ms)),
            },
            upstream_connect_timeout: s.millis("upstream_connect_timeout_ms", 5_000),
            upstream_read_timeout: s.millis("upstream_read_timeout_ms", 300_000),
            upstream_write_timeout: s.millis("upstream_write_timeout_ms", 60_000),
            upstream_idle_timeout: s.millis("upstream_idle_timeout_ms", 60_000),
            downstream_header_timeout: match s.uint(
                "downstream_header_timeout_ms",
                10_000,
                0,
                86_400_000,
            ) {
                0 => None,
                ms => Some(Duration::from_millis(ms)),
            },
            downstream_read_timeout: s.millis("downstream_read_timeout_ms", 60_000),
            downstream_write_timeout: s.millis("downstream_write_timeout_ms", 60_000),
            downstream_keepalive_timeout: s.millis("downstream_keepalive_timeout_ms", 60_000),
            max_header_bytes: s.uint("max_header_bytes", 65_536, 1_024, 1_048_576) as usize,
            max_connections: s.uint("max_connections", 100_000, 1, 10_000_000) as usize,
            max_connections_per_client: s.uint("max_connections_per_client", 256, 1, 10_000_000)
                as usize,
            max_in_flight_per_client: s.uint("max_in_flight_per_client", 256, 1, 10_000_000)
                as usize,
            h2_max_concurrent_streams: s.uint("h2_max_concurrent_streams", 64, 1, 1_000) as u32,
            free_paths: s.string_list("free_paths", &[]),
            usage_header: {
                let h = s.string("usage_header", "Tollgate-Usage");
                if http::HeaderName::from_bytes(h.as_bytes()).is_err() {
                    s.error("usage_header", &format!("{h:?} is not a header name"));
                }
                h.to_ascii_lowercase()
            },
            strip_key: s.bool("strip_key", true),
            guests: match s.string("anonymous", "reject").as_str() {
                "reject" => false,
                "guest" => true,
                other => {
                    s.error(
                        "anonymous",
                        &format!("must be \"reject\" or \"guest\", not {other:?}"),
                    );
                    false
                }
            },
            trust_guest_header: s.bool("trust_guest_header", false),
            trusted_proxies: s.trusted_proxies().unwrap_or_default(),
            threads: s.uint("threads", 2, 1, 1024) as usize,
            cache_capacity: s.uint("cache_capacity", 1_000_000, 1, u32::MAX as u64),
            unknown_lookups_per_second: s.uint("unknown_lookups_per_second", 500, 0, 1_000_000),
            negative_cache_ttl: Duration::from_millis(s.uint(
                "negative_cache_ttl_ms",
                5_000,
                0,
                3_600_000,
            )),
            grace_period_s: s.uint("grace_period_s", 5, 0, 3_600),
            graceful_shutdown_timeout_s: s.uint("graceful_shutdown_timeout_s", 2, 0, 3_600),
            upstream_keepalive_pool: s.uint("upstream_keepalive_pool", 128, 0, 1_000_000) as usize,
            purchase_url: s.opt_string("purchase_url"),
        };
        s.finish(errors);

        let mut s = Section::new(root, "admin");
        let admin = AdminConfig {
            listen: s.addr("listen", "127.0.0.1:8081"),
            tls: match (s.opt_string("tls_cert"), s.opt_string("tls_key")) {
                (None, None) => None,
                (Some(cert), Some(key)) => Some(TlsFiles {
                    cert: cert.into(),
                    key: key.into(),
                }),
                _ => {
                    s.error("tls_cert", "tls_cert and tls_key go together");
                    None
                }
            },
            limits: s.listener_limits(512, 128),
            trusted_proxies: s
                .trusted_proxies()
                .unwrap_or_else(|| proxy.trusted_proxies.clone()),
        };
        s.finish(errors);

        let mut s = Section::new(root, "metrics");
        let metrics = MetricsConfig {
            listen: s.addr("listen", "127.0.0.1:9464"),
            limits: s.listener_limits(64, 16),
        };
        s.finish(errors);

        let mut s = Section::new(root, "storage");
        let backend = match s.string("backend", "sqlite").as_str() {
            "sqlite" => StoreKind::Sqlite,
            "postgres" => StoreKind::Postgres,
            other => {
                s.error(
                    "backend",
                    &format!("must be \"sqlite\" or \"postgres\", not {other:?}"),
                );
                StoreKind::Sqlite
            }
        };
        let url = s.opt_string("url");
        if let Some(u) = &url {
            if !(u.starts_with("postgres://") || u.starts_with("postgresql://")) {
                s.error("url", "must be a postgres:// URL");
            } else if url_has_password(u) {
                s.error(
                    "url",
                    &format!(
                        "must not hold a password (the config file is not a secret): put the \
                         whole URL in {DATABASE_URL_ENV} instead"
                    ),
                );
            }
        }
        let storage = StorageConfig {
            backend,
            url,
            ca_file: s.opt_string("ca_file").map(PathBuf::from),
            path: PathBuf::from(s.string("path", "tollgate.db")),
            flush_interval: Duration::from_millis(s.uint("flush_interval_ms", 1_000, 10, 60_000)),
            log_queue_capacity: s.uint("log_queue_capacity", 100_000, 1, 100_000_000) as usize,
            access_log_retention_days: s.uint("access_log_retention_days", 90, 0, 36_500) as u32,
            unauthenticated_log_rows_per_s: s.uint(
                "unauthenticated_log_rows_per_s",
                100,
                0,
                1_000_000,
            ) as u32,
            refresh_interval: Duration::from_millis(s.uint(
                "refresh_interval_ms",
                2_000,
                100,
                600_000,
            )),
            timeouts: DbTimeouts {
                connect: Duration::from_millis(s.uint("connect_timeout_ms", 5_000, 100, 600_000)),
                statement: Duration::from_millis(s.uint(
                    "statement_timeout_ms",
                    10_000,
                    100,
                    3_600_000,
                )),
                keepalive: Duration::from_millis(s.uint(
                    "keepalive_timeout_ms",
                    10_000,
                    1_000,
                    600_000,
                )),
                pool_wait: Duration::from_millis(s.uint("pool_timeout_ms", 5_000, 100, 600_000)),
            },
        };
        s.finish(errors);

        let mut s = Section::new(root, "metering");
        let mode = match s.string("mode", "session").as_str() {
            "session" => MeteringMode::Session,
            "request_time" => MeteringMode::RequestTime,
            other => {
                s.error(
                    "mode",
                    &format!("must be \"session\" or \"request_time\", not {other:?}"),
                );
                MeteringMode::Session
            }
        };
        let mut metering = MeteringConfig {
            mode,
            idle_timeout_ms: s.uint("idle_timeout_s", 300, 1, 86_400) as i64 * 1_000,
            timezone: s.string("timezone", "UTC"),
            calendar: crate::periods::Calendar::utc(),
        };
        match crate::periods::Calendar::named(&metering.timezone) {
            Ok(c) => metering.calendar = c,
            Err(e) => s.error("timezone", &e),
        }
        s.finish(errors);

        let mut s = Section::new(root, "payments");
        let payments = PaymentsConfig {
            price_per_hour_cents: s.uint("price_per_hour_cents", 500, 1, 100_000_000) as i64,
            min_hours: s.uint("min_hours", 1, 1, 100_000) as i64,
            max_hours: s.uint("max_hours", 1_000, 1, 100_000) as i64,
            currency: s.currency("currency", "usd"),
            credit_unrecorded_sessions: s.bool("credit_unrecorded_sessions", false),
        };
        if payments.min_hours > payments.max_hours {
            s.error("max_hours", "must be at least payments.min_hours");
        }
        s.finish(errors);

        let packages = match root.get("packages") {
            None => default_packages(&payments.currency, payments.price_per_hour_cents),
            Some(v) => Section::array(v, "packages", errors)
                .into_iter()
                .map(|mut s| {
                    let p = Package {
                        id: s.string("id", ""),
                        hours: s.uint("hours", 1, 1, 100_000) as i64,
                        price_cents: s.uint("price_cents", 0, 1, 100_000_000_000) as i64,
                        currency: s.currency("currency", &payments.currency),
                    };
                    s.require("id");
                    s.require("price_cents");
                    s.finish(errors);
                    p
                })
                .collect(),
        };
        unique(
            errors,
            "packages",
            packages.iter().map(|p| p.id.as_str()),
            "id",
        );

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
        let plans = plans::parse(root, errors, proxy.guests, &meters);

        let mut s = Section::new(root, "stripe");
        let stripe = StripeConfig {
            api_base: s.url("api_base", "https://api.stripe.com"),
            success_url: s.url(
                "success_url",
                "http://127.0.0.1:8081/payments/success?session_id={CHECKOUT_SESSION_ID}",
            ),
            cancel_url: s.url("cancel_url", "http://127.0.0.1:8081/payments/"),
            webhook_tolerance_s: s.uint("webhook_tolerance_s", 300, 1, 86_400),
        };
        s.finish(errors);

        let mut s = Section::new(root, "alerts");
        let mut thresholds: Vec<u8> = s
            .uint_list("thresholds", &[80, 100])
            .into_iter()
            .filter_map(|t| match t {
                1..=100 => Some(t as u8),
                _ => None,
            })
            .collect();
        thresholds.sort_unstable();
        thresholds.dedup();
        let webhook_url = s.opt_string("webhook_url").filter(|u| !u.is_empty());
        if let Some(u) = &webhook_url {
            if !(u.starts_with("http://") || u.starts_with("https://")) {
                s.error("webhook_url", "must be an http:// or https:// URL");
            }
        }
        let alerts = AlertsConfig {
            thresholds,
            webhook_url,
            max_attempts: s.uint("max_attempts", 8, 1, 100) as u32,
        };
        s.finish(errors);

        let mut s = Section::new(root, "cluster");
        let heartbeat_ms = s.uint("heartbeat_interval_ms", 1_000, 100, 60_000);
        let cluster = ClusterConfig {
            lease_ms: 0,
            lease_requests: 0,
            lease_lifetime: Duration::ZERO,
            node_id: s.opt_string("node_id").unwrap_or_else(default_node_id),
            heartbeat_interval: Duration::from_millis(heartbeat_ms),
            node_timeout: Duration::from_millis(s.uint(
                "node_timeout_ms",
                heartbeat_ms.saturating_mul(2).max(5_000),
                heartbeat_ms.saturating_mul(2),
                600_000,
            )),
        };
        let cluster = ClusterConfig {
            lease_ms: s.uint("lease_ms", 30_000, 100, 86_400_000),
            lease_requests: s.uint("lease_requests", 100, 1, 1_000_000_000),
            lease_lifetime: Duration::from_millis(s.uint(
                "lease_lifetime_ms",
                (cluster.node_timeout.as_millis() as u64 * 2).max(30_000),
                heartbeat_ms.saturating_mul(3),
                3_600_000,
            )),
            ..cluster
        };
        if cluster.node_id.trim().is_empty() {
            s.error("node_id", "must not be empty");
        }
        s.finish(errors);

        let mut s = Section::new(root, "display");
        let balance_unit = match s.string("balance_unit", "hours").as_str() {
            "hours" => crate::display::BalanceUnit::Hours,
            "minutes" => crate::display::BalanceUnit::Minutes,
            "credits" => {
                s.require("credit_ms");
                crate::display::BalanceUnit::Credits {
                    ms: s.uint("credit_ms", 1_000, 1, 86_400_000) as i64,
                    label: s.string("credit_label", "credits"),
                }
            }
            other => {
                s.error(
                    "balance_unit",
                    &format!("must be \"hours\", \"minutes\" or \"credits\", not {other:?}"),
                );
                crate::display::BalanceUnit::Hours
            }
        };
        let _ = (s.get("credit_ms"), s.get("credit_label"));
        if !matches!(balance_unit, crate::display::BalanceUnit::Credits { .. })
            && (s.table_has("credit_ms") || s.table_has("credit_label"))
        {
            s.error(
                "credit_ms",
                "credit_ms and credit_label go with balance_unit = \"credits\"",
            );
        }
        s.finish(errors);

        let mut s = Section::new(root, "log");
        let log = LogConfig {
            json: match s.string("format", "text").as_str() {
                "text" => false,
                "json" => true,
                other => {
                    s.error(
                        "format",
                        &format!("must be \"text\" or \"json\", not {other:?}"),
                    );
                    false
                }
            },
            level: s.string("level", "info"),
        };
        s.finish(errors);

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

fn default_packages(currency: &str, price_per_hour_cents: i64) -> Vec<Package> {
    [("small", 5), ("medium", 10), ("large", 20), ("xl", 50)]
        .into_iter()
        .map(|(id, hours)| Package {
            id: id.into(),
            hours,
            price_cents: hours * price_per_hour_cents,
            currency: currency.into(),
        })
        .collect()
}

#[cfg(test)]
mod tests;
