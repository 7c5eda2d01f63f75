//! A throwaway PostgreSQL server for the tests: `initdb` into a temporary directory and
//! `pg_ctl start` on a free loopback port, stopped (by `pg_ctl`, for its own data directory)
//! when dropped. PostgreSQL refuses to run as root, so as root the server runs as the
//! `postgres` user Debian's package makes (scripts/setup.sh installs it). With
//! `TOLLGATE_TEST_DATABASE_URL` set (`postgres://user@host:port/db`), that server is used
//! instead and is never stopped. Each [`Postgres::database`] is a new empty database, so tests do
//! not see each other's rows: the tests of one binary share one server ([`Postgres::shared`]),
//! and only a test that stops its server (an outage) starts one of its own.
//! `benches/flusher.rs` includes this file too.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// A port free on loopback now (this file is also the benches' harness, so it has its own).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The tests' database user (made by `initdb -U`).
pub const USER: &str = "tollgate";

pub struct Postgres {
    own: Option<Own>,
    /// The server's address, as a URL without a database.
    base: String,
}

struct Own {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    /// Who the server runs as, when the tests run as root.
    run_as: Option<String>,
    /// More `postgres` options (`-c name=value …`).
    options: String,
}

/// The directory of `initdb` and `pg_ctl`: on PATH, else Debian's newest
/// `/usr/lib/postgresql/<version>/bin`.
fn bin_dir() -> PathBuf {
    if let Ok(out) = Command::new("sh")
        .args(["-c", "command -v pg_ctl"])
        .output()
    {
        let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if out.status.success() && !path.is_empty() {
            let real = std::fs::canonicalize(&path).unwrap_or_else(|_| PathBuf::from(&path));
            return real.parent().unwrap().to_path_buf();
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("pg_ctl").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions
        .pop()
        .map(|(_, bin)| bin)
        .expect("PostgreSQL is installed (./scripts/setup.sh installs Debian's postgresql)")
}

fn is_root() -> bool {
    let out = Command::new("id").arg("-u").output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim() == "0"
}

fn ids_of(user: &str) -> (u32, u32) {
    let id = |flag: &str| -> u32 {
        let out = Command::new("id").args([flag, user]).output().unwrap();
        assert!(out.status.success(), "no user {user}: {out:?}");
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
    };
    (id("-u"), id("-g"))
}

impl Own {
    /// Runs one of the server's programs as the server's user.
    fn run(&self, program: &str, args: &[&str]) -> Output {
        let exe = self.bin.join(program);
        let mut cmd = match &self.run_as {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(&exe);
                c
            }
            None => Command::new(&exe),
        };
        cmd.args(args)
            .output()
            .unwrap_or_else(|e| panic!("{program}: {e}"))
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    /// Starts a watchdog that stops this server and removes its directory once process `pid`
    /// has exited.
    fn stop_after(&self, pid: u32) {
        let quote = |s: &str| format!("'{}'", s.replace('\'', "'\\''"));
        let pg_ctl = self.bin.join("pg_ctl").display().to_string();
        let stop = match &self.run_as {
            Some(user) => format!("runuser -u {} -- {}", quote(user), quote(&pg_ctl)),
            None => quote(&pg_ctl),
        };
        let dir = self.dir.path().display().to_string();
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 0.2; done; \
             {stop} -D {} -m immediate -w stop; rm -rf {}",
            quote(&self.data()),
            quote(&dir)
        );
        // not waited for: it outlives this process, which is the point
        #[allow(clippy::zombie_processes)]
        Command::new("sh")
            .args(["-c", &script])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("the watchdog starts");
    }

    fn pg_ctl(&self, args: &[&str]) -> Output {
        let data = self.data();
        let mut all = vec!["-D", data.as_str()];
        all.extend_from_slice(args);
        self.run("pg_ctl", &all)
    }
}

impl Postgres {
    /// The server this test binary's tests share, started by the first that asks (or the one
    /// `TOLLGATE_TEST_DATABASE_URL` names). A static is never dropped, so a watchdog process
    /// stops it, and removes its directory, once this process has exited, however it exits.
    pub fn shared() -> &'static Postgres {
        static SHARED: std::sync::OnceLock<Postgres> = std::sync::OnceLock::new();
        SHARED.get_or_init(|| {
            let pg = Postgres::start();
            if let Some(own) = &pg.own {
                own.stop_after(std::process::id());
            }
            pg
        })
    }

    /// A new server of the test's own, or the one `TOLLGATE_TEST_DATABASE_URL` names.
    pub fn start() -> Postgres {
        if let Ok(url) = std::env::var("TOLLGATE_TEST_DATABASE_URL") {
            let base = match url.rsplit_once('/') {
                Some((base, _db)) if base.contains("://") && !base.ends_with('/') => base.into(),
                _ => url.trim_end_matches('/').to_string(),
            };
            return Postgres { own: None, base };
        }
        Self::start_own(|_| String::new())
    }

    /// A server of the test's own that also speaks TLS, with this certificate and key (PEM).
    pub fn start_tls(cert_pem: &str, key_pem: &str) -> Postgres {
        Self::start_own(|own| {
            let (cert, key) = (
                own.dir.path().join("server.crt"),
                own.dir.path().join("server.key"),
            );
            std::fs::write(&cert, cert_pem).unwrap();
            std::fs::write(&key, key_pem).unwrap();
            // the server refuses a key others can read
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
            if let Some(user) = &own.run_as {
                let (uid, gid) = ids_of(user);
                for f in [&cert, &key] {
                    std::os::unix::fs::chown(f, Some(uid), Some(gid)).unwrap();
                }
            }
            format!(
                " -c ssl=on -c ssl_cert_file={} -c ssl_key_file={}",
                cert.display(),
                key.display()
            )
        })
    }

    fn start_own(options: impl FnOnce(&Own) -> String) -> Postgres {
        let dir = tempfile::tempdir().unwrap();
        let run_as = is_root().then(|| "postgres".to_string());
        if let Some(user) = &run_as {
            let (uid, gid) = ids_of(user);
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid)).unwrap();
        }
        let mut own = Own {
            dir,
            bin: bin_dir(),
            port: free_port(),
            run_as,
            options: String::new(),
        };
        own.options = options(&own);
        let data = own.data();
        let out = own.run(
            "initdb",
            &[
                "-D",
                &data,
                "-U",
                USER,
                "--auth=trust",
                "--encoding=UTF8",
                "--no-sync",
            ],
        );
        assert!(out.status.success(), "initdb: {}", text(&out));
        let base = format!("postgres://{USER}@127.0.0.1:{}", own.port);
        let pg = Postgres {
            own: Some(own),
            base,
        };
        pg.start_server();
        pg
    }

    fn start_server(&self) {
        let own = self.own.as_ref().expect("a server of the test's own");
        let options = format!(
            "-c listen_addresses=127.0.0.1 -p {} -k {} -c fsync=off -c synchronous_commit=off \
             -c full_page_writes=off -c max_connections=200{}",
            own.port,
            own.dir.path().display(),
            own.options
        );
        let log = own.dir.path().join("server.log").display().to_string();
        let out = own.pg_ctl(&["-o", &options, "-l", &log, "-w", "-t", "60", "start"]);
        assert!(
            out.status.success(),
            "pg_ctl start: {}\n{}",
            text(&out),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }

    /// Stops the server (`pg_ctl stop -m fast`): the database is unreachable until
    /// [`Postgres::resume`].
    pub fn pause(&self) {
        let own = self
            .own
            .as_ref()
            .expect("an outage needs a server of the test's own");
        let out = own.pg_ctl(&["-m", "fast", "-w", "stop"]);
        assert!(out.status.success(), "pg_ctl stop: {}", text(&out));
    }

    /// Starts the server again after [`Postgres::pause`], on the same port.
    pub fn resume(&self) {
        self.start_server();
    }

    /// `postgres://…/<db>`.
    pub fn url(&self, db: &str) -> String {
        format!("{}/{db}", self.base)
    }

    /// A new, empty database; its URL.
    pub async fn database(&self) -> String {
        let name = format!("tollgate_test_{}", hex::encode(rand::random::<[u8; 6]>()));
        let client = self.connect("postgres").await;
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        self.url(&name)
    }

    /// A client of database `db`, for a test's own queries.
    pub async fn connect(&self, db: &str) -> tokio_postgres::Client {
        let url = self.url(db);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
                Ok((client, conn)) => {
                    tokio::spawn(async move {
                        let _ = conn.await;
                    });
                    return client;
                }
                Err(e) => {
                    assert!(Instant::now() < deadline, "connect {url}: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }

    /// One bigint column of license `id`.
    pub async fn license(db: &tokio_postgres::Client, id: i64, column: &str) -> i64 {
        Self::scalar(
            db,
            &format!("SELECT {column} FROM licenses WHERE id = {id}"),
        )
        .await
    }

    /// The one integer `sql` returns on `db`'s connection (cast to bigint: a `sum` is numeric).
    pub async fn scalar(db: &tokio_postgres::Client, sql: &str) -> i64 {
        db.query_one(format!("SELECT ({sql})::bigint").as_str(), &[])
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
            .get(0)
    }

    /// The server's own log, for a failing test's message.
    pub fn log(&self) -> String {
        self.own
            .as_ref()
            .map(|o| std::fs::read_to_string(o.dir.path().join("server.log")).unwrap_or_default())
            .unwrap_or_default()
    }

    pub fn data_dir(&self) -> Option<&Path> {
        self.own.as_ref().map(|o| o.dir.path())
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if let Some(own) = &self.own {
            // this server's own data directory: only the server the test started is stopped
            let _ = own.pg_ctl(&["-m", "immediate", "-w", "stop"]);
        }
    }
}

fn text(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}
