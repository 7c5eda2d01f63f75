//! Payments: a pending row per Stripe Checkout Session, exactly-once fulfilment, refunds, and the
//! Stripe event log that makes redelivered events harmless.
//!
//! Every function here that moves money runs in one `IMMEDIATE` transaction with its history
//! row. Fulfilment is keyed on the session id and guarded by `WHERE status = 'pending'`, so the
//! webhook, its redeliveries and the success page may all race: the first to commit credits, the
//! others find nothing pending.

use super::licenses;
use super::{Result, StoreError};
use crate::store::money::{paid_share, refund_step, refunded_share, RefundStep};
use crate::store::{
    EventAction, EventOutcome, Fulfilment, NewPayment, PaidSession, Payment, Refund, Refunded,
};
use rusqlite::{params, Connection, OptionalExtension, Row, Transaction, TransactionBehavior};

const COLUMNS: &str = "id, license_id, stripe_session_id, payment_intent, package_id, hours_ms, \
     amount_cents, currency, status, refunded_cents, refunded_ms, created_at, paid_at, \
     paid_cents, paid_currency, credited_ms, mismatch";

fn from_row(r: &Row<'_>) -> rusqlite::Result<Payment> {
    Ok(Payment {
        id: r.get(0)?,
        license_id: r.get(1)?,
        session_id: r.get(2)?,
        payment_intent: r.get(3)?,
        package_id: r.get(4)?,
        hours_ms: r.get(5)?,
        amount_cents: r.get(6)?,
        currency: r.get(7)?,
        status: r.get(8)?,
        refunded_cents: r.get(9)?,
        refunded_ms: r.get(10)?,
        created_at: r.get(11)?,
        paid_at: r.get(12)?,
        paid_cents: r.get(13)?,
        paid_currency: r.get(14)?,
        credited_ms: r.get(15)?,
        mismatch: r.get(16)?,
    })
}

/// Records the pending payment for a new checkout session. Recording the same session again (an
/// idempotent replay of the create call) changes nothing.
pub fn record_pending(conn: &mut Connection, p: &NewPayment, now: i64) -> Result<Payment> {
    if p.hours_ms <= 0 || p.amount_cents < 0 {
        return Err(StoreError::Invalid(
            "a payment needs positive hours and a non-negative amount".into(),
        ));
    }
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    licenses::get(&tx, p.license_id)?;
    tx.execute(
        "INSERT INTO payment_history (license_id, stripe_session_id, package_id, hours_ms,
             amount_cents, currency, created_at, updated_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?7)
         ON CONFLICT (stripe_session_id) DO NOTHING",
        params![
            p.license_id,
            p.session_id,
            p.package_id,
            p.hours_ms,
            p.amount_cents,
            p.currency,
            now
        ],
    )?;
    let payment = by_session(&tx, &p.session_id)?.ok_or(StoreError::NotFound)?;
    tx.commit()?;
    Ok(payment)
}

pub fn by_session(conn: &Connection, session_id: &str) -> Result<Option<Payment>> {
    Ok(conn
        .prepare_cached(&format!(
            "SELECT {COLUMNS} FROM payment_history WHERE stripe_session_id = ?1"
        ))?
        .query_row([session_id], from_row)
        .optional()?)
}

/// A license's payments, newest first, with ids below `before` when given.
pub fn list_for_license(
    conn: &Connection,
    license_id: i64,
    limit: u32,
    before: Option<i64>,
) -> Result<Vec<Payment>> {
    let mut st = conn.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM payment_history
         WHERE license_id = ?1 AND id < ?2 ORDER BY id DESC LIMIT ?3"
    ))?;
    let rows = st.query_map(
        params![license_id, before.unwrap_or(i64::MAX), limit],
        from_row,
    )?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// Credits a paid session's hours and marks its payment paid, in one transaction; exactly once
/// however often and however concurrently it is called for the same session.
pub fn fulfil(conn: &mut Connection, paid: &PaidSession, now: i64) -> Result<Fulfilment> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let done = fulfil_in(&tx, paid, now)?;
    tx.commit()?;
    Ok(done)
}

