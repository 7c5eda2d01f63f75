//! `schema/postgres/NNNN_verb_noun.sql`, applied in order in one transaction that first takes
//! an advisory lock: nodes that start together wait for the first, then find its migrations
//! recorded in `tollgate_migrations` and apply nothing.

use tokio_postgres::Client;

use super::backend;
use crate::store::{Result, StoreError};

/// (version, name, SQL), in order.
pub const MIGRATIONS: &[(i32, &str, &str)] = &[
    (
        1,
        "create_tables",
        include_str!("../../../../schema/postgres/0001_create_tables.sql"),
    ),
    (
        2,
        "create_license_change_notices",
        include_str!("../../../../schema/postgres/0002_create_license_change_notices.sql"),
    ),
    (
        3,
        "create_cluster_nodes",
        include_str!("../../../../schema/postgres/0003_create_cluster_nodes.sql"),
    ),
    (
        4,
        "create_leases",
        include_str!("../../../../schema/postgres/0004_create_leases.sql"),
    ),
    (
        5,
        "create_console_sessions",
        include_str!("../../../../schema/postgres/0005_create_console_sessions.sql"),
    ),
    (
        6,
        "add_licenses_charged_until",
        include_str!("../../../../schema/postgres/0006_add_licenses_charged_until.sql"),
    ),
    (
        7,
        "add_period_leases",
        include_str!("../../../../schema/postgres/0007_add_period_leases.sql"),
    ),
    (
        8,
        "charge_sessions_by_span",
        include_str!("../../../../schema/postgres/0008_charge_sessions_by_span.sql"),
    ),
    (
        9,
        "add_process_incarnations",
        include_str!("../../../../schema/postgres/0009_add_process_incarnations.sql"),
    ),
    (
        10,
        "usage_history_last_row",
        include_str!("../../../../schema/postgres/0010_usage_history_last_row.sql"),
    ),
    (
        11,
        "create_usage_units",
        include_str!("../../../../schema/postgres/0011_create_usage_units.sql"),
    ),
    (
        12,
        "create_endpoint_daily",
        include_str!("../../../../schema/postgres/0012_create_endpoint_daily.sql"),
    ),
    (
        13,
        "usage_alerts_unit_kinds",
        include_str!("../../../../schema/postgres/0013_usage_alerts_unit_kinds.sql"),
    ),
    (
        14,
        "create_period_units_leases",
        include_str!("../../../../schema/postgres/0014_create_period_units_leases.sql"),
    ),
    (
        15,
        "create_license_keys",
        include_str!("../../../../schema/postgres/0015_create_license_keys.sql"),
    ),
    (
        16,
        "add_access_logs_key_id",
        include_str!("../../../../schema/postgres/0016_add_access_logs_key_id.sql"),
    ),
    (
        17,
        "key_limits_and_daily",
        include_str!("../../../../schema/postgres/0017_key_limits_and_daily.sql"),
    ),
    (
        18,
        "usage_history_included",
        include_str!("../../../../schema/postgres/0018_usage_history_included.sql"),
    ),
    (
        19,
        "create_subscriptions",
        include_str!("../../../../schema/postgres/0019_create_subscriptions.sql"),
    ),
    (
        20,
        "usage_units_included",
        include_str!("../../../../schema/postgres/0020_usage_units_included.sql"),
    ),
];

/// The advisory lock the migrations run under ("tollgate" in ASCII).
pub const MIGRATION_LOCK: i64 = 0x746f_6c6c_6761_7465;

const RECORD: &str = "CREATE TABLE IF NOT EXISTS tollgate_migrations (
    version    integer PRIMARY KEY,
    name       text    NOT NULL,
    applied_at bigint  NOT NULL
)";

/// Applies what is missing; how many were applied. A database migrated by a newer build is
/// refused rather than written with an older idea of its tables.
pub async fn apply(client: &mut Client) -> Result<usize> {
    let tx = client.transaction().await.map_err(backend)?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await
        .map_err(backend)?;
    // (IF NOT EXISTS on a migrated database is a NOTICE: not worth a log line at every start;
    // an index built on a large table may take longer than a flush's statement may)
    tx.batch_execute("SET LOCAL client_min_messages = warning; SET LOCAL statement_timeout = 0")
        .await
        .map_err(backend)?;
    tx.batch_execute(RECORD).await.map_err(backend)?;
    let done: Vec<i32> = tx
        .query(
            "SELECT version FROM tollgate_migrations ORDER BY version",
            &[],
        )
        .await
        .map_err(backend)?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let known = MIGRATIONS.last().map_or(0, |m| m.0);
    if let Some(newer) = done.iter().find(|v| **v > known) {
        return Err(StoreError::Invalid(format!(
            "the database has migration {newer}, which this build does not know (it knows up \
             to {known}): run the newer tollgate, or a database of this version"
        )));
    }
    let now = crate::ledger::now_ms();
    let mut applied = 0;
    for (version, name, sql) in MIGRATIONS {
        if done.contains(version) {
            continue;
        }
        tx.batch_execute(sql)
            .await
            .map_err(|e| StoreError::Backend(format!("migration {version} ({name}): {e}")))?;
        tx.execute(
            "INSERT INTO tollgate_migrations (version, name, applied_at) VALUES ($1, $2, $3)",
            &[version, name, &now],
        )
        .await
        .map_err(backend)?;
        applied += 1;
    }
    tx.commit().await.map_err(backend)?;
    Ok(applied)
}

/// The versions recorded as applied.
pub async fn applied(client: &Client) -> Result<Vec<i32>> {
    Ok(client
        .query(
            "SELECT version FROM tollgate_migrations ORDER BY version",
            &[],
        )
        .await
        .map_err(backend)?
        .iter()
        .map(|r| r.get(0))
        .collect())
}
