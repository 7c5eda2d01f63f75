//! The page around every page (head, the bar at the top, the security headers), and the small
//! pieces pages are made of: notices, labelled fields, selects, tables, figures.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use maud::{html, Markup, Render, DOCTYPE};

use super::format::{Change, Time};

/// Which part of the site a page belongs to (its navigation and security headers).
pub enum Area<'a> {
    /// The operator console, signed in: navigation and the sign-out form.
    Console { csrf: &'a str, current: &'a str },
    /// The sign-in page.
    SignIn,
    /// The customers' pages.
    Customer,
}

const NAV: [(&str, &str); 2] = [("/", "Dashboard"), ("/console/licenses", "Licenses")];

/// A whole page. `status` is usually 200; a form with errors is answered 400 or 422.
pub fn page(status: StatusCode, title: &str, area: Area<'_>, main: Markup) -> Response {
    let html = html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · Tollgate" }
                link rel="stylesheet" href="/assets/console.css";
                script src="/assets/console.js" defer {}
            }
            body {
                a.skip href="#main" { "Skip to content" }
                header.top {
                    span.brand { "Tollgate" }
                    @match &area {
                        Area::Console { csrf, current } => {
                            nav aria-label="Console" {
                                ul {
                                    @for (href, label) in NAV {
                                        li {
                                            a href=(href)
                                                aria-current=[(*current == label).then_some("page")]
                                                { (label) }
                                        }
                                    }
                                }
                            }
                            form.signout method="post" action="/console/sign-out" {
                                input type="hidden" name="csrf" value=(csrf);
                                button.link type="submit" { "Sign out" }
                            }
                            form.signout method="post" action="/console/sign-out-everywhere" {
                                input type="hidden" name="csrf" value=(csrf);
                                button.link type="submit"
                                    title="Ends every console session, on every node" {
                                    "Sign out everywhere"
                                }
                            }
                        }
                        Area::SignIn => {}
                        Area::Customer => { span.area { "Your account" } }
                    }
                }
                main #main { (main) }
            }
        }
    };

    let mut r = (status, html.into_string()).into_response();
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

/// What a notice says about itself: its colour, and whether screen readers are interrupted.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Tone {
    Ok,
    Info,
    /// Something to act on soon (a low balance).
    Warn,
    Error,
}

/// A message in a box. Errors are announced to screen readers at once.
pub fn notice(tone: Tone, text: &str) -> Markup {
    let (class, role) = match tone {
        Tone::Ok => ("ok", "status"),
        Tone::Info => ("info", "status"),
        Tone::Warn => ("warn", "status"),
        Tone::Error => ("error", "alert"),
    };
    html! { p.notice.(class) role=(role) { (text) } }
}

/// A labelled input. `error`, when set, is shown under it and tied to it for screen readers.
#[derive(Default)]
pub struct Field<'a> {
    pub name: &'a str,
    pub label: &'a str,
    pub kind: &'a str,
    pub value: &'a str,
    pub error: Option<&'a str>,
    pub hint: Option<&'a str>,
    /// Which form on the page the field belongs to, when there are several (keeps ids unique).
    pub form: &'a str,
    pub required: bool,
    pub autofocus: bool,
    pub autocomplete: Option<&'a str>,
    pub spellcheck: Option<&'a str>,
    pub maxlength: Option<u32>,
    pub min: Option<String>,
    pub max: Option<String>,
    pub step: Option<&'a str>,
    pub inputmode: Option<&'a str>,
}

impl<'a> Field<'a> {
    pub fn new(name: &'a str, label: &'a str) -> Field<'a> {
        Field {
            name,
            label,
            kind: "text",
            ..Field::default()
        }
    }

    /// The field's element id: `f-<name>`, or `f-<form>-<name>` on a page of several forms.
    pub fn id(&self) -> String {
        if self.form.is_empty() {
            format!("f-{}", self.name)
        } else {
            format!("f-{}-{}", self.form, self.name)
        }
    }
}

