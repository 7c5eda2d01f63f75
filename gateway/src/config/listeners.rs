//! `[admin]` and `[metrics]`: the side listeners, each with its own address and caps.

use super::*;

/// `[admin]`: its address, its TLS files, its caps, and the load balancers it believes (those of
/// `[proxy]`, read before it, unless it names its own).
pub(super) fn admin(root: &Table, errors: &mut Vec<String>, proxy: &ProxyConfig) -> AdminConfig {
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
    admin
}

/// `[metrics]`: the Prometheus listener's address and caps.
pub(super) fn metrics(root: &Table, errors: &mut Vec<String>) -> MetricsConfig {
    let mut s = Section::new(root, "metrics");
    let metrics = MetricsConfig {
        listen: s.addr("listen", "127.0.0.1:9464"),
        limits: s.listener_limits(64, 16),
    };
    s.finish(errors);
    metrics
}
