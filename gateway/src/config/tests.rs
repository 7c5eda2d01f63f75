//! The config's parsing and validation: defaults, every key's errors, the plans.

use super::*;

#[test]
fn empty_file_gives_the_documented_defaults() {
    let c = Config::parse("").unwrap();
    assert_eq!(c.proxy.listen.to_string(), "127.0.0.1:8080");
    assert_eq!(c.storage.flush_interval, Duration::from_millis(1000));
    assert_eq!(c.metering.mode, MeteringMode::Session);
    assert_eq!(c.metering.idle_timeout_ms, 300_000);
    assert_eq!(c.packages.len(), 4);
    assert_eq!(c.packages[0].price_cents, 2_500);
    assert!(c.plan("free").is_some());
}

#[test]
fn the_header_timeout_defaults_to_ten_seconds_and_zero_turns_it_off() {
    let c = Config::parse("").unwrap();
    assert_eq!(
        c.proxy.downstream_header_timeout,
        Some(Duration::from_secs(10))
    );
    let c = Config::parse("[proxy]\ndownstream_header_timeout_ms = 0\n").unwrap();
    assert_eq!(c.proxy.downstream_header_timeout, None);
}

/// Found while writing the `config_parser` fuzz target's oracle: minutes past i64's range
/// in milliseconds overflowed (a panic in debug builds, a wrapped period in release).
#[test]
fn fuzz_regressions_a_huge_period_is_an_error_not_an_overflow() {
    for minutes in ["9223372036854775807", "153722867280913", "60000001"] {
        let text = format!("[[plans]]\nname = \"free\"\nperiod_minutes = {minutes}\n");
        let e = Config::parse(&text).unwrap_err();
        assert!(e.to_string().contains("period_minutes"), "{e}");
    }
    let c = Config::parse("[[plans]]\nname = \"free\"\nperiod_minutes = 60000000\n").unwrap();
    assert_eq!(c.plans[0].period_ms, Some(60_000_000 * 60_000));
}

#[test]
fn every_bad_key_is_reported_at_once() {
    let text = r#"
        [proxy]
        listen = "nope"
        threads = 0
        strip_kee = true
        [storage]
        flush_interval_ms = "fast"
        [metering]
        mode = "hourly"
        [[plans]]
        name = "free"
        max_concurrent = -1
        [bogus]
    "#;
    let errors = Config::parse(text).unwrap_err().0;
    let joined = errors.join("\n");
    for expected in [
        "proxy.listen",
        "proxy.threads",
        "proxy.strip_kee: unknown key",
        "storage.flush_interval_ms: must be an integer",
        "metering.mode",
        "plans[0].max_concurrent",
        "bogus: unknown section",
    ] {
        assert!(
            joined.contains(expected),
            "missing {expected:?} in:\n{joined}"
        );
    }
    assert_eq!(errors.len(), 7, "{joined}");
}

#[test]
fn the_shipped_config_file_is_valid_and_matches_the_defaults() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../conf/tollgate.toml");
    let c = Config::load(&path).unwrap();
    let d = Config::default();
    assert_eq!(c.proxy.listen, d.proxy.listen);
    assert_eq!(c.storage.flush_interval, d.storage.flush_interval);
    assert_eq!(c.metering.idle_timeout_ms, d.metering.idle_timeout_ms);
    assert_eq!(c.packages.len(), d.packages.len());
    assert_eq!(c.plans.len(), d.plans.len());
}

#[test]
fn the_storage_backend_is_sqlite_or_postgres_and_a_url_in_the_file_holds_no_password() {
    let c = Config::parse("").unwrap();
    assert_eq!(c.storage.backend, StoreKind::Sqlite);
    let c = Config::parse(
        "[storage]\nbackend = \"postgres\"\nurl = \"postgres://gate@db.internal:5432/tollgate\"",
    )
    .unwrap();
    assert_eq!(c.storage.backend, StoreKind::Postgres);
    assert_eq!(
        c.storage.url.as_deref(),
        Some("postgres://gate@db.internal:5432/tollgate")
    );
    let e = Config::parse("[storage]\nbackend = \"mysql\"").unwrap_err();
    assert!(
        e.0.iter().any(|m| m.contains("\"sqlite\" or \"postgres\"")),
        "{e:?}"
    );
    let e = Config::parse("[storage]\nurl = \"postgres://gate:hunter2@db/tollgate\"").unwrap_err();
    let text = format!("{e:?}");
    assert!(text.contains("TOLLGATE_DATABASE_URL"), "{text}");
    assert!(
        !text.contains("hunter2"),
        "the password is not repeated: {text}"
    );
    let e = Config::parse("[storage]\nurl = \"mysql://db/x\"").unwrap_err();
    assert!(e.0.iter().any(|m| m.contains("postgres:// URL")), "{e:?}");
}

