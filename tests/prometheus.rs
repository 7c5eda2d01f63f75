//! A real Prometheus (Debian's `prometheus`, installed by scripts/setup.sh) scrapes the real
//! gateway on loopback; the test reads back, through Prometheus's query API, exactly the
//! requests it made. The Grafana dashboard's queries are checked against the same Prometheus.

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// A Prometheus server on a loopback port, scraping `target` every second. Killed (by its own
/// pid) when dropped.
struct Prometheus {
    url: String,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(target: std::net::SocketAddr) -> Prometheus {
        let bin = ["prometheus", "/usr/bin/prometheus"]
            .into_iter()
            .find(|b| Command::new(b).arg("--version").output().is_ok())
            .expect("prometheus is installed (./scripts/setup.sh installs Debian's package)");
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 scrape_configs:\n  - job_name: tollgate\n    static_configs:\n      \
                 - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        let port = free_port();
        let child = Command::new(bin)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus starts");
        Prometheus {
            url: format!("http://127.0.0.1:{port}"),
            child,
            _dir: dir,
        }
    }

    /// Runs an instant query; `None` while Prometheus is not up or the series has no sample.
    async fn query(&self, c: &reqwest::Client, q: &str) -> Option<f64> {
        let v = self.query_raw(c, q).await?;
        v["data"]["result"][0]["value"][1]
            .as_str()
            .and_then(|s| s.parse().ok())
    }

    async fn query_raw(&self, c: &reqwest::Client, q: &str) -> Option<Value> {
        let r = c
            .get(format!("{}/api/v1/query", self.url))
            .query(&[("query", q)])
            .send()
            .await
            .ok()?;
        r.json::<Value>().await.ok()
    }

    /// Waits until `q` evaluates to `want`.
    async fn wait_for(&self, c: &reqwest::Client, q: &str, want: f64) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let got = self.query(c, q).await;
            if got == Some(want) {
                return;
            }
            assert!(Instant::now() < deadline, "{q}: got {got:?}, want {want}");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Waits until `q` has a value, and returns it.
    async fn value(&self, c: &reqwest::Client, q: &str) -> f64 {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(v) = self.query(c, q).await {
                return v;
            }
            assert!(Instant::now() < deadline, "{q}: no value from Prometheus");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_real_prometheus_reads_exactly_the_requests_the_test_made() {
    let up = Upstream::start().await;
    let gw = Gateway::start(up.addr, Settings::default()).await;
    let (_, key) = gw.create_key("Ada", "1");
    let c = client();

    // Prometheus starts after the gateway is ready: from its first scrape until the traffic
    // below, the counters do not move, so the first value it reads is the baseline.
    let prom = Prometheus::start(gw.metrics);
    prom.wait_for(&c, "up{job=\"tollgate\"}", 1.0).await;
    let total = "sum(tollgate_requests_total{job=\"tollgate\"})";
    let ok = "tollgate_requests_total{job=\"tollgate\",outcome=\"ok\"}";
    let invalid = "tollgate_denied_total{job=\"tollgate\",reason=\"invalid_license_key\"}";
    let (total0, ok0, invalid0) = (
        prom.value(&c, total).await,
        prom.value(&c, ok).await,
        prom.value(&c, invalid).await,
    );

    for _ in 0..7 {
        let r = c
            .get(gw.url("/work"))
            .header("X-License-Key", &key)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    for _ in 0..3 {
        let r = c
            .get(gw.url("/work"))
            .header("X-License-Key", "tg_not_a_key")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
    }
    prom.wait_for(&c, total, total0 + 10.0).await;
    prom.wait_for(&c, ok, ok0 + 7.0).await;
    prom.wait_for(&c, invalid, invalid0 + 3.0).await;

    // the histogram and the flusher's metrics are there too, with sane values
    let p99 = "histogram_quantile(0.99, sum by (le) (tollgate_request_duration_seconds_bucket{job=\"tollgate\"}))";
    let q = prom.value(&c, p99).await;
    assert!(q > 0.0 && q <= 10.0, "p99 {q}");
    let flushed = "tollgate_flushed_rows_total{job=\"tollgate\",table=\"access_logs\"}";
    // every request the test made is written (probes from start-up come on top)
    prom.wait_for(&c, &format!("{flushed} >= bool 10"), 1.0)
        .await;
}

/// Prometheus's own linter passes the exposition: names, units, types and HELP lines.
#[tokio::test(flavor = "multi_thread")]
async fn promtool_check_metrics_passes() {
    use std::io::Write;
    let up = Upstream::start().await;
    let gw = Gateway::start(up.addr, Settings::default()).await;
    let text = gw.metrics_text().await;
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is installed (Debian's prometheus package has it)");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("# TYPE tollgate_charged_seconds_total counter"));
    assert!(text.contains("# TYPE tollgate_credited_seconds_total counter"));
}

/// Every query in the Grafana dashboard parses and names metrics the gateway exports.
#[tokio::test(flavor = "multi_thread")]
async fn the_grafana_dashboard_queries_run_against_prometheus() {
    let up = Upstream::start().await;
    // a meter configured, so its series (at zero) are there for the dashboard's units panel
    let s = Settings {
        extra: "[[meters]]\nname = \"audio_seconds\"\n".into(),
        ..Settings::default()
    };
    let gw = Gateway::start(up.addr, s).await;
    let c = client();
    let prom = Prometheus::start(gw.metrics);
    prom.wait_for(&c, "up{job=\"tollgate\"}", 1.0).await;
    let exported = gw.metrics_text().await;

    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("conf/grafana-dashboard.json");
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut exprs = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for t in panel["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().unwrap();
            exprs.push(expr.replace("$__rate_interval", "1m").replace("$job", ".*"));
        }
    }
    assert!(exprs.len() >= 8, "{exprs:?}");
    for expr in &exprs {
        let v = prom.query_raw(&c, expr).await.unwrap();
        assert_eq!(v["status"], "success", "{expr}: {v}");
        for word in expr.split(|ch: char| !(ch.is_ascii_alphanumeric() || ch == '_')) {
            if let Some(base) = word.strip_prefix("tollgate_") {
                let name = format!("tollgate_{base}");
                let family = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| name.strip_suffix(s))
                    .unwrap_or(&name);
                assert!(
                    exported.contains(&format!("# TYPE {family} ")),
                    "{expr}: {family} is not exported"
                );
            }
        }
    }
}
