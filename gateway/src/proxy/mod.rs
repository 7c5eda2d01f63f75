//! The Pingora `ProxyHttp` implementation: a thin layer that asks [`crate::keys`] for the key,
//! [`crate::ledger`] for admission and the tally, and the flusher's queue for the access log.

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER, USER_AGENT};
use http::{HeaderName, HeaderValue};
use pingora::http::ResponseHeader;
use pingora::prelude::*;
use pingora::proxy::FailToProxy;
use pingora::ErrorSource;
use serde_json::{json, Map};

use crate::errors::ErrorCode;
use crate::flusher::{InFlight, LogSender};
use crate::keys::{self, Extracted, KeyHash, KeySource};
use crate::ledger::{Account, Admission, Denial, Ending, Ledger, Lookup, ReturnReason};
use crate::metrics;
use crate::records::{clipped, AccessLog, MAX_PATH, MAX_USER_AGENT};
use crate::store::SharedStore;

mod edges;
mod stream_watch;

use edges::*;
use stream_watch::StreamWatch;

pub use edges::strip_key_from_uri;

pub const LICENSE_KEY_HEADER: HeaderName = HeaderName::from_static("x-license-key");
pub const LICENSE_ID_HEADER: HeaderName = HeaderName::from_static("x-tollgate-license-id");
pub const PLAN_HEADER: HeaderName = HeaderName::from_static("x-tollgate-plan");
pub const SESSION_HEADER: HeaderName = HeaderName::from_static("x-usage-session");
pub const BALANCE_HEADER: HeaderName = HeaderName::from_static("x-balance-remaining-seconds");
pub const GUEST_HEADER: HeaderName = HeaderName::from_static("x-tollgate-guest");
/// What a trusted front end names a guest by (`proxy.trust_guest_header`).
pub const GUEST_ID_HEADER: HeaderName = HeaderName::from_static("x-guest-id");

/// The same names as Pingora's `insert_header` wants them: title-cased static text costs it one
/// allocation fewer per header than a `HeaderName`, which it would title-case into a new buffer.
mod titled {
    pub const LICENSE_ID: &str = "X-Tollgate-License-Id";
    pub const PLAN: &str = "X-Tollgate-Plan";
    pub const SESSION: &str = "X-Usage-Session";
    pub const BALANCE: &str = "X-Balance-Remaining-Seconds";
    pub const GUEST: &str = "X-Tollgate-Guest";
}
const KEY_QUERY_PARAM: &str = "license_key";

/// A WebSocket close frame (server to client, unmasked): code 1008, policy violation.
const CLOSE_1008: &[u8] = b"\x88\x13\x03\xf0balance exhausted";

/// Paths served without a key: exact entries, or prefixes written with a trailing `*`.
#[derive(Clone, Debug, Default)]
pub struct FreePaths {
    exact: Vec<String>,
    prefixes: Vec<String>,
}

impl FreePaths {
    pub fn new(paths: &[String]) -> FreePaths {
        let mut f = FreePaths::default();
        for p in paths {
            match p.strip_suffix('*') {
                Some(prefix) => f.prefixes.push(prefix.to_string()),
                None => f.exact.push(p.clone()),
            }
        }
        f
    }

    pub fn matches(&self, path: &str) -> bool {
        self.exact.iter().any(|p| p == path) || self.prefixes.iter().any(|p| path.starts_with(p))
    }
}

