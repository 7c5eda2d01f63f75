//! Licenses on PostgreSQL: creation, changes, credits and debits, revocation and rotation,
//! each one transaction with its history row, as store/sqlite/licenses.rs.

use deadpool_postgres::{GenericClient, Transaction};
use tokio_postgres::types::ToSql;
use tokio_postgres::Row;

use super::flush::{state_from_row, STATE_COLUMNS};
use super::{backend, PgStore};
use crate::keys::{self, KeyHash};
use crate::license::KeyRules;
use crate::license::{LicenseState, LicenseStatus};
use crate::store::license_keys;
use crate::store::rollup::day_of;
use crate::store::UnitsFix;
use crate::store::{
    Adjustment, KeyLimits, KeyTerms, License, LicenseKey, LicensePatch, NewLicense, Result,
    StoreError,
};

pub(crate) const LICENSE_COLUMNS: &str =
    "id, key_hash, key_prefix, name, email, company, plan, status, balance_ms, used_ms, \
     requests_total, version, expires_at, created_at, updated_at, last_used_at, keys_version, \
     COALESCE(period_anchor, created_at)";

pub(crate) fn license_from_row(r: &Row) -> License {
    let hash: Vec<u8> = r.get(1);
    let status: String = r.get(7);
    License {
        id: r.get(0),
        key_hash: KeyHash(hash.try_into().unwrap_or([0; 32])),
        key_prefix: r.get(2),
        name: r.get(3),
        email: r.get(4),
        company: r.get(5),
        plan: r.get(6),
        status: LicenseStatus::parse(&status).unwrap_or(LicenseStatus::Revoked),
        balance_ms: r.get(8),
        used_ms: r.get(9),
        requests_total: r.get(10),
        version: r.get(11),
        expires_at: r.get(12),
        created_at: r.get(13),
        updated_at: r.get(14),
        last_used_at: r.get(15),
        keys_version: r.get(16),
        period_anchor: r.get(17),
    }
}

const KEY_COLUMNS: &str = "id, license_id, key_prefix, name, status, created_at, updated_at, \
     expires_at, requests_per_second, max_concurrent, max_seconds_per_day, \
     (SELECT max(last_at) FROM key_daily WHERE key_daily.key_id = license_keys.id)";

fn key_from_row(r: &Row) -> LicenseKey {
    let status: String = r.get(4);
    LicenseKey {
        id: r.get(0),
        license_id: r.get(1),
        key_prefix: r.get(2),
        name: r.get(3),
        status: LicenseStatus::parse(&status).unwrap_or(LicenseStatus::Revoked),
        created_at: r.get(5),
        updated_at: r.get(6),
        expires_at: r.get(7),
        limits: limits_from_row(r, 8),
        last_used_at: r.get(11),
    }
}

/// A key's limits, from three bigint columns from `at` (`requests_per_second`,
/// `max_concurrent`, `max_seconds_per_day`).
pub(super) fn limits_from_row(r: &Row, at: usize) -> KeyLimits {
    KeyLimits::from_columns(r.get(at), r.get(at + 1), r.get(at + 2))
}

async fn insert_key(
    tx: &Transaction<'_>,
    license_id: i64,
    key: &keys::NewKey,
    terms: &KeyTerms,
    now: i64,
) -> Result<i64> {
    let hash: &[u8] = &key.hash.0;
    let l = &terms.limits;
    let rps = l.requests_per_second.map(i64::from);
    let concurrent = l.max_concurrent.map(i64::from);
    let row = tx
        .query_one(
            "INSERT INTO license_keys (license_id, key_hash, key_prefix, name, created_at,
                 updated_at, expires_at, requests_per_second, max_concurrent,
                 max_seconds_per_day)
             VALUES ($1, $2, $3, $4, $5, $5, $6, $7, $8, $9) RETURNING id",
            &[
                &license_id,
                &hash,
                &key.display_prefix,
                &terms.name,
                &now,
                &terms.expires_at,
                &rps,
                &concurrent,
                &l.max_seconds_per_day,
            ],
        )
        .await
        .map_err(backend)?;
    Ok(row.get(0))
}

