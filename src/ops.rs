//! Operating the gateway: the graceful upgrade (`tollgate reload`), systemd readiness
//! notification, and online backups (`tollgate backup`).

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use gateway::config::Config;

/// Tells systemd (when it started us with `Type=notify`) that this process is ready and is the
/// service's main process: after a graceful upgrade that is the new process, not the one
/// systemd started. Without `NOTIFY_SOCKET` this does nothing.
pub fn notify_ready() {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let message = format!("MAINPID={}\nREADY=1\n", std::process::id());
    let sent = (|| -> std::io::Result<()> {
        use std::os::unix::net::{SocketAddr, UnixDatagram};
        let socket = UnixDatagram::unbound()?;
        let bytes = path.as_encoded_bytes();
        let addr = match bytes.strip_prefix(b"@") {
            Some(name) => {
                use std::os::linux::net::SocketAddrExt;
                SocketAddr::from_abstract_name(name)?
            }
            None => SocketAddr::from_pathname(Path::new(&path))?,
        };
        socket.send_to_addr(message.as_bytes(), &addr)?;
        Ok(())
    })();
    if let Err(e) = sent {
        tracing::warn!(error = %e, "could not notify systemd");
    }
}

/// Where a running gateway with this config waits for its successor (Pingora's upgrade socket).
pub fn upgrade_socket(config: &Config) -> std::path::PathBuf {
    config.storage.path.with_extension("upgrade.sock")
}

/// The graceful upgrade, as `ExecReload` runs it: starts `tollgate serve --upgrade` with the
/// same config, waits until it listens for the old process's sockets, then sends the old
/// process (`pid`) SIGQUIT. The old one hands its listening sockets over, stops accepting,
/// finishes what is in flight, flushes and exits; the new one serves from the same sockets, so
/// no connection is refused.
pub fn reload(config_path: &Path, config: &Config, pid: u32) -> anyhow::Result<()> {
    if pid == 0 || pid == std::process::id() {
        bail!("--pid must name the running gateway");
    }
    let sock = upgrade_socket(config);
    let before = std::fs::metadata(&sock).ok().map(|m| m.ino());
    let exe = std::env::current_exe().context("finding this program")?;
    let mut child = Command::new(exe)
        .arg("--config")
        .arg(config_path)
        .args(["serve", "--upgrade"])
        .stdin(Stdio::null())
        .spawn()
        .context("starting the new gateway")?;
    // Pingora's new process replaces the socket file when it starts listening on it.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait()? {
            bail!("the new gateway exited before taking over ({status})");
        }
        let now = std::fs::metadata(&sock).ok().map(|m| m.ino());
        if now.is_some() && now != before {
            break;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            bail!("the new gateway did not open {} in 30 s", sock.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = Command::new("kill")
        .args(["-QUIT", &pid.to_string()])
        .status()
        .context("running kill")?;
    if !status.success() {
        let _ = child.kill();
        bail!("could not signal the running gateway (pid {pid})");
    }
    println!(
        "upgrade started: pid {} takes over from pid {pid}",
        child.id()
    );
    Ok(())
}

/// Copies the live database to `dest` with SQLite's online backup, in steps, while the gateway
/// writes: the copy is one consistent snapshot. Refuses to overwrite an existing file.
pub fn backup(config: &Config, dest: &Path) -> anyhow::Result<()> {
    if config.storage.backend == gateway::config::StoreKind::Postgres {
        bail!(
            "the store is PostgreSQL: back it up with pg_dump (pg_dump --format=custom \
             --file={} \"$TOLLGATE_DATABASE_URL\"), which copies it consistently while the \
             gateways run",
            dest.display()
        );
    }
    if dest.exists() {
        bail!("{} exists: choose a new file", dest.display());
    }
    gateway::store::sqlite::backup(&config.storage.path, dest)
        .with_context(|| format!("backing {} up", config.storage.path.display()))
}

/// `tollgate books`: every license's books checked (`gateway::store::books`); exit 1 when any
/// does not add up, each named. Safe while the gateways run: one consistent read, on any
/// store (a flush committing meanwhile is wholly in it or wholly out).
pub fn books(config: &Config, as_json: bool) -> anyhow::Result<std::process::ExitCode> {
    use gateway::store::books;
    let store = gateway::server::open_store(config)?;
    let rows = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting a runtime")?
        .block_on(store.books())?;
    store.close();
    let wrong = books::check(&rows);
    if as_json {
        let found: Vec<_> = wrong
            .iter()
            .map(|d| serde_json::json!({"license_id": d.license_id, "problem": d.what}))
            .collect();
        let out = serde_json::json!({
            "licenses": rows.len(),
            "add_up": found.is_empty(),
            "discrepancies": found,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else if wrong.is_empty() {
        println!(
            "{}: all {} licenses add up (balances to their history, reservations to their \
             leases)",
            store.describe(),
            rows.len()
        );
    } else {
        let licenses: std::collections::BTreeSet<i64> =
            wrong.iter().map(|d| d.license_id).collect();
        println!(
            "{}: {} of {} licenses do not add up:",
            store.describe(),
            licenses.len(),
            rows.len()
        );
        for d in &wrong {
            println!("  license {}: {}", d.license_id, d.what);
        }
    }
    Ok(if wrong.is_empty() {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::from(1)
    })
}

/// `migrate` on PostgreSQL: the database meters as this config says (`metering.mode`,
/// `idle_timeout_s`), one way for every node; changing it is refused while a node is alive.
pub fn set_metering(config: &Config, store: &gateway::store::SharedStore) -> anyhow::Result<()> {
    let Some(cluster) = store.cluster() else {
        return Ok(());
    };
    let mine = (config.metering.mode, config.metering.idle_timeout_ms);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting a runtime")?;
    let db = rt.block_on(cluster.metering(mine))?;
    if db == mine {
        println!(
            "metering: {} with a {} s idle timeout, as the config says",
            mine.0.as_str(),
            mine.1 / 1_000
        );
        return Ok(());
    }
    let now = rt.block_on(cluster.clock_ms())?;
    let live_since = now - config.cluster.node_timeout.as_millis() as i64;
    rt.block_on(cluster.set_metering(mine, live_since, now))
        .context("changing how the database meters")?;
    println!(
        "metering: was {} with a {} s idle timeout, now {} with {} s, as the config says",
        db.0.as_str(),
        db.1 / 1_000,
        mine.0.as_str(),
        mine.1 / 1_000
    );
    Ok(())
}
