//! Tollgate as a library: [`run`] starts the whole gateway (proxy, flusher, alert notifier,
//! admin and metrics listeners) from a validated config and returns once it has shut down and
//! its books are flushed. `main` parses the command line and calls it; a test calls it in the
//! test's own process, with listeners it bound on port 0 and a manual clock.

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;

use anyhow::Context;
use async_trait::async_trait;
use gateway::config::Config;
use gateway::ledger::{Clock, SystemClock};
use gateway::server::{self, App, RunOptions};
use pingora::server::{RunArgs, Server, ShutdownSignal, ShutdownSignalWatch};

/// Listeners bound by the caller; an address left without one is bound from the config.
#[derive(Default)]
pub struct Listeners {
    /// For `[proxy] listen` (plain HTTP; the TLS listener is always bound from the config).
    pub proxy: Option<TcpListener>,
    pub admin: Option<TcpListener>,
    pub metrics: Option<TcpListener>,
}

/// What ends a running gateway.
pub enum Shutdown {
    /// SIGTERM (graceful), SIGQUIT (graceful upgrade) or SIGINT (fast): the binary.
    Signals,
    /// [`Stopper::stop`]: a graceful shutdown asked for by the caller.
    Stopper(Stopper),
}

/// Asks a gateway started with [`Shutdown::Stopper`] to shut down gracefully (as SIGTERM).
#[derive(Clone, Default)]
pub struct Stopper(Arc<tokio::sync::Notify>);

impl Stopper {
    pub fn stop(&self) {
        self.0.notify_one();
    }
}

#[async_trait]
impl ShutdownSignalWatch for Stopper {
    async fn recv(&self) -> ShutdownSignal {
        self.0.notified().await;
        ShutdownSignal::GracefulTerminate
    }
}

/// How [`run`] starts: its listeners, its clock and what stops it.
pub struct Start {
    pub listeners: Listeners,
    pub clock: Arc<dyn Clock>,
    pub shutdown: Shutdown,
}

impl Default for Start {
    /// Everything bound from the config, the system clock, stopped by signals.
    fn default() -> Start {
        Start {
            listeners: Listeners::default(),
            clock: Arc::new(SystemClock),
            shutdown: Shutdown::Signals,
        }
    }
}

/// Runs the gateway until it is told to stop (see [`Shutdown`]), then drains the requests in
/// flight, commits the last flush, and returns. `ready` is called with the app once everything
/// is bound, before serving starts.
///
/// The Pingora server runs on its own thread; this one waits for the flusher's drained signal
/// (the server's own shutdown would then sit out the rest of its grace period, which the
/// caller need not wait for: the books are closed).
pub fn run(
    config: Config,
    secrets: admin::Secrets,
    opts: &RunOptions,
    start: Start,
    ready: impl FnOnce(&App),
) -> anyhow::Result<()> {
    let Start {
        listeners,
        clock,
        shutdown,
    } = start;
    let admin_listen = config.admin.listen;
    let metrics_listen = config.metrics.listen;
    check_secrets(&secrets, admin_listen)?;
    if !opts.upgrade {
        // only an upgrade may share its predecessor's listeners; checked before the warnings,
        // so a second start says one thing and nothing else
        let bound = [
            listeners.proxy.as_ref().map(|_| config.proxy.listen),
            listeners.admin.as_ref().map(|_| admin_listen),
            listeners.metrics.as_ref().map(|_| metrics_listen),
        ];
        server::ensure_addresses_free(&config, &bound.into_iter().flatten().collect::<Vec<_>>())?;
    }
    warn_missing_secrets(&secrets, admin_listen);
    let descriptors = gateway::fds::raise_limit();
    tracing::debug!(descriptors, "descriptor limit");
    let store = server::open_store(&config)?;
    let (mut server, app) = server::build_with(config, opts, clock, listeners.proxy, store)?;
    add_http_service(
        &mut server,
        "tollgate admin",
        (admin_listen, listeners.admin),
        admin::router(app.clone(), secrets),
        app.config.admin.tls.as_ref(),
        app.config.admin.limits,
        &app.config.admin.trusted_proxies,
    )?;
    server.add_service(pingora::services::background::background_service(
        "tollgate subscriptions",
        admin::SubscriptionSweep::new(app.clone()),
    ));
    add_http_service(
        &mut server,
        "tollgate metrics",
        (metrics_listen, listeners.metrics),
        admin::metrics_router(),
        None,
        app.config.metrics.limits,
        &app.config.proxy.trusted_proxies,
    )?;
    let tls_listen = app.config.proxy.tls.as_ref().map(|t| t.listen);
    tracing::info!(
        proxy = %app.config.proxy.listen,
        tls_listen = tls_listen.map_or_else(|| "off".to_string(), |a| a.to_string()),
        upstreams = %app.config.proxy.upstreams.join(", "),
        admin = %admin_listen,
        admin_https = app.config.admin.tls.is_some(),
        metrics = %metrics_listen,
        db = %app.store.describe(),
        "tollgate starting"
    );
    ready(&app);
    let mut drained = app.flusher.drained();
    let pingora = std::thread::Builder::new()
        .name("tollgate-server".into())
        .spawn(move || {
            let shutdown_signal = match shutdown {
                Shutdown::Signals => RunArgs::default().shutdown_signal,
                Shutdown::Stopper(s) => Box::new(s),
            };
            server.run(RunArgs { shutdown_signal })
        })
        .context("starting the server thread")?;
    // Wait for the flusher to say it drained and flushed (or for the server to end without it:
    // a start-up failure Pingora reports itself).
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .context("a runtime to wait for shutdown on")?
        .block_on(async {
            loop {
                if *drained.borrow() || pingora.is_finished() {
                    break;
                }
                tokio::select! {
                    changed = drained.changed() => if changed.is_err() { break },
                    _ = tokio::time::sleep(std::time::Duration::from_millis(100)) => {}
                }
            }
        });
    // The flusher commits on shutdown; this catches anything that ended after it.
    let flushed = app.flusher.flush_blocking();
    if pingora.is_finished() && pingora.join().is_err() {
        anyhow::bail!("the server thread panicked (see the log above)");
    }
    flushed.context("the last flush after shutdown")?;
    Ok(())
}

