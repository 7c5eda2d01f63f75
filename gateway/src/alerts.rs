//! Alert delivery: each new usage alert is POSTed as JSON to `[alerts] webhook_url`, signed like
//! Stripe's webhooks (`Tollgate-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "{t}.{body}"
//! keyed by TOLLGATE_ALERT_SECRET>`), and retried with doubling backoff. This runs as its own
//! background service: the proxy never waits for it, and a receiver that is down costs nothing
//! but retries. Every attempt is noted on the alert's row; alerts still undelivered from the
//! last day are sent again after a restart.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use hmac::{Hmac, Mac};
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use sha2::Sha256;
use tokio::sync::mpsc;

use crate::ledger::now_ms;
use crate::store::{Alert, SharedStore};
use crate::timefmt;

/// Where the flusher hands new alerts to the notifier.
#[derive(Clone)]
pub struct AlertQueue(mpsc::UnboundedSender<Alert>);

impl AlertQueue {
    pub fn send(&self, alert: Alert) {
        let _ = self.0.send(alert);
    }
}

/// The event as announced (and as the admin API lists it).
pub fn payload(a: &Alert) -> serde_json::Value {
    serde_json::json!({
        "id": a.id,
        "type": "usage.threshold_crossed",
        "license_id": a.license_id,
        "kind": a.kind,
        "threshold_percent": a.threshold_percent,
        "used": a.used,
        "allowance": a.allowance,
        "period_start": timefmt::rfc3339(a.period_start),
        "created_at": timefmt::rfc3339(a.created_at),
    })
}

/// The `Tollgate-Signature` header for `body` at Unix time `t`.
pub fn signature(secret: &str, t: i64, body: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(format!("{t}.{body}").as_bytes());
    format!("t={t},v1={}", hex::encode(mac.finalize().into_bytes()))
}

pub struct Notifier {
    rx: Mutex<Option<mpsc::UnboundedReceiver<Alert>>>,
    http: reqwest::Client,
    url: String,
    secret: Option<String>,
    max_attempts: u32,
    store: SharedStore,
}

impl Notifier {
    /// A notifier for `url`, and the queue that feeds it.
    pub fn new(
        store: SharedStore,
        url: String,
        secret: Option<String>,
        max_attempts: u32,
    ) -> (Arc<Notifier>, AlertQueue) {
        let (tx, rx) = mpsc::unbounded_channel();
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(10))
            .build()
            .expect("a reqwest client builds");
        let n = Notifier {
            rx: Mutex::new(Some(rx)),
            http,
            url,
            secret,
            max_attempts,
            store,
        };
        (Arc::new(n), AlertQueue(tx))
    }

    async fn attempt(&self, body: &str) -> Result<(), String> {
        let mut req = self
            .http
            .post(&self.url)
            .header("Content-Type", "application/json")
            .body(body.to_string());
        if let Some(secret) = &self.secret {
            let t = now_ms().div_euclid(1000);
            req = req.header("Tollgate-Signature", signature(secret, t, body));
        }
        match req.send().await {
            Ok(r) if r.status().is_success() => Ok(()),
            Ok(r) => Err(format!("the receiver answered {}", r.status())),
            Err(e) => Err(format!(
                "the receiver could not be reached: {}",
                e.without_url()
            )),
        }
    }

    /// Sends one alert until it is accepted or the attempts run out.
    async fn deliver(self: Arc<Self>, alert: Alert) {
        let body = payload(&alert).to_string();
        let mut backoff = Duration::from_secs(1);
        for attempt in 1..=self.max_attempts {
            let result = self.attempt(&body).await;
            let error = result.as_ref().err().cloned();
            let id = alert.id;
            let noted = self.store.alert_attempted(id, error, now_ms()).await;
            if let Err(e) = noted {
                tracing::warn!(alert = id, error = %e, "could not note an alert delivery");
            }
            match result {
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!(alert = alert.id, attempt, error = %e, "alert delivery failed");
                }
            }
            if attempt < self.max_attempts {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(60));
            }
        }
    }
}

/// The notifier as a Pingora background service.
pub struct NotifierService(pub Arc<Notifier>);

#[async_trait]
impl BackgroundService for NotifierService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let Some(mut rx) = self.0.rx.lock().ok().and_then(|mut r| r.take()) else {
            return;
        };
        let since = now_ms() - 86_400_000;
        match self.0.store.undelivered_alerts(since).await {
            Ok(pending) => {
                for a in pending {
                    tokio::spawn(self.0.clone().deliver(a));
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not read undelivered alerts"),
        }
        loop {
            tokio::select! {
                a = rx.recv() => match a {
                    Some(a) => {
                        tokio::spawn(self.0.clone().deliver(a));
                    }
                    None => return,
                },
                _ = shutdown.changed() => return,
            }
        }
    }
}
