//! The PostgreSQL backend (feature `postgres`), for several gateway nodes on one database: a
//! pool of tokio-postgres connections (deadpool), TLS to the database by rustls when the URL
//! asks for it (`sslmode=require`), and the migrations of `schema/postgres/` applied on open
//! under an advisory lock, so nodes starting together migrate once.
//!
//! `PgStore` implements every store trait in backend.rs, each method delegating to the
//! submodule of its concern, laid out as store/sqlite/: licenses.rs (the license rows, the
//! license mapper and `change_balance`), admission.rs (the proxy's reads of keys it has not
//! seen, gathered into batches), payments.rs (the steps of
//! `store::payments` applied), flush.rs, alerts.rs, plans.rs, reports.rs, exports.rs. What only
//! several nodes need has modules of its own: cluster.rs (the nodes and their leases),
//! cluster_charge.rs (a flush's charge off the leases, its sequence, session time by the
//! union of spans), notify.rs (changes pushed to the other nodes), console.rs (sign-ins
//! shared), migrations.rs.
//! `[storage] backend = "postgres"` chooses it (`server::open_store`).

mod admission;
mod alerts;
mod backend;
mod cluster;
mod cluster_charge;
mod console;
mod exports;
mod flush;
mod licenses;
mod migrations;
mod notify;
mod payments;
mod plans;
mod reports;
mod subscriptions;

use std::str::FromStr;

use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod, Transaction};
use tokio_postgres::config::{Host, SslMode};
use tokio_postgres::types::ToSql;
use tokio_postgres::Row;

use super::{Result, StoreError};

pub use migrations::{MIGRATIONS, MIGRATION_LOCK};
pub use notify::CHANNEL;

/// Connections a node keeps to the database at most.
pub const DEFAULT_POOL_SIZE: usize = 16;

/// How long a node waits on the database before it counts a call as failed, so a database
/// that drops packets fails calls (retried, or in doubt) within seconds instead of hanging
/// the flusher and the heartbeat until the kernel gives up (`[storage]`'s `*_timeout_ms`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    /// To connect (TCP and the TLS and startup exchanges).
    pub connect: std::time::Duration,
    /// The server's `statement_timeout`; the server ends a transaction its client left open
    /// (`idle_in_transaction_session_timeout`) after three times this.
    pub statement: std::time::Duration,
    /// TCP keepalive and user timeout: a connection whose peer stopped answering is dropped
    /// after about this long.
    pub keepalive: std::time::Duration,
    /// For a connection from the pool when all are in use.
    pub pool_wait: std::time::Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        use std::time::Duration;
        Timeouts {
            connect: Duration::from_secs(5),
            statement: Duration::from_secs(10),
            keepalive: Duration::from_secs(10),
            pool_wait: Duration::from_secs(5),
        }
    }
}

/// How to open the store beyond its URL.
#[derive(Clone, Debug)]
pub struct Options {
    pub pool_size: usize,
    /// CA certificates (PEM) trusted beside the system's (`[storage] ca_file`).
    pub ca_file: Option<std::path::PathBuf>,
    pub timeouts: Timeouts,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            pool_size: DEFAULT_POOL_SIZE,
            ca_file: None,
            timeouts: Timeouts::default(),
        }
    }
}

/// `config` with the timeouts: on the socket (connect, keepalive, user timeout) and on the
/// server (statement, idle in transaction), the latter added to any `options` the URL gives.
fn with_timeouts(mut config: tokio_postgres::Config, t: &Timeouts) -> tokio_postgres::Config {
    let ms = |d: std::time::Duration| d.as_millis().max(1);
    let server = format!(
        "-c statement_timeout={} -c idle_in_transaction_session_timeout={}",
        ms(t.statement),
        ms(t.statement) * 3
    );
    let options = match config.get_options() {
        Some(o) if !o.is_empty() => format!("{o} {server}"),
        _ => server,
    };
    config
        .options(&options)
        .connect_timeout(t.connect)
        .keepalives(true)
        .keepalives_idle(t.keepalive / 2)
        .keepalives_interval((t.keepalive / 6).max(std::time::Duration::from_secs(1)))
        .keepalives_retries(3)
        .tcp_user_timeout(t.keepalive);
    config
}

