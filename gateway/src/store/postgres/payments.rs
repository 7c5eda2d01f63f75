//! Payments on PostgreSQL: the same rules as store/sqlite/payments.rs (pending rows, fulfilment
//! exactly once, refunds by running total, the event log), under PostgreSQL's default READ
//! COMMITTED isolation, where concurrent deliveries run on different connections at once:
//!
//! - Fulfilment claims the row with `UPDATE … WHERE status = 'pending' RETURNING`. A second
//!   claimer waits on the row lock, then re-checks its `WHERE` against the committed row, finds
//!   it paid and claims nothing.
//! - An event id is inserted with `ON CONFLICT DO NOTHING`. A second delivery of the same id
//!   waits for the first transaction: if that commits, it inserts nothing (a duplicate); if it
//!   rolls back, the second is processed as new.
//! - A refund and a fulfilment of the same charge take one advisory lock, keyed by its payment
//!   intent, before they read what the other writes (the running total refunded, the paid
//!   row): a refund delivered while the completion commits is either seen by the fulfilment
//!   (which credits only the unrefunded share) or sees the paid row (and debits its share), and
//!   two refunds of one charge cannot both debit the same share. A row lock would not do: the
//!   refund looks the payment up by an intent the uncommitted claim is only now writing.
//! - Balances change in one statement (`balance_ms = balance_ms + $2 … RETURNING`); the
//!   history row's balance before comes from that same statement.

use deadpool_postgres::Transaction;
use tokio_postgres::Row;

use super::{backend, PgStore};
use crate::keys::KeyHash;
use crate::license::LicenseStatus;
use crate::store::money::{paid_share, refund_step, refunded_share, RefundStep};
use crate::store::{
    EventAction, EventOutcome, Fulfilment, License, NewPayment, PaidSession, Payment, Refund,
    Refunded, Result, StoreError,
};

pub(crate) const LICENSE_COLUMNS: &str =
    "id, key_hash, key_prefix, name, email, company, plan, status, balance_ms, used_ms, \
     requests_total, version, expires_at, created_at, updated_at, last_used_at";

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
    }
}

pub(crate) const PAYMENT_COLUMNS: &str =
    "id, license_id, stripe_session_id, payment_intent, package_id, hours_ms, \
     amount_cents, currency, status, refunded_cents, refunded_ms, created_at, paid_at, \
     paid_cents, paid_currency, credited_ms, mismatch";

pub(crate) fn payment_from_row(r: &Row) -> Payment {
    Payment {
        id: r.get(0),
        license_id: r.get(1),
        session_id: r.get(2),
        payment_intent: r.get(3),
        package_id: r.get(4),
        hours_ms: r.get(5),
        amount_cents: r.get(6),
        currency: r.get(7),
        status: r.get(8),
        refunded_cents: r.get(9),
        refunded_ms: r.get(10),
        created_at: r.get(11),
        paid_at: r.get(12),
        paid_cents: r.get(13),
        paid_currency: r.get(14),
        credited_ms: r.get(15),
        mismatch: r.get(16),
    }
}

async fn license(tx: &Transaction<'_>, id: i64) -> Result<License> {
    let st = tx
        .prepare_cached(&format!(
            "SELECT {LICENSE_COLUMNS} FROM licenses WHERE id = $1"
        ))
        .await
        .map_err(backend)?;
    tx.query_opt(&st, &[&id])
        .await
        .map_err(backend)?
        .map(|r| license_from_row(&r))
        .ok_or(StoreError::NotFound)
}

