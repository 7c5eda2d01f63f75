//! The operator console: sign in with the admin token, then the dashboard, the license list and
//! each license's page with its charts, history and actions.
//!
//! Signing in swaps the token for a random session id in an `HttpOnly; SameSite=Strict` cookie
//! (the token itself is never stored in the browser or put in a URL). Every form that changes
//! something carries a CSRF token derived from the session and must come from this origin.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Mutex;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, FromRequestParts, Path, RawQuery, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use gateway::license::LicenseStatus;
use gateway::store::rollup::day_of;
use gateway::store::{Adjustment, HistoryKind, License, LicenseFilter};
use serde::Deserialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::{
    day_chart, esc, hours, money, notice, page, see_other, signed_hours, when, Area, Field,
};
use crate::error::ApiError;
use crate::licenses::{
    adjust_balance, create_license, live_remaining_ms, revoke_license, rotate_key, AdjustBody,
    CreateBody,
};
use crate::AdminState;

const COOKIE: &str = "tg_session";
/// A console session lasts this long from sign-in.
const SESSION_MS: i64 = 12 * 3_600_000;
/// Sessions kept at once; the oldest goes first beyond this.
const MAX_SESSIONS: usize = 1_000;
const PAGE_SIZE: u32 = 25;

pub fn routes() -> Router<AdminState> {
    Router::new()
        .route("/", get(home))
        .route("/console/sign-in", post(sign_in))
        .route("/console/sign-out", post(sign_out))
        .route("/console/licenses", get(list).post(create))
        .route("/console/licenses/new", get(new_form))
        .route("/console/licenses/{id}", get(show))
        .route("/console/licenses/{id}/created", get(created))
        .route("/console/licenses/{id}/hours", post(add_hours))
        .route("/console/licenses/{id}/deduct", post(deduct))
        .route("/console/licenses/{id}/revoke", post(revoke))
        .route("/console/licenses/{id}/rotate", post(rotate))
}

/// Signed-in console sessions, in memory (a restart signs everyone out). Only digests of the
/// session ids are kept.
pub struct Sessions {
    secret: [u8; 32],
    live: Mutex<HashMap<[u8; 32], i64>>,
    /// A key just made (created or rotated) waiting to be shown once, per session, with its
    /// license: the form's answer is a redirect, so reloading the page never repeats the action.
    keys: Mutex<HashMap<[u8; 32], (i64, String)>>,
}

impl Default for Sessions {
    fn default() -> Self {
        Sessions {
            secret: rand::random(),
            live: Mutex::new(HashMap::new()),
            keys: Mutex::new(HashMap::new()),
        }
    }
}

impl Sessions {
    fn digest(id: &str) -> [u8; 32] {
        Sha256::digest(id.as_bytes()).into()
    }

    /// A new session; returns its id (the cookie's value).
    fn open(&self, now: i64) -> String {
        let id = hex::encode(rand::random::<[u8; 32]>());
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        live.retain(|_, expires| *expires > now);
        if live.len() >= MAX_SESSIONS {
            if let Some(oldest) = live.iter().min_by_key(|(_, e)| **e).map(|(k, _)| *k) {
                live.remove(&oldest);
            }
        }
        live.insert(Self::digest(&id), now + SESSION_MS);
        id
    }

    fn valid(&self, id: &str, now: i64) -> bool {
        let live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        live.get(&Self::digest(id)).is_some_and(|e| *e > now)
    }

    fn close(&self, id: &str) {
        let mut live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        live.remove(&Self::digest(id));
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        keys.remove(&Self::digest(id));
    }

    /// Keeps a new key for the session's next page (the only time it is shown).
    fn hold_key(&self, session: &str, license: i64, key: String) {
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        // only sessions still signed in keep one; bounded like the sessions themselves
        let live = self.live.lock().unwrap_or_else(|e| e.into_inner());
        keys.retain(|k, _| live.contains_key(k));
        keys.insert(Self::digest(session), (license, key));
    }

    /// The key held for this session and license, once.
    fn take_key(&self, session: &str, license: i64) -> Option<String> {
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        let digest = Self::digest(session);
        match keys.get(&digest) {
            Some((id, _)) if *id == license => keys.remove(&digest).map(|(_, k)| k),
            _ => None,
        }
    }

    /// The CSRF token for a session's forms.
    fn csrf(&self, id: &str) -> String {
        super::tag(&self.secret, "console-csrf", id)
    }

    /// The key for the payment page's form tokens.
    pub(crate) fn secret(&self) -> &[u8; 32] {
        &self.secret
    }
}

/// A signed-in operator.
pub struct Signed {
    session: String,
    csrf: String,
}

impl Signed {
    fn area<'a>(&'a self, current: &'a str) -> Area<'a> {
        Area::Console {
            csrf: &self.csrf,
            current,
        }
    }

    /// Whether a posted form is one of ours: the session's CSRF token, from this origin.
    fn check(&self, headers: &HeaderMap, form_csrf: &str) -> bool {
        super::same_origin(headers) && super::tokens_match(&self.csrf, form_csrf)
    }
}

fn signed_in(st: &AdminState, headers: &HeaderMap) -> Option<Signed> {
    let id = super::cookie(headers, COOKIE)?;
    let sessions = &st.shared.console;
    if !sessions.valid(id, st.app.ledger.now_ms()) {
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
        signed_in(st, &parts.headers).ok_or_else(|| see_other("/"))
    }
}

