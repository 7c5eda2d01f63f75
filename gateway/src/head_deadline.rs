//! The proxy's connections from their accept: a place under the connection caps, the TLS
//! handshake (HTTPS), and a deadline on each request's head.
//!
//! A connection takes its place (`proxy.max_connections`, per client
//! `max_connections_per_client`) as it is accepted, before anything is read, so a flood of
//! connections that never finish a TLS handshake counts like any other. The HTTPS listener is
//! a plain TCP listener to Pingora: its handshakes run here, behind the place and within
//! `proxy.tls_handshake_timeout_ms` (Pingora's own would run before any cap, for 60 s).
//!
//! Pingora times every read of a head separately, before any filter of ours runs, so a client
//! that trickles a header byte every few seconds (a slowloris) would hold its connection for
//! ever. [`HeadDeadline`] wraps the proxy's app and its streams: a request's head must end
//! (the blank line after the headers) within `proxy.downstream_header_timeout_ms`. The clock
//! starts once the connection is ready (after its TLS handshake) for its first request, and at
//! the first byte of each later one: the wait between requests is the keep-alive timeout's,
//! and the proxy's logging phase marks where a request ends. Past the deadline the read fails
//! with `TimedOut` and Pingora closes the connection without an answer.
//!
//! Nothing after the head is timed here: bodies, streams and WebSockets keep Pingora's
//! timeouts. An HTTP/2 connection's preface ends like a head, so its frames are never timed
//! (its idle timeout applies). A head that arrives in one read (nearly all of them) costs a
//! look at its last bytes and no timer.

use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use pingora::apps::ServerApp;
use pingora::protocols::l4::stream::Stream as L4Stream;
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::tls::{SslDigest, TlsRef};
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl, Stream,
    TimingDigest, UniqueID, UniqueIDType, ALPN,
};
use pingora::server::ShutdownWatch;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// The proxy's app with a cap on open connections, TLS behind it, and a deadline on every
/// request head.
pub struct HeadDeadline<A> {
    inner: Arc<A>,
    /// None: streams are handed on as they are (`downstream_header_timeout_ms = 0`).
    limit: Option<Duration>,
    /// Connection places (`proxy.max_connections`, within 3/8 of the descriptor limit, and
    /// `max_connections_per_client`): a connection past either cap is closed as soon as it is
    /// accepted, so a flood of idle connections can take neither every place nor the
    /// descriptors the proxy needs for its upstreams and its books.
    places: Arc<crate::conn_limit::ConnLimit>,
    /// Load balancers: counted in the total only (`proxy.trusted_proxies`).
    trusted: crate::forwarded::TrustedProxies,
    https: Option<Https>,
}

/// The HTTPS listener, whose connections are handshaken here.
pub struct Https {
    /// Where it listens: a connection accepted there speaks TLS.
    pub listen: std::net::SocketAddr,
    pub acceptor: pingora::listeners::tls::Acceptor,
    pub handshake_timeout: Duration,
}

impl Https {
    /// Whether `stream` was accepted on this listener.
    fn accepted(&self, stream: &Stream) -> bool {
        let local = stream
            .get_socket_digest()
            .and_then(|d| d.local_addr().and_then(|a| a.as_inet()).copied());
        local.is_some_and(|a| {
            let ip = self.listen.ip();
            a.port() == self.listen.port()
                && match ip {
                    // 0.0.0.0 takes IPv4 alone; [::] IPv6, and IPv4 mapped into it
                    std::net::IpAddr::V4(v4) if v4.is_unspecified() => a.is_ipv4(),
                    std::net::IpAddr::V6(v6) if v6.is_unspecified() => true,
                    _ => a.ip() == ip,
                }
        })
    }

    /// The connection's TLS handshake, within its timeout; `None`: failed or too slow (the
    /// connection is closed).
    async fn handshake(&self, stream: Stream) -> Option<Stream> {
        let Ok(tcp) = stream.into_any().downcast::<L4Stream>() else {
            tracing::warn!("a connection on the HTTPS listener is not a TCP stream");
            return None;
        };
        match tokio::time::timeout(self.handshake_timeout, self.acceptor.tls_handshake(*tcp)).await
        {
            Ok(Ok(tls)) => Some(Box::new(tls)),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "TLS handshake failed");
                None
            }
            Err(_) => {
                crate::metrics::TLS_HANDSHAKE_TIMEOUTS.inc();
                None
            }
        }
    }
}