/// Several nodes: a balance taken below what the nodes hold on lease (a debit, a refund) takes
/// their leases down with it, each in proportion, so together they can spend no more than is
/// left. The license is locked already (its row was just updated); the nodes learn their new
/// leases with the change's notice (`ClusterStore::held`).
async fn shrink_leases(tx: &Transaction<'_>, id: i64) -> Result<()> {
    let st = tx
        .prepare_cached(
            "WITH lic AS (SELECT greatest(balance_ms, 0) AS left_ms, reserved_ms
                          FROM licenses WHERE id = $1 AND reserved_ms > greatest(balance_ms, 0)),
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

async fn by_session(tx: &Transaction<'_>, session_id: &str) -> Result<Option<Payment>> {
    let st = tx
        .prepare_cached(&format!(
            "SELECT {PAYMENT_COLUMNS} FROM payment_history WHERE stripe_session_id = $1"
        ))
        .await
        .map_err(backend)?;
    Ok(tx
        .query_opt(&st, &[&session_id])
        .await
        .map_err(backend)?
        .map(|r| payment_from_row(&r)))
}

/// Serializes the fulfilment and the refunds of one charge (see the module's notes).
async fn lock_intent(tx: &Transaction<'_>, intent: &str) -> Result<()> {
    tx.execute("SELECT pg_advisory_xact_lock(2, hashtext($1))", &[&intent])
        .await
        .map_err(backend)?;
    Ok(())
}

async fn fulfil_in(tx: &Transaction<'_>, paid: &PaidSession, now: i64) -> Result<Fulfilment> {
    if by_session(tx, &paid.session_id).await?.is_none() {
        // a session Stripe knows and we have no row for: recorded from its signed metadata at
        // the configured price (a concurrent delivery recording it too inserts nothing)
        let (Some(license_id), Some(hours_ms)) = (paid.license_id, paid.hours_ms) else {
            return Ok(Fulfilment::NotOurs);
        };
        if hours_ms <= 0 || license(tx, license_id).await.is_err() {
            return Ok(Fulfilment::NotOurs);
        }
        let Some((priced_cents, priced_currency)) = paid.priced.clone() else {
            return Ok(Fulfilment::NotOurs);
        };
        tx.execute(
            "INSERT INTO payment_history (license_id, stripe_session_id, package_id, hours_ms,
                 amount_cents, currency, created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $7)
             ON CONFLICT (stripe_session_id) DO NOTHING",
            &[
                &license_id,
                &paid.session_id,
                &paid.package_id,
                &hours_ms,
                &priced_cents,
                &priced_currency,
                &now,
            ],
        )
        .await
        .map_err(backend)?;
    }
    let claim = tx
        .prepare_cached(
            "UPDATE payment_history SET status = 'paid', paid_at = $2, updated_at = $2,
                 payment_intent = coalesce($3, payment_intent)
             WHERE stripe_session_id = $1 AND status = 'pending'
             RETURNING license_id, hours_ms, amount_cents, currency, payment_intent",
        )
        .await
        .map_err(backend)?;
    let claimed = tx
        .query_opt(&claim, &[&paid.session_id, &now, &paid.payment_intent])
        .await
        .map_err(backend)?;
    let Some(row) = claimed else {
        let payment = by_session(tx, &paid.session_id)
            .await?
            .ok_or(StoreError::NotFound)?;
        return Ok(Fulfilment::AlreadyPaid(Box::new(payment)));
    };
    let (license_id, hours_ms, priced_cents): (i64, i64, i64) =
        (row.get(0), row.get(1), row.get(2));
    let (priced_currency, intent): (String, Option<String>) = (row.get(3), row.get(4));
    let (credited_ms, mismatch) = paid_share(
        hours_ms,
        priced_cents,
        &priced_currency,
        paid.amount_cents,
        &paid.currency,
    );
    // a refund Stripe delivered before this completion takes its share at once
    let refunded: i64 = match &intent {
        None => 0,
        Some(i) => {
            lock_intent(tx, i).await?;
            tx.query_opt(
                "SELECT amount_refunded_cents FROM stripe_refunds WHERE payment_intent = $1",
                &[i],
            )
            .await
            .map_err(backend)?
            .map_or(0, |r| r.get(0))
        }
    };
    let refunded_cents = refunded.clamp(0, paid.amount_cents);
    let refunded_ms = refunded_share(credited_ms, paid.amount_cents, refunded_cents);
    tx.execute(
        "UPDATE payment_history SET paid_cents = $2::bigint, paid_currency = $3,
             credited_ms = $4, mismatch = $5, refunded_cents = $6::bigint, refunded_ms = $7,
             status = CASE WHEN $6::bigint = 0 THEN 'paid'
                           WHEN $6::bigint >= $2::bigint THEN 'refunded'
                           ELSE 'partially_refunded' END
         WHERE stripe_session_id = $1",
        &[
            &paid.session_id,
            &paid.amount_cents,
            &paid.currency,
            &credited_ms,
            &mismatch,
            &refunded_cents,
            &refunded_ms,
        ],
    )
    .await
    .map_err(backend)?;
    let net_ms = credited_ms - refunded_ms;
    let license = if net_ms > 0 {
        let reason = if refunded_ms > 0 {
            format!("stripe {} (less its refunded share)", paid.session_id)
        } else {
            format!("stripe {}", paid.session_id)
        };
        change_balance(tx, license_id, "purchase", net_ms, Some(&reason), now).await?
    } else {
        license(tx, license_id).await?
    };
    let payment = by_session(tx, &paid.session_id)
        .await?
        .ok_or(StoreError::NotFound)?;
    Ok(Fulfilment::Credited {
        license: Box::new(license),
        payment: Box::new(payment),
        credited_ms: net_ms.max(0),
    })
}