const METERED: &str = r#"
[[meters]]
name = "audio_seconds"
label = "seconds of audio"
price_ms = 1000
max_per_request = 3600

[[meters]]
name = "files"

[[routes]]
path = "/transcribe"
methods = ["post"]
charge = "reported"
meters = ["audio_seconds", "files"]
reserve = { audio_seconds = 600 }
charge_statuses = ["2xx", "4xx"]

[[routes]]
path = "/thumbs/*"
charge = "fixed"
price_ms = 500
requests_cost = 3

[[routes]]
path = "/gpu/*"
time_multiplier = 2.5

[[plans]]
name = "free"
period_units = { audio_seconds = 1800 }
"#;

#[test]
fn meters_routes_and_a_plans_unit_allowance_are_read() {
    let c = Config::parse(METERED).unwrap();
    assert_eq!(c.meters.len(), 2);
    assert_eq!(c.meters[1].label, "files");
    assert_eq!(c.meters[1].price_ms, 0, "counted, not charged");
    let t = &c.routes[0];
    assert_eq!(t.methods, ["POST"]);
    assert_eq!(
        (t.charge, t.meters.clone()),
        (ChargeMode::Reported, vec![0, 1])
    );
    assert_eq!(t.reserve[0], 600);
    assert_eq!(t.charge_statuses, (1 << 2) | (1 << 4));
    assert_eq!(
        (c.routes[1].charge, c.routes[1].price_ms),
        (ChargeMode::Fixed, 500)
    );
    assert_eq!(
        (c.routes[0].requests_cost, c.routes[1].requests_cost),
        (1, 3)
    );
    assert_eq!(c.routes[2].time_multiplier_permille, Some(2_500));
    assert_eq!(c.routes[0].time_multiplier_permille, None);
    // free_paths come after, as free routes
    assert_eq!(c.routes.len(), 3);
    assert_eq!(c.plans[0].period_units[0], 1_800);
    let c = Config::parse("[proxy]\nfree_paths = [\"/health\"]\n").unwrap();
    assert_eq!(c.routes, [Route::free("/health")]);
}

#[test]
fn every_mistake_in_meters_and_routes_is_named() {
    let bad = r#"
[[meters]]
name = "seconds"

[[meters]]
name = "Tokens"

[[meters]]
name = "audio_seconds"
max_per_request = 100

[[routes]]
path = "/a*b"

[[routes]]
path = "/x"
charge = "reported"

[[routes]]
path = "/y"
charge = "reported"
meters = ["audio_seconds", "nope"]
reserve = { audio_seconds = 101 }

[[routes]]
path = "/y"
charge = "metered"
price_ms = 5
charge_statuses = ["2xx", "6xx"]
report_from = "trailer"

[[routes]]
path = "/z"
charge = "reported"
meters = ["audio_seconds"]
report_from = "trailer"

[[routes]]
path = "/w"
charge = "reported"
meters = ["audio_seconds"]
report_from = "footer"

[[plans]]
name = "free"
period_units = { requests = 60, files = 1 }
"#;
    let e = Config::parse(bad).unwrap_err().0.join("\n");
    for want in [
        "meters[0].name: \"seconds\" is a built-in meter",
        "meters[1].name: must be lower-case letters",
        "routes[0].path: a * may only end the path",
        "routes[1].meters: a `charge = \"reported\"` route lists the meters",
        "routes[2].meters: \"nope\" is not a meter",
        "routes[2].reserve.audio_seconds: must be between 0 and 100, not 101",
        "routes[3].price_ms: is the price of a `charge = \"fixed\"` route only",
        "routes[3].charge_statuses: \"6xx\" is not a status class",
        "routes[3].report_from: only a `charge = \"reported\"` route takes reports",
        "routes: \"/z\" takes reports from trailers, which need proxy.upstream_h2 = true",
        "routes[5].report_from: must be \"header\", \"trailer\" or \"openai\", not \"footer\"",
        "routes: \"/y\" is given twice for the same methods",
        "plans[0].period_units.requests: is built in",
        "plans[0].period_units.files: is not a meter",
    ] {
        assert!(e.contains(want), "missing {want:?} in:\n{e}");
    }
}

#[test]
fn check_config_notes_a_reservation_no_plan_period_can_hold() {
    let text = r#"
[[meters]]
name = "tokens"
max_per_request = 5000

[[routes]]
path = "/v1/*"
charge = "reported"
meters = ["tokens"]
reserve = { tokens = 1000 }

[[plans]]
name = "free"
period_units = { tokens = 100 }

[[plans]]
name = "pro"
period_units = { tokens = 100000 }
"#;
    let notes = Config::parse(text).unwrap().notes().join("\n");
    assert!(
        notes.contains(
            "routes: \"/v1/*\" reserves 1000 tokens a call, more than plan \"free\" allows a \
             period (period_units.tokens = 100)"
        ),
        "{notes}"
    );
    assert!(!notes.contains("\"pro\""), "{notes}");
}

