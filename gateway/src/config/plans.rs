//! `[[plans]]`: each plan's limits as the file gives them (the limits themselves, validated
//! here once, are built from these by `limits::PlanLimits::from_plan`), and the shipped plans.

use super::*;

/// The plans of the file (the shipped ones when it has none): each checked, `free` required,
/// `guest` required when keyless requests are metered as guests.
pub(super) fn parse(
    root: &Table,
    errors: &mut Vec<String>,
    guests: bool,
    meters: &[Meter],
    currency: &str,
) -> Vec<Plan> {
    let plans: Vec<Plan> = match root.get("plans") {
        None => default_plans(),
        Some(v) => Section::array(v, "plans", errors)
            .into_iter()
            .map(|mut s| {
                let p = Plan {
                    name: s.string("name", ""),
                    requests_per_second: s.opt_uint("requests_per_second"),
                    requests_per_minute: s.opt_uint("requests_per_minute"),
                    requests_per_hour: s.opt_uint("requests_per_hour"),
                    requests_per_day: s.opt_uint("requests_per_day"),
                    max_concurrent: s.opt_uint("max_concurrent"),
                    max_body_bytes: s.opt_uint("max_body_bytes"),
                    period_ms: hours_or_minutes(&mut s, "period_hours", "period_minutes"),
                    included_ms: hours_or_minutes(&mut s, "included_hours", "included_minutes"),
                    included_requests: s.opt_uint("included_requests").filter(|&n| n > 0),
                    included_units: meters::units_table(&mut s, "included_units", meters, false),
                    period_requests: s.opt_uint("period_requests"),
                    max_upload_bytes_per_day: s.opt_uint("max_upload_bytes_per_day"),
                    period_units: meters::units_table(&mut s, "period_units", meters, false),
                    price: price(&mut s, currency),
                    trial_days: s.opt_uint("trial_days").filter(|&d| {
                        let ok = (1..=730).contains(&d);
                        if !ok {
                            s.error("trial_days", &format!("must be 1 to 730, not {d}"));
                        }
                        ok
                    }),
                };
                if p.trial_days.is_some() && p.price.is_none() {
                    s.error(
                        "trial_days",
                        "a trial needs a price (price_cents or stripe_price)",
                    );
                }
                if let (Some(cap), Some(included)) = (p.period_ms, p.included_ms) {
                    if cap < included {
                        s.error(
                            "period_minutes",
                            &format!(
                                "a ceiling of {} min is below the {} min the plan includes",
                                cap / 60_000,
                                included / 60_000
                            ),
                        );
                    }
                }
                if let (Some(cap), Some(included)) = (p.period_requests, p.included_requests) {
                    if cap < included {
                        s.error(
                            "period_requests",
                            &format!(
                                "a ceiling of {cap} requests is below the {included} the plan \
                                 includes"
                            ),
                        );
                    }
                }
                for (i, m) in meters.iter().enumerate() {
                    let (cap, included) = (p.period_units[i], p.included_units[i]);
                    if cap > 0 && cap < included {
                        s.error(
                            &format!("period_units.{}", m.name),
                            &format!(
                                "a ceiling of {cap} is below the {included} the plan includes"
                            ),
                        );
                    }
                }
                s.require("name");
                s.finish(errors);
                p
            })
            .collect(),
    };
    unique(
        errors,
        "plans",
        plans.iter().map(|p| p.name.as_str()),
        "name",
    );
    if !plans.iter().any(|p| p.name == "free") {
        errors.push("plans: a plan named \"free\" is required (it is the default)".into());
    }
    if guests && !plans.iter().any(|p| p.name == "guest") {
        errors.push("plans: proxy.anonymous = \"guest\" needs a plan named \"guest\"".into());
    }
    plans
}

/// A plan's subscription price: `price_cents` (with `currency`, default `[payments]`' one, and
/// `interval`, default `month`) and/or `stripe_price` (a Price id made in Stripe); none when
/// the plan gives neither.
fn price(s: &mut Section<'_>, currency: &str) -> Option<PlanPrice> {
    let cents = s.opt_uint("price_cents").filter(|&c| {
        let ok = (1..=99_999_999).contains(&c);
        if !ok {
            s.error("price_cents", &format!("must be 1 to 99999999, not {c}"));
        }
        ok
    });
    let stripe_price = s.opt_string("stripe_price").filter(|p| {
        let ok = p.starts_with("price_") && p.len() <= 255;
        if !ok {
            s.error("stripe_price", "must be a Stripe Price id (price_…)");
        }
        ok
    });
    let interval = match s.string("interval", "month").as_str() {
        "month" => "month",
        "year" => "year",
        other => {
            s.error(
                "interval",
                &format!("must be \"month\" or \"year\", not {other:?}"),
            );
            "month"
        }
    };
    let currency = s.currency("currency", currency);
    if cents.is_none() && stripe_price.is_none() {
        for key in ["interval", "currency"] {
            if s.table_has(key) {
                s.error(key, "needs price_cents or stripe_price");
            }
        }
        return None;
    }
    Some(PlanPrice {
        cents: cents.map(|c| c as i64),
        currency,
        interval,
        stripe_price,
    })
}

/// A time given as `hours` (decimals allowed) or as whole `minutes`, not both, in ms; as many
/// minutes as hours are allowed.
fn hours_or_minutes(
    s: &mut Section<'_>,
    hours: &'static str,
    minutes: &'static str,
) -> Option<i64> {
    let h = s.opt_hours_ms(hours);
    let m = s.opt_uint(minutes).filter(|&m| {
        let ok = m <= 60_000_000;
        if !ok {
            s.error(minutes, &format!("must be at most 60000000, not {m}"));
        }
        ok
    });
    if h.is_some() && m.is_some() {
        s.error(minutes, &format!("give {hours} or {minutes}, not both"));
    }
    h.or(m.map(|m| m as i64 * 60_000))
}

pub(super) fn default_plans() -> Vec<Plan> {
    const MB: u64 = 1024 * 1024;
    // the minutes are what each plan gives a month (spent before prepaid hours), not a
    // ceiling on them
    let plan = |name: &str, minutes: u64, body_mb: u64, concurrent: u64| Plan {
        name: name.into(),
        max_concurrent: Some(concurrent),
        max_body_bytes: Some(body_mb * MB),
        included_ms: Some(minutes as i64 * 60_000),
        ..Plan::default()
    };
    vec![
        Plan {
            requests_per_hour: Some(50),
            requests_per_day: Some(200),
            ..plan("free", 30, 25, 1)
        },
        Plan {
            requests_per_minute: Some(60),
            requests_per_day: Some(5_000),
            ..plan("starter", 150, 100, 2)
        },
        Plan {
            requests_per_second: Some(10),
            requests_per_day: Some(50_000),
            ..plan("pro", 500, 500, 5)
        },
        Plan {
            requests_per_second: Some(50),
            ..plan("enterprise", 2_000, 1_024, 10)
        },
        // guests have no balance: their minutes are a ceiling
        Plan {
            requests_per_day: Some(5),
            period_ms: Some(10 * 60_000),
            included_ms: None,
            ..plan("guest", 0, 25, 1)
        },
    ]
}
