//! License rows: creation (the key is made here and returned once), reads, balance changes with
//! their history row in the same transaction, revocation and rotation. Every change bumps
//! `version` and `updated_at` so a running gateway picks it up ([`changed_since`]).

use super::{Result, StoreError};
use crate::keys::{self, KeyHash};
use crate::license::{LicenseState, LicenseStatus};
use crate::store::license_keys;
use crate::store::rollup::day_of;
use crate::store::UnitsFix;
use crate::store::{
    Adjustment, KeyLimits, KeyTerms, License, LicenseKey, LicensePatch, NewLicense,
};
use rusqlite::{params, Connection, OptionalExtension, Row, TransactionBehavior};

pub(crate) const COLUMNS: &str =
    "id, key_hash, key_prefix, name, email, company, plan, status, balance_ms, \
     used_ms, requests_total, version, expires_at, created_at, updated_at, last_used_at, \
     keys_version, COALESCE(period_anchor, created_at)";

/// The columns of the ledger's view of a row, in the order [`state_from_row`] reads them.
pub(crate) const STATE_COLUMNS: &str =
    "id, key_hash, plan, status, expires_at, balance_ms, version, \
     COALESCE(period_anchor, created_at), keys_version";

pub(crate) fn state_from_row(r: &Row<'_>) -> rusqlite::Result<LicenseState> {
    let hash: Vec<u8> = r.get(1)?;
    let status: String = r.get(3)?;
    Ok(LicenseState {
        id: r.get(0)?,
        key_hash: KeyHash(hash.try_into().unwrap_or([0; 32])),
        key_id: 0,
        keys_version: r.get(8)?,
        plan: r.get(2)?,
        status: LicenseStatus::parse(&status).unwrap_or(LicenseStatus::Revoked),
        expires_at: r.get(4)?,
        balance_ms: r.get(5)?,
        version: r.get(6)?,
        period_anchor: r.get(7)?,
        period: None,
        topup: None,
        today: None,
        period_units: Vec::new(),
        key_rules: None,
        period_used: None,
    })
}

pub(crate) fn from_row(r: &Row<'_>) -> rusqlite::Result<License> {
    let hash: Vec<u8> = r.get(1)?;
    let status: String = r.get(7)?;
    Ok(License {
        id: r.get(0)?,
        key_hash: KeyHash(hash.try_into().unwrap_or([0; 32])),
        key_prefix: r.get(2)?,
        name: r.get(3)?,
        email: r.get(4)?,
        company: r.get(5)?,
        plan: r.get(6)?,
        status: LicenseStatus::parse(&status).unwrap_or(LicenseStatus::Revoked),
        balance_ms: r.get(8)?,
        used_ms: r.get(9)?,
        requests_total: r.get(10)?,
        version: r.get(11)?,
        expires_at: r.get(12)?,
        created_at: r.get(13)?,
        updated_at: r.get(14)?,
        last_used_at: r.get(15)?,
        keys_version: r.get(16)?,
        period_anchor: r.get(17)?,
    })
}

/// Creates a license and its key; the key is returned once and stored only as a hash.
pub fn create(conn: &mut Connection, new: &NewLicense, now: i64) -> Result<(License, String)> {
    if new.name.trim().is_empty() {
        return Err(StoreError::Invalid("name must not be empty".into()));
    }
    if new.balance_ms < 0 {
        return Err(StoreError::Invalid("hours must not be negative".into()));
    }
    let key = keys::generate();
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    tx.execute(
        "INSERT INTO licenses (key_hash, key_prefix, name, email, company, plan, balance_ms,
                               expires_at, created_at, updated_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?9)",
        params![
            &key.hash.0[..],
            key.display_prefix,
            new.name.trim(),
            new.email,
            new.company,
            new.plan,
            new.balance_ms,
            new.expires_at,
            now
        ],
    )?;
    // its first key, named FIRST_KEY, is written by the trigger that mirrors the license's
    // own key (migration 0020), for this build and the one before it alike
    let id = tx.last_insert_rowid();
    if new.balance_ms > 0 {
        insert_history(
            &tx,
            id,
            "credit",
            new.balance_ms,
            0,
            0,
            Some("initial"),
            now,
        )?;
    }
    let license = get(&tx, id)?;
    tx.commit()?;
    Ok((license, key.key))
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn insert_history(
    conn: &Connection,
    license_id: i64,
    kind: &str,
    delta_ms: i64,
    balance_before_ms: i64,
    requests: i64,
    reason: Option<&str>,
    now: i64,
) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO usage_history (license_id, kind, delta_ms, balance_before_ms,
                                    balance_after_ms, requests, reason, created_at)
         VALUES (?1, ?2, ?3, ?4, ?4 + ?3, ?5, ?6, ?7)",
    )?
    .execute(params![
        license_id,
        kind,
        delta_ms,
        balance_before_ms,
        requests,
        reason,
        now
    ])?;
    Ok(())
}

