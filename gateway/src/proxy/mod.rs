//! The Pingora `ProxyHttp` implementation: a thin layer that asks [`crate::keys`] for the key,
//! [`crate::ledger`] for admission and the tally, and the flusher's queue for the access log.

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;
use http::header::{
    AUTHORIZATION, CACHE_CONTROL, CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER, USER_AGENT,
};
use http::{HeaderName, HeaderValue};
use pingora::http::ResponseHeader;
use pingora::prelude::*;
use pingora::proxy::FailToProxy;
use pingora::ErrorSource;
use serde_json::{json, Map};

use crate::config::{ChargeMode, Meter, ReportFrom};
use crate::errors::ErrorCode;
use crate::flusher::{InFlight, LogSender};
use crate::keys::{self, Extracted, KeyHash, KeySource};
use crate::ledger::{
    Account, Admission, Ask, Denial, Ending, KeyRef, Ledger, Lookup, Price, Spent,
};
use crate::meters::MAX_METERS;
use crate::metrics;
use crate::records::{clipped, AccessLog, MAX_PATH, MAX_USER_AGENT};
use crate::store::SharedStore;

mod access_log;
mod admission;
mod edges;
mod forward;
mod respond;
mod stream_watch;

use access_log::End;
pub use admission::{gate, Gate, Metered};
use edges::*;
pub use respond::{refusal, refusal_body, Refusal};

use stream_watch::StreamWatch;

pub use edges::strip_key_from_uri;

pub const LICENSE_KEY_HEADER: HeaderName = HeaderName::from_static("x-license-key");
pub const LICENSE_ID_HEADER: HeaderName = HeaderName::from_static("x-tollgate-license-id");
pub const KEY_ID_HEADER: HeaderName = HeaderName::from_static("x-tollgate-key-id");
pub const PLAN_HEADER: HeaderName = HeaderName::from_static("x-tollgate-plan");
pub const SESSION_HEADER: HeaderName = HeaderName::from_static("x-usage-session");
pub const BALANCE_HEADER: HeaderName = HeaderName::from_static("x-balance-remaining-seconds");
pub const GUEST_HEADER: HeaderName = HeaderName::from_static("x-tollgate-guest");
/// What a trusted front end names a guest by (`proxy.trust_guest_header`).
pub const GUEST_ID_HEADER: HeaderName = HeaderName::from_static("x-guest-id");
/// A client's estimate of what a `reported` route's request will report.
pub const ESTIMATE_HEADER: HeaderName = HeaderName::from_static("tollgate-estimate");

/// The same names as Pingora's `insert_header` wants them: title-cased static text costs it one
/// allocation fewer per header than a `HeaderName`, which it would title-case into a new buffer.
mod titled {
    pub const LICENSE_ID: &str = "X-Tollgate-License-Id";
    pub const KEY_ID: &str = "X-Tollgate-Key-Id";
    pub const PLAN: &str = "X-Tollgate-Plan";
    pub const SESSION: &str = "X-Usage-Session";
    pub const BALANCE: &str = "X-Balance-Remaining-Seconds";
    pub const INCLUDED: &str = "X-Included-Remaining-Seconds";
    pub const GUEST: &str = "X-Tollgate-Guest";
    pub const RESERVED: &str = "X-Tollgate-Reserved";
    pub const CHARGED: &str = "X-Usage-Charged";
}
const KEY_QUERY_PARAM: &str = "license_key";

/// A WebSocket close frame (server to client, unmasked): code 1008, policy violation.
/// The WebSocket close frame (code 1008, policy violation) that ends a stream whose balance,
/// or plan period's time allowance, ran out.
fn close_1008(spent: Spent) -> Bytes {
    Bytes::from_static(match spent {
        Spent::Balance => b"\x88\x13\x03\xf0balance exhausted",
        Spent::Allowance => b"\x88\x15\x03\xf0allowance exhausted",
    })
}

