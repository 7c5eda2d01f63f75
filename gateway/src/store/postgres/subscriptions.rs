//! Subscriptions on PostgreSQL: the steps decided in `store/subscriptions.rs`, read and applied
//! in the event's transaction under READ COMMITTED. Events of one subscription are serialized by
//! `pg_advisory_xact_lock` on its id (its row may not exist yet), taken before the row is read;
//! the license's row is then read `FOR UPDATE`, in that order everywhere (the sweep too).

use deadpool_postgres::Transaction;
use tokio_postgres::Row;

use super::licenses::license;
use super::{backend, PgStore};
use crate::periods::Calendar;
use crate::store::subscriptions::{self, CheckoutRow, LicenseTerms, Rules, Step, Subscription};
use crate::store::{License, Result, Subscribed, SubscriptionAction};

const COLUMNS: &str = "id, license_id, customer_id, plan, status, period_start, period_end, \
     cancel_at_period_end, grace_until, ends_at, event_at, created_at, updated_at";

fn from_row(r: &Row) -> Subscription {
    Subscription {
        id: r.get(0),
        license_id: r.get(1),
        customer_id: r.get(2),
        plan: r.get(3),
        status: r.get(4),
        period_start: r.get(5),
        period_end: r.get(6),
        cancel_at_period_end: r.get::<_, i64>(7) != 0,
        grace_until: r.get(8),
        ends_at: r.get(9),
        event_at: r.get(10),
        created_at: r.get(11),
        updated_at: r.get(12),
    }
}

const CHECKOUT_COLUMNS: &str = "session_id, license_id, plan, url, expires_at";

fn checkout_from_row(r: &Row) -> CheckoutRow {
    CheckoutRow {
        session_id: r.get(0),
        license_id: r.get(1),
        plan: r.get(2),
        url: r.get(3),
        expires_at: r.get(4),
    }
}

/// The subscription's row, with every other event of it waiting until this transaction ends.
async fn lock(tx: &Transaction<'_>, id: &str) -> Result<Option<Subscription>> {
    tx.execute("SELECT pg_advisory_xact_lock(3, hashtext($1))", &[&id])
        .await
        .map_err(backend)?;
    let st = tx
        .prepare_cached(&format!(
            "SELECT {COLUMNS} FROM subscriptions WHERE id = $1"
        ))
        .await
        .map_err(backend)?;
    Ok(tx
        .query_opt(&st, &[&id])
        .await
        .map_err(backend)?
        .map(|r| from_row(&r)))
}

async fn terms(tx: &Transaction<'_>, license_id: i64) -> Result<Option<LicenseTerms>> {
    let st = tx
        .prepare_cached(
            "SELECT plan, COALESCE(period_anchor, created_at) FROM licenses WHERE id = $1
             FOR UPDATE",
        )
        .await
        .map_err(backend)?;
    Ok(tx
        .query_opt(&st, &[&license_id])
        .await
        .map_err(backend)?
        .map(|r| LicenseTerms {
            plan: r.get(0),
            period_anchor: r.get(1),
        }))
}

