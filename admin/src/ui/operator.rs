//! The operator console's routes and who may use them: sign in with the admin token, sign
//! out, and the [`Signed`] extractor every console page takes.
//!
//! Signing in swaps the token for a random session id in an `HttpOnly; SameSite=Strict` cookie
//! (the token itself is never stored in the browser or put in a URL). Every form that changes
//! something carries a CSRF token derived from the session and must come from this origin. The
//! sessions themselves live in [`super::session`]; the pages in [`super::pages`].

use axum::body::Bytes;
use axum::extract::{ConnectInfo, FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use axum_extra::extract::cookie::{Cookie, CookieJar, SameSite};
use maud::html;
use serde::Deserialize;

use super::layout::{notice, page, Area, Field, Tone};
use super::pages::{keys, license, licenses, overview};
use super::session::SESSION_MS;
use super::{form, see_other};
use crate::error::ApiError;
use crate::AdminState;

const COOKIE: &str = "tg_session";

pub fn routes() -> Router<AdminState> {
    Router::new()
        .route("/", get(home))
        .route("/console/sign-in", post(sign_in))
        .route("/console/sign-out", post(sign_out))
        .route("/console/sign-out-everywhere", post(sign_out_everywhere))
        .route(
            "/console/licenses",
            get(licenses::list).post(licenses::create),
        )
        .route("/console/licenses/new", get(licenses::new_form))
        .route("/console/licenses/{id}", get(license::show))
        .route("/console/licenses/{id}/created", get(licenses::created))
        .route("/console/licenses/{id}/hours", post(license::add_hours))
        .route("/console/licenses/{id}/deduct", post(license::deduct))
        .route("/console/licenses/{id}/revoke", post(license::revoke))
        .route("/console/licenses/{id}/rotate", post(license::rotate))
        .route("/console/licenses/{id}/keys", post(keys::add))
        .route(
            "/console/licenses/{id}/keys/{key_id}/revoke",
            post(keys::revoke),
        )
        .route(
            "/console/licenses/{id}/keys/{key_id}/rotate",
            post(keys::rotate),
        )
}

/// A signed-in operator.
pub struct Signed {
    pub session: String,
    pub csrf: String,
}

impl Signed {
    pub fn area<'a>(&'a self, current: &'a str) -> Area<'a> {
        Area::Console {
            csrf: &self.csrf,
            current,
        }
    }

    /// Whether a posted form is one of ours: the session's CSRF token, from this origin.
    pub fn check(&self, headers: &HeaderMap, form_csrf: &str) -> bool {
        super::same_origin(headers) && super::session::tokens_match(&self.csrf, form_csrf)
    }
}

async fn signed_in(st: &AdminState, jar: &CookieJar) -> Option<Signed> {
    let id = jar.get(COOKIE)?.value();
    let sessions = &st.shared.console;
    if !sessions
        .valid(id, st.app.ledger.now_ms(), st.app.ledger.lookups())
        .await
    {
        return None;
    }
    Some(Signed {
        session: id.to_string(),
        csrf: sessions.csrf(id),
    })
}

impl FromRequestParts<AdminState> for Signed {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, st: &AdminState) -> Result<Self, Response> {
        signed_in(st, &CookieJar::from_headers(&parts.headers))
            .await
            .ok_or_else(|| see_other("/"))
    }
}

/// The session cookie holding `id`; `Secure` when the admin listener speaks HTTPS.
fn session_cookie(id: String, secure: bool) -> Cookie<'static> {
    Cookie::build((COOKIE, id))
        .path("/")
        .http_only(true)
        .same_site(SameSite::Strict)
        .max_age(cookie::time::Duration::milliseconds(SESSION_MS))
        .secure(secure)
        .build()
}

/// The session cookie emptied and already expired, for signing out.
fn expired_session_cookie() -> Cookie<'static> {
    Cookie::build((COOKIE, ""))
        .path("/")
        .http_only(true)
        .same_site(SameSite::Strict)
        .max_age(cookie::time::Duration::ZERO)
        .build()
}

/// The answer to a form that did not come from the console.
pub fn forbidden() -> Response {
    page(
        StatusCode::FORBIDDEN,
        "Refused",
        Area::SignIn,
        html! {
            h1 { "Refused" }
            (notice(Tone::Error, "This form did not come from the console (its security token \
                is missing or wrong, or it was sent from another site). Nothing was changed."))
            p { a href="/" { "Back to the console" } }
        },
    )
}