async fn keys_of(tx: &Transaction<'_>, license_id: i64) -> Result<Vec<LicenseKey>> {
    let rows = tx
        .query(
            &format!("SELECT {KEY_COLUMNS} FROM license_keys WHERE license_id = $1 ORDER BY id"),
            &[&license_id],
        )
        .await
        .map_err(backend)?;
    Ok(rows.iter().map(key_from_row).collect())
}

/// One key of the license, locked to the end of the transaction.
async fn key_of(tx: &Transaction<'_>, license_id: i64, key_id: i64) -> Result<LicenseKey> {
    tx.query_opt(
        &format!(
            "SELECT {KEY_COLUMNS} FROM license_keys WHERE id = $1 AND license_id = $2
             FOR UPDATE"
        ),
        &[&key_id, &license_id],
    )
    .await
    .map_err(backend)?
    .map(|r| key_from_row(&r))
    .ok_or(StoreError::NotFound)
}

/// A change to the license's keys: `keys_version` moves on (every node then reads the keys it
/// holds again: the change is announced), and so do `version` and `updated_at`.
async fn keys_changed(tx: &Transaction<'_>, license_id: i64, now: i64) -> Result<License> {
    let row = tx
        .query_opt(
            &format!(
                "UPDATE licenses SET keys_version = keys_version + 1, version = version + 1,
                     updated_at = $2
                 WHERE id = $1 RETURNING {LICENSE_COLUMNS}"
            ),
            &[&license_id, &now],
        )
        .await
        .map_err(backend)?
        .ok_or(StoreError::NotFound)?;
    Ok(license_from_row(&row))
}

/// The license locked to the end of the transaction (key changes of one license run one
/// after the other).
async fn lock_license(tx: &Transaction<'_>, id: i64) -> Result<()> {
    tx.query_opt("SELECT id FROM licenses WHERE id = $1 FOR UPDATE", &[&id])
        .await
        .map_err(backend)?
        .ok_or(StoreError::NotFound)?;
    Ok(())
}

async fn rotate_key_in(
    tx: &Transaction<'_>,
    license_id: i64,
    key_id: i64,
    now: i64,
) -> Result<(License, LicenseKey, String)> {
    let old = key_of(tx, license_id, key_id).await?;
    license_keys::may_rotate(&old, now)?;
    let key = keys::generate();
    let hash: &[u8] = &key.hash.0;
    let old_hash: Vec<u8> = tx
        .query_one(
            "SELECT key_hash FROM license_keys WHERE id = $1",
            &[&key_id],
        )
        .await
        .map_err(backend)?
        .get(0);
    tx.execute(
        "UPDATE license_keys SET key_hash = $2, key_prefix = $3, updated_at = $4 WHERE id = $1",
        &[&key_id, &hash, &key.display_prefix, &now],
    )
    .await
    .map_err(backend)?;
    // the license's own key (its first) is the one `licenses` shows
    tx.execute(
        "UPDATE licenses SET key_hash = $2, key_prefix = $3 WHERE id = $1 AND key_hash = $4",
        &[&license_id, &hash, &key.display_prefix, &old_hash],
    )
    .await
    .map_err(backend)?;
    let license = keys_changed(tx, license_id, now).await?;
    let rotated = key_of(tx, license_id, key_id).await?;
    Ok((license, rotated, key.key))
}

/// Time charged and requests counted in a license's plan period from `$2` (Unix ms), from the
/// usage history: admission's read, the period usage, and a lease's new period.
pub(crate) const PERIOD_USAGE: &str =
    "SELECT coalesce(sum(-delta_ms - priced_ms + included_ms), 0)::bigint,
        coalesce(sum(requests), 0)::bigint
    FROM usage_history
    WHERE license_id = $1 AND kind = 'usage' AND created_at >= $2";