impl Render for Field<'_> {
    fn render(&self) -> Markup {
        let id = self.id();
        let hint_id = format!("{id}-hint");
        let error_id = format!("{id}-error");
        let described: Vec<&str> = [
            self.hint.map(|_| hint_id.as_str()),
            self.error.map(|_| error_id.as_str()),
        ]
        .into_iter()
        .flatten()
        .collect();
        let described = (!described.is_empty()).then(|| described.join(" "));
        html! {
            div.field.has-error[self.error.is_some()] {
                label for=(id) { (self.label) }
                input id=(id) name=(self.name) type=(self.kind) value=(self.value)
                    aria-describedby=[described]
                    aria-invalid=[self.error.map(|_| "true")]
                    required[self.required]
                    autofocus[self.autofocus]
                    autocomplete=[self.autocomplete]
                    spellcheck=[self.spellcheck]
                    maxlength=[self.maxlength]
                    min=[self.min.as_deref()]
                    max=[self.max.as_deref()]
                    step=[self.step]
                    inputmode=[self.inputmode];
                @if let Some(hint) = self.hint {
                    span.hint id=(hint_id) { (hint) }
                }
                @if let Some(error) = self.error {
                    span.field-error id=(error_id) { (error) }
                }
            }
        }
    }
}

/// A labelled select of `(value, text)` options, `chosen` selected.
pub fn select(name: &str, label: &str, options: &[(String, String)], chosen: &str) -> Markup {
    let id = format!("f-{name}");
    html! {
        div.field {
            label for=(id) { (label) }
            select id=(id) name=(name) {
                @for (value, text) in options {
                    option value=(value) selected[value == chosen] { (text) }
                }
            }
        }
    }
}

/// A figure of the stats row: a label over its value.
pub fn stat(label: &str, value: impl Render) -> Markup {
    html! {
        div.stat {
            span.label { (label) }
            span.value { (value) }
        }
    }
}

/// The hidden input that carries a form's CSRF token.
pub fn csrf_input(token: &str) -> Markup {
    html! { input type="hidden" name="csrf" value=(token); }
}

/// One cell of a [`table`]: text (escaped when shown), or markup made by maud (a [`Time`]).
pub enum Cell {
    Text(String),
    Markup(Markup),
}

impl From<String> for Cell {
    fn from(s: String) -> Cell {
        Cell::Text(s)
    }
}

impl From<&str> for Cell {
    fn from(s: &str) -> Cell {
        Cell::Text(s.to_string())
    }
}

impl From<Markup> for Cell {
    fn from(m: Markup) -> Cell {
        Cell::Markup(m)
    }
}

impl From<Time> for Cell {
    fn from(t: Time) -> Cell {
        Cell::Markup(t.render())
    }
}

impl From<Change> for Cell {
    fn from(c: Change) -> Cell {
        Cell::Markup(c.render())
    }
}

impl Render for Cell {
    fn render(&self) -> Markup {
        match self {
            Cell::Text(s) => html! { (s) },
            Cell::Markup(m) => m.clone(),
        }
    }
}

