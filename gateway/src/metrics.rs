//! Prometheus metrics, named as DESIGN.md lists them. Label values are a fixed set and never a
//! key or license; the children used on the hot path are resolved once, so counting a request
//! is an atomic add, not a label lookup.

use std::sync::LazyLock;

use prometheus::{
    register_counter, register_gauge, register_histogram, register_histogram_vec,
    register_int_counter, register_int_counter_vec, register_int_gauge, Counter, Gauge, Histogram,
    HistogramVec, IntCounter, IntCounterVec, IntGauge,
};

/// Buckets from 100 µs to 10 s: a proxy's own latency is at the bottom, slow apps at the top.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

pub static REQUESTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "tollgate_requests_total",
        "Requests that reached the gateway, by outcome (ok, denied, upstream_error, free).",
        &["outcome"]
    )
    .expect("metric registers once")
});

pub static UNITS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "tollgate_units_total",
        "Units of each meter charged (what the app reported on reported routes).",
        &["meter"]
    )
    .expect("metric registers once")
});

pub static USAGE_REPORTS_REFUSED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "tollgate_usage_reports_refused_total",
        "Usage reports of the app not taken (the request is charged its time instead), by why.",
        &["reason"]
    )
    .expect("metric registers once")
});

pub static DENIED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "tollgate_denied_total",
        "Requests refused before reaching the upstream, by error code.",
        &["reason"]
    )
    .expect("metric registers once")
});

pub static REQUEST_DURATION: LazyLock<HistogramVec> = LazyLock::new(|| {
    register_histogram_vec!(
        "tollgate_request_duration_seconds",
        "Time from request start to the end of the response, by outcome.",
        &["outcome"],
        LATENCY_BUCKETS.to_vec()
    )
    .expect("metric registers once")
});

pub static UPSTREAM_ERRORS: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "tollgate_upstream_errors_total",
        "Requests that failed because the upstream could not be reached or failed mid-response."
    )
    .expect("metric registers once")
});

pub static FLUSH_DURATION: LazyLock<Histogram> = LazyLock::new(|| {
    register_histogram!(
        "tollgate_flush_duration_seconds",
        "Time to commit one flush batch to the store.",
        LATENCY_BUCKETS.to_vec()
    )
    .expect("metric registers once")
});

pub static FLUSHED_ROWS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "tollgate_flushed_rows_total",
        "Rows committed by the flusher, by table.",
        &["table"]
    )
    .expect("metric registers once")
});

pub static PENDING_LOG_ROWS: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!(
        "tollgate_pending_log_rows",
        "Access-log rows waiting to be written."
    )
    .expect("metric registers once")
});

pub static PENDING_CHARGES: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!(
        "tollgate_pending_charges",
        "Licenses whose usage the last failed flush could not commit (0 after a commit); \
         it is kept in memory, one entry per license, and retried."
    )
    .expect("metric registers once")
});

pub static PENDING_CHARGE_SECONDS: LazyLock<Gauge> = LazyLock::new(|| {
    register_gauge!(
        "tollgate_pending_charge_seconds",
        "Seconds of usage the last failed flush could not commit (0 after a commit)."
    )
    .expect("metric registers once")
});

pub static LICENSE_CHANGES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "tollgate_license_changes_total",
        "License rows adopted from the store, by how they came: the poll (every row changed in \
         its window, usage included) or the database's notices (PostgreSQL).",
        &["source"]
    )
    .expect("metric registers once")
});

pub static LEASES_HELD: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!(
        "tollgate_leases_held",
        "Licenses this node holds a lease with time left on (several nodes)."
    )
    .expect("metric registers once")
});

pub static LOOKUPS_REFUSED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "tollgate_unknown_lookups_refused_total",
        "Requests refused without a database lookup because the budget of lookups that find \
         nothing (made-up keys, cookies, checkout sessions; proxy.unknown_lookups_per_second) \
         was spent, by what was named.",
        &["what"]
    )
    .expect("metric registers once")
});

pub static LEASES_STRANDED: LazyLock<Gauge> = LazyLock::new(|| {
    register_gauge!(
        "tollgate_leases_stranded_seconds",
        "Seconds of balance this process's lease rows reserve in the database beyond what it \
         holds in memory, at the last heartbeat (several nodes): 0 but for a grant or flush \
         landing between the two readings; anything that stays is balance nobody can spend."
    )
    .expect("metric registers once")
});