async fn refund_in(tx: &Transaction<'_>, r: &Refund, now: i64) -> Result<Refunded> {
    lock_intent(tx, &r.payment_intent).await?;
    let total: i64 = tx
        .query_one(
            "INSERT INTO stripe_refunds (payment_intent, amount_refunded_cents, received_at,
                 updated_at) VALUES ($1, $2, $3, $3)
             ON CONFLICT (payment_intent) DO UPDATE SET
                 amount_refunded_cents = greatest(stripe_refunds.amount_refunded_cents,
                                                  excluded.amount_refunded_cents),
                 updated_at = excluded.updated_at
             RETURNING amount_refunded_cents",
            &[&r.payment_intent, &r.amount_refunded_cents.max(0), &now],
        )
        .await
        .map_err(backend)?
        .get(0);
    let payment = tx
        .query_opt(
            &format!(
                "SELECT {PAYMENT_COLUMNS} FROM payment_history
                 WHERE payment_intent = $1
                   AND status IN ('paid', 'partially_refunded', 'refunded')"
            ),
            &[&r.payment_intent],
        )
        .await
        .map_err(backend)?
        .map(|row| payment_from_row(&row));
    let Some(p) = payment else {
        return Ok(Refunded::Held);
    };
    let Some(step) = refund_step(&p, total) else {
        return Ok(Refunded::Nothing);
    };
    let RefundStep {
        refunded_cents,
        refunded_ms: target_ms,
        debit_ms,
        status,
    } = step;
    tx.execute(
        "UPDATE payment_history SET refunded_cents = $2, refunded_ms = $3, status = $4,
             updated_at = $5
         WHERE id = $1",
        &[&p.id, &refunded_cents, &target_ms, &status, &now],
    )
    .await
    .map_err(backend)?;
    if debit_ms <= 0 {
        return Ok(Refunded::Nothing);
    }
    let reason = format!("stripe refund {}", p.session_id);
    let license = change_balance(tx, p.license_id, "refund", -debit_ms, Some(&reason), now).await?;
    Ok(Refunded::Debited {
        license: Box::new(license),
        debited_ms: debit_ms,
    })
}

impl PgStore {
    /// Records the pending payment of a new Checkout Session; the same session again changes
    /// nothing.
    pub async fn record_pending(&self, p: NewPayment, now: i64) -> Result<Payment> {
        if p.hours_ms <= 0 || p.amount_cents < 0 {
            return Err(StoreError::Invalid(
                "a payment needs positive hours and a non-negative amount".into(),
            ));
        }
        self.run(async |c| {
            let tx = c.transaction().await.map_err(backend)?;
            license(&tx, p.license_id).await?;
            tx.execute(
                "INSERT INTO payment_history (license_id, stripe_session_id, package_id, hours_ms,
                 amount_cents, currency, created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $7)
             ON CONFLICT (stripe_session_id) DO NOTHING",
                &[
                    &p.license_id,
                    &p.session_id,
                    &p.package_id,
                    &p.hours_ms,
                    &p.amount_cents,
                    &p.currency,
                    &now,
                ],
            )
            .await
            .map_err(backend)?;
            let payment = by_session(&tx, &p.session_id)
                .await?
                .ok_or(StoreError::NotFound)?;
            tx.commit().await.map_err(backend)?;
            Ok(payment)
        })
        .await
    }

    pub async fn payment_by_session(&self, session_id: String) -> Result<Option<Payment>> {
        self.run(async |c| {
            let tx = c.transaction().await.map_err(backend)?;
            let p = by_session(&tx, &session_id).await?;
            tx.commit().await.map_err(backend)?;
            Ok(p)
        })
        .await
    }

    /// Credits a paid session's hours once, however often and however concurrently it is
    /// called (the webhook, its redeliveries and the success page).
    pub async fn fulfil(&self, paid: PaidSession, now: i64) -> Result<Fulfilment> {
        self.run(async |c| {
            let tx = c.transaction().await.map_err(backend)?;
            let done = fulfil_in(&tx, &paid, now).await?;
            tx.commit().await.map_err(backend)?;
            Ok(done)
        })
        .await
    }

    /// Records one Stripe event and applies it, in one transaction: a redelivered event does
    /// nothing, and a failed one leaves no trace, so its redelivery is processed as new.
    pub async fn apply_event(
        &self,
        event_id: String,
        event_type: String,
        action: EventAction,
        now: i64,
    ) -> Result<EventOutcome> {
        self.run(async |c| {
            let tx = c.transaction().await.map_err(backend)?;
            let fresh = tx
            .execute(
                "INSERT INTO stripe_events (id, type, result, received_at) VALUES ($1, $2, '', $3)
                 ON CONFLICT (id) DO NOTHING",
                &[&event_id, &event_type, &now],
            )
            .await
            .map_err(backend)?;
            if fresh == 0 {
                return Ok(EventOutcome::Duplicate);
            }
            let outcome = match &action {
                EventAction::Fulfil(paid) => {
                    EventOutcome::Fulfilled(fulfil_in(&tx, paid, now).await?)
                }
                EventAction::Refund(r) => EventOutcome::Refunded(refund_in(&tx, r, now).await?),
                EventAction::Ignore(why) => EventOutcome::Ignored(why),
            };
            tx.execute(
                "UPDATE stripe_events SET result = $2 WHERE id = $1",
                &[&event_id, &outcome.label()],
            )
            .await
            .map_err(backend)?;
            tx.commit().await.map_err(backend)?;
            Ok(outcome)
        })
        .await
    }
}