/// Applies a subscription event in the event's transaction.
pub(super) async fn apply_in(
    tx: &Transaction<'_>,
    a: &SubscriptionAction,
    now: i64,
) -> Result<Subscribed> {
    let row = lock(tx, &a.event.subscription_id).await?;
    let license_id = row.as_ref().map(|r| r.license_id).or(a.event.license_id);
    let license = match license_id {
        Some(id) => terms(tx, id).await?,
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
    write(tx, &step, now).await
}

async fn write(tx: &Transaction<'_>, step: &Step, now: i64) -> Result<Subscribed> {
    let s = &step.row;
    let st = tx
        .prepare_cached(&format!(
            "INSERT INTO subscriptions ({COLUMNS})
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
             ON CONFLICT (id) DO UPDATE SET customer_id = excluded.customer_id,
                 plan = excluded.plan, status = excluded.status,
                 period_start = excluded.period_start, period_end = excluded.period_end,
                 cancel_at_period_end = excluded.cancel_at_period_end,
                 grace_until = excluded.grace_until, ends_at = excluded.ends_at,
                 event_at = excluded.event_at, updated_at = excluded.updated_at"
        ))
        .await
        .map_err(backend)?;
    let cancel = i64::from(s.cancel_at_period_end);
    tx.execute(
        &st,
        &[
            &s.id,
            &s.license_id,
            &s.customer_id,
            &s.plan,
            &s.status,
            &s.period_start,
            &s.period_end,
            &cancel,
            &s.grace_until,
            &s.ends_at,
            &s.event_at,
            &s.created_at,
            &s.updated_at,
        ],
    )
    .await
    .map_err(backend)?;
    if let Some(i) = &step.invoice {
        tx.execute(
            "INSERT INTO subscription_invoices (id, subscription_id, license_id, payment_intent,
                 amount_cents, currency, period_start, period_end, paid_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT (id) DO NOTHING",
            &[
                &i.invoice.id,
                &i.subscription_id,
                &i.license_id,
                &i.invoice.payment_intent,
                &i.invoice.amount_cents,
                &i.invoice.currency,
                &i.period.0,
                &i.period.1,
                &now,
            ],
        )
        .await
        .map_err(backend)?;
    }
    if let Some(session) = &step.close_checkout {
        tx.execute(
            "UPDATE subscription_checkouts SET expires_at = least(expires_at, $2)
             WHERE session_id = $1",
            &[session, &now],
        )
        .await
        .map_err(backend)?;
    }
    let license = if step.changes_license() {
        tx.execute(
            "UPDATE licenses SET plan = COALESCE($2, plan),
                 period_anchor = COALESCE($3, period_anchor), version = version + 1,
                 updated_at = $4
             WHERE id = $1",
            &[&s.license_id, &step.plan, &step.anchor, &now],
        )
        .await
        .map_err(backend)?;
        Some(Box::new(license(tx, s.license_id).await?))
    } else {
        None
    };
    Ok(Subscribed {
        label: step.label,
        license,
    })
}

/// Whether `intent` paid one of our subscriptions' invoices.
pub(super) async fn pays_an_invoice(tx: &Transaction<'_>, intent: &str) -> Result<bool> {
    Ok(tx
        .query_opt(
            "SELECT 1 FROM subscription_invoices WHERE payment_intent = $1 LIMIT 1",
            &[&intent],
        )
        .await
        .map_err(backend)?
        .is_some())
}

impl PgStore {
    /// Records a subscription Checkout Session made for a license (the same again: nothing).
    pub async fn record_subscription_checkout(&self, c: CheckoutRow, now: i64) -> Result<()> {
        self.run(async |conn| {
            conn.execute(
                "INSERT INTO subscription_checkouts (session_id, license_id, plan, url,
                     expires_at, created_at)
                 VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (session_id) DO NOTHING",
                &[
                    &c.session_id,
                    &c.license_id,
                    &c.plan,
                    &c.url,
                    &c.expires_at,
                    &now,
                ],
            )
            .await
            .map_err(backend)?;
            Ok(())
        })
        .await
    }

    /// A subscription Checkout Session made here.
    pub async fn subscription_checkout(&self, session_id: String) -> Result<Option<CheckoutRow>> {
        let sql =
            format!("SELECT {CHECKOUT_COLUMNS} FROM subscription_checkouts WHERE session_id = $1");
        Ok(self
            .rows(&sql, &[&session_id])
            .await?
            .first()
            .map(checkout_from_row))
    }

    /// The license's newest subscription Checkout Session still open at `now`.
    pub async fn open_subscription_checkout(
        &self,
        license_id: i64,
        now: i64,
    ) -> Result<Option<CheckoutRow>> {
        let sql = format!(
            "SELECT {CHECKOUT_COLUMNS} FROM subscription_checkouts
             WHERE license_id = $1 AND expires_at > $2 ORDER BY created_at DESC LIMIT 1"
        );
        Ok(self
            .rows(&sql, &[&license_id, &now])
            .await?
            .first()
            .map(checkout_from_row))
    }

    /// A license's subscription: the newest still live, else the newest.
    pub async fn subscription(&self, license_id: i64) -> Result<Option<Subscription>> {
        let sql = format!(
            "SELECT {COLUMNS} FROM subscriptions WHERE license_id = $1
             ORDER BY status <> '{}' DESC, updated_at DESC, id LIMIT 1",
            subscriptions::ENDED
        );
        Ok(self.rows(&sql, &[&license_id]).await?.first().map(from_row))
    }

    /// Ends every subscription whose grace or paid period ran out by `now`, each in its own
    /// transaction under its lock (a node ending it at the same time waits, then finds it
    /// ended): the licenses that changed.
    pub async fn end_due_subscriptions(
        &self,
        fallback: String,
        calendar: Calendar,
        now: i64,
    ) -> Result<Vec<License>> {
        let sql = format!(
            "SELECT id FROM subscriptions
             WHERE ends_at IS NOT NULL AND ends_at <= $1 AND status NOT IN ('{}', '{}')",
            subscriptions::ENDED,
            subscriptions::LAPSED
        );
        let due: Vec<String> = self
            .rows(&sql, &[&now])
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let rules = Rules {
            grace_ms: 0,
            fallback: &fallback,
            calendar: &calendar,
        };
        let mut changed = Vec::new();
        for id in due {
            let ended = self
                .run(async |c| {
                    let tx = c.transaction().await.map_err(backend)?;
                    let Some(sub) = lock(&tx, &id).await? else {
                        return Ok(None);
                    };
                    let Some(license) = terms(&tx, sub.license_id).await? else {
                        return Ok(None);
                    };
                    let Some(step) = subscriptions::end_due(&sub, &license, &rules, now) else {
                        return Ok(None);
                    };
                    let done = write(&tx, &step, now).await?;
                    tx.commit().await.map_err(backend)?;
                    Ok(done.license)
                })
                .await?;
            changed.extend(ended.map(|l| *l));
        }
        Ok(changed)
    }
}
