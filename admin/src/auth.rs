//! Who is calling: the operator (the admin token, compared in constant time) or a customer (their
//! license key, looked up by its hash).

use std::net::{IpAddr, SocketAddr};

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap};
use gateway::errors::ErrorCode;
use gateway::keys::{self, KeyHash};
use gateway::store::License;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::error::ApiError;
use crate::AdminState;

/// The admin token as a SHA-256 digest: comparing digests makes the comparison's length fixed,
/// and `ct_eq` makes its time independent of where the first difference is.
#[derive(Clone)]
pub struct TokenCheck(Option<[u8; 32]>);

impl TokenCheck {
    pub fn new(token: Option<&str>) -> TokenCheck {
        TokenCheck(token.map(|t| Sha256::digest(t.as_bytes()).into()))
    }

    pub fn configured(&self) -> bool {
        self.0.is_some()
    }

    /// Whether `presented` is the token.
    pub fn accepts(&self, presented: &[u8]) -> bool {
        match &self.0 {
            Some(want) => {
                let got: [u8; 32] = Sha256::digest(presented).into();
                bool::from(want.ct_eq(&got))
            }
            None => false,
        }
    }
}

/// The client's address: the peer's, or the one a trusted proxy (`[admin] trusted_proxies`,
/// `[proxy]`'s unless set) forwarded.
pub fn client_ip(st: &AdminState, peer: Option<SocketAddr>, headers: &HeaderMap) -> IpAddr {
    let peer = peer.map_or(IpAddr::from([0, 0, 0, 0]), |p| p.ip());
    st.app.config.admin.trusted_proxies.client(peer, headers)
}

/// Refuses `ip` while it has made too many wrong attempts (429 with `Retry-After`).
pub fn not_throttled(st: &AdminState, ip: IpAddr, now: i64) -> Result<(), ApiError> {
    st.shared.throttle.check(ip, now).map_err(|retry_after_s| {
        ApiError::msg(
            ErrorCode::RateLimited,
            format!(
                "Too many wrong admin tokens from this address; try again in {retry_after_s} s."
            ),
        )
        .with("retry_after_s", retry_after_s)
    })
}

/// Counts a wrong admin token from `ip` against its allowance.
pub fn wrong_token(st: &AdminState, ip: IpAddr, now: i64, what: &str) {
    st.shared.throttle.failed(ip, now, what);
}

/// A request from the operator: `Authorization: Bearer $TOLLGATE_ADMIN_TOKEN`.
pub struct Operator;

impl FromRequestParts<AdminState> for Operator {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, st: &AdminState) -> Result<Self, ApiError> {
        if !st.shared.token.configured() {
            return Err(ApiError::msg(
                ErrorCode::Unauthorized,
                "The operator API is disabled: set TOLLGATE_ADMIN_TOKEN and restart.",
            ));
        }
        let presented = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| keys::bearer(v.as_bytes()));
        let peer = parts
            .extensions
            .get::<ConnectInfo<crate::Peer>>()
            .map(|c| c.0 .0);
        let ip = client_ip(st, peer, &parts.headers);
        let now = st.app.ledger.now_ms();
        match presented {
            // the token is always compared first: a valid one is never throttled, whatever
            // others sent from the same address (a balancer's, say)
            Some(t) if st.shared.token.accepts(t) => Ok(Operator),
            Some(_) => {
                not_throttled(st, ip, now)?;
                wrong_token(st, ip, now, "operator API");
                Err(ApiError::msg(
                    ErrorCode::Unauthorized,
                    "The admin token is not valid.",
                ))
            }
            None => Err(ApiError::msg(
                ErrorCode::Unauthorized,
                "Send the admin token as Authorization: Bearer <token>.",
            )),
        }
    }
}

/// The license key a customer sent: the `X-License-Key` header, else `?license_key=`.
pub fn presented_key(headers: &HeaderMap, query: Option<&str>) -> Option<String> {
    if let Some(v) = headers.get("x-license-key") {
        // not UTF-8: no key of ours, so it is looked up and found invalid rather than missing
        return Some(String::from_utf8_lossy(v.as_bytes()).trim().to_string());
    }
    let q = keys::query_param(query?, "license_key")?;
    // keys are base62, so percent-decoding never matters for a valid one
    Some(q.to_string())
}

/// Looks a customer's license up by key; unknown or malformed keys are `invalid_license_key`.
pub async fn license_for_key(st: &AdminState, key: Option<&str>) -> Result<License, ApiError> {
    let Some(key) = key.filter(|k| !k.is_empty()) else {
        return Err(ApiError::new(ErrorCode::MissingLicenseKey));
    };
    if key.len() > 128 {
        return Err(ApiError::new(ErrorCode::InvalidLicenseKey));
    }
    let hash = KeyHash::of(key.as_bytes());
    // a key looked up lately and not found (by the proxy or here) costs no query; and while
    // the budget of lookups that find nothing is spent, none is made (`gateway::lookups`)
    let ledger = &st.app.ledger;
    if matches!(ledger.lookup(&hash), gateway::ledger::Lookup::Unknown) {
        return Err(ApiError::new(ErrorCode::InvalidLicenseKey));
    }
    let Some(lookup) = ledger.lookups().may_look_up("license_key") else {
        return Err(too_many_unknown());
    };
    match st.app.store.license_by_key(hash).await? {
        Some(l) => Ok(l),
        None => {
            ledger.insert_loaded(hash, None);
            lookup.found_nothing();
            Err(ApiError::new(ErrorCode::InvalidLicenseKey))
        }
    }
}

/// The answer while the budget of lookups that find nothing is spent.
pub fn too_many_unknown() -> ApiError {
    ApiError::msg(
        ErrorCode::RateLimited,
        "Too many unknown keys and sessions are being looked up; try again in a second.",
    )
    .with("retry_after_s", 1)
}

/// A request from a customer, authenticated by their license key.
pub struct Customer(pub License);

impl FromRequestParts<AdminState> for Customer {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, st: &AdminState) -> Result<Self, ApiError> {
        let key = presented_key(&parts.headers, parts.uri.query());
        license_for_key(st, key.as_deref()).await.map(Customer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_check_accepts_only_the_token() {
        let t = TokenCheck::new(Some("s3cret-token"));
        assert!(t.accepts(b"s3cret-token"));
        for wrong in [&b""[..], b"s3cret-toke", b"s3cret-token ", b"S3cret-token"] {
            assert!(!t.accepts(wrong));
        }
        let none = TokenCheck::new(None);
        assert!(!none.configured());
        assert!(!none.accepts(b""));
    }
}
