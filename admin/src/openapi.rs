//! The admin API as an OpenAPI 3.1 document, generated from the handlers: each handler's
//! `#[utoipa::path]` gives its method, path, parameters and bodies (the view types of
//! [`crate::views`]), and names the error codes it can answer with in an `x-errors` list. The
//! [`ErrorResponses`] step below turns those names into responses, grouped by the status
//! [`ErrorCode::status`] gives each, so a code's status is written down in one place only.
//!
//! Served at `GET /api/openapi.json`; `docs/openapi.json` is the same document, checked in (a
//! test fails when it is stale; `UPDATE_OPENAPI=1 cargo test -p tollgate-admin openapi` writes
//! it).

use std::collections::BTreeMap;

use gateway::errors::ErrorCode;
use serde::Serialize;
use serde_json::{json, Value};
use utoipa::openapi::path::Operation;
use utoipa::openapi::schema::{AllOfBuilder, ObjectBuilder, Schema, Type};
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{
    ContentBuilder, HeaderBuilder, OpenApi, RefOr, ResponseBuilder, SchemaFormat,
};
use utoipa::{Modify, ToSchema};

/// The extension in which a handler's `#[utoipa::path]` lists its error codes.
pub const ERRORS_EXTENSION: &str = "x-errors";

/// The security scheme of the operator's API.
pub const OPERATOR: &str = "admin_token";
/// The security schemes of the customer's endpoints (the header, or the query parameter).
pub const CUSTOMER: &str = "license_key";
pub const CUSTOMER_QUERY: &str = "license_key_query";

/// Every error answer: a code, a message for people, and fields that help.
#[derive(Serialize, ToSchema)]
pub struct ErrorBody {
    /// The error code (see each response for the codes it can be).
    pub error: String,
    /// What went wrong, for people; never a secret.
    pub message: String,
    /// Seconds to wait before trying again (`rate_limited`), as `Retry-After` says.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after_s: Option<i64>,
    /// The largest body accepted (`payload_too_large`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_body_bytes: Option<i64>,
    /// The packages on sale, when an unknown one was asked for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub packages: Option<Vec<String>>,
}

#[derive(utoipa::OpenApi)]
#[openapi(
    info(
        title = "Tollgate admin API",
        description = "Licenses, balances, payments, usage, analytics and exports of a Tollgate \
            metering gateway. Operator endpoints take the admin token \
            (`Authorization: Bearer $TOLLGATE_ADMIN_TOKEN`); customer endpoints take the \
            customer's license key (`X-License-Key`, or `?license_key=`). Every error is \
            `{\"error\": \"<code>\", \"message\": \"…\"}` with the status its code has.",
        license(name = "Apache-2.0 OR MIT"),
    ),
    components(schemas(ErrorBody)),
    tags(
        (name = "health", description = "Liveness and readiness"),
        (name = "licenses", description = "The operator's licenses API"),
        (name = "analytics", description = "The operator's statistics and exports"),
        (name = "payments", description = "Hours sold through Stripe Checkout"),
        (name = "usage", description = "The customer's own balance, limits and alerts"),
    )
)]
pub struct ApiDoc;

struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, api: &mut OpenApi) {
        let c = api.components.get_or_insert_with(Default::default);
        c.add_security_scheme(
            OPERATOR,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("The admin token, TOLLGATE_ADMIN_TOKEN."))
                    .build(),
            ),
        );
        c.add_security_scheme(
            CUSTOMER,
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                "X-License-Key",
                "The customer's license key.",
            ))),
        );
        c.add_security_scheme(
            CUSTOMER_QUERY,
            SecurityScheme::ApiKey(ApiKey::Query(ApiKeyValue::with_description(
                "license_key",
                "The customer's license key, as a query parameter (the header is preferred: \
                 a URL is logged in more places).",
            ))),
        );
    }
}

/// Turns each operation's `x-errors` list into one response per status.
struct ErrorResponses;

impl Modify for ErrorResponses {
    fn modify(&self, api: &mut OpenApi) {
        for (path, item) in api.paths.paths.iter_mut() {
            let ops = [
                &mut item.get,
                &mut item.post,
                &mut item.patch,
                &mut item.put,
                &mut item.delete,
            ];
            for op in ops.into_iter().flatten() {
                add_errors(path, op);
            }
        }
    }
}