/// A form body as `T`; a body that does not parse reads as an empty form (its fields are then
/// reported missing next to them).
fn form<T: for<'de> Deserialize<'de> + Default>(body: &Bytes) -> T {
    serde_urlencoded::from_bytes(body).unwrap_or_default()
}

fn forbidden() -> Response {
    page(
        StatusCode::FORBIDDEN,
        "Refused",
        Area::SignIn,
        &format!(
            "<h1>Refused</h1>{}<p><a href=\"/\">Back to the console</a></p>",
            notice(
                "error",
                "This form did not come from the console (its security token is missing or \
                 wrong, or it was sent from another site). Nothing was changed."
            )
        ),
    )
}

// ---- sign in and out ------------------------------------------------------------------------

async fn home(State(st): State<AdminState>, headers: HeaderMap) -> Response {
    match signed_in(&st, &headers) {
        Some(s) => dashboard(&st, &s).await,
        None => sign_in_page(&st, StatusCode::OK, None),
    }
}

fn sign_in_page(st: &AdminState, status: StatusCode, error: Option<&str>) -> Response {
    let disabled = !st.shared.token.configured();
    let mut main = String::from("<section class=\"narrow\"><h1>Sign in</h1>");
    if disabled {
        main.push_str(&notice(
            "error",
            "The operator console is disabled: set TOLLGATE_ADMIN_TOKEN and restart Tollgate.",
        ));
    }
    let field = Field {
        kind: "password",
        error,
        extra: "required autocomplete=\"current-password\" autofocus",
        hint: Some("The value of TOLLGATE_ADMIN_TOKEN on the server."),
        ..Field::new("token", "Admin token")
    };
    let _ = write!(
        main,
        "<form method=\"post\" action=\"/console/sign-in\" class=\"card\">{}\
         <button type=\"submit\">Sign in</button></form></section>",
        field.render()
    );
    page(status, "Sign in", Area::SignIn, &main)
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
    if let Err(retry_after_s) = st.shared.throttle.check(ip, now) {
        let message = format!(
            "Too many wrong admin tokens from this address; try again in {retry_after_s} s."
        );
        let mut r = sign_in_page(&st, StatusCode::TOO_MANY_REQUESTS, Some(&message));
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_s));
        return r;
    }
    if !st.shared.token.accepts(f.token.as_bytes()) {
        crate::auth::wrong_token(&st, ip, now, "console sign-in");
        return sign_in_page(
            &st,
            StatusCode::UNAUTHORIZED,
            Some("That is not the admin token. Check TOLLGATE_ADMIN_TOKEN and try again."),
        );
    }
    let id = st.shared.console.open(st.app.ledger.now_ms());
    let secure = if st.app.config.admin.tls.is_some() {
        "; Secure"
    } else {
        ""
    };
    let mut r = see_other("/");
    let cookie = format!(
        "{COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{secure}",
        SESSION_MS / 1000
    );
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    tracing::info!("console: operator signed in");
    r
}

#[derive(Deserialize, Default)]
struct CsrfForm {
    #[serde(default)]
    csrf: String,
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
    st.shared.console.close(&s.session);
    let mut r = see_other("/");
    r.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static("tg_session=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"),
    );
    r
}

// ---- dashboard ------------------------------------------------------------------------------

fn stat(label: &str, value: &str) -> String {
    format!(
        "<div class=\"stat\"><span class=\"label\">{}</span><span class=\"value\">{}</span></div>",
        esc(label),
        esc(value)
    )
}

fn percent(ok: i64, calls: i64) -> String {
    if calls == 0 {
        "–".into()
    } else {
        format!("{:.1} %", ok as f64 * 100.0 / calls as f64)
    }
}