pub struct ProxyOptions {
    /// How each path is charged (`[[routes]]`, `proxy.free_paths`).
    pub routes: Arc<crate::routes::Routes>,
    /// The meters the app may report (`[[meters]]`).
    pub meters: Arc<[Meter]>,
    /// The header the app reports them in (`proxy.usage_header`): taken off every answer,
    /// and off every request.
    pub usage_header: HeaderName,
    /// The app is spoken to over HTTP/2 (`proxy.upstream_h2`).
    pub upstream_h2: bool,
    pub strip_key: bool,
    pub purchase_url: Option<String>,
    /// The client is told where it stands on each answer (`proxy.response_headers`).
    pub response_headers: bool,
    /// Where a customer upgrades their plan (the payment page), told when a higher plan would
    /// lift a refusal.
    pub upgrade_url: Option<String>,
    /// Where plan periods start (for the period usage read on a cache miss).
    pub calendar: crate::periods::Calendar,
    /// Meter keyless requests as guests instead of refusing them.
    pub guests: bool,
    pub trust_guest_header: bool,
    /// Whose `X-Forwarded-For` names the client (`proxy.trusted_proxies`).
    pub trusted_proxies: crate::forwarded::TrustedProxies,
    /// Downstream timeouts (a request's head, read, write, keep-alive idle).
    pub downstream_header_timeout: Option<std::time::Duration>,
    pub downstream_read_timeout: std::time::Duration,
    pub downstream_write_timeout: std::time::Duration,
    pub downstream_keepalive_timeout: std::time::Duration,
    /// The most a request's line and headers may add up to (431 past it).
    pub max_header_bytes: usize,
    /// How often a quiet long-lived response checks whether its balance ran out (a quarter of
    /// the flush interval: the flush is what charges it).
    pub stream_check_interval: std::time::Duration,
    /// Requests in flight to the app: each may hold an upstream socket, so they are held to
    /// the upstream sockets' share of the descriptors, and to `max_in_flight_per_client` per
    /// client.
    pub in_flight_places: Arc<crate::conn_limit::ConnLimit>,
    /// Several nodes: this node's leases (a slice is asked for on the request path only for a
    /// key just loaded, or one whose lease is spent while its balance has more).
    pub leases: Option<Arc<crate::leases::Leases>>,
}

/// The metering proxy.
pub struct Gateway {
    ledger: Arc<Ledger>,
    store: SharedStore,
    logs: LogSender,
    in_flight: Arc<InFlight>,
    upstreams: crate::upstreams::Upstreams,
    opts: ProxyOptions,
}

/// What a request is, as far as metering goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    /// Not decided yet (the request failed before `request_filter` finished).
    Unknown,
    Metered,
    Free,
    Denied(ErrorCode),
}