pub fn get(conn: &Connection, id: i64) -> Result<License> {
    conn.prepare_cached(&format!("SELECT {COLUMNS} FROM licenses WHERE id = ?1"))?
        .query_row([id], from_row)
        .optional()?
        .ok_or(StoreError::NotFound)
}

/// A license as read by one of its keys: the key's id, expiry and limits.
type ByKey = (License, i64, Option<i64>, KeyLimits);

/// The license one of whose active keys has this hash, with that key's id, expiry and limits.
fn by_active_key(conn: &Connection, hash: &KeyHash) -> Result<Option<ByKey>> {
    Ok(conn
        .prepare_cached(&format!(
            "SELECT {COLUMNS}, k.key_id, k.key_expires, k.requests_per_second, k.max_concurrent,
                    k.max_seconds_per_day
             FROM licenses
             JOIN (SELECT id AS key_id, license_id AS key_license, expires_at AS key_expires,
                          requests_per_second, max_concurrent, max_seconds_per_day
                   FROM license_keys
                   WHERE key_hash = ?1 AND status = 'active') k ON k.key_license = licenses.id"
        ))?
        .query_row([&hash.0[..]], |r| {
            Ok((
                from_row(r)?,
                r.get(18)?,
                r.get(19)?,
                limits_from_row(r, 20)?,
            ))
        })
        .optional()?)
}

/// The ledger's view of the license one of whose active keys has this hash, if any (the
/// proxy's cache-miss read), as read by that key, with the key's own rules (its request time
/// today read from the per-key rollup when it has a daily cap).
pub fn state_by_hash(conn: &Connection, hash: &KeyHash, now: i64) -> Result<Option<LicenseState>> {
    let Some((l, key_id, expires_at, limits)) = by_active_key(conn, hash)? else {
        return Ok(None);
    };
    let mut key_rules = license_keys::rules(expires_at, limits, now);
    if let Some(r) = key_rules
        .as_mut()
        .filter(|_| limits.max_seconds_per_day.is_some())
    {
        r.day_used_us = conn
            .prepare_cached("SELECT duration_us FROM key_daily WHERE key_id = ?1 AND day = ?2")?
            .query_row([key_id, r.day], |r| r.get(0))
            .optional()?
            .unwrap_or(0);
    }
    Ok(Some(LicenseState {
        key_hash: *hash,
        key_id,
        key_rules,
        ..l.state()
    }))
}

/// The license one of whose active keys has this hash, if any, and the key not past its expiry
/// (customers authenticate with their key).
pub fn by_hash(conn: &Connection, hash: &KeyHash, now: i64) -> Result<Option<License>> {
    Ok(by_active_key(conn, hash)?
        .filter(|(_, _, expires_at, _)| expires_at.is_none_or(|e| e > now))
        .map(|(l, ..)| l))
}