fn failed(e: ApiError) -> Response {
    page(
        StatusCode::from_u16(e.code.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        "Error",
        Area::SignIn,
        &format!(
            "<h1>Something went wrong</h1>{}<p><a href=\"/\">Back to the console</a></p>",
            notice("error", e.text())
        ),
    )
}

async fn dashboard(st: &AdminState, s: &Signed) -> Response {
    let now = st.app.ledger.now_ms();
    let store = &st.app.store;
    let read = tokio::try_join!(
        store.system_stats(30, now),
        store.system_daily(30, now),
        store.refused_since(now - 3_600_000, 20),
    );
    let (stats, daily, refused) = match read {
        Ok(v) => v,
        Err(e) => return failed(e.into()),
    };
    let mut main = String::from("<h1>Dashboard</h1><p class=\"lead\">The last 30 days.</p>");
    main.push_str("<div class=\"stats\">");
    main.push_str(&stat("Active licenses", &stats.active_licenses.to_string()));
    main.push_str(&stat(
        "Calls",
        &(stats.licensed_calls + stats.guest_calls).to_string(),
    ));
    main.push_str(&stat(
        "Success rate",
        &percent(stats.licensed_ok, stats.licensed_calls),
    ));
    main.push_str(&stat("Hours charged", &hours(stats.charged_ms)));
    let revenue = if stats.revenue.is_empty() {
        "–".to_string()
    } else {
        stats
            .revenue
            .iter()
            .map(|(c, cents, _)| money(*cents, c))
            .collect::<Vec<_>>()
            .join(", ")
    };
    main.push_str(&stat("Revenue", &revenue));
    main.push_str("</div><div class=\"charts\">");
    let today = day_of(now);
    main.push_str(&day_chart(
        "sys-hours",
        "Hours charged per day",
        today,
        30,
        &daily,
        |d| d.charged_ms as f64 / 3_600_000.0,
        super::duration_label,
    ));
    main.push_str(&day_chart(
        "sys-calls",
        "Calls per day",
        today,
        30,
        &daily,
        |d| d.calls as f64,
        |v| format!("{v:.0}"),
    ));
    main.push_str("</div><div class=\"columns\"><section><h2>Top licenses</h2>");
    if stats.top_licenses.is_empty() {
        main.push_str("<p>No usage in the last 30 days.</p>");
    } else {
        main.push_str(
            "<div class=\"table-wrap\"><table><thead><tr><th scope=\"col\">License</th>\
             <th scope=\"col\">Plan</th><th scope=\"col\" class=\"num\">Hours</th>\
             <th scope=\"col\" class=\"num\">Requests</th></tr></thead><tbody>",
        );
        for (id, name, plan, ms, req) in &stats.top_licenses {
            let _ = write!(
                main,
                "<tr><td><a href=\"/console/licenses/{id}\">{}</a></td><td>{}</td>\
                 <td class=\"num\">{}</td><td class=\"num\">{req}</td></tr>",
                esc(name),
                esc(plan),
                hours(*ms)
            );
        }
        main.push_str("</tbody></table></div>");
    }
    main.push_str("</section><section><h2>Plans</h2>");
    main.push_str(&table(
        &["Plan", "Licenses", "Active", "Hours"],
        &[false, true, true, true],
        stats.plans.iter().map(|(plan, n, active, ms)| {
            vec![plan.clone(), n.to_string(), active.to_string(), hours(*ms)]
        }),
        "No licenses yet.",
    ));
    main.push_str("</section></div><section><h2>Refused without a valid key, last hour</h2>");
    main.push_str(&table(
        &["Reason", "Client", "Requests"],
        &[false, false, true],
        refused.iter().map(|(reason, ip, n)| {
            let ip = if ip.is_empty() { "other" } else { ip };
            vec![reason.clone(), ip.to_string(), n.to_string()]
        }),
        "None.",
    ));
    main.push_str("</section>");
    page(StatusCode::OK, "Dashboard", s.area("Dashboard"), &main)
}

fn trim(v: f64) -> String {
    let s = format!("{v:.2}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

// ---- the license list -----------------------------------------------------------------------

#[derive(Deserialize, Default)]
struct ListQuery {
    q: Option<String>,
    status: Option<String>,
    plan: Option<String>,
    before: Option<String>,
}

fn status_badge(l: &License, now: i64) -> String {
    if l.status == LicenseStatus::Revoked {
        "<span class=\"badge bad\">revoked</span>".into()
    } else if l.expires_at.is_some_and(|e| e <= now) {
        "<span class=\"badge bad\">expired</span>".into()
    } else {
        "<span class=\"badge ok\">active</span>".into()
    }
}

fn select(name: &str, label: &str, options: &[(String, String)], chosen: &str) -> String {
    let mut s = format!(
        "<div class=\"field\"><label for=\"f-{name}\">{}</label><select id=\"f-{name}\" name=\"{name}\">",
        esc(label)
    );
    for (value, text) in options {
        let sel = if value == chosen { " selected" } else { "" };
        let _ = write!(
            s,
            "<option value=\"{}\"{sel}>{}</option>",
            esc(value),
            esc(text)
        );
    }
    s.push_str("</select></div>");
    s
}

fn plan_options(st: &AdminState, any: bool) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = Vec::new();
    if any {
        v.push((String::new(), "Any plan".into()));
    }
    v.extend(
        st.app
            .config
            .plans
            .iter()
            .map(|p| (p.name.clone(), p.name.clone())),
    );
    v
}

async fn list(State(st): State<AdminState>, s: Signed, RawQuery(q): RawQuery) -> Response {
    let q: ListQuery = super::query(q.as_deref());
    let nonempty = |v: &Option<String>| {
        v.as_deref()
            .map(str::trim)
            .filter(|v| !v.is_empty())
            .map(str::to_string)
    };
    let search = nonempty(&q.q).map(|s| s.chars().take(200).collect::<String>());
    let status = nonempty(&q.status).filter(|s| LicenseStatus::parse(s).is_some());
    let plan = nonempty(&q.plan);
    let before = nonempty(&q.before).and_then(|b| b.parse::<i64>().ok());
    let filter = LicenseFilter {
        status: status.clone(),
        plan: plan.clone(),
        search: search.clone(),
        before,
        limit: PAGE_SIZE,
    };
    let (rows, next) = match st.app.store.licenses(filter).await {
        Ok(v) => v,
        Err(e) => return failed(e.into()),
    };
    let now = st.app.ledger.now_ms();
    let mut main = String::from(
        "<div class=\"title-row\"><h1>Licenses</h1>\
         <a class=\"button\" href=\"/console/licenses/new\">New license</a></div>",
    );
    let search_field = Field {
        kind: "search",
        value: search.as_deref().unwrap_or(""),
        hint: Some("Name, email, company or the start of the key."),
        ..Field::new("q", "Search")
    };
    let statuses = vec![
        (String::new(), "Any status".to_string()),
        ("active".into(), "Active".into()),
        ("revoked".into(), "Revoked".into()),
    ];
    let _ = write!(
        main,
        "<form method=\"get\" action=\"/console/licenses\" class=\"filters\" role=\"search\">\
         {}{}{}<button type=\"submit\">Filter</button></form>",
        search_field.render(),
        select(
            "status",
            "Status",
            &statuses,
            status.as_deref().unwrap_or("")
        ),
        select(
            "plan",
            "Plan",
            &plan_options(&st, true),
            plan.as_deref().unwrap_or("")
        ),
    );
    if rows.is_empty() {
        main.push_str("<p>No licenses match.</p>");
    } else {
        main.push_str(
            "<div class=\"table-wrap\"><table class=\"licenses\"><thead><tr>\
             <th scope=\"col\">Name</th><th scope=\"col\">Key</th><th scope=\"col\">Plan</th>\
             <th scope=\"col\">Status</th><th scope=\"col\" class=\"num\">Hours left</th>\
             <th scope=\"col\">Last used</th></tr></thead><tbody>",
        );
        for l in &rows {
            let _ = write!(
                main,
                "<tr><td><a href=\"/console/licenses/{}\">{}</a>{}</td><td><code>{}…</code></td>\
                 <td>{}</td><td>{}</td><td class=\"num\">{}</td><td>{}</td></tr>",
                l.id,
                esc(&l.name),
                l.company
                    .as_deref()
                    .map(|c| format!("<span class=\"sub\">{}</span>", esc(c)))
                    .unwrap_or_default(),
                esc(&l.key_prefix),
                esc(&l.plan),
                status_badge(l, now),
                hours(live_remaining_ms(&st, l)),
                l.last_used_at.map(when).unwrap_or_else(|| "never".into()),
            );
        }
        main.push_str("</tbody></table></div>");
    }
    let keep = |pairs: &mut Vec<(&str, String)>| {
        if let Some(v) = &search {
            pairs.push(("q", v.clone()));
        }
        if let Some(v) = &status {
            pairs.push(("status", v.clone()));
        }
        if let Some(v) = &plan {
            pairs.push(("plan", v.clone()));
        }
    };
    main.push_str("<nav class=\"pager\" aria-label=\"Pages\">");
    if before.is_some() {
        let mut pairs = Vec::new();
        keep(&mut pairs);
        let _ = write!(
            main,
            "<a href=\"/console/licenses?{}\">« First page</a>",
            esc(&serde_urlencoded::to_string(&pairs).unwrap_or_default())
        );
    }
    if let Some(n) = next {
        let mut pairs = Vec::new();
        keep(&mut pairs);
        pairs.push(("before", n.to_string()));
        let _ = write!(
            main,
            "<a href=\"/console/licenses?{}\" rel=\"next\">Next page »</a>",
            esc(&serde_urlencoded::to_string(&pairs).unwrap_or_default())
        );
    }
    main.push_str("</nav>");
    page(StatusCode::OK, "Licenses", s.area("Licenses"), &main)
}

// ---- creating a license ---------------------------------------------------------------------

#[derive(Deserialize, Default)]
struct NewForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    email: String,
    #[serde(default)]
    company: String,
    #[serde(default)]
    plan: String,
    #[serde(default)]
    hours: String,
    #[serde(default)]
    expires: String,
}

/// Which field an API error is about, from the message it starts with.
fn field_of(message: &str) -> &'static str {
    for f in [
        "name",
        "email",
        "company",
        "plan",
        "hours",
        "expires_at",
        "reason",
    ] {
        if message.starts_with(f) {
            return if f == "expires_at" { "expires" } else { f };
        }
    }
    if message.starts_with("unknown plan") {
        return "plan";
    }
    ""
}

