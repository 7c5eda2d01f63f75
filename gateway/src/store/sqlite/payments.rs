//! Payments on SQLite: the steps decided in `store/payments.rs`, read and applied here. Every
//! step runs in one `IMMEDIATE` transaction with its history row, which serializes it against
//! every other write: the guarantees that module's race analysis asks of a backend.

use super::licenses;
use super::{Result, StoreError};
use crate::store::payments::{self, BalanceChange, FulfilStep, PaidRow, RefundStep, RefundedRow};
use crate::store::{
    EventAction, EventOutcome, Fulfilment, License, NewPayment, PaidSession, Payment, Refund,
    Refunded,
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
    payments::check_pending(p)?;
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    licenses::get(&tx, p.license_id)?;
    insert(&tx, p, now)?;
    let payment = by_session(&tx, &p.session_id)?.ok_or(StoreError::NotFound)?;
    tx.commit()?;
    Ok(payment)
}

fn insert(tx: &Transaction<'_>, p: &NewPayment, now: i64) -> Result<()> {
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
    Ok(())
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

/// Stripe's running total refunded for a payment intent, if it has told us of any.
fn refund_total(tx: &Transaction<'_>, intent: &str) -> Result<Option<i64>> {
    Ok(tx
        .prepare_cached(
            "SELECT amount_refunded_cents FROM stripe_refunds WHERE payment_intent = ?1",
        )?
        .query_row([intent], |r| r.get(0))
        .optional()?)
}

fn apply_balance(tx: &Transaction<'_>, c: &BalanceChange, now: i64) -> Result<License> {
    licenses::change_balance(tx, c.license_id, c.kind, c.delta_ms, Some(&c.reason), now)
}

fn fulfil_in(tx: &Transaction<'_>, paid: &PaidSession, now: i64) -> Result<Fulfilment> {
    let row = match by_session(tx, &paid.session_id)? {
        Some(row) => row,
        None => {
            let found = paid
                .license_id
                .is_some_and(|id| licenses::get(tx, id).is_ok());
            let Some(new) = payments::unrecorded(paid, found) else {
                return Ok(Fulfilment::NotOurs);
            };
            insert(tx, &new, now)?;
            by_session(tx, &paid.session_id)?.ok_or(StoreError::NotFound)?
        }
    };
    let refunded = match payments::refunds_to_read(paid, &row) {
        Some(intent) => refund_total(tx, intent)?.unwrap_or(0),
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
        "UPDATE payment_history SET status = ?2, paid_at = ?3, updated_at = ?3,
             payment_intent = ?4, paid_cents = ?5, paid_currency = ?6, credited_ms = ?7,
             mismatch = ?8, refunded_cents = ?9, refunded_ms = ?10
         WHERE id = ?1",
        params![
            row.id,
            status,
            paid_at,
            payment_intent,
            paid_cents,
            paid_currency,
            earned_ms,
            mismatch,
            refunded_cents,
            refunded_ms
        ],
    )?;
    let license = match &credit {
        Some(c) => apply_balance(tx, c, now)?,
        None => licenses::get(tx, row.license_id)?,
    };
    let payment = by_session(tx, &paid.session_id)?.ok_or(StoreError::NotFound)?;
    Ok(Fulfilment::Credited {
        license: Box::new(license),
        payment: Box::new(payment),
        credited_ms,
    })
}

/// Debits the refunded share of a payment's hours (see `store::payments::refund`): replays and
/// partial refunds in any order, before or after the payment's completion, never take back more
/// than was bought.
pub fn refund(conn: &mut Connection, r: &Refund, now: i64) -> Result<Refunded> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let done = refund_in(&tx, r, now)?;
    tx.commit()?;
    Ok(done)
}

fn refund_in(tx: &Transaction<'_>, r: &Refund, now: i64) -> Result<Refunded> {
    let total = payments::refund_total(refund_total(tx, &r.payment_intent)?, r);
    tx.execute(
        "INSERT INTO stripe_refunds (payment_intent, amount_refunded_cents, received_at,
             updated_at) VALUES (?1, ?2, ?3, ?3)
         ON CONFLICT (payment_intent) DO UPDATE SET
             amount_refunded_cents = excluded.amount_refunded_cents,
             updated_at = excluded.updated_at",
        params![r.payment_intent, total, now],
    )?;
    let paid = tx
        .prepare_cached(&format!(
            "SELECT {COLUMNS} FROM payment_history
             WHERE payment_intent = ?1 AND status IN ('paid', 'partially_refunded', 'refunded')"
        ))?
        .query_row([&r.payment_intent], from_row)
        .optional()?;
    let (row, debit) = match payments::refund(paid.as_ref(), total) {
        RefundStep::Held if super::subscriptions::pays_an_invoice(tx, &r.payment_intent)? => {
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
        "UPDATE payment_history SET refunded_cents = ?2, refunded_ms = ?3, status = ?4,
             updated_at = ?5
         WHERE id = ?1",
        params![payment_id, refunded_cents, refunded_ms, status, now],
    )?;
    let Some(debit) = debit else {
        return Ok(Refunded::Nothing);
    };
    Ok(Refunded::Debited {
        license: Box::new(apply_balance(tx, &debit, now)?),
        debited_ms: -debit.delta_ms,
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
        EventAction::Subscription(a) => {
            EventOutcome::Subscription(super::subscriptions::apply_in(&tx, a, now)?)
        }
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