/// Per-request state.
pub struct Ctx {
    start: Instant,
    start_ms: i64,
    entered: bool,
    outcome: Outcome,
    metered: Option<Metered>,
    /// The license of a denied request whose key was known.
    denied_license: Option<i64>,
    /// The key of a refused request, when it is known.
    denied_key: Option<i64>,
    /// The guest's id, for a keyless request in guest mode (admitted or not).
    guest: Option<Arc<str>>,
    /// The app answered (its response head arrived): a failure after this is the app's
    /// connection breaking, not a request the gateway failed to serve.
    answered: bool,
    /// A WebSocket (the response was 101 Switching Protocols).
    websocket: bool,
    /// The balance (or the period's time allowance) ran out while the response streamed and
    /// the gateway ended it.
    cut_off: Option<Spent>,
    /// The upstream connection's socket (valid while the request runs).
    upstream_fd: Option<std::os::fd::RawFd>,
    /// Ends a quiet long-lived response whose balance ran out.
    watch: Option<StreamWatch>,
    /// Upstream instances this request could not connect to.
    failed_upstreams: Vec<std::net::SocketAddr>,
    /// The client's address: the peer's, or the one a trusted proxy forwarded.
    client_ip: Option<std::net::IpAddr>,
    /// The normalised path, when it differs from the one sent: what was matched is what the app
    /// gets (see [`crate::paths`]).
    forward_path: Option<String>,
    /// Request body bytes seen so far, against the plan's allowance when the length was not
    /// declared.
    body_seen: u64,
    /// The refusal of a body cut off part way, to answer with.
    body_refusal: Option<Refusal>,
    upstream_failed: bool,
    /// The request's place among those in flight to the app (given back when it ends).
    in_flight_place: Option<crate::conn_limit::Place>,
    /// The route it is on (`[[routes]]`), by index.
    route: Option<usize>,
    /// A priced request's charge, as its answer's head decided it (what the app reported,
    /// or the route's price); none until then.
    price: Option<Price>,
    /// What of `price` the plan's included requests and units are expected to pay (this
    /// node's estimate as the answer's head is sent: the store decides at the flush).
    plan_pays_ms: i64,
    /// Its answer's status is one its route does not charge: it is given back.
    status_uncharged: bool,
    /// A `reported` route's report is still to come (in a trailer, or the answer's last
    /// `usage` object): its price is decided at the answer's end.
    report_due: bool,
    /// An `openai` route's answer's last bytes, where its `usage` object is looked for.
    tail: Option<Vec<u8>>,
}

impl Gateway {
    /// Readies a kept-alive HTTP/1 connection's stream to time its next request head. A body
    /// left unread (a refused upload) must not pass for that head (a blank line in it would end
    /// the head early); Pingora closes such connections already (it does not reuse one whose
    /// response finished before its request), and so do we, whatever its settings.
    fn rearm_head_deadline(&self, session: &mut Session) {
        if self.opts.downstream_header_timeout.is_none() {
            return;
        }
        let d = session.as_downstream_mut();
        if d.stream().is_none() || d.was_upgraded() || d.get_keepalive().is_none() {
            return; // HTTP/2, an upgraded connection, or one that closes: no next head
        }
        if !d.is_body_done() {
            d.set_keepalive(None);
            return;
        }
        if let Some(stream) = d.stream() {
            crate::head_deadline::next_request(stream);
        }
    }

    /// The request starts: its timeouts and keep-alive, its clocks, the client's address, and
    /// the in-flight count (left in `logging`).
    fn enter(&self, session: &mut Session, ctx: &mut Ctx) {
        session.set_read_timeout(Some(self.opts.downstream_read_timeout));
        session.set_write_timeout(Some(self.opts.downstream_write_timeout));
        // Kept alive only where both the client and Pingora allow it (Pingora turns it off for
        // a shutdown and for a request with both Transfer-Encoding and Content-Length): those
        // get the keep-alive idle timeout, the rest `Connection: close`, refusals too. This
        // only ever lowers what Pingora decided.
        let allowed = session.as_downstream().get_keepalive().is_some()
            && client_keeps_alive(session.req_header());
        let keepalive = allowed.then(|| self.opts.downstream_keepalive_timeout.as_secs().max(1));
        session.set_keepalive(keepalive);
        ctx.start = Instant::now();
        ctx.start_ms = self.ledger.now_ms();
        ctx.entered = true;
        ctx.client_ip = session.client_addr().and_then(|a| a.as_inet()).map(|a| {
            self.opts
                .trusted_proxies
                .client(a.ip(), &session.req_header().headers)
        });
        self.in_flight.enter();
    }

