//! `[payments]` (the price of an hour and the bounds of a purchase), `[[packages]]` (what is on
//! sale, the shipped ones when the file has none) and `[stripe]` (Stripe's API, where Checkout
//! sends people back, the webhook's tolerance).

use super::*;

/// `[payments]`: the price of an hour, the bounds of a purchase (`min_hours` at most `max_hours`),
/// the currency, and whether unrecorded Checkout Sessions are credited.
pub(super) fn parse(root: &Table, errors: &mut Vec<String>) -> PaymentsConfig {
    let mut s = Section::new(root, "payments");
    let payments = PaymentsConfig {
        price_per_hour_cents: s.uint("price_per_hour_cents", 500, 1, 100_000_000) as i64,
        min_hours: s.uint("min_hours", 1, 1, 100_000) as i64,
        max_hours: s.uint("max_hours", 1_000, 1, 100_000) as i64,
        currency: s.currency("currency", "usd"),
        credit_unrecorded_sessions: s.bool("credit_unrecorded_sessions", false),
        grace_ms: s.uint("grace_days", 3, 0, 365) as i64 * 86_400_000,
    };
    if payments.min_hours > payments.max_hours {
        s.error("max_hours", "must be at least payments.min_hours");
    }
    s.finish(errors);
    payments
}

/// `[[packages]]`, or the shipped ones at `[payments]`' price when the file has none; a package's
/// currency defaults to `[payments]`' one, and each id is given once.
pub(super) fn packages(
    root: &Table,
    errors: &mut Vec<String>,
    payments: &PaymentsConfig,
) -> Vec<Package> {
    let packages = match root.get("packages") {
        None => default_packages(&payments.currency, payments.price_per_hour_cents),
        Some(v) => Section::array(v, "packages", errors)
            .into_iter()
            .map(|mut s| {
                let p = Package {
                    id: s.string("id", ""),
                    hours: s.uint("hours", 1, 1, 100_000) as i64,
                    price_cents: s.uint("price_cents", 0, 1, 100_000_000_000) as i64,
                    currency: s.currency("currency", &payments.currency),
                };
                s.require("id");
                s.require("price_cents");
                s.finish(errors);
                p
            })
            .collect(),
    };
    unique(
        errors,
        "packages",
        packages.iter().map(|p| p.id.as_str()),
        "id",
    );
    packages
}

/// `[stripe]`: the API's base URL, where Checkout sends people back (by default the payment
/// page on the admin listener, `admin`), the webhook's tolerance.
pub(super) fn stripe(root: &Table, errors: &mut Vec<String>, admin: &AdminConfig) -> StripeConfig {
    let mut s = Section::new(root, "stripe");
    // the admin listener as a browser on this machine reaches it
    let mut at = admin.listen;
    if at.ip().is_unspecified() {
        at.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let scheme = if admin.tls.is_some() { "https" } else { "http" };
    let page = format!("{scheme}://{at}/payments/");
    let stripe = StripeConfig {
        api_base: s.url("api_base", "https://api.stripe.com"),
        success_url: s.url(
            "success_url",
            &format!("{page}success?session_id={{CHECKOUT_SESSION_ID}}"),
        ),
        cancel_url: s.url("cancel_url", &page),
        webhook_tolerance_s: s.uint("webhook_tolerance_s", 300, 1, 86_400),
    };
    s.finish(errors);
    stripe
}

fn default_packages(currency: &str, price_per_hour_cents: i64) -> Vec<Package> {
    [("small", 5), ("medium", 10), ("large", 20), ("xl", 50)]
        .into_iter()
        .map(|(id, hours)| Package {
            id: id.into(),
            hours,
            price_cents: hours * price_per_hour_cents,
            currency: currency.into(),
        })
        .collect()
}
