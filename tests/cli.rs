//! The command line: config checking, key management, migrate, and the demo.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

const BAD_CONFIG: &str = r#"
[proxy]
listen = "not an address"
threads = 0
strip_kee = true

[storage]
flush_interval_ms = "soon"

[metering]
mode = "hourly"
"#;

fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn check_config_names_every_bad_key_and_serve_refuses_with_the_same_words() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, BAD_CONFIG).unwrap();

    let check = cli(&path, &["check-config"]);
    assert_eq!(check.status.code(), Some(2));
    let text = stderr(&check);
    for key in [
        "proxy.listen",
        "proxy.threads",
        "proxy.strip_kee: unknown key",
        "storage.flush_interval_ms",
        "metering.mode",
    ] {
        assert!(text.contains(key), "{key} missing from:\n{text}");
    }
    assert!(text.contains("5 problem(s)"), "{text}");

    let serve = cli(&path, &["serve"]);
    assert_eq!(serve.status.code(), Some(2));
    assert_eq!(
        stderr(&serve),
        text,
        "serve reports exactly what check-config does"
    );

    let shipped = cli("conf/tollgate.toml".as_ref(), &["check-config"]);
    assert!(shipped.status.success(), "{}", stderr(&shipped));
}

/// An admin token `serve` would refuse is refused by `check-config` too (a new user's first
/// `check-config` said ok, then `serve` did not start); the token is never printed.
#[test]
fn check_config_refuses_the_admin_token_serve_would() {
    let short = "trial-token-0123456789";
    let out = Command::new(&*BIN)
        .args(["--config", "conf/tollgate.toml", "check-config"])
        .env("TOLLGATE_ADMIN_TOKEN", short)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let text = stderr(&out);
    assert!(
        text.contains("TOLLGATE_ADMIN_TOKEN has 22 characters"),
        "{text}"
    );
    assert!(!text.contains(short) && !String::from_utf8_lossy(&out.stdout).contains(short));
}

fn config_with_db(dir: &std::path::Path) -> std::path::PathBuf {
    let path = dir.join("t.toml");
    std::fs::write(
        &path,
        format!("[storage]\npath = \"{}\"\n", dir.join("t.db").display()),
    )
    .unwrap();
    path
}

