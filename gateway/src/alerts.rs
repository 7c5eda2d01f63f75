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

/// The `type` of every alert event.
pub const EVENT_TYPE: &str = "usage.threshold_crossed";

/// The event as announced (and as the admin API lists it).
pub fn payload(a: &Alert) -> serde_json::Value {
    serde_json::json!({
        "id": a.id,
        "type": EVENT_TYPE,
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

/// The alert in a sentence, for people reading the webhook (a chat message, an email):
/// durations as the console shows them, never rounded up.
pub fn text(a: &Alert) -> String {
    let time = timefmt::duration;
    let (what, used, of, left): (std::borrow::Cow<str>, _, _, _) = match a.kind.as_str() {
        "period_time" => (
            "of this period's time".into(),
            time(a.used),
            time(a.allowance),
            time(a.allowance - a.used),
        ),
        "period_requests" => (
            "of this period's requests".into(),
            timefmt::grouped(a.used),
            timefmt::grouped(a.allowance),
            timefmt::grouped(a.allowance - a.used),
        ),
        "balance" => (
            "of its prepaid time since the last top-up".into(),
            time(a.used),
            time(a.allowance),
            time(a.allowance - a.used),
        ),
        kind if kind.starts_with("period_units.") => (
            format!("of this period's {}", &kind["period_units.".len()..]).into(),
            timefmt::grouped(a.used),
            timefmt::grouped(a.allowance),
            timefmt::grouped(a.allowance - a.used),
        ),
        other => (
            other.into(),
            a.used.to_string(),
            a.allowance.to_string(),
            String::new(),
        ),
    };
    let left = if a.used >= a.allowance || left.is_empty() {
        String::new()
    } else {
        format!("; {left} left")
    };
    format!(
        "License {} has used {} % {what}: {used} of {of}{left}.",
        a.license_id, a.threshold_percent
    )
}

/// The webhook's body: the alert's JSON and, in `text`, the alert in a sentence.
fn body(a: &Alert) -> String {
    let mut v = payload(a);
    v["text"] = text(a).into();
    v.to_string()
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
        let body = body(&alert);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn alert(kind: &str, threshold_percent: i64, used: i64, allowance: i64) -> Alert {
        Alert {
            id: 1,
            license_id: 7,
            kind: kind.into(),
            threshold_percent,
            period_start: 0,
            used,
            allowance,
            created_at: 0,
            attempts: 0,
            delivered_at: None,
        }
    }

    #[test]
    fn an_alert_reads_as_a_sentence_with_durations_as_the_console_shows_them() {
        assert_eq!(
            text(&alert("period_time", 80, 1_440_500, 1_800_000)),
            "License 7 has used 80 % of this period's time: 24 min of 30 min; 5 min 59 s left."
        );
        assert_eq!(
            text(&alert("period_requests", 80, 8, 10)),
            "License 7 has used 80 % of this period's requests: 8 of 10; 2 left."
        );
        assert_eq!(
            text(&alert("period_units.audio_seconds", 100, 1_800, 1_800)),
            "License 7 has used 100 % of this period's audio_seconds: 1,800 of 1,800."
        );
        assert_eq!(
            text(&alert("balance", 100, 18_001_250, 18_000_000)),
            "License 7 has used 100 % of its prepaid time since the last top-up: 5 h of 5 h."
        );
    }

    #[test]
    fn the_webhook_body_keeps_its_fields_and_adds_the_text() {
        let a = alert("period_requests", 80, 8, 10);
        let v: serde_json::Value = serde_json::from_str(&body(&a)).unwrap();
        assert_eq!(v["type"], "usage.threshold_crossed");
        assert_eq!(v["used"], 8);
        assert_eq!(v["text"], text(&a));
        let mut without = v.clone();
        without.as_object_mut().unwrap().remove("text");
        assert_eq!(without, payload(&a));
    }
}
