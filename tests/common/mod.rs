//! Test harness: a real upstream HTTP server, the real `tollgate` binary on ephemeral loopback
//! ports with a fresh SQLite file, and helpers to read that file.
#![allow(dead_code)]

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::{HeaderMap, Method, Uri};
use rusqlite::Connection;
use serde_json::Value;

pub mod app;
pub mod browser;
pub mod flood;
pub mod haproxy;
pub mod llm;
pub mod nodes;
pub mod postgres;
pub mod relay;
pub mod stripe;
pub mod tomcat;
pub mod transcribe;
pub mod ws;

/// The binary under test: this build's, or another's named by `TOLLGATE_TEST_BIN` (to show a
/// test fails on an earlier build).
pub static BIN: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    std::env::var("TOLLGATE_TEST_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_tollgate").into())
});

/// The secrets every test gateway gets in its environment (unless a test says otherwise).
pub const ADMIN_TOKEN: &str = "test-admin-token-0123456789-abcdefghij";
pub const STRIPE_KEY: &str = "sk_test_tollgate_fake";
pub const WEBHOOK_SECRET: &str = "whsec_test_secret";

/// What the upstream received.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    pub headers: HashMap<String, String>,
}

/// A real HTTP app on a loopback port. `?sleep_ms=N` makes it take N ms to answer.
pub struct Upstream {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Upstream {
    pub async fn start() -> Upstream {
        Upstream::start_at(([127, 0, 0, 1], 0).into()).await
    }

    /// The same app on a given address (an app that comes back where it was).
    pub async fn start_at(addr: SocketAddr) -> Upstream {
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let record = seen.clone();
        let app = axum::Router::new()
            .fallback(
                move |method: Method, uri: Uri, headers: HeaderMap, _body: Bytes| {
                    let record = record.clone();
                    async move {
                        let sleep_ms = uri
                            .query()
                            .and_then(|q| {
                                q.split('&')
                                    .find_map(|p| p.strip_prefix("sleep_ms="))
                                    .and_then(|v| v.parse::<u64>().ok())
                            })
                            .unwrap_or(0);
                        record.lock().unwrap().push(Seen {
                            method: method.to_string(),
                            path: uri.path().to_string(),
                            query: uri.query().map(str::to_string),
                            headers: headers
                                .iter()
                                .map(|(k, v)| {
                                    (k.to_string(), String::from_utf8_lossy(v.as_bytes()).into())
                                })
                                .collect(),
                        });
                        if sleep_ms > 0 {
                            tokio::time::sleep(Duration::from_millis(sleep_ms)).await;
                        }
                        // ?stream_ms=N: answer at once, then an event every 100 ms for N ms
                        let stream_ms = uri
                            .query()
                            .and_then(|q| {
                                q.split('&')
                                    .find_map(|p| p.strip_prefix("stream_ms="))
                                    .and_then(|v| v.parse::<u64>().ok())
                            })
                            .unwrap_or(0);
                        if stream_ms > 0 {
                            let until = Instant::now() + Duration::from_millis(stream_ms);
                            let events = futures_util::stream::unfold(0u32, move |n| async move {
                                if Instant::now() >= until {
                                    return None;
                                }
                                tokio::time::sleep(Duration::from_millis(100)).await;
                                let event = format!("data: tick {n}\n\n");
                                Some((Ok::<_, std::io::Error>(Bytes::from(event)), n + 1))
                            });
                            return axum::response::Response::builder()
                                .header("content-type", "text/event-stream")
                                .body(axum::body::Body::from_stream(events))
                                .unwrap();
                        }
                        // ?quiet_ms=N: one event at once, then nothing for N ms, then the end
                        let quiet_ms = uri
                            .query()
                            .and_then(|q| {
                                q.split('&')
                                    .find_map(|p| p.strip_prefix("quiet_ms="))
                                    .and_then(|v| v.parse::<u64>().ok())
                            })
                            .unwrap_or(0);
                        if quiet_ms > 0 {
                            let events = futures_util::stream::unfold(0u32, move |n| async move {
                                match n {
                                    0 => Some((
                                        Ok::<_, std::io::Error>(Bytes::from("data: hello\n\n")),
                                        1,
                                    )),
                                    _ => {
                                        tokio::time::sleep(Duration::from_millis(quiet_ms)).await;
                                        None
                                    }
                                }
                            });
                            return axum::response::Response::builder()
                                .header("content-type", "text/event-stream")
                                .body(axum::body::Body::from_stream(events))
                                .unwrap();
                        }
                        axum::response::IntoResponse::into_response("hello from upstream")
                    }
                },
            )
            // an app that takes uploads of any size: body caps are the gateway's to enforce
            .layer(axum::extract::DefaultBodyLimit::disable());
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Upstream { addr, seen, task }
    }