/// The shortest admin token accepted: 32 characters (say 192 bits of a base64 alphabet) keep
/// guessing hopeless even at the throttled few tries a second.
const MIN_ADMIN_TOKEN: usize = 32;

/// Refuses secrets the gateway cannot start with (first, before anything else is checked;
/// `check-config` checks them too).
/// The operator API must not be open to a network without a token: without one, the admin
/// listener starts only on loopback, with the operator API disabled, and says so.
pub fn check_secrets(secrets: &admin::Secrets, admin_listen: SocketAddr) -> anyhow::Result<()> {
    if let Some(t) = &secrets.admin_token {
        let n = t.chars().count();
        if n < MIN_ADMIN_TOKEN {
            anyhow::bail!(
                "TOLLGATE_ADMIN_TOKEN has {n} characters; it must have at least \
                 {MIN_ADMIN_TOKEN} (make one with: head -c 32 /dev/urandom | base64)"
            );
        }
    }
    if secrets.admin_token.is_none() && !admin_listen.ip().is_loopback() {
        anyhow::bail!(
            "TOLLGATE_ADMIN_TOKEN is not set and [admin] listen = {admin_listen} is not a \
             loopback address: refusing to start. Set the token, or listen on 127.0.0.1."
        );
    }
    Ok(())
}

/// Says which secrets are missing (the gateway runs without them, with less).
fn warn_missing_secrets(secrets: &admin::Secrets, admin_listen: SocketAddr) {
    if secrets.admin_token.is_none() {
        tracing::warn!(
            admin = %admin_listen,
            "TOLLGATE_ADMIN_TOKEN is not set: the operator API (/api/...) is DISABLED and \
             answers 401. Set the token to manage licenses over HTTP."
        );
    }
    if secrets.stripe_secret_key.is_none() {
        tracing::warn!("STRIPE_SECRET_KEY is not set: checkout answers payments_unavailable");
    }
    if secrets.webhook_secrets.is_empty() {
        tracing::warn!("STRIPE_WEBHOOK_SECRET is not set: Stripe webhooks are refused");
    }
}

fn add_http_service(
    server: &mut Server,
    name: &'static str,
    (addr, bound): (SocketAddr, Option<TcpListener>),
    router: axum::Router,
    tls: Option<&gateway::config::TlsFiles>,
    limits: gateway::config::ListenerLimits,
    trusted: &gateway::forwarded::TrustedProxies,
) -> anyhow::Result<()> {
    let service = match bound {
        Some(l) => admin::HttpService::on(name, l, router, limits, trusted.clone()),
        None => admin::HttpService::bind(name, addr, router, limits, trusted.clone()),
    };
    let mut service = service.with_context(|| format!("{name}: cannot listen on {addr}"))?;
    if let Some(files) = tls {
        service = service
            .with_tls(files)
            .map_err(|e| anyhow::anyhow!("[admin] {e}"))?;
    }
    server.add_service(pingora::services::background::background_service(
        name, service,
    ));
    Ok(())
}