fn new_page(
    st: &AdminState,
    s: &Signed,
    status: StatusCode,
    f: &NewForm,
    error: Option<(&str, &str)>,
) -> Response {
    let err = |name: &str| error.filter(|(field, _)| *field == name).map(|(_, m)| m);
    let mut main = String::from("<h1>New license</h1>");
    if let Some((field, message)) = error {
        // errors of no field, and of the plan (a select shows none), above the form
        if field.is_empty() || field == "plan" {
            main.push_str(&notice("error", message));
        }
    }
    let plan = if f.plan.is_empty() { "free" } else { &f.plan };
    let _ = write!(
        main,
        "<form method=\"post\" action=\"/console/licenses\" class=\"card\" novalidate>\
         <input type=\"hidden\" name=\"csrf\" value=\"{}\">{}{}{}{}{}{}\
         <button type=\"submit\">Create license</button></form>",
        esc(&s.csrf),
        Field {
            value: &f.name,
            error: err("name"),
            extra: "required maxlength=\"200\" autocomplete=\"off\"",
            ..Field::new("name", "Name")
        }
        .render(),
        Field {
            kind: "email",
            value: &f.email,
            error: err("email"),
            extra: "maxlength=\"254\" autocomplete=\"off\"",
            ..Field::new("email", "Email (optional)")
        }
        .render(),
        Field {
            value: &f.company,
            error: err("company"),
            extra: "maxlength=\"200\" autocomplete=\"off\"",
            ..Field::new("company", "Company (optional)")
        }
        .render(),
        select("plan", "Plan", &plan_options(st, false), plan),
        Field {
            kind: "number",
            value: &f.hours,
            error: err("hours"),
            extra: "min=\"0\" step=\"any\" inputmode=\"decimal\"",
            hint: Some("Prepaid hours to start with; 0 or empty for none."),
            ..Field::new("hours", "Hours")
        }
        .render(),
        Field {
            kind: "date",
            value: &f.expires,
            error: err("expires"),
            hint: Some("Optional. The license stops working at the start of this day (UTC)."),
            ..Field::new("expires", "Expires on")
        }
        .render(),
    );
    page(status, "New license", s.area("Licenses"), &main)
}

