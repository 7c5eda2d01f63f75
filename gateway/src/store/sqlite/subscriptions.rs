//! Subscriptions on SQLite: the steps decided in `store/subscriptions.rs`, read and applied in
//! the event's `IMMEDIATE` transaction, which serializes them against every other write.

use super::licenses;
use super::Result;
use crate::store::subscriptions::{self, CheckoutRow, LicenseTerms, Rules, Step, Subscription};
use crate::store::{License, Subscribed, SubscriptionAction};
use rusqlite::{params, Connection, OptionalExtension, Row, Transaction, TransactionBehavior};

const COLUMNS: &str = "id, license_id, customer_id, plan, status, period_start, period_end, \
     cancel_at_period_end, grace_until, ends_at, event_at, created_at, updated_at";

fn from_row(r: &Row<'_>) -> rusqlite::Result<Subscription> {
    Ok(Subscription {
        id: r.get(0)?,
        license_id: r.get(1)?,
        customer_id: r.get(2)?,
        plan: r.get(3)?,
        status: r.get(4)?,
        period_start: r.get(5)?,
        period_end: r.get(6)?,
        cancel_at_period_end: r.get::<_, i64>(7)? != 0,
        grace_until: r.get(8)?,
        ends_at: r.get(9)?,
        event_at: r.get(10)?,
        created_at: r.get(11)?,
        updated_at: r.get(12)?,
    })
}

fn by_id(tx: &Connection, id: &str) -> Result<Option<Subscription>> {
    Ok(tx
        .prepare_cached(&format!(
            "SELECT {COLUMNS} FROM subscriptions WHERE id = ?1"
        ))?
        .query_row([id], from_row)
        .optional()?)
}

fn terms(tx: &Connection, license_id: i64) -> Result<Option<LicenseTerms>> {
    Ok(tx
        .prepare_cached(
            "SELECT plan, COALESCE(period_anchor, created_at) FROM licenses WHERE id = ?1",
        )?
        .query_row([license_id], |r| {
            Ok(LicenseTerms {
                plan: r.get(0)?,
                period_anchor: r.get(1)?,
            })
        })
        .optional()?)
}

/// Applies a subscription event in the event's transaction.
pub fn apply_in(tx: &Transaction<'_>, a: &SubscriptionAction, now: i64) -> Result<Subscribed> {
    let row = by_id(tx, &a.event.subscription_id)?;
    let license_id = row.as_ref().map(|r| r.license_id).or(a.event.license_id);
    let license = match license_id {
        Some(id) => terms(tx, id)?,
        None => None,
    };
    let rules = Rules {
        grace_ms: a.grace_ms,
        fallback: &a.fallback,
        calendar: &a.calendar,
    };
    let Some(step) = subscriptions::apply(&a.event, row.as_ref(), license.as_ref(), &rules, now)
    else {
        return Ok(Subscribed {
            label: "not_ours",
            license: None,
        });
    };
    write(tx, &step, now)
}

/// Writes a step: the subscription, its invoice, and the license when it changes.
fn write(tx: &Transaction<'_>, step: &Step, now: i64) -> Result<Subscribed> {
    let s = &step.row;
    tx.prepare_cached(&format!(
        "INSERT INTO subscriptions ({COLUMNS})
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)
         ON CONFLICT (id) DO UPDATE SET customer_id = excluded.customer_id,
             plan = excluded.plan, status = excluded.status,
             period_start = excluded.period_start, period_end = excluded.period_end,
             cancel_at_period_end = excluded.cancel_at_period_end,
             grace_until = excluded.grace_until, ends_at = excluded.ends_at,
             event_at = excluded.event_at, updated_at = excluded.updated_at"
    ))?
    .execute(params![
        s.id,
        s.license_id,
        s.customer_id,
        s.plan,
        s.status,
        s.period_start,
        s.period_end,
        i64::from(s.cancel_at_period_end),
        s.grace_until,
        s.ends_at,
        s.event_at,
        s.created_at,
        s.updated_at
    ])?;
    if let Some(i) = &step.invoice {
        tx.prepare_cached(
            "INSERT INTO subscription_invoices (id, subscription_id, license_id, payment_intent,
                 amount_cents, currency, period_start, period_end, paid_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) ON CONFLICT (id) DO NOTHING",
        )?
        .execute(params![
            i.invoice.id,
            i.subscription_id,
            i.license_id,
            i.invoice.payment_intent,
            i.invoice.amount_cents,
            i.invoice.currency,
            i.period.0,
            i.period.1,
            now
        ])?;
    }
    if let Some(session) = &step.close_checkout {
        tx.prepare_cached(
            "UPDATE subscription_checkouts SET expires_at = min(expires_at, ?2)
             WHERE session_id = ?1",
        )?
        .execute(params![session, now])?;
    }
    let license = if step.changes_license() {
        tx.prepare_cached(
            "UPDATE licenses SET plan = COALESCE(?2, plan),
                 period_anchor = COALESCE(?3, period_anchor), version = version + 1,
                 updated_at = ?4
             WHERE id = ?1",
        )?
        .execute(params![s.license_id, step.plan, step.anchor, now])?;
        Some(Box::new(licenses::get(tx, s.license_id)?))
    } else {
        None
    };
    Ok(Subscribed {
        label: step.label,
        license,
    })
}

