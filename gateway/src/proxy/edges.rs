//! The request's edges: what the gateway checks of a request before anything else (its head's
//! size and framing, its target, keep-alive) and rewrites before it goes to the app (the key
//! and spoofed headers removed, the path it matched), and how it reads what is left of a
//! refused body.

use http::header::CONTENT_LENGTH;
use http::{HeaderName, Uri};
use pingora::prelude::*;

use super::KEY_QUERY_PARAM;
use crate::keys;

/// Headers that say where a request came from: the gateway writes its own.
pub(super) const FORWARDING: [&str; 5] = [
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-real-ip",
    "forwarded",
];

/// Whether header name `name` (as sent, lower-cased by the parser) is `ours` in some
/// spelling: any case, and `_` for `-`.
pub(super) fn same_name(name: &[u8], ours: &[u8]) -> bool {
    name.len() == ours.len()
        && name
            .iter()
            .zip(ours)
            .all(|(a, b)| a.to_ascii_lowercase() == *b || (*a == b'_' && *b == b'-'))
}

/// Removes Tollgate's own identity headers, and with `strip_key` the key's header, in every
/// spelling a client may send: any case, and `_` for `-` (some server stacks read
/// `X_Tollgate_License_Id` as `X-Tollgate-License-Id`), so nobody can claim another license.
///
/// Claims of where the request came from ([`FORWARDING`]) go too, in every spelling
/// (`X_Forwarded_For` reaches CGI-style apps as the same variable; the gateway writes its own);
/// from a trusted proxy only the canonical spellings stay, to be read and passed on.
///
/// The app's usage header (`proxy.usage_header`) goes too: only the app reports usage.
pub(super) fn remove_spoofed_headers(
    req: &mut RequestHeader,
    strip_key: bool,
    from_trusted: bool,
    usage_header: &HeaderName,
) {
    let usage = usage_header.as_str().as_bytes();
    let ours = |name: &[u8]| -> bool {
        const PREFIX: &[u8] = b"x-tollgate-";
        (name.len() > PREFIX.len() && same_name(&name[..PREFIX.len()], PREFIX))
            || same_name(name, usage)
            || (strip_key && same_name(name, b"x-license-key"))
            || ((!from_trusted || name.contains(&b'_'))
                && FORWARDING.iter().any(|f| same_name(name, f.as_bytes())))
    };
    if !req.headers.keys().any(|k| ours(k.as_str().as_bytes())) {
        return; // the usual case: nothing to remove, nothing allocated
    }
    let found: Vec<HeaderName> = req
        .headers
        .keys()
        .filter(|k| ours(k.as_str().as_bytes()))
        .cloned()
        .collect();
    for name in found {
        req.remove_header(&name);
    }
}

/// The most of a refused body read after the refusal, and for how long.
const DISCARD_BYTES: usize = 16 * 1024 * 1024;
const DISCARD_FOR: std::time::Duration = std::time::Duration::from_secs(5);

/// Reads and drops what is left of a refused request's body, within a bound, before the
/// connection closes. A client still sending (an upload past the plan's cap, after a relayed
/// `100 Continue`) reads the 413 only if its connection is not reset under it, which closing a
/// socket with unread data does; over HTTP/2 a stream whose body was read to its end closes
/// cleanly instead of with an error.
pub(super) async fn discard_request_body(session: &mut Session) {
    let deadline = tokio::time::Instant::now() + DISCARD_FOR;
    let mut left = DISCARD_BYTES;
    while left > 0 && !session.is_body_done() {
        match tokio::time::timeout_at(deadline, session.read_request_body()).await {
            Ok(Ok(Some(chunk))) => left = left.saturating_sub(chunk.len()),
            _ => break,
        }
    }
}

/// Whether an error is the client's side of the connection ending (it closed, reset, or
/// stopped reading), not a failure of the gateway or the app.
pub(super) fn client_went_away(e: &Error) -> bool {
    e.esource() == &ErrorSource::Downstream
        && matches!(e.etype(), ReadError | WriteError | ConnectionClosed)
}

