//! Wiring: the store, ledger, flusher and proxy assembled into a Pingora server from a
//! [`Config`]. `tollgate::run` adds the admin and metrics listeners and runs it.

use std::sync::Arc;

use anyhow::Context;
use pingora::server::configuration::{Opt, ServerConf};
use pingora::server::Server;
use pingora::services::background::background_service;

use crate::config::Config;
use crate::flusher::{Flusher, FlusherOptions, FlusherService, InFlight};
use crate::ledger::{Clock, Ledger, LedgerOptions, SyncedClock};
use crate::metrics;
use crate::proxy::{Gateway, ProxyOptions};
use crate::store::{Process, SharedStore};
use http::HeaderName;

/// The shared parts of a running gateway, for the admin server and the final flush.
#[derive(Clone)]
pub struct App {
    pub config: Arc<Config>,
    pub store: SharedStore,
    pub ledger: Arc<Ledger>,
    pub flusher: Arc<Flusher>,
    /// The routes as the proxy matches them (`POST /usage/check` asks the same).
    pub routes: Arc<crate::routes::Routes>,
}

/// How the process runs, beyond the config file.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Take the listening sockets over from a running gateway (graceful upgrade).
    pub upgrade: bool,
    /// `TOLLGATE_ALERT_SECRET`: signs alert webhooks.
    pub alert_secret: Option<String>,
}

/// Every address the gateway listens on, with the config key it comes from.
pub fn listen_addresses(config: &Config) -> Vec<(&'static str, std::net::SocketAddr)> {
    let mut out = vec![("[proxy] listen", config.proxy.listen)];
    if let Some(tls) = &config.proxy.tls {
        out.push(("[proxy] tls_listen", tls.listen));
    }
    out.push(("[admin] listen", config.admin.listen));
    out.push(("[metrics] listen", config.metrics.listen));
    out
}

/// Refuses to start where something already listens. The admin and metrics listeners are
/// bound with `SO_REUSEPORT` so that a graceful upgrade can take them over, which would also
/// let a second gateway bind beside a running one without a word and answer half its admin
/// requests; and Pingora retries a taken proxy port for a long while before giving up. So a
/// start that is not an upgrade first binds each address plainly, which fails if anyone holds
/// it, and stops with one line naming the address and its key.
///
/// `bound` are addresses the caller already holds a listener for (not checked).
pub fn ensure_addresses_free(
    config: &Config,
    bound: &[std::net::SocketAddr],
) -> anyhow::Result<()> {
    for (key, addr) in listen_addresses(config) {
        if bound.contains(&addr) {
            continue;
        }
        if let Err(e) = std::net::TcpListener::bind(addr) {
            anyhow::bail!(
                "{key} = {addr} cannot be bound ({e}): another process (perhaps another \
                 tollgate) listens there; stop it or choose another address (to replace a \
                 running gateway without downtime, use `tollgate reload --pid PID`)"
            );
        }
    }
    Ok(())
}

/// Opens the configured store: SQLite at `[storage] path` (the `sqlite` feature, which the
/// binary turns on), or PostgreSQL (the `postgres` feature) at `TOLLGATE_DATABASE_URL` or
/// `[storage] url`, migrated on open.
#[cfg(feature = "sqlite")]
pub fn open_store(config: &Config) -> anyhow::Result<SharedStore> {
    match config.storage.backend {
        crate::config::StoreKind::Sqlite => crate::store::open_sqlite(&config.storage.path)
            .with_context(|| format!("opening the database {}", config.storage.path.display())),
        crate::config::StoreKind::Postgres => open_postgres(config),
    }
}

#[cfg(feature = "postgres")]
fn open_postgres(config: &Config) -> anyhow::Result<SharedStore> {
    use crate::store::postgres::{self, Options, PgStore, Timeouts, DEFAULT_POOL_SIZE};
    let url = config.storage.database_url().map_err(anyhow::Error::msg)?;
    let target = postgres::parse_url(&url).map(|c| postgres::target(&c))?;
    let t = &config.storage.timeouts;
    let store = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting a runtime")?
        .block_on(PgStore::open_with(
            &url,
            &Options {
                pool_size: DEFAULT_POOL_SIZE,
                ca_file: config.storage.ca_file.clone(),
                timeouts: Timeouts {
                    connect: t.connect,
                    statement: t.statement,
                    keepalive: t.keepalive,
                    pool_wait: t.pool_wait,
                },
            },
        ))
        .with_context(|| format!("opening the PostgreSQL database at {target}"))?;
    Ok(Arc::new(store))
}

