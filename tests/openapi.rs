//! The admin API against its OpenAPI document, on the real binary: the document is served
//! without a token, is the checked-in `docs/openapi.json`, and validates as OpenAPI 3.1
//! (`openapi-spec-validator`); then Schemathesis (both from PyPI, installed by
//! scripts/setup.sh) fuzzes every operation with the operator's token and a customer's key, and
//! checks that nothing answers 5xx, every answer matches the document (status, content type,
//! headers, body), malformed input is refused, no operation ignores its credentials, and a
//! refused request writes nothing (the hooks in tests/schemathesis/hooks.py digest the SQLite
//! file around each call). Before the run the customer has sessions, access logs, daily
//! rollups, alerts and a paid payment, so the answers that list them are checked with rows in
//! them, not only empty.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::stripe::FakeStripe;
use common::*;
use serde_json::{json, Value};

/// The virtualenv scripts/setup.sh installs Schemathesis and openapi-spec-validator into.
fn venv_bin(tool: &str) -> PathBuf {
    let venv = std::env::var_os("TOLLGATE_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME").expect("HOME is set");
            Path::new(&home).join(".cache/tollgate/venv")
        });
    let bin = venv.join("bin").join(tool);
    assert!(
        bin.exists(),
        "{} is missing: ./scripts/setup.sh installs it",
        bin.display()
    );
    bin
}

fn checked_in_document() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/openapi.json");
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// The Schemathesis config: the credentials per security scheme, and the records that exist
/// (licenses and a Checkout Session) mixed into the generated ids.
fn schemathesis_config(customer_key: &str, ids: &[i64], session_id: &str) -> String {
    let ids: Vec<String> = ids.iter().map(i64::to_string).collect();
    format!(
        r#"
[auth.openapi.admin_token]
bearer = "{ADMIN_TOKEN}"
[auth.openapi.license_key]
api_key = "{customer_key}"
[auth.openapi.license_key_query]
api_key = "{customer_key}"

[dictionaries.licenses]
values = [{ids}]
[dictionaries.sessions]
values = ["{session_id}"]

[parameters]
"path.id" = {{ dictionary = "licenses", probability = 0.5 }}
"query.session_id" = {{ dictionary = "sessions", probability = 0.5 }}
"#,
        ids = ids.join(", ")
    )
}

struct Run {
    ok: bool,
    output: String,
}

/// One Schemathesis run over every operation, with a fixed seed and a bounded number of cases.
fn schemathesis(
    dir: &Path,
    gw: &Gateway,
    customer_id: i64,
    checks: &str,
    examples: u32,
    stats: &Path,
) -> Run {
    let out = Command::new(venv_bin("schemathesis"))
        .current_dir(dir)
        .env("SCHEMATHESIS_HOOKS", "hooks")
        .env(
            "PYTHONPATH",
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/schemathesis"),
        )
        .env("TOLLGATE_FUZZ_DB", gw.db.as_os_str())
        .env("TOLLGATE_FUZZ_STATS", stats)
        .env("TOLLGATE_FUZZ_WEBHOOK_SECRET", WEBHOOK_SECRET)
        .env("TOLLGATE_FUZZ_CUSTOMER_ID", customer_id.to_string())
        .env("SCHEMATHESIS_TELEMETRY", "false")
        .env("NO_COLOR", "1")
        .args(["--config-file", "schemathesis.toml", "run"])
        .arg(gw.admin_url("/api/openapi.json"))
        .args(["--checks", checks])
        .args(["--max-examples", &examples.to_string()])
        .args(["--seed", "20261201"])
        .args(["--workers", "1"])
        .args(["--phases", "examples,coverage,fuzzing"])
        .args(["--request-timeout", "10"])
        .args(["--suppress-health-check", "all"])
        .output()
        .expect("schemathesis runs");
    Run {
        ok: out.status.success(),
        output: String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr),
    }
}

/// Cases per operation: 25 in the suite (about 10 s); `TOLLGATE_FUZZ_EXAMPLES=300` for a
/// deeper run by hand (about 2.5 min).
fn examples() -> u32 {
    std::env::var("TOLLGATE_FUZZ_EXAMPLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(25)
}

/// What the hooks counted: calls, refusals compared against the database, statuses.
fn stats(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).expect("the hooks wrote their counts")).unwrap()
}