impl<A> HeadDeadline<A> {
    pub fn new(
        inner: A,
        limit: Option<Duration>,
        places: Arc<crate::conn_limit::ConnLimit>,
        trusted: crate::forwarded::TrustedProxies,
        https: Option<Https>,
    ) -> HeadDeadline<A> {
        HeadDeadline {
            inner: Arc::new(inner),
            limit,
            places,
            trusted,
            https,
        }
    }
}

#[async_trait]
impl<A: ServerApp + Send + Sync + 'static> ServerApp for HeadDeadline<A> {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let client = stream
            .get_socket_digest()
            .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).map(|a| a.ip()))
            .filter(|ip| !self.trusted.trusts(*ip));
        let Some(_place) = self.places.admit(client) else {
            crate::metrics::CONNECTIONS_REFUSED
                .with_label_values(&["proxy"])
                .inc();
            return None; // closed at once
        };
        let stream = match &self.https {
            Some(https) if https.accepted(&stream) => https.handshake(stream).await?,
            _ => stream,
        };
        // Pingora keeps an HTTP/1 connection's later requests inside this call; the proxy's
        // logging phase tells the stream when one ends (`next_request`).
        let stream: Stream = match self.limit {
            Some(limit) => Box::new(Timed::new(stream, limit)),
            None => stream,
        };
        self.inner.process_new(stream, shutdown).await
    }

    async fn cleanup(&self) {
        self.inner.cleanup().await;
    }
}

/// Where a stream is in the current request's head.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Head {
    /// A kept-alive connection between requests: no byte of the next head yet.
    Waiting,
    /// Reading a head that must end by `deadline`; `tail` is the last two bytes seen since the
    /// head `started` (the empty lines a client may send before a request line do not end it).
    Reading {
        deadline: Instant,
        tail: [u8; 2],
        started: bool,
    },
    /// The head has ended: nothing more is timed until the next request.
    Done,
}

/// A downstream stream whose request heads are timed.
pub struct Timed {
    inner: Stream,
    limit: Duration,
    head: Head,
    /// Wakes a read that is waiting on a head's next bytes at its deadline; made only for heads
    /// that do not arrive in one read.
    timer: Option<Pin<Box<Sleep>>>,
    /// Set when a request has ended: the next bytes read begin the next head.
    next: AtomicBool,
}

/// Tells a connection's stream that its request has ended (the proxy's logging phase), so the
/// next request's head is timed. Streams not wrapped here are left alone.
pub fn next_request(stream: &Stream) {
    if let Some(t) = stream.as_any().downcast_ref::<Timed>() {
        t.next.store(true, Ordering::Relaxed);
    }
}

impl Timed {
    fn new(inner: Stream, limit: Duration) -> Timed {
        Timed {
            inner,
            limit,
            head: Head::Reading {
                deadline: Instant::now() + limit,
                tail: [0; 2],
                started: false,
            },
            timer: None,
            next: AtomicBool::new(false),
        }
    }

    /// Follows newly read bytes through the head.
    fn saw(&mut self, bytes: &[u8]) {
        let (deadline, mut tail, mut started) = match self.head {
            Head::Done => return,
            Head::Waiting => (Instant::now() + self.limit, [0; 2], false),
            Head::Reading {
                deadline,
                tail,
                started,
            } => (deadline, tail, started),
        };
        let mut bytes = bytes;
        if !started {
            match bytes.iter().position(|b| !matches!(b, b'\r' | b'\n')) {
                Some(first) => {
                    bytes = &bytes[first..];
                    started = true;
                }
                None => bytes = &[],
            }
        }
        self.head = if started && head_end(tail, bytes) {
            Head::Done
        } else {
            tail = last_two(tail, bytes);
            Head::Reading {
                deadline,
                tail,
                started,
            }
        };
    }

    fn timed_out(&self) -> io::Error {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "the request head did not arrive within {} ms",
                self.limit.as_millis()
            ),
        )
    }
}

/// Whether `bytes`, following `tail`, contain the end of a head: a line feed right after an
/// empty line (`\n\n` or `\n\r\n`; httparse accepts bare line feeds).
fn head_end(tail: [u8; 2], bytes: &[u8]) -> bool {
    // nearly every head ends its read
    if bytes.ends_with(b"\n\r\n") || bytes.ends_with(b"\n\n") {
        return true;
    }
    let at = |i: isize| -> u8 {
        match i {
            -2 => tail[0],
            -1 => tail[1],
            i => bytes[i as usize],
        }
    };
    memchr::memchr_iter(b'\n', bytes).any(|i| {
        let i = i as isize;
        at(i - 1) == b'\n' || (at(i - 1) == b'\r' && at(i - 2) == b'\n')
    })
}

