//! Several keys per license against the real gateway: a team's keys spend one balance, the app
//! learns which key it was, and a key is revoked or rotated while its siblings work on; a
//! database made before keys had a table of their own migrates with nothing lost.

mod common;

use common::*;
use reqwest::Method;
use serde_json::{json, Value};

on_each_store!(
    two_keys_of_one_license_spend_one_balance_and_are_revoked_and_rotated_apart,
    a_keys_own_limits_and_expiry_hold_beside_the_plans,
);

async fn call(gw: &Gateway, c: &reqwest::Client, method: Method, path: &str) -> (u16, Value) {
    json_of(gw.api(c, method, path).send().await.unwrap()).await
}

/// The statuses of `n` proxied requests with `key`, sent at once.
async fn burst(gw: &Gateway, c: &reqwest::Client, key: &str, n: usize) -> Vec<u16> {
    let calls = (0..n).map(|_| gw.get_with_key(c, "/work", key));
    futures_util::future::join_all(calls)
        .await
        .into_iter()
        .map(|r| r.status().as_u16())
        .collect()
}

/// How many requests the app saw with `X-Tollgate-Key-Id: key_id`, all of them of `license`.
fn seen_with_key(up: &Upstream, license: i64, key_id: i64) -> usize {
    let seen = up.seen.lock().unwrap();
    seen.iter()
        .filter(|s| s.headers.get("x-tollgate-key-id") == Some(&key_id.to_string()))
        .inspect(|s| {
            assert_eq!(
                s.headers.get("x-tollgate-license-id"),
                Some(&license.to_string())
            )
        })
        .count()
}

