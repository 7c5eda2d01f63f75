//! The JSON error codes of DESIGN.md, shared by the proxy and the admin server:
//! `{"error": "<code>", "message": "<for people>"}` plus fields that help.

use serde_json::{Map, Value};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorCode {
    MissingLicenseKey,
    InvalidLicenseKey,
    LicenseRevoked,
    LicenseExpired,
    InsufficientBalance,
    QuotaExceeded,
    RateLimited,
    ConcurrencyLimit,
    PayloadTooLarge,
    UpstreamUnavailable,
    BadRequest,
    Unauthorized,
    NotFound,
    InvalidSignature,
    /// Payments are not configured here (no Stripe secret key).
    PaymentsUnavailable,
    /// Stripe could not be reached or refused the call.
    PaymentProviderError,
    /// The database could not be reached to decide the request (a key not in memory while
    /// it is down).
    StoreUnavailable,
    /// The gateway holds as many requests in flight as its descriptors allow.
    Overloaded,
    /// Something failed on our side; the message says what, never a secret.
    Internal,
}

/// The codes a proxy request can be denied with (the `reason` label of `tollgate_denied_total`).
pub const DENIAL_CODES: &[&str] = &[
    "missing_license_key",
    "invalid_license_key",
    "license_revoked",
    "license_expired",
    "insufficient_balance",
    "quota_exceeded",
    "rate_limited",
    "concurrency_limit",
    "payload_too_large",
    "store_unavailable",
    "overloaded",
];

impl ErrorCode {
    /// Every code, in DESIGN.md's order.
    pub const ALL: &'static [ErrorCode] = &[
        ErrorCode::MissingLicenseKey,
        ErrorCode::InvalidLicenseKey,
        ErrorCode::LicenseRevoked,
        ErrorCode::LicenseExpired,
        ErrorCode::InsufficientBalance,
        ErrorCode::QuotaExceeded,
        ErrorCode::RateLimited,
        ErrorCode::ConcurrencyLimit,
        ErrorCode::PayloadTooLarge,
        ErrorCode::UpstreamUnavailable,
        ErrorCode::BadRequest,
        ErrorCode::Unauthorized,
        ErrorCode::NotFound,
        ErrorCode::InvalidSignature,
        ErrorCode::PaymentsUnavailable,
        ErrorCode::PaymentProviderError,
        ErrorCode::StoreUnavailable,
        ErrorCode::Overloaded,
        ErrorCode::Internal,
    ];

    /// The code whose JSON name is `code`.
    pub fn parse(code: &str) -> Option<ErrorCode> {
        ErrorCode::ALL.iter().copied().find(|c| c.code() == code)
    }

    pub fn code(self) -> &'static str {
        use ErrorCode::*;
        match self {
            MissingLicenseKey => "missing_license_key",
            InvalidLicenseKey => "invalid_license_key",
            LicenseRevoked => "license_revoked",
            LicenseExpired => "license_expired",
            InsufficientBalance => "insufficient_balance",
            QuotaExceeded => "quota_exceeded",
            RateLimited => "rate_limited",
            ConcurrencyLimit => "concurrency_limit",
            PayloadTooLarge => "payload_too_large",
            UpstreamUnavailable => "upstream_unavailable",
            BadRequest => "bad_request",
            Unauthorized => "unauthorized",
            NotFound => "not_found",
            InvalidSignature => "invalid_signature",
            PaymentsUnavailable => "payments_unavailable",
            PaymentProviderError => "payment_provider_error",
            StoreUnavailable => "store_unavailable",
            Overloaded => "overloaded",
            Internal => "internal_error",
        }
    }

    pub fn status(self) -> u16 {
        use ErrorCode::*;
        match self {
            MissingLicenseKey | InvalidLicenseKey | Unauthorized => 401,
            LicenseRevoked | LicenseExpired => 403,
            InsufficientBalance => 402,
            QuotaExceeded | RateLimited | ConcurrencyLimit => 429,
            PayloadTooLarge => 413,
            UpstreamUnavailable => 502,
            BadRequest | InvalidSignature => 400,
            NotFound => 404,
            PaymentsUnavailable | StoreUnavailable | Overloaded => 503,
            PaymentProviderError => 502,
            Internal => 500,
        }
    }

    pub fn message(self) -> &'static str {
        use ErrorCode::*;
        match self {
            MissingLicenseKey => {
                "A license key is required: send it in the X-License-Key header, as \
                 Authorization: Bearer, or as the license_key query parameter."
            }
            InvalidLicenseKey => "The license key is not valid.",
            LicenseRevoked => "The license has been revoked.",
            LicenseExpired => "The license has expired.",
            InsufficientBalance => "No time is left on this license. Buy more hours to continue.",
            QuotaExceeded => "The plan's allowance for this period is used up.",
            RateLimited => "Too many requests. Slow down and retry later.",
            ConcurrencyLimit => "Too many requests in flight for this license.",
            PayloadTooLarge => "The request body is larger than the plan allows.",
            UpstreamUnavailable => "The service behind the gateway could not be reached.",
            BadRequest => "The request is malformed.",
            Unauthorized => "Authentication is required.",
            NotFound => "Not found.",
            InvalidSignature => "The signature could not be verified.",
            PaymentsUnavailable => "Payments are not configured on this gateway.",
            PaymentProviderError => "The payment provider could not be reached. Try again.",
            StoreUnavailable => {
                "The gateway cannot reach its database to check this key. Try again shortly."
            }
            Overloaded => "The gateway is at its limit of requests in flight. Retry shortly.",
            Internal => "Something went wrong on our side. Try again.",
        }
    }

    /// The error body with extra fields (`retry_after_s`, `hours_remaining`, `purchase_url`…).
    pub fn body_with(self, message: Option<&str>, extra: Map<String, Value>) -> Vec<u8> {
        let mut m = Map::new();
        m.insert("error".into(), self.code().into());
        m.insert("message".into(), message.unwrap_or(self.message()).into());
        m.extend(extra);
        serde_json::to_vec(&Value::Object(m)).expect("a JSON map serializes")
    }

    pub fn body(self) -> Vec<u8> {
        self.body_with(None, Map::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_carry_the_code_and_a_message() {
        let v: Value = serde_json::from_slice(&ErrorCode::InsufficientBalance.body()).unwrap();
        assert_eq!(v["error"], "insufficient_balance");
        assert!(v["message"].as_str().unwrap().len() > 10);
        assert_eq!(ErrorCode::InsufficientBalance.status(), 402);
        assert_eq!(ErrorCode::RateLimited.status(), 429);
    }

    #[test]
    fn every_code_is_listed_once_and_parses_back() {
        let mut seen = std::collections::HashSet::new();
        for &c in ErrorCode::ALL {
            assert!(seen.insert(c.code()), "{} twice", c.code());
            assert_eq!(ErrorCode::parse(c.code()), Some(c));
        }
        for code in DENIAL_CODES {
            assert!(ErrorCode::parse(code).is_some(), "{code}");
        }
        assert_eq!(ErrorCode::parse("nope"), None);
    }
}