/// Stripe's running total refunded for a payment intent, as far as it has told us.
fn refunded_so_far(tx: &Transaction<'_>, payment_intent: Option<&str>) -> Result<i64> {
    let Some(intent) = payment_intent else {
        return Ok(0);
    };
    Ok(tx
        .prepare_cached(
            "SELECT amount_refunded_cents FROM stripe_refunds WHERE payment_intent = ?1",
        )?
        .query_row([intent], |r| r.get(0))
        .optional()?
        .unwrap_or(0))
}

fn fulfil_in(tx: &Transaction<'_>, paid: &PaidSession, now: i64) -> Result<Fulfilment> {
    if by_session(tx, &paid.session_id)?.is_none() {
        // Stripe knows a session we have no row for (we crashed between creating it and
        // recording it): record it from its metadata, which we wrote and Stripe signed, at the
        // configured price of its hours.
        let (Some(license_id), Some(hours_ms)) = (paid.license_id, paid.hours_ms) else {
            return Ok(Fulfilment::NotOurs);
        };
        if hours_ms <= 0 || licenses::get(tx, license_id).is_err() {
            return Ok(Fulfilment::NotOurs);
        }
        let Some((priced_cents, priced_currency)) = paid.priced.clone() else {
            return Ok(Fulfilment::NotOurs);
        };
        tx.execute(
            "INSERT INTO payment_history (license_id, stripe_session_id, package_id, hours_ms,
                 amount_cents, currency, created_at, updated_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?7)",
            params![
                license_id,
                paid.session_id,
                paid.package_id,
                hours_ms,
                priced_cents,
                priced_currency,
                now
            ],
        )?;
    }
    let claimed: Option<(i64, i64, i64, String, Option<String>)> = tx
        .prepare_cached(
            "UPDATE payment_history SET status = 'paid', paid_at = ?2, updated_at = ?2,
                 payment_intent = coalesce(?3, payment_intent)
             WHERE stripe_session_id = ?1 AND status = 'pending'
             RETURNING license_id, hours_ms, amount_cents, currency, payment_intent",
        )?
        .query_row(params![paid.session_id, now, paid.payment_intent], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
        })
        .optional()?;
    let Some((license_id, hours_ms, priced_cents, priced_currency, intent)) = claimed else {
        let payment = by_session(tx, &paid.session_id)?.ok_or(StoreError::NotFound)?;
        return Ok(Fulfilment::AlreadyPaid(Box::new(payment)));
    };
    let (credited_ms, mismatch) = paid_share(
        hours_ms,
        priced_cents,
        &priced_currency,
        paid.amount_cents,
        &paid.currency,
    );
    // a refund Stripe delivered before this completion takes its share right away (the
    // intent as the row now has it: the event's, or one recorded before)
    let refunded_cents = refunded_so_far(tx, intent.as_deref())?.clamp(0, paid.amount_cents);
    let refunded_ms = refunded_share(credited_ms, paid.amount_cents, refunded_cents);
    tx.execute(
        "UPDATE payment_history SET paid_cents = ?2, paid_currency = ?3, credited_ms = ?4,
             mismatch = ?5, refunded_cents = ?6, refunded_ms = ?7,
             status = CASE WHEN ?6 = 0 THEN 'paid'
                           WHEN ?6 >= ?2 THEN 'refunded' ELSE 'partially_refunded' END
         WHERE stripe_session_id = ?1",
        params![
            paid.session_id,
            paid.amount_cents,
            paid.currency,
            credited_ms,
            mismatch,
            refunded_cents,
            refunded_ms
        ],
    )?;
    let net_ms = credited_ms - refunded_ms;
    let license = if net_ms > 0 {
        let reason = if refunded_ms > 0 {
            format!("stripe {} (less its refunded share)", paid.session_id)
        } else {
            format!("stripe {}", paid.session_id)
        };
        licenses::change_balance(tx, license_id, "purchase", net_ms, Some(&reason), now)?
    } else {
        licenses::get(tx, license_id)?
    };
    let payment = by_session(tx, &paid.session_id)?.ok_or(StoreError::NotFound)?;
    Ok(Fulfilment::Credited {
        license: Box::new(license),
        payment: Box::new(payment),
        credited_ms: net_ms.max(0),
    })
}

