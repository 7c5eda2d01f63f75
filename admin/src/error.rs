//! Errors as DESIGN.md's JSON bodies, and extractors whose rejections use them: a malformed body,
//! query or path gets `bad_request` (or `not_found`) with a message that says what was wrong.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use gateway::errors::ErrorCode;
use gateway::store::StoreError;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

/// An error answer: a code from DESIGN.md, a message for people, and fields that help.
#[derive(Debug)]
pub struct ApiError {
    pub code: ErrorCode,
    message: Option<String>,
    extra: Map<String, Value>,
    /// The input field the error is about, when it is about one (a form shows it beside that
    /// field); not part of the JSON body, whose message names it for people.
    field: Option<&'static str>,
    /// What failed underneath an `internal_error` (the store's own words), for a local
    /// caller (the CLI) and the log; never in an answer, which may go to anyone.
    cause: Option<String>,
}

pub type ApiResult<T> = Result<T, ApiError>;

impl ApiError {
    pub fn new(code: ErrorCode) -> ApiError {
        ApiError {
            code,
            message: None,
            extra: Map::new(),
            field: None,
            cause: None,
        }
    }

    pub fn msg(code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError {
            message: Some(message.into()),
            ..ApiError::new(code)
        }
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::msg(ErrorCode::BadRequest, message)
    }

    pub fn not_found(what: &str) -> ApiError {
        ApiError::msg(ErrorCode::NotFound, format!("No such {what}."))
    }

    /// What a person is told: the message, else the code's own.
    pub fn text(&self) -> &str {
        self.message.as_deref().unwrap_or(self.code.message())
    }

    /// A bad value of one input field.
    pub fn invalid(field: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            field: Some(field),
            ..ApiError::bad_request(message)
        }
    }

    /// The input field the error is about, if any.
    pub fn field(&self) -> Option<&'static str> {
        self.field
    }

    /// What a person at this machine is told: the cause of an internal error when there is
    /// one (the store's own words), else [`ApiError::text`]. Not for HTTP answers.
    pub fn local_text(&self) -> &str {
        self.cause.as_deref().unwrap_or(self.text())
    }

    pub fn with(mut self, key: &str, value: impl Into<Value>) -> ApiError {
        self.extra.insert(key.into(), value.into());
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.code.status()).unwrap_or(StatusCode::BAD_REQUEST);
        let retry_after = self.extra.get("retry_after_s").and_then(Value::as_i64);
        let body = self.code.body_with(self.message.as_deref(), self.extra);
        let mut r = (status, [(header::CONTENT_TYPE, "application/json")], body).into_response();
        if let Some(s) = retry_after {
            r.headers_mut().insert(header::RETRY_AFTER, s.into());
        }
        r
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        match e {
            StoreError::NotFound => ApiError::not_found("license"),
            StoreError::Invalid(m) => ApiError::bad_request(m),
            StoreError::Overdraft { balance_ms } => ApiError {
                field: Some("hours"),
                ..ApiError::msg(
                    ErrorCode::InsufficientBalance,
                    format!(
                        "hours: the debit is larger than the balance ({} left); send \
                     \"allow_overdraft\": true to take the balance below zero",
                        gateway::timefmt::duration(balance_ms)
                    ),
                )
                .with(
                    "hours_remaining",
                    gateway::license::ms_to_hours(balance_ms.max(0)),
                )
            },
            e => {
                gateway::metrics::STORE_ERRORS.inc();
                tracing::error!(error = %e, "admin: store operation failed");
                ApiError {
                    cause: Some(e.to_string()),
                    ..ApiError::new(ErrorCode::Internal)
                }
            }
        }
    }
}

/// `axum::Json`, with malformed bodies answered as `bad_request`: the body must be sent as JSON
/// and be one JSON object (serde would also read a struct from an array), and a body over
/// [`crate::MAX_BODY_BYTES`] is `payload_too_large`.
pub struct ApiJson<T>(pub T);