/// The answer when the store failed under a page.
pub fn failed(e: ApiError) -> Response {
    page(
        StatusCode::from_u16(e.code.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        "Error",
        Area::SignIn,
        html! {
            h1 { "Something went wrong" }
            (notice(Tone::Error, e.text()))
            p { a href="/" { "Back to the console" } }
        },
    )
}

pub fn not_found() -> Response {
    page(
        StatusCode::NOT_FOUND,
        "Not found",
        Area::SignIn,
        html! {
            h1 { "Not found" }
            (notice(Tone::Error, "There is no such license."))
            p { a href="/console/licenses" { "All licenses" } }
        },
    )
}

// ---- sign in and out ------------------------------------------------------------------------

async fn home(State(st): State<AdminState>, jar: CookieJar) -> Response {
    match signed_in(&st, &jar).await {
        Some(s) => overview::dashboard(&st, &s).await,
        None => sign_in_page(&st, StatusCode::OK, None),
    }
}

fn sign_in_page(st: &AdminState, status: StatusCode, error: Option<&str>) -> Response {
    let disabled = !st.shared.token.configured();
    let field = Field {
        kind: "password",
        error,
        required: true,
        autocomplete: Some("current-password"),
        autofocus: true,
        hint: Some("The value of TOLLGATE_ADMIN_TOKEN on the server."),
        ..Field::new("token", "Admin token")
    };
    let main = html! {
        section.narrow {
            h1 { "Sign in" }
            @if disabled {
                (notice(Tone::Error, "The operator console is disabled: set \
                    TOLLGATE_ADMIN_TOKEN and restart Tollgate."))
            }
            form.card method="post" action="/console/sign-in" {
                (field)
                button type="submit" { "Sign in" }
            }
        }
    };
    page(status, "Sign in", Area::SignIn, main)
}

#[derive(Deserialize, Default)]
struct TokenForm {
    #[serde(default)]
    token: String,
}

async fn sign_in(
    State(st): State<AdminState>,
    ConnectInfo(crate::Peer(peer)): ConnectInfo<crate::Peer>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if !super::same_origin(&headers) {
        return forbidden();
    }
    let f: TokenForm = form(&body);
    if f.token.is_empty() {
        return sign_in_page(&st, StatusCode::BAD_REQUEST, Some("Enter the admin token."));
    }
    let ip = crate::auth::client_ip(&st, Some(peer), &headers);
    let now = st.app.ledger.now_ms();
    // the token is compared first: a valid one is never throttled
    if !st.shared.token.accepts(f.token.as_bytes()) {
        if let Err(retry_after_s) = st.shared.throttle.check(ip, now) {
            let message = format!(
                "Too many wrong admin tokens from this address; try again in {retry_after_s} s."
            );
            let mut r = sign_in_page(&st, StatusCode::TOO_MANY_REQUESTS, Some(&message));
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_s));
            return r;
        }
        crate::auth::wrong_token(&st, ip, now, "console sign-in");
        return sign_in_page(
            &st,
            StatusCode::UNAUTHORIZED,
            Some("That is not the admin token. Check TOLLGATE_ADMIN_TOKEN and try again."),
        );
    }
    let id = match st.shared.console.open(st.app.ledger.now_ms()).await {
        Ok(id) => id,
        Err(e) => {
            tracing::warn!(error = %e, "console: could not record a sign-in");
            return sign_in_page(
                &st,
                StatusCode::SERVICE_UNAVAILABLE,
                Some("The database does not answer; try again in a moment."),
            );
        }
    };
    let secure = st.app.config.admin.tls.is_some();
    let jar = CookieJar::new().add(session_cookie(id, secure));
    tracing::info!("console: operator signed in");
    (jar, see_other("/")).into_response()
}

#[derive(Deserialize, Default)]
pub struct CsrfForm {
    #[serde(default)]
    pub csrf: String,
}

async fn sign_out(
    State(st): State<AdminState>,
    s: Signed,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let f: CsrfForm = form(&body);
    if !s.check(&headers, &f.csrf) {
        return forbidden();
    }
    st.shared.console.close(&s.session).await;
    (
        CookieJar::new().add(expired_session_cookie()),
        see_other("/"),
    )
        .into_response()
}

/// Signs every console session out, on every node (a token that may have leaked, a browser left
/// signed in somewhere): this one included.
async fn sign_out_everywhere(
    State(st): State<AdminState>,
    s: Signed,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let f: CsrfForm = form(&body);
    if !s.check(&headers, &f.csrf) {
        return forbidden();
    }
    if let Err(e) = st.shared.console.close_all().await {
        tracing::warn!(error = %e, "console: could not sign every session out");
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "The database did not answer; try again.",
        )
            .into_response();
    }
    tracing::info!("console: every session signed out");
    (
        CookieJar::new().add(expired_session_cookie()),
        see_other("/"),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_session_cookie_is_http_only_strict_and_secure_over_https() {
        assert_eq!(
            session_cookie("abc".into(), false).to_string(),
            "tg_session=abc; HttpOnly; SameSite=Strict; Path=/; Max-Age=43200"
        );
        assert_eq!(
            session_cookie("abc".into(), true).to_string(),
            "tg_session=abc; HttpOnly; SameSite=Strict; Secure; Path=/; Max-Age=43200"
        );
        assert_eq!(
            expired_session_cookie().to_string(),
            "tg_session=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0"
        );
    }
}
