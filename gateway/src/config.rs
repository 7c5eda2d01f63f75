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

/// The HTTPS listener.
#[derive(Clone, Debug)]
pub struct TlsListener {
    pub listen: SocketAddr,
    pub cert: PathBuf,
    pub key: PathBuf,
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
    pub stripe: StripeConfig,
    pub alerts: AlertsConfig,
    pub log: LogConfig,
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
    /// Paths served without a key and without metering. An entry ending in `*` is a prefix.
    pub free_paths: Vec<String>,
    pub strip_key: bool,
    pub threads: usize,
    pub cache_capacity: u64,
    pub negative_cache_ttl: Duration,
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
    pub path: PathBuf,
    pub flush_interval: Duration,
    pub log_queue_capacity: usize,
    pub access_log_retention_days: u32,
    /// Access-log rows written per second for requests refused without a known license; the
    /// rest are counted (metrics and `refused_minutes`), not written.
    pub unauthenticated_log_rows_per_s: u32,
    /// How often the gateway polls SQLite for license changes made by other processes.
    pub refresh_interval: Duration,
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
            "stripe", "alerts", "log",
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
                match (listen, cert, key) {
                    (None, None, None) => None,
                    (Some(l), Some(cert), Some(key)) => match l.parse() {
                        Ok(listen) => Some(TlsListener {
                            listen,
                            cert: cert.into(),
                            key: key.into(),
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
            free_paths: s.string_list("free_paths", &[]),
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
            trusted_proxies: {
                let mut ranges = Vec::new();
                for (i, r) in s.string_list("trusted_proxies", &[]).iter().enumerate() {
                    match crate::forwarded::Cidr::parse(r) {
                        Ok(c) => ranges.push(c),
                        Err(e) => s.error(&format!("trusted_proxies[{i}]"), &e),
                    }
                }
                crate::forwarded::TrustedProxies::new(ranges)
            },
            threads: s.uint("threads", 2, 1, 1024) as usize,
            cache_capacity: s.uint("cache_capacity", 1_000_000, 1, u32::MAX as u64),
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
        };
        s.finish(errors);

        let mut s = Section::new(root, "metrics");
        let metrics = MetricsConfig {
            listen: s.addr("listen", "127.0.0.1:9464"),
            limits: s.listener_limits(64, 16),
        };
        s.finish(errors);

        let mut s = Section::new(root, "storage");
        let storage = StorageConfig {
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

        let plans: Vec<Plan> = match root.get("plans") {
            None => default_plans(),
            Some(v) => Section::array(v, "plans", errors)
                .into_iter()
                .map(|mut s| {
                    let p = Plan {
                        name: s.string("name", ""),
                        requests_per_second: s.opt_uint("requests_per_second"),
                        requests_per_minute: s.opt_uint("requests_per_minute"),
                        requests_per_hour: s.opt_uint("requests_per_hour"),
                        requests_per_day: s.opt_uint("requests_per_day"),
                        max_concurrent: s.opt_uint("max_concurrent"),
                        max_body_bytes: s.opt_uint("max_body_bytes"),
                        period_ms: {
                            let hours = s.opt_hours_ms("period_hours");
                            // as many minutes as period_hours allows hours
                            let minutes = s.opt_uint("period_minutes").filter(|&m| {
                                let ok = m <= 60_000_000;
                                if !ok {
                                    s.error(
                                        "period_minutes",
                                        &format!("must be at most 60000000, not {m}"),
                                    );
                                }
                                ok
                            });
                            if hours.is_some() && minutes.is_some() {
                                s.error(
                                    "period_minutes",
                                    "give period_hours or period_minutes, not both",
                                );
                            }
                            hours.or(minutes.map(|m| m as i64 * 60_000))
                        },
                        period_requests: s.opt_uint("period_requests"),
                        max_upload_bytes_per_day: s.opt_uint("max_upload_bytes_per_day"),
                    };
                    s.require("name");
                    s.finish(errors);
                    p
                })
                .collect(),
        };
        unique(
            errors,
            "plans",
            plans.iter().map(|p| p.name.as_str()),
            "name",
        );
        if !plans.iter().any(|p| p.name == "free") {
            errors.push("plans: a plan named \"free\" is required (it is the default)".into());
        }
        if proxy.guests && !plans.iter().any(|p| p.name == "guest") {
            errors.push("plans: proxy.anonymous = \"guest\" needs a plan named \"guest\"".into());
        }

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
            stripe,
            alerts,
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

fn default_plans() -> Vec<Plan> {
    const MB: u64 = 1024 * 1024;
    let plan = |name: &str, minutes: u64, body_mb: u64, concurrent: u64| Plan {
        name: name.into(),
        max_concurrent: Some(concurrent),
        max_body_bytes: Some(body_mb * MB),
        period_ms: Some(minutes as i64 * 60_000),
        ..Plan::default()
    };
    vec![
        Plan {
            requests_per_hour: Some(50),
            requests_per_day: Some(200),
            ..plan("free", 30, 25, 1)
        },
        Plan {
            requests_per_minute: Some(60),
            requests_per_day: Some(5_000),
            ..plan("starter", 150, 100, 2)
        },
        Plan {
            requests_per_second: Some(10),
            requests_per_day: Some(50_000),
            ..plan("pro", 500, 500, 5)
        },
        Plan {
            requests_per_second: Some(50),
            ..plan("enterprise", 2_000, 1_024, 10)
        },
        Plan {
            requests_per_day: Some(5),
            ..plan("guest", 10, 25, 1)
        },
    ]
}

/// One table of the file being read: typed getters that fall back to defaults, record errors
/// with the key's full name, and remember which keys were read so `finish` can name the rest.
struct Section<'a> {
    table: Option<&'a Table>,
    path: String,
    seen: BTreeSet<&'static str>,
    errors: Vec<String>,
}

impl<'a> Section<'a> {
    fn new(root: &'a Table, name: &str) -> Section<'a> {
        let mut errors = Vec::new();
        let table = match root.get(name) {
            None => None,
            Some(Value::Table(t)) => Some(t),
            Some(_) => {
                errors.push(format!("{name}: must be a table ([{name}])"));
                None
            }
        };
        Section {
            table,
            path: name.to_string(),
            seen: BTreeSet::new(),
            errors,
        }
    }

    /// The tables of an array of tables (`[[name]]`); each gets its own section.
    fn array(value: &'a Value, name: &str, errors: &mut Vec<String>) -> Vec<Section<'a>> {
        let Value::Array(items) = value else {
            errors.push(format!("{name}: must be an array of tables ([[{name}]])"));
            return Vec::new();
        };
        let mut out = Vec::new();
        for (i, item) in items.iter().enumerate() {
            let path = format!("{name}[{i}]");
            match item {
                Value::Table(t) => out.push(Section {
                    table: Some(t),
                    path,
                    seen: BTreeSet::new(),
                    errors: Vec::new(),
                }),
                _ => errors.push(format!("{path}: must be a table")),
            }
        }
        out
    }

    fn key(&self, key: &str) -> String {
        format!("{}.{key}", self.path)
    }

    /// An ISO 4217 code, lowercased as Stripe wants it.
    fn currency(&mut self, key: &'static str, default: &str) -> String {
        let c = self.string(key, default).to_ascii_lowercase();
        if c.len() != 3 || !c.bytes().all(|b| b.is_ascii_lowercase()) {
            self.error(key, "must be a three-letter currency code such as \"usd\"");
        }
        c
    }

    fn error(&mut self, key: &str, problem: &str) {
        let k = self.key(key);
        self.errors.push(format!("{k}: {problem}"));
    }

    fn get(&mut self, key: &'static str) -> Option<&'a Value> {
        self.seen.insert(key);
        self.table.and_then(|t| t.get(key))
    }

    fn require(&mut self, key: &'static str) {
        if self.table.is_some_and(|t| !t.contains_key(key)) {
            self.error(key, "is required");
        }
    }

    fn string(&mut self, key: &'static str, default: &str) -> String {
        match self.get(key) {
            None => default.to_string(),
            Some(Value::String(s)) => s.clone(),
            Some(v) => {
                self.error(key, &format!("must be a string, not {}", v.type_str()));
                default.to_string()
            }
        }
    }

    fn opt_string(&mut self, key: &'static str) -> Option<String> {
        match self.get(key) {
            None => None,
            Some(Value::String(s)) if s.is_empty() => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(v) => {
                self.error(key, &format!("must be a string, not {}", v.type_str()));
                None
            }
        }
    }

    fn bool(&mut self, key: &'static str, default: bool) -> bool {
        match self.get(key) {
            None => default,
            Some(Value::Boolean(b)) => *b,
            Some(v) => {
                self.error(key, &format!("must be true or false, not {}", v.type_str()));
                default
            }
        }
    }

    fn uint(&mut self, key: &'static str, default: u64, min: u64, max: u64) -> u64 {
        match self.get(key) {
            None => default,
            Some(Value::Integer(i)) if *i >= min as i64 && *i as u64 <= max => *i as u64,
            Some(Value::Integer(i)) => {
                self.error(key, &format!("must be between {min} and {max}, not {i}"));
                default
            }
            Some(v) => {
                self.error(key, &format!("must be an integer, not {}", v.type_str()));
                default
            }
        }
    }

    fn opt_uint(&mut self, key: &'static str) -> Option<u64> {
        match self.get(key) {
            None => None,
            Some(Value::Integer(i)) if *i >= 0 => Some(*i as u64),
            Some(Value::Integer(i)) => {
                self.error(key, &format!("must not be negative, not {i}"));
                None
            }
            Some(v) => {
                self.error(key, &format!("must be an integer, not {}", v.type_str()));
                None
            }
        }
    }

    /// A number of hours (decimals allowed, as people write them), returned in milliseconds.
    fn opt_hours_ms(&mut self, key: &'static str) -> Option<i64> {
        let hours = match self.get(key) {
            None => return None,
            Some(Value::Integer(i)) => *i as f64,
            Some(Value::Float(f)) => *f,
            Some(v) => {
                self.error(
                    key,
                    &format!("must be a number of hours, not {}", v.type_str()),
                );
                return None;
            }
        };
        if !(0.0..=1_000_000.0).contains(&hours) {
            self.error(
                key,
                &format!("must be between 0 and 1000000 hours, not {hours}"),
            );
            return None;
        }
        Some(hours_to_ms(hours))
    }

    /// A side listener's `header_timeout_ms`, `max_connections` and
    /// `max_connections_per_client`, with these defaults for the caps.
    fn listener_limits(&mut self, max_connections: u64, per_client: u64) -> ListenerLimits {
        ListenerLimits {
            header_timeout: Duration::from_millis(self.uint(
                "header_timeout_ms",
                10_000,
                100,
                600_000,
            )),
            max_connections: self.uint("max_connections", max_connections, 1, 1_000_000) as usize,
            max_connections_per_client: self.uint(
                "max_connections_per_client",
                per_client,
                1,
                1_000_000,
            ) as usize,
        }
    }

    fn string_list(&mut self, key: &'static str, default: &[&str]) -> Vec<String> {
        match self.get(key) {
            None => default.iter().map(|s| s.to_string()).collect(),
            Some(Value::Array(items)) => {
                let mut out = Vec::new();
                for (i, item) in items.iter().enumerate() {
                    match item {
                        Value::String(s) => out.push(s.clone()),
                        v => {
                            let k = format!("{key}[{i}]");
                            let p = format!("must be a string, not {}", v.type_str());
                            self.error(&k, &p);
                        }
                    }
                }
                out
            }
            Some(v) => {
                self.error(
                    key,
                    &format!("must be a list of strings, not {}", v.type_str()),
                );
                Vec::new()
            }
        }
    }

    /// A list of percentages (1 to 100).
    fn uint_list(&mut self, key: &'static str, default: &[u64]) -> Vec<u64> {
        match self.get(key) {
            None => default.to_vec(),
            Some(Value::Array(items)) => {
                let mut out = Vec::new();
                for (i, item) in items.iter().enumerate() {
                    match item.as_integer() {
                        Some(n @ 1..=100) => out.push(n as u64),
                        _ => {
                            let k = format!("{key}[{i}]");
                            self.error(&k, "must be a whole percentage from 1 to 100");
                        }
                    }
                }
                out
            }
            Some(v) => {
                self.error(
                    key,
                    &format!("must be a list of percentages, not {}", v.type_str()),
                );
                Vec::new()
            }
        }
    }

    fn addr(&mut self, key: &'static str, default: &str) -> SocketAddr {
        let text = self.string(key, default);
        text.parse().unwrap_or_else(|_| {
            self.error(key, &format!("must be an IP:port address, not {text:?}"));
            default.parse().expect("default address parses")
        })
    }

    /// A duration in milliseconds, at least 1 ms and at most a day.
    fn millis(&mut self, key: &'static str, default: u64) -> Duration {
        Duration::from_millis(self.uint(key, default, 1, 86_400_000))
    }

    /// `host:port`, or a non-empty list of them.
    fn host_port_list(&mut self, key: &'static str, default: &str) -> Vec<String> {
        let valid = |t: &str| {
            t.rsplit_once(':')
                .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok())
        };
        match self.get(key) {
            None => vec![default.to_string()],
            Some(Value::String(t)) if valid(t) => vec![t.clone()],
            Some(Value::Array(items)) if !items.is_empty() => {
                let mut out = Vec::new();
                for (i, item) in items.iter().enumerate() {
                    match item.as_str() {
                        Some(t) if valid(t) => {
                            if !out.iter().any(|o: &String| o == t) {
                                out.push(t.to_string());
                            }
                        }
                        _ => {
                            let k = format!("{key}[{i}]");
                            self.error(&k, "must be host:port");
                        }
                    }
                }
                if out.is_empty() {
                    out.push(default.to_string());
                }
                out
            }
            Some(v) => {
                self.error(
                    key,
                    &format!("must be host:port or a list of them, not {v}"),
                );
                vec![default.to_string()]
            }
        }
    }

    fn url(&mut self, key: &'static str, default: &str) -> String {
        let text = self.string(key, default);
        if !(text.starts_with("http://") || text.starts_with("https://")) {
            self.error(
                key,
                &format!("must be an http:// or https:// URL, not {text:?}"),
            );
            return default.to_string();
        }
        text.trim_end_matches('/').to_string()
    }

    /// Hands over this section's errors, adding the keys present that no getter asked for.
    fn finish(mut self, errors: &mut Vec<String>) {
        errors.append(&mut self.errors);
        if let Some(t) = self.table {
            for key in t.keys() {
                if !self.seen.contains(key.as_str()) {
                    errors.push(format!("{}.{key}: unknown key", self.path));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_the_documented_defaults() {
        let c = Config::parse("").unwrap();
        assert_eq!(c.proxy.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(c.storage.flush_interval, Duration::from_millis(1000));
        assert_eq!(c.metering.mode, MeteringMode::Session);
        assert_eq!(c.metering.idle_timeout_ms, 300_000);
        assert_eq!(c.packages.len(), 4);
        assert_eq!(c.packages[0].price_cents, 2_500);
        assert!(c.plan("free").is_some());
    }

    #[test]
    fn the_header_timeout_defaults_to_ten_seconds_and_zero_turns_it_off() {
        let c = Config::parse("").unwrap();
        assert_eq!(
            c.proxy.downstream_header_timeout,
            Some(Duration::from_secs(10))
        );
        let c = Config::parse("[proxy]\ndownstream_header_timeout_ms = 0\n").unwrap();
        assert_eq!(c.proxy.downstream_header_timeout, None);
    }

    /// Found while writing the `config_parser` fuzz target's oracle: minutes past i64's range
    /// in milliseconds overflowed (a panic in debug builds, a wrapped period in release).
    #[test]
    fn fuzz_regressions_a_huge_period_is_an_error_not_an_overflow() {
        for minutes in ["9223372036854775807", "153722867280913", "60000001"] {
            let text = format!("[[plans]]\nname = \"free\"\nperiod_minutes = {minutes}\n");
            let e = Config::parse(&text).unwrap_err();
            assert!(e.to_string().contains("period_minutes"), "{e}");
        }
        let c = Config::parse("[[plans]]\nname = \"free\"\nperiod_minutes = 60000000\n").unwrap();
        assert_eq!(c.plans[0].period_ms, Some(60_000_000 * 60_000));
    }

    #[test]
    fn every_bad_key_is_reported_at_once() {
        let text = r#"
            [proxy]
            listen = "nope"
            threads = 0
            strip_kee = true
            [storage]
            flush_interval_ms = "fast"
            [metering]
            mode = "hourly"
            [[plans]]
            name = "free"
            max_concurrent = -1
            [bogus]
        "#;
        let errors = Config::parse(text).unwrap_err().0;
        let joined = errors.join("\n");
        for expected in [
            "proxy.listen",
            "proxy.threads",
            "proxy.strip_kee: unknown key",
            "storage.flush_interval_ms: must be an integer",
            "metering.mode",
            "plans[0].max_concurrent",
            "bogus: unknown section",
        ] {
            assert!(
                joined.contains(expected),
                "missing {expected:?} in:\n{joined}"
            );
        }
        assert_eq!(errors.len(), 7, "{joined}");
    }

    #[test]
    fn the_shipped_config_file_is_valid_and_matches_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../conf/tollgate.toml");
        let c = Config::load(&path).unwrap();
        let d = Config::default();
        assert_eq!(c.proxy.listen, d.proxy.listen);
        assert_eq!(c.storage.flush_interval, d.storage.flush_interval);
        assert_eq!(c.metering.idle_timeout_ms, d.metering.idle_timeout_ms);
        assert_eq!(c.packages.len(), d.packages.len());
        assert_eq!(c.plans.len(), d.plans.len());
    }
}