    pub fn new(
        ledger: Arc<Ledger>,
        store: SharedStore,
        logs: LogSender,
        in_flight: Arc<InFlight>,
        upstreams: crate::upstreams::Upstreams,
        opts: ProxyOptions,
    ) -> Gateway {
        Gateway {
            upstreams,
            ledger,
            store,
            logs,
            in_flight,
            opts,
        }
    }
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        Ctx {
            start: Instant::now(),
            start_ms: 0,
            entered: false,
            outcome: Outcome::Unknown,
            metered: None,
            denied_license: None,
            denied_key: None,
            guest: None,
            failed_upstreams: Vec::new(),
            answered: false,
            client_ip: None,
            forward_path: None,
            upstream_fd: None,
            watch: None,
            websocket: false,
            cut_off: None,
            body_seen: 0,
            body_refusal: None,
            upstream_failed: false,
            in_flight_place: None,
            route: None,
            price: None,
            plan_pays_ms: 0,
            status_uncharged: false,
            report_due: false,
            tail: None,
        }
    }

    /// Admission: free paths pass; everything else needs a key with time left. A denied request
    /// is answered here and never reaches the upstream.
    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        self.enter(session, ctx);
        if let Some((status, message)) = malformed(session.req_header(), &self.opts) {
            ctx.outcome = Outcome::Denied(ErrorCode::BadRequest);
            self.refuse_malformed(session, status, &message).await?;
            return Ok(true);
        }
        // the path as the app will read it: matched, and forwarded, as one
        let normal = crate::paths::normalize(session.req_header().uri.path());
        ctx.route = (!self.opts.routes.is_empty())
            .then(|| {
                let method = session.req_header().method.as_str();
                self.opts.routes.find(method, &normal.path)
            })
            .flatten();
        let free = ctx
            .route
            .is_some_and(|i| self.opts.routes.get(i).charge == ChargeMode::Free);
        if free && normal.ambiguous {
            ctx.outcome = Outcome::Denied(ErrorCode::BadRequest);
            let message = "The path has an encoded / or \\, or a dot segment with parameters \
                           (..;), in it, which apps read differently.";
            self.refuse_malformed(session, 400, message).await?;
            return Ok(true);
        }
        if let std::borrow::Cow::Owned(p) = normal.path {
            ctx.forward_path = Some(p);
        }
        // a place among the requests in flight to the app, before anything is taken for it
        // (a trusted balancer that forwarded no client carries many: the total counts it)
        let client = ctx
            .client_ip
            .filter(|ip| !self.opts.trusted_proxies.trusts(*ip));
        match self.opts.in_flight_places.take(client) {
            Ok(place) => ctx.in_flight_place = Some(place),
            Err(full) => {
                let refusal = Refusal::in_flight(full);
                ctx.outcome = Outcome::Denied(refusal.code);
                self.respond(session, refusal).await?;
                return Ok(true);
            }
        }
        if free {
            ctx.outcome = Outcome::Free;
            return Ok(false);
        }
        self.admit_or_refuse(session, ctx).await
    }

    /// A stream the gateway ended because its balance ran out, and a client that went away,
    /// are not errors: the access log and an info line (for the former) say what happened.
    fn suppress_error_log(&self, _session: &Session, ctx: &Ctx, e: &Error) -> bool {
        ctx.ended_by_us().is_some() || client_went_away(e)
    }

    /// What Pingora's error logs say about a request: method, path, query and host, with the
    /// license key taken out of the query (the default summary would log it).
    fn request_summary(&self, session: &Session, _ctx: &Ctx) -> String {
        let req = session.req_header();
        let query = match req.uri.query() {
            Some(q) if keys::query_param(q, KEY_QUERY_PARAM).is_some() => {
                match keys::strip_query_param(q, KEY_QUERY_PARAM) {
                    Some(rest) => format!("?{rest}&{KEY_QUERY_PARAM}=[redacted]"),
                    None => format!("?{KEY_QUERY_PARAM}=[redacted]"),
                }
            }
            Some(q) => format!("?{q}"),
            None => String::new(),
        };
        let host = req
            .headers
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("");
        format!("{} {}{query}, Host: {host}", req.method, req.uri.path())
    }

    /// The app's instance for this request: by consistent hashing on the license (or guest),
    /// skipping the instances this request could not connect to.
    async fn upstream_peer(&self, _session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        // by license (or guest), so consistent hashing keeps a customer on one instance
        let id;
        let key: &[u8] = match (&ctx.metered, &ctx.guest) {
            (Some(m), None) => {
                id = m.account.id.to_le_bytes();
                &id
            }
            (_, Some(g)) => g.as_bytes(),
            (None, None) => b"",
        };
        self.upstreams
            .peer(key, &ctx.failed_upstreams)
            .ok_or_else(|| {
                Error::explain(ConnectNoRoute, "no upstream instance left to try").into_up()
            })
    }

    /// Remembers the upstream socket, for the watch on a long-lived response.
    async fn connected_to_upstream(
        &self,
        _session: &mut Session,
        _reused: bool,
        _peer: &HttpPeer,
        fd: std::os::fd::RawFd,
        _digest: Option<&pingora::protocols::Digest>,
        ctx: &mut Ctx,
    ) -> Result<()> {
        // an HTTP/2 connection is shared by many requests: not one this watch may shut
        if !self.opts.upstream_h2 {
            ctx.upstream_fd = Some(fd);
        }
        Ok(())
    }

    /// An instance that cannot be connected to is tried no more for this request; another is,
    /// while any is left.
    fn fail_to_connect(
        &self,
        _session: &mut Session,
        peer: &HttpPeer,
        ctx: &mut Ctx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        if let Some(addr) = peer._address.as_inet() {
            ctx.failed_upstreams.push(*addr);
        }
        if ctx.failed_upstreams.len() < self.upstreams.count() {
            e.set_retry(true);
        }
        e
    }

    /// Strips the key and tells the app who its customer is. Client-sent `X-Tollgate-*`
    /// headers are removed so nobody can claim another license.
    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        req: &mut RequestHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        self.prepare_upstream_request(session, req, ctx)
    }

    /// Counts a body whose length was not declared against the plan's size cap and the day's
    /// uploads; past either, the request is refused (413 `payload_too_large`, 429
    /// `quota_exceeded`) before more of it reaches the upstream, and charged up to there (the
    /// app was receiving it).
    async fn request_body_filter(
        &self,
        session: &mut Session,
        body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> Result<()> {
        self.count_body(session, body, ctx)
    }

    /// Ends a streaming response once the balance is spent (the flusher charges streams as they
    /// run, so this happens within a flush interval of the money running out): a WebSocket gets
    /// a close frame with code 1008 and a reason, then the connection closes; any other stream
    /// is ended where it is.
    fn response_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> Result<Option<std::time::Duration>> {
        if let (Some(tail), Some(b)) = (&mut ctx.tail, body.as_ref()) {
            crate::meters::keep_tail(tail, b);
        }
        self.end_spent_stream(body, end_of_stream, ctx)
    }

    /// The app's usage trailer (an HTTP/2 upstream): taken off, on every route, and on a
    /// route that reads reports from trailers, priced; an HTTP/2 client gets what it was
    /// charged in a trailer of its own.
    async fn response_trailer_filter(
        &self,
        _session: &mut Session,
        trailers: &mut http::HeaderMap,
        ctx: &mut Ctx,
    ) -> Result<Option<Bytes>> {
        self.take_trailer_report(trailers, ctx)?;
        Ok(None)
    }

    /// Tells the client its session and the balance it has left.
    async fn response_filter(
        &self,
        session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        self.prepare_response(session, resp, ctx)
    }

    /// Upstream failures get the JSON `upstream_unavailable` error and are not charged.
    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut Ctx) -> FailToProxy {
        self.answer_failure(session, e, ctx).await
    }

    /// Every request ends here: the tally (charged unless the gateway or upstream failed), the
    /// metrics, and one access-log row.
    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut Ctx) {
        self.rearm_head_deadline(session);
        if ctx.entered {
            self.in_flight.leave();
            let end = End::of(ctx, e);
            self.price_at_end(ctx, end);
            self.tally(session, ctx, end);
            self.log(session, ctx, end);
        }
    }
}

#[cfg(test)]
mod tests;
