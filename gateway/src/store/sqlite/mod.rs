//! The SQLite backend: one database file, opened in WAL mode and migrated on open.
//!
//! One writer thread owns the only write connection and runs jobs from a channel in order, so
//! every balance change is serialized in one place; reads run on their own pooled connections on
//! tokio's blocking threads, never on a proxy thread. The statements are plain functions on a
//! `Connection` in the submodules; [`backend`] implements the store's traits with them.

use std::path::{Path, PathBuf};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};
use tokio::sync::oneshot;

pub mod alerts;
mod backend;
pub mod exports;
pub mod flush;
pub mod licenses;
pub mod payments;
pub mod plans;
pub mod reports;
pub mod subscriptions;

pub use super::{Result, StoreError};

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> StoreError {
        StoreError::Backend(format!("sqlite: {e}"))
    }
}

/// Migrations, applied in order; `PRAGMA user_version` records how many have run.
const MIGRATIONS: &[(&str, &str)] = &[
    (
        "0001_create_licenses",
        include_str!("../../../../schema/0001_create_licenses.sql"),
    ),
    (
        "0002_create_usage_history",
        include_str!("../../../../schema/0002_create_usage_history.sql"),
    ),
    (
        "0003_create_usage_sessions",
        include_str!("../../../../schema/0003_create_usage_sessions.sql"),
    ),
    (
        "0004_create_access_logs",
        include_str!("../../../../schema/0004_create_access_logs.sql"),
    ),
    (
        "0005_create_payment_history",
        include_str!("../../../../schema/0005_create_payment_history.sql"),
    ),
    (
        "0006_create_stripe_events",
        include_str!("../../../../schema/0006_create_stripe_events.sql"),
    ),
    (
        "0007_create_access_daily",
        include_str!("../../../../schema/0007_create_access_daily.sql"),
    ),
    (
        "0008_create_plans",
        include_str!("../../../../schema/0008_create_plans.sql"),
    ),
    (
        "0009_create_usage_alerts",
        include_str!("../../../../schema/0009_create_usage_alerts.sql"),
    ),
    (
        "0010_add_access_logs_guest_id",
        include_str!("../../../../schema/0010_add_access_logs_guest_id.sql"),
    ),
    (
        "0011_create_usage_daily",
        include_str!("../../../../schema/0011_create_usage_daily.sql"),
    ),
    (
        "0012_create_stripe_refunds",
        include_str!("../../../../schema/0012_create_stripe_refunds.sql"),
    ),
    (
        "0013_add_payment_history_paid",
        include_str!("../../../../schema/0013_add_payment_history_paid.sql"),
    ),
    (
        "0014_create_refused_minutes",
        include_str!("../../../../schema/0014_create_refused_minutes.sql"),
    ),
    (
        "0015_add_upload_bytes",
        include_str!("../../../../schema/0015_add_upload_bytes.sql"),
    ),
    (
        "0016_usage_history_last_row",
        include_str!("../../../../schema/0016_usage_history_last_row.sql"),
    ),
    (
        "0017_create_usage_units",
        include_str!("../../../../schema/0017_create_usage_units.sql"),
    ),
    (
        "0018_create_endpoint_daily",
        include_str!("../../../../schema/0018_create_endpoint_daily.sql"),
    ),
    (
        "0019_usage_alerts_unit_kinds",
        include_str!("../../../../schema/0019_usage_alerts_unit_kinds.sql"),
    ),
    (
        "0020_create_license_keys",
        include_str!("../../../../schema/0020_create_license_keys.sql"),
    ),
    (
        "0021_add_access_logs_key_id",
        include_str!("../../../../schema/0021_add_access_logs_key_id.sql"),
    ),
    (
        "0022_key_limits_and_daily",
        include_str!("../../../../schema/0022_key_limits_and_daily.sql"),
    ),
    (
        "0023_usage_history_included",
        include_str!("../../../../schema/0023_usage_history_included.sql"),
    ),
    (
        "0024_create_subscriptions",
        include_str!("../../../../schema/0024_create_subscriptions.sql"),
    ),
    (
        "0025_usage_units_included",
        include_str!("../../../../schema/0025_usage_units_included.sql"),
    ),
];