/// Debits the refunded share of a payment's hours. Stripe reports the running total refunded,
/// so the debit is the share of the largest total seen minus what earlier refunds already took:
/// replays and partial refunds in any order, before or after the payment's completion, never
/// take back more than was bought.
pub fn refund(conn: &mut Connection, r: &Refund, now: i64) -> Result<Refunded> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let done = refund_in(&tx, r, now)?;
    tx.commit()?;
    Ok(done)
}

fn refund_in(tx: &Transaction<'_>, r: &Refund, now: i64) -> Result<Refunded> {
    let total: i64 = tx
        .prepare_cached(
            "INSERT INTO stripe_refunds (payment_intent, amount_refunded_cents, received_at,
                 updated_at) VALUES (?1, ?2, ?3, ?3)
             ON CONFLICT (payment_intent) DO UPDATE SET
                 amount_refunded_cents = max(amount_refunded_cents, excluded.amount_refunded_cents),
                 updated_at = excluded.updated_at
             RETURNING amount_refunded_cents",
        )?
        .query_row(
            params![r.payment_intent, r.amount_refunded_cents.max(0), now],
            |row| row.get(0),
        )?;
    let payment = tx
        .prepare_cached(&format!(
            "SELECT {COLUMNS} FROM payment_history
             WHERE payment_intent = ?1 AND status IN ('paid', 'partially_refunded', 'refunded')"
        ))?
        .query_row([&r.payment_intent], from_row)
        .optional()?;
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
        "UPDATE payment_history SET refunded_cents = ?2, refunded_ms = ?3, status = ?4,
             updated_at = ?5
         WHERE id = ?1",
        params![p.id, refunded_cents, target_ms, status, now],
    )?;
    if debit_ms <= 0 {
        return Ok(Refunded::Nothing);
    }
    let reason = format!("stripe refund {}", p.session_id);
    let license =
        licenses::change_balance(tx, p.license_id, "refund", -debit_ms, Some(&reason), now)?;
    Ok(Refunded::Debited {
        license: Box::new(license),
        debited_ms: debit_ms,
    })
}