async fn new_form(State(st): State<AdminState>, s: Signed) -> Response {
    new_page(&st, &s, StatusCode::OK, &NewForm::default(), None)
}

fn parse_hours(text: &str, empty_ok: bool) -> Result<Option<f64>, String> {
    let t = text.trim();
    if t.is_empty() {
        return if empty_ok {
            Ok(None)
        } else {
            Err("Enter a number of hours.".into())
        };
    }
    t.parse::<f64>()
        .map(Some)
        .map_err(|_| format!("{t:?} is not a number of hours."))
}

fn key_box(key: &str) -> String {
    format!(
        "<div class=\"key-box\"><label for=\"new-key\">License key</label>\
         <div class=\"key-row\"><input id=\"new-key\" type=\"text\" readonly value=\"{}\" \
         class=\"key\" aria-describedby=\"key-hint\">\
         <button type=\"button\" class=\"copy\" data-copy=\"new-key\" hidden>Copy</button></div>\
         <span class=\"hint\" id=\"key-hint\">Shown once: give it to the customer now. \
         Tollgate keeps only its hash.</span><span class=\"copied\" role=\"status\"></span></div>",
        esc(key)
    )
}

async fn create(
    State(st): State<AdminState>,
    s: Signed,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let f: NewForm = form(&body);
    if !s.check(&headers, &f.csrf) {
        return forbidden();
    }
    let initial = match parse_hours(&f.hours, true) {
        Ok(h) => h,
        Err(m) => return new_page(&st, &s, StatusCode::BAD_REQUEST, &f, Some(("hours", &m))),
    };
    let opt = |v: &str| Some(v.trim().to_string()).filter(|v| !v.is_empty());
    let b = CreateBody {
        name: f.name.clone(),
        email: opt(&f.email),
        company: opt(&f.company),
        hours: initial,
        plan: opt(&f.plan),
        expires_at: opt(&f.expires),
    };
    match create_license(&st, b).await {
        Ok((l, key)) => {
            st.shared.console.hold_key(&s.session, l.id, key);
            see_other(&format!("/console/licenses/{}/created", l.id))
        }
        Err(e) => {
            let field = field_of(e.text());
            let status = StatusCode::from_u16(e.code.status()).unwrap_or(StatusCode::BAD_REQUEST);
            new_page(&st, &s, status, &f, Some((field, e.text())))
        }
    }
}

// ---- a license ------------------------------------------------------------------------------

#[derive(Deserialize, Default)]
struct ShowQuery {
    done: Option<String>,
}

/// An error to show next to one of the license page's forms.
struct FormError<'a> {
    form: &'a str,
    field: &'a str,
    message: &'a str,
}

fn license_id(raw: &str) -> Option<i64> {
    raw.parse::<i64>().ok().filter(|id| *id > 0)
}

fn not_found() -> Response {
    page(
        StatusCode::NOT_FOUND,
        "Not found",
        Area::SignIn,
        &format!(
            "<h1>Not found</h1>{}<p><a href=\"/console/licenses\">All licenses</a></p>",
            notice("error", "There is no such license.")
        ),
    )
}

async fn show(
    State(st): State<AdminState>,
    s: Signed,
    Path(raw): Path<String>,
    RawQuery(q): RawQuery,
) -> Response {
    let Some(id) = license_id(&raw) else {
        return not_found();
    };
    let done = super::query::<ShowQuery>(q.as_deref()).done;
    let message = match done.as_deref() {
        Some("credited") => Some("The hours were added."),
        Some("deducted") => Some("The hours were deducted."),
        Some("revoked") => Some("The license was revoked: its key no longer works."),
        _ => None,
    };
    if done.as_deref() == Some("rotated") {
        let key = st.shared.console.take_key(&s.session, id);
        let shown = if key.is_some() {
            None
        } else {
            Some("The new key was shown once and is not kept; rotate again to make another.")
        };
        return license_page(&st, &s, id, StatusCode::OK, shown, None, key.as_deref()).await;
    }
    license_page(&st, &s, id, StatusCode::OK, message, None, None).await
}