pub static FLUSHES_IN_DOUBT: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "tollgate_flushes_in_doubt_total",
        "Flushes whose COMMIT got no answer (PostgreSQL): held until the database said whether \
         they committed, then applied or retried, never both."
    )
    .expect("metric registers once")
});

pub static LEASE_REQUESTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "tollgate_lease_requests_total",
        "Lease slices asked for, per license, by result: granted (some or all), refused \
         (nothing unreserved left), failed (the store did not answer).",
        &["result"]
    )
    .expect("metric registers once")
});

pub static CLUSTER_NODES: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!(
        "tollgate_cluster_nodes",
        "Nodes alive on the shared database at the last heartbeat, this one included (1 on \
         SQLite)."
    )
    .expect("metric registers once")
});

pub static LOG_ROWS_DROPPED: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "tollgate_log_rows_dropped_total",
        "Access-log rows dropped because the queue was full (charges are never dropped)."
    )
    .expect("metric registers once")
});

pub static LOG_ROWS_SKIPPED: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "tollgate_log_rows_skipped_total",
        "Access-log rows not written for requests refused without a known license, past \
         storage.unauthenticated_log_rows_per_s (each is still counted in refused_minutes)."
    )
    .expect("metric registers once")
});

pub static ACTIVE_SESSIONS: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!("tollgate_active_sessions", "Open usage sessions.")
        .expect("metric registers once")
});

pub static CACHED_KEYS: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!(
        "tollgate_cached_keys",
        "License keys held in the in-memory cache."
    )
    .expect("metric registers once")
});

pub static STORE_ERRORS: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "tollgate_store_errors_total",
        "Failed store operations (flushes are retried; nothing pending is lost)."
    )
    .expect("metric registers once")
});

pub static CHARGED_SECONDS: LazyLock<Counter> = LazyLock::new(|| {
    register_counter!(
        "tollgate_charged_seconds_total",
        "Seconds deducted from balances by committed usage."
    )
    .expect("metric registers once")
});

pub static CREDITED_SECONDS: LazyLock<Counter> = LazyLock::new(|| {
    register_counter!(
        "tollgate_credited_seconds_total",
        "Seconds added to balances (purchases and manual credits)."
    )
    .expect("metric registers once")
});

pub static CONNECTIONS_REFUSED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "tollgate_connections_refused_total",
        "Connections closed as they were accepted because their listener was at its cap.",
        &["listener"]
    )
    .expect("metric registers once")
});

pub static TLS_HANDSHAKE_TIMEOUTS: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "tollgate_tls_handshake_timeouts_total",
        "Connections to the proxy's HTTPS listener closed because their TLS handshake did not \
         end within proxy.tls_handshake_timeout_ms."
    )
    .expect("metric registers once")
});

pub static ADMIN_AUTH_FAILURES: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "tollgate_admin_auth_failures_total",
        "Wrong admin tokens presented to the operator API or the console's sign-in."
    )
    .expect("metric registers once")
});

pub static PAYMENT_MISMATCHES: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "tollgate_payment_mismatches_total",
        "Fulfilled payments whose paid amount or currency differed from what was priced \
         (never more time than was paid for is credited; the payment row says why)."
    )
    .expect("metric registers once")
});

pub static STRIPE_EVENTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "tollgate_stripe_events_total",
        "Stripe webhook deliveries by event type (known types, else `other`) and result.",
        &["type", "result"]
    )
    .expect("metric registers once")
});

/// The event types `tollgate_stripe_events_total` names; anything else is counted as `other`.
pub const STRIPE_EVENT_TYPES: &[&str] = &[
    "checkout.session.completed",
    "checkout.session.async_payment_succeeded",
    "checkout.session.async_payment_failed",
    "checkout.session.expired",
    "charge.refunded",
];

/// Counts a webhook delivery, keeping the `type` label bounded.
pub fn stripe_event(event_type: &str, result: &str) {
    let t = STRIPE_EVENT_TYPES
        .iter()
        .find(|t| **t == event_type)
        .copied()
        .unwrap_or("other");
    STRIPE_EVENTS.with_label_values(&[t, result]).inc();
}

/// The outcome children used per request, resolved once.
pub struct RequestMetrics {
    pub ok: IntCounter,
    pub denied: IntCounter,
    pub upstream_error: IntCounter,
    pub free: IntCounter,
    pub client_closed: IntCounter,
    pub ok_duration: Histogram,
    pub denied_duration: Histogram,
    pub upstream_error_duration: Histogram,
    pub free_duration: Histogram,
    pub client_closed_duration: Histogram,
}