/// A license's row, on a connection or in a transaction.
pub(crate) async fn license(c: &impl GenericClient, id: i64) -> Result<License> {
    let st = c
        .prepare_cached(&format!(
            "SELECT {LICENSE_COLUMNS} FROM licenses WHERE id = $1"
        ))
        .await
        .map_err(backend)?;
    c.query_opt(&st, &[&id])
        .await
        .map_err(backend)?
        .map(|r| license_from_row(&r))
        .ok_or(StoreError::NotFound)
}

/// Several nodes: a balance taken below what the nodes hold on lease (a debit, a refund) takes
/// their leases down with it, each in proportion, so together they can spend no more than is
/// left: the balance, and what the plan still includes in the period the row counts (a plan
/// that includes time is leased from both; the `plans` table says what it includes, a plan
/// not there being limited as `free`). The license is locked already (its row was just
/// updated); the nodes learn their new leases with the change's notice (`ClusterStore::held`).
async fn shrink_leases(tx: &Transaction<'_>, id: i64) -> Result<()> {
    let st = tx
        .prepare_cached(
            "WITH left_now AS (
                 SELECT greatest(l.balance_ms, 0) + greatest(coalesce(
                            CASE WHEN p.name IS NULL THEN f.included_ms ELSE p.included_ms END,
                            0) - greatest(l.period_used_ms, 0), 0) AS left_ms,
                        l.reserved_ms
                 FROM licenses l
                 LEFT JOIN plans p ON p.name = l.plan
                 LEFT JOIN plans f ON f.name = 'free'
                 WHERE l.id = $1),
                  lic AS (SELECT left_ms, reserved_ms FROM left_now WHERE reserved_ms > left_ms),
                  shrunk AS (
                      UPDATE leases l
                      SET amount_ms = floor(l.amount_ms::numeric * lic.left_ms / lic.reserved_ms)::bigint
                      FROM lic WHERE l.license_id = $1
                      RETURNING l.amount_ms)
             UPDATE licenses SET reserved_ms = (SELECT coalesce(sum(amount_ms), 0) FROM shrunk)
             WHERE id = $1 AND EXISTS (SELECT 1 FROM lic)",
        )
        .await
        .map_err(backend)?;
    tx.execute(&st, &[&id]).await.map_err(backend)?;
    Ok(())
}

/// Adds `delta_ms` to a balance with its history row, in the caller's transaction.
pub(crate) async fn change_balance(
    tx: &Transaction<'_>,
    id: i64,
    kind: &str,
    delta_ms: i64,
    reason: Option<&str>,
    now: i64,
) -> Result<License> {
    let st = tx
        .prepare_cached(&format!(
            "UPDATE licenses SET balance_ms = balance_ms + $2, version = version + 1,
                 updated_at = $3
             WHERE id = $1 RETURNING {LICENSE_COLUMNS}"
        ))
        .await
        .map_err(backend)?;
    let row = tx
        .query_opt(&st, &[&id, &delta_ms, &now])
        .await
        .map_err(backend)?
        .ok_or(StoreError::NotFound)?;
    let after = license_from_row(&row);
    if delta_ms < 0 {
        shrink_leases(tx, id).await?;
    }
    let history = tx
        .prepare_cached(
            "INSERT INTO usage_history (license_id, kind, delta_ms, balance_before_ms,
                 balance_after_ms, requests, reason, created_at)
             VALUES ($1, $2, $3, $4, $5, 0, $6, $7)",
        )
        .await
        .map_err(backend)?;
    let before = after.balance_ms - delta_ms;
    tx.execute(
        &history,
        &[
            &id,
            &kind,
            &delta_ms,
            &before,
            &after.balance_ms,
            &reason,
            &now,
        ],
    )
    .await
    .map_err(backend)?;
    Ok(after)
}