/// The store on a PostgreSQL database.
#[derive(Clone)]
pub struct PgStore {
    pool: Pool,
    /// How to connect, for connections outside the pool (the change listener's).
    config: tokio_postgres::Config,
    tls: tokio_postgres_rustls::MakeRustlsConnect,
    /// Where the database is, for logs and `describe`: host, port and name, never the
    /// password.
    target: String,
    /// How long one call may take in all (see [`PgStore::run`]).
    call_timeout: std::time::Duration,
    /// The proxy's admission reads waiting for the next batch (admission.rs).
    admissions: std::sync::Arc<admission::Admissions>,
}

/// A driver or pool error in the store's terms (the database's own message, which names no
/// secret: the password is never part of it).
pub(crate) fn backend<E: std::error::Error>(e: E) -> StoreError {
    // the driver's own words are "db error": the server's message is in the source
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    StoreError::Backend(text)
}

/// Where `config` points, for people: `host:port/dbname`, without user or password.
pub fn target(config: &tokio_postgres::Config) -> String {
    let host = match config.get_hosts().first() {
        Some(Host::Tcp(h)) => h.clone(),
        Some(Host::Unix(p)) => p.display().to_string(),
        None => "localhost".into(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    let db = config.get_dbname().unwrap_or("");
    format!("{host}:{port}/{db}")
}

/// Parses a database URL (`postgres://user[:password]@host[:port]/db[?sslmode=…]`), with an
/// error that does not repeat it (it may hold a password).
pub fn parse_url(url: &str) -> Result<tokio_postgres::Config> {
    tokio_postgres::Config::from_str(url).map_err(|e| {
        StoreError::Invalid(format!(
            "the database URL is not a PostgreSQL URL (postgres://user@host:port/db): {e}"
        ))
    })
}

/// rustls for `sslmode=require` (and `prefer`, which falls back to plain TCP where the server
/// offers no TLS). The server's certificate must chain to the system's roots or to one in
/// `ca_file` (`[storage] ca_file`: a private CA, as managed databases use), and name the host.
fn tls(ca_file: Option<&std::path::Path>) -> Result<tokio_postgres_rustls::MakeRustlsConnect> {
    use rustls::pki_types::{pem::PemObject, CertificateDer};
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().map_err(backend)? {
        // a certificate the parser refuses is one root fewer, not a failure to start
        let _ = roots.add(cert);
    }
    if let Some(path) = ca_file {
        let shown = path.display();
        let certs = CertificateDer::pem_file_iter(path)
            .and_then(|i| i.collect::<std::result::Result<Vec<_>, _>>())
            .map_err(|e| StoreError::Invalid(format!("storage.ca_file {shown}: {e}")))?;
        if certs.is_empty() {
            return Err(StoreError::Invalid(format!(
                "storage.ca_file {shown} holds no PEM certificate"
            )));
        }
        for cert in certs {
            roots
                .add(cert)
                .map_err(|e| StoreError::Invalid(format!("storage.ca_file {shown}: {e}")))?;
        }
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(backend)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

impl PgStore {
    /// Connects to `url` and applies the migrations this build has and the database lacks.
    pub async fn open(url: &str, pool_size: usize) -> Result<PgStore> {
        Self::open_with(
            url,
            &Options {
                pool_size,
                ..Options::default()
            },
        )
        .await
    }

    /// As [`PgStore::open`], trusting the CA certificates in `ca_file` beside the system's.
    pub async fn open_trusting(
        url: &str,
        pool_size: usize,
        ca_file: Option<&std::path::Path>,
    ) -> Result<PgStore> {
        Self::open_with(
            url,
            &Options {
                pool_size,
                ca_file: ca_file.map(Into::into),
                ..Options::default()
            },
        )
        .await
    }

    /// As [`PgStore::open`], with `options`.
    pub async fn open_with(url: &str, options: &Options) -> Result<PgStore> {
        let (pool_size, ca_file) = (options.pool_size, options.ca_file.as_deref());
        let config = with_timeouts(parse_url(url)?, &options.timeouts);
        let target = target(&config);
        if config.get_ssl_mode() == SslMode::Require {
            tracing::debug!(%target, "TLS to the database is required");
        }
        let tls = tls(ca_file)?;
        // migrated on a connection of its own: the pool's connections are made later, on the
        // runtime that first uses them (opening may run on a runtime of its own)
        let (mut client, connection) = config.connect(tls.clone()).await.map_err(|e| {
            StoreError::Backend(format!(
                "the database at {target} does not answer: {}",
                backend(e)
            ))
        })?;
        let connection = tokio::spawn(connection);
        let applied = migrations::apply(&mut client).await;
        drop(client);
        let _ = connection.await;
        let applied = applied?;
        if applied > 0 {
            tracing::info!(%target, applied, "database migrated");
        }
        let manager = Manager::from_config(
            config.clone(),
            tls.clone(),
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let t = &options.timeouts;
        let pool = Pool::builder(manager)
            .max_size(pool_size.max(1))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(t.pool_wait))
            .create_timeout(Some(t.connect))
            .recycle_timeout(Some(t.connect))
            .build()
            .map_err(backend)?;
        Ok(PgStore {
            pool,
            config,
            tls,
            target,
            // the server's own timeout, and the round trips around it
            call_timeout: t.statement + t.connect,
            admissions: Default::default(),
        })
    }

    /// Runs `op` on a connection from the pool, within the call timeout. A database that does
    /// not answer (frozen, or behind a network that holds what it is sent, where neither the
    /// server's statement timeout nor TCP's can fire) fails the call instead of hanging it,
    /// and the connection, which may still be waiting, is dropped from the pool.
    pub(crate) async fn run<T>(&self, op: impl AsyncFnOnce(&mut Object) -> Result<T>) -> Result<T> {
        let mut c = self.client().await?;
        match tokio::time::timeout(self.call_timeout, op(&mut c)).await {
            Ok(r) => r,
            Err(_) => {
                let _ = Object::take(c);
                Err(self.no_answer())
            }
        }
    }

    fn no_answer(&self) -> StoreError {
        StoreError::Backend(format!(
            "the database at {} did not answer within {} ms",
            self.target,
            self.call_timeout.as_millis()
        ))
    }

    /// A connection from the pool.
    pub(crate) async fn client(&self) -> Result<deadpool_postgres::Object> {
        self.pool.get().await.map_err(|e| {
            StoreError::Backend(format!(
                "the database at {} does not answer: {}",
                self.target,
                backend(e)
            ))
        })
    }

    /// Whether the database answers a query.
    pub async fn ready(&self) -> Result<()> {
        self.run(async |c| {
            c.simple_query("SELECT 1")
                .await
                .map(|_| ())
                .map_err(backend)
        })
        .await
    }

    /// The migrations applied, by version.
    pub async fn migrated(&self) -> Result<Vec<i32>> {
        let client = self.client().await?;
        migrations::applied(&client).await
    }

    /// Lets go of the idle connections (the pool makes new ones as needed): those made on a
    /// runtime that has ended are dead.
    pub fn release_idle(&self) {
        let _ = self.pool.retain(|_, _| false);
    }

    /// Lets go of the pool's connections; calls after this fail.
    pub fn close(&self) {
        self.pool.close();
    }

    /// What the store is, for logs: `PostgreSQL at host:port/db`.
    pub fn describe(&self) -> String {
        format!("PostgreSQL at {}", self.target)
    }
}

/// Runs `sql` in `tx` as a statement prepared once per connection.
pub(super) async fn execute(
    tx: &Transaction<'_>,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<u64> {
    let st = tx.prepare_cached(sql).await.map_err(backend)?;
    tx.execute(&st, params).await.map_err(backend)
}

pub(super) async fn query(
    tx: &Transaction<'_>,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> Result<Vec<Row>> {
    let st = tx.prepare_cached(sql).await.map_err(backend)?;
    tx.query(&st, params).await.map_err(backend)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_s_password_is_never_in_what_is_shown_of_it() {
        let c = parse_url("postgres://gate:s3cr3t-pw@db.internal:6432/tollgate?sslmode=require")
            .unwrap();
        assert_eq!(target(&c), "db.internal:6432/tollgate");
        assert_eq!(c.get_ssl_mode(), SslMode::Require);
        let e = parse_url("postgres://gate:s3cr3t-pw@db/x?sslmode=sometimes").unwrap_err();
        assert!(!e.to_string().contains("s3cr3t-pw"), "{e}");
    }
}