fn add_errors(path: &str, op: &mut Operation) {
    let listed = op
        .extensions
        .as_mut()
        .and_then(|e| e.remove(ERRORS_EXTENSION));
    if op.extensions.as_ref().is_some_and(|e| e.is_empty()) {
        op.extensions = None;
    }
    let Some(Value::Array(names)) = listed else {
        return;
    };
    let mut by_status: BTreeMap<u16, Vec<ErrorCode>> = BTreeMap::new();
    for name in names {
        let name = name.as_str().unwrap_or_default();
        let code = ErrorCode::parse(name)
            .unwrap_or_else(|| panic!("{path}: x-errors names {name:?}, which is no error code"));
        by_status.entry(code.status()).or_default().push(code);
    }
    for (status, codes) in by_status {
        let names: Vec<&str> = codes.iter().map(|c| c.code()).collect();
        let description = codes
            .iter()
            .map(|c| format!("`{}`: {}", c.code(), c.message()))
            .collect::<Vec<_>>()
            .join(" ");
        let schema = AllOfBuilder::new()
            .item(RefOr::Ref(utoipa::openapi::Ref::from_schema_name(
                "ErrorBody",
            )))
            .item(
                ObjectBuilder::new()
                    .property(
                        "error",
                        ObjectBuilder::new()
                            .schema_type(Type::String)
                            .enum_values(Some(names.clone())),
                    )
                    .required("error"),
            )
            .build();
        let mut content = ContentBuilder::new().schema(Some(Schema::AllOf(schema)));
        content = content.example(Some(json!({
            "error": names[0],
            "message": codes[0].message(),
        })));
        let mut response = ResponseBuilder::new()
            .description(description)
            .content("application/json", content.build());
        if codes.contains(&ErrorCode::RateLimited) {
            response = response.header(
                "Retry-After",
                HeaderBuilder::new()
                    .schema(Some(
                        ObjectBuilder::new().schema_type(Type::Integer).format(Some(
                            SchemaFormat::KnownFormat(utoipa::openapi::KnownFormat::Int64),
                        )),
                    ))
                    .description(Some("Seconds to wait before trying again."))
                    .build(),
            );
        }
        let previous = op
            .responses
            .responses
            .insert(status.to_string(), response.build().into());
        assert!(
            previous.is_none(),
            "{path}: status {status} is both a success and an error"
        );
    }
}

/// The routes' document made whole: the security schemes, and the errors each operation lists.
pub fn finish(mut doc: OpenApi) -> OpenApi {
    SecuritySchemes.modify(&mut doc);
    ErrorResponses.modify(&mut doc);
    doc
}

/// The whole document, as served and as checked in.
pub fn document() -> OpenApi {
    finish(crate::api_routes().split_for_parts().1)
}