#[cfg(not(feature = "postgres"))]
fn open_postgres(_: &Config) -> anyhow::Result<SharedStore> {
    anyhow::bail!("this build of tollgate has no PostgreSQL backend (the `postgres` feature)")
}

/// Builds a server with the proxy and the flusher on `store`, on `clock`, with the proxy's
/// plain listener already bound if given (for `[proxy] listen`; a test binds port 0 and
/// writes the address it got into the config).
pub fn build_with(
    config: Config,
    run: &RunOptions,
    clock: Arc<dyn Clock>,
    proxy_listener: Option<std::net::TcpListener>,
    store: SharedStore,
) -> anyhow::Result<(Server, App)> {
    metrics::init();
    // each configured meter's series, at zero
    for m in &config.meters {
        metrics::UNITS.with_label_values(&[&m.name]);
    }
    let config = Arc::new(config);
    // several processes on one database stamp time on its clock, not each on its own
    let synced = (store.cluster().is_some() && clock.is_system()).then(SyncedClock::new);
    let clock: Arc<dyn Clock> = match &synced {
        Some(c) => c.clone(),
        None => clock,
    };
    let process = Arc::new(Process::new(&config.cluster.node_id, clock.now_ms()));
    let (mode, idle_timeout_ms) = metering_of(&config, &store)?;
    let ledger = Arc::new(Ledger::new(
        clock,
        LedgerOptions {
            mode,
            idle_timeout_ms,
            cache_capacity: config.proxy.cache_capacity,
            negative_ttl: config.proxy.negative_cache_ttl,
            plans: config.plans.clone(),
            calendar: config.metering.calendar.clone(),
            alert_thresholds: config.alerts.thresholds.clone(),
            // several nodes share the store: each admits only from its leases
            lease_slice_ms: store.cluster().map(|_| config.cluster.lease_ms as i64),
            lease_requests: config.cluster.lease_requests as i64,
            unknown_lookups_per_second: config.proxy.unknown_lookups_per_second,
            meters: config.meters.clone(),
        },
    ));
    let leases = crate::leases::Leases::new(
        store.clone(),
        ledger.clone(),
        process.clone(),
        config.cluster.lease_lifetime,
    );
    let notifier = config.alerts.webhook_url.clone().map(|url| {
        if run.alert_secret.is_none() {
            tracing::warn!("TOLLGATE_ALERT_SECRET is not set: alert webhooks are sent unsigned");
        }
        crate::alerts::Notifier::new(
            store.clone(),
            url,
            run.alert_secret.clone(),
            config.alerts.max_attempts,
        )
    });
    let membership = crate::cluster::Membership::new(
        store.clone(),
        ledger.clone(),
        synced,
        leases.clone(),
        &config.cluster,
        (*process).clone(),
        config.proxy.listen.to_string(),
        config.admin.listen.to_string(),
    );
    // On several nodes the first heartbeat (which takes the database's time for the clock),
    // so the first requests already split their limits and allowances by the nodes alive. A
    // crash leaves the sessions it was metering open; they ended at their last charged time
    // (on several nodes, only those of processes gone). Then the configured plans are
    // written. All on one runtime, whose connections end with it.
    let plans = config.plans.clone();
    let node_timeout = config.cluster.node_timeout.as_millis() as i64;
    let (closed, plans_synced, beat) = block_on(async {
        let beat = match &membership {
            Some(m) => Some(m.beat().await),
            None => None,
        };
        let now = ledger.now_ms();
        let closed = store.close_stale_sessions(now - node_timeout).await;
        let plans_synced = store.sync_plans(plans, now).await;
        (closed, plans_synced, beat)
    })?;
    store.release_idle();
    match beat {
        Some(Ok(live)) => {
            tracing::info!(node = %process, live, "joined the nodes on this database")
        }
        Some(Err(e)) => tracing::warn!(error = %e, "first cluster heartbeat failed; retried"),
        None => {}
    }
    let closed = closed.context("ending the sessions a previous run left open")?;
    if closed > 0 {
        tracing::info!(
            sessions = closed,
            "ended the sessions a previous run left open"
        );
    }
    plans_synced.context("writing the configured plans to the plans table")?;
    let in_flight = Arc::new(InFlight::default());
    let (flusher, logs) = Flusher::new(
        ledger.clone(),
        store.clone(),
        in_flight.clone(),
        FlusherOptions {
            flush_interval: config.storage.flush_interval,
            refresh_interval: config.storage.refresh_interval,
            log_queue_capacity: config.storage.log_queue_capacity,
            drain_timeout: std::time::Duration::from_secs(config.proxy.grace_period_s),
            alert_queue: notifier.as_ref().map(|(_, q)| q.clone()),
            unauthenticated_log_rows_per_s: config.storage.unauthenticated_log_rows_per_s,
            access_log: config.storage.access_log,
            leases: leases.clone(),
            session_gap_ms: (leases.is_some() && mode == crate::config::MeteringMode::Session)
                .then_some(idle_timeout_ms),
            process: store.cluster().map(|_| process.clone()),
            meters: config.meters.clone().into(),
            access_log_retention: (config.storage.access_log_retention_days > 0).then(|| {
                std::time::Duration::from_secs(
                    u64::from(config.storage.access_log_retention_days) * 86_400,
                )
            }),
        },
    );

    // every kind of connection within its share of the descriptors, a reserve kept aside
    let budget = crate::fds::Budget::now();
    // the upstream sockets' share: idle ones in the keep-alive pool (at most a quarter of
    // it), the rest for requests in flight
    let pool = crate::fds::cap(config.proxy.upstream_keepalive_pool, budget.upstream / 4);
    let in_flight_places = crate::conn_limit::ConnLimit::new(
        budget.upstream - pool,
        config.proxy.max_in_flight_per_client,
    );
    let mut conf = ServerConf {
        threads: config.proxy.threads,
        grace_period_seconds: Some(config.proxy.grace_period_s),
        graceful_shutdown_timeout_seconds: Some(config.proxy.graceful_shutdown_timeout_s),
        upstream_keepalive_pool_size: pool,
        ..ServerConf::default()
    };
    let sock = config.storage.path.with_extension("upgrade.sock");
    conf.upgrade_sock = sock.to_string_lossy().into_owned();
    conf.pid_file = config
        .storage
        .path
        .with_extension("pid")
        .to_string_lossy()
        .into_owned();
    // upstream certificates are verified against the system's roots and this file
    conf.ca_file = config
        .proxy
        .upstream_ca
        .as_ref()
        .map(|p| p.to_string_lossy().into_owned());
    let opt = Opt {
        upgrade: run.upgrade,
        ..Opt::default()
    };
    let mut server = Server::new_with_opt_and_conf(opt, conf);
    server.bootstrap();

    let upstreams = crate::upstreams::Upstreams::new(&config.proxy, &mut server)?;
    let routes = Arc::new(crate::routes::Routes::new(&config.routes));
    let gateway = Gateway::new(
        ledger.clone(),
        store.clone(),
        logs,
        in_flight,
        upstreams,
        ProxyOptions {
            routes: routes.clone(),
            meters: config.meters.clone().into(),
            usage_header: HeaderName::from_bytes(config.proxy.usage_header.as_bytes())
                .expect("checked with the config"),
            upstream_h2: config.proxy.upstream_h2,
            strip_key: config.proxy.strip_key,
            purchase_url: config.proxy.purchase_url.clone(),
            response_headers: config.proxy.response_headers,
            upgrade_url: Some(config.upgrade_url().to_string()),
            calendar: config.metering.calendar.clone(),
            guests: config.proxy.guests,
            trust_guest_header: config.proxy.trust_guest_header,
            leases,
            trusted_proxies: config.proxy.trusted_proxies.clone(),
            downstream_header_timeout: config.proxy.downstream_header_timeout,
            downstream_read_timeout: config.proxy.downstream_read_timeout,
            downstream_write_timeout: config.proxy.downstream_write_timeout,
            downstream_keepalive_timeout: config.proxy.downstream_keepalive_timeout,
            max_header_bytes: config.proxy.max_header_bytes,
            stream_check_interval: (config.storage.flush_interval / 4).clamp(
                std::time::Duration::from_millis(10),
                std::time::Duration::from_secs(1),
            ),
            in_flight_places,
        },
    );
    let mut app = pingora::proxy::http_proxy(&server.configuration, gateway);
    // an HTTP/2 connection with no request in flight is closed like an idle HTTP/1 one
    let mut options = pingora::apps::HttpServerOptions::default();
    options.h2_idle_timeout = Some(config.proxy.downstream_keepalive_timeout);
    app.server_options = Some(options);
    let mut h2 = pingora::protocols::http::v2::server::default_h2_options();
    h2.max_concurrent_streams(config.proxy.h2_max_concurrent_streams);
    app.h2_options = Some(h2);
    // HTTPS: a plain TCP listener to Pingora, handshaken behind the connection caps
    let https = match &config.proxy.tls {
        Some(tls) => {
            let alpn: &[&[u8]] = &[b"h2", b"http/1.1"];
            let server_config = crate::tls::server_config(&tls.cert, &tls.key, alpn)
                .map_err(|e| anyhow::anyhow!("proxy.{e}"))?;
            Some(crate::head_deadline::Https {
                listen: tls.listen,
                acceptor: pingora::listeners::tls::Acceptor::from_server_config(server_config),
                handshake_timeout: tls.handshake_timeout,
            })
        }
        None => None,
    };
    let mut proxy = pingora::services::listening::Service::new(
        "tollgate proxy".into(),
        crate::head_deadline::HeadDeadline::new(
            app,
            config.proxy.downstream_header_timeout,
            crate::conn_limit::ConnLimit::new(
                crate::fds::cap(config.proxy.max_connections, budget.proxy),
                config.proxy.max_connections_per_client,
            ),
            config.proxy.trusted_proxies.clone(),
            https,
        ),
    );
    proxy.add_tcp(&config.proxy.listen.to_string());
    if let Some(tls) = &config.proxy.tls {
        proxy.add_tcp(&tls.listen.to_string());
    }
    match proxy_listener {
        Some(l) => server.add_service(PreBound::new(proxy, &config.proxy.listen.to_string(), l)?),
        None => server.add_service(proxy),
    };
    server.add_service(background_service(
        "tollgate flusher",
        FlusherService(flusher.clone()),
    ));
    if let Some((n, _)) = notifier {
        server.add_service(background_service(
            "tollgate alerts",
            crate::alerts::NotifierService(n),
        ));
    }
    if let Some(m) = membership {
        server.add_service(background_service(
            "tollgate cluster",
            crate::cluster::MembershipService(m),
        ));
    }

    Ok((
        server,
        App {
            config,
            store,
            ledger,
            flusher,
            routes,
        },
    ))
}