async fn two_keys_of_one_license_spend_one_balance_and_are_revoked_and_rotated_apart(store: Store) {
    let up = Upstream::start().await;
    let gw = Gateway::start(up.addr, Settings::on(store)).await;
    let c = client();
    let (status, created) = json_of(
        gw.api(&c, Method::POST, "/api/licenses")
            .json(&json!({"name": "Team", "hours": 1}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_i64().unwrap();
    let first = created["license_key"].as_str().unwrap().to_string();

    let (status, added) = json_of(
        gw.api(&c, Method::POST, &format!("/api/licenses/{id}/keys"))
            .json(&json!({"name": "ci"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 201, "{added}");
    assert_eq!(
        (added["license_id"].as_i64(), added["name"].as_str()),
        (Some(id), Some("ci"))
    );
    let second = added["license_key"].as_str().unwrap().to_string();
    let second_id = added["id"].as_i64().unwrap();
    let (status, list) = call(&gw, &c, Method::GET, &format!("/api/licenses/{id}/keys")).await;
    assert_eq!(status, 200);
    let keys = list["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 2, "{list}");
    assert_eq!(keys[0]["name"], "default");
    let first_id = keys[0]["id"].as_i64().unwrap();
    assert!(!list.to_string().contains(&first) && !list.to_string().contains(&second));

    // both keys at once, on one balance
    let (a, b) = tokio::join!(burst(&gw, &c, &first, 20), burst(&gw, &c, &second, 20));
    assert!(a.iter().chain(&b).all(|s| *s == 200), "{a:?} {b:?}");
    assert_eq!(seen_with_key(&up, id, first_id), 20);
    assert_eq!(seen_with_key(&up, id, second_id), 20);
    gw.wait_for(
        &format!("SELECT requests_total FROM licenses WHERE id = {id}"),
        40,
    )
    .await;
    let books = gw.books(id);
    assert_eq!(books.history_sum_ms, books.balance_ms, "{books:?}");
    assert_eq!(books.balance_ms + books.used_ms, 3_600_000, "{books:?}");
    assert!(books.used_ms > 0);
    // in session metering, the license's keys used at once are one session
    assert_eq!(
        gw.count(&format!(
            "SELECT count(*) FROM usage_sessions WHERE license_id = {id}"
        )),
        1
    );
    // which key spent it: the access log and the license's statistics split by key
    for k in [first_id, second_id] {
        gw.wait_for(
            &format!("SELECT count(*) FROM access_logs WHERE license_id = {id} AND key_id = {k}"),
            20,
        )
        .await;
    }
    let (status, stats) = call(&gw, &c, Method::GET, &format!("/api/licenses/{id}/stats")).await;
    assert_eq!(status, 200);
    let mut by_key: Vec<(i64, String, i64)> = stats["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| {
            (
                k["key_id"].as_i64().unwrap(),
                k["name"].as_str().unwrap().to_string(),
                k["calls"].as_i64().unwrap(),
            )
        })
        .collect();
    by_key.sort();
    assert_eq!(
        by_key,
        vec![
            (first_id, "default".into(), 20),
            (second_id, "ci".into(), 20)
        ],
        "{stats}"
    );

    // the second key revoked: refused at once, the first works on
    let (status, revoked) = call(
        &gw,
        &c,
        Method::POST,
        &format!("/api/licenses/{id}/keys/{second_id}/revoke"),
    )
    .await;
    assert_eq!((status, revoked["status"].as_str()), (200, Some("revoked")));
    assert_eq!(gw.get_with_key(&c, "/work", &second).await.status(), 401);
    assert_eq!(gw.get_with_key(&c, "/work", &first).await.status(), 200);

    // the first key rotated: the old secret refused, the new one works, the license the same
    let (status, rotated) = call(
        &gw,
        &c,
        Method::POST,
        &format!("/api/licenses/{id}/keys/{first_id}/rotate"),
    )
    .await;
    assert_eq!(status, 200, "{rotated}");
    let new_first = rotated["license_key"].as_str().unwrap().to_string();
    assert_eq!(gw.get_with_key(&c, "/work", &first).await.status(), 401);
    let r = gw.get_with_key(&c, "/work", &new_first).await;
    assert_eq!(r.status(), 200);
    assert_eq!(gw.get_with_key(&c, "/work", &second).await.status(), 401);

    // with two active keys, which one a license-level rotation means is not guessed
    let (status, _) = json_of(
        gw.api(&c, Method::POST, &format!("/api/licenses/{id}/keys"))
            .json(&json!({"name": "laptop"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 201);
    let (status, refused) =
        call(&gw, &c, Method::POST, &format!("/api/licenses/{id}/rotate")).await;
    assert_eq!(
        (status, refused["error"].as_str()),
        (400, Some("bad_request")),
        "{refused}"
    );
    assert!(refused["message"]
        .as_str()
        .unwrap()
        .contains("2 active keys"));
    assert_eq!(gw.get_with_key(&c, "/work", &new_first).await.status(), 200);

    // the keys exported: prefixes and names, never a key
    let csv = gw
        .api_text(&c, &format!("/api/export/license_keys.csv?license={id}"))
        .await;
    assert_eq!(csv.lines().count(), 4, "a header and three keys: {csv}");
    assert!(
        csv.contains(",ci,revoked,") && csv.contains(",laptop,active,"),
        "{csv}"
    );
    assert!(!csv.contains(&new_first[3..]) && !csv.contains(&second[3..]));

    // bad input: an unknown key, a key of another license, an empty name
    let (other, _) = gw.create_key("Other", "1");
    for path in [
        format!("/api/licenses/{id}/keys/999999/revoke"),
        format!("/api/licenses/{other}/keys/{first_id}/revoke"),
        format!("/api/licenses/{id}/keys/x/rotate"),
    ] {
        let (status, v) = call(&gw, &c, Method::POST, &path).await;
        assert_eq!(
            (status, v["error"].as_str()),
            (404, Some("not_found")),
            "{path}"
        );
    }
    let (status, v) = json_of(
        gw.api(&c, Method::POST, &format!("/api/licenses/{id}/keys"))
            .json(&json!({"name": "  "}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!((status, v["error"].as_str()), (400, Some("bad_request")));
    assert_eq!(gw.get_with_key(&c, "/work", &new_first).await.status(), 200);
}

/// A key added with limits of its own: its rate, its cap on requests in flight and its day of
/// request time refuse it alone, beside the plan's (a sibling key of the same license is served
/// meanwhile); a key that expires stops working while its siblings work on; bad terms are 400
/// naming the field; the keys' list shows the limits and each key's last use, and the
/// statistics its request time.
async fn a_keys_own_limits_and_expiry_hold_beside_the_plans(store: Store) {
    let up = Upstream::start().await;
    let gw = Gateway::start(
        up.addr,
        Settings {
            plans: "[[plans]]\nname = \"free\"\nrequests_per_second = 50\n".into(),
            ..Settings::on(store)
        },
    )
    .await;
    let c = client();
    let (status, created) = call_json(
        &gw,
        &c,
        Method::POST,
        "/api/licenses",
        json!({"name": "Team", "hours": 1}),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_i64().unwrap();
    let open = created["license_key"].as_str().unwrap().to_string();
    let keys_path = format!("/api/licenses/{id}/keys");
    let add = |body: Value| call_json(&gw, &c, Method::POST, &keys_path, body);

    // bad terms name their field, and add nothing
    for (body, field) in [
        (
            json!({"name": "x", "limits": {"max_concurrent": 0}}),
            "limits.max_concurrent",
        ),
        (
            json!({"name": "x", "expires_at": "2001-01-01"}),
            "expires_at",
        ),
        (json!({"name": "x", "expires_at": "soon"}), "expires_at"),
    ] {
        let (status, v) = add(body).await;
        assert_eq!(
            (status, v["error"].as_str()),
            (400, Some("bad_request")),
            "{v}"
        );
        assert!(v["message"].as_str().unwrap().contains(field), "{v}");
    }
    let (status, v) = add(json!({"name": "x", "limits": {"requests_per_hour": 1}})).await;
    assert_eq!(status, 400, "an unknown limit is refused: {v}");

    let (status, rated) = add(json!({"name": "rated",
        "limits": {"requests_per_second": 3, "max_seconds_per_day": 1}}))
    .await;
    assert_eq!(status, 201, "{rated}");
    assert_eq!(rated["limits"]["requests_per_second"], 3);
    assert_eq!(rated["limits"]["max_seconds_per_day"], 1);
    let rated_key = rated["license_key"].as_str().unwrap().to_string();
    let (status, single) = add(json!({"name": "single", "limits": {"max_concurrent": 1}})).await;
    assert_eq!(status, 201, "{single}");
    assert_eq!(single["limits"]["max_concurrent"], 1);
    let single_key = single["license_key"].as_str().unwrap().to_string();

    // the key's rate: a burst of 3 of 10 back to back (a token more each 333 ms they take),
    // while the open key is served all of its 10 at once
    let started = std::time::Instant::now();
    let one_by_one = async {
        let mut answers = Vec::new();
        for _ in 0..10 {
            answers.push(json_or_text(gw.get_with_key(&c, "/work", &rated_key).await).await);
        }
        answers
    };
    let (rated_burst, open_burst) = tokio::join!(one_by_one, burst(&gw, &c, &open, 10));
    let refills = started.elapsed().as_millis() as usize / 333;
    let admitted = rated_burst.iter().filter(|(s, _)| *s == 200).count();
    assert!(
        (3..=3 + refills).contains(&admitted),
        "{admitted} admitted in {:?}: {rated_burst:?}",
        started.elapsed()
    );
    assert!(rated_burst[..3].iter().all(|(s, _)| *s == 200));
    let (status, refused) = &rated_burst[3];
    assert_eq!(
        (*status, refused["error"].as_str()),
        (429, Some("rate_limited")),
        "{refused}"
    );
    assert!(open_burst.iter().all(|s| *s == 200), "{open_burst:?}");

    // a key's cap on requests in flight: one of two slow calls at once
    let (a, b) = tokio::join!(
        gw.get_with_key(&c, "/slow?sleep_ms=700", &single_key),
        gw.get_with_key(&c, "/slow?sleep_ms=700", &single_key)
    );
    let mut pair = [a.status().as_u16(), b.status().as_u16()];
    pair.sort();
    assert_eq!(pair, [200, 429], "one in flight at a time");
    let (a, b) = tokio::join!(
        gw.get_with_key(&c, "/slow?sleep_ms=400", &open),
        gw.get_with_key(&c, "/slow?sleep_ms=400", &open)
    );
    assert_eq!(
        (a.status().as_u16(), b.status().as_u16()),
        (200, 200),
        "the sibling is not capped"
    );

    // the rated key's day of request time: 0.7 s, then 0.7 s more crosses its second, then
    // it is refused until the next UTC day, while the sibling works on (its rate refilled)
    tokio::time::sleep(std::time::Duration::from_millis(1_100)).await;
    for _ in 0..2 {
        assert_eq!(
            gw.get_with_key(&c, "/slow?sleep_ms=700", &rated_key)
                .await
                .status(),
            200
        );
    }
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    let (status, v) = json_of(gw.get_with_key(&c, "/work", &rated_key).await).await;
    assert_eq!(
        (status, v["error"].as_str()),
        (429, Some("quota_exceeded")),
        "{v}"
    );
    assert_eq!(v["limit"].as_str(), Some("key.max_seconds_per_day"), "{v}");
    assert_eq!(
        v["resets_at"].as_str().map(|t| t.ends_with("T00:00:00Z")),
        Some(true)
    );
    // the pre-flight check says the same, for that key
    let (status, check) = json_of(
        c.post(gw.admin_url("/usage/check"))
            .header("X-License-Key", &rated_key)
            .json(&json!({"path": "/work"}))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        (check["allowed"].as_bool(), check["error"].as_str()),
        (Some(false), Some("quota_exceeded")),
        "{check}"
    );
    assert_eq!(gw.get_with_key(&c, "/work", &open).await.status(), 200);

    // a key that expires works until its time, then it alone is refused
    let soon = gateway::timefmt::rfc3339(gateway::ledger::now_ms() + 1_500);
    let (status, expiring) = add(json!({"name": "expiring", "expires_at": soon})).await;
    assert_eq!(status, 201, "{expiring}");
    assert_eq!(expiring["expires_at"].as_str(), Some(soon.as_str()));
    let expiring_key = expiring["license_key"].as_str().unwrap().to_string();
    assert_eq!(
        gw.get_with_key(&c, "/work", &expiring_key).await.status(),
        200
    );
    let wait = gateway::timefmt::parse_rfc3339(&soon).unwrap() - gateway::ledger::now_ms();
    tokio::time::sleep(std::time::Duration::from_millis(wait.max(0) as u64 + 100)).await;
    let (status, v) = json_of(gw.get_with_key(&c, "/work", &expiring_key).await).await;
    assert_eq!(
        (status, v["error"].as_str()),
        (403, Some("license_expired")),
        "{v}"
    );
    assert_eq!(gw.get_with_key(&c, "/work", &open).await.status(), 200);
    // nor does it sign in to the customer endpoints, nor is it worth rotating
    let (status, v) = json_of(
        c.get(gw.admin_url("/usage/me"))
            .header("X-License-Key", &expiring_key)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(
        (status, v["error"].as_str()),
        (401, Some("invalid_license_key")),
        "{v}"
    );
    let expiring_id = expiring["id"].as_i64().unwrap();
    let (status, v) = call(
        &gw,
        &c,
        Method::POST,
        &format!("{keys_path}/{expiring_id}/rotate"),
    )
    .await;
    assert_eq!(status, 400, "{v}");
    assert!(v["message"].as_str().unwrap().contains("expired"), "{v}");

    // the list shows each key's limits and last use, the statistics its request time
    let rated_id = rated["id"].as_i64().unwrap();
    // its 13 calls: 10 back to back, two slow, one past its day
    gw.wait_for(
        &format!("SELECT sum(calls) FROM key_daily WHERE key_id = {rated_id}"),
        13,
    )
    .await;
    let (_, list) = call(&gw, &c, Method::GET, &keys_path).await;
    let listed = list["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["id"] == rated_id)
        .unwrap()
        .clone();
    assert_eq!(listed["limits"]["requests_per_second"], 3, "{listed}");
    assert!(listed["last_used_at"].is_string(), "{listed}");
    let (_, stats) = call(&gw, &c, Method::GET, &format!("/api/licenses/{id}/stats")).await;
    let of_rated = stats["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["key_id"] == rated_id)
        .unwrap()
        .clone();
    assert!(
        of_rated["request_seconds"].as_f64().unwrap() >= 1.4,
        "two 0.7 s calls: {of_rated}"
    );
    // its refusals are under it too: all but the admitted are refusals
    assert_eq!(
        (
            of_rated["calls"].as_i64(),
            of_rated["successful_calls"].as_i64()
        ),
        (Some(13), Some(admitted as i64 + 2)),
        "{of_rated}"
    );
}

/// An answer's status and its JSON body (`null` when it is not JSON: the app's answer).
async fn json_or_text(r: reqwest::Response) -> (u16, Value) {
    let status = r.status().as_u16();
    (
        status,
        serde_json::from_slice(&r.bytes().await.unwrap()).unwrap_or(Value::Null),
    )
}

async fn call_json(
    gw: &Gateway,
    c: &reqwest::Client,
    method: Method,
    path: &str,
    body: Value,
) -> (u16, Value) {
    json_of(gw.api(c, method, path).json(&body).send().await.unwrap()).await
}

/// A SQLite database made by the previous release's migrations (every file up to
/// 0019), with a license, its key and its history: `migrate` gives every license its key as
/// its first key, and the gateway then admits that key and charges the same balance. What the
/// previous build still writes while it runs beside this one (a license, a rotation) reaches
/// the keys this one reads.
#[tokio::test(flavor = "multi_thread")]
async fn a_database_from_before_keys_migrates_with_every_key_and_balance() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("old.db");
    let key = "tg_0ldK3yMadeBeforeKeysHadATable01";
    {
        let c = rusqlite::Connection::open(&db).unwrap();
        let old = migrations_before("schema", "0020");
        assert_eq!(old.len(), 19, "the previous release's migrations");
        for f in &old {
            c.execute_batch(&std::fs::read_to_string(f).unwrap())
                .unwrap();
        }
        c.pragma_update(None, "user_version", 19).unwrap();
        let hash = sha2_of(key);
        c.execute(
            "INSERT INTO licenses (key_hash, key_prefix, name, balance_ms, created_at, updated_at)
             VALUES (?1, 'tg_0ldK3y', 'Old', 7200000, 1, 1)",
            rusqlite::params![hash],
        )
        .unwrap();
        c.execute(
            "INSERT INTO usage_history (license_id, kind, delta_ms, balance_before_ms,
                 balance_after_ms, requests, reason, created_at)
             VALUES (1, 'credit', 7200000, 0, 7200000, 0, 'initial', 1)",
            [],
        )
        .unwrap();
    }
    let up = Upstream::start().await;
    let gw = Gateway::start(
        up.addr,
        Settings {
            db_path: Some(db.clone()),
            ..Settings::default()
        },
    )
    .await;
    assert_eq!(
        gw.count("SELECT count(*) FROM license_keys WHERE license_id = 1 AND name = 'default'"),
        1
    );
    assert_eq!(
        gw.count(
            "SELECT count(*) FROM license_keys k JOIN licenses l ON l.id = k.license_id
             WHERE k.key_hash = l.key_hash AND k.status = 'active'"
        ),
        1
    );
    let c = client();
    assert_eq!(gw.get_with_key(&c, "/work", key).await.status(), 200);
    gw.wait_for("SELECT requests_total FROM licenses WHERE id = 1", 1)
        .await;
    let books = gw.books(1);
    assert_eq!(books.history_sum_ms, books.balance_ms, "{books:?}");
    assert_eq!(books.balance_ms + books.used_ms, 7_200_000, "{books:?}");
    let out = gw.cli(&["keys", "show", "1"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("default"), "{text}");

    // the build before keys, still running beside this one during an upgrade, writes as it
    // did: a license it creates opens with its key here, and its rotation stops the old key
    let db = rusqlite::Connection::open(&db).unwrap();
    let made_before = "tg_MadeByTheBuildBeforeKeys00001";
    db.execute(
        "INSERT INTO licenses (key_hash, key_prefix, name, balance_ms, created_at, updated_at)
         VALUES (?1, 'tg_MadeBy', 'Older', 3600000, 2, 2)",
        rusqlite::params![sha2_of(made_before)],
    )
    .unwrap();
    assert_eq!(
        gw.get_with_key(&c, "/work", made_before).await.status(),
        200
    );
    let rotated_before = "tg_RotatedByTheBuildBeforeKeys01";
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    db.execute(
        "UPDATE licenses SET key_hash = ?1, key_prefix = 'tg_Rotate', version = version + 1,
             updated_at = ?2
         WHERE id = 1",
        rusqlite::params![sha2_of(rotated_before), now],
    )
    .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while gw.get_with_key(&c, "/work", key).await.status() != 401 {
        assert!(
            std::time::Instant::now() < deadline,
            "the rotated-out key still works"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(
        gw.get_with_key(&c, "/work", rotated_before).await.status(),
        200
    );
}

/// A PostgreSQL database made by the previous release's migrations (every file up to 0014, as
/// its migrator recorded them), with a license, its key and its history: the gateway migrates
/// it, giving the license its key as its first key; the key is admitted and charged on the same
/// balance, the books add up, and a license the previous build writes meanwhile opens with its
/// key here.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_postgres_database_from_before_keys_migrates_with_every_key_and_balance() {
    let server = common::postgres::Postgres::shared();
    let url = server.database().await;
    let db = server.connect(url.rsplit('/').next().unwrap()).await;
    let key = "tg_0ldPgK3yMadeBeforeKeysHadATab";
    let old = migrations_before("schema/postgres", "0015");
    assert_eq!(old.len(), 14, "the previous release's migrations");
    db.batch_execute(
        "CREATE TABLE tollgate_migrations (version integer PRIMARY KEY, name text NOT NULL,
             applied_at bigint NOT NULL)",
    )
    .await
    .unwrap();
    for (i, f) in old.iter().enumerate() {
        db.batch_execute(&std::fs::read_to_string(f).unwrap())
            .await
            .unwrap();
        db.execute(
            "INSERT INTO tollgate_migrations VALUES ($1, $2, 1)",
            &[
                &(i as i32 + 1),
                &f.file_stem().unwrap().to_string_lossy().as_ref(),
            ],
        )
        .await
        .unwrap();
    }
    db.execute(
        "INSERT INTO licenses (key_hash, key_prefix, name, balance_ms, created_at, updated_at)
         VALUES ($1, 'tg_0ldPgK', 'Old', 7200000, 1, 1)",
        &[&sha2_of(key)],
    )
    .await
    .unwrap();
    db.execute(
        "INSERT INTO usage_history (license_id, kind, delta_ms, balance_before_ms,
             balance_after_ms, requests, reason, created_at)
         VALUES (1, 'credit', 7200000, 0, 7200000, 0, 'initial', 1)",
        &[],
    )
    .await
    .unwrap();

    let up = Upstream::start().await;
    let mut settings = Settings::default();
    settings
        .storage_extra
        .push_str("\nbackend = \"postgres\"\n");
    settings.env.push(("TOLLGATE_DATABASE_URL", url.clone()));
    let gw = Gateway::start(up.addr, settings).await;
    let scalar = |sql: &'static str| common::postgres::Postgres::scalar(&db, sql);
    assert_eq!(
        scalar("SELECT count(*) FROM license_keys WHERE license_id = 1 AND name = 'default'").await,
        1
    );
    assert_eq!(
        scalar(
            "SELECT count(*) FROM license_keys k JOIN licenses l ON l.id = k.license_id
             WHERE k.key_hash = l.key_hash AND k.status = 'active'"
        )
        .await,
        1
    );
    let c = client();
    for _ in 0..3 {
        assert_eq!(gw.get_with_key(&c, "/work", key).await.status(), 200);
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while scalar("SELECT requests_total FROM licenses WHERE id = 1").await < 3 {
        assert!(std::time::Instant::now() < deadline, "the use is flushed");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let balance = scalar("SELECT balance_ms FROM licenses WHERE id = 1").await;
    let used = scalar("SELECT used_ms FROM licenses WHERE id = 1").await;
    let history =
        scalar("SELECT sum(delta_ms)::bigint FROM usage_history WHERE license_id = 1").await;
    assert_eq!(
        (history, balance + used),
        (balance, 7_200_000),
        "the books add up"
    );
    assert!(used > 0);
    // the previous build, beside this one during an upgrade, creates a license as it did
    let made_before = "tg_MadeByThePgBuildBeforeKeys001";
    db.execute(
        "INSERT INTO licenses (key_hash, key_prefix, name, balance_ms, created_at, updated_at)
         VALUES ($1, 'tg_MadeBy', 'Older', 3600000, 2, 2)",
        &[&sha2_of(made_before)],
    )
    .await
    .unwrap();
    assert_eq!(
        gw.get_with_key(&c, "/work", made_before).await.status(),
        200
    );
}

/// The migration files of `dir` (under the crate) before the one named `first_new…`, in order:
/// a previous release's schema.
fn migrations_before(dir: &str, first_new: &str) -> Vec<std::path::PathBuf> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "sql"))
        .collect();
    files.sort();
    files.retain(|p| p.file_name().unwrap().to_string_lossy().as_ref() < first_new);
    files
}

fn sha2_of(key: &str) -> Vec<u8> {
    gateway::keys::KeyHash::of(key.as_bytes()).0.to_vec()
}