/// The proxy's cache-miss read: the ledger's view of the license with this key hash, with what
/// it used in its current plan period (`calendar` decides where periods start).
pub fn state_for_admission(
    conn: &Connection,
    hash: &KeyHash,
    calendar: &crate::periods::Calendar,
    now: i64,
) -> Result<Option<LicenseState>> {
    let Some(mut state) = state_by_hash(conn, hash, now)? else {
        return Ok(None);
    };
    let (start, end) = calendar.period(state.period_anchor, now);
    let (used_ms, requests) = period_usage(conn, state.id, start)?;
    state.period = Some(crate::license::PeriodUsage {
        start,
        end,
        used_ms,
        requests,
        units: Default::default(),
    });
    state.period_units = conn
        .prepare_cached(
            "SELECT meter, sum(units) FROM usage_units
             WHERE license_id = ?1 AND created_at >= ?2 GROUP BY meter",
        )?
        .query_map(params![state.id, start], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<rusqlite::Result<_>>()?;
    state.topup = conn
        .prepare_cached(
            "SELECT balance_after_ms, created_at FROM usage_history
             WHERE license_id = ?1 AND kind IN ('credit', 'purchase')
             ORDER BY id DESC LIMIT 1",
        )?
        .query_row([state.id], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    let day = day_of(now);
    let bytes_in: i64 = conn
        .prepare_cached("SELECT bytes_in FROM usage_daily WHERE license_id = ?1 AND day = ?2")?
        .query_row(params![state.id, day], |r| r.get(0))
        .optional()?
        .unwrap_or(0);
    state.today = Some(crate::license::DayUsage {
        day,
        bytes_in: bytes_in.max(0) as u64,
    });
    Ok(Some(state))
}

/// Time charged and requests counted since `start` (Unix ms), from the usage history.
pub fn period_usage(conn: &Connection, id: i64, start: i64) -> Result<(i64, i64)> {
    Ok(conn
        .prepare_cached(
            "SELECT coalesce(sum(-delta_ms - priced_ms + included_ms), 0),
                    coalesce(sum(requests), 0)
             FROM usage_history
             WHERE license_id = ?1 AND kind = 'usage' AND created_at >= ?2",
        )?
        .query_row(params![id, start], |r| Ok((r.get(0)?, r.get(1)?)))?)
}

pub fn list(conn: &Connection) -> Result<Vec<License>> {
    let mut st = conn.prepare_cached(&format!("SELECT {COLUMNS} FROM licenses ORDER BY id"))?;
    let rows = st.query_map([], from_row)?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// Rows changed by people (not by usage flushes) at or after `since` (Unix ms).
pub fn changed_since(conn: &Connection, since: i64) -> Result<Vec<LicenseState>> {
    let mut st = conn.prepare_cached(&format!(
        "SELECT {STATE_COLUMNS} FROM licenses WHERE updated_at >= ?1 ORDER BY id"
    ))?;
    let rows = st.query_map([since], state_from_row)?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// Credits or debits `ms` with its history row, in one transaction.
pub fn adjust(
    conn: &mut Connection,
    id: i64,
    adjustment: Adjustment,
    ms: i64,
    reason: Option<&str>,
    now: i64,
) -> Result<License> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let balance: i64 = tx
        .query_row("SELECT balance_ms FROM licenses WHERE id = ?1", [id], |r| {
            r.get(0)
        })
        .optional()?
        .ok_or(StoreError::NotFound)?;
    let delta = adjustment.delta(ms, balance)?;
    let license = change_balance(&tx, id, adjustment.kind(), delta, reason, now)?;
    tx.commit()?;
    Ok(license)
}

/// An operator's correction of units: the balance, its history row (priced), and the units
/// row, in one transaction.
pub fn correct_units(conn: &mut Connection, id: i64, fix: &UnitsFix, now: i64) -> Result<License> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let mut fix = fix.clone();
    if let Some(inc) = fix.included {
        let used: i64 = tx.query_row(
            "SELECT coalesce(sum(units), 0) FROM usage_units
             WHERE license_id = ?1 AND meter = ?2 AND created_at >= ?3",
            params![id, fix.meter, inc.period_start],
            |r| r.get(0),
        )?;
        fix.split(used);
    }
    let reason = fix.reason_text();
    change_balance(&tx, id, fix.kind(), -fix.charged_ms, Some(&reason), now)?;
    tx.execute(
        "UPDATE usage_history SET priced_ms = ?2
         WHERE id = (SELECT max(id) FROM usage_history WHERE license_id = ?1)",
        params![id, fix.charged_ms],
    )?;
    tx.execute(
        "INSERT INTO usage_units (license_id, meter, units, charged_ms, created_at,
             included_units)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![
            id,
            fix.meter,
            fix.units,
            fix.charged_ms,
            now,
            fix.included_units
        ],
    )?;
    let license = get(&tx, id)?;
    tx.commit()?;
    Ok(license)
}

/// Moves a balance by `delta_ms` and writes its history row, inside the caller's transaction:
/// the one way a person or a payment changes a balance (usage goes through the flusher).
pub(crate) fn change_balance(
    conn: &Connection,
    id: i64,
    kind: &str,
    delta_ms: i64,
    reason: Option<&str>,
    now: i64,
) -> Result<License> {
    let before: i64 = conn
        .query_row("SELECT balance_ms FROM licenses WHERE id = ?1", [id], |r| {
            r.get(0)
        })
        .optional()?
        .ok_or(StoreError::NotFound)?;
    conn.execute(
        "UPDATE licenses SET balance_ms = balance_ms + ?2, version = version + 1, updated_at = ?3
         WHERE id = ?1",
        params![id, delta_ms, now],
    )?;
    insert_history(conn, id, kind, delta_ms, before, 0, reason, now)?;
    get(conn, id)
}

/// Applies a patch in one transaction; the row's version moves on so the gateway picks it up.
pub fn update(conn: &mut Connection, id: i64, p: &LicensePatch, now: i64) -> Result<License> {
    if p.name.as_deref().is_some_and(|n| n.trim().is_empty()) {
        return Err(StoreError::Invalid("name must not be empty".into()));
    }
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let old = get(&tx, id)?;
    let pick = |new: &Option<Option<String>>, old: &Option<String>| match new {
        Some(v) => v.clone(),
        None => old.clone(),
    };
    tx.execute(
        "UPDATE licenses SET name = ?2, email = ?3, company = ?4, plan = ?5, expires_at = ?6,
             status = ?7, version = version + 1, updated_at = ?8
         WHERE id = ?1",
        params![
            id,
            p.name.as_deref().map(str::trim).unwrap_or(&old.name),
            pick(&p.email, &old.email),
            pick(&p.company, &old.company),
            p.plan.as_deref().unwrap_or(&old.plan),
            p.expires_at.unwrap_or(old.expires_at),
            p.status.unwrap_or(old.status).as_str(),
            now
        ],
    )?;
    let license = get(&tx, id)?;
    tx.commit()?;
    Ok(license)
}

pub fn revoke(conn: &mut Connection, id: i64, now: i64) -> Result<License> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let n = tx.execute(
        "UPDATE licenses SET status = 'revoked', version = version + 1, updated_at = ?2
         WHERE id = ?1",
        params![id, now],
    )?;
    if n == 0 {
        return Err(StoreError::NotFound);
    }
    let license = get(&tx, id)?;
    tx.commit()?;
    Ok(license)
}