fn last_two(tail: [u8; 2], bytes: &[u8]) -> [u8; 2] {
    match bytes {
        [] => tail,
        [b] => [tail[1], *b],
        [.., a, b] => [*a, *b],
    }
}

impl AsyncRead for Timed {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.head == Head::Done {
            if !*this.next.get_mut() {
                return Pin::new(&mut this.inner).poll_read(cx, buf);
            }
            *this.next.get_mut() = false;
            this.head = Head::Waiting;
        }
        if let Head::Reading { deadline, .. } = this.head {
            if Instant::now() >= deadline {
                return Poll::Ready(Err(this.timed_out()));
            }
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                this.saw(&buf.filled()[before..]);
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                let Head::Reading { deadline, .. } = this.head else {
                    return Poll::Pending;
                };
                let timer = this
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                if timer.deadline() != deadline {
                    timer.as_mut().reset(deadline);
                }
                match timer.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Err(this.timed_out())),
                    Poll::Pending => Poll::Pending,
                }
            }
            ready => ready,
        }
    }
}

impl AsyncWrite for Timed {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[async_trait]
impl Shutdown for Timed {
    async fn shutdown(&mut self) {
        self.inner.shutdown().await
    }
}

impl UniqueID for Timed {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for Timed {
    fn get_ssl(&self) -> Option<&TlsRef> {
        self.inner.get_ssl()
    }

    fn get_ssl_digest(&self) -> Option<Arc<SslDigest>> {
        self.inner.get_ssl_digest()
    }

    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for Timed {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }

    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for Timed {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }

    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.inner.set_proxy_digest(digest)
    }
}

impl GetSocketDigest for Timed {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }

    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.inner.set_socket_digest(digest)
    }
}

#[async_trait]
impl Peek for Timed {
    async fn try_peek(&mut self, buf: &mut [u8]) -> io::Result<bool> {
        self.inner.try_peek(buf).await
    }
}

impl fmt::Debug for Timed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Timed")
            .field("inner", &self.inner)
            .field("head", &self.head)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The index of the read that ends the head, following a stream as it reads.
    fn ends(chunks: &[&[u8]]) -> Option<usize> {
        let mut t = Timed::new(Box::new(std::io::Cursor::new(Vec::new())), Duration::ZERO);
        for (i, c) in chunks.iter().enumerate() {
            t.saw(c);
            if t.head == Head::Done {
                return Some(i);
            }
        }
        None
    }

    #[test]
    fn a_head_ends_at_its_blank_line_however_it_is_split() {
        let head = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
        assert_eq!(ends(&[head]), Some(0));
        for cut in 1..head.len() {
            let (a, b) = head.split_at(cut);
            assert_eq!(ends(&[a, b]), Some(1), "split at {cut}");
        }
        // byte by byte
        let bytes: Vec<&[u8]> = head.chunks(1).collect();
        assert_eq!(ends(&bytes), Some(head.len() - 1));
        // a body in the same read, and bare line feeds
        assert_eq!(ends(&[b"POST / HTTP/1.1\r\nA: b\r\n\r\nbody\r\n"]), Some(0));
        assert_eq!(ends(&[b"GET / HTTP/1.1\nA: b\n", b"\n"]), Some(1));
        // the HTTP/2 preface
        assert_eq!(ends(&[b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"]), Some(0));
    }

    #[test]
    fn an_unfinished_head_does_not_end() {
        assert_eq!(
            ends(&[b"GET / HTTP/1.1\r\n", b"Host: a\r\n", b"X-A: 1\r"]),
            None
        );
        assert_eq!(ends(&[b"\r\n"]), None);
        assert_eq!(ends(&[b"a\r", b"\r\n"]), None);
        // empty lines before the request line are skipped by the parser, so they end nothing
        assert_eq!(ends(&[b"\r\n\r\n", b"\n\n", b"GET / HTTP/1.1\r\n"]), None);
        assert_eq!(ends(&[b"\r\n\r\nGET / HTTP/1.1\r\n\r\n"]), Some(0));
    }
}
