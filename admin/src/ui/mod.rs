//! The HTML side of the admin listener: the operator console (`/`, `/console/…`) and the
//! customers' payment page (`/payments/`).
//!
//! Pages are rendered on the server and work without JavaScript; the one script only adds a
//! copy button. Charts are inline SVG drawn here. Stylesheet and script are compiled into the
//! binary and served from `/assets/`, so nothing is fetched from elsewhere. Every value that came
//! from a person or a database goes through [`esc`].

use std::fmt::Write as _;

use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use gateway::store::{DayStats, Page};
use gateway::timefmt;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::AdminState;

pub mod customer;
pub mod operator;

/// A history page as the API's JSON rows, for the tables that list them.
pub struct JsonRows {
    pub items: Vec<serde_json::Value>,
}

pub fn json_rows(page: Page) -> JsonRows {
    JsonRows {
        items: page.items.iter().map(crate::views::history_item).collect(),
    }
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

/// HTML-escapes text for element content and quoted attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Hours for people: `12`, `2.5`, `0.125` (three decimals at most).
pub fn hours(ms: i64) -> String {
    // under 0.001 h (3.6 s) but not nothing: enough decimals that it does not read as 0
    let (h, decimals) = if ms != 0 && ms.abs() < 3_600 {
        (ms as f64 / 3_600_000.0, 6)
    } else {
        (gateway::license::ms_to_hours(ms), 3)
    };
    let s = format!("{h:.decimals$}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// A change of balance: `+3`, `−0.5` (with a real minus sign).
pub fn signed_hours(ms: i64) -> String {
    match ms {
        0 => "0".into(),
        ms if ms > 0 => format!("+{}", hours(ms)),
        ms => format!("−{}", hours(-ms)),
    }
}

/// A chart label for an amount of time given in hours: `2.5 h`, `12 min`, `40 s`.
pub fn duration_label(h: f64) -> String {
    if h >= 1.0 {
        format!("{:.1} h", h)
    } else if h * 60.0 >= 1.0 {
        format!("{:.0} min", h * 60.0)
    } else {
        format!("{:.0} s", h * 3_600.0)
    }
}

/// A time for people, to the minute, in UTC.
pub fn when(ms: i64) -> String {
    let t = timefmt::rfc3339(ms);
    format!("{} {} UTC", &t[..10], &t[11..16])
}

/// An amount of money: `12.50 USD`.
pub fn money(cents: i64, currency: &str) -> String {
    format!(
        "{}{}.{:02} {}",
        if cents < 0 { "-" } else { "" },
        cents.abs() / 100,
        cents.abs() % 100,
        currency.to_uppercase()
    )
}

/// Which part of the site a page belongs to (its navigation and security headers).
pub enum Area<'a> {
    /// The operator console, signed in: navigation and the sign-out form.
    Console { csrf: &'a str, current: &'a str },
    /// The sign-in page.
    SignIn,
    /// The customers' pages.
    Customer,
}

/// A whole page. `status` is usually 200; a form with errors is answered 400 or 422.
pub fn page(status: StatusCode, title: &str, area: Area<'_>, main: &str) -> Response {
    let mut html = String::with_capacity(main.len() + 2048);
    let _ = write!(
        html,
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{} · Tollgate</title>\
         <link rel=\"stylesheet\" href=\"/assets/console.css\">\
         <script src=\"/assets/console.js\" defer></script></head><body>\
         <a class=\"skip\" href=\"#main\">Skip to content</a>",
        esc(title)
    );
    html.push_str("<header class=\"top\"><span class=\"brand\">Tollgate</span>");
    match &area {
        Area::Console { csrf, current } => {
            html.push_str("<nav aria-label=\"Console\"><ul>");
            for (href, label) in [("/", "Dashboard"), ("/console/licenses", "Licenses")] {
                let here = if *current == label {
                    " aria-current=\"page\""
                } else {
                    ""
                };
                let _ = write!(html, "<li><a href=\"{href}\"{here}>{label}</a></li>");
            }
            html.push_str("</ul></nav>");
            let _ = write!(
                html,
                "<form method=\"post\" action=\"/console/sign-out\" class=\"signout\">\
                 <input type=\"hidden\" name=\"csrf\" value=\"{}\">\
                 <button type=\"submit\" class=\"link\">Sign out</button></form>",
                esc(csrf)
            );
        }
        Area::SignIn => {}
        Area::Customer => html.push_str("<span class=\"area\">Your account</span>"),
    }
    html.push_str("</header><main id=\"main\">");
    html.push_str(main);
    html.push_str("</main></body></html>\n");

    let mut r = (status, html).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    // Balances and keys: never cached, never framed, no inline script or style.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    // The payment page's form ends in a redirect to Stripe's checkout, which `form-action`
    // would block; the console's forms only ever post here.
    let csp = match area {
        Area::Customer => {
            "default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self'; \
             frame-ancestors 'none'; base-uri 'none'"
        }
        _ => {
            "default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self'; \
             form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
        }
    };
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(csp),
    );
    r
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

/// A message in a box: `kind` is `error` or `ok`. Errors are announced to screen readers.
pub fn notice(kind: &str, text: &str) -> String {
    let role = if kind == "error" { "alert" } else { "status" };
    format!(
        "<p class=\"notice {kind}\" role=\"{role}\">{}</p>",
        esc(text)
    )
}

/// A labelled input. `error`, when set, is shown under it and tied to it for screen readers.
pub struct Field<'a> {
    pub name: &'a str,
    pub label: &'a str,
    pub kind: &'a str,
    pub value: &'a str,
    pub error: Option<&'a str>,
    pub extra: &'a str,
    pub hint: Option<&'a str>,
    /// Which form on the page the field belongs to, when there are several (keeps ids unique).
    pub form: &'a str,
}

impl<'a> Field<'a> {
    pub fn new(name: &'a str, label: &'a str) -> Field<'a> {
        Field {
            name,
            label,
            kind: "text",
            value: "",
            error: None,
            extra: "",
            hint: None,
            form: "",
        }
    }

    pub fn render(&self) -> String {
        let id = if self.form.is_empty() {
            format!("f-{}", self.name)
        } else {
            format!("f-{}-{}", self.form, self.name)
        };
        let mut described = Vec::new();
        let mut after = String::new();
        if let Some(h) = self.hint {
            described.push(format!("{id}-hint"));
            let _ = write!(
                after,
                "<span class=\"hint\" id=\"{id}-hint\">{}</span>",
                esc(h)
            );
        }
        if let Some(e) = self.error {
            described.push(format!("{id}-error"));
            let _ = write!(
                after,
                "<span class=\"field-error\" id=\"{id}-error\">{}</span>",
                esc(e)
            );
        }
        let aria = if described.is_empty() {
            String::new()
        } else {
            format!(" aria-describedby=\"{}\"", described.join(" "))
        };
        let invalid = if self.error.is_some() {
            " aria-invalid=\"true\""
        } else {
            ""
        };
        format!(
            "<div class=\"field{}\"><label for=\"{id}\">{}</label>\
             <input id=\"{id}\" name=\"{}\" type=\"{}\" value=\"{}\"{aria}{invalid} {}>{after}</div>",
            if self.error.is_some() { " has-error" } else { "" },
            esc(self.label),
            esc(self.name),
            esc(self.kind),
            esc(self.value),
            self.extra,
        )
    }
}