/// The page after creating a license: its key, once (a reload finds it gone).
async fn created(State(st): State<AdminState>, s: Signed, Path(raw): Path<String>) -> Response {
    let Some(id) = license_id(&raw) else {
        return not_found();
    };
    let l = match st.app.store.license(id).await {
        Ok(l) => l,
        Err(gateway::store::StoreError::NotFound) => return not_found(),
        Err(e) => return failed(e.into()),
    };
    let key = match st.shared.console.take_key(&s.session, id) {
        Some(key) => key_box(&key),
        None => notice(
            "info",
            "The key was shown once and is not kept. Rotate the key on the license's page to \
             make a new one.",
        ),
    };
    let main = format!(
        "<h1>License created</h1>{}<p>{} on the {} plan, with {} hours.</p>{}\
         <p><a class=\"button\" href=\"/console/licenses/{}\">Open the license</a> \
         <a href=\"/console/licenses/new\">Create another</a></p>",
        notice("ok", "The license was created."),
        esc(&l.name),
        esc(&l.plan),
        hours(l.balance_ms),
        key,
        l.id
    );
    page(StatusCode::OK, "License created", s.area("Licenses"), &main)
}

#[allow(clippy::too_many_arguments)]
async fn license_page(
    st: &AdminState,
    s: &Signed,
    id: i64,
    status: StatusCode,
    done: Option<&str>,
    error: Option<FormError<'_>>,
    new_key: Option<&str>,
) -> Response {
    let now = st.app.ledger.now_ms();
    let store = &st.app.store;
    let read = tokio::try_join!(
        store.license(id),
        store.usage_stats(id, 30, now),
        store.history(id, HistoryKind::Sessions, 10, None),
        store.history(id, HistoryKind::All, 15, None),
        store.recent_access(id, 20),
        store.payments_for_license(id, 10, None),
        store.alerts_for_license(id, 10),
    );
    let (l, usage, sessions, history, access, pays, alerts) = match read {
        Ok((l, usage, sessions, history, access, pays, alerts)) => {
            let (sessions, history) = (super::json_rows(sessions), super::json_rows(history));
            (l, usage, sessions, history, access, pays, alerts)
        }
        Err(gateway::store::StoreError::NotFound) => return not_found(),
        Err(e) => return failed(e.into()),
    };
    let remaining = live_remaining_ms(st, &l);
    let mut main = String::new();
    let _ = write!(
        main,
        "<p class=\"crumbs\"><a href=\"/console/licenses\">Licenses</a> › {}</p>\
         <div class=\"title-row\"><h1>{}</h1>{}</div>",
        esc(&l.name),
        esc(&l.name),
        status_badge(&l, now)
    );
    if let Some(m) = done {
        main.push_str(&notice("ok", m));
    }
    if let Some(key) = new_key {
        main.push_str(&notice(
            "ok",
            "The key was rotated: the old key no longer works.",
        ));
        main.push_str(&key_box(key));
    }
    let _ = write!(
        main,
        "<div class=\"stats\">{}{}{}{}</div>",
        stat("Hours remaining", &hours(remaining)),
        stat("Hours used", &hours(l.used_ms)),
        stat("Requests", &l.requests_total.to_string()),
        stat(
            "Calls, 30 days",
            &format!("{} ({} ok)", usage.calls, percent(usage.ok, usage.calls))
        ),
    );
    let opt = |v: &Option<String>| v.as_deref().map(esc).unwrap_or_else(|| "–".into());
    let _ = write!(
        main,
        "<dl class=\"facts\"><dt>License id</dt><dd>{}</dd><dt>Key</dt><dd><code>{}…</code></dd>\
         <dt>Plan</dt><dd>{}</dd><dt>Email</dt><dd>{}</dd><dt>Company</dt><dd>{}</dd>\
         <dt>Created</dt><dd>{}</dd><dt>Last used</dt><dd>{}</dd><dt>Expires</dt><dd>{}</dd></dl>",
        l.id,
        esc(&l.key_prefix),
        esc(&l.plan),
        opt(&l.email),
        opt(&l.company),
        when(l.created_at),
        l.last_used_at.map(when).unwrap_or_else(|| "never".into()),
        l.expires_at.map(when).unwrap_or_else(|| "never".into()),
    );

    // actions
    let err = |form: &str, field: &str| {
        error
            .as_ref()
            .filter(|e| e.form == form && e.field == field)
            .map(|e| e.message)
    };
    let general = |form: &str| {
        error
            .as_ref()
            .filter(|e| e.form == form && e.field.is_empty())
            .map(|e| notice("error", e.message))
            .unwrap_or_default()
    };
    main.push_str("<section class=\"actions\"><h2>Actions</h2><div class=\"action-grid\">");
    for (form, action, title, button) in [
        ("hours", "hours", "Add hours", "Add hours"),
        ("deduct", "deduct", "Deduct hours", "Deduct hours"),
    ] {
        let _ = write!(
            main,
            "<form method=\"post\" action=\"/console/licenses/{}/{action}\" class=\"card\" novalidate>\
             <h3>{title}</h3>{}<input type=\"hidden\" name=\"csrf\" value=\"{}\">{}{}\
             <button type=\"submit\">{button}</button></form>",
            l.id,
            general(form),
            esc(&s.csrf),
            Field {
                kind: "number",
                error: err(form, "hours"),
                extra: "required min=\"0\" step=\"any\" inputmode=\"decimal\"",
                form,
                ..Field::new("hours", "Hours")
            }
            .render(),
            Field {
                error: err(form, "reason"),
                extra: "maxlength=\"500\"",
                form,
                ..Field::new("reason", "Reason (optional)")
            }
            .render(),
        );
    }
    let revoke = if l.status == LicenseStatus::Revoked {
        "<p>This license is revoked.</p>".to_string()
    } else {
        format!(
            "<details><summary>Revoke this license…</summary>\
             <p>Its key stops working at once. This cannot be undone from here.</p>\
             <form method=\"post\" action=\"/console/licenses/{}/revoke\">\
             <input type=\"hidden\" name=\"csrf\" value=\"{}\">\
             <button type=\"submit\" class=\"danger\">Revoke the license</button></form></details>",
            l.id,
            esc(&s.csrf)
        )
    };
    let _ = write!(
        main,
        "<div class=\"card\"><h3>Key and access</h3>{}{}\
         <details><summary>Rotate the key…</summary>\
         <p>A new key is made and shown once; the old one stops working at once.</p>\
         <form method=\"post\" action=\"/console/licenses/{}/rotate\">\
         <input type=\"hidden\" name=\"csrf\" value=\"{}\">\
         <button type=\"submit\">Rotate the key</button></form></details></div></div></section>",
        general("access"),
        revoke,
        l.id,
        esc(&s.csrf)
    );

    // usage
    let today = day_of(now);
    main.push_str("<section><h2>Usage, last 30 days</h2><div class=\"charts\">");
    main.push_str(&day_chart(
        "lic-hours",
        "Hours per day",
        today,
        30,
        &usage.daily,
        |d| d.charged_ms as f64 / 3_600_000.0,
        super::duration_label,
    ));
    main.push_str(&day_chart(
        "lic-calls",
        "Calls per day",
        today,
        30,
        &usage.daily,
        |d| d.calls as f64,
        |v| format!("{v:.0}"),
    ));
    main.push_str("</div></section>");

    // tables
    main.push_str("<section><h2>Balance history</h2>");
    main.push_str(&table(
        &["When", "What", "Hours", "Balance after", "Reason"],
        &[false, false, true, true, false],
        history.items.iter().map(|v| {
            vec![
                str_of(v, "created_at")
                    .replace('T', " ")
                    .replace('Z', " UTC"),
                str_of(v, "kind"),
                signed_hours(v["delta_ms"].as_i64().unwrap_or(0)),
                num_of(v, "balance_after_hours"),
                str_of(v, "reason"),
            ]
        }),
        "No balance changes yet.",
    ));
    main.push_str("</section><section><h2>Sessions</h2>");
    main.push_str(&table(
        &["Started", "Last activity", "Hours", "Requests", "State"],
        &[false, false, true, true, false],
        sessions.items.iter().map(|v| {
            vec![
                str_of(v, "started_at")
                    .replace('T', " ")
                    .replace('Z', " UTC"),
                str_of(v, "last_activity_at")
                    .replace('T', " ")
                    .replace('Z', " UTC"),
                hours(v["charged_ms"].as_i64().unwrap_or(0)),
                v["requests"].as_i64().unwrap_or(0).to_string(),
                if v["open"].as_bool() == Some(true) {
                    "open".into()
                } else {
                    "ended".into()
                },
            ]
        }),
        "No sessions yet.",
    ));
    main.push_str("</section><section><h2>Recent requests</h2>");
    main.push_str(&table(
        &["When", "Request", "Status", "Outcome", "Time"],
        &[false, false, true, false, true],
        access.iter().map(|a| {
            vec![
                when(a.ts),
                format!("{} {}", a.method, a.path),
                a.status.to_string(),
                a.outcome.clone(),
                format!("{:.1} ms", a.duration_us as f64 / 1000.0),
            ]
        }),
        "No requests among the most recent ones.",
    ));
    main.push_str("</section><section><h2>Payments</h2>");
    main.push_str(&table(
        &["Created", "Hours", "Amount", "Status", "Refunded"],
        &[false, true, true, false, true],
        pays.iter().map(|p| {
            vec![
                when(p.created_at),
                hours(p.hours_ms),
                money(p.amount_cents, &p.currency),
                match &p.mismatch {
                    Some(why) => format!("{} (amount mismatch: {why})", p.status),
                    None => p.status.clone(),
                },
                if p.refunded_cents > 0 {
                    money(p.refunded_cents, &p.currency)
                } else {
                    "–".into()
                },
            ]
        }),
        "No payments yet.",
    ));
    main.push_str("</section><section><h2>Alerts</h2>");
    main.push_str(&table(
        &["When", "Kind", "Threshold", "Delivered"],
        &[false, false, true, false],
        alerts.iter().map(|a| {
            vec![
                when(a.created_at),
                a.kind.clone(),
                format!("{} %", a.threshold_percent),
                a.delivered_at
                    .map(when)
                    .unwrap_or_else(|| format!("not yet ({} attempts)", a.attempts)),
            ]
        }),
        "No alerts.",
    ));
    main.push_str("</section>");
    page(status, &l.name, s.area("Licenses"), &main)
}