#[test]
fn a_plans_included_time_is_read_and_checked_against_its_ceiling_and_its_store() {
    let c = Config::parse("[[plans]]\nname = \"free\"\nincluded_minutes = 30\n").unwrap();
    assert_eq!(c.plans[0].included_ms, Some(1_800_000));
    let c = Config::parse("[[plans]]\nname = \"free\"\nincluded_hours = 1.5\n").unwrap();
    assert_eq!(c.plans[0].included_ms, Some(5_400_000));
    for (text, named) in [
        ("included_minutes = 30\nincluded_hours = 1", "not both"),
        (
            "included_minutes = 30\nperiod_minutes = 20",
            "below the 30 min",
        ),
    ] {
        let e = Config::parse(&format!("[[plans]]\nname = \"free\"\n{text}\n")).unwrap_err();
        assert!(e.to_string().contains(named), "{e}");
    }
    // on several nodes too: leased with the balance
    let c = Config::parse(
        "[storage]\nbackend = \"postgres\"\nurl = \"postgres://h/db\"\n\
         [[plans]]\nname = \"free\"\nincluded_minutes = 30\n",
    )
    .unwrap();
    assert_eq!(c.plans[0].included_ms, Some(1_800_000));
}

#[test]
fn a_plans_included_requests_and_units_are_read_and_checked_against_its_ceilings() {
    let meters = "[[meters]]\nname = \"audio_seconds\"\nprice_ms = 1000\nmax_per_request = 60\n";
    let c = Config::parse(&format!(
        "{meters}[[plans]]\nname = \"free\"\nincluded_requests = 100\n\
         included_units = {{ audio_seconds = 1800 }}\n"
    ))
    .unwrap();
    assert_eq!(c.plans[0].included_requests, Some(100));
    assert_eq!(c.plans[0].included_units[0], 1_800);
    for (text, named) in [
        (
            "included_requests = 100\nperiod_requests = 50",
            "a ceiling of 50 requests is below the 100",
        ),
        (
            "included_units = { audio_seconds = 1800 }\nperiod_units = { audio_seconds = 60 }",
            "period_units.audio_seconds",
        ),
        ("included_units = { seconds = 60 }", "included_minutes"),
        ("included_units = { pages = 60 }", "is not a meter"),
    ] {
        let e =
            Config::parse(&format!("{meters}[[plans]]\nname = \"free\"\n{text}\n")).unwrap_err();
        assert!(e.to_string().contains(named), "{text}: {e}");
    }
}

#[test]
fn checkouts_return_to_the_payment_page_on_the_admin_listener_unless_told() {
    let c = Config::parse("[admin]\nlisten = \"0.0.0.0:28181\"\n").unwrap();
    assert_eq!(c.stripe.cancel_url, "http://127.0.0.1:28181/payments");
    assert_eq!(
        c.stripe.success_url,
        "http://127.0.0.1:28181/payments/success?session_id={CHECKOUT_SESSION_ID}"
    );
    assert_eq!(c.upgrade_url(), "http://127.0.0.1:28181/payments");
    let c = Config::parse("[stripe]\ncancel_url = \"https://pay.example.com/\"\n").unwrap();
    assert_eq!(c.stripe.cancel_url, "https://pay.example.com");
}

#[test]
fn the_access_log_keeps_all_errors_or_a_sample() {
    use crate::config::AccessLogRows;
    let rows = |v: &str| Config::parse(&format!("[storage]\naccess_log = \"{v}\"\n"));
    assert_eq!(rows("all").unwrap().storage.access_log, AccessLogRows::All);
    assert_eq!(
        rows("errors").unwrap().storage.access_log,
        AccessLogRows::Errors
    );
    assert_eq!(
        rows("sample:100").unwrap().storage.access_log,
        AccessLogRows::Sample(100)
    );
    for bad in ["some", "sample:1", "sample:x"] {
        let e = rows(bad).unwrap_err().to_string();
        assert!(e.contains("sample:N"), "{bad}: {e}");
    }
    let errors = AccessLogRows::Errors;
    assert!(!errors.keeps(200, "ok", 1) && errors.keeps(402, "insufficient_balance", 1));
    assert!(errors.keeps(502, "upstream_error", 1) && errors.keeps(200, "client_closed", 1));
    let sample = AccessLogRows::Sample(10);
    let kept = (1..=100).filter(|&n| sample.keeps(200, "ok", n)).count();
    assert_eq!(kept, 10);
}