/// A bar chart of one value per day over the last `days` days up to `today` (a UTC day number),
/// as inline SVG with a data table beside it for screen readers and for reading exact values.
pub fn day_chart(
    id: &str,
    title: &str,
    today: i64,
    days: u32,
    data: &[DayStats],
    value: impl Fn(&DayStats) -> f64,
    label: impl Fn(f64) -> String,
) -> String {
    let first = today - i64::from(days) + 1;
    let mut values = vec![0.0f64; days as usize];
    for d in data {
        if (first..=today).contains(&d.day) {
            values[(d.day - first) as usize] = value(d);
        }
    }
    let max = values.iter().cloned().fold(0.0f64, f64::max);
    let (w, h, left, bottom, top) = (640.0, 200.0, 8.0, 24.0, 26.0);
    let plot_h = h - bottom - top;
    let slot = (w - 2.0 * left) / f64::from(days);
    let bar_w = (slot * 0.7).max(1.0);
    let date = |day: i64| {
        let (y, m, d) = timefmt::civil_from_days(day);
        format!("{y:04}-{m:02}-{d:02}")
    };
    let mut svg = String::new();
    let _ = write!(
        svg,
        "<figure class=\"chart\"><figcaption id=\"{id}-title\">{}</figcaption>\
         <svg viewBox=\"0 0 {w} {h}\" role=\"img\" aria-labelledby=\"{id}-title\" \
         preserveAspectRatio=\"xMidYMid meet\" class=\"bars\">",
        esc(title)
    );
    let _ = write!(
        svg,
        "<line x1=\"{left}\" y1=\"{base}\" x2=\"{x2}\" y2=\"{base}\" class=\"axis\"/>",
        base = h - bottom,
        x2 = w - left
    );
    let _ = write!(
        svg,
        "<text x=\"{left}\" y=\"18\" class=\"max\">max {}</text>",
        esc(&label(max))
    );
    for (i, v) in values.iter().enumerate() {
        let bh = if max > 0.0 { v / max * plot_h } else { 0.0 };
        let x = left + slot * i as f64 + (slot - bar_w) / 2.0;
        let y = h - bottom - bh;
        let _ = write!(
            svg,
            "<rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{bar_w:.1}\" height=\"{bh:.1}\" class=\"bar\">\
             <title>{}: {}</title></rect>",
            date(first + i as i64),
            esc(&label(*v))
        );
    }
    let _ = write!(
        svg,
        "<text x=\"{left}\" y=\"{ty}\" class=\"tick\">{}</text>\
         <text x=\"{xr}\" y=\"{ty}\" class=\"tick end\">{}</text></svg>",
        date(first),
        date(today),
        ty = h - 6.0,
        xr = w - left
    );
    // the numbers, for screen readers and for anyone who wants them exactly
    let _ = write!(
        svg,
        "<details><summary>Show the numbers</summary><div class=\"table-wrap\"><table>\
         <caption class=\"sr-only\">{}</caption><thead><tr><th scope=\"col\">Day</th>\
         <th scope=\"col\">Value</th></tr></thead><tbody>",
        esc(title)
    );
    for (i, v) in values.iter().enumerate().rev() {
        let _ = write!(
            svg,
            "<tr><td>{}</td><td>{}</td></tr>",
            date(first + i as i64),
            esc(&label(*v))
        );
    }
    svg.push_str("</tbody></table></div></details></figure>");
    svg
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

/// A keyed digest of `value` as hex: CSRF tokens tied to a session or a cookie.
pub fn tag(secret: &[u8; 32], purpose: &str, value: &str) -> String {
    let mut h = Sha256::new();
    h.update(secret);
    h.update(purpose.as_bytes());
    h.update([0]);
    h.update(value.as_bytes());
    hex::encode(h.finalize())
}

/// Constant-time equality of two tokens.
pub fn tokens_match(a: &str, b: &str) -> bool {
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

/// A cookie's value from the request.
pub fn cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_covers_markup_and_quotes() {
        assert_eq!(
            esc("<script>alert(\"x\" & 'y')</script>"),
            "&lt;script&gt;alert(&quot;x&quot; &amp; &#39;y&#39;)&lt;/script&gt;"
        );
    }

    #[test]
    fn hours_and_money_read_as_people_write_them() {
        assert_eq!(hours(3_600_000), "1");
        assert_eq!(hours(9_000_000), "2.5");
        assert_eq!(hours(450_000), "0.125");
        assert_eq!(hours(0), "0");
        assert_eq!(hours(700), "0.000194");
        assert_eq!(signed_hours(-700), "−0.000194");
        assert_eq!(signed_hours(3_600_000), "+1");
        assert_eq!(duration_label(2.5), "2.5 h");
        assert_eq!(duration_label(0.2), "12 min");
        assert_eq!(duration_label(0.005), "18 s");
        assert_eq!(money(1250, "usd"), "12.50 USD");
        assert_eq!(money(-5, "eur"), "-0.05 EUR");
    }

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
    fn cookies_are_found_by_exact_name() {
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, "a=1; tg_session=abc; b=2".parse().unwrap());
        assert_eq!(cookie(&h, "tg_session"), Some("abc"));
        assert_eq!(cookie(&h, "session"), None);
    }

    #[test]
    fn a_chart_has_one_bar_per_day_and_escapes_its_labels() {
        let data = [DayStats {
            day: 100,
            calls: 7,
            ok: 7,
            charged_ms: 0,
        }];
        let svg = day_chart(
            "c",
            "Calls <per> day",
            100,
            30,
            &data,
            |d| d.calls as f64,
            |v| format!("{v}"),
        );
        assert_eq!(svg.matches("<rect").count(), 30);
        assert!(svg.contains("Calls &lt;per&gt; day"));
        assert!(svg.contains("max 7"));
    }
}