fn str_of(v: &Value, k: &str) -> String {
    v[k].as_str().unwrap_or("").to_string()
}

fn num_of(v: &Value, k: &str) -> String {
    v[k].as_f64().map(trim).unwrap_or_default()
}

/// A table of text cells (escaped here); `numeric` right-aligns columns.
pub(crate) fn table(
    head: &[&str],
    numeric: &[bool],
    rows: impl Iterator<Item = Vec<String>>,
    empty: &str,
) -> String {
    let mut body = String::new();
    for row in rows {
        body.push_str("<tr>");
        for (i, cell) in row.iter().enumerate() {
            let class = if numeric.get(i) == Some(&true) {
                " class=\"num\""
            } else {
                ""
            };
            let _ = write!(body, "<td{class}>{}</td>", esc(cell));
        }
        body.push_str("</tr>");
    }
    if body.is_empty() {
        return format!("<p>{}</p>", esc(empty));
    }
    let mut t = String::from("<div class=\"table-wrap\"><table><thead><tr>");
    for (i, h) in head.iter().enumerate() {
        let class = if numeric.get(i) == Some(&true) {
            " class=\"num\""
        } else {
            ""
        };
        let _ = write!(t, "<th scope=\"col\"{class}>{}</th>", esc(h));
    }
    let _ = write!(t, "</tr></thead><tbody>{body}</tbody></table></div>");
    t
}