/// Processes one Stripe event: records its id and applies its action in one transaction. A
/// redelivered event (same id) does nothing; a crash before the commit leaves no trace, so the
/// redelivery that follows it is processed as new.
pub fn apply_event(
    conn: &mut Connection,
    event_id: &str,
    event_type: &str,
    action: &EventAction,
    now: i64,
) -> Result<EventOutcome> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let fresh = tx.execute(
        "INSERT INTO stripe_events (id, type, result, received_at) VALUES (?1, ?2, '', ?3)
         ON CONFLICT (id) DO NOTHING",
        params![event_id, event_type, now],
    )?;
    if fresh == 0 {
        return Ok(EventOutcome::Duplicate);
    }
    let outcome = match action {
        EventAction::Fulfil(paid) => EventOutcome::Fulfilled(fulfil_in(&tx, paid, now)?),
        EventAction::Refund(r) => EventOutcome::Refunded(refund_in(&tx, r, now)?),
        EventAction::Ignore(why) => EventOutcome::Ignored(why),
    };
    tx.execute(
        "UPDATE stripe_events SET result = ?2 WHERE id = ?1",
        params![event_id, outcome.label()],
    )?;
    tx.commit()?;
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sqlite::open_migrated;
    use crate::store::NewLicense;

    fn setup() -> (tempfile::TempDir, Connection, i64) {
        let dir = tempfile::tempdir().unwrap();
        let mut c = open_migrated(&dir.path().join("t.db")).unwrap();
        let (l, _) = licenses::create(
            &mut c,
            &NewLicense {
                name: "Ada".into(),
                plan: "free".into(),
                ..Default::default()
            },
            1,
        )
        .unwrap();
        (dir, c, l.id)
    }

    fn pending(c: &mut Connection, license_id: i64, session: &str) -> Payment {
        record_pending(
            c,
            &NewPayment {
                license_id,
                session_id: session.into(),
                package_id: Some("small".into()),
                hours_ms: 5 * 3_600_000,
                amount_cents: 2_500,
                currency: "usd".into(),
            },
            10,
        )
        .unwrap()
    }

    fn paid(session: &str) -> PaidSession {
        PaidSession {
            session_id: session.into(),
            payment_intent: Some("pi_1".into()),
            license_id: None,
            hours_ms: None,
            package_id: None,
            amount_cents: 2_500,
            currency: "usd".into(),
            priced: None,
        }
    }

    fn balance_and_history(c: &Connection, id: i64) -> (i64, i64) {
        c.query_row(
            "SELECT balance_ms, (SELECT sum(delta_ms) FROM usage_history WHERE license_id = ?1)
             FROM licenses WHERE id = ?1",
            [id],
            |r| Ok((r.get(0)?, r.get::<_, Option<i64>>(1)?.unwrap_or(0))),
        )
        .unwrap()
    }

    #[test]
    fn fulfilment_credits_once_and_replays_change_nothing() {
        let (_d, mut c, id) = setup();
        pending(&mut c, id, "cs_1");
        assert_eq!(pending(&mut c, id, "cs_1").status, "pending");
        assert!(matches!(
            fulfil(&mut c, &paid("cs_1"), 20).unwrap(),
            Fulfilment::Credited { .. }
        ));
        for _ in 0..3 {
            assert!(matches!(
                fulfil(&mut c, &paid("cs_1"), 30).unwrap(),
                Fulfilment::AlreadyPaid(_)
            ));
        }
        assert_eq!(balance_and_history(&c, id), (18_000_000, 18_000_000));
        let p = by_session(&c, "cs_1").unwrap().unwrap();
        assert_eq!(
            (p.status.as_str(), p.paid_at, p.payment_intent.as_deref()),
            ("paid", Some(20), Some("pi_1"))
        );
    }

    #[test]
    fn a_session_without_a_row_is_recorded_from_its_metadata_or_left_alone() {
        let (_d, mut c, id) = setup();
        let mut p = paid("cs_lost");
        assert!(matches!(
            fulfil(&mut c, &p, 20).unwrap(),
            Fulfilment::NotOurs
        ));
        p.license_id = Some(id + 1);
        p.hours_ms = Some(3_600_000);
        assert!(matches!(
            fulfil(&mut c, &p, 20).unwrap(),
            Fulfilment::NotOurs
        ));
        assert_eq!(balance_and_history(&c, id), (0, 0));
        p.license_id = Some(id);
        p.hours_ms = Some(3_600_000);
        p.priced = Some((2_500, "usd".into()));
        assert!(matches!(
            fulfil(&mut c, &p, 20).unwrap(),
            Fulfilment::Credited { .. }
        ));
        assert_eq!(balance_and_history(&c, id), (3_600_000, 3_600_000));
    }

    #[test]
    fn refunds_debit_the_refunded_share_once() {
        let (_d, mut c, id) = setup();
        pending(&mut c, id, "cs_1");
        fulfil(&mut c, &paid("cs_1"), 20).unwrap();
        let r = |cents| Refund {
            payment_intent: "pi_1".into(),
            amount_refunded_cents: cents,
        };
        // 1,000 of 2,500 cents: 2 of the 5 hours
        assert!(matches!(
            refund(&mut c, &r(1_000), 30).unwrap(),
            Refunded::Debited {
                debited_ms: 7_200_000,
                ..
            }
        ));
        assert!(matches!(
            refund(&mut c, &r(1_000), 31).unwrap(),
            Refunded::Nothing
        ));
        // the rest: exactly the remaining 3 hours, never more
        assert!(matches!(
            refund(&mut c, &r(9_999), 40).unwrap(),
            Refunded::Debited {
                debited_ms: 10_800_000,
                ..
            }
        ));
        assert_eq!(balance_and_history(&c, id), (0, 0));
        assert_eq!(by_session(&c, "cs_1").unwrap().unwrap().status, "refunded");
        assert!(matches!(
            refund(&mut c, &r(2_500), 50).unwrap(),
            Refunded::Nothing
        ));
    }

    #[test]
    fn an_event_id_is_processed_once() {
        let (_d, mut c, id) = setup();
        pending(&mut c, id, "cs_1");
        let action = EventAction::Fulfil(paid("cs_1"));
        let first = apply_event(&mut c, "evt_1", "checkout.session.completed", &action, 20);
        assert_eq!(first.unwrap().label(), "credited");
        let again = apply_event(&mut c, "evt_1", "checkout.session.completed", &action, 21);
        assert_eq!(again.unwrap().label(), "duplicate");
        let other = apply_event(&mut c, "evt_2", "checkout.session.completed", &action, 22);
        assert_eq!(other.unwrap().label(), "already_paid");
        assert_eq!(balance_and_history(&c, id), (18_000_000, 18_000_000));
        let results: Vec<String> = c
            .prepare("SELECT result FROM stripe_events ORDER BY received_at")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<rusqlite::Result<_>>()
            .unwrap();
        assert_eq!(results, ["credited", "already_paid"]);
    }

    #[test]
    fn a_failed_event_leaves_no_trace_so_its_redelivery_is_processed() {
        let (_d, mut c, id) = setup();
        // the store fails mid-event (as a crash would): nothing may be recorded as seen
        c.execute_batch(
            "CREATE TRIGGER fail BEFORE UPDATE ON payment_history
             BEGIN SELECT raise(ABORT, 'disk gone'); END;",
        )
        .unwrap();
        pending(&mut c, id, "cs_x");
        let action = EventAction::Fulfil(paid("cs_x"));
        assert!(apply_event(&mut c, "evt_1", "checkout.session.completed", &action, 20).is_err());
        let seen: i64 = c
            .query_row("SELECT count(*) FROM stripe_events", [], |r| r.get(0))
            .unwrap();
        assert_eq!(seen, 0);
        c.execute_batch("DROP TRIGGER fail").unwrap();
        let again = apply_event(&mut c, "evt_1", "checkout.session.completed", &action, 21);
        assert_eq!(again.unwrap().label(), "credited");
    }

    fn refund_of(cents: i64) -> Refund {
        Refund {
            payment_intent: "pi_1".into(),
            amount_refunded_cents: cents,
        }
    }

    #[test]
    fn a_refund_delivered_before_its_payment_completes_is_applied_by_the_fulfilment() {
        let (_d, mut c, id) = setup();
        pending(&mut c, id, "cs_1"); // 5 h for 2,500 cents
                                     // 1,000 cents refunded before the completion arrives: kept, nothing to debit yet
        assert!(matches!(
            refund(&mut c, &refund_of(1_000), 15).unwrap(),
            Refunded::Held
        ));
        let Fulfilment::Credited { credited_ms, .. } = fulfil(&mut c, &paid("cs_1"), 20).unwrap()
        else {
            panic!("credited");
        };
        assert_eq!(
            credited_ms,
            3 * 3_600_000,
            "only the unrefunded 3 of 5 hours"
        );
        assert_eq!(balance_and_history(&c, id), (10_800_000, 10_800_000));
        let p = by_session(&c, "cs_1").unwrap().unwrap();
        assert_eq!(
            (p.status.as_str(), p.refunded_cents, p.refunded_ms),
            ("partially_refunded", 1_000, 7_200_000)
        );
        // the same refund again, and an older total delivered late: nothing
        for cents in [1_000, 500] {
            assert!(matches!(
                refund(&mut c, &refund_of(cents), 30).unwrap(),
                Refunded::Nothing
            ));
        }
        // the rest refunded: exactly the 3 hours left of it
        assert!(matches!(
            refund(&mut c, &refund_of(2_500), 40).unwrap(),
            Refunded::Debited {
                debited_ms: 10_800_000,
                ..
            }
        ));
        assert_eq!(balance_and_history(&c, id), (0, 0));
    }

    #[test]
    fn a_payment_refunded_in_full_before_it_completes_credits_nothing() {
        let (_d, mut c, id) = setup();
        pending(&mut c, id, "cs_1");
        refund(&mut c, &refund_of(2_000), 15).unwrap();
        refund(&mut c, &refund_of(2_500), 16).unwrap();
        refund(&mut c, &refund_of(1_000), 17).unwrap(); // out of order: the total stays
        let done = fulfil(&mut c, &paid("cs_1"), 20).unwrap();
        assert!(matches!(done, Fulfilment::Credited { credited_ms: 0, .. }));
        assert_eq!(balance_and_history(&c, id), (0, 0));
        assert_eq!(by_session(&c, "cs_1").unwrap().unwrap().status, "refunded");
        assert!(matches!(
            fulfil(&mut c, &paid("cs_1"), 30).unwrap(),
            Fulfilment::AlreadyPaid(_)
        ));
    }

    #[test]
    fn partial_refunds_in_any_order_take_the_largest_total_once() {
        let (_d, mut c, id) = setup();
        pending(&mut c, id, "cs_1");
        fulfil(&mut c, &paid("cs_1"), 20).unwrap();
        refund(&mut c, &refund_of(2_000), 30).unwrap(); // 4 of 5 hours
        assert!(matches!(
            refund(&mut c, &refund_of(1_000), 31).unwrap(),
            Refunded::Nothing
        ));
        assert_eq!(balance_and_history(&c, id), (3_600_000, 3_600_000));
    }

    #[test]
    fn fulfilment_never_credits_more_than_was_paid_for() {
        let (_d, mut c, id) = setup();
        // half the price paid: half the hours, and the row says why
        pending(&mut c, id, "cs_half");
        let mut half = paid("cs_half");
        half.amount_cents = 1_250;
        half.payment_intent = Some("pi_half".into());
        assert!(matches!(
            fulfil(&mut c, &half, 20).unwrap(),
            Fulfilment::Credited {
                credited_ms: 9_000_000,
                ..
            }
        ));
        let p = by_session(&c, "cs_half").unwrap().unwrap();
        assert_eq!(
            (p.paid_cents, p.credited_ms),
            (Some(1_250), Some(9_000_000))
        );
        assert!(p.mismatch.as_deref().unwrap().contains("1250 of the 2500"));
        // another currency: nothing
        pending(&mut c, id, "cs_eur");
        let mut eur = paid("cs_eur");
        eur.currency = "eur".into();
        eur.payment_intent = Some("pi_eur".into());
        assert!(matches!(
            fulfil(&mut c, &eur, 21).unwrap(),
            Fulfilment::Credited { credited_ms: 0, .. }
        ));
        assert!(by_session(&c, "cs_eur")
            .unwrap()
            .unwrap()
            .mismatch
            .is_some());
        // more than the price: the hours bought, noted
        pending(&mut c, id, "cs_more");
        let mut more = paid("cs_more");
        more.amount_cents = 9_999;
        more.payment_intent = Some("pi_more".into());
        fulfil(&mut c, &more, 22).unwrap();
        assert_eq!(balance_and_history(&c, id), (27_000_000, 27_000_000));
        // a refund of the half-paid one takes its share of what was credited and paid
        refund(
            &mut c,
            &Refund {
                payment_intent: "pi_half".into(),
                amount_refunded_cents: 1_250,
            },
            30,
        )
        .unwrap();
        assert_eq!(balance_and_history(&c, id), (18_000_000, 18_000_000));
        // without a row, the metadata's hours at their configured price
        let mut lost = paid("cs_lost");
        lost.license_id = Some(id);
        lost.hours_ms = Some(2 * 3_600_000);
        lost.amount_cents = 500;
        lost.payment_intent = Some("pi_lost".into());
        lost.priced = Some((1_000, "usd".into()));
        fulfil(&mut c, &lost, 40).unwrap();
        assert_eq!(balance_and_history(&c, id), (21_600_000, 21_600_000));
    }
}