/// Whether `intent` paid one of our subscriptions' invoices.
pub fn pays_an_invoice(tx: &Connection, intent: &str) -> Result<bool> {
    Ok(tx
        .prepare_cached("SELECT 1 FROM subscription_invoices WHERE payment_intent = ?1")?
        .query_row([intent], |_| Ok(()))
        .optional()?
        .is_some())
}

/// Records a subscription Checkout Session made for a license (the same again: nothing).
pub fn record_checkout(conn: &mut Connection, c: &CheckoutRow, now: i64) -> Result<()> {
    conn.prepare_cached(
        "INSERT INTO subscription_checkouts (session_id, license_id, plan, url, expires_at,
             created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT (session_id) DO NOTHING",
    )?
    .execute(params![
        c.session_id,
        c.license_id,
        c.plan,
        c.url,
        c.expires_at,
        now
    ])?;
    Ok(())
}

const CHECKOUT_COLUMNS: &str = "session_id, license_id, plan, url, expires_at";

fn checkout_from_row(r: &Row<'_>) -> rusqlite::Result<CheckoutRow> {
    Ok(CheckoutRow {
        session_id: r.get(0)?,
        license_id: r.get(1)?,
        plan: r.get(2)?,
        url: r.get(3)?,
        expires_at: r.get(4)?,
    })
}

/// A subscription Checkout Session made here.
pub fn checkout(conn: &Connection, session_id: &str) -> Result<Option<CheckoutRow>> {
    Ok(conn
        .prepare_cached(&format!(
            "SELECT {CHECKOUT_COLUMNS} FROM subscription_checkouts WHERE session_id = ?1"
        ))?
        .query_row([session_id], checkout_from_row)
        .optional()?)
}

/// The license's newest subscription Checkout Session still open at `now`.
pub fn open_checkout(conn: &Connection, license_id: i64, now: i64) -> Result<Option<CheckoutRow>> {
    Ok(conn
        .prepare_cached(&format!(
            "SELECT {CHECKOUT_COLUMNS} FROM subscription_checkouts
             WHERE license_id = ?1 AND expires_at > ?2 ORDER BY created_at DESC LIMIT 1"
        ))?
        .query_row(params![license_id, now], checkout_from_row)
        .optional()?)
}

/// A license's subscription: the newest still live, else the newest.
pub fn for_license(conn: &Connection, license_id: i64) -> Result<Option<Subscription>> {
    Ok(conn
        .prepare_cached(&format!(
            "SELECT {COLUMNS} FROM subscriptions WHERE license_id = ?1
             ORDER BY status != '{}' DESC, updated_at DESC, id LIMIT 1",
            subscriptions::ENDED
        ))?
        .query_row([license_id], from_row)
        .optional()?)
}

/// The subscriptions whose grace or paid period ran out by `?1` and that have not ended or
/// lapsed yet.
fn due() -> String {
    format!(
        "ends_at IS NOT NULL AND ends_at <= ?1 AND status NOT IN ('{}', '{}')",
        subscriptions::ENDED,
        subscriptions::LAPSED
    )
}

/// Whether any subscription is due to end (most sweeps find none: they take no write lock).
pub fn any_due(conn: &Connection, now: i64) -> Result<bool> {
    Ok(conn
        .prepare_cached(&format!(
            "SELECT 1 FROM subscriptions WHERE {} LIMIT 1",
            due()
        ))?
        .query_row([now], |_| Ok(()))
        .optional()?
        .is_some())
}

/// Ends every subscription whose grace or paid period ran out by `now` (its license back on
/// the fallback plan): the licenses that changed.
pub fn end_due(
    conn: &mut Connection,
    fallback: &str,
    calendar: &crate::periods::Calendar,
    now: i64,
) -> Result<Vec<License>> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let due: Vec<Subscription> = tx
        .prepare_cached(&format!(
            "SELECT {COLUMNS} FROM subscriptions WHERE {}",
            due()
        ))?
        .query_map([now], from_row)?
        .collect::<rusqlite::Result<_>>()?;
    // ending takes no grace (it is what ends)
    let rules = Rules {
        grace_ms: 0,
        fallback,
        calendar,
    };
    let mut changed = Vec::new();
    for sub in due {
        let Some(license) = terms(&tx, sub.license_id)? else {
            continue;
        };
        if let Some(step) = subscriptions::end_due(&sub, &license, &rules, now) {
            changed.extend(write(&tx, &step, now)?.license.map(|l| *l));
        }
    }
    tx.commit()?;
    Ok(changed)
}