/// Replaces the license's key, its only active one (see
/// [`license_keys::the_one_to_rotate`]): the old one stops working, the new one is returned
/// once.
pub fn rotate(conn: &mut Connection, id: i64, now: i64) -> Result<(License, String)> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    get(&tx, id)?;
    let active: Vec<LicenseKey> = keys_of(&tx, id)?
        .into_iter()
        .filter(|k| k.status == LicenseStatus::Active)
        .collect();
    let key_id = license_keys::the_one_to_rotate(&active)?.id;
    let (license, _, key) = rotate_key_in(&tx, id, key_id, now)?;
    tx.commit()?;
    Ok((license, key))
}

const KEY_COLUMNS: &str = "id, license_id, key_prefix, name, status, created_at, updated_at, \
     expires_at, requests_per_second, max_concurrent, max_seconds_per_day, \
     (SELECT max(last_at) FROM key_daily WHERE key_daily.key_id = license_keys.id)";

fn key_from_row(r: &Row<'_>) -> rusqlite::Result<LicenseKey> {
    let status: String = r.get(4)?;
    Ok(LicenseKey {
        id: r.get(0)?,
        license_id: r.get(1)?,
        key_prefix: r.get(2)?,
        name: r.get(3)?,
        status: LicenseStatus::parse(&status).unwrap_or(LicenseStatus::Revoked),
        created_at: r.get(5)?,
        updated_at: r.get(6)?,
        expires_at: r.get(7)?,
        limits: limits_from_row(r, 8)?,
        last_used_at: r.get(11)?,
    })
}

/// A key's limits, from three columns from `at` (`requests_per_second`, `max_concurrent`,
/// `max_seconds_per_day`).
fn limits_from_row(r: &Row<'_>, at: usize) -> rusqlite::Result<KeyLimits> {
    Ok(KeyLimits::from_columns(
        r.get(at)?,
        r.get(at + 1)?,
        r.get(at + 2)?,
    ))
}

fn insert_key(
    conn: &Connection,
    license_id: i64,
    key: &keys::NewKey,
    terms: &KeyTerms,
    now: i64,
) -> Result<i64> {
    let l = &terms.limits;
    conn.prepare_cached(
        "INSERT INTO license_keys (license_id, key_hash, key_prefix, name, created_at, updated_at,
             expires_at, requests_per_second, max_concurrent, max_seconds_per_day)
         VALUES (?1, ?2, ?3, ?4, ?5, ?5, ?6, ?7, ?8, ?9)",
    )?
    .execute(params![
        license_id,
        &key.hash.0[..],
        key.display_prefix,
        terms.name,
        now,
        terms.expires_at,
        l.requests_per_second,
        l.max_concurrent,
        l.max_seconds_per_day
    ])?;
    Ok(conn.last_insert_rowid())
}