/// Runs a store call to completion from outside a runtime (start-up, before the server runs).
/// How this process meters: as its config says, or on a database several processes share, as
/// the database says (one way for all: session time is charged by the union of every
/// process's spans, which fills the same holes for all only with one idle timeout).
fn metering_of(
    config: &Config,
    store: &SharedStore,
) -> anyhow::Result<(crate::config::MeteringMode, i64)> {
    let mine = (config.metering.mode, config.metering.idle_timeout_ms);
    let Some(cluster) = store.cluster() else {
        return Ok(mine);
    };
    let db = block_on(cluster.metering(mine))?
        .context("reading how the database meters (metering_settings)")?;
    store.release_idle();
    if db != mine {
        tracing::warn!(
            config_mode = mine.0.as_str(),
            config_idle_timeout_ms = mine.1,
            mode = db.0.as_str(),
            idle_timeout_ms = db.1,
            "metering as the database says, not as this config does: every node on a database \
             meters one way (to change it, stop every node and run `tollgate migrate` with the \
             new config)"
        );
    }
    Ok(db)
}

fn block_on<T>(f: impl std::future::Future<Output = T>) -> anyhow::Result<T> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting a runtime for the store")?;
    Ok(rt.block_on(f))
}

/// A Pingora listening service that uses sockets bound before it started: each is put in the
/// listener table Pingora consults before binding (the table a graceful upgrade fills), under
/// the address the service listens on.
struct PreBound<S> {
    inner: S,
    bound: Vec<(String, std::os::fd::OwnedFd)>,
}

