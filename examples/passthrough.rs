//! A bare Pingora 0.9 passthrough proxy (no keys, no metering): the baseline Tollgate is
//! measured against in `benches/compare.sh`. Same server settings as `tollgate serve`.
//!
//! `cargo run --release --example passthrough -- LISTEN UPSTREAM THREADS [TLS_LISTEN CERT KEY]`
//!
//! With TLS_LISTEN, it also listens for HTTPS there: Pingora's own rustls listener (ring, as
//! Tollgate's), with the certificate and key in the PEM files CERT and KEY.

use async_trait::async_trait;
use pingora::prelude::*;
use pingora::server::configuration::ServerConf;

/// The same allocator as `tollgate`, so the comparison measures metering, not malloc.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct Passthrough(HttpPeer);

#[async_trait]
impl ProxyHttp for Passthrough {
    type CTX = ();
    fn new_ctx(&self) {}

    async fn upstream_peer(&self, _s: &mut Session, _c: &mut ()) -> Result<Box<HttpPeer>> {
        Ok(Box::new(self.0.clone()))
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (listen, upstream) = (&args[1], &args[2]);
    let threads: usize = args[3].parse().expect("THREADS is a number");
    let conf = ServerConf {
        threads,
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(1),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut proxy = pingora::proxy::http_proxy_service(
        &server.configuration,
        Passthrough(HttpPeer::new(upstream.as_str(), false, String::new())),
    );
    proxy.add_tcp(listen);
    match &args[4.min(args.len())..] {
        [] => {}
        [tls_listen, cert, key] => proxy
            .add_tls(tls_listen, cert, key)
            .expect("the certificate and key load"),
        _ => {
            eprintln!("usage: passthrough LISTEN UPSTREAM THREADS [TLS_LISTEN CERT KEY]");
            std::process::exit(2);
        }
    }
    server.add_service(proxy);
    server.run_forever();
}