fn is_json(headers: &axum::http::HeaderMap) -> bool {
    let Some(v) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let essence = v
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// The answer for a body over the admin server's limit.
pub fn body_too_large() -> ApiError {
    ApiError::msg(
        ErrorCode::PayloadTooLarge,
        format!(
            "The request body is larger than {} bytes.",
            crate::MAX_BODY_BYTES
        ),
    )
    .with("max_body_bytes", crate::MAX_BODY_BYTES)
}

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        if !is_json(req.headers()) {
            return Err(ApiError::bad_request(
                "Send a JSON body with Content-Type: application/json.",
            ));
        }
        let bytes = match Bytes::from_request(req, state).await {
            Ok(b) => b,
            Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => return Err(body_too_large()),
            Err(_) => return Err(ApiError::bad_request("The request body could not be read.")),
        };
        let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
        if first != Some(&b'{') {
            return Err(ApiError::bad_request("The body must be a JSON object."));
        }
        match axum::Json::<T>::from_bytes(&bytes) {
            Ok(axum::Json(v)) => Ok(ApiJson(v)),
            Err(e) => Err(ApiError::bad_request(e.body_text())),
        }
    }
}

/// `axum::extract::Query`, with malformed parameters answered as `bad_request`.
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(v)) => Ok(ApiQuery(v)),
            Err(e) => Err(ApiError::bad_request(e.body_text())),
        }
    }
}

/// A license id from the path: anything but a positive integer names no license.
pub struct LicenseId(pub i64);

impl<S: Send + Sync> FromRequestParts<S> for LicenseId {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let axum::extract::Path(raw) =
            axum::extract::Path::<String>::from_request_parts(parts, state)
                .await
                .map_err(|_| ApiError::not_found("license"))?;
        match raw.parse::<i64>() {
            Ok(id) if id > 0 => Ok(LicenseId(id)),
            _ => Err(ApiError::not_found("license")),
        }
    }
}

impl utoipa::IntoParams for LicenseId {
    fn into_params(
        _: impl Fn() -> Option<utoipa::openapi::path::ParameterIn>,
    ) -> Vec<utoipa::openapi::path::Parameter> {
        use utoipa::openapi::path::{ParameterBuilder, ParameterIn};
        use utoipa::openapi::schema::{ObjectBuilder, Type};
        use utoipa::openapi::{KnownFormat, Required, SchemaFormat};
        let id = ObjectBuilder::new()
            .schema_type(Type::Integer)
            .format(Some(SchemaFormat::KnownFormat(KnownFormat::Int64)))
            .minimum(Some(1));
        vec![ParameterBuilder::new()
            .name("id")
            .parameter_in(ParameterIn::Path)
            .required(Required::True)
            .description(Some("The license's id."))
            .schema(Some(id))
            .build()]
    }
}

/// A license id and one of its keys' ids from the path (`/api/licenses/{id}/keys/{key_id}/…`):
/// anything but positive integers names no key.
pub struct KeyIds(pub i64, pub i64);

impl<S: Send + Sync> FromRequestParts<S> for KeyIds {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let axum::extract::Path((id, key_id)) =
            axum::extract::Path::<(String, String)>::from_request_parts(parts, state)
                .await
                .map_err(|_| ApiError::not_found("key"))?;
        match (id.parse::<i64>(), key_id.parse::<i64>()) {
            (Ok(id), Ok(key_id)) if id > 0 && key_id > 0 => Ok(KeyIds(id, key_id)),
            _ => Err(ApiError::not_found("key")),
        }
    }
}

impl utoipa::IntoParams for KeyIds {
    fn into_params(
        f: impl Fn() -> Option<utoipa::openapi::path::ParameterIn>,
    ) -> Vec<utoipa::openapi::path::Parameter> {
        use utoipa::openapi::path::{ParameterBuilder, ParameterIn};
        use utoipa::openapi::schema::{ObjectBuilder, Type};
        use utoipa::openapi::{KnownFormat, Required, SchemaFormat};
        let mut params = LicenseId::into_params(f);
        let id = ObjectBuilder::new()
            .schema_type(Type::Integer)
            .format(Some(SchemaFormat::KnownFormat(KnownFormat::Int64)))
            .minimum(Some(1));
        params.push(
            ParameterBuilder::new()
                .name("key_id")
                .parameter_in(ParameterIn::Path)
                .required(Required::True)
                .description(Some("The key's id (`GET /api/licenses/{id}/keys`)."))
                .schema(Some(id))
                .build(),
        );
        params
    }
}

/// The answer for routes that do not exist.
pub async fn no_route() -> ApiError {
    ApiError::msg(ErrorCode::NotFound, "No such endpoint.")
}
