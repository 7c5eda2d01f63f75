//! `tollgate demo`: the gateway in front of a built-in echo app, with a temporary database and a
//! fresh key, printing curl lines that work when pasted.

use std::net::SocketAddr;

use anyhow::Context;
use axum::body::Bytes;
use axum::http::{HeaderMap, Method, Uri};
use axum::Json;
use gateway::config::{url_has_password, Config, StoreKind, DATABASE_URL_ENV};
use gateway::ledger::now_ms;
use gateway::server::RunOptions;
use gateway::store::NewLicense;
use serde_json::{json, Value};

pub fn run(mut config: Config, postgres: Option<String>) -> anyhow::Result<()> {
    // removed when the demo ends (its database with it), however it ends but a kill -9
    let tmp = tempfile::Builder::new()
        .prefix("tollgate-demo-")
        .tempdir()
        .context("creating the demo's temporary directory")?;
    let dir = tmp.path().to_path_buf();
    config.storage.path = dir.join("tollgate.db");
    if let Some(url) = &postgres {
        gateway::store::postgres::parse_url(url)?;
        config.storage.backend = StoreKind::Postgres;
        // the URL given wins over one in the environment (it may hold a password: never shown)
        std::env::set_var(DATABASE_URL_ENV, url);
    }
    let upstream = start_echo_app()?;
    config.proxy.upstreams = vec![upstream.to_string()];

    let store = gateway::server::open_store(&config)?;
    let new = NewLicense {
        name: "Demo customer".into(),
        plan: "free".into(),
        balance_ms: 3_600_000,
        ..NewLicense::default()
    };
    let (license, key) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(store.create_license(new, now_ms()))?;
    store.release_idle();
    let db = store.describe();
    store.close();

    // The operator API needs a token: use the one in the environment, else make one for this run.
    let mut secrets = admin::Secrets::from_env();
    let token = secrets
        .admin_token
        .get_or_insert_with(|| format!("demo-{}", hex::encode(rand::random::<[u8; 16]>())))
        .clone();

    let proxy = config.proxy.listen;
    // the CLI as it can be run from here (after `cargo run` there is no `tollgate` on PATH),
    // with a config that names the demo's database; a URL with a password stays out of files
    let cli_config = dir.join("cli.toml");
    let (storage, env, query) = match &postgres {
        None => {
            let path = config.storage.path.display().to_string();
            let query = format!(
                "sqlite3 {path} 'SELECT * FROM usage_history; SELECT count(*) FROM access_logs;'"
            );
            (format!("path = {path:?}\n"), "", query)
        }
        Some(url) if url_has_password(url) => (
            "backend = \"postgres\"\n".to_string(),
            "TOLLGATE_DATABASE_URL=<the --postgres URL> ",
            "psql <the --postgres URL> -c 'SELECT * FROM usage_history'".to_string(),
        ),
        Some(url) => (
            format!("backend = \"postgres\"\nurl = {url:?}\n"),
            "",
            format!("psql '{url}' -c 'SELECT * FROM usage_history'"),
        ),
    };
    std::fs::write(&cli_config, format!("[storage]\n{storage}"))
        .context("writing the demo's CLI config")?;
    let tollgate = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "tollgate".into());
    let cli = format!("{env}{tollgate} --config {}", cli_config.display());
    println!(
        r#"
Tollgate demo
  proxy     http://{proxy}  ->  built-in echo app on {upstream}
  console   http://{admin}/              (sign in with the admin token below)
  payments  http://{admin}/payments/     (the customers' page: enter the key below)
  admin     http://{admin}/health
  metrics   http://{metrics}/metrics
  database  {db}

A license with 1 hour of prepaid time (id {id}, plan free):
  {key}

Try:
  curl -i http://{proxy}/hello -H 'X-License-Key: {key}'
  curl -i 'http://{proxy}/hello?license_key={key}'
  curl -i http://{proxy}/hello -H 'Authorization: Bearer {key}'
  curl -i http://{proxy}/hello                    # 401 missing_license_key
  curl -i http://{proxy}/hello -H 'X-License-Key: tg_wrong'   # 401 invalid_license_key
  curl -s http://{metrics}/metrics | grep '^tollgate_requests_total'
  {query}
  {cli} keys show {id}

The operator API (admin token for this run: {token}):
  export TOLLGATE_ADMIN_TOKEN={token}
  curl -s http://{admin}/api/licenses -H "Authorization: Bearer $TOLLGATE_ADMIN_TOKEN"
  curl -s http://{admin}/api/licenses -H "Authorization: Bearer $TOLLGATE_ADMIN_TOKEN" \
       -H 'Content-Type: application/json' -d '{{"name": "Ada", "hours": 2}}'
  curl -s http://{admin}/api/licenses/{id}/hours -H "Authorization: Bearer $TOLLGATE_ADMIN_TOKEN" \
       -H 'Content-Type: application/json' -d '{{"hours": 0.5, "reason": "goodwill"}}'
  curl -s http://{admin}/payments/balance -H 'X-License-Key: {key}'

Ctrl-C stops the demo and removes its directory ({dir}).
"#,
        admin = config.admin.listen,
        metrics = config.metrics.listen,
        id = license.id,
        dir = dir.display(),
    );
    let start = tollgate::Start::default();
    let ran = tollgate::run(config, secrets, &RunOptions::default(), start, |_| {});
    match tmp.close() {
        Ok(()) => eprintln!("removed the demo's directory {}", dir.display()),
        Err(e) => eprintln!("could not remove {}: {e}", dir.display()),
    }
    ran
}

/// The echo app: answers every request with what it received, so you can see what the gateway
/// forwards (the license id and plan headers, and no key).
fn start_echo_app() -> anyhow::Result<SocketAddr> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("binding the echo app")?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    std::thread::Builder::new()
        .name("demo-echo-app".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime for the echo app");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                let app = axum::Router::new().fallback(echo);
                let _ = axum::serve(listener, app).await;
            });
        })?;
    Ok(addr)
}

async fn echo(method: Method, uri: Uri, headers: HeaderMap, body: Bytes) -> Json<Value> {
    let headers: serde_json::Map<String, Value> = headers
        .iter()
        .map(|(k, v)| (k.to_string(), String::from_utf8_lossy(v.as_bytes()).into()))
        .collect();
    Json(json!({
        "app": "tollgate demo echo",
        "method": method.as_str(),
        "path": uri.path(),
        "query": uri.query(),
        "headers": headers,
        "body_bytes": body.len(),
    }))
}
