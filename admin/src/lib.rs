//! The admin HTTP server (axum), run inside the gateway's process as a Pingora background
//! service: the operator's licenses API, the customer's payments and usage API, Stripe's
//! webhook, and `/health` and `/ready`. The same service type serves `/metrics` on its own
//! listener.

use std::net::SocketAddr;
use std::sync::Arc;

use async_trait::async_trait;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use gateway::server::App;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

pub mod auth;
pub mod error;
pub mod licenses;
pub mod openapi;
pub mod payments;
pub mod serve;
pub mod service;
pub mod stats;
pub mod stripe;
pub mod throttle;
pub mod tls;
pub mod ui;
pub mod usage_check;
pub mod views;

/// Secrets, read from the environment by the binary (never from the config file).
#[derive(Clone, Default)]
pub struct Secrets {
    /// `TOLLGATE_ADMIN_TOKEN`: the operator API's bearer token.
    pub admin_token: Option<String>,
    /// `STRIPE_SECRET_KEY`.
    pub stripe_secret_key: Option<String>,
    /// `STRIPE_WEBHOOK_SECRET`, comma-separated while a secret is rolled.
    pub webhook_secrets: Vec<String>,
}

impl Secrets {
    pub fn from_env() -> Secrets {
        let var = |name: &str| {
            std::env::var(name)
                .ok()
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };
        Secrets {
            admin_token: var("TOLLGATE_ADMIN_TOKEN"),
            stripe_secret_key: var("STRIPE_SECRET_KEY"),
            webhook_secrets: var("STRIPE_WEBHOOK_SECRET")
                .map(|v| {
                    v.split(',')
                        .map(|s| s.trim().to_string())
                        .filter(|s| !s.is_empty())
                        .collect()
                })
                .unwrap_or_default(),
        }
    }
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // which secrets are set, never what they are
        f.debug_struct("Secrets")
            .field("admin_token", &self.admin_token.is_some())
            .field("stripe_secret_key", &self.stripe_secret_key.is_some())
            .field("webhook_secrets", &self.webhook_secrets.len())
            .finish()
    }
}

/// The admin server's state: the gateway's parts and what only the admin server needs.
#[derive(Clone)]
pub struct AdminState {
    pub app: App,
    shared: Arc<Shared>,
}

struct Shared {
    token: auth::TokenCheck,
    throttle: throttle::AuthThrottle,
    stripe: stripe::Client,
    webhook_secrets: Vec<String>,
    console: ui::session::Sessions,
    /// Checkout sessions looked up lately and not found (`/payments/success`).
    unknown_checkouts: gateway::lookups::NotFound,
    /// The OpenAPI document, serialized once.
    openapi: std::sync::OnceLock<axum::body::Bytes>,
}

/// Request bodies larger than this are refused before they are read in full (Stripe's events
/// are a few kilobytes).
pub const MAX_BODY_BYTES: usize = 1 << 20;

/// The API's routes, each with its part of the OpenAPI document.
pub fn api_routes() -> OpenApiRouter<AdminState> {
    OpenApiRouter::with_openapi(<openapi::ApiDoc as utoipa::OpenApi>::openapi())
        .routes(routes!(health))
        .routes(routes!(ready))
        .routes(routes!(openapi::served))
        .merge(licenses::routes())
        .merge(payments::routes())
        .merge(ui::pages::receipt::routes())
        .merge(usage_check::routes())
        .merge(stats::routes())
}

/// The admin routes: the API, and the console's pages.
pub fn router(app: App, secrets: Secrets) -> Router {
    let shared = Arc::new(Shared {
        token: auth::TokenCheck::new(secrets.admin_token.as_deref()),
        throttle: throttle::AuthThrottle::default(),
        stripe: stripe::Client::new(&app.config.stripe.api_base, secrets.stripe_secret_key),
        webhook_secrets: secrets.webhook_secrets,
        console: ui::session::Sessions::new(secrets.admin_token.as_deref(), &app.store),
        unknown_checkouts: gateway::lookups::NotFound::new(std::time::Duration::from_secs(60)),
        openapi: std::sync::OnceLock::new(),
    });
    let (api, doc) = api_routes().split_for_parts();
    let doc = openapi::finish(doc)
        .to_json()
        .expect("the OpenAPI document serializes");
    let _ = shared.openapi.set(doc.into());
    let state = AdminState { app, shared };
    api.merge(ui::routes())
        .fallback(error::no_route)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::map_response(every_answer))
        .with_state(state)
}

/// What every admin answer gets on its way out: `Cache-Control: no-store` unless the handler
/// chose (answers carry balances, keys' prefixes and payment states, and a key may have come in
/// the query: no cache or proxy between may keep them), and for a body over [`MAX_BODY_BYTES`]
/// the JSON error (axum's own 413 is plain text) and `Connection: close`.
async fn every_answer(mut r: axum::response::Response) -> axum::response::Response {
    let json = r
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
        if !json {
            r = error::body_too_large().into_response();
        }
        // the rest of the body is never read: the connection closes after this answer, and
        // says so, so a client does not send its next request on it
        r.headers_mut().insert(
            header::CONNECTION,
            header::HeaderValue::from_static("close"),
        );
    }
    if !r.headers().contains_key(header::CACHE_CONTROL) {
        r.headers_mut().insert(
            header::CACHE_CONTROL,
            header::HeaderValue::from_static("no-store"),
        );
    }
    r
}