    pub fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    pub fn last(&self) -> Seen {
        self.seen
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("a request")
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An answer's status and its JSON body.
pub async fn json_of(resp: reqwest::Response) -> (u16, Value) {
    let status = resp.status().as_u16();
    let body = resp.json().await.expect("a JSON body");
    (status, body)
}

/// A free loopback port, never the same one twice in this process: tests run in parallel, and
/// two gateways handed one number would answer for each other. Picked below Linux's ephemeral
/// range (32768–60999): a port the kernel chose there could be handed, between this pick and
/// the gateway's bind, to an outgoing connection of the tests' own clients or databases (seen:
/// "cannot listen on 127.0.0.1:36785: Address already in use"). Each test binary starts at its
/// own offset, and a port something else holds is skipped.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 10_000;
    const SPAN: u32 = 22_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let offset = (std::process::id() % 220) * 100;
    loop {
        let i = NEXT.fetch_add(1, Ordering::Relaxed);
        assert!(
            i < SPAN,
            "no free loopback port left below the ephemeral range"
        );
        let port = (LOW + (offset + i) % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// Which database a test gateway keeps its data in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Store {
    /// A SQLite file in the gateway's directory (the default).
    Sqlite,
    /// A database on a PostgreSQL server of the test's own (`postgres::Postgres`).
    Postgres,
}

/// Runs each named test body (`async fn(Store)`) once on each store, as two tests:
/// `<name>::sqlite` and `<name>::postgres`.
#[macro_export]
macro_rules! on_each_store {
    ($($name:ident),* $(,)?) => { $(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn sqlite() {
                super::$name(super::common::Store::Sqlite).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn postgres() {
                super::$name(super::common::Store::Postgres).await
            }
        }
    )* };
}

/// Settings a test may change; everything else is the shipped default.
#[derive(Clone)]
pub struct Settings {
    /// Where the data lives.
    pub store: Store,
    pub flush_interval_ms: u64,
    pub mode: &'static str,
    pub idle_timeout_s: u64,
    pub refresh_interval_ms: u64,
    pub grace_period_s: u64,
    pub free_paths: Vec<String>,
    /// More `[proxy]` keys.
    pub proxy_extra: String,
    /// More `[admin]` keys (with `tls_cert`, the admin listener serves HTTPS).
    pub admin_extra: String,
    /// More `[storage]` keys.
    pub storage_extra: String,
    /// More `[metrics]` keys.
    pub metrics_extra: String,
    /// Several upstreams instead of the one `Gateway::start` is given.
    pub upstreams: Option<Vec<SocketAddr>>,
    /// The `[[plans]]` tables; the default is one `free` plan without limits, so tests that are
    /// not about limits are not limited.
    pub plans: String,
    /// `[stripe] api_base`: a fake Stripe's address.
    pub stripe_api_base: Option<String>,
    /// Environment for the process; the defaults set the admin token and Stripe secrets.
    pub env: Vec<(&'static str, String)>,
    /// Where the SQLite file goes; the default is the gateway's own temporary directory.
    pub db_path: Option<PathBuf>,
    /// A lower descriptor limit (soft and hard) for the process, as `ulimit -n` sets it.
    pub nofile: Option<u64>,
    pub extra: String,
}

impl Settings {
    /// The shipped defaults on `store`.
    pub fn on(store: Store) -> Settings {
        Settings {
            store,
            ..Settings::default()
        }
    }
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            store: Store::Sqlite,
            flush_interval_ms: 200,
            mode: "session",
            idle_timeout_s: 300,
            refresh_interval_ms: 200,
            grace_period_s: 5,
            free_paths: vec!["/public/*".into()],
            proxy_extra: String::new(),
            admin_extra: String::new(),
            storage_extra: String::new(),
            metrics_extra: String::new(),
            upstreams: None,
            plans: "[[plans]]\nname = \"free\"\n".into(),
            stripe_api_base: None,
            env: vec![
                ("TOLLGATE_ADMIN_TOKEN", ADMIN_TOKEN.into()),
                ("STRIPE_SECRET_KEY", STRIPE_KEY.into()),
                ("STRIPE_WEBHOOK_SECRET", WEBHOOK_SECRET.into()),
            ],
            db_path: None,
            nofile: None,
            extra: String::new(),
        }
    }
}

/// The config file of a test gateway: `s` on the shipped defaults, listening on `ports`.
pub fn config_text(
    upstream: SocketAddr,
    s: &Settings,
    db: &Path,
    ports: (u16, u16, u16),
) -> String {
    let (proxy, admin, metrics) = ports;
    let free_paths: Vec<String> = s.free_paths.iter().map(|p| format!("{p:?}")).collect();
    format!(
        r#"
[proxy]
listen = "127.0.0.1:{proxy}"
upstream = {upstream}
free_paths = [{free}]
threads = 2
grace_period_s = {grace}
graceful_shutdown_timeout_s = 1
negative_cache_ttl_ms = 200
{proxy_extra}

[admin]
listen = "127.0.0.1:{admin}"
{admin_extra}

[metrics]
listen = "127.0.0.1:{metrics}"
{metrics_extra}

[storage]
path = "{db}"
flush_interval_ms = {flush}
refresh_interval_ms = {refresh}
{storage_extra}

[metering]
mode = "{mode}"
idle_timeout_s = {idle}

[stripe]
api_base = "{stripe}"
success_url = "http://127.0.0.1:{admin}/payments/success?session_id={{CHECKOUT_SESSION_ID}}"
cancel_url = "http://127.0.0.1:{admin}/payments/"

{plans}
{extra}
"#,
        plans = s.plans,
        proxy_extra = s.proxy_extra,
        admin_extra = s.admin_extra,
        storage_extra = s.storage_extra,
        metrics_extra = s.metrics_extra,
        stripe = s.stripe_api_base.as_deref().unwrap_or("http://127.0.0.1:9"),
        upstream = match &s.upstreams {
            Some(list) => format!(
                "[{}]",
                list.iter()
                    .map(|a| format!("\"{a}\""))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            None => format!("\"{upstream}\""),
        },
        free = free_paths.join(", "),
        grace = s.grace_period_s,
        db = db.display(),
        flush = s.flush_interval_ms,
        refresh = s.refresh_interval_ms,
        mode = s.mode,
        idle = s.idle_timeout_s,
        extra = s.extra,
    )
}

/// A `tollgate serve` process and its files. Killed (by its own pid) when dropped.
pub struct Gateway {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub db: PathBuf,
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    pub metrics: SocketAddr,
    child: Option<Child>,
    log: PathBuf,
    env: Vec<(&'static str, String)>,
    admin_https: bool,
    nofile: Option<u64>,
    /// The PostgreSQL server (this test binary's shared one) and database, on
    /// `Store::Postgres`.
    pg: Option<(&'static postgres::Postgres, String)>,
}

impl Gateway {
    /// Writes a config for `upstream` and starts the gateway.
    pub async fn start(upstream: SocketAddr, mut s: Settings) -> Gateway {
        let pg = match s.store {
            Store::Sqlite => None,
            Store::Postgres => {
                let server = postgres::Postgres::shared();
                let url = server.database().await;
                s.storage_extra.push_str("\nbackend = \"postgres\"\n");
                s.env.push(("TOLLGATE_DATABASE_URL", url.clone()));
                let name = url.rsplit('/').next().unwrap().to_string();
                Some((server, name))
            }
        };
        let dir = tempfile::tempdir().unwrap();
        let db = s
            .db_path
            .clone()
            .unwrap_or_else(|| dir.path().join("tollgate.db"));
        let config = dir.path().join("tollgate.toml");
        let (proxy, admin, metrics) = (free_port(), free_port(), free_port());
        std::fs::write(
            &config,
            config_text(upstream, &s, &db, (proxy, admin, metrics)),
        )
        .unwrap();
        let mut g = Gateway {
            log: dir.path().join("tollgate.log"),
            proxy: ([127, 0, 0, 1], proxy).into(),
            admin: ([127, 0, 0, 1], admin).into(),
            metrics: ([127, 0, 0, 1], metrics).into(),
            dir,
            config,
            db,
            child: None,
            env: s.env,
            admin_https: s.admin_extra.contains("tls_cert"),
            nofile: s.nofile,
            pg,
        };
        g.spawn().await;
        g
    }

    /// Sets `key` in the process's environment from its next start (a rotated secret, say).
    pub fn set_env(&mut self, key: &'static str, value: &str) {
        self.env.retain(|(k, _)| *k != key);
        self.env.push((key, value.to_string()));
    }

    /// Starts (or restarts) the process and waits until it serves.
    pub async fn spawn(&mut self) {
        assert!(self.child.is_none(), "already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut command = match self.nofile {
            None => Command::new(&*BIN),
            Some(n) => {
                let mut c = Command::new("sh");
                c.arg("-c")
                    .arg(format!("ulimit -n {n} && exec \"$0\" \"$@\""))
                    .arg(&*BIN);
                c
            }
        };
        let child = command
            .args(["serve", "--config"])
            .arg(&self.config)
            .env("RUST_LOG", "warn")
            .env_remove("TOLLGATE_ADMIN_TOKEN")
            .env_remove("STRIPE_SECRET_KEY")
            .env_remove("STRIPE_WEBHOOK_SECRET")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("tollgate starts");
        self.child = Some(child);
        self.wait_ready().await;
    }

    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        // Only "is it up": the tests that serve the admin listener over HTTPS verify its
        // certificate themselves.
        let client = reqwest::Client::builder()
            .danger_accept_invalid_certs(self.admin_https)
            .build()
            .unwrap();
        let scheme = if self.admin_https { "https" } else { "http" };
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!(
                    "tollgate exited during start-up ({status}):\n{}",
                    self.log()
                );
            }
            let health = client
                .get(format!("{scheme}://{}/health", self.admin))
                .send()
                .await;
            // Our own proxy, not whatever else may listen there: it refuses a made-up key with
            // its JSON error. (Tests counting access_logs leave this path out.)
            let proxy_up = match client
                .get(format!("http://{}/__ready", self.proxy))
                .header("X-License-Key", "tg_readiness_probe")
                .send()
                .await
            {
                Ok(r) if r.status() == 401 => r
                    .text()
                    .await
                    .is_ok_and(|t| t.contains("invalid_license_key")),
                _ => false,
            };
            if health.is_ok_and(|r| r.status().is_success()) && proxy_up {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "tollgate did not start:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.proxy)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    /// A GET through the proxy with `key` in `X-License-Key`.
    pub async fn get_with_key(
        &self,
        c: &reqwest::Client,
        path: &str,
        key: &str,
    ) -> reqwest::Response {
        keyed_get(c, &self.url(path), key).await
    }

    /// The metrics listener's exposition text (asserting it answers 200).
    pub async fn metrics_text(&self) -> String {
        let r = client()
            .get(format!("http://{}/metrics", self.metrics))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r.text().await.unwrap()
    }

    /// One unlabelled sample from `/metrics`.
    pub async fn metric(&self, name: &str) -> f64 {
        self.metrics_text()
            .await
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("{name} not in /metrics"))
    }

    /// An operator API request with the admin token.
    pub fn api(
        &self,
        c: &reqwest::Client,
        method: reqwest::Method,
        path: &str,
    ) -> reqwest::RequestBuilder {
        c.request(method, self.admin_url(path))
            .bearer_auth(ADMIN_TOKEN)
    }

    /// A console page's HTML, signed in with the admin token as a browser would.
    pub async fn console_page(&self, path: &str) -> String {
        let browser = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .unwrap();
        let signed = browser
            .post(self.admin_url("/console/sign-in"))
            .header("Origin", format!("http://{}", self.admin))
            .form(&[("token", ADMIN_TOKEN)])
            .send()
            .await
            .unwrap();
        let cookie = signed.headers()["set-cookie"].to_str().unwrap();
        let cookie = cookie.split(';').next().unwrap().to_string();
        browser
            .get(self.admin_url(path))
            .header("Cookie", cookie)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill -{sig} failed");
    }

    /// Waits for the process to exit (bounded) and returns how it ended.
    pub async fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                self.child = None;
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "tollgate did not exit within {within:?}:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs the CLI against this gateway's config.
    /// The CLI on this gateway's config, with its environment (a database URL, say).
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        self.command(args).output().expect("the CLI runs")
    }

    /// The binary with this gateway's config and environment (as systemd gives every command
    /// of one unit the same), to run `args`.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&*BIN);
        cmd.arg("--config")
            .arg(&self.config)
            .args(args)
            .env("RUST_LOG", "warn")
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        cmd
    }

    /// `keys create --json` with these hours; returns (id, key).
    pub fn create_key(&self, name: &str, hours: &str) -> (i64, String) {
        let out = self.cli(&["keys", "create", "--name", name, "--hours", hours, "--json"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        (
            v["id"].as_i64().unwrap(),
            v["license_key"].as_str().unwrap().to_string(),
        )
    }

    /// `GET path` on the admin API with the operator's token, answered 200: the body.
    pub async fn api_text(&self, c: &reqwest::Client, path: &str) -> String {
        let r = self
            .api(c, reqwest::Method::GET, path)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "GET {path}");
        r.text().await.unwrap()
    }

    /// [`Gateway::api_text`] as JSON.
    pub async fn api_json(&self, c: &reqwest::Client, path: &str) -> Value {
        serde_json::from_str(&self.api_text(c, path).await).unwrap()
    }

    /// `GET path` on the admin server as `key`'s customer (`X-License-Key`), answered 200: the
    /// JSON body.
    pub async fn customer_json(&self, c: &reqwest::Client, path: &str, key: &str) -> Value {
        let r = c
            .get(self.admin_url(path))
            .header("X-License-Key", key)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "GET {path}");
        r.json().await.unwrap()
    }

    /// `POST /api/licenses` with `body` (the operator's token), answered 201; (id, key).
    pub async fn create_license(&self, c: &reqwest::Client, body: Value) -> (i64, String) {
        let r = self
            .api(c, reqwest::Method::POST, "/api/licenses")
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        let made: Value = r.json().await.unwrap();
        (
            made["id"].as_i64().unwrap(),
            made["license_key"].as_str().unwrap().to_string(),
        )
    }

    /// Which store the gateway keeps its data in.
    pub fn backend(&self) -> Store {
        match self.pg {
            None => Store::Sqlite,
            Some(_) => Store::Postgres,
        }
    }

    /// The SQLite file (a test on `Store::Postgres` reads through [`Gateway::count`]).
    pub fn db(&self) -> Connection {
        assert!(
            self.pg.is_none(),
            "db() is SQLite's: use count() or books()"
        );
        let c = Connection::open(&self.db).unwrap();
        c.busy_timeout(Duration::from_secs(5)).unwrap();
        c
    }

    /// The one integer `sql` returns, on whichever store the gateway has. On PostgreSQL it is
    /// cast to bigint (a `sum` there is numeric); the test's runtime must be multi-threaded.
    pub fn count(&self, sql: &str) -> i64 {
        match &self.pg {
            None => self.db().query_row(sql, [], |r| r.get(0)).unwrap(),
            Some((server, name)) => tokio::task::block_in_place(|| {
                tokio::runtime::Handle::current().block_on(async {
                    let c = server.connect(name).await;
                    let q = format!("SELECT ({sql})::bigint");
                    c.query_one(q.as_str(), &[]).await.unwrap().get(0)
                })
            }),
        }
    }

    /// The gateway's store, opened beside it (as the CLI opens it), for a test to write as the
    /// gateway's own code would.
    pub async fn store(&self) -> gateway::store::SharedStore {
        match &self.pg {
            None => gateway::store::open_sqlite(&self.db).unwrap(),
            Some((server, name)) => std::sync::Arc::new(
                gateway::store::postgres::PgStore::open(&server.url(name), 2)
                    .await
                    .unwrap(),
            ),
        }
    }

    /// Runs `sql` (a change a test makes behind the gateway's back), on whichever store.
    pub fn execute(&self, sql: &str) {
        match &self.pg {
            None => {
                self.db().execute_batch(sql).unwrap();
            }
            Some((server, name)) => tokio::task::block_in_place(|| {
                tokio::runtime::Handle::current().block_on(async {
                    server.connect(name).await.batch_execute(sql).await.unwrap()
                })
            }),
        }
    }

    /// A license's money facts, on whichever store the gateway has.
    pub fn books(&self, id: i64) -> Books {
        let one = |expr: &str, table: &str, key: &str| {
            self.count(&format!("SELECT {expr} FROM {table} WHERE {key} = {id}"))
        };
        let usage = |expr: &str| {
            one(
                &format!("coalesce(sum(CASE WHEN kind = 'usage' THEN {expr} END), 0)"),
                "usage_history",
                "license_id",
            )
        };
        Books {
            balance_ms: one("balance_ms", "licenses", "id"),
            used_ms: one("used_ms", "licenses", "id"),
            requests_total: one("requests_total", "licenses", "id"),
            history_sum_ms: one("coalesce(sum(delta_ms), 0)", "usage_history", "license_id"),
            usage_ms: usage("-delta_ms"),
            usage_requests: usage("requests"),
        }
    }

    /// Waits until `sql` returns `want` (flushes are asynchronous); panics after 10 s.
    pub async fn wait_for(&self, sql: &str, want: i64) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let got = self.count(sql);
            if got == want {
                return;
            }
            assert!(Instant::now() < deadline, "{sql}: got {got}, want {want}");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub fn cli(config: &Path, args: &[&str]) -> std::process::Output {
    Command::new(&*BIN)
        .arg("--config")
        .arg(config)
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("the CLI runs")
}

/// Per-license money facts read from SQLite.
#[derive(Debug, PartialEq, Eq)]
pub struct Books {
    pub balance_ms: i64,
    pub used_ms: i64,
    pub requests_total: i64,
    /// SUM(delta_ms) over all history rows: must equal the balance.
    pub history_sum_ms: i64,
    /// SUM(-delta_ms) over usage rows: must equal used_ms.
    pub usage_ms: i64,
    pub usage_requests: i64,
}

pub fn books(c: &Connection, id: i64) -> Books {
    let (balance_ms, used_ms, requests_total) = c
        .query_row(
            "SELECT balance_ms, used_ms, requests_total FROM licenses WHERE id = ?1",
            [id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    let (history_sum_ms, usage_ms, usage_requests) = c
        .query_row(
            "SELECT coalesce(sum(delta_ms), 0),
                    coalesce(sum(CASE WHEN kind = 'usage' THEN -delta_ms END), 0),
                    coalesce(sum(CASE WHEN kind = 'usage' THEN requests END), 0)
             FROM usage_history WHERE license_id = ?1",
            [id],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();
    Books {
        balance_ms,
        used_ms,
        requests_total,
        history_sum_ms,
        usage_ms,
        usage_requests,
    }
}

/// A GET of `url` with `key` in `X-License-Key` (for tasks that do not hold the gateway).
pub async fn keyed_get(c: &reqwest::Client, url: &str, key: &str) -> reqwest::Response {
    c.get(url)
        .header("X-License-Key", key)
        .send()
        .await
        .unwrap()
}

/// The line of `/usage/limits` that names `limit`, as `key`'s customer sees it on `gw`.
pub async fn limit_line(gw: &Gateway, c: &reqwest::Client, key: &str, limit: &str) -> Value {
    let v: Value = c
        .get(gw.admin_url("/usage/limits"))
        .header("X-License-Key", key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["limits"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["limit"] == limit)
        .cloned()
        .unwrap_or_else(|| panic!("no {limit} line in {v}"))
}

/// A client that never pools connections across tests.
/// The wall clock, Unix ms.
pub fn wall_ms() -> i64 {
    let since = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
    since.unwrap().as_millis() as i64
}

/// A license creation time (a period anchor) whose monthly plan periods have a boundary
/// exactly at `boundary` (Unix ms, UTC), the current one ending there: a test moves a
/// license's period to end a few seconds ahead instead of waiting a month.
pub fn anchor_ending_at(boundary: i64) -> i64 {
    const DAY: i64 = 86_400_000;
    let calendar = gateway::periods::Calendar::utc();
    (28..400)
        .map(|d| boundary - d * DAY)
        .find(|&a| calendar.period(a, boundary).0 == boundary)
        .expect("a day of some month before")
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// The gateway in this test's own process (`tollgate::run`), on listeners bound to port 0 and a
/// manual clock: a test moves time by [`InProcess::advance`] instead of sleeping through it.
/// Prometheus counters are the process's, shared with any other in-process gateway: tests of
/// metrics use [`Gateway`].
pub struct InProcess {
    pub dir: tempfile::TempDir,
    pub db: PathBuf,
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    pub clock: Arc<gateway::ledger::ManualClock>,
    /// The running gateway's parts (its ledger, store, config).
    pub app: gateway::server::App,
    stopper: tollgate::Stopper,
    thread: Option<std::thread::JoinHandle<anyhow::Result<()>>>,
}

impl InProcess {
    pub async fn start(upstream: SocketAddr, s: Settings) -> InProcess {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("tollgate.db");
        let bind = || TcpListener::bind("127.0.0.1:0").unwrap();
        let (proxy, admin, metrics) = (bind(), bind(), bind());
        let port = |l: &TcpListener| l.local_addr().unwrap().port();
        let ports = (port(&proxy), port(&admin), port(&metrics));
        let config = gateway::config::Config::parse(&config_text(upstream, &s, &db, ports))
            .unwrap_or_else(|e| panic!("the test config: {e}"));
        let (proxy_addr, admin_addr) = (config.proxy.listen, config.admin.listen);
        let env = |name: &str| {
            s.env
                .iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| v.clone())
        };
        let secrets = admin::Secrets {
            admin_token: env("TOLLGATE_ADMIN_TOKEN"),
            stripe_secret_key: env("STRIPE_SECRET_KEY"),
            webhook_secrets: env("STRIPE_WEBHOOK_SECRET").into_iter().collect(),
        };
        let clock = gateway::ledger::ManualClock::new(gateway::ledger::now_ms());
        let stopper = tollgate::Stopper::default();
        let start = tollgate::Start {
            listeners: tollgate::Listeners {
                proxy: Some(proxy),
                admin: Some(admin),
                metrics: Some(metrics),
            },
            clock: clock.clone(),
            shutdown: tollgate::Shutdown::Stopper(stopper.clone()),
        };
        let (app_tx, app_rx) = std::sync::mpsc::channel();
        let thread = std::thread::spawn(move || {
            let opts = gateway::server::RunOptions::default();
            tollgate::run(config, secrets, &opts, start, |app| {
                let _ = app_tx.send(app.clone());
            })
        });
        let app = tokio::task::spawn_blocking(move || app_rx.recv())
            .await
            .unwrap()
            .expect("the gateway started");
        let g = InProcess {
            app,
            dir,
            db,
            proxy: proxy_addr,
            admin: admin_addr,
            clock,
            stopper,
            thread: Some(thread),
        };
        g.wait_ready().await;
        g
    }

    async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let c = client();
        loop {
            let health = c.get(format!("http://{}/health", self.admin)).send().await;
            let proxy = c.get(self.url("/__ready")).send().await;
            if health.is_ok_and(|r| r.status().is_success()) && proxy.is_ok() {
                return;
            }
            let ended = self.thread.as_ref().is_some_and(|t| t.is_finished());
            assert!(!ended, "the in-process gateway ended during start-up");
            assert!(
                Instant::now() < deadline,
                "the in-process gateway did not start"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.proxy)
    }

    /// Moves the gateway's clock (wall and monotonic) on by `ms`.
    pub fn advance(&self, ms: i64) {
        self.clock.advance(ms);
    }

    /// A license with `hours` of prepaid time, made through the operator API (so it is
    /// created on the gateway's clock): its id and key.
    pub async fn create_key(&self, name: &str, hours: f64) -> (i64, String) {
        let v: Value = client()
            .post(format!("http://{}/api/licenses", self.admin))
            .bearer_auth(ADMIN_TOKEN)
            .json(&serde_json::json!({"name": name, "hours": hours}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        (
            v["id"].as_i64().unwrap(),
            v["license_key"].as_str().unwrap().to_string(),
        )
    }

    pub fn db(&self) -> Connection {
        Connection::open(&self.db).unwrap()
    }

    /// Waits (bounded) until `sql` returns `want`.
    pub async fn wait_for(&self, sql: &str, want: i64) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let got: i64 = self.db().query_row(sql, [], |r| r.get(0)).unwrap_or(-1);
            if got == want {
                return;
            }
            assert!(Instant::now() < deadline, "{sql}: {got}, wanted {want}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Shuts down as SIGTERM would, and waits until the last flush is committed.
    pub async fn stop(&mut self) {
        self.stopper.stop();
        let thread = self.thread.take().expect("running");
        tokio::task::spawn_blocking(move || thread.join())
            .await
            .unwrap()
            .expect("the gateway's thread")
            .expect("tollgate::run");
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        // a test that ends early: stop serving (its thread ends on its own)
        self.stopper.stop();
    }
}