// ---- actions on a license -------------------------------------------------------------------

#[derive(Deserialize, Default)]
struct AdjustForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    hours: String,
    #[serde(default)]
    reason: String,
}

async fn adjust(
    st: AdminState,
    s: Signed,
    headers: HeaderMap,
    raw: String,
    body: Bytes,
    how: Adjustment,
) -> Response {
    let Some(id) = license_id(&raw) else {
        return not_found();
    };
    let f: AdjustForm = form(&body);
    if !s.check(&headers, &f.csrf) {
        return forbidden();
    }
    let form_name = if how == Adjustment::Credit {
        "hours"
    } else {
        "deduct"
    };
    let hours = match parse_hours(&f.hours, false) {
        Ok(Some(h)) => h,
        Ok(None) | Err(_) => {
            let m = parse_hours(&f.hours, false)
                .err()
                .unwrap_or_else(|| "Enter a number of hours.".into());
            let e = FormError {
                form: form_name,
                field: "hours",
                message: &m,
            };
            return license_page(&st, &s, id, StatusCode::BAD_REQUEST, None, Some(e), None).await;
        }
    };
    let reason = Some(f.reason.trim().to_string()).filter(|r| !r.is_empty());
    match adjust_balance(&st, id, how, AdjustBody { hours, reason }).await {
        Ok(_) => see_other(&format!(
            "/console/licenses/{id}?done={}",
            if how == Adjustment::Credit {
                "credited"
            } else {
                "deducted"
            }
        )),
        Err(e) => {
            let status = StatusCode::from_u16(e.code.status()).unwrap_or(StatusCode::BAD_REQUEST);
            let field = field_of(e.text());
            let e = FormError {
                form: form_name,
                field,
                message: e.text(),
            };
            license_page(&st, &s, id, status, None, Some(e), None).await
        }
    }
}

async fn add_hours(
    State(st): State<AdminState>,
    s: Signed,
    headers: HeaderMap,
    Path(raw): Path<String>,
    body: Bytes,
) -> Response {
    adjust(st, s, headers, raw, body, Adjustment::Credit).await
}

async fn deduct(
    State(st): State<AdminState>,
    s: Signed,
    headers: HeaderMap,
    Path(raw): Path<String>,
    body: Bytes,
) -> Response {
    adjust(st, s, headers, raw, body, Adjustment::Debit).await
}

async fn revoke(
    State(st): State<AdminState>,
    s: Signed,
    headers: HeaderMap,
    Path(raw): Path<String>,
    body: Bytes,
) -> Response {
    let Some(id) = license_id(&raw) else {
        return not_found();
    };
    let f: CsrfForm = form(&body);
    if !s.check(&headers, &f.csrf) {
        return forbidden();
    }
    match revoke_license(&st, id).await {
        Ok(_) => see_other(&format!("/console/licenses/{id}?done=revoked")),
        Err(e) => {
            let status = StatusCode::from_u16(e.code.status()).unwrap_or(StatusCode::BAD_REQUEST);
            let e = FormError {
                form: "access",
                field: "",
                message: e.text(),
            };
            license_page(&st, &s, id, status, None, Some(e), None).await
        }
    }
}

async fn rotate(
    State(st): State<AdminState>,
    s: Signed,
    headers: HeaderMap,
    Path(raw): Path<String>,
    body: Bytes,
) -> Response {
    let Some(id) = license_id(&raw) else {
        return not_found();
    };
    let f: CsrfForm = form(&body);
    if !s.check(&headers, &f.csrf) {
        return forbidden();
    }
    match rotate_key(&st, id).await {
        // shown once, on the page this redirects to
        Ok((_, key)) => {
            st.shared.console.hold_key(&s.session, id, key);
            see_other(&format!("/console/licenses/{id}?done=rotated"))
        }
        Err(e) => {
            let status = StatusCode::from_u16(e.code.status()).unwrap_or(StatusCode::BAD_REQUEST);
            let e = FormError {
                form: "access",
                field: "",
                message: e.text(),
            };
            license_page(&st, &s, id, status, None, Some(e), None).await
        }
    }
}