impl PgStore {
    /// Creates a license and its key; the key is returned once and stored only as a hash.
    pub async fn create_license(&self, new: NewLicense, now: i64) -> Result<(License, String)> {
        if new.name.trim().is_empty() {
            return Err(StoreError::Invalid("name must not be empty".into()));
        }
        if new.balance_ms < 0 {
            return Err(StoreError::Invalid("hours must not be negative".into()));
        }
        let key = keys::generate();
        self.run(async |c| {
            let tx = c.transaction().await.map_err(backend)?;
            let hash: &[u8] = &key.hash.0;
            let row = tx
                .query_one(
                    &format!(
                        "INSERT INTO licenses (key_hash, key_prefix, name, email, company, plan,
                         balance_ms, expires_at, created_at, updated_at)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9)
                     RETURNING {LICENSE_COLUMNS}"
                    ),
                    &[
                        &hash,
                        &key.display_prefix,
                        &new.name.trim(),
                        &new.email,
                        &new.company,
                        &new.plan,
                        &new.balance_ms,
                        &new.expires_at,
                        &now,
                    ],
                )
                .await
                .map_err(backend)?;
            let license = license_from_row(&row);
            if new.balance_ms > 0 {
                tx.execute(
                    "INSERT INTO usage_history (license_id, kind, delta_ms, balance_before_ms,
                     balance_after_ms, requests, reason, created_at)
                 VALUES ($1, 'credit', $2, 0, $2, 0, 'initial', $3)",
                    &[&license.id, &new.balance_ms, &now],
                )
                .await
                .map_err(backend)?;
            }
            tx.commit().await.map_err(backend)?;
            Ok((license, key.key))
        })
        .await
    }

    pub async fn license(&self, id: i64) -> Result<License> {
        self.run(async |c| license(&*c, id).await).await
    }

    pub async fn license_by_key(&self, key: KeyHash) -> Result<Option<License>> {
        self.run(async |c| {
            let st = c
                .prepare_cached(&format!(
                    "SELECT {LICENSE_COLUMNS} FROM licenses WHERE id =
                         (SELECT license_id FROM license_keys
                          WHERE key_hash = $1 AND status = 'active'
                            AND (expires_at IS NULL OR expires_at > $2))"
                ))
                .await
                .map_err(backend)?;
            let hash: &[u8] = &key.0;
            let now = crate::ledger::now_ms();
            Ok(c.query_opt(&st, &[&hash, &now])
                .await
                .map_err(backend)?
                .map(|r| license_from_row(&r)))
        })
        .await
    }

    /// Every license, oldest first (the CLI's list).
    pub async fn all_licenses(&self) -> Result<Vec<License>> {
        let rows = self
            .run(async |c| {
                c.query(
                    &format!("SELECT {LICENSE_COLUMNS} FROM licenses ORDER BY id"),
                    &[],
                )
                .await
                .map_err(backend)
            })
            .await?;
        Ok(rows.iter().map(license_from_row).collect())
    }

    /// Applies a patch in one transaction (the row locked while it is read and written); the
    /// version moves on so every node picks it up.
    pub async fn update_license(&self, id: i64, p: LicensePatch, now: i64) -> Result<License> {
        if p.name.as_deref().is_some_and(|n| n.trim().is_empty()) {
            return Err(StoreError::Invalid("name must not be empty".into()));
        }
        self.run(async |c| {
            let tx = c.transaction().await.map_err(backend)?;
            let old = tx
                .query_opt(
                    &format!("SELECT {LICENSE_COLUMNS} FROM licenses WHERE id = $1 FOR UPDATE"),
                    &[&id],
                )
                .await
                .map_err(backend)?
                .map(|r| license_from_row(&r))
                .ok_or(StoreError::NotFound)?;
            let pick = |new: &Option<Option<String>>, old: &Option<String>| match new {
                Some(v) => v.clone(),
                None => old.clone(),
            };
            let row = tx
                .query_one(
                    &format!(
                        "UPDATE licenses SET name = $2, email = $3, company = $4, plan = $5,
                         expires_at = $6, status = $7, version = version + 1, updated_at = $8
                     WHERE id = $1 RETURNING {LICENSE_COLUMNS}"
                    ),
                    &[
                        &id,
                        &p.name.as_deref().map(str::trim).unwrap_or(&old.name),
                        &pick(&p.email, &old.email),
                        &pick(&p.company, &old.company),
                        &p.plan.as_deref().unwrap_or(&old.plan),
                        &p.expires_at.unwrap_or(old.expires_at),
                        &p.status.unwrap_or(old.status).as_str(),
                        &now,
                    ],
                )
                .await
                .map_err(backend)?;
            tx.commit().await.map_err(backend)?;
            Ok(license_from_row(&row))
        })
        .await
    }

    /// A credit or debit with its history row, in one transaction.
    pub async fn adjust_balance(
        &self,
        id: i64,
        how: Adjustment,
        ms: i64,
        reason: Option<String>,
        now: i64,
    ) -> Result<License> {
        how.delta(ms, i64::MAX)?; // (refused before a connection is taken)
        self.run(async |c| {
            let tx = c.transaction().await.map_err(backend)?;
            // the row locked, so the balance the rule sees is the one changed
            let balance: i64 = tx
                .query_opt(
                    "SELECT balance_ms FROM licenses WHERE id = $1 FOR UPDATE",
                    &[&id],
                )
                .await
                .map_err(backend)?
                .ok_or(StoreError::NotFound)?
                .get(0);
            let delta = how.delta(ms, balance)?;
            let kind = how.kind();
            let license = change_balance(&tx, id, kind, delta, reason.as_deref(), now).await?;
            tx.commit().await.map_err(backend)?;
            Ok(license)
        })
        .await
    }

    /// An operator's correction of units: the balance, its history row (priced), and the
    /// units row, in one transaction.
    pub async fn correct_units(&self, id: i64, fix: UnitsFix, now: i64) -> Result<License> {
        self.run(async |c| {
            let tx = c.transaction().await.map_err(backend)?;
            let mut fix = fix.clone();
            if let Some(inc) = fix.included {
                // the license locked first: no flush splits its units meanwhile
                tx.execute("SELECT 1 FROM licenses WHERE id = $1 FOR UPDATE", &[&id])
                    .await
                    .map_err(backend)?;
                let used: i64 = tx
                    .query_one(
                        "SELECT coalesce(sum(units), 0)::bigint FROM usage_units
                         WHERE license_id = $1 AND meter = $2 AND created_at >= $3",
                        &[&id, &fix.meter, &inc.period_start],
                    )
                    .await
                    .map_err(backend)?
                    .get(0);
                fix.split(used);
            }
            let reason = fix.reason_text();
            // the license row is locked by the balance's update: no other history row of it
            // comes between that and the price written on it
            change_balance(&tx, id, fix.kind(), -fix.charged_ms, Some(&reason), now).await?;
            tx.execute(
                "UPDATE usage_history SET priced_ms = $2
                 WHERE id = (SELECT max(id) FROM usage_history WHERE license_id = $1)",
                &[&id, &fix.charged_ms],
            )
            .await
            .map_err(backend)?;
            tx.execute(
                "INSERT INTO usage_units (license_id, meter, units, charged_ms, created_at,
                     included_units)
                 VALUES ($1, $2, $3, $4, $5, $6)",
                &[
                    &id,
                    &fix.meter,
                    &fix.units,
                    &fix.charged_ms,
                    &now,
                    &fix.included_units,
                ],
            )
            .await
            .map_err(backend)?;
            // the meter's period allowance as the nodes lease it counts it too (made now, it
            // is of the period the row counts, or of a newer one that will count it again)
            tx.execute(
                "UPDATE period_units SET used = used + $3 WHERE license_id = $1 AND meter = $2",
                &[&id, &fix.meter, &fix.units],
            )
            .await
            .map_err(backend)?;
            let l = license(&tx, id).await?;
            tx.commit().await.map_err(backend)?;
            Ok(l)
        })
        .await
    }

    pub async fn revoke(&self, id: i64, now: i64) -> Result<License> {
        let row = self
            .run(async |c| {
                c.query_opt(
                    &format!(
                        "UPDATE licenses SET status = 'revoked', version = version + 1,
                         updated_at = $2
                     WHERE id = $1 RETURNING {LICENSE_COLUMNS}"
                    ),
                    &[&id, &now],
                )
                .await
                .map_err(backend)
            })
            .await?
            .ok_or(StoreError::NotFound)?;
        Ok(license_from_row(&row))
    }

    /// Replaces the license's key, its only active one (see
    /// [`license_keys::the_one_to_rotate`]): the old one stops working, the new one is
    /// returned once.
    pub async fn rotate(&self, id: i64, now: i64) -> Result<(License, String)> {
        self.run(async |c| {
            let tx = c.transaction().await.map_err(backend)?;
            lock_license(&tx, id).await?;
            let active: Vec<LicenseKey> = keys_of(&tx, id)
                .await?
                .into_iter()
                .filter(|k| k.status == LicenseStatus::Active)
                .collect();
            let key_id = license_keys::the_one_to_rotate(&active)?.id;
            let (license, _, key) = rotate_key_in(&tx, id, key_id, now).await?;
            tx.commit().await.map_err(backend)?;
            Ok((license, key))
        })
        .await
    }

    /// The license's keys, oldest first, revoked ones too.
    pub async fn keys(&self, id: i64) -> Result<Vec<LicenseKey>> {
        self.run(async |c| {
            let tx = c.transaction().await.map_err(backend)?;
            license(&tx, id).await?;
            let keys = keys_of(&tx, id).await?;
            tx.commit().await.map_err(backend)?;
            Ok(keys)
        })
        .await
    }

    /// A new key for the license, returned once.
    pub async fn add_key(
        &self,
        id: i64,
        terms: KeyTerms,
        now: i64,
    ) -> Result<(License, LicenseKey, String)> {
        let terms = license_keys::checked_terms(terms, now)?;
        let key = keys::generate();
        self.run(async |c| {
            let tx = c.transaction().await.map_err(backend)?;
            lock_license(&tx, id).await?;
            let key_id = insert_key(&tx, id, &key, &terms, now).await?;
            let license = keys_changed(&tx, id, now).await?;
            let added = key_of(&tx, id, key_id).await?;
            tx.commit().await.map_err(backend)?;
            Ok((license, added, key.key.clone()))
        })
        .await
    }

    /// Revokes one key of the license; its siblings work on.
    pub async fn revoke_key(
        &self,
        id: i64,
        key_id: i64,
        now: i64,
    ) -> Result<(License, LicenseKey)> {
        self.run(async |c| {
            let tx = c.transaction().await.map_err(backend)?;
            lock_license(&tx, id).await?;
            let was = key_of(&tx, id, key_id).await?;
            if was.status == LicenseStatus::Revoked {
                // again: nothing changes, and no node need read the license's keys again
                let l = license(&tx, id).await?;
                tx.commit().await.map_err(backend)?;
                return Ok((l, was));
            }
            tx.execute(
                "UPDATE license_keys SET status = 'revoked', updated_at = $2 WHERE id = $1",
                &[&key_id, &now],
            )
            .await
            .map_err(backend)?;
            // the license's own key (what a build before keys reads) moves on to its oldest
            // active key, or to none that any key matches
            let nowhere: &[u8] = &keys::generate().hash.0;
            tx.execute(
                "UPDATE licenses SET
                     key_hash = coalesce((SELECT key_hash FROM license_keys
                                          WHERE license_id = $1 AND status = 'active'
                                          ORDER BY id LIMIT 1), $3),
                     key_prefix = coalesce((SELECT key_prefix FROM license_keys
                                            WHERE license_id = $1 AND status = 'active'
                                            ORDER BY id LIMIT 1), key_prefix)
                 WHERE id = $1
                   AND key_hash = (SELECT key_hash FROM license_keys WHERE id = $2)",
                &[&id, &key_id, &nowhere],
            )
            .await
            .map_err(backend)?;
            let license = keys_changed(&tx, id, now).await?;
            let key = key_of(&tx, id, key_id).await?;
            tx.commit().await.map_err(backend)?;
            Ok((license, key))
        })
        .await
    }

    /// Replaces one key of the license: the old one stops working, the new one is returned
    /// once.
    pub async fn rotate_key(
        &self,
        id: i64,
        key_id: i64,
        now: i64,
    ) -> Result<(License, LicenseKey, String)> {
        self.run(async |c| {
            let tx = c.transaction().await.map_err(backend)?;
            lock_license(&tx, id).await?;
            let done = rotate_key_in(&tx, id, key_id, now).await?;
            tx.commit().await.map_err(backend)?;
            Ok(done)
        })
        .await
    }
}

