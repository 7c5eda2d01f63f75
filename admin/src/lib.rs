//! The admin HTTP server (axum), run inside the gateway's process as a Pingora background
//! service. For now it answers `/health` and `/ready`; the licenses API, payments and the
//! console come next. The same service type also serves `/metrics` on its own listener.

use std::net::SocketAddr;

use async_trait::async_trait;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use gateway::server::App;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use serde_json::json;

/// The admin routes.
pub fn router(app: App) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .with_state(app)
}

/// The metrics routes (served on `[metrics] listen`).
pub fn metrics_router() -> Router {
    Router::new().route("/metrics", get(metrics))
}

/// Live: the process answers.
async fn health() -> impl IntoResponse {
    Json(json!({"status": "ok"}))
}

/// Ready: the database answers a query.
async fn ready(State(app): State<App>) -> impl IntoResponse {
    let ok = app
        .store
        .read(|c| Ok(c.query_row("SELECT 1", [], |r| r.get::<_, i64>(0))?))
        .await
        .is_ok();
    if ok {
        (StatusCode::OK, Json(json!({"status": "ready"})))
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "unavailable", "message": "the database does not answer"})),
        )
    }
}

async fn metrics() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        gateway::metrics::render(),
    )
}

/// An axum router on an already-bound listener, as a Pingora background service that stops
/// when the server shuts down.
pub struct HttpService {
    name: &'static str,
    listener: std::sync::Mutex<Option<std::net::TcpListener>>,
    router: Router,
}

impl HttpService {
    /// Binds now, so a taken port is an error at start-up, not a log line later.
    pub fn bind(name: &'static str, addr: SocketAddr, router: Router) -> std::io::Result<Self> {
        let listener = std::net::TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        Ok(HttpService {
            name,
            listener: std::sync::Mutex::new(Some(listener)),
            router,
        })
    }

    pub fn local_addr(&self) -> Option<SocketAddr> {
        let l = self.listener.lock().ok()?;
        l.as_ref()?.local_addr().ok()
    }
}

#[async_trait]
impl BackgroundService for HttpService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
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
        let served = axum::serve(listener, self.router.clone())
            .with_graceful_shutdown(async move {
                let _ = shutdown.changed().await;
            })
            .await;
        if let Err(e) = served {
            tracing::error!(service = self.name, error = %e, "server stopped with an error");
        }
    }
}