fn keys_of(conn: &Connection, license_id: i64) -> Result<Vec<LicenseKey>> {
    let mut st = conn.prepare_cached(&format!(
        "SELECT {KEY_COLUMNS} FROM license_keys WHERE license_id = ?1 ORDER BY id"
    ))?;
    let rows = st.query_map([license_id], key_from_row)?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

fn key_of(conn: &Connection, license_id: i64, key_id: i64) -> Result<LicenseKey> {
    conn.prepare_cached(&format!(
        "SELECT {KEY_COLUMNS} FROM license_keys WHERE id = ?1 AND license_id = ?2"
    ))?
    .query_row([key_id, license_id], key_from_row)
    .optional()?
    .ok_or(StoreError::NotFound)
}

/// A change to the license's keys: its `keys_version` moves on (every node then reads the keys
/// it holds again), and so do `version` and `updated_at` (the change is polled and announced).
fn keys_changed(conn: &Connection, license_id: i64, now: i64) -> Result<License> {
    conn.prepare_cached(
        "UPDATE licenses SET keys_version = keys_version + 1, version = version + 1,
             updated_at = ?2
         WHERE id = ?1",
    )?
    .execute(params![license_id, now])?;
    get(conn, license_id)
}

/// The license's keys, oldest first, revoked ones too.
pub fn keys(conn: &Connection, license_id: i64) -> Result<Vec<LicenseKey>> {
    get(conn, license_id)?;
    keys_of(conn, license_id)
}

/// A new key for the license, returned once.
pub fn add_key(
    conn: &mut Connection,
    license_id: i64,
    terms: KeyTerms,
    now: i64,
) -> Result<(License, LicenseKey, String)> {
    let terms = license_keys::checked_terms(terms, now)?;
    let key = keys::generate();
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    get(&tx, license_id)?;
    let key_id = insert_key(&tx, license_id, &key, &terms, now)?;
    let license = keys_changed(&tx, license_id, now)?;
    let added = key_of(&tx, license_id, key_id)?;
    tx.commit()?;
    Ok((license, added, key.key))
}

/// Revokes one key of the license: it is refused from the next request, its siblings work on.
pub fn revoke_key(
    conn: &mut Connection,
    license_id: i64,
    key_id: i64,
    now: i64,
) -> Result<(License, LicenseKey)> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let was = key_of(&tx, license_id, key_id)?;
    if was.status == LicenseStatus::Revoked {
        // again: nothing changes, and no node need read the license's keys again
        return Ok((get(&tx, license_id)?, was));
    }
    tx.execute(
        "UPDATE license_keys SET status = 'revoked', updated_at = ?2 WHERE id = ?1",
        params![key_id, now],
    )?;
    // the license's own key (what a build before keys reads) moves on to its oldest active
    // key, or to none that any key matches
    tx.execute(
        "UPDATE licenses SET
             key_hash = coalesce((SELECT key_hash FROM license_keys
                                  WHERE license_id = ?1 AND status = 'active'
                                  ORDER BY id LIMIT 1), ?3),
             key_prefix = coalesce((SELECT key_prefix FROM license_keys
                                    WHERE license_id = ?1 AND status = 'active'
                                    ORDER BY id LIMIT 1), key_prefix)
         WHERE id = ?1 AND key_hash = (SELECT key_hash FROM license_keys WHERE id = ?2)",
        params![license_id, key_id, &keys::generate().hash.0[..]],
    )?;
    let license = keys_changed(&tx, license_id, now)?;
    let key = key_of(&tx, license_id, key_id)?;
    tx.commit()?;
    Ok((license, key))
}

/// Replaces one key of the license: the old one stops working, the new one is returned once.
pub fn rotate_key(
    conn: &mut Connection,
    license_id: i64,
    key_id: i64,
    now: i64,
) -> Result<(License, LicenseKey, String)> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let done = rotate_key_in(&tx, license_id, key_id, now)?;
    tx.commit()?;
    Ok(done)
}