/// `GET /api/openapi.json`: this document. It holds no secrets, so it needs no token.
#[utoipa::path(
    get, path = "/api/openapi.json", operation_id = "openapi", tag = "health",
    responses((status = 200, description = "The OpenAPI 3.1 document",
        body = serde_json::Map<String, serde_json::Value>)),
)]
pub async fn served(
    axum::extract::State(st): axum::extract::State<crate::AdminState>,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let body = st.shared.openapi.get().cloned().unwrap_or_default();
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The checked-in copy, `docs/openapi.json`.
    fn checked_in() -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/openapi.json")
    }

    #[test]
    fn docs_openapi_json_is_the_document_the_code_generates() {
        let now = document().to_pretty_json().unwrap() + "\n";
        let path = checked_in();
        if std::env::var_os("UPDATE_OPENAPI").is_some() {
            std::fs::write(&path, &now).unwrap();
        }
        let before = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            before == now,
            "docs/openapi.json is stale: run `UPDATE_OPENAPI=1 cargo test -p tollgate-admin \
             openapi` and commit it"
        );
    }

    #[test]
    fn every_operation_lists_its_errors_with_their_statuses_and_a_security_scheme_exists() {
        let doc: Value = serde_json::to_value(document()).unwrap();
        let schemes = &doc["components"]["securitySchemes"];
        for name in [OPERATOR, CUSTOMER, CUSTOMER_QUERY] {
            assert!(schemes[name].is_object(), "{name}");
        }
        let mut operations = 0;
        let mut ids = std::collections::HashSet::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                operations += 1;
                // a generated client names its methods by these: two alike is an invalid
                // document (openapi-spec-validator's first finding)
                let id = op["operationId"].as_str().unwrap();
                assert!(ids.insert(id.to_string()), "operationId {id} twice");
                let text = op.to_string();
                assert!(!text.contains(ERRORS_EXTENSION), "{method} {path}: {text}");
                let responses = op["responses"].as_object().unwrap();
                assert!(
                    responses.keys().any(|s| s.starts_with('2')),
                    "{method} {path} has no success"
                );
                for (status, r) in responses.iter().filter(|(s, _)| !s.starts_with('2')) {
                    let codes = &r["content"]["application/json"]["schema"]["allOf"][1]
                        ["properties"]["error"]["enum"];
                    let Some(codes) = codes.as_array() else {
                        // the one non-2xx answer that is no error body
                        assert_eq!((path.as_str(), status.as_str()), ("/ready", "503"));
                        continue;
                    };
                    for code in codes {
                        let code = ErrorCode::parse(code.as_str().unwrap()).unwrap();
                        assert_eq!(code.status().to_string(), *status, "{method} {path}");
                    }
                }
                let operator = path.starts_with("/api/") && path != "/api/openapi.json";
                if operator {
                    assert_eq!(op["security"], json!([{OPERATOR: []}]), "{method} {path}");
                    assert!(responses.contains_key("401"), "{method} {path}");
                }
            }
        }
        assert!(operations >= 24, "{operations} operations");
    }

    /// A schema a parameter names is not collected into the components by itself (the
    /// validator's second finding): every `$ref` must resolve.
    #[test]
    fn every_reference_in_the_document_resolves() {
        fn walk(v: &Value, refs: &mut Vec<String>) {
            match v {
                Value::Object(m) => {
                    if let Some(Value::String(r)) = m.get("$ref") {
                        refs.push(r.clone());
                    }
                    m.values().for_each(|v| walk(v, refs));
                }
                Value::Array(a) => a.iter().for_each(|v| walk(v, refs)),
                _ => {}
            }
        }
        let doc: Value = serde_json::to_value(document()).unwrap();
        let mut refs = Vec::new();
        walk(&doc, &mut refs);
        assert!(refs.len() > 20);
        for r in refs {
            let pointer = r.strip_prefix('#').expect("a local reference");
            assert!(doc.pointer(pointer).is_some(), "{r} does not resolve");
        }
    }

    /// The codes an operation's document lists, from every error response.
    fn listed(op: &Value) -> Vec<String> {
        let mut codes = Vec::new();
        for r in op["responses"].as_object().unwrap().values() {
            let e = &r["content"]["application/json"]["schema"]["allOf"][1]["properties"]["error"];
            for c in e["enum"].as_array().into_iter().flatten() {
                codes.push(c.as_str().unwrap().to_string());
            }
        }
        codes
    }

    /// The errors an operation's extractors can answer with are in its list whatever its
    /// handler does: `Operator` (unauthorized, rate_limited), `Customer` (a missing or unknown
    /// key, or rate_limited), `LicenseId` (not_found), `ApiJson` (bad_request, payload_too_large), `ApiQuery`
    /// (bad_request).
    #[test]
    fn every_operation_lists_the_errors_its_extractors_answer_with() {
        let doc: Value = serde_json::to_value(document()).unwrap();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                let codes = listed(op);
                let has = |c: &str| codes.iter().any(|x| x == c);
                let security = op["security"].as_array().cloned().unwrap_or_default();
                let needs = |scheme: &str| {
                    !security.is_empty()
                        && security
                            .iter()
                            .all(|s| s.as_object().is_some_and(|o| !o.is_empty()))
                        && security.iter().any(|s| s.get(scheme).is_some())
                };
                let mut want = Vec::new();
                if needs(OPERATOR) {
                    want.extend(["unauthorized", "rate_limited"]);
                }
                if needs(CUSTOMER) {
                    // rate_limited: while the budget of lookups that find nothing is spent
                    want.extend(["missing_license_key", "invalid_license_key", "rate_limited"]);
                }
                if path.contains("{id}") {
                    want.push("not_found");
                }
                if op["requestBody"]["content"]["application/json"].is_object() {
                    want.extend(["bad_request", "payload_too_large"]);
                }
                let params = op["parameters"].as_array().cloned().unwrap_or_default();
                if params.iter().any(|p| p["in"] == "query") {
                    want.push("bad_request");
                }
                for c in want {
                    assert!(
                        has(c),
                        "{method} {path} can answer {c}; its list is {codes:?}"
                    );
                }
            }
        }
    }
}
