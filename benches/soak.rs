//! Soak: the real `tollgate serve` in front of a loopback app under steady load for a bounded
//! time (`SOAK_SECS`, default 600), sampling the gateway's resident memory and open file
//! descriptors every 10 s. Passes when both stay flat: the last sample within 20 % (memory) and
//! 16 descriptors of the first sample after a one-minute warm-up (or a tenth of the run).
//!
//!     cargo bench --bench soak                 # 10 minutes
//!     SOAK_SECS=60 cargo bench --bench soak    # a quick look
//!     SOAK_REFUSED=1 cargo bench --bench soak  # under a rate limit that refuses nearly all
//!
//! Traffic goes only to loopback; the load stops by itself at the end of the run.

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_tollgate");

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

fn main() {
    // `cargo bench` passes --bench; nothing to filter here
    let secs: u64 = std::env::var("SOAK_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(600);
    let refused = std::env::var("SOAK_REFUSED").is_ok_and(|v| v == "1");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(soak(secs, refused));
}

async fn soak(secs: u64, refused: bool) {
    // the app: a small fixed answer
    let app = axum::Router::new().fallback(|| async { "soak" });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let upstream = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("tollgate.toml");
    let (proxy, admin, metrics) = (free_port(), free_port(), free_port());
    std::fs::write(
        &config,
        format!(
            "[proxy]\nlisten = \"127.0.0.1:{proxy}\"\nupstream = \"{upstream}\"\nthreads = 1\n\
             [admin]\nlisten = \"127.0.0.1:{admin}\"\n[metrics]\nlisten = \"127.0.0.1:{metrics}\"\n\
             [storage]\npath = \"{}\"\nflush_interval_ms = 1000\n\
             [metering]\nmode = \"request_time\"\n\
             [[plans]]\nname = \"free\"\n{}",
            dir.path().join("tollgate.db").display(),
            // the refusal path: 20 requests a second go through, the rest get 429
            if refused {
                "requests_per_second = 20\n"
            } else {
                ""
            }
        ),
    )
    .unwrap();
    let out = Command::new(BIN)
        .arg("--config")
        .arg(&config)
        .args([
            "keys", "create", "--name", "soak", "--hours", "100000", "--json",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let key = v["license_key"].as_str().unwrap().to_string();
    let mut child = Command::new(BIN)
        .arg("--config")
        .arg(&config)
        .arg("serve")
        .env("RUST_LOG", "warn")
        .env_remove("TOLLGATE_ADMIN_TOKEN")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let url = format!("http://127.0.0.1:{proxy}/soak");
    let c = reqwest::Client::new();
    let start = Instant::now();
    while c
        .get(&url)
        .header("X-License-Key", &key)
        .send()
        .await
        .is_err()
    {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "tollgate did not start"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // the plan has no limits (or, with SOAK_REFUSED, a rate that refuses nearly everything)
    // load: 8 clients with keep-alive, and one that opens a new connection per request (fd
    // churn), all stopping at the deadline
    let deadline = Instant::now() + Duration::from_secs(secs);
    let done = Arc::new(AtomicU64::new(0));
    let denied = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for i in 0..9 {
        let (url, key, done, denied, failed, stop) = (
            url.clone(),
            key.clone(),
            done.clone(),
            denied.clone(),
            failed.clone(),
            stop.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let c = if i == 8 {
                reqwest::Client::builder().pool_max_idle_per_host(0).build()
            } else {
                reqwest::Client::builder().build()
            }
            .unwrap();
            while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
                match c.get(&url).header("X-License-Key", &key).send().await {
                    Ok(r) if r.status() == 200 => {
                        let _ = r.bytes().await;
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(r) if r.status() == 429 && refused => {
                        let _ = r.bytes().await;
                        denied.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }

    let warmup = Duration::from_secs((secs / 10).clamp(5, 60));
    let mut baseline: Option<(u64, usize)> = None;
    let mut last = (0, 0);
    println!(
        "{:>6} {:>12} {:>10} {:>6}",
        "secs", "requests", "rss KiB", "fds"
    );
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_secs(10).min(deadline - Instant::now())).await;
        let sample = (rss_kib(pid), fds(pid));
        let t = start.elapsed().as_secs();
        println!(
            "{t:>6} {:>12} {:>10} {:>6}",
            done.load(Ordering::Relaxed) + denied.load(Ordering::Relaxed),
            sample.0,
            sample.1
        );
        if baseline.is_none() && start.elapsed() >= warmup {
            baseline = Some(sample);
        }
        last = sample;
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let _ = child.wait();

    let (rss0, fd0) = baseline.unwrap_or(last);
    let requests = done.load(Ordering::Relaxed) + denied.load(Ordering::Relaxed);
    println!(
        "soak: {secs} s, {requests} requests ({:.0}/s, {} refused with 429), {} failed; \
         rss {rss0} -> {} KiB ({:+.1} %), fds {fd0} -> {}",
        requests as f64 / secs as f64,
        denied.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
        last.0,
        (last.0 as f64 - rss0 as f64) * 100.0 / rss0.max(1) as f64,
        last.1
    );
    assert!(
        last.0 as f64 <= rss0 as f64 * 1.2,
        "resident memory grew from {rss0} to {} KiB",
        last.0
    );
    assert!(
        last.1 <= fd0 + 16,
        "open descriptors grew from {fd0} to {}",
        last.1
    );
}
