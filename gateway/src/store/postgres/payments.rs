//! Payments on PostgreSQL: the steps decided in `store/payments.rs`, read and applied here under
//! READ COMMITTED, where concurrent deliveries run on different connections at once. The two
//! serializations that module's race analysis asks for:
//!
//! - per session: the payment row is read `FOR UPDATE`; a second reader waits for the first
//!   transaction and then reads the row as it committed it (paid). Recording a session with no
//!   row inserts with `ON CONFLICT DO NOTHING`, which waits for a concurrent insert of the same
//!   session, and then reads the row back `FOR UPDATE`.
//! - per charge: `pg_advisory_xact_lock` keyed by the payment intent, taken by a refund before
//!   it reads and raises the running total, and by a fulfilment before it reads that total.
//!
//! Balances change in one statement with their history row (`licenses::change_balance`).

use deadpool_postgres::Transaction;
use tokio_postgres::Row;

use super::licenses::{change_balance, license};
use super::{backend, PgStore};
use crate::store::payments::{self, BalanceChange, FulfilStep, PaidRow, RefundStep, RefundedRow};
use crate::store::{
    EventAction, EventOutcome, Fulfilment, License, NewPayment, PaidSession, Payment, Refund,
    Refunded, Result, StoreError,
};

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

/// The session's payment row, locked to the end of the transaction.
async fn lock_session(tx: &Transaction<'_>, session_id: &str) -> Result<Option<Payment>> {
    let st = tx
        .prepare_cached(&format!(
            "SELECT {PAYMENT_COLUMNS} FROM payment_history WHERE stripe_session_id = $1
             FOR UPDATE"
        ))
        .await
        .map_err(backend)?;
    Ok(tx
        .query_opt(&st, &[&session_id])
        .await
        .map_err(backend)?
        .map(|r| payment_from_row(&r)))
}

async fn insert(tx: &Transaction<'_>, p: &NewPayment, now: i64) -> Result<()> {
    let st = tx
        .prepare_cached(
            "INSERT INTO payment_history (license_id, stripe_session_id, package_id, hours_ms,
                 amount_cents, currency, created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $7)
             ON CONFLICT (stripe_session_id) DO NOTHING",
        )
        .await
        .map_err(backend)?;
    tx.execute(
        &st,
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
    Ok(())
}

/// Stripe's running total refunded for a payment intent, if it has told us of any (read under
/// the intent's lock).
async fn refund_total(tx: &Transaction<'_>, intent: &str) -> Result<Option<i64>> {
    Ok(tx
        .query_opt(
            "SELECT amount_refunded_cents FROM stripe_refunds WHERE payment_intent = $1",
            &[&intent],
        )
        .await
        .map_err(backend)?
        .map(|r| r.get(0)))
}

async fn apply_balance(tx: &Transaction<'_>, c: &BalanceChange, now: i64) -> Result<License> {
    change_balance(tx, c.license_id, c.kind, c.delta_ms, Some(&c.reason), now).await
}

async fn fulfil_in(tx: &Transaction<'_>, paid: &PaidSession, now: i64) -> Result<Fulfilment> {
    let row = match lock_session(tx, &paid.session_id).await? {
        Some(row) => row,
        None => {
            let found = match paid.license_id {
                Some(id) => license(tx, id).await.is_ok(),
                None => false,
            };
            let Some(new) = payments::unrecorded(paid, found) else {
                return Ok(Fulfilment::NotOurs);
            };
            insert(tx, &new, now).await?;
            lock_session(tx, &paid.session_id)
                .await?
                .ok_or(StoreError::NotFound)?
        }
    };
    let refunded = match payments::refunds_to_read(paid, &row) {
        Some(intent) => {
            lock_intent(tx, intent).await?;
            refund_total(tx, intent).await?.unwrap_or(0)
        }
        None => 0,
    };
    let step = payments::fulfil(paid, &row, refunded, now);
    let credited_ms = step.credited_ms();
    let FulfilStep::Pay { row: set, credit } = step else {
        return Ok(Fulfilment::AlreadyPaid(Box::new(row)));
    };
    let PaidRow {
        payment_intent,
        paid_at,
        paid_cents,
        paid_currency,
        credited_ms: earned_ms,
        mismatch,
        refunded_cents,
        refunded_ms,
        status,
    } = set;
    tx.execute(
        "UPDATE payment_history SET status = $2, paid_at = $3, updated_at = $3,
             payment_intent = $4, paid_cents = $5, paid_currency = $6, credited_ms = $7,
             mismatch = $8, refunded_cents = $9, refunded_ms = $10
         WHERE id = $1",
        &[
            &row.id,
            &status,
            &paid_at,
            &payment_intent,
            &paid_cents,
            &paid_currency,
            &earned_ms,
            &mismatch,
            &refunded_cents,
            &refunded_ms,
        ],
    )
    .await
    .map_err(backend)?;
    let license = match &credit {
        Some(c) => apply_balance(tx, c, now).await?,
        None => license(tx, row.license_id).await?,
    };
    let payment = by_session(tx, &paid.session_id)
        .await?
        .ok_or(StoreError::NotFound)?;
    Ok(Fulfilment::Credited {
        license: Box::new(license),
        payment: Box::new(payment),
        credited_ms,
    })
}