fn rotate_key_in(
    tx: &Connection,
    license_id: i64,
    key_id: i64,
    now: i64,
) -> Result<(License, LicenseKey, String)> {
    let old = key_of(tx, license_id, key_id)?;
    license_keys::may_rotate(&old, now)?;
    let key = keys::generate();
    let old_hash: Vec<u8> = tx.query_row(
        "SELECT key_hash FROM license_keys WHERE id = ?1",
        [key_id],
        |r| r.get(0),
    )?;
    tx.execute(
        "UPDATE license_keys SET key_hash = ?2, key_prefix = ?3, updated_at = ?4 WHERE id = ?1",
        params![key_id, &key.hash.0[..], key.display_prefix, now],
    )?;
    // the license's own key (its first) is the one `licenses` shows
    tx.execute(
        "UPDATE licenses SET key_hash = ?2, key_prefix = ?3 WHERE id = ?1 AND key_hash = ?4",
        params![license_id, &key.hash.0[..], key.display_prefix, old_hash],
    )?;
    let license = keys_changed(tx, license_id, now)?;
    let rotated = key_of(tx, license_id, key_id)?;
    Ok((license, rotated, key.key))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sqlite::open_migrated;

    fn db() -> (tempfile::TempDir, Connection) {
        let dir = tempfile::tempdir().unwrap();
        let c = open_migrated(&dir.path().join("t.db")).unwrap();
        (dir, c)
    }

    fn new(name: &str, ms: i64) -> NewLicense {
        NewLicense {
            name: name.into(),
            plan: "free".into(),
            balance_ms: ms,
            ..Default::default()
        }
    }

    fn history_sum(c: &Connection, id: i64) -> i64 {
        c.query_row(
            "SELECT coalesce(sum(delta_ms), 0) FROM usage_history WHERE license_id = ?1",
            [id],
            |r| r.get(0),
        )
        .unwrap()
    }

    #[test]
    fn a_created_key_is_stored_only_as_its_hash_and_finds_its_license() {
        let (_d, mut c) = db();
        let (l, key) = create(&mut c, &new("Ada", 7_200_000), 1_000).unwrap();
        let stored: Vec<u8> = c
            .query_row("SELECT key_hash FROM licenses", [], |r| r.get(0))
            .unwrap();
        assert_eq!(stored, KeyHash::of(key.as_bytes()).0.to_vec());
        let dump: String = c
            .query_row(
                "SELECT group_concat(key_prefix || name) FROM licenses",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert!(!dump.contains(&key));
        let s = state_by_hash(&c, &KeyHash::of(key.as_bytes()), 0)
            .unwrap()
            .unwrap();
        assert_eq!((s.id, s.balance_ms), (l.id, 7_200_000));
        assert_eq!(l.balance_ms, 7_200_000);
        assert!(
            !format!("{l:?}").contains(&key),
            "the record never holds the key"
        );
    }

    #[test]
    fn every_balance_change_has_its_history_row() {
        let (_d, mut c) = db();
        let (l, _) = create(&mut c, &new("Ada", 3_600_000), 1_000).unwrap();
        adjust(
            &mut c,
            l.id,
            Adjustment::Credit,
            1_800_000,
            Some("gift"),
            2_000,
        )
        .unwrap();
        let after = adjust(&mut c, l.id, Adjustment::Debit, 600_000, None, 3_000).unwrap();
        assert_eq!(after.balance_ms, 4_800_000);
        assert_eq!(history_sum(&c, l.id), after.balance_ms);
        assert!(after.version > l.version);
        assert!(matches!(
            adjust(&mut c, 999, Adjustment::Credit, 1, None, 0),
            Err(StoreError::NotFound)
        ));
        assert!(matches!(
            adjust(&mut c, l.id, Adjustment::Credit, 0, None, 0),
            Err(StoreError::Invalid(_))
        ));
    }

    #[test]
    fn rotation_replaces_the_key_and_revocation_sticks() {
        let (_d, mut c) = db();
        let (l, old) = create(&mut c, &new("Ada", 0), 1_000).unwrap();
        let (_, new_key) = rotate(&mut c, l.id, 2_000).unwrap();
        assert!(state_by_hash(&c, &KeyHash::of(old.as_bytes()), 0)
            .unwrap()
            .is_none());
        assert!(state_by_hash(&c, &KeyHash::of(new_key.as_bytes()), 0)
            .unwrap()
            .is_some());
        let r = revoke(&mut c, l.id, 3_000).unwrap();
        assert_eq!(r.status, LicenseStatus::Revoked);
        assert_eq!(changed_since(&c, 3_000).unwrap().len(), 1);
        assert_eq!(changed_since(&c, 3_001).unwrap().len(), 0);
    }
}
