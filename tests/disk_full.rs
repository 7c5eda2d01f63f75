//! Fault injection: the disk under SQLite fills up mid-run. The gateway goes on serving, keeps
//! the charges and access-log rows in memory, counts the failed writes in
//! `tollgate_store_errors_total`, and writes everything exactly once when space comes back.
//!
//! The disk is a real 16 MiB tmpfs mounted for the test (root, as in CI), filled with a file
//! until the kernel answers ENOSPC, and freed by deleting that file.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const HOUR_MS: i64 = 3_600_000;

/// A small tmpfs, unmounted (lazily, whatever still holds it open) when dropped.
struct TinyDisk {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl TinyDisk {
    fn mount(size: &str) -> TinyDisk {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk");
        std::fs::create_dir(&path).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size},mode=0700")])
            .arg("tollgate-test")
            .arg(&path)
            .output()
            .expect("mount runs");
        assert!(
            out.status.success(),
            "this test mounts a {size} tmpfs to fill it, which needs root (CAP_SYS_ADMIN): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        TinyDisk { path, _dir: dir }
    }

    /// Writes a file until the filesystem is full; returns its path and size.
    fn fill(&self) -> (PathBuf, u64) {
        let path = self.path.join("filler");
        let mut f = std::fs::File::create(&path).unwrap();
        let mut written = 0u64;
        for chunk in [1 << 20, 4096] {
            let buf = vec![0u8; chunk];
            loop {
                match f.write(&buf) {
                    Ok(0) => break,
                    Ok(n) => written += n as u64,
                    Err(e) if e.raw_os_error() == Some(28) => break, // ENOSPC
                    Err(e) => panic!("filling the disk: {e}"),
                }
            }
        }
        let _ = f.sync_all();
        (path, written)
    }
}

impl Drop for TinyDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

async fn request(c: &reqwest::Client, gw: &Gateway, key: &str) {
    let r = gw.get_with_key(c, "/work?sleep_ms=2", key).await;
    assert_eq!(r.status(), 200, "served while the disk is full");
}

fn free_bytes(path: &Path) -> u64 {
    let out = Command::new("df")
        .args(["--output=avail", "-B1"])
        .arg(path)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_keeps_serving_holds_charges_in_memory_and_writes_them_once_when_freed() {
    let disk = TinyDisk::mount("16m");
    let up = Upstream::start().await;
    let gw = Gateway::start(
        up.addr,
        Settings {
            mode: "request_time",
            db_path: Some(disk.path.join("tollgate.db")),
            ..Settings::default()
        },
    )
    .await;
    let (id, key) = gw.create_key("Ada", "10");
    let c = client();
    // the readiness probe's own row is left out
    let logs = format!("SELECT count(*) FROM access_logs WHERE license_id = {id}");

    // before: requests are written at every flush
    for _ in 0..20 {
        request(&c, &gw, &key).await;
    }
    gw.wait_for(&logs, 20).await;
    gw.wait_for(
        &format!("SELECT requests_total FROM licenses WHERE id = {id}"),
        20,
    )
    .await;
    let errors_before = gw.metric("tollgate_store_errors_total").await;

    // the disk fills up
    let (filler, size) = disk.fill();
    assert!(
        free_bytes(&disk.path) < 64 * 1024,
        "the disk is full after {size} bytes of filler"
    );
    eprintln!("disk full after {size} bytes of filler");
    let balance_at_fill = books(&gw.db(), id).balance_ms;

    // requests go on being answered; the writes fail and are counted
    let mut sent = 20;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        for _ in 0..10 {
            request(&c, &gw, &key).await;
        }
        sent += 10;
        if gw.metric("tollgate_store_errors_total").await > errors_before {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no store error counted in 20 s of a full disk:\n{}",
            gw.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // and they keep failing, for several flush intervals, while the load goes on: nothing more
    // reaches the disk
    let errors_at = gw.metric("tollgate_store_errors_total").await;
    let books_at = books(&gw.db(), id);
    // (the retries back off: 200 ms, 400 ms, 800 ms, ... up to 8 s)
    let logs_at = gw.count(&logs);
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut errors_after = errors_at;
    while errors_after < errors_at + 3.0 {
        assert!(
            Instant::now() < deadline,
            "every flush on the full disk fails: {errors_at} -> {errors_after}"
        );
        for _ in 0..10 {
            request(&c, &gw, &key).await;
        }
        sent += 10;
        tokio::time::sleep(Duration::from_millis(100)).await;
        errors_after = gw.metric("tollgate_store_errors_total").await;
    }
    let pending_logs = gw.metric("tollgate_pending_log_rows").await;
    assert_eq!(
        gw.metric("tollgate_pending_charges").await,
        1.0,
        "the license's usage waits in memory"
    );
    assert!(gw.metric("tollgate_pending_charge_seconds").await > 0.0);
    let written_logs = gw.count(&logs);
    let b = books(&gw.db(), id);
    assert_eq!(b, books_at, "the full disk took no charge");
    assert_eq!(written_logs, logs_at, "the full disk took no log row");
    assert!(b.requests_total < sent && written_logs < sent);
    assert!(
        pending_logs >= (sent - written_logs) as f64,
        "{pending_logs} log rows pending in memory, {} not on disk",
        sent - written_logs
    );
    assert!(b.balance_ms <= balance_at_fill);
    assert!(
        b.requests_total >= 20,
        "what was written before the fill stays"
    );
    assert_eq!(b.history_sum_ms, b.balance_ms, "what is on disk is whole");
    let held = sent - b.requests_total;
    eprintln!(
        "{sent} requests answered, {held} charges and {} log rows held in memory, \
         store errors {errors_before} -> {errors_after}",
        sent - written_logs
    );
    let log = gw.log();
    assert!(
        log.contains("flush failed") && log.contains("disk is full"),
        "the failure is logged with SQLite's reason:\n{log}"
    );

    // space comes back: everything is written, once
    std::fs::remove_file(&filler).unwrap();
    gw.wait_for(&logs, sent).await;
    gw.wait_for(
        &format!("SELECT requests_total FROM licenses WHERE id = {id}"),
        sent,
    )
    .await;
    let errors_settled = gw.metric("tollgate_store_errors_total").await;
    for _ in 0..5 {
        request(&c, &gw, &key).await;
    }
    sent += 5;
    gw.wait_for(&logs, sent).await;
    let db = gw.db();
    let check: String = db
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(check, "ok");
    let b = books(&db, id);
    assert_eq!(b.requests_total, sent, "each request charged once: {b:?}");
    assert_eq!(b.usage_requests, sent, "{b:?}");
    assert_eq!(b.history_sum_ms, b.balance_ms, "{b:?}");
    assert_eq!(b.balance_ms + b.used_ms, 10 * HOUR_MS, "{b:?}");
    assert_eq!(b.usage_ms, b.used_ms, "{b:?}");
    assert!(b.used_ms >= 2 * sent, "every request took its 2 ms: {b:?}");
    assert_eq!(
        gw.metric("tollgate_pending_log_rows").await,
        0.0,
        "nothing left pending"
    );
    assert_eq!(gw.metric("tollgate_pending_charges").await, 0.0);
    assert_eq!(gw.metric("tollgate_pending_charge_seconds").await, 0.0);
    assert_eq!(
        gw.metric("tollgate_store_errors_total").await,
        errors_settled,
        "no more errors once the disk has space"
    );
    drop(db);
    drop(gw);
}
