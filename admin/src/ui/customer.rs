//! The customers' side: the payment page's routes, and the two cookies it sets.
//!
//! There is no sign-in: the license key is the credential, sent in the form body rather than
//! the URL when it is typed. The forms carry a token tied to a `SameSite=Strict` cookie
//! (double submit) and must come from this origin. A second cookie lets the browser that
//! started a checkout see its result on the success page. The page itself is
//! [`super::pages::payments`].

use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use axum_extra::extract::cookie::{Cookie, CookieJar, SameSite};
use maud::{html, Markup};

use super::layout::{notice, page, Area, Tone};
use super::pages::payments;
use super::see_other;
use super::session::tokens_match;
use crate::AdminState;

const COOKIE: &str = "tg_form";

/// The cookie that lets the browser that started a checkout see its result on the success page
/// (which otherwise says only that the payment was received). `SameSite=Lax`: the success page
/// is reached by a top-level navigation back from Stripe, which a `Strict` cookie would miss.
const CHECKOUT_COOKIE: &str = "tg_checkout";

pub fn routes() -> Router<AdminState> {
    Router::new()
        .route("/payments/", get(payments::show).post(payments::enter))
        .route("/payments", get(|| async { see_other("/payments/") }))
        .route("/payments/checkout", post(payments::checkout))
        .route("/payments/plan", post(payments::subscribe))
        .route("/payments/manage", post(payments::manage))
}

/// The form token for this browser: the cookie it has, or a new one to set.
pub struct FormToken {
    cookie: String,
    fresh: bool,
}

impl FormToken {
    pub fn of(jar: &CookieJar) -> FormToken {
        match jar.get(COOKIE).map(Cookie::value).filter(|c| c.len() == 64) {
            Some(c) => FormToken {
                cookie: c.to_string(),
                fresh: false,
            },
            None => FormToken {
                cookie: hex::encode(rand::random::<[u8; 32]>()),
                fresh: true,
            },
        }
    }

    /// The value a form of this browser carries.
    pub fn value(&self, st: &AdminState) -> String {
        st.shared.console.tag("payment-form", &self.cookie)
    }

    /// Whether a posted form carries this browser's token and comes from this origin.
    pub fn accepts(&self, st: &AdminState, headers: &HeaderMap, posted: &str) -> bool {
        !self.fresh && super::same_origin(headers) && tokens_match(&self.value(st), posted)
    }

    /// The cookie to set, for a browser that had none: for the browser's session only (no
    /// Max-Age); `Secure` when the admin listener speaks HTTPS.
    fn cookie(&self, secure: bool) -> Option<Cookie<'static>> {
        self.fresh.then(|| {
            Cookie::build((COOKIE, self.cookie.clone()))
                .path("/payments/")
                .http_only(true)
                .same_site(SameSite::Strict)
                .secure(secure)
                .build()
        })
    }
}

/// The checkout cookie's value for a Checkout Session: a tag only this server can make.
fn checkout_tag(st: &AdminState, session_id: &str) -> String {
    st.shared.console.tag("checkout", session_id)
}

/// The cookie that marks this browser as the one that started the checkout `session_id`.
pub fn checkout_cookie(st: &AdminState, session_id: &str) -> Cookie<'static> {
    checkout_cookie_of(
        checkout_tag(st, session_id),
        st.app.config.admin.tls.is_some(),
    )
}

fn checkout_cookie_of(tag: String, secure: bool) -> Cookie<'static> {
    Cookie::build((CHECKOUT_COOKIE, tag))
        .path("/payments/")
        .http_only(true)
        .same_site(SameSite::Lax)
        .max_age(cookie::time::Duration::days(1))
        .secure(secure)
        .build()
}

/// Whether this request comes from the browser that started the checkout `session_id`.
pub fn started_checkout(st: &AdminState, headers: &HeaderMap, session_id: &str) -> bool {
    CookieJar::from_headers(headers)
        .get(CHECKOUT_COOKIE)
        .is_some_and(|c| tokens_match(c.value(), &checkout_tag(st, session_id)))
}

/// A customer page, with the form cookie when this browser had none.
pub fn respond(
    st: &AdminState,
    token: &FormToken,
    status: StatusCode,
    title: &str,
    main: Markup,
) -> Response {
    let r = page(status, title, Area::Customer, main);
    match token.cookie(st.app.config.admin.tls.is_some()) {
        Some(c) => (CookieJar::new().add(c), r).into_response(),
        None => r,
    }
}

/// The answer to a form that did not come from this page.
pub fn refused(st: &AdminState, token: &FormToken) -> Response {
    let main = html! {
        section.narrow {
            h1 { "Refused" }
            (notice(Tone::Error, "This form did not come from this page (its security token is \
                missing or wrong, or it was sent from another site). Nothing was done."))
            p { a href="/payments/" { "Start again" } }
        }
    };
    respond(st, token, StatusCode::FORBIDDEN, "Refused", main)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::header;

    fn jar(cookie: &str) -> CookieJar {
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, cookie.parse().unwrap());
        CookieJar::from_headers(&h)
    }

    #[test]
    fn a_form_cookie_is_taken_only_when_it_is_one_of_ours() {
        let ours = "ab".repeat(32);
        let t = FormToken::of(&jar(&format!("a=1; tg_form={ours}; b=2")));
        assert!(!t.fresh);
        assert_eq!(t.cookie, ours);
        // another name, or a value of another length: a new token, to be set
        for header in [format!("form={ours}"), "tg_form=short".into()] {
            let t = FormToken::of(&jar(&header));
            assert!(t.fresh, "{header}");
            assert_eq!(t.cookie.len(), 64);
            assert_ne!(t.cookie, ours);
        }
    }

    #[test]
    fn the_form_cookie_is_set_only_once_and_lives_for_the_browser_session() {
        let t = FormToken {
            cookie: "ab".repeat(32),
            fresh: true,
        };
        assert_eq!(
            t.cookie(false).unwrap().to_string(),
            format!(
                "tg_form={}; HttpOnly; SameSite=Strict; Path=/payments/",
                "ab".repeat(32)
            )
        );
        assert!(t.cookie(true).unwrap().to_string().contains("; Secure"));
        let had = FormToken { fresh: false, ..t };
        assert!(had.cookie(false).is_none());
    }

    #[test]
    fn the_checkout_cookie_is_lax_for_a_day() {
        assert_eq!(
            checkout_cookie_of("t".into(), false).to_string(),
            "tg_checkout=t; HttpOnly; SameSite=Lax; Path=/payments/; Max-Age=86400"
        );
        assert_eq!(
            checkout_cookie_of("t".into(), true).to_string(),
            "tg_checkout=t; HttpOnly; SameSite=Lax; Secure; Path=/payments/; Max-Age=86400"
        );
    }
}
