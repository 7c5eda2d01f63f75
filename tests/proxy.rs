//! The request path against a real upstream and the real gateway: admission, denials, what the
//! upstream sees, free paths, upstream failures.

mod common;

use std::time::Duration;

use common::*;
use gateway::ledger::now_ms;
use serde_json::Value;

async fn error_code(resp: reqwest::Response) -> (u16, String) {
    let status = resp.status().as_u16();
    let ct = resp
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string());
    let body: Value = resp.json().await.expect("a JSON error body");
    assert_eq!(ct.as_deref(), Some("application/json"));
    assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()));
    (status, body["error"].as_str().unwrap().to_string())
}

async fn denied_requests_get_their_json_error_and_never_reach_the_upstream(store: Store) {
    let up = Upstream::start().await;
    let settings = Settings {
        store,
        ..Settings::default()
    };
    let gw = Gateway::start(up.addr, settings).await;
    let c = client();

    let (revoked_id, revoked) = gw.create_key("revoked", "1");
    assert!(gw
        .cli(&["keys", "revoke", &revoked_id.to_string()])
        .status
        .success());
    let (_, empty) = gw.create_key("empty", "0");
    // expired a minute ago: written behind the API, which refuses an expiry in the past
    let expired = {
        let (id, key) = gw.create_key("expired", "1");
        let past = now_ms() - 60_000;
        gw.execute(&format!(
            "UPDATE licenses SET expires_at = {past} WHERE id = {id}"
        ));
        key
    };

    let cases = [
        (None, 401, "missing_license_key"),
        (
            Some("tg_not_a_real_key_0000000000000000"),
            401,
            "invalid_license_key",
        ),
        (Some(revoked.as_str()), 403, "license_revoked"),
        (Some(expired.as_str()), 403, "license_expired"),
        (Some(empty.as_str()), 402, "insufficient_balance"),
    ];
    for (key, status, code) in cases {
        let mut req = c.get(gw.url("/app/data"));
        if let Some(k) = key {
            req = req.header("X-License-Key", k);
        }
        let got = error_code(req.send().await.unwrap()).await;
        assert_eq!(got, (status, code.to_string()), "key {key:?}");
    }
    // a key longer than any issued key, and one in the query string, are judged the same way
    let long = "x".repeat(500);
    let got = error_code(
        c.get(gw.url("/app"))
            .header("X-License-Key", long)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(got, (401, "invalid_license_key".into()));
    let broke: Value = c
        .get(gw.url("/app"))
        .header("X-License-Key", &empty)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(broke["hours_remaining"], 0.0);
    assert_eq!(up.count(), 0, "no denied request reached the upstream");

    // denials are logged, with their code, and charge nothing
    gw.wait_for(
        "SELECT count(*) FROM access_logs WHERE path != '/__ready'",
        7,
    )
    .await;
    assert_eq!(
        gw.count("SELECT count(*) FROM access_logs WHERE path != '/__ready' AND status >= 400 AND outcome != 'ok'"),
        7
    );
    assert_eq!(
        gw.count("SELECT count(*) FROM usage_history WHERE kind = 'usage'"),
        0
    );
}

async fn a_good_key_passes_and_the_upstream_sees_the_license_but_never_the_key(store: Store) {
    let up = Upstream::start().await;
    let settings = Settings {
        store,
        ..Settings::default()
    };
    let gw = Gateway::start(up.addr, settings).await;
    let c = client();
    let (id, key) = gw.create_key("Ada", "2");

    // header
    let resp = c
        .get(gw.url("/app/x?a=1"))
        .header("X-License-Key", &key)
        .header("X-Tollgate-License-Id", "999")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let session = resp.headers()["x-usage-session"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(session.starts_with("ses_"));
    let remaining: i64 = resp.headers()["x-balance-remaining-seconds"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((7_190..=7_200).contains(&remaining), "{remaining}");
    assert_eq!(resp.text().await.unwrap(), "hello from upstream");
    let seen = up.last();
    assert_eq!(
        seen.headers["x-tollgate-license-id"],
        id.to_string(),
        "not spoofable"
    );
    assert_eq!(seen.headers["x-tollgate-plan"], "free");
    assert!(!seen.headers.contains_key("x-license-key"));
    assert_eq!(seen.query.as_deref(), Some("a=1"));

    // bearer: the Authorization header is the key, so it goes too
    let resp = c
        .get(gw.url("/app/y"))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let seen = up.last();
    assert!(!seen.headers.contains_key("authorization"));
    assert_eq!(seen.headers["x-tollgate-license-id"], id.to_string());

    // query parameter: removed, the other parameters kept in order
    let resp = c
        .get(gw.url(&format!("/app/z?x=1&license_key={key}&y=2")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-usage-session"].to_str().unwrap(), session);
    let seen = up.last();
    assert_eq!(seen.path, "/app/z");
    assert_eq!(seen.query.as_deref(), Some("x=1&y=2"));

    // the app's own Authorization header survives when the key came from X-License-Key
    c.get(gw.url("/app"))
        .header("X-License-Key", &key)
        .header("Authorization", "Basic YXBwOnNlY3JldA==")
        .send()
        .await
        .unwrap();
    assert_eq!(up.last().headers["authorization"], "Basic YXBwOnNlY3JldA==");

    for s in up.seen.lock().unwrap().iter() {
        let all = format!("{s:?}");
        assert!(!all.contains(&key), "the key reached the upstream: {all}");
    }
    gw.wait_for(
        "SELECT count(*) FROM access_logs WHERE path != '/__ready'",
        4,
    )
    .await;
    gw.wait_for(
        &format!("SELECT coalesce(sum(requests), 0) FROM usage_history WHERE license_id = {id}"),
        4,
    )
    .await;
    assert_eq!(
        gw.count("SELECT count(*) FROM access_logs WHERE path != '/__ready' AND path LIKE '%tg_%'"),
        0
    );
}

// the proxy's codes and metering, on SQLite and on PostgreSQL
on_each_store!(
    denied_requests_get_their_json_error_and_never_reach_the_upstream,
    a_good_key_passes_and_the_upstream_sees_the_license_but_never_the_key,
    free_paths_pass_without_a_key_and_are_not_metered,
    an_unreachable_upstream_gives_502_and_is_not_charged,
    cli_changes_reach_a_running_gateway_within_seconds,
);

async fn free_paths_pass_without_a_key_and_are_not_metered(store: Store) {
    let up = Upstream::start().await;
    let gw = Gateway::start(up.addr, Settings::on(store)).await;
    let resp = client()
        .get(gw.url("/public/logo.png"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().get("x-usage-session").is_none());
    assert_eq!(up.count(), 1);
    gw.wait_for(
        "SELECT count(*) FROM access_logs WHERE path != '/__ready' AND outcome = 'free'",
        1,
    )
    .await;
    assert_eq!(gw.count("SELECT count(*) FROM usage_history"), 0);
}

async fn an_unreachable_upstream_gives_502_and_is_not_charged(store: Store) {
    let dead: std::net::SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let gw = Gateway::start(dead, Settings::on(store)).await;
    let (id, key) = gw.create_key("Ada", "1");
    let resp = client()
        .get(gw.url("/app"))
        .header("X-License-Key", &key)
        .send()
        .await
        .unwrap();
    assert_eq!(error_code(resp).await, (502, "upstream_unavailable".into()));
    gw.wait_for(
        "SELECT count(*) FROM access_logs WHERE path != '/__ready' AND outcome = 'upstream_error'",
        1,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let b = gw.books(id);
    assert_eq!(b.balance_ms, 3_600_000, "{b:?}");
    assert_eq!(b.usage_requests, 0);
}

async fn cli_changes_reach_a_running_gateway_within_seconds(store: Store) {
    let up = Upstream::start().await;
    let gw = Gateway::start(up.addr, Settings::on(store)).await;
    let c = client();
    let (id, key) = gw.create_key("Ada", "0");
    let get = || c.get(gw.url("/app")).header("X-License-Key", &key).send();
    assert_eq!(get().await.unwrap().status(), 402);

    assert!(gw
        .cli(&["keys", "add-hours", &id.to_string(), "1.5"])
        .status
        .success());
    let passes_within = |want: u16| {
        let get = &get;
        async move {
            let deadline = std::time::Instant::now() + Duration::from_secs(3);
            loop {
                if get().await.unwrap().status() == want {
                    return true;
                }
                if std::time::Instant::now() > deadline {
                    return false;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    assert!(passes_within(200).await, "credit not seen within 3 s");

    let out = gw.cli(&["keys", "rotate", &id.to_string(), "--json"]);
    let new_key = serde_json::from_slice::<Value>(&out.stdout).unwrap()["license_key"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        passes_within(401).await,
        "rotated key still works after 3 s"
    );
    let resp = c
        .get(gw.url("/app"))
        .header("X-License-Key", &new_key)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);

    assert!(gw
        .cli(&["keys", "revoke", &id.to_string()])
        .status
        .success());
    let denied = {
        let deadline = std::time::Instant::now() + Duration::from_secs(3);
        loop {
            let s = c
                .get(gw.url("/app"))
                .header("X-License-Key", &new_key)
                .send()
                .await
                .unwrap()
                .status();
            if s == 403 || std::time::Instant::now() > deadline {
                break s;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    assert_eq!(denied, 403);
}

#[tokio::test(flavor = "multi_thread")]
async fn json_logs_at_debug_level_never_carry_a_key_or_a_secret() {
    let up = Upstream::start().await;
    let dead = up.addr;
    drop(up);
    let mut s = Settings {
        extra: "[log]\nformat = \"json\"\n".into(),
        ..Settings::default()
    };
    s.env.push(("RUST_LOG", "debug".into()));
    let gw = Gateway::start(dead, s).await;
    let (_, key) = gw.create_key("Ada", "1");
    let c = client();
    // the app is down: Pingora logs the failed request, with a summary of it
    let r = c
        .get(gw.url(&format!("/work?a=1&license_key={key}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    let r = c
        .get(gw.url("/work"))
        .header("X-License-Key", &key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    let _ = gw
        .api(&c, reqwest::Method::GET, "/api/licenses")
        .send()
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let log = gw.log();
    for secret in [key.as_str(), ADMIN_TOKEN, STRIPE_KEY, WEBHOOK_SECRET] {
        assert!(!log.contains(secret), "{secret} is in the log");
    }
    assert!(
        log.contains("[redacted]"),
        "no request summary logged:\n{log}"
    );
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(lines.len() > 5);
    for line in lines {
        let v: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(
            v["level"].is_string() && v["timestamp"].is_string(),
            "{line}"
        );
    }
}

/// Issue 16, item 7. Before the fix the app saw every client as the gateway, over http: no
/// X-Forwarded-For, -Proto or -Host, and access logs and guests had the load balancer's
/// address.
#[tokio::test(flavor = "multi_thread")]
async fn the_app_learns_the_client_directly_and_behind_a_trusted_proxy() {
    let up = Upstream::start().await;
    let c = client();
    // direct: whatever the client claims, the app hears what the gateway saw
    let gw = Gateway::start(up.addr, Settings::default()).await;
    let (_, key) = gw.create_key("Ada", "1");
    let r = c
        .get(gw.url("/app"))
        .header("X-License-Key", &key)
        .header("X-Forwarded-For", "6.6.6.6")
        .header("X-Forwarded-Proto", "https")
        .header("Forwarded", "for=6.6.6.6")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let seen = up.last();
    assert_eq!(seen.headers["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen.headers["x-forwarded-proto"], "http");
    assert_eq!(seen.headers["x-forwarded-host"], gw.proxy.to_string());
    assert!(!seen.headers.contains_key("forwarded"));
    drop(gw);

    // behind a load balancer on 127.0.0.1 that the gateway trusts
    let gw = Gateway::start(
        up.addr,
        Settings {
            proxy_extra: "trusted_proxies = [\"127.0.0.1\"]\nanonymous = \"guest\"".into(),
            plans: "[[plans]]\nname = \"free\"\n[[plans]]\nname = \"guest\"\n".into(),
            ..Settings::default()
        },
    )
    .await;
    let (id2, key) = gw.create_key("Ada", "1");
    let forwarded = |r: reqwest::RequestBuilder| {
        r.header("X-Forwarded-For", "6.6.6.6, 203.0.113.7")
            .header("X-Forwarded-Proto", "https")
            .header("X-Forwarded-Host", "app.example.com")
    };
    let r = forwarded(c.get(gw.url("/app")).header("X-License-Key", &key))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let seen = up.last();
    assert_eq!(
        seen.headers["x-forwarded-for"],
        "6.6.6.6, 203.0.113.7, 127.0.0.1"
    );
    assert_eq!(seen.headers["x-forwarded-proto"], "https");
    assert_eq!(seen.headers["x-forwarded-host"], "app.example.com");
    // a guest is known by the forwarded client, not the balancer
    let r = forwarded(c.get(gw.url("/app"))).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(up.last().headers["x-tollgate-guest"], "203.0.113.7");
    gw.wait_for(
        &format!(
            "SELECT count(*) FROM access_logs WHERE license_id = {id2} AND client_ip = '203.0.113.7'"
        ),
        1,
    )
    .await;
}

/// Issue 21, items 3, 4 and 8. Before the fix a free path forwarded the key (header, Bearer
/// and query), `X_Tollgate_License_Id` reached the app untouched, and `Content-Length: 3, 3`
/// was forwarded as it came.
#[tokio::test(flavor = "multi_thread")]
async fn no_key_and_no_spoofed_identity_reach_the_app_and_two_lengths_are_refused() {
    let up = Upstream::start().await;
    let gw = Gateway::start(up.addr, Settings::default()).await;
    let (id, key) = gw.create_key("Ada", "1");
    let id = id.to_string();
    let c = client();
    // a free path: whichever way the key came, the app never sees it
    for (how, r) in [
        (
            "header",
            c.get(gw.url("/public/a")).header("X-License-Key", &key),
        ),
        ("bearer", c.get(gw.url("/public/b")).bearer_auth(&key)),
        (
            "query",
            c.get(gw.url(&format!("/public/c?x=1&license_key={key}"))),
        ),
    ] {
        assert_eq!(r.send().await.unwrap().status(), 200, "{how}");
        let seen = up.last();
        let everything = format!("{:?} {:?}", seen.headers, seen.query);
        assert!(!everything.contains(&key), "{how}: {everything}");
    }
    // an app's own bearer token on a free path is its business
    let r = c
        .get(gw.url("/public/d"))
        .bearer_auth("app-session-token")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        up.last().headers["authorization"],
        "Bearer app-session-token"
    );
    // identity headers in any spelling are the gateway's alone
    for path in ["/public/e", "/app"] {
        let r = c
            .get(gw.url(path))
            .header("X-License-Key", &key)
            .header("X_Tollgate_License_Id", "999")
            .header("x_tollgate_plan", "enterprise")
            .header("X-Tollgate_Guest", "someone")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let seen: Vec<(String, String)> = up
            .last()
            .headers
            .into_iter()
            .map(|(k, v)| (k.replace('_', "-"), v))
            .collect();
        let values = |name: &str| -> Vec<&str> {
            seen.iter()
                .filter(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
                .collect()
        };
        let (id_want, plan_want): (Vec<&str>, Vec<&str>) = match path {
            "/app" => (vec![id.as_str()], vec!["free"]),
            _ => (vec![], vec![]),
        };
        assert_eq!(values("x-tollgate-license-id"), id_want, "{path}: {seen:?}");
        assert_eq!(values("x-tollgate-plan"), plan_want, "{path}: {seen:?}");
        assert!(values("x-tollgate-guest").is_empty(), "{path}: {seen:?}");
    }
    // two lengths for one body: refused, never forwarded
    let before = up.count();
    let mut s = tokio::net::TcpStream::connect(gw.proxy).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    s.write_all(
        format!(
            "POST /app HTTP/1.1\r\nHost: x\r\nX-License-Key: {key}\r\nContent-Length: 3, 3\r\n\r\nabc"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut answer = String::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut answer)).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("bad_request"), "{answer}");
    assert_eq!(up.count(), before, "the app saw nothing");
}

/// A real app that normalises paths: Python's http.server serving a directory (it decodes
/// `%2e` and `%2f` and resolves `..`). Ended by its pid when dropped.
struct FileApp {
    addr: std::net::SocketAddr,
    child: std::process::Child,
    _dir: tempfile::TempDir,
}

impl FileApp {
    async fn start() -> FileApp {
        let dir = tempfile::tempdir().unwrap();
        for (path, text) in [
            ("public/hello.txt", "hello, everyone"),
            ("private/secret.txt", "the paid file"),
        ] {
            let p = dir.path().join(path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        }
        let port = free_port();
        let child = std::process::Command::new("python3")
            .args([
                "-m",
                "http.server",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
            ])
            .arg("--directory")
            .arg(dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("python3 runs");
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "http.server did not start"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        FileApp {
            addr,
            child,
            _dir: dir,
        }
    }
}

impl Drop for FileApp {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Issue 21, item 2. Before the fix `GET /public/../private/secret.txt` (and `%2e%2e`, and an
/// encoded `/`) matched the free path by its raw prefix and reached the paid file unmetered.
#[tokio::test(flavor = "multi_thread")]
async fn a_free_path_is_no_way_around_the_meter() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let app = FileApp::start().await;
    let gw = Gateway::start(app.addr, Settings::default()).await; // free_paths = ["/public/*"]
    let raw = |target: &'static str| {
        let proxy = gw.proxy;
        async move {
            let mut s = tokio::net::TcpStream::connect(proxy).await.unwrap();
            s.write_all(
                format!("GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
            )
            .await
            .unwrap();
            let mut out = String::new();
            let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out)).await;
            out
        }
    };
    let hello = raw("/public/hello.txt").await;
    assert!(
        hello.get(9..12) == Some("200") && hello.contains("hello, everyone"),
        "{hello}"
    );
    for target in [
        "/public/../private/secret.txt",
        "/public/%2e%2e/private/secret.txt",
        "/public/%2E%2E/private/secret.txt",
        "/public/./../private/secret.txt",
        "/public/..%2fprivate/secret.txt",
        "/public/%2e%2e%2fprivate/secret.txt",
        "/public/..%5cprivate/secret.txt",
    ] {
        let answer = raw(target).await;
        assert!(!answer.contains("the paid file"), "{target}: {answer}");
        let status: u16 = answer[9..12].parse().unwrap();
        assert!(matches!(status, 400 | 401), "{target}: {answer}");
    }
    // with a key, the normalised path is what is metered and forwarded
    let (_, key) = gw.create_key("Ada", "1");
    let mut s = tokio::net::TcpStream::connect(gw.proxy).await.unwrap();
    s.write_all(
        format!(
            "GET /public/%2e%2e/private/secret.txt HTTP/1.1\r\nHost: x\r\nX-License-Key: {key}\r\n\
             Connection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut out = String::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out)).await;
    assert!(
        out.get(9..12) == Some("200") && out.contains("the paid file"),
        "{out}"
    );
    gw.wait_for(
        "SELECT count(*) FROM access_logs WHERE outcome = 'ok' AND license_id IS NOT NULL",
        1,
    )
    .await;
}

/// The security review's findings on the request's edges: a target that is not a path, `..;`
/// on a free path, a client's `X_Forwarded_For` or `X-Forwarded-Host` over HTTP/2's absent Host,
/// and a Tollgate key in Authorization beside X-License-Key.
#[tokio::test(flavor = "multi_thread")]
async fn odd_targets_path_parameters_and_forwarding_claims_are_handled() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let up = Upstream::start().await;
    let gw = Gateway::start(up.addr, Settings::default()).await;
    let (_, key) = gw.create_key("Ada", "1");
    let raw = |request: String| {
        let proxy = gw.proxy;
        async move {
            let mut s = tokio::net::TcpStream::connect(proxy).await.unwrap();
            s.write_all(request.as_bytes()).await.unwrap();
            let mut out = String::new();
            let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut out)).await;
            out
        }
    };
    let before = up.count();
    for target in ["foo:/public/x", "/public/..;/private/x"] {
        let answer = raw(format!(
            "GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        ))
        .await;
        assert_eq!(answer.get(9..12), Some("400"), "{target}: {answer}");
    }
    assert_eq!(up.count(), before, "neither reached the app");
    // claims in other spellings are replaced, and a key in Authorization is stripped too
    let answer = raw(format!(
        "GET /app HTTP/1.1\r\nHost: x\r\nX-License-Key: {key}\r\nAuthorization: Bearer {key}\r\n\
         X_Forwarded_For: 6.6.6.6\r\nX-Real-IP: 6.6.6.6\r\nConnection: close\r\n\r\n"
    ))
    .await;
    assert_eq!(answer.get(9..12), Some("200"), "{answer}");
    let seen = up.last();
    let all = format!("{:?}", seen.headers);
    assert!(!all.contains("6.6.6.6") && !all.contains(&key), "{all}");
    assert_eq!(seen.headers["x-forwarded-for"], "127.0.0.1");
}

/// `proxy.response_headers = false`: the answer carries no session or balance header, and the
/// request is metered all the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn response_headers_off_leaves_the_balance_headers_out_and_still_meters() {
    let up = Upstream::start().await;
    let gw = Gateway::start(
        up.addr,
        Settings {
            proxy_extra: "response_headers = false\n".into(),
            ..Settings::default()
        },
    )
    .await;
    let c = client();
    let (id, key) = gw.create_key("Ada", "1");
    let r = gw.get_with_key(&c, "/x?sleep_ms=50", &key).await;
    assert_eq!(r.status(), 200);
    for h in ["x-usage-session", "x-balance-remaining-seconds"] {
        assert!(r.headers().get(h).is_none(), "{h}: {:?}", r.headers());
    }
    gw.wait_for(
        &format!("SELECT requests_total FROM licenses WHERE id = {id}"),
        1,
    )
    .await;
}