/// The metrics routes (served on `[metrics] listen`).
pub fn metrics_router() -> Router {
    Router::new().route("/metrics", get(metrics))
}

/// Live: the process answers.
#[utoipa::path(
    get, path = "/health", operation_id = "health", tag = "health",
    responses((status = 200, description = "The process answers", body = views::Health)),
)]
async fn health() -> Json<views::Health> {
    Json(views::Health { status: "ok" })
}

/// Ready: the database answers a query.
#[utoipa::path(
    get, path = "/ready", operation_id = "ready", tag = "health",
    responses(
        (status = 200, description = "Ready to serve", body = views::Ready),
        (status = 503, description = "The database does not answer", body = views::Ready),
    ),
)]
async fn ready(State(st): State<AdminState>) -> (StatusCode, Json<views::Ready>) {
    if st.app.store.ready().await.is_ok() {
        let ready = views::Ready {
            status: "ready",
            message: None,
        };
        (StatusCode::OK, Json(ready))
    } else {
        let down = views::Ready {
            status: "unavailable",
            message: Some("the database does not answer"),
        };
        (StatusCode::SERVICE_UNAVAILABLE, Json(down))
    }
}

async fn metrics() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        gateway::metrics::render(),
    )
}

/// The address a connection came from, for handlers (`ConnectInfo<Peer>`).
#[derive(Clone, Copy, Debug)]
pub struct Peer(pub SocketAddr);

/// An axum router on an already-bound listener, as a Pingora background service that stops
/// when the server shuts down.
pub struct HttpService {
    name: &'static str,
    listener: std::sync::Mutex<Option<std::net::TcpListener>>,
    router: Router,
    tls: Option<std::sync::Arc<tokio_rustls::rustls::ServerConfig>>,
    limits: gateway::config::ListenerLimits,
    trusted: gateway::forwarded::TrustedProxies,
}

impl HttpService {
    /// Binds now, so a taken port is an error at start-up, not a log line later.
    ///
    /// `SO_REUSEPORT`: in a graceful upgrade the new process binds beside the old one, which
    /// keeps answering until it exits, so the admin and metrics listeners never refuse.
    pub fn bind(
        name: &'static str,
        addr: SocketAddr,
        router: Router,
        limits: gateway::config::ListenerLimits,
        trusted: gateway::forwarded::TrustedProxies,
    ) -> std::io::Result<Self> {
        use socket2::{Domain, Socket, Type};
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        socket.bind(&addr.into())?;
        socket.listen(1024)?;
        HttpService::on(name, socket.into(), router, limits, trusted)
    }

    /// Serves on a listener the caller bound (a test binds port 0).
    pub fn on(
        name: &'static str,
        listener: std::net::TcpListener,
        router: Router,
        limits: gateway::config::ListenerLimits,
        trusted: gateway::forwarded::TrustedProxies,
    ) -> std::io::Result<Self> {
        listener.set_nonblocking(true)?;
        Ok(HttpService {
            name,
            listener: std::sync::Mutex::new(Some(listener)),
            router,
            tls: None,
            limits,
            trusted,
        })
    }

    /// Serves HTTPS with this certificate and key (PEM files), read now so a bad file is an
    /// error at start-up.
    pub fn with_tls(mut self, files: &gateway::config::TlsFiles) -> Result<Self, String> {
        self.tls = Some(tls::server_config(&files.cert, &files.key)?);
        Ok(self)
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        let l = self.listener.lock().ok()?;
        l.as_ref()?.local_addr().ok()
    }
}

/// Ends subscriptions whose grace or paid period ran out (their licenses back on `free`), every
/// few seconds: on several nodes each does it, and the store ends each once.
pub struct SubscriptionSweep {
    app: App,
}

impl SubscriptionSweep {
    /// How often it looks.
    pub const EVERY: std::time::Duration = std::time::Duration::from_secs(5);

    pub fn new(app: App) -> SubscriptionSweep {
        SubscriptionSweep { app }
    }
}

#[async_trait]
impl BackgroundService for SubscriptionSweep {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Self::EVERY) => {}
                _ = shutdown.changed() => return,
            }
            let svc = service::Service::of(&self.app);
            if let Err(e) = service::payments::end_due(&svc).await {
                tracing::warn!(error = ?e, "ending subscriptions that ran out failed; retrying");
            }
        }
    }
}

#[async_trait]
impl BackgroundService for HttpService {
    async fn start(&self, shutdown: ShutdownWatch) {
        let Some(std_listener) = self.listener.lock().ok().and_then(|mut l| l.take()) else {
            return;
        };
        let listener = match tokio::net::TcpListener::from_std(std_listener) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(service = self.name, error = %e, "cannot use the listener");
                return;
            }
        };
        serve::serve(
            self.name,
            listener,
            self.tls.clone(),
            self.router.clone(),
            self.limits,
            self.trusted.clone(),
            shutdown,
        )
        .await;
    }
}
