//! `[storage]`: which database holds the data, where, and how long to wait on it.

use super::*;

/// `[storage]`: the backend, SQLite's path or PostgreSQL's URL (never with a password), the
/// flushing and the access log's limits, the refresh and the database timeouts.
pub(super) fn parse(root: &Table, errors: &mut Vec<String>) -> StorageConfig {
    let mut s = Section::new(root, "storage");
    let backend = match s.string("backend", "sqlite").as_str() {
        "sqlite" => StoreKind::Sqlite,
        "postgres" => StoreKind::Postgres,
        other => {
            s.error(
                "backend",
                &format!("must be \"sqlite\" or \"postgres\", not {other:?}"),
            );
            StoreKind::Sqlite
        }
    };
    let url = s.opt_string("url");
    if let Some(u) = &url {
        if !(u.starts_with("postgres://") || u.starts_with("postgresql://")) {
            s.error("url", "must be a postgres:// URL");
        } else if url_has_password(u) {
            s.error(
                "url",
                &format!(
                    "must not hold a password (the config file is not a secret): put the \
                     whole URL in {DATABASE_URL_ENV} instead"
                ),
            );
        }
    }
    let storage = StorageConfig {
        backend,
        url,
        ca_file: s.opt_string("ca_file").map(PathBuf::from),
        path: PathBuf::from(s.string("path", "tollgate.db")),
        flush_interval: Duration::from_millis(s.uint("flush_interval_ms", 1_000, 10, 60_000)),
        log_queue_capacity: s.uint("log_queue_capacity", 100_000, 1, 100_000_000) as usize,
        access_log_retention_days: s.uint("access_log_retention_days", 90, 0, 36_500) as u32,
        unauthenticated_log_rows_per_s: s.uint("unauthenticated_log_rows_per_s", 100, 0, 1_000_000)
            as u32,
        access_log: access_log(&mut s),
        refresh_interval: Duration::from_millis(s.uint("refresh_interval_ms", 2_000, 100, 600_000)),
        timeouts: DbTimeouts {
            connect: Duration::from_millis(s.uint("connect_timeout_ms", 5_000, 100, 600_000)),
            statement: Duration::from_millis(s.uint(
                "statement_timeout_ms",
                10_000,
                100,
                3_600_000,
            )),
            keepalive: Duration::from_millis(s.uint(
                "keepalive_timeout_ms",
                10_000,
                1_000,
                600_000,
            )),
            pool_wait: Duration::from_millis(s.uint("pool_timeout_ms", 5_000, 100, 600_000)),
        },
    };
    s.finish(errors);
    storage
}

/// `access_log = "all" | "errors" | "sample:N"` (N from 2 to 1,000,000).
fn access_log(s: &mut Section<'_>) -> AccessLogRows {
    let text = s.string("access_log", "all");
    match text.as_str() {
        "all" => AccessLogRows::All,
        "errors" => AccessLogRows::Errors,
        other => match other.strip_prefix("sample:").map(str::parse::<u32>) {
            Some(Ok(n)) if (2..=1_000_000).contains(&n) => AccessLogRows::Sample(n),
            _ => {
                s.error(
                    "access_log",
                    &format!(
                        "must be \"all\", \"errors\" or \"sample:N\" (N from 2 to 1000000), \
                         not {other:?}"
                    ),
                );
                AccessLogRows::All
            }
        },
    }
}
