//! The admin and metrics listeners' serve loop: HTTP/1.1 over hyper, with what `axum::serve`
//! leaves out and a listener that faces the internet needs.
//!
//! - A deadline on every request head (`header_timeout_ms`), from the connection's start, after
//!   its TLS handshake, and from the end of each answer: a silent connection, a trickled head
//!   and an idle kept-alive connection are all closed after it. (`axum::serve` builds hyper
//!   without a timer, so none of these were ever timed.)
//! - Caps on connections open at once (`max_connections`, kept within an eighth of the
//!   process's descriptors, see [`gateway::fds`], and `max_connections_per_client`): one past
//!   either is closed as it is accepted, so these listeners can never take the descriptors the
//!   proxy needs, and one client cannot take every place.
//! - TLS handshakes in the connection's own task, each with a deadline, so a slow client never
//!   holds up the accept loop.
//! - When the process runs out of descriptors anyway, the accept loop waits a little instead
//!   of spinning on the error.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use gateway::config::ListenerLimits;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use pingora::server::ShutdownWatch;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

use crate::Peer;

/// A client has this long to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// An I/O stream that fails with `TimedOut` once it has waited its limit without a byte read or
/// written: hyper times only request heads. (An idle kept-alive connection is closed sooner,
/// by the head deadline.)
struct Stalls<I> {
    inner: I,
    limit: Duration,
    timer: std::pin::Pin<Box<tokio::time::Sleep>>,
    armed: bool,
}

impl<I> Stalls<I> {
    fn new(inner: I, limit: Duration) -> Stalls<I> {
        Stalls {
            inner,
            limit,
            timer: Box::pin(tokio::time::sleep(limit)),
            armed: false,
        }
    }

    /// After a poll: a byte moved disarms the timer; waiting arms it (once) and checks it. A
    /// flush with nothing to flush is no progress (it would push the deadline out for ever).
    fn after<T>(
        &mut self,
        cx: &mut std::task::Context<'_>,
        polled: std::task::Poll<std::io::Result<T>>,
        moved: bool,
    ) -> std::task::Poll<std::io::Result<T>> {
        use std::future::Future;
        use std::task::Poll;
        match polled {
            Poll::Ready(r) => {
                if moved {
                    self.armed = false;
                }
                Poll::Ready(r)
            }
            Poll::Pending => {
                if !self.armed {
                    self.armed = true;
                    let deadline = tokio::time::Instant::now() + self.limit;
                    self.timer.as_mut().reset(deadline);
                }
                match self.timer.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "no byte moved for too long",
                    ))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for Stalls<I> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        let moved = buf.filled().len() > before;
        self.after(cx, polled, moved)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Stalls<I> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        let moved = matches!(polled, std::task::Poll::Ready(Ok(n)) if n > 0);
        self.after(cx, polled, moved)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_flush(cx);
        self.after(cx, polled, false)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Serves `router` on `listener` until `shutdown` changes.
pub async fn serve(
    name: &'static str,
    listener: TcpListener,
    tls: Option<Arc<ServerConfig>>,
    router: Router,
    limits: ListenerLimits,
    trusted: gateway::forwarded::TrustedProxies,
    mut shutdown: ShutdownWatch,
) {
    let cap = gateway::fds::cap(limits.max_connections, gateway::fds::Budget::now().side);
    if cap < limits.max_connections {
        tracing::warn!(
            service = name,
            configured = limits.max_connections,
            cap,
            "max_connections lowered to this listener's share of the descriptor limit, for the \
             proxy's sake"
        );
    }
    let places = gateway::conn_limit::ConnLimit::new(cap, limits.max_connections_per_client);
    let acceptor = tls.map(TlsAcceptor::from);
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            _ = shutdown.changed() => return,
        };
        let (tcp, peer) = match accepted {
            Ok(c) => c,
            Err(e) => {
                // out of descriptors (or another passing error): try again shortly
                tracing::warn!(service = name, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // a trusted proxy carries many clients: it counts in the total only
        let client = Some(peer.ip()).filter(|ip| !trusted.trusts(*ip));
        let Some(place) = places.admit(client) else {
            gateway::metrics::CONNECTIONS_REFUSED
                .with_label_values(&[name])
                .inc();
            drop(tcp); // over the cap: closed at once, holding nothing
            continue;
        };
        let (router, acceptor) = (router.clone(), acceptor.clone());
        tokio::spawn(async move {
            let _place = place;
            let _ = tcp.set_nodelay(true);
            match acceptor {
                None => connection(tcp, peer, router, limits.header_timeout).await,
                Some(acceptor) => {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => connection(tls, peer, router, limits.header_timeout).await,
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                }
            }
        });
    }
}

/// One connection, its requests served one after the other, each head on a deadline, and the
/// whole connection closed once nothing has moved either way for three head deadlines (30 s by
/// default) while it waits: a body stalled after its head, an answer the client never reads.
async fn connection<I>(io: I, peer: SocketAddr, router: Router, header_timeout: Duration)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let io = Stalls::new(io, header_timeout * 3);
    let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        req.extensions_mut().insert(ConnectInfo(Peer(peer)));
        let router = router.clone();
        async move {
            let r: Result<_, Infallible> = router.oneshot(req.map(axum::body::Body::new)).await;
            r
        }
    });
    let served = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades()
        .await;
    if let Err(e) = served {
        tracing::debug!(%peer, error = %e, "admin connection ended");
    }
}