impl PgStore {
    /// The license rows `condition` selects (`… FROM licenses WHERE {condition}`), as the
    /// core holds them.
    pub(super) async fn states_where(
        &self,
        condition: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<LicenseState>> {
        self.run(async |c| {
            let st = c
                .prepare_cached(&format!(
                    "SELECT {STATE_COLUMNS} FROM licenses WHERE {condition}"
                ))
                .await
                .map_err(backend)?;
            Ok(c.query(&st, params)
                .await
                .map_err(backend)?
                .iter()
                .map(state_from_row)
                .collect())
        })
        .await
    }

    /// The license row one of whose active keys has this hash, as the core holds it, read by
    /// that key, with the key's own rules (and its request time today, for a daily cap).
    pub async fn state_by_hash(&self, key: KeyHash, now: i64) -> Result<Option<LicenseState>> {
        let hash: &[u8] = &key.0;
        let day = day_of(now);
        let row = self
            .run(async |c| {
                let st = c
                    .prepare_cached(&format!(
                        "SELECT {STATE_COLUMNS}, k.key_id, k.key_expires, k.requests_per_second,
                                k.max_concurrent, k.max_seconds_per_day,
                                (SELECT d.duration_us FROM key_daily d
                                 WHERE d.key_id = k.key_id AND d.day = $2)
                         FROM licenses
                         JOIN (SELECT id AS key_id, license_id AS key_license,
                                      expires_at AS key_expires,
                                      requests_per_second, max_concurrent, max_seconds_per_day
                               FROM license_keys
                               WHERE key_hash = $1 AND status = 'active') k
                           ON k.key_license = licenses.id"
                    ))
                    .await
                    .map_err(backend)?;
                c.query_opt(&st, &[&hash, &day]).await.map_err(backend)
            })
            .await?;
        Ok(row.map(|r| {
            let limits = limits_from_row(&r, 11);
            let key_rules = license_keys::rules(r.get(10), limits, now).map(|k| KeyRules {
                day_used_us: r.get::<_, Option<i64>>(14).unwrap_or(0),
                ..k
            });
            LicenseState {
                key_hash: key,
                key_id: r.get(9),
                key_rules,
                ..state_from_row(&r)
            }
        }))
    }

    /// The license rows changed since `since` (Unix ms), by id.
    pub async fn changed_since(&self, since: i64) -> Result<Vec<LicenseState>> {
        self.states_where("updated_at >= $1 ORDER BY id", &[&since])
            .await
    }

    /// Time charged and requests counted since `start` (Unix ms), from the usage history.
    pub async fn period_usage(&self, id: i64, start: i64) -> Result<(i64, i64)> {
        self.run(async |c| {
            let st = c.prepare_cached(PERIOD_USAGE).await.map_err(backend)?;
            let r = c.query_one(&st, &[&id, &start]).await.map_err(backend)?;
            Ok((r.get(0), r.get(1)))
        })
        .await
    }
}
