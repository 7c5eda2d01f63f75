//! The app's instances: one, or several chosen in turn or by license (consistent hashing, so a
//! customer stays on one instance while it is up), probed by a background health check. A
//! request whose instance cannot be connected to is retried on another before it fails; a
//! request that fails everywhere is answered 502 and not charged.

use std::sync::Arc;
use std::time::Duration;

use pingora::lb::selection::{Consistent, RoundRobin};
use pingora::lb::{health_check::TcpHealthCheck, Backend, LoadBalancer};
use pingora::prelude::HttpPeer;
use pingora::server::Server;
use pingora::services::background::background_service;

use crate::config::{Balance, ProxyConfig};

/// Connection settings every upstream peer gets.
#[derive(Clone, Debug)]
pub struct PeerOptions {
    /// TLS to the upstream, with this SNI (verified against its certificate).
    pub tls: Option<String>,
    /// HTTP/2 (h2c without TLS): up to 100 requests share a connection.
    pub h2: bool,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    pub write_timeout: Duration,
    pub idle_timeout: Duration,
}

enum Pick {
    /// Resolved once, at start.
    Single(Box<HttpPeer>),
    RoundRobin(Arc<LoadBalancer<RoundRobin>>),
    Hash(Arc<LoadBalancer<Consistent>>),
}

pub struct Upstreams {
    pick: Pick,
    count: usize,
    opts: PeerOptions,
}

impl Upstreams {
    /// The upstreams of `config`; with several, their health check runs as a service of
    /// `server`.
    pub fn new(config: &ProxyConfig, server: &mut Server) -> anyhow::Result<Upstreams> {
        let opts = PeerOptions {
            tls: config.upstream_tls.then(|| {
                config.upstream_sni.clone().unwrap_or_else(|| {
                    // the host part of the first upstream
                    let first = &config.upstreams[0];
                    first
                        .rsplit_once(':')
                        .map_or(first.as_str(), |(h, _)| h)
                        .trim_matches(['[', ']'])
                        .to_string()
                })
            }),
            h2: config.upstream_h2,
            connect_timeout: config.upstream_connect_timeout,
            read_timeout: config.upstream_read_timeout,
            write_timeout: config.upstream_write_timeout,
            idle_timeout: config.upstream_idle_timeout,
        };
        let count = config.upstreams.len();
        if count == 1 {
            let addr = config.upstreams[0].as_str();
            let resolved = std::net::ToSocketAddrs::to_socket_addrs(addr)
                .ok()
                .and_then(|mut a| a.next())
                .ok_or_else(|| anyhow::anyhow!("proxy.upstream: cannot resolve {addr}"))?;
            let peer = HttpPeer::new(
                resolved,
                opts.tls.is_some(),
                opts.tls.clone().unwrap_or_default(),
            );
            return Ok(Upstreams {
                pick: Pick::Single(Box::new(peer)),
                count,
                opts,
            });
        }
        fn balancer<S>(
            config: &ProxyConfig,
            server: &mut Server,
        ) -> anyhow::Result<Arc<LoadBalancer<S>>>
        where
            S: pingora::lb::selection::BackendSelection + Send + Sync + 'static,
            S::Iter: pingora::lb::selection::BackendIter,
        {
            let mut lb =
                LoadBalancer::<S>::try_from_iter(config.upstreams.iter().map(String::as_str))
                    .map_err(|e| anyhow::anyhow!("proxy.upstream: {e}"))?;
            if let Some(every) = config.health_check_interval {
                lb.set_health_check(TcpHealthCheck::new());
                lb.health_check_frequency = Some(every);
                lb.parallel_health_check = true;
            }
            let service = background_service("tollgate upstream health", lb);
            let lb = service.task();
            server.add_service(service);
            Ok(lb)
        }
        let pick = match config.balance {
            Balance::RoundRobin => Pick::RoundRobin(balancer(config, server)?),
            Balance::HashLicense => Pick::Hash(balancer(config, server)?),
        };
        Ok(Upstreams { pick, count, opts })
    }

    /// How many instances there are.
    pub fn count(&self) -> usize {
        self.count
    }

    /// An instance for a request keyed `key` (the license id; empty for guests), avoiding
    /// `failed` (instances this request could not connect to); `None` when none is left.
    pub fn peer(&self, key: &[u8], failed: &[std::net::SocketAddr]) -> Option<Box<HttpPeer>> {
        let untried = |b: &Backend| !b.addr.as_inet().is_some_and(|a| failed.contains(a));
        // healthy and untried first; if the checks say none is healthy, any untried one
        let backend = match &self.pick {
            Pick::Single(peer) => {
                return failed
                    .is_empty()
                    .then(|| self.with_options((**peer).clone()));
            }
            Pick::RoundRobin(lb) => lb
                .select_with(key, 256, |b, healthy| healthy && untried(b))
                .or_else(|| lb.select_with(key, 256, |b, _| untried(b))),
            Pick::Hash(lb) => lb
                .select_with(key, 256, |b, healthy| healthy && untried(b))
                .or_else(|| lb.select_with(key, 256, |b, _| untried(b))),
        }?;
        let addr = *backend.addr.as_inet()?;
        let (tls, sni) = (
            self.opts.tls.is_some(),
            self.opts.tls.clone().unwrap_or_default(),
        );
        Some(self.with_options(HttpPeer::new(addr, tls, sni)))
    }

    fn with_options(&self, mut peer: HttpPeer) -> Box<HttpPeer> {
        let o = &mut peer.options;
        o.connection_timeout = Some(self.opts.connect_timeout);
        o.read_timeout = Some(self.opts.read_timeout);
        o.write_timeout = Some(self.opts.write_timeout);
        o.idle_timeout = Some(self.opts.idle_timeout);
        if self.opts.h2 {
            // HTTP/2 only: over plain TCP there is no ALPN, and Pingora trusts the app speaks
            // h2c when the lowest version allowed is 2
            o.alpn = pingora::protocols::ALPN::H2;
            o.max_h2_streams = 100;
        }
        if self.opts.tls.is_some() {
            o.verify_cert = true;
            o.verify_hostname = true;
        }
        Box::new(peer)
    }
}