#[test]
fn keys_create_json_prints_the_key_once_and_the_other_commands_work_on_it() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_with_db(dir.path());

    let out = cli(
        &config,
        &[
            "keys",
            "create",
            "--name",
            "Ada",
            "--email",
            "ada@example.com",
            "--hours",
            "2.5",
            "--plan",
            "pro",
            "--json",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let created: Value = serde_json::from_slice(&out.stdout).unwrap();
    let key = created["license_key"].as_str().unwrap().to_string();
    assert!(key.starts_with("tg_") && key.len() == 35);
    assert_eq!(created["name"], "Ada");
    assert_eq!(created["plan"], "pro");
    assert_eq!(created["hours_remaining"], 2.5);
    let id = created["id"].as_i64().unwrap().to_string();

    let show = cli(&config, &["keys", "show", &id, "--json"]);
    let shown: Value = serde_json::from_slice(&show.stdout).unwrap();
    assert_eq!(shown["key_prefix"], &key[..9]);
    assert!(
        shown.get("license_key").is_none(),
        "the key is shown only once"
    );
    assert!(!String::from_utf8_lossy(&show.stdout).contains(&key));

    assert!(cli(&config, &["keys", "add-hours", &id, "1.5"])
        .status
        .success());
    let list = cli(&config, &["keys", "list", "--json"]);
    let all: Value = serde_json::from_slice(&list.stdout).unwrap();
    assert_eq!(all[0]["hours_remaining"], 4.0);
    assert!(!String::from_utf8_lossy(&list.stdout).contains(&key));

    let rotated = cli(&config, &["keys", "rotate", &id, "--json"]);
    let new_key = serde_json::from_slice::<Value>(&rotated.stdout).unwrap()["license_key"]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(new_key, key);
    assert!(cli(&config, &["keys", "revoke", &id]).status.success());
    let shown: Value =
        serde_json::from_slice(&cli(&config, &["keys", "show", &id, "--json"]).stdout).unwrap();
    assert_eq!(shown["status"], "revoked");

    let db = rusqlite::Connection::open(dir.path().join("t.db")).unwrap();
    let (credits, sum): (i64, i64) = db
        .query_row(
            "SELECT count(*), sum(delta_ms) FROM usage_history WHERE license_id = ?1",
            [&id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!((credits, sum), (2, 14_400_000));
}

#[test]
fn keys_are_added_listed_revoked_and_rotated_one_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_with_db(dir.path());
    let ok = |args: &[&str]| {
        let out = cli(&config, args);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let created: Value =
        serde_json::from_str(&ok(&["keys", "create", "--name", "Team", "--json"])).unwrap();
    let id = created["id"].as_i64().unwrap().to_string();
    let added: Value =
        serde_json::from_str(&ok(&["keys", "add", &id, "--name", "ci", "--json"])).unwrap();
    let key_id = added["id"].as_i64().unwrap().to_string();
    assert!(added["license_key"].as_str().unwrap().starts_with("tg_"));
    let shown = ok(&["keys", "show", &id]);
    assert!(shown.contains("default") && shown.contains("ci"), "{shown}");
    assert!(!shown.contains(added["license_key"].as_str().unwrap()));
    // which of two keys a license-level rotation means is not guessed
    let out = cli(&config, &["keys", "rotate", &id]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("2 active keys"), "{}", stderr(&out));
    assert!(ok(&["keys", "revoke", &id, "--key", &key_id]).contains("revoked"));
    let shown = ok(&["keys", "show", &id]);
    assert!(shown.contains("revoked"), "{shown}");
    let shown: Value = serde_json::from_str(&ok(&["keys", "show", &id, "--json"])).unwrap();
    let keys = shown["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 2, "{shown}");
    assert_eq!(
        (keys[1]["name"].as_str(), keys[1]["status"].as_str()),
        (Some("ci"), Some("revoked"))
    );
    // one active key left: the license-level rotation takes it
    let rotated: Value = serde_json::from_str(&ok(&["keys", "rotate", &id, "--json"])).unwrap();
    assert_ne!(rotated["license_key"], created["license_key"]);
    let out = cli(&config, &["keys", "revoke", &id, "--key", "999"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains(&format!("license {id} has no key with id 999")),
        "{}",
        stderr(&out)
    );
}

#[test]
fn a_store_failure_is_told_in_the_stores_own_words() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_with_db(dir.path());
    assert!(cli(&config, &["migrate"]).status.success());
    // a database whose licenses table is gone: the write fails underneath the service
    let db = rusqlite::Connection::open(dir.path().join("t.db")).unwrap();
    db.execute_batch("PRAGMA foreign_keys = OFF; DROP TABLE licenses;")
        .unwrap();
    drop(db);
    let out = cli(&config, &["keys", "create", "--name", "x"]);
    assert!(!out.status.success());
    let text = stderr(&out);
    assert!(text.contains("no such table: licenses"), "{text}");
    assert!(!text.contains("error: Something went wrong"), "{text}");
}

#[test]
fn bad_cli_input_is_refused_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let config = config_with_db(dir.path());
    let cases: &[(&[&str], &str)] = &[
        (&["keys", "show", "42"], "no license with id 42"),
        (&["keys", "add-hours", "42", "1"], "no license with id 42"),
        (
            &["keys", "create", "--name", "x", "--plan", "gold"],
            "no plan named \"gold\"",
        ),
        (
            &["keys", "create", "--name", "x", "--hours", "-1"],
            "hours must be a positive number",
        ),
        (&["keys", "create", "--name", " "], "name must not be empty"),
        // the API's checks, from the same service: the CLI has none of its own
        (
            &["keys", "create", "--name", "x", "--email", "nope"],
            "email is not an email address",
        ),
        (
            &["keys", "add-hours", "1", "0"],
            "hours must be more than zero",
        ),
    ];
    for (args, want) in cases {
        let out = cli(&config, args);
        assert!(!out.status.success(), "{args:?}");
        assert!(stderr(&out).contains(want), "{args:?}: {}", stderr(&out));
    }
    let out = cli(&config, &["migrate"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("0 migration(s) applied"));
}

on_each_store!(the_demo_prints_curl_lines_that_work);

/// `demo`, and `demo --postgres URL`: what it prints works as printed.
async fn the_demo_prints_curl_lines_that_work(store: Store) {
    let pg = match store {
        Store::Sqlite => None,
        Store::Postgres => {
            let server = postgres::Postgres::shared();
            let url = server.database().await;
            Some((server, url))
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("demo.toml");
    let (proxy, admin, metrics) = (free_port(), free_port(), free_port());
    std::fs::write(
        &config,
        format!(
            "[proxy]\nlisten = \"127.0.0.1:{proxy}\"\ngrace_period_s = 1\n\
             [admin]\nlisten = \"127.0.0.1:{admin}\"\n[metrics]\nlisten = \"127.0.0.1:{metrics}\"\n"
        ),
    )
    .unwrap();
    let mut demo = Command::new(&*BIN);
    demo.args(["demo", "--config"]).arg(&config);
    if let Some((_, url)) = &pg {
        demo.args(["--postgres", url]);
    }
    let mut child = demo
        .env("RUST_LOG", "warn")
        .env_remove("TOLLGATE_ADMIN_TOKEN")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let lines = std::thread::spawn(move || {
        BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .take_while(|l| !l.starts_with("Ctrl-C"))
            .collect::<Vec<_>>()
    })
    .join()
    .unwrap();
    let curl = lines
        .iter()
        .find(|l| l.trim_start().starts_with("curl -i http") && l.contains("X-License-Key: tg_"))
        .expect("a curl line with the key");
    let url = curl.split_whitespace().nth(2).unwrap().to_string();
    let key = curl
        .split("X-License-Key: ")
        .nth(1)
        .unwrap()
        .trim_end_matches('\'');

    let c = client();
    let deadline = Instant::now() + Duration::from_secs(20);
    let resp = loop {
        match c.get(&url).header("X-License-Key", key).send().await {
            Ok(r) => break r,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!("the demo does not answer: {e}"),
        }
    };
    assert_eq!(resp.status(), 200);
    let echoed: Value = resp.json().await.unwrap();
    assert_eq!(echoed["headers"]["x-tollgate-license-id"], "1");
    assert!(echoed["headers"].get("x-license-key").is_none());
    let denied = c.get(&url).send().await.unwrap();
    assert_eq!(denied.status(), 401);

    // the printed admin token opens the printed operator API
    let token = lines
        .iter()
        .find_map(|l| l.trim().strip_prefix("export TOLLGATE_ADMIN_TOKEN="))
        .expect("an admin token line");
    let list = lines
        .iter()
        .find(|l| l.trim_start().starts_with("curl -s http") && l.contains("/api/licenses -H"))
        .expect("an operator curl line");
    let list_url = list.split_whitespace().nth(2).unwrap();
    let resp = c.get(list_url).bearer_auth(token).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let listed: Value = resp.json().await.unwrap();
    assert_eq!(listed["licenses"][0]["name"], "Demo customer");
    let refused = c.get(list_url).bearer_auth("guess").send().await.unwrap();
    assert_eq!(refused.status(), 401);

    // the printed `keys show` line runs as printed, from a shell without `tollgate` on PATH
    let show = lines
        .iter()
        .find(|l| l.contains(" keys show "))
        .expect("a keys show line");
    let out = Command::new("sh")
        .args(["-c", show.trim()])
        .env("PATH", "/usr/bin:/bin")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{show}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("Demo customer"));
    let database = lines
        .iter()
        .find_map(|l| l.trim().strip_prefix("database"))
        .expect("a database line")
        .trim();
    match &pg {
        None => assert!(database.ends_with("tollgate.db"), "{database}"),
        Some((server, url)) => {
            assert_eq!(
                database,
                format!("PostgreSQL at {}", url.split('@').nth(1).unwrap())
            );
            // the demo's data is in that database
            let c = server.connect(url.rsplit('/').next().unwrap()).await;
            let row = c
                .query_one("SELECT name FROM licenses WHERE id = 1", &[])
                .await
                .unwrap();
            assert_eq!(row.get::<_, String>(0), "Demo customer");
        }
    }

    // the demo's directory (its CLI config, its SQLite file) is there while it runs
    let cli_config = show
        .split("--config ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .expect("the printed line names the demo's config");
    let demo_dir = std::path::Path::new(cli_config)
        .parent()
        .unwrap()
        .to_path_buf();
    assert!(demo_dir.exists(), "{}", demo_dir.display());

    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "the demo did not stop on SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // issue 30, item 13: and gone once it stopped (before: left behind, a database each run)
    assert!(!demo_dir.exists(), "{} is left behind", demo_dir.display());
}
