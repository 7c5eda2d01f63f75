//! The HTML side of the admin listener: the operator console (`/`, `/console/…`) and the
//! customers' payment page (`/payments/`).
//!
//! Pages are rendered on the server with `maud` and work without JavaScript; the one script
//! only adds a copy button. `maud` escapes every value spliced into a page, so nothing here
//! escapes by hand. Charts are inline SVG drawn here. Stylesheet and script are compiled into
//! the binary and served from `/assets/`, so nothing is fetched from elsewhere.
//!
//! - [`session`]: the console's sign-ins, CSRF tokens and the keys held to be shown once
//! - [`layout`]: the page around every page, and the pieces pages are made of
//! - [`charts`], [`format`]: the charts, and numbers as people read them
//! - [`operator`], [`customer`]: who may see what (sign-in, form tokens, cookies)
//! - [`pages`]: one file per page

use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use crate::AdminState;

pub mod charts;
pub mod customer;
pub mod format;
pub mod history;
pub mod layout;
pub mod limits;
pub mod operator;
pub mod pages;
pub mod session;

pub use layout::{notice, page, Area};

/// The balance changes of a history page.
pub fn changes(
    page: &gateway::store::Page,
) -> impl Iterator<Item = &gateway::store::BalanceChange> {
    page.items.iter().filter_map(|i| match i {
        gateway::store::HistoryItem::Change(c) => Some(c),
        _ => None,
    })
}

/// The sessions of a history page.
pub fn sessions(page: &gateway::store::Page) -> impl Iterator<Item = &gateway::store::SessionRow> {
    page.items.iter().filter_map(|i| match i {
        gateway::store::HistoryItem::Session(s) => Some(s),
        _ => None,
    })
}

const CSS: &str = include_str!("assets/console.css");
const JS: &str = include_str!("assets/console.js");

pub fn routes() -> Router<AdminState> {
    Router::new()
        .route("/assets/console.css", get(css))
        .route("/assets/console.js", get(js))
        .merge(operator::routes())
        .merge(customer::routes())
}

async fn css() -> Response {
    asset("text/css; charset=utf-8", CSS)
}

async fn js() -> Response {
    asset("text/javascript; charset=utf-8", JS)
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "public, max-age=3600"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response()
}

/// A query string as `T`; one that does not parse reads as no query (pages show their
/// defaults rather than an error).
pub fn query<T: for<'de> serde::Deserialize<'de> + Default>(q: Option<&str>) -> T {
    q.and_then(|q| serde_urlencoded::from_str(q).ok())
        .unwrap_or_default()
}

/// A form body as `T`; a body that does not parse reads as an empty form (its fields are then
/// reported missing next to them).
pub fn form<T: for<'de> serde::Deserialize<'de> + Default>(body: &[u8]) -> T {
    serde_urlencoded::from_bytes(body).unwrap_or_default()
}

/// A redirect after a form post (303: the browser follows with GET).
pub fn see_other(location: &str) -> Response {
    let mut r = StatusCode::SEE_OTHER.into_response();
    if let Ok(v) = HeaderValue::from_str(location) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// Whether a form post comes from a page of this server: the `Origin` (or, without one, the
/// `Referer`) must name the host the request was sent to. Browsers send `Origin` with every
/// cross-site POST, so another site's form cannot pass.
pub fn same_origin(headers: &HeaderMap) -> bool {
    let Some(host) = headers.get(header::HOST).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let origin = headers
        .get(header::ORIGIN)
        .or_else(|| headers.get(header::REFERER))
        .and_then(|v| v.to_str().ok());
    let Some(origin) = origin else {
        // neither header (an old client or a privacy proxy): the CSRF token still decides
        return true;
    };
    let rest = origin
        .strip_prefix("https://")
        .or_else(|| origin.strip_prefix("http://"));
    match rest {
        Some(rest) => rest.split('/').next() == Some(host),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_origin_takes_only_this_host() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, "127.0.0.1:8081".parse().unwrap());
        assert!(same_origin(&h), "no Origin: left to the token");
        h.insert(header::ORIGIN, "http://127.0.0.1:8081".parse().unwrap());
        assert!(same_origin(&h));
        h.insert(header::ORIGIN, "http://127.0.0.1:9999".parse().unwrap());
        assert!(!same_origin(&h));
        h.insert(header::ORIGIN, "null".parse().unwrap());
        assert!(!same_origin(&h));
        h.insert(
            header::ORIGIN,
            "http://127.0.0.1:8081.evil.example".parse().unwrap(),
        );
        assert!(!same_origin(&h));
    }

    #[test]
    fn a_referer_stands_in_for_a_missing_origin() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, "127.0.0.1:8081".parse().unwrap());
        h.insert(
            header::REFERER,
            "http://127.0.0.1:8081/console/licenses/3".parse().unwrap(),
        );
        assert!(same_origin(&h));
        h.insert(
            header::REFERER,
            "http://evil.example/?next=127.0.0.1:8081".parse().unwrap(),
        );
        assert!(!same_origin(&h));
    }

    #[test]
    fn a_request_without_a_host_is_never_same_origin() {
        let mut h = HeaderMap::new();
        h.insert(header::ORIGIN, "http://127.0.0.1:8081".parse().unwrap());
        assert!(!same_origin(&h));
    }
}
