//! The license list (search, filters, pages of 25), the form to create a license, and the page
//! that shows a new license's key once.

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use gateway::license::LicenseStatus;
use gateway::store::LicenseFilter;
use maud::html;
use serde::Deserialize;

use super::{form_field, key_box, license_id, parse_hours, plan_options, status_badge};
use crate::service::licenses::{self, CreateBody};
use crate::service::Service;
use crate::ui::format::{when, Time};
use crate::ui::layout::{csrf_input, notice, page, select, Field, Tone};
use crate::ui::operator::{failed, forbidden, not_found, Signed};
use crate::ui::{form, query, see_other};
use crate::AdminState;

const PAGE_SIZE: u32 = 25;

#[derive(Deserialize, Default)]
struct ListQuery {
    q: Option<String>,
    status: Option<String>,
    plan: Option<String>,
    before: Option<String>,
}

pub async fn list(State(st): State<AdminState>, s: Signed, RawQuery(q): RawQuery) -> Response {
    let q: ListQuery = query(q.as_deref());
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
    let (rows, next) = match licenses::search(&Service::of(&st.app), filter).await {
        Ok(v) => v,
        Err(e) => return failed(e),
    };
    let now = st.app.ledger.now_ms();
    let search_field = Field {
        kind: "search",
        value: search.as_deref().unwrap_or(""),
        ..Field::new("q", "Search")
    };
    let statuses = [
        (String::new(), "Any status".to_string()),
        ("active".into(), "Active".into()),
        ("revoked".into(), "Revoked".into()),
    ];
    // the pager's links keep the search and the filters
    let link = |before: Option<i64>| {
        let mut pairs: Vec<(&str, String)> = Vec::new();
        for (k, v) in [("q", &search), ("status", &status), ("plan", &plan)] {
            if let Some(v) = v {
                pairs.push((k, v.clone()));
            }
        }
        if let Some(b) = before {
            pairs.push(("before", b.to_string()));
        }
        format!(
            "/console/licenses?{}",
            serde_urlencoded::to_string(&pairs).unwrap_or_default()
        )
    };
    let main = html! {
        div.title-row {
            h1 { "Licenses" }
            a.button href="/console/licenses/new" { "New license" }
        }
        form.filters method="get" action="/console/licenses" role="search" {
            (search_field)
            (select("status", "Status", &statuses, status.as_deref().unwrap_or("")))
            (select("plan", "Plan", &plan_options(&st, true), plan.as_deref().unwrap_or("")))
            button type="submit" { "Filter" }
        }
        // under the row, so its fields and button line up
        p.hint.filters-hint { "Search by name, email, company or the start of the key." }
        @if rows.is_empty() {
            p { "No licenses match." }
        } @else {
            div.table-wrap {
                table.licenses {
                    thead {
                        tr {
                            th scope="col" { "Name" }
                            th scope="col" { "Key" }
                            th scope="col" { "Plan" }
                            th scope="col" { "Status" }
                            th.num scope="col" { "Time left" }
                            th scope="col" { "Last used" }
                        }
                    }
                    tbody {
                        @for l in &rows {
                            tr {
                                td {
                                    a href={ "/console/licenses/" (l.id) } { (l.name) }
                                    @if let Some(c) = &l.company { span.sub { (c) } }
                                }
                                td { code { (l.key_prefix) "…" } }
                                td { (l.plan) }
                                td { (status_badge(l, now)) }
                                td.num { (Time(Service::of(&st.app).live_remaining_ms(l))) }
                                td { (l.last_used_at.map(when).unwrap_or_else(|| "never".into())) }
                            }
                        }
                    }
                }
            }
        }
        nav.pager aria-label="Pages" {
            @if before.is_some() {
                a href=(link(None)) { "« First page" }
            }
            @if let Some(n) = next {
                a href=(link(Some(n))) rel="next" { "Next page »" }
            }
        }
    };
    page(StatusCode::OK, "Licenses", s.area("Licenses"), main)
}