pub struct ProxyOptions {
    pub free_paths: FreePaths,
    pub strip_key: bool,
    pub purchase_url: Option<String>,
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

/// A refusal and what the client should be told with it.
#[derive(Clone, Copy, Debug)]
pub struct Refusal {
    pub code: ErrorCode,
    pub remaining_ms: i64,
    /// The license refused, when the key named one (its access-log row says whose it was).
    pub license_id: Option<i64>,
    /// `Retry-After`, for rate limits and spent allowances.
    pub retry_after_s: Option<i64>,
    /// When a spent allowance comes back (Unix ms).
    pub resets_at: Option<i64>,
    /// The body cap that was exceeded.
    pub max_bytes: Option<u64>,
    /// The request's body was cut off unread: the connection closes after the answer.
    pub closes: bool,
}

impl From<ErrorCode> for Refusal {
    fn from(code: ErrorCode) -> Refusal {
        Refusal {
            code,
            remaining_ms: 0,
            license_id: None,
            retry_after_s: None,
            resets_at: None,
            max_bytes: None,
            closes: false,
        }
    }
}

/// An admitted request: its account, session and where its key was found.
pub struct Metered {
    pub account: Arc<Account>,
    pub admission: Admission,
    pub source: KeySource,
    /// The guest's id, for a request without a key in guest mode.
    pub guest: Option<Arc<str>>,
}

/// What the in-memory part of admission decided.
pub enum Gate {
    Admitted(Metered),
    Refused(Refusal),
    /// The key is not in memory: read the store, then [`Ledger::insert_loaded`].
    Miss(KeyHash, KeySource, Option<u64>),
}

/// The hot path without I/O: key extraction, hash, cache lookup and admission.
pub fn gate(
    ledger: &Ledger,
    header: Option<&[u8]>,
    authorization: Option<&[u8]>,
    query: Option<&str>,
    body_len: Option<u64>,
) -> Gate {
    let (key, source) = match keys::extract(header, authorization, query) {
        Extracted::None => return Gate::Refused(ErrorCode::MissingLicenseKey.into()),
        Extracted::Malformed(_) => return Gate::Refused(ErrorCode::InvalidLicenseKey.into()),
        Extracted::Key(k, s) => (k, s),
    };
    let hash = KeyHash::of(key);
    match ledger.lookup(&hash) {
        Lookup::Known(account) => match admit_account(ledger, account, source, body_len) {
            Ok(m) => Gate::Admitted(m),
            Err(r) => Gate::Refused(r),
        },
        Lookup::Unknown => Gate::Refused(ErrorCode::InvalidLicenseKey.into()),
        Lookup::Miss => Gate::Miss(hash, source, body_len),
    }
}

fn admit_account(
    ledger: &Ledger,
    account: Arc<Account>,
    source: KeySource,
    body_len: Option<u64>,
) -> std::result::Result<Metered, Refusal> {
    match ledger.admit_request(&account, body_len) {
        Ok(admission) => Ok(Metered {
            account,
            admission,
            source,
            guest: None,
        }),
        Err(denial) => Err(refusal(ledger, account.id, denial)),
    }
}

/// The refusal of a request with a known key: the error code of the limit (or status) that
/// refused it, and what the client needs to know (what remains, when it resets, the cap).
fn refusal(ledger: &Ledger, license_id: i64, denial: Denial) -> Refusal {
    let mut r = Refusal::from(match denial {
        Denial::Revoked => ErrorCode::LicenseRevoked,
        Denial::Expired => ErrorCode::LicenseExpired,
        Denial::InsufficientBalance { .. } => ErrorCode::InsufficientBalance,
        Denial::PayloadTooLarge { .. } => ErrorCode::PayloadTooLarge,
        Denial::QuotaExceeded { .. } => ErrorCode::QuotaExceeded,
        Denial::ConcurrencyLimit { .. } => ErrorCode::ConcurrencyLimit,
        Denial::RateLimited { .. } => ErrorCode::RateLimited,
    });
    r.license_id = Some(license_id);
    match denial {
        Denial::InsufficientBalance { remaining_ms } => r.remaining_ms = remaining_ms,
        Denial::PayloadTooLarge { max_bytes } => r.max_bytes = Some(max_bytes),
        Denial::QuotaExceeded { resets_at } => {
            r.resets_at = Some(resets_at);
            r.retry_after_s = Some(((resets_at - ledger.now_ms()).max(0) + 999) / 1000);
        }
        Denial::RateLimited { retry_after_ms } => {
            r.retry_after_s = Some((retry_after_ms.max(1) + 999) / 1000)
        }
        _ => {}
    }
    r
}

/// Whether a request carries a body (a length above zero, or chunked).
fn has_body(req: &pingora::http::RequestHeader) -> bool {
    declared_length(req).is_some_and(|n| n > 0)
        || req.headers.contains_key(http::header::TRANSFER_ENCODING)
}

/// The body length a request declares, if any (chunked bodies are counted as they stream).
fn declared_length(req: &pingora::http::RequestHeader) -> Option<u64> {
    req.headers
        .get(CONTENT_LENGTH)
        .and_then(|v| std::str::from_utf8(v.as_bytes()).ok())
        .and_then(|v| v.trim().parse().ok())
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
    /// The guest's id, for a keyless request in guest mode (admitted or not).
    guest: Option<Arc<str>>,
    /// The app answered (its response head arrived): a failure after this is the app's
    /// connection breaking, not a request the gateway failed to serve.
    answered: bool,
    /// A WebSocket (the response was 101 Switching Protocols).
    websocket: bool,
    /// The balance ran out while the response streamed and the gateway ended it.
    cut_off: bool,
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

    /// Admission with the store read a cache miss needs; `Err` is the refusal to send.
    async fn admit(
        &self,
        session: &Session,
        ctx: &mut Ctx,
    ) -> Result<std::result::Result<Metered, Refusal>> {
        let req = session.req_header();
        let gate = gate(
            &self.ledger,
            req.headers
                .get(LICENSE_KEY_HEADER)
                .map(HeaderValue::as_bytes),
            req.headers.get(AUTHORIZATION).map(HeaderValue::as_bytes),
            req.uri.query(),
            declared_length(req),
        );
        let (hash, source, body_len) = match gate {
            Gate::Admitted(m) => return Ok(Ok(m)),
            Gate::Refused(r) if r.code == ErrorCode::MissingLicenseKey && self.opts.guests => {
                return Ok(self.admit_guest(session, ctx));
            }
            Gate::Refused(r) => return Ok(Err(r)),
            Gate::Miss(hash, source, body_len) => (hash, source, body_len),
        };
        let row = self
            .store
            .admission_state(hash, &self.opts.calendar, self.ledger.now_ms())
            .await
            .map_err(|e| {
                metrics::STORE_ERRORS.inc();
                Error::because(InternalError, "license lookup failed", e)
            })?;
        Ok(match self.ledger.insert_loaded(hash, row) {
            Some(account) => admit_account(&self.ledger, account, source, body_len),
            None => Err(ErrorCode::InvalidLicenseKey.into()),
        })
    }

    /// A keyless request in guest mode: metered under the `guest` plan by client address, or by
    /// `X-Guest-ID` when a front end is trusted to set it.
    fn admit_guest(
        &self,
        session: &Session,
        ctx: &mut Ctx,
    ) -> std::result::Result<Metered, Refusal> {
        let req = session.req_header();
        let from_header = self
            .opts
            .trust_guest_header
            .then(|| req.headers.get(GUEST_ID_HEADER))
            .flatten()
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
            .filter(|v| !v.is_empty() && v.len() <= 128);
        let id: Arc<str> = match from_header {
            Some(id) => Arc::from(id),
            None => match ctx.client_ip {
                Some(ip) => Arc::from(ip.to_string()),
                None => return Err(ErrorCode::MissingLicenseKey.into()),
            },
        };
        ctx.guest = Some(id.clone());
        let account = self.ledger.guest(&id);
        let mut m = admit_account(
            &self.ledger,
            account,
            KeySource::Header,
            declared_length(req),
        )
        .map_err(|mut r| {
            r.license_id = None;
            r
        })?;
        m.guest = Some(id);
        Ok(m)
    }

    fn denial_body(&self, r: Refusal) -> Vec<u8> {
        let mut extra = Map::new();
        if r.code == ErrorCode::InsufficientBalance {
            extra.insert(
                "hours_remaining".into(),
                json!(crate::license::ms_to_hours(r.remaining_ms.max(0))),
            );
            if let Some(url) = &self.opts.purchase_url {
                extra.insert("purchase_url".into(), json!(url));
            }
        }
        if let Some(s) = r.retry_after_s {
            extra.insert("retry_after_s".into(), json!(s));
        }
        if let Some(at) = r.resets_at {
            extra.insert("resets_at".into(), json!(crate::timefmt::rfc3339(at)));
        }
        if let Some(max) = r.max_bytes {
            extra.insert("max_body_bytes".into(), json!(max));
        }
        r.code.body_with(None, extra)
    }

    /// Tells the app who the client is and how it came (see [`crate::forwarded`]).
    fn forward_client(&self, session: &Session, req: &mut RequestHeader) -> Result<()> {
        let Some(peer) = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip())
        else {
            return Ok(());
        };
        let https = session.digest().is_some_and(|d| d.ssl_digest.is_some());
        let trusted = &self.opts.trusted_proxies;
        let mut f = crate::forwarded::forwarding(trusted, peer, https, &req.headers);
        if f.host.is_none() {
            // HTTP/2 names the host in :authority only
            f.host = req
                .uri
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok());
        }
        // the client's own claims were removed already (`remove_spoofed_headers`)
        req.insert_header("X-Forwarded-For", f.for_)?;
        req.insert_header("X-Forwarded-Proto", f.proto)?;
        if let Some(host) = f.host {
            req.insert_header("X-Forwarded-Host", host)?;
        }
        Ok(())
    }

    /// `status` with the JSON `bad_request` error; the connection is closed after it.
    async fn refuse_malformed(
        &self,
        session: &mut Session,
        status: u16,
        message: &str,
    ) -> Result<()> {
        let body = Bytes::from(ErrorCode::BadRequest.body_with(Some(message), Map::new()));
        let mut resp = ResponseHeader::build(status, Some(4))?;
        resp.insert_header(CONTENT_TYPE, "application/json")?;
        resp.insert_header(CONTENT_LENGTH, body.len())?;
        resp.insert_header(http::header::CONNECTION, "close")?;
        session.set_keepalive(None);
        session.write_response_header(Box::new(resp), false).await?;
        session.write_response_body(Some(body), true).await
    }

    async fn respond(&self, session: &mut Session, r: Refusal) -> Result<()> {
        let body = Bytes::from(self.denial_body(r));
        let mut resp = ResponseHeader::build(r.code.status(), Some(4))?;
        resp.insert_header(CONTENT_TYPE, "application/json")?;
        if let Some(secs) = r.retry_after_s {
            resp.insert_header(RETRY_AFTER, secs)?;
        }
        resp.insert_header(CONTENT_LENGTH, body.len())?;
        if matches!(
            r.code,
            ErrorCode::UpstreamUnavailable | ErrorCode::PayloadTooLarge
        ) || r.closes
        {
            // the connection is closed after these (the request may not have been read to its
            // end): say so, so a client does not send its next request on it
            resp.insert_header(http::header::CONNECTION, "close")?;
            session.set_keepalive(None);
        }
        session.write_response_header(Box::new(resp), false).await?;
        session.write_response_body(Some(body), true).await
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
            guest: None,
            failed_upstreams: Vec::new(),
            answered: false,
            client_ip: None,
            forward_path: None,
            upstream_fd: None,
            watch: None,
            websocket: false,
            cut_off: false,
            body_seen: 0,
            body_refusal: None,
            upstream_failed: false,
        }
    }

    /// Admission: free paths pass; everything else needs a key with time left. A denied request
    /// is answered here and never reaches the upstream.
    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
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
        if header_bytes(session.req_header()) > self.opts.max_header_bytes {
            ctx.outcome = Outcome::Denied(ErrorCode::BadRequest);
            let message = format!(
                "The request line and headers are larger than {} bytes.",
                self.opts.max_header_bytes
            );
            self.refuse_malformed(session, 431, &message).await?;
            return Ok(true);
        }
        if !sane_target(session.req_header()) {
            // matched as `/` but forwarded as sent: refused (RFC 9112 §3.2)
            ctx.outcome = Outcome::Denied(ErrorCode::BadRequest);
            let message = "The request target must be a path, an http(s) URL or *.";
            self.refuse_malformed(session, 400, message).await?;
            return Ok(true);
        }
        if ambiguous_length(session.req_header()) {
            // two lengths: the app and the gateway could frame the body differently
            ctx.outcome = Outcome::Denied(ErrorCode::BadRequest);
            let message = "The request has more than one Content-Length.";
            self.refuse_malformed(session, 400, message).await?;
            return Ok(true);
        }
        // the path as the app will read it: matched, and forwarded, as one
        let normal = crate::paths::normalize(session.req_header().uri.path());
        let free = self.opts.free_paths.matches(&normal.path);
        if free && normal.ambiguous {
            ctx.outcome = Outcome::Denied(ErrorCode::BadRequest);
            let message = "The path has an encoded / or \\ in it, which apps read differently.";
            self.refuse_malformed(session, 400, message).await?;
            return Ok(true);
        }
        if let std::borrow::Cow::Owned(p) = normal.path {
            ctx.forward_path = Some(p);
        }
        if free {
            ctx.outcome = Outcome::Free;
            return Ok(false);
        }
        match self.admit(session, ctx).await? {
            Ok(m) => {
                ctx.outcome = Outcome::Metered;
                ctx.metered = Some(m);
                Ok(false)
            }
            Err(mut refusal) => {
                ctx.outcome = Outcome::Denied(refusal.code);
                ctx.denied_license = refusal.license_id;
                // a body the client is sending is read and dropped (bounded) after the answer,
                // so a client still writing its upload gets the answer, not a reset
                let req = session.req_header();
                let waiting = req
                    .headers
                    .get(http::header::EXPECT)
                    .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
                // (one that waits for 100 Continue sends nothing: it reads the answer instead)
                let body = has_body(req) && !waiting;
                refusal.closes |= body;
                self.respond(session, refusal).await?;
                if body {
                    discard_request_body(session).await;
                }
                Ok(true)
            }
        }
    }

    /// A stream the gateway ended because its balance ran out, and a client that went away,
    /// are not errors: the access log and an info line (for the former) say what happened.
    fn suppress_error_log(&self, _session: &Session, ctx: &Ctx, e: &Error) -> bool {
        ctx.cut_off || ctx.watch.as_ref().is_some_and(StreamWatch::fired) || client_went_away(e)
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

    /// Every request goes to the one configured upstream.
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

    /// An instance that cannot be connected to is tried no more for this request; another is,
    /// while any is left.
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
        ctx.upstream_fd = Some(fd);
        Ok(())
    }

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
        let from_trusted = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .is_some_and(|a| self.opts.trusted_proxies.trusts(a.ip()));
        // one pass over the headers for everything a client may not claim
        remove_spoofed_headers(req, self.opts.strip_key, from_trusted);
        self.forward_client(session, req)?;
        if let Some(path) = ctx.forward_path.take() {
            let uri = with_path(&req.uri, &path)?;
            req.set_uri(uri);
        }
        if self.opts.strip_key {
            // on every path: a free path's app never sees a key either
            // the key's own Authorization, or any that carries a Tollgate key
            let bearer_key = ctx
                .metered
                .as_ref()
                .is_some_and(|m| m.source == KeySource::Bearer)
                || req.headers.get_all(AUTHORIZATION).iter().any(|v| {
                    keys::bearer(v.as_bytes())
                        .is_some_and(|k| k.starts_with(keys::KEY_PREFIX.as_bytes()))
                });
            if bearer_key {
                req.remove_header(&AUTHORIZATION);
            }
            if let Some(q) = req.uri.query() {
                if keys::query_param(q, KEY_QUERY_PARAM).is_some() {
                    let uri = strip_key_from_uri(&req.uri)?;
                    req.set_uri(uri);
                }
            }
        }
        let Some(m) = &ctx.metered else {
            return Ok(());
        };
        match &m.guest {
            Some(g) => req.insert_header(titled::GUEST, &**g)?,
            None => req.insert_header(titled::LICENSE_ID, m.account.id)?,
        }
        req.insert_header(titled::PLAN, m.account.plan().header.clone())?;
        Ok(())
    }

    /// Counts a body whose length was not declared against the plan's cap; past it, the request
    /// is refused with 413 (and not charged) before more of it reaches the upstream.
    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> Result<()> {
        if ctx.cut_off {
            *body = None;
            return Error::e_explain(ConnectionClosed, "balance exhausted: connection ended");
        }
        let Some((max, denial)) = ctx
            .metered
            .as_ref()
            .and_then(|m| m.admission.body_allowance)
        else {
            return Ok(());
        };
        ctx.body_seen += body.as_ref().map_or(0, |b| b.len() as u64);
        if ctx.body_seen > max {
            let license = ctx.metered.as_ref().map_or(0, |m| m.account.id);
            let r = Refusal {
                closes: true,
                ..refusal(&self.ledger, license, denial)
            };
            ctx.outcome = Outcome::Denied(r.code);
            ctx.body_refusal = Some(r);
            *body = None;
            return Error::e_explain(
                HTTPStatus(r.code.status()),
                "the body crossed what the plan allows",
            );
        }
        Ok(())
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
        if ctx.cut_off {
            *body = None;
            return Error::e_explain(ConnectionClosed, "balance exhausted: stream ended");
        }
        let Some(m) = ctx.metered.as_ref().filter(|_| ctx.answered) else {
            return Ok(None);
        };
        let watch_fired = match &ctx.watch {
            Some(w) if end_of_stream => !w.stop(),
            Some(w) => w.fired(),
            None => false,
        };
        if !watch_fired && (end_of_stream || !self.ledger.exhausted(&m.account)) {
            return Ok(None);
        }
        ctx.cut_off = true;
        if ctx.websocket {
            // the close frame goes out, then the connection ends (the upstream's read side
            // may already be shut by the watch: the end arrives right after)
            *body = Some(Bytes::from_static(CLOSE_1008));
            return Ok(None);
        }
        *body = None;
        Error::e_explain(ConnectionClosed, "balance exhausted: stream ended")
    }

    /// Tells the client its session and the balance it has left.
    async fn response_filter(
        &self,
        session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        if resp.status.is_informational() && resp.status != 101 {
            // an interim answer (100 Continue): the final one is still to come, and the
            // customer's headers go with that
            return Ok(());
        }
        if let Some(m) = &ctx.metered {
            ctx.answered = true;
            if let Some(id) = &m.admission.session_id {
                resp.insert_header(titled::SESSION, id.clone())?;
            }
            if m.guest.is_none() {
                let secs = m.account.remaining_ms().max(0) / 1000;
                resp.insert_header(titled::BALANCE, secs)?;
                // each flush charges the time the request has run so far, from its admission
                // (a connection held open for an hour is an hour)
                ctx.websocket = resp.status.as_u16() == 101;
                if ctx.websocket {
                    // an upgraded connection may sit quiet for long; it is paid by the second,
                    // so the downstream read timeout (meant for trickled requests) is lifted
                    session.set_read_timeout(None);
                }
                // a response that may stay open and quiet is watched, to end it once its
                // balance is spent even when no data passes
                let open_ended = ctx.websocket
                    || (resp.headers.get(CONTENT_LENGTH).is_none()
                        && session.req_header().method != http::Method::HEAD
                        && !matches!(resp.status.as_u16(), 204 | 304));
                if open_ended && ctx.watch.is_none() {
                    if let Some(fd) = ctx.upstream_fd {
                        match StreamWatch::start(
                            m.account.clone(),
                            fd,
                            self.opts.stream_check_interval,
                        ) {
                            Ok(w) => ctx.watch = Some(w),
                            Err(e) => tracing::warn!(error = %e, "cannot watch a stream"),
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Upstream failures get the JSON `upstream_unavailable` error and are not charged.
    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut Ctx) -> FailToProxy {
        if ctx.websocket && !ctx.cut_off && ctx.watch.as_ref().is_some_and(StreamWatch::fired) {
            // the watch ended the app's side; over TLS that reads as an error, not an end, so
            // the close frame the body filter would have sent goes out here
            ctx.cut_off = true;
            let _ = session
                .write_response_body(Some(Bytes::from_static(CLOSE_1008)), true)
                .await;
            return FailToProxy {
                error_code: 0,
                can_reuse_downstream: false,
            };
        }
        let code = match e.etype() {
            HTTPStatus(code) => *code,
            _ => match e.esource() {
                ErrorSource::Upstream => 502,
                ErrorSource::Downstream => match e.etype() {
                    WriteError | ReadError | ConnectionClosed => 0,
                    _ => 400,
                },
                ErrorSource::Internal | ErrorSource::Unset => 500,
            },
        };
        if e.esource() == &ErrorSource::Upstream {
            ctx.upstream_failed = true;
        }
        // nothing final sent yet (a 100 Continue relayed from the app is only an interim answer)
        let unanswered = session
            .response_written()
            .is_none_or(|r| r.status.is_informational() && r.status != 101);
        if let Some(r) = ctx.body_refusal.filter(|_| unanswered) {
            if self.respond(session, r).await.is_ok() {
                discard_request_body(session).await;
            }
            return FailToProxy {
                error_code: r.code.status(),
                can_reuse_downstream: false,
            };
        }
        if code == 502 && unanswered {
            let _ = self
                .respond(session, ErrorCode::UpstreamUnavailable.into())
                .await;
        } else if code > 0 && unanswered {
            let _ = session.respond_error(code).await;
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    /// Every request ends here: the tally (charged unless the gateway or upstream failed), the
    /// metrics, and one access-log row.
    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut Ctx) {
        self.rearm_head_deadline(session);
        if !ctx.entered {
            return;
        }
        self.in_flight.leave();
        let elapsed = ctx.start.elapsed();
        // ended by us when the balance ran out mid-stream (the watch's end of a quiet one
        // reaches here as an upstream read error)
        let cut_off = ctx.cut_off || ctx.watch.as_ref().is_some_and(StreamWatch::fired);
        let upstream_error = ctx.upstream_failed
            || e.is_some_and(|e| !matches!(e.esource(), ErrorSource::Downstream));
        let client_closed = !cut_off && !upstream_error && e.is_some_and(client_went_away);
        let bytes_in = session.body_bytes_read() as u64;
        let bytes_out = session.body_bytes_sent() as u64;

        let m = &*metrics::REQUEST;
        let (outcome, counter, histogram) = match ctx.outcome {
            Outcome::Denied(code) => {
                metrics::DENIED.with_label_values(&[code.code()]).inc();
                (code.code(), &m.denied, &m.denied_duration)
            }
            // ended by us when the balance ran out mid-stream: used, and charged
            _ if cut_off => ("balance_exhausted", &m.ok, &m.ok_duration),
            _ if upstream_error => {
                metrics::UPSTREAM_ERRORS.inc();
                (
                    "upstream_error",
                    &m.upstream_error,
                    &m.upstream_error_duration,
                )
            }
            // the client went away before its answer was delivered (charged: the app worked)
            _ if client_closed => ("client_closed", &m.client_closed, &m.client_closed_duration),
            Outcome::Free => ("free", &m.free, &m.free_duration),
            Outcome::Metered | Outcome::Unknown => ("ok", &m.ok, &m.ok_duration),
        };
        counter.inc();
        histogram.observe(elapsed.as_secs_f64());
        if cut_off {
            tracing::info!(
                license = ctx.metered.as_ref().map(|m| m.account.id),
                "stream ended: the balance ran out"
            );
        }

        if let Some(metered) = &ctx.metered {
            let ending = if cut_off {
                // ended by us when the balance ran out mid-stream: used, and charged
                Ending::Charged
            } else if matches!(ctx.outcome, Outcome::Denied(_)) && !ctx.answered {
                // a body cut off at the plan's cap is a denial: it costs nothing
                Ending::Returned(ReturnReason::Refused)
            } else if matches!(ctx.outcome, Outcome::Denied(_)) {
                // cut off after the app answered (a stream whose client sent past the cap):
                // what it used while it ran stays charged
                Ending::Broken
            } else if upstream_error && ctx.answered {
                Ending::Broken
            } else if upstream_error {
                Ending::Returned(ReturnReason::GatewayFailure)
            } else {
                Ending::Charged
            };
            self.ledger.finish(
                &metered.account,
                metered.admission.ticket,
                ending,
                bytes_in,
                bytes_out,
            );
        }

        let req = session.req_header();
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        // refused without a known license: anyone can send these, so their rows are a sample
        let unknown = ctx.denied_license.is_none() && matches!(ctx.outcome, Outcome::Denied(_));
        let row = AccessLog {
            ts_ms: ctx.start_ms,
            license_id: ctx
                .metered
                .as_ref()
                .filter(|m| m.guest.is_none())
                .map(|m| m.account.id)
                .or(ctx.denied_license),
            guest_id: ctx.guest.clone(),
            session_id: ctx
                .metered
                .as_ref()
                .and_then(|m| m.admission.session_id.clone()),
            method: req.method.clone(),
            path: clipped(req.uri.path().as_bytes(), MAX_PATH),
            status,
            outcome,
            duration_us: elapsed.as_micros() as u64,
            bytes_in,
            bytes_out,
            client_ip: ctx.client_ip,
            user_agent: req
                .headers
                .get(USER_AGENT)
                .map(|v| clipped(v.as_bytes(), MAX_USER_AGENT)),
        };
        if unknown {
            self.logs.send_refused(row);
        } else {
            self.logs.send(row);
        }
    }
}

#[cfg(test)]
mod tests;