/// A table; `numeric` right-aligns columns. With no rows, `empty` instead.
pub fn table(
    head: &[&str],
    numeric: &[bool],
    rows: impl IntoIterator<Item = Vec<Cell>>,
    empty: &str,
) -> Markup {
    let rows: Vec<Vec<Cell>> = rows.into_iter().collect();
    let num = |i: usize| numeric.get(i) == Some(&true);
    if rows.is_empty() {
        return html! { p { (empty) } };
    }
    html! {
        div.table-wrap {
            table {
                thead {
                    tr {
                        @for (i, h) in head.iter().enumerate() {
                            th scope="col" class=[num(i).then_some("num")] { (h) }
                        }
                    }
                }
                tbody {
                    @for row in &rows {
                        tr {
                            @for (i, cell) in row.iter().enumerate() {
                                td class=[num(i).then_some("num")] { (cell) }
                            }
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_field_escapes_what_it_shows_and_ties_hint_and_error_to_the_input() {
        let f = Field {
            value: "\"><script>alert(1)</script>",
            error: Some("<b>wrong</b>"),
            hint: Some("a & b"),
            required: true,
            maxlength: Some(200),
            form: "hours",
            ..Field::new("reason", "Reason")
        };
        let html = f.render().into_string();
        assert!(!html.contains("<script>"), "{html}");
        assert!(html.contains("value=\"&quot;&gt;&lt;script&gt;"), "{html}");
        assert!(html.contains("&lt;b&gt;wrong&lt;/b&gt;"), "{html}");
        assert!(html.contains("a &amp; b"), "{html}");
        assert!(html.contains("id=\"f-hours-reason\""), "{html}");
        assert!(
            html.contains("aria-describedby=\"f-hours-reason-hint f-hours-reason-error\""),
            "{html}"
        );
        assert!(html.contains("aria-invalid=\"true\""), "{html}");
        assert!(html.contains("class=\"field has-error\""), "{html}");
        assert!(html.contains(" required"), "{html}");
        assert!(html.contains("maxlength=\"200\""), "{html}");
        assert!(
            !html.contains("min="),
            "unset attributes are left out: {html}"
        );
    }

    #[test]
    fn a_field_without_hint_or_error_says_nothing_more() {
        let html = Field::new("q", "Search").render().into_string();
        assert!(!html.contains("aria-describedby"), "{html}");
        assert!(!html.contains("aria-invalid"), "{html}");
        assert!(html.contains("class=\"field\""), "{html}");
    }

    #[test]
    fn a_table_escapes_its_cells_and_says_when_it_is_empty() {
        let t = table(
            &["Name", "Hours"],
            &[false, true],
            [vec!["<img src=x>".into(), Time(7_200_000).into()]],
            "None.",
        )
        .into_string();
        assert!(
            t.contains(
                "<td>&lt;img src=x&gt;</td><td class=\"num\">\
                 <span class=\"time\" title=\"7,200,000 ms\">2 h</span></td>"
            ),
            "{t}"
        );
        assert!(
            t.contains("<th scope=\"col\" class=\"num\">Hours</th>"),
            "{t}"
        );
        let empty = table(&["Name"], &[false], Vec::new(), "No <rows>.").into_string();
        assert_eq!(empty, "<p>No &lt;rows&gt;.</p>");
    }

    #[test]
    fn a_notice_is_announced_when_it_is_an_error() {
        assert_eq!(
            notice(Tone::Error, "a <b>").into_string(),
            "<p class=\"notice error\" role=\"alert\">a &lt;b&gt;</p>"
        );
        assert_eq!(
            notice(Tone::Ok, "done").into_string(),
            "<p class=\"notice ok\" role=\"status\">done</p>"
        );
    }

    #[test]
    fn the_page_escapes_its_title_and_marks_the_current_section() {
        let r = page(
            StatusCode::OK,
            "<script>x</script>",
            Area::Console {
                csrf: "tok\"en",
                current: "Licenses",
            },
            html! { p { "hello" } },
        );
        assert_eq!(r.headers()[header::CACHE_CONTROL], "no-store");
        assert!(r.headers()[header::CONTENT_SECURITY_POLICY]
            .to_str()
            .unwrap()
            .contains("form-action 'self'"));
        let body =
            futures_util::FutureExt::now_or_never(axum::body::to_bytes(r.into_body(), usize::MAX))
                .unwrap()
                .unwrap();
        let body = String::from_utf8(body.to_vec()).unwrap();
        assert!(body.starts_with("<!DOCTYPE html>"), "{body}");
        assert!(body.contains("<title>&lt;script&gt;x&lt;/script&gt; · Tollgate</title>"));
        assert!(body.contains("value=\"tok&quot;en\""), "{body}");
        assert!(body.contains("<a href=\"/console/licenses\" aria-current=\"page\">Licenses"));
        assert!(body.contains("<a href=\"/\">Dashboard"), "{body}");
    }
}