#[derive(Deserialize, Default)]
pub struct NewForm {
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

fn new_page(
    st: &AdminState,
    s: &Signed,
    status: StatusCode,
    f: &NewForm,
    error: Option<(&str, &str)>,
) -> Response {
    let err = |name: &str| error.filter(|(field, _)| *field == name).map(|(_, m)| m);
    // errors of no field, and of the plan (a select shows none), above the form
    let above = error.filter(|(field, _)| field.is_empty() || *field == "plan");
    let plan = if f.plan.is_empty() { "free" } else { &f.plan };
    let main = html! {
        h1 { "New license" }
        @if let Some((_, message)) = above { (notice(Tone::Error, message)) }
        form.card method="post" action="/console/licenses" novalidate {
            (csrf_input(&s.csrf))
            (Field {
                value: &f.name,
                error: err("name"),
                required: true,
                maxlength: Some(200),
                autocomplete: Some("off"),
                ..Field::new("name", "Name")
            })
            (Field {
                kind: "email",
                value: &f.email,
                error: err("email"),
                maxlength: Some(254),
                autocomplete: Some("off"),
                ..Field::new("email", "Email (optional)")
            })
            (Field {
                value: &f.company,
                error: err("company"),
                maxlength: Some(200),
                autocomplete: Some("off"),
                ..Field::new("company", "Company (optional)")
            })
            (select("plan", "Plan", &plan_options(st, false), plan))
            (Field {
                kind: "number",
                value: &f.hours,
                error: err("hours"),
                min: Some("0".into()),
                step: Some("any"),
                inputmode: Some("decimal"),
                hint: Some("Prepaid hours to start with; 0 or empty for none."),
                ..Field::new("hours", "Hours")
            })
            (Field {
                kind: "date",
                value: &f.expires,
                error: err("expires"),
                hint: Some("Optional. The license stops working at the start of this day (UTC)."),
                ..Field::new("expires", "Expires on")
            })
            button type="submit" { "Create license" }
        }
    };
    page(status, "New license", s.area("Licenses"), main)
}

pub async fn new_form(State(st): State<AdminState>, s: Signed) -> Response {
    new_page(&st, &s, StatusCode::OK, &NewForm::default(), None)
}

pub async fn create(
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
    match licenses::create(&Service::of(&st.app), b).await {
        Ok((l, key)) => {
            st.shared.console.hold_key(&s.session, l.id, key).await;
            see_other(&format!("/console/licenses/{}/created", l.id))
        }
        Err(e) => {
            let field = form_field(&e);
            let status = StatusCode::from_u16(e.code.status()).unwrap_or(StatusCode::BAD_REQUEST);
            new_page(&st, &s, status, &f, Some((field, e.text())))
        }
    }
}

/// The page after creating a license: its key, once (a reload finds it gone).
pub async fn created(State(st): State<AdminState>, s: Signed, Path(raw): Path<String>) -> Response {
    let Some(id) = license_id(&raw) else {
        return not_found();
    };
    let l = match licenses::get(&Service::of(&st.app), id).await {
        Ok(l) => l,
        Err(e) if e.code == gateway::errors::ErrorCode::NotFound => return not_found(),
        Err(e) => return failed(e),
    };
    let key = st.shared.console.take_key(&s.session, id).await;
    let main = html! {
        h1 { "License created" }
        (notice(Tone::Ok, "The license was created."))
        p { (l.name) " on the " (l.plan) " plan, with a balance of " (Time(l.balance_ms)) "." }
        @match &key {
            Some(key) => (key_box(key)),
            None => (notice(Tone::Info, "The key was shown once and is not kept. Rotate the key \
                on the license's page to make a new one.")),
        }
        p {
            a.button href={ "/console/licenses/" (l.id) } { "Open the license" }
            " "
            a href="/console/licenses/new" { "Create another" }
        }
    };
    page(StatusCode::OK, "License created", s.area("Licenses"), main)
}