/// Whether the client lets the connection be reused after this request (RFC 9112 §9.3): not
/// with `Connection: close`; over HTTP/1.0 only with `Connection: keep-alive`. HTTP/2 streams
/// do not ask.
pub(super) fn client_keeps_alive(req: &pingora::http::RequestHeader) -> bool {
    let mut close = false;
    let mut keep_alive = false;
    for v in req.headers.get_all(http::header::CONNECTION) {
        for token in v.as_bytes().split(|b| *b == b',') {
            let token = token.trim_ascii();
            close |= token.eq_ignore_ascii_case(b"close");
            keep_alive |= token.eq_ignore_ascii_case(b"keep-alive");
        }
    }
    if close {
        return false;
    }
    match req.version {
        http::Version::HTTP_09 | http::Version::HTTP_10 => keep_alive,
        _ => true,
    }
}

/// Whether a request's target is one a server may take: a path (origin form), an http(s) URL
/// (absolute form), or `*`. Anything else parses as `/` and would be matched as that while the
/// app reads the raw target (`foo:/private/x`).
pub(super) fn sane_target(req: &pingora::http::RequestHeader) -> bool {
    let raw = req.raw_path();
    let lower = |p: &[u8]| raw.len() >= p.len() && raw[..p.len()].eq_ignore_ascii_case(p);
    raw.starts_with(b"/") || raw == b"*" || lower(b"http://") || lower(b"https://")
}

/// Whether a request declares its length more than once (`Content-Length: 3, 3`, or two
/// header lines): refused rather than forwarded as it came (RFC 9112 §6.3).
pub(super) fn ambiguous_length(req: &pingora::http::RequestHeader) -> bool {
    let mut lengths = req.headers.get_all(CONTENT_LENGTH).iter();
    match (lengths.next(), lengths.next()) {
        (Some(v), None) => v.as_bytes().contains(&b','),
        (Some(_), Some(_)) => true,
        _ => false,
    }
}

/// The size of a request's line and headers as sent (near enough: names, values, separators).
pub(super) fn header_bytes(req: &pingora::http::RequestHeader) -> usize {
    let uri = &req.uri;
    let line = req.method.as_str().len()
        + uri.path_and_query().map_or(1, |pq| pq.as_str().len())
        + uri.authority().map_or(0, |a| a.as_str().len())
        + 11;
    req.headers
        .iter()
        .fold(line, |n, (k, v)| n + k.as_str().len() + v.len() + 4)
}

/// The URI with another path, its query kept.
pub(super) fn with_path(uri: &Uri, path: &str) -> Result<Uri> {
    rebuilt(uri, path, uri.query())
}

/// The URI with this path and query, its scheme and authority kept.
fn rebuilt(uri: &Uri, path: &str, query: Option<&str>) -> Result<Uri> {
    let pq = match query {
        Some(q) => format!("{path}?{q}"),
        None => path.to_string(),
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(
        pq.parse()
            .map_err(|e| Error::because(InternalError, "rebuilding the URI", e))?,
    );
    Uri::from_parts(parts).map_err(|e| Error::because(InternalError, "rebuilding the URI", e))
}

/// The URI forwarded upstream: the same, less any `license_key` query parameter.
pub fn strip_key_from_uri(uri: &Uri) -> Result<Uri> {
    if uri
        .query()
        .is_none_or(|q| keys::query_param(q, KEY_QUERY_PARAM).is_none())
    {
        return Ok(uri.clone());
    }
    // an absolute-form target with a query and no path ("http://h?q") has the path "/"
    let path = match uri.path() {
        "" => "/",
        p => p,
    };
    let rest = uri
        .query()
        .and_then(|q| keys::strip_query_param(q, KEY_QUERY_PARAM));
    rebuilt(uri, path, rest.as_deref())
}

/// What is wrong with a request's head that the gateway refuses before looking at its key:
/// the status and the message (the JSON `bad_request` error).
pub(super) fn malformed(
    req: &pingora::http::RequestHeader,
    opts: &super::ProxyOptions,
) -> Option<(u16, String)> {
    if header_bytes(req) > opts.max_header_bytes {
        let message = format!(
            "The request line and headers are larger than {} bytes.",
            opts.max_header_bytes
        );
        return Some((431, message));
    }
    if !sane_target(req) {
        // matched as `/` but forwarded as sent: refused (RFC 9112 §3.2)
        let message = "The request target must be a path, an http(s) URL or *.";
        return Some((400, message.into()));
    }
    if ambiguous_length(req) {
        // two lengths: the app and the gateway could frame the body differently
        return Some((400, "The request has more than one Content-Length.".into()));
    }
    None
}
