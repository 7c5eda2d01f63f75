//! `[proxy]`: the public listener (and its HTTPS one), the upstreams and how they are reached,
//! the downstream timeouts and caps, the free paths, keyless requests, the caches.

use super::*;

/// `[proxy]`, every key checked; `[admin]` falls back on its `trusted_proxies`, and `[[routes]]`
/// and the plans are checked against its `free_paths`, `upstream_h2` and `anonymous`.
pub(super) fn parse(root: &Table, errors: &mut Vec<String>) -> ProxyConfig {
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
        max_in_flight_per_client: s.uint("max_in_flight_per_client", 256, 1, 10_000_000) as usize,
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
        response_headers: s.bool("response_headers", true),
    };
    s.finish(errors);
    proxy
}
