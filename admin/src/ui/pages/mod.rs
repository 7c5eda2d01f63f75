//! One file per page (or per family of pages) and its handlers. Console pages take a
//! [`super::operator::Signed`]; the customers' pages a form token of [`super::customer`].

use gateway::license::LicenseStatus;
use gateway::store::License;
use maud::{html, Markup};

use crate::error::ApiError;
use crate::AdminState;

pub mod keys;
pub mod license;
pub mod licenses;
pub mod overview;
pub mod payments;
pub mod receipt;

/// A license's state as a badge: revoked, expired or active.
fn status_badge(l: &License, now: i64) -> Markup {
    if l.status == LicenseStatus::Revoked {
        html! { span.badge.bad { "revoked" } }
    } else if l.expires_at.is_some_and(|e| e <= now) {
        html! { span.badge.bad { "expired" } }
    } else {
        html! { span.badge.ok { "active" } }
    }
}

/// The configured plans as select options, with "Any plan" first when `any`.
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

/// A license id from the path; anything but a positive integer is no license.
fn license_id(raw: &str) -> Option<i64> {
    raw.parse::<i64>().ok().filter(|id| *id > 0)
}

/// The console's form field an error is about: the field the service names, as the forms call
/// it; "" (the form as a whole) for a field the forms do not have.
fn form_field(e: &ApiError) -> &'static str {
    match e.field() {
        Some("expires_at") => "expires",
        Some(f @ ("name" | "email" | "company" | "plan" | "hours" | "reason")) => f,
        _ => "",
    }
}

/// Hours typed into a form: empty is `None` when `empty_ok`, else an error to show.
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

/// A new license key, shown once, with a copy button that the script reveals.
fn key_box(key: &str) -> Markup {
    html! {
        div.key-box {
            label for="new-key" { "License key" }
            div.key-row {
                input #new-key type="text" readonly value=(key) class="key"
                    aria-describedby="key-hint";
                button.copy type="button" data-copy="new-key" hidden { "Copy" }
            }
            span.hint #key-hint {
                "Shown once: give it to the customer now. Tollgate keeps only its hash."
            }
            span.copied role="status" {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_is_put_next_to_the_field_it_names() {
        let field = |f| form_field(&ApiError::invalid(f, "wrong"));
        assert_eq!(field("name"), "name");
        assert_eq!(field("expires_at"), "expires");
        assert_eq!(field("plan"), "plan");
        assert_eq!(field("meter"), "", "no form has it");
        assert_eq!(form_field(&ApiError::bad_request("nothing to change")), "");
    }

    #[test]
    fn typed_hours_are_a_number_or_an_error_to_show() {
        assert_eq!(parse_hours(" 2.5 ", false), Ok(Some(2.5)));
        assert_eq!(parse_hours("", true), Ok(None));
        assert!(parse_hours("", false).is_err());
        assert_eq!(
            parse_hours("two", true),
            Err("\"two\" is not a number of hours.".into())
        );
    }

    #[test]
    fn only_positive_integers_are_license_ids() {
        assert_eq!(license_id("42"), Some(42));
        assert_eq!(license_id("0"), None);
        assert_eq!(license_id("-1"), None);
        assert_eq!(license_id("1e3"), None);
    }

    #[test]
    fn the_key_box_escapes_the_key() {
        let html = key_box("tg_\"><b>").into_string();
        assert!(html.contains("value=\"tg_&quot;&gt;&lt;b&gt;\""), "{html}");
        assert!(html.contains("hidden>Copy</button>"), "{html}");
    }
}