async fn refund_in(tx: &Transaction<'_>, r: &Refund, now: i64) -> Result<Refunded> {
    lock_intent(tx, &r.payment_intent).await?;
    let total = payments::refund_total(refund_total(tx, &r.payment_intent).await?, r);
    tx.execute(
        "INSERT INTO stripe_refunds (payment_intent, amount_refunded_cents, received_at,
             updated_at) VALUES ($1, $2, $3, $3)
         ON CONFLICT (payment_intent) DO UPDATE SET
             amount_refunded_cents = excluded.amount_refunded_cents,
             updated_at = excluded.updated_at",
        &[&r.payment_intent, &total, &now],
    )
    .await
    .map_err(backend)?;
    let paid = tx
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
    let (row, debit) = match payments::refund(paid.as_ref(), total) {
        RefundStep::Held
            if super::subscriptions::pays_an_invoice(tx, &r.payment_intent).await? =>
        {
            return Ok(Refunded::OfSubscription)
        }
        RefundStep::Held => return Ok(Refunded::Held),
        RefundStep::Nothing => return Ok(Refunded::Nothing),
        RefundStep::Take { row, debit } => (row, debit),
    };
    let RefundedRow {
        payment_id,
        refunded_cents,
        refunded_ms,
        status,
    } = row;
    tx.execute(
        "UPDATE payment_history SET refunded_cents = $2, refunded_ms = $3, status = $4,
             updated_at = $5
         WHERE id = $1",
        &[&payment_id, &refunded_cents, &refunded_ms, &status, &now],
    )
    .await
    .map_err(backend)?;
    let Some(debit) = debit else {
        return Ok(Refunded::Nothing);
    };
    Ok(Refunded::Debited {
        license: Box::new(apply_balance(tx, &debit, now).await?),
        debited_ms: -debit.delta_ms,
    })
}

impl PgStore {
    /// Records the pending payment of a new Checkout Session; the same session again changes
    /// nothing.
    pub async fn record_pending(&self, p: NewPayment, now: i64) -> Result<Payment> {
        payments::check_pending(&p)?;
        self.run(async |c| {
            let tx = c.transaction().await.map_err(backend)?;
            license(&tx, p.license_id).await?;
            insert(&tx, &p, now).await?;
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
                EventAction::Subscription(a) => {
                    EventOutcome::Subscription(super::subscriptions::apply_in(&tx, a, now).await?)
                }
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

impl PgStore {
    /// A license's payments, newest first, with ids below `before` when given.
    pub async fn payments_for_license(
        &self,
        id: i64,
        limit: u32,
        before: Option<i64>,
    ) -> Result<Vec<Payment>> {
        let sql = format!(
            "SELECT {PAYMENT_COLUMNS} FROM payment_history
             WHERE license_id = $1 AND id < $2 ORDER BY id DESC LIMIT $3"
        );
        let (before, limit) = (before.unwrap_or(i64::MAX), i64::from(limit));
        Ok(self
            .rows(&sql, &[&id, &before, &limit])
            .await?
            .iter()
            .map(payment_from_row)
            .collect())
    }
}