impl<S> PreBound<S> {
    fn new(inner: S, addr: &str, listener: std::net::TcpListener) -> anyhow::Result<PreBound<S>> {
        // Pingora's runtime takes it as it takes an inherited socket: non-blocking
        listener
            .set_nonblocking(true)
            .context("the proxy's listener")?;
        Ok(PreBound {
            inner,
            bound: vec![(addr.to_string(), listener.into())],
        })
    }
}

#[async_trait::async_trait]
impl<S: pingora::services::Service> pingora::services::Service for PreBound<S> {
    async fn start_service(
        &mut self,
        fds: Option<pingora::server::ListenFds>,
        shutdown: pingora::server::ShutdownWatch,
        listeners_per_fd: usize,
    ) {
        // Pingora always hands its table over on Unix; without one, the service binds itself
        if let Some(fds) = &fds {
            use std::os::fd::IntoRawFd;
            let mut table = fds.lock();
            for (addr, fd) in self.bound.drain(..) {
                // one the table holds already (an upgrade's) wins; ours is closed when dropped
                if table.get(&addr).is_none() {
                    table.add(addr, fd.into_raw_fd());
                }
            }
        }
        self.bound.clear();
        self.inner
            .start_service(fds, shutdown, listeners_per_fd)
            .await
    }

    fn name(&self) -> &str {
        self.inner.name()
    }

    fn threads(&self) -> Option<usize> {
        self.inner.threads()
    }

    fn listen_addresses(&self) -> Option<Vec<String>> {
        self.inner.listen_addresses()
    }
}