type Job = Box<dyn FnOnce(&mut Connection) + Send>;

/// A handle to the database; cheap to clone.
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    writer: Mutex<Option<mpsc::Sender<Job>>>,
    readers: Mutex<Vec<Connection>>,
}

/// Opens a connection with the pragmas every connection uses.
pub fn connect(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(Duration::from_secs(5))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    // access_logs grows by millions of rows and its (license_id, ts) index takes inserts all
    // over the tree: with SQLite's default 2 MB page cache every flush spilled and re-read
    // pages (the flusher bench ran at 30k rows/s). 64 MB of cache and memory-mapped reads keep
    // the hot pages in memory.
    conn.pragma_update(None, "cache_size", -65_536)?;
    conn.pragma_update(None, "mmap_size", 268_435_456)?;
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    Ok(conn)
}

/// Settings for the one connection that writes flush batches.
pub fn tune_writer(conn: &Connection) -> rusqlite::Result<()> {
    // One flush of a busy second can dirty more than SQLite's default 1,000-page WAL limit,
    // which checkpointed (and fsynced) after nearly every flush.
    conn.pragma_update(None, "wal_autocheckpoint", 10_000)
}

/// Applies the migrations not yet applied; returns how many ran.
pub fn migrate(conn: &mut Connection) -> rusqlite::Result<usize> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let done: usize = tx.query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0))? as usize;
    for (_, sql) in MIGRATIONS.iter().skip(done) {
        tx.execute_batch(sql)?;
    }
    let applied = MIGRATIONS.len().saturating_sub(done);
    if applied > 0 {
        tx.pragma_update(None, "user_version", MIGRATIONS.len() as i64)?;
    }
    tx.commit()?;
    Ok(applied)
}