pub static REQUEST: LazyLock<RequestMetrics> = LazyLock::new(|| {
    let c = |o: &str| REQUESTS.with_label_values(&[o]);
    let h = |o: &str| REQUEST_DURATION.with_label_values(&[o]);
    RequestMetrics {
        ok: c("ok"),
        denied: c("denied"),
        upstream_error: c("upstream_error"),
        free: c("free"),
        client_closed: c("client_closed"),
        ok_duration: h("ok"),
        denied_duration: h("denied"),
        upstream_error_duration: h("upstream_error"),
        free_duration: h("free"),
        client_closed_duration: h("client_closed"),
    }
});

/// Touches every metric so `/metrics` lists them all from the start, at zero.
pub fn init() {
    LazyLock::force(&REQUEST);
    for reason in crate::errors::DENIAL_CODES {
        DENIED.with_label_values(&[reason]);
    }
    for table in ["usage_history", "usage_sessions", "access_logs"] {
        FLUSHED_ROWS.with_label_values(&[table]);
    }
    LazyLock::force(&UPSTREAM_ERRORS);
    LazyLock::force(&FLUSH_DURATION);
    LazyLock::force(&PENDING_LOG_ROWS);
    LazyLock::force(&PENDING_CHARGES);
    CLUSTER_NODES.set(1);
    LazyLock::force(&LEASES_HELD);
    LazyLock::force(&LEASES_STRANDED);
    for what in ["license_key", "console_session", "checkout_session"] {
        LOOKUPS_REFUSED.with_label_values(&[what]);
    }
    LazyLock::force(&FLUSHES_IN_DOUBT);
    for result in ["granted", "refused", "failed"] {
        LEASE_REQUESTS.with_label_values(&[result]);
    }
    for source in ["poll", "notify"] {
        LICENSE_CHANGES.with_label_values(&[source]);
    }
    LazyLock::force(&PENDING_CHARGE_SECONDS);
    LazyLock::force(&LOG_ROWS_DROPPED);
    LazyLock::force(&LOG_ROWS_SKIPPED);
    LazyLock::force(&ACTIVE_SESSIONS);
    LazyLock::force(&CACHED_KEYS);
    LazyLock::force(&STORE_ERRORS);
    LazyLock::force(&CHARGED_SECONDS);
    LazyLock::force(&CREDITED_SECONDS);
    LazyLock::force(&PAYMENT_MISMATCHES);
    LazyLock::force(&ADMIN_AUTH_FAILURES);
    LazyLock::force(&TLS_HANDSHAKE_TIMEOUTS);
    for l in ["proxy", "tollgate admin", "tollgate metrics"] {
        CONNECTIONS_REFUSED.with_label_values(&[l]);
    }
    for reason in [
        "missing",
        "malformed",
        "unknown_meter",
        "not_on_route",
        "negative",
        "over_max",
    ] {
        USAGE_REPORTS_REFUSED.with_label_values(&[reason]);
    }
    // the (type, result) pairs that can happen, at zero, so dashboards and alerts see them
    let session = ["credited", "already_paid", "duplicate", "not_ours", "error"];
    for (t, results) in [
        ("checkout.session.completed", &["awaiting_payment"][..]),
        ("checkout.session.async_payment_succeeded", &[][..]),
    ] {
        for r in session.iter().chain(results) {
            STRIPE_EVENTS.with_label_values(&[t, r]);
        }
    }
    for t in [
        "checkout.session.async_payment_failed",
        "checkout.session.expired",
    ] {
        for r in ["ignored", "duplicate"] {
            STRIPE_EVENTS.with_label_values(&[t, r]);
        }
    }
    for r in [
        "refunded",
        "refund_held",
        "refund_noop",
        "duplicate",
        "not_ours",
        "error",
    ] {
        STRIPE_EVENTS.with_label_values(&["charge.refunded", r]);
    }
    for r in [
        "ignored",
        "duplicate",
        "invalid_signature",
        "bad_request",
        "error",
    ] {
        STRIPE_EVENTS.with_label_values(&["other", r]);
    }
}

/// The default registry in Prometheus text format.
pub fn render() -> String {
    use prometheus::Encoder;
    let mut buf = Vec::new();
    let _ = prometheus::TextEncoder::new().encode(&prometheus::gather(), &mut buf);
    String::from_utf8(buf).unwrap_or_default()
}
