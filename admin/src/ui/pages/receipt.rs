//! The page Stripe sends the customer back to (`/payments/success`, handled in
//! [`crate::payments`]): the payment's state, and the new balance for whoever may see it.

use axum::http::StatusCode;
use axum::response::Response;
use gateway::timefmt;
use maud::html;

use crate::ui::layout::{notice, page, Area, Tone};

fn tone(state: &str) -> Tone {
    if state == "paid" {
        Tone::Ok
    } else {
        Tone::Info
    }
}

const PROCESSING: &str =
    "Your payment is being processed; the hours are added as soon as it clears.";

/// For someone who has only the session id: the payment's state, nothing of the license.
pub fn anonymous(state: &str) -> Response {
    let message = if state == "paid" {
        "Thank you: the payment was received. Open your account page with your license key to \
         see your balance."
    } else {
        PROCESSING
    };
    let title = format!("Payment {state}");
    let main = html! {
        section.narrow {
            h1 { (title) }
            (notice(tone(state), message))
            p { a href="/payments/" { "Your account" } }
        }
    };
    page(StatusCode::OK, &title, Area::Customer, main)
}

/// For the license's holder (its key, or the browser that started the checkout): what was
/// added, when paid, and the balance now.
pub fn for_holder(
    state: &str,
    added_ms: i64,
    remaining_ms: i64,
    key_prefix: &str,
    unit: &gateway::display::BalanceUnit,
) -> Response {
    let message = if state == "paid" {
        format!(
            "Thank you. {} were added to your license.",
            unit.balance(added_ms)
        )
    } else {
        PROCESSING.to_string()
    };
    let title = format!("Payment {state}");
    let main = html! {
        section.narrow {
            h1 { (title) }
            (notice(tone(state), &message))
            div.balance {
                span.label { (unit.remaining_label()) }
                span.value #hours-remaining title=(timefmt::exact_ms(remaining_ms)) {
                    (unit.balance(remaining_ms))
                }
            }
            p { "License " code { (key_prefix) "…" } }
            p { a href="/payments/" { "Back to your account" } }
        }
    };
    page(StatusCode::OK, &title, Area::Customer, main)
}