/// Copies the database at `src` to a new file `dest` with SQLite's online backup, safe while a
/// gateway writes (the copy is one consistent snapshot), and checks the copy's integrity.
pub fn backup(src: &Path, dest: &Path) -> Result<()> {
    let from = Connection::open_with_flags(
        src,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    from.busy_timeout(Duration::from_secs(10))?;
    let mut out = Connection::open(dest)?;
    {
        let b = rusqlite::backup::Backup::new(&from, &mut out)?;
        // 1024 pages a step, a short pause between: the writer is never held off for long
        b.run_to_completion(1024, Duration::from_millis(5), None)?;
    }
    let check: String = out.query_row("PRAGMA integrity_check", [], |r| r.get(0))?;
    if check != "ok" {
        return Err(StoreError::Invalid(format!(
            "the copy failed its integrity check: {check}"
        )));
    }
    out.execute_batch("PRAGMA journal_mode = DELETE")?;
    Ok(())
}

/// Opens and migrates a database file for one-off use (tests and benches of this backend).
pub fn open_migrated(path: &Path) -> rusqlite::Result<Connection> {
    let mut conn = connect(path)?;
    migrate(&mut conn)?;
    Ok(conn)
}

/// Applies the migrations not yet applied to the database file at `path` (`tollgate migrate`).
pub fn migrate_path(path: &Path) -> Result<usize> {
    let mut conn = connect(path)?;
    Ok(migrate(&mut conn)?)
}

impl SqliteStore {
    /// Opens (creating and migrating if needed) the database and starts its writer thread.
    pub fn open(path: &Path) -> Result<SqliteStore> {
        let mut conn = connect(path)?;
        migrate(&mut conn)?;
        tune_writer(&conn)?;
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("tollgate-store-writer".into())
            .spawn(move || {
                // Runs until every sender is gone, so queued jobs always finish.
                for job in rx {
                    job(&mut conn);
                }
            })
            .map_err(|e| StoreError::Invalid(format!("cannot start the writer thread: {e}")))?;
        Ok(SqliteStore {
            inner: Arc::new(Inner {
                path: path.to_path_buf(),
                writer: Mutex::new(Some(tx)),
                readers: Mutex::new(Vec::new()),
            }),
        })
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    fn submit(&self, job: Job) -> Result<()> {
        let guard = self.inner.writer.lock().unwrap_or_else(|e| e.into_inner());
        let sender = guard.as_ref().ok_or(StoreError::WriterGone)?;
        sender.send(job).map_err(|_| StoreError::WriterGone)
    }

    /// Runs `f` on the writer thread, after every job queued before it.
    pub async fn write<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        self.submit(Box::new(move |c| {
            let _ = tx.send(f(c));
        }))?;
        rx.await.map_err(|_| StoreError::WriterGone)?
    }

    /// [`Store::write`] for callers outside a runtime (the final flush at exit).
    pub fn write_blocking<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T> + Send + 'static,
    {
        let (tx, rx) = mpsc::sync_channel(1);
        self.submit(Box::new(move |c| {
            let _ = tx.send(f(c));
        }))?;
        rx.recv().map_err(|_| StoreError::WriterGone)?
    }

    /// Runs `f` on a pooled read connection on a blocking thread.
    pub async fn read<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        let store = self.clone();
        tokio::task::spawn_blocking(move || store.read_blocking(f))
            .await
            .map_err(|e| StoreError::Invalid(format!("read task failed: {e}")))?
    }

    /// Runs `f` on a pooled read connection on the calling thread.
    pub fn read_blocking<T, F>(&self, f: F) -> Result<T>
    where
        F: FnOnce(&Connection) -> Result<T>,
    {
        let pooled = self
            .inner
            .readers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop();
        let conn = match pooled {
            Some(c) => c,
            None => connect(&self.inner.path)?,
        };
        let out = f(&conn);
        let mut pool = self.inner.readers.lock().unwrap_or_else(|e| e.into_inner());
        if pool.len() < 8 {
            pool.push(conn);
        }
        out
    }

    /// Stops accepting writes; the writer thread ends once its queue is done.
    pub fn close(&self) {
        self.inner
            .writer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_apply_once_and_create_every_table() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let mut c = connect(&path).unwrap();
        assert_eq!(migrate(&mut c).unwrap(), MIGRATIONS.len());
        assert_eq!(migrate(&mut c).unwrap(), 0);
        for table in ["licenses", "usage_history", "usage_sessions", "access_logs"] {
            let n: i64 = c
                .query_row(
                    "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = ?1",
                    [table],
                    |r| r.get(0),
                )
                .unwrap();
            assert_eq!(n, 1, "{table}");
        }
        let mode: String = c
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
    }

    #[test]
    fn migration_files_are_numbered_in_order() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../schema");
        let mut files: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.ends_with(".sql"))
            .collect();
        files.sort();
        let embedded: Vec<String> = MIGRATIONS.iter().map(|(n, _)| format!("{n}.sql")).collect();
        assert_eq!(
            files, embedded,
            "every file in schema/ is embedded, in order"
        );
    }

    #[tokio::test]
    async fn writes_run_in_order_on_the_writer_and_reads_see_them() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("t.db")).unwrap();
        for i in 0..10 {
            store
                .write(move |c| {
                    c.execute(
                        "INSERT INTO access_logs (ts, method, path, status, outcome, duration_us,
                         bytes_in, bytes_out) VALUES (?1, 'GET', '/', 200, 'ok', 0, 0, 0)",
                        [i],
                    )?;
                    Ok(())
                })
                .await
                .unwrap();
        }
        let ts: Vec<i64> = store
            .read(|c| {
                let mut st = c.prepare("SELECT ts FROM access_logs ORDER BY id")?;
                let rows = st.query_map([], |r| r.get(0))?;
                Ok(rows.collect::<rusqlite::Result<_>>()?)
            })
            .await
            .unwrap();
        assert_eq!(ts, (0..10).collect::<Vec<_>>());
    }
}