fn seen(stats: &Value, method_path_status: &str) -> i64 {
    stats["statuses"][method_path_status].as_i64().unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_keeps_to_its_openapi_document_under_schemathesis() {
    let upstream = Upstream::start().await;
    let stripe = FakeStripe::start(STRIPE_KEY).await;
    let gw = Gateway::start(
        upstream.addr,
        Settings {
            stripe_api_base: Some(stripe.api_base()),
            plans: "[[plans]]\nname = \"free\"\n[[plans]]\nname = \"pro\"\n\
                    requests_per_minute = 600\nperiod_hours = 100\nperiod_requests = 5\n\
                    max_upload_bytes_per_day = 1000000\n"
                .into(),
            // the hooks give each call its own client address (see hooks.py)
            proxy_extra: "trusted_proxies = [\"127.0.0.1\"]".into(),
            ..Settings::default()
        },
    )
    .await;
    let c = client();

    // the document: served without a token, the checked-in copy, valid OpenAPI 3.1
    let r = c
        .get(gw.admin_url("/api/openapi.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/json");
    let served: Value = r.json().await.unwrap();
    assert_eq!(served["openapi"], "3.1.0");
    assert!(
        served == checked_in_document(),
        "docs/openapi.json is not what the binary serves: run \
         `UPDATE_OPENAPI=1 cargo test -p tollgate-admin openapi`"
    );
    let dir = tempfile::tempdir().unwrap();
    let doc_file = dir.path().join("openapi.json");
    std::fs::write(&doc_file, serde_json::to_vec(&served).unwrap()).unwrap();
    let v = Command::new(venv_bin("openapi-spec-validator"))
        .args(["--schema", "3.1"])
        .arg(&doc_file)
        .output()
        .unwrap();
    assert!(
        v.status.success(),
        "openapi-spec-validator: {}{}",
        String::from_utf8_lossy(&v.stdout),
        String::from_utf8_lossy(&v.stderr)
    );

    // the records the operations reach: two licenses for the operator's endpoints, the
    // customer's, and a Checkout Session of the customer's for the success page
    let (first, _) = gw.create_key("first", "2");
    let (second, _) = gw.create_key("second", "2");
    let (customer, key) = gw
        .create_license(&c, json!({"name": "customer", "hours": 10, "plan": "pro"}))
        .await;
    // five requests: the period's allowance, so alerts at 80 % and 100 %
    for i in 0..5 {
        let r = keyed_get(&c, &gw.url(&format!("/app/{i}")), &key).await;
        assert_eq!(r.status(), 200);
    }
    let logged = format!("SELECT count(*) FROM access_logs WHERE license_id = {customer}");
    gw.wait_for(&logged, 5).await;
    gw.wait_for("SELECT count(*) FROM usage_alerts", 2).await;
    let r = c
        .post(gw.admin_url("/payments/create-checkout"))
        .header("x-license-key", &key)
        .json(&json!({"package_id": "small"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let session: Value = r.json().await.unwrap();
    let session_id = session["session_id"].as_str().unwrap();
    stripe.mark_paid(session_id);
    let r = c
        .get(gw.admin_url(&format!("/payments/success?session_id={session_id}")))
        .header("x-license-key", &key)
        .header("accept", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let paid: Value = r.json().await.unwrap();
    assert_eq!(paid["status"], "paid");
    std::fs::write(
        dir.path().join("schemathesis.toml"),
        schemathesis_config(&key, &[first, second, customer], session_id),
    )
    .unwrap();

    let licenses_before = gw.count("SELECT count(*) FROM licenses");
    let run_stats = dir.path().join("stats.json");
    let checks = "not_a_server_error,status_code_conformance,content_type_conformance,\
                  response_headers_conformance,response_schema_conformance,\
                  negative_data_rejection,missing_required_header,unsupported_method,\
                  ignored_auth,nothing_written_when_refused";
    let run = schemathesis(dir.path(), &gw, customer, checks, examples(), &run_stats);
    assert!(run.ok, "schemathesis found failures:\n{}", run.output);
    let s = stats(&run_stats);
    eprintln!("schemathesis: {}", s);
    // it really ran: refusals of every kind were compared against the database, and the
    // operations were reached with input they accept, on records that exist
    assert!(s.get("changed").is_none(), "{s}");
    assert!(s["compared"].as_i64().unwrap() >= 500, "{s}");
    assert!(s["succeeded"].as_i64().unwrap() >= 300, "{s}");
    assert!(s["signed"].as_i64().unwrap() >= 10, "{s}");
    for reached in [
        "POST /api/licenses 201",
        "POST /api/licenses 400",
        "POST /api/licenses 401",
        "GET /api/licenses 200",
        "GET /api/licenses/{id} 200",
        "PATCH /api/licenses/{id} 200",
        "PATCH /api/licenses/{id} 400",
        "POST /api/licenses/{id}/hours 200",
        "POST /api/licenses/{id}/hours 404",
        "POST /api/licenses/{id}/usage 200",
        "POST /api/licenses/{id}/revoke 200",
        "POST /api/licenses/{id}/rotate 200",
        "GET /api/licenses/{id}/history 200",
        "GET /api/licenses/{id}/stats 200",
        "GET /api/stats 200",
        "GET /api/export/{file} 200",
        "GET /payments/packages 200",
        "POST /payments/create-checkout 200",
        "POST /payments/create-checkout 400",
        "GET /payments/success 200",
        "POST /payments/webhook 200",
        "POST /payments/webhook 400",
        "GET /payments/balance 200",
        "GET /payments/balance 401",
        "GET /payments/history 200",
        "GET /usage/me 200",
        "GET /usage/limits 200",
        "GET /usage/alerts 200",
    ] {
        assert!(seen(&s, reached) > 0, "never {reached}: {s}");
    }
    assert!(gw.count("SELECT count(*) FROM licenses") > licenses_before);
    // the customer kept its key throughout (the hooks keep revoke, rotate and PATCH off it)
    let r = c
        .get(gw.admin_url("/usage/me"))
        .header("x-license-key", &key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(
        gw.log().lines().all(|l| !l.contains("panicked")),
        "{}",
        gw.log()
    );
}
