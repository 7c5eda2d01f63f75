//! What each payment step changes, decided once for every backend: plain functions of the
//! event and the rows as the backend read them, returning the changes for the backend to apply
//! in its own transaction (`store/sqlite/payments.rs`, `store/postgres/payments.rs`). Integers
//! only; rounding is always in the customer's favour.
//!
//! # The steps
//!
//! - [`check_pending`]: a Checkout Session about to be paid may be recorded.
//! - [`unrecorded`]: a paid session with no row here (we crashed between creating it and
//!   recording it) is recorded from its metadata, which we wrote and Stripe signed, at the
//!   configured price; without a license or a price it is not ours.
//! - [`fulfil`]: a pending row is paid: what was paid earns its share of the hours bought
//!   ([`paid_share`]), less the share of whatever Stripe refunded before the completion arrived
//!   (a refund held, [`refunded_share`]), credited in one [`BalanceChange`].
//! - [`refund_total`] and [`refund`]: Stripe reports a charge's running total refunded; the
//!   largest total seen is kept, and a paid payment gives back the share of it not already
//!   taken. No paid payment yet: the total is held for the fulfilment to read.
//!
//! # What a backend must guarantee (the race analysis, once)
//!
//! The webhook, its redeliveries and the success page may all deliver the same session or the
//! same refund at once, on one node or several. The decisions above are correct when each one
//! sees the rows as they are after every earlier step on the same session and the same charge
//! has committed, and its changes commit before the next such step reads. A backend gives that
//! with two serializations, held to the end of its transaction:
//!
//! 1. **Per session**: the session's payment row is read locked. Two fulfilments of one
//!    session then run one after the other, and the second reads `paid` and is
//!    [`FulfilStep::AlreadyPaid`]: the hours are credited once. Recording an unrecorded
//!    session inserts with `ON CONFLICT DO NOTHING` and reads the row back locked, so a
//!    concurrent recorder of the same session waits and then sees it paid.
//! 2. **Per charge** (payment intent): a refund reads, raises and stores the running total,
//!    and reads the paid payment of that intent, under one lock of the intent; a fulfilment
//!    takes the same lock before it reads the total ([`refunds_to_read`]). A refund delivered
//!    while the completion commits is then either read by the fulfilment (which credits only
//!    the unrefunded share) or sees the paid row (and takes its share), never neither nor
//!    both; two refunds of one charge cannot both take the same share. A row lock cannot do
//!    this: the refund finds the payment by an intent the uncommitted fulfilment is only now
//!    writing. The two cannot wait on each other in a cycle: a fulfilment takes the intent's
//!    lock only while its row is still pending, and a refund writes only a row already paid.
//!
//! SQLite's `BEGIN IMMEDIATE` serializes every write transaction, which gives both. PostgreSQL
//! under READ COMMITTED uses `SELECT … FOR UPDATE` on the session's row (a waiter re-reads the
//! committed row) and `pg_advisory_xact_lock` on the intent.
//!
//! An event id is recorded in the same transaction as its effect, with `ON CONFLICT DO NOTHING`:
//! a redelivery waits for the first delivery's transaction, and is a duplicate if it committed
//! or processed as new if it rolled back.

use crate::store::{NewPayment, PaidSession, Payment, Refund, StoreError};

/// The status of a payment whose session is open and not yet paid.
pub const PENDING: &str = "pending";

/// A change to a license's balance, written with its history row in the same transaction.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BalanceChange {
    pub license_id: i64,
    /// The history row's kind (`purchase`, `refund`).
    pub kind: &'static str,
    pub delta_ms: i64,
    pub reason: String,
}

/// A pending payment may be recorded only with hours to sell and a price that is not negative.
pub fn check_pending(p: &NewPayment) -> Result<(), StoreError> {
    if p.hours_ms <= 0 || p.amount_cents < 0 {
        return Err(StoreError::Invalid(
            "a payment needs positive hours and a non-negative amount".into(),
        ));
    }
    Ok(())
}

/// A paid session with no row here: the row to record from its metadata, or none when it is
/// not ours (no license or hours in its metadata, hours not positive, no such license, or no
/// configured price for them). `license_found` says whether `paid.license_id` names a license.
pub fn unrecorded(paid: &PaidSession, license_found: bool) -> Option<NewPayment> {
    let (Some(license_id), Some(hours_ms)) = (paid.license_id, paid.hours_ms) else {
        return None;
    };
    if hours_ms <= 0 || !license_found {
        return None;
    }
    let (amount_cents, currency) = paid.priced.clone()?;
    Some(NewPayment {
        license_id,
        session_id: paid.session_id.clone(),
        package_id: paid.package_id.clone(),
        hours_ms,
        amount_cents,
        currency,
    })
}

/// The charge whose running refund total a fulfilment of `row` must read (under the charge's
/// lock): the intent Stripe gave with the payment, else the one recorded before. None when
/// the row is not pending (nothing will be credited, so nothing is read or locked) or no
/// intent is known.
pub fn refunds_to_read<'a>(paid: &'a PaidSession, row: &'a Payment) -> Option<&'a str> {
    if row.status != PENDING {
        return None;
    }
    paid.payment_intent
        .as_deref()
        .or(row.payment_intent.as_deref())
}

/// The payment row's columns a fulfilment sets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PaidRow {
    pub payment_intent: Option<String>,
    pub paid_at: i64,
    pub paid_cents: i64,
    pub paid_currency: String,
    pub credited_ms: i64,
    pub mismatch: Option<String>,
    pub refunded_cents: i64,
    pub refunded_ms: i64,
    pub status: &'static str,
}

/// What a fulfilment does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FulfilStep {
    /// The row was paid before: nothing changes.
    AlreadyPaid,
    /// The row becomes `row`, and the balance changes by `credit` (none when nothing is left
    /// to credit: paid in another currency, or refunded in full before it completed).
    Pay {
        row: PaidRow,
        credit: Option<BalanceChange>,
    },
}

impl FulfilStep {
    /// What the customer was credited.
    pub fn credited_ms(&self) -> i64 {
        match self {
            FulfilStep::Pay {
                credit: Some(c), ..
            } => c.delta_ms,
            _ => 0,
        }
    }
}

/// Fulfils `row`, the session's payment as read (locked), given what Stripe paid and the
/// charge's running total refunded so far (`refunded_total_cents`, 0 when none is held).
pub fn fulfil(
    paid: &PaidSession,
    row: &Payment,
    refunded_total_cents: i64,
    now: i64,
) -> FulfilStep {
    if row.status != PENDING {
        return FulfilStep::AlreadyPaid;
    }
    let (credited_ms, mismatch) = paid_share(
        row.hours_ms,
        row.amount_cents,
        &row.currency,
        paid.amount_cents,
        &paid.currency,
    );
    // a refund Stripe delivered before this completion takes its share right away
    let refunded_cents = refunded_total_cents.clamp(0, paid.amount_cents);
    let refunded_ms = refunded_share(credited_ms, paid.amount_cents, refunded_cents);
    let status = if refunded_cents == 0 {
        "paid"
    } else if refunded_cents >= paid.amount_cents {
        "refunded"
    } else {
        "partially_refunded"
    };
    let net_ms = credited_ms - refunded_ms;
    let credit = (net_ms > 0).then(|| BalanceChange {
        license_id: row.license_id,
        kind: "purchase",
        delta_ms: net_ms,
        reason: if refunded_ms > 0 {
            format!("stripe {} (less its refunded share)", row.session_id)
        } else {
            format!("stripe {}", row.session_id)
        },
    });
    FulfilStep::Pay {
        row: PaidRow {
            payment_intent: paid
                .payment_intent
                .clone()
                .or_else(|| row.payment_intent.clone()),
            paid_at: now,
            paid_cents: paid.amount_cents,
            paid_currency: paid.currency.clone(),
            credited_ms,
            mismatch,
            refunded_cents,
            refunded_ms,
            status,
        },
        credit,
    }
}

/// The charge's running total refunded from now on: the largest Stripe has reported (a total
/// delivered late, smaller than one seen before, changes nothing). `stored` is the total held
/// for the intent, if any.
pub fn refund_total(stored: Option<i64>, r: &Refund) -> i64 {
    stored.unwrap_or(0).max(r.amount_refunded_cents).max(0)
}

/// The payment row's columns a refund sets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RefundedRow {
    pub payment_id: i64,
    pub refunded_cents: i64,
    pub refunded_ms: i64,
    pub status: &'static str,
}

/// What a refund does, once its running total is stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RefundStep {
    /// No paid payment has the intent yet: the total is held for its fulfilment.
    Held,
    /// Already accounted for (a replay, or a smaller total delivered late).
    Nothing,
    /// The payment row becomes `row`; the balance changes by `debit` (none when the new share
    /// rounds to what earlier refunds took).
    Take {
        row: RefundedRow,
        debit: Option<BalanceChange>,
    },
}

/// The step a running total of `total_cents` takes on the paid payment of its intent (`paid`,
/// as read under the charge's lock; none when no payment with that intent is paid yet).
pub fn refund(paid: Option<&Payment>, total_cents: i64) -> RefundStep {
    let Some(p) = paid else {
        return RefundStep::Held;
    };
    let charged = p.charged_cents();
    let refunded_cents = total_cents.clamp(0, charged);
    if refunded_cents <= p.refunded_cents {
        return RefundStep::Nothing;
    }
    let refunded_ms = refunded_share(p.credited(), charged, refunded_cents);
    let debit_ms = refunded_ms - p.refunded_ms;
    RefundStep::Take {
        row: RefundedRow {
            payment_id: p.id,
            refunded_cents,
            refunded_ms,
            status: if refunded_cents == charged {
                "refunded"
            } else {
                "partially_refunded"
            },
        },
        debit: (debit_ms > 0).then(|| BalanceChange {
            license_id: p.license_id,
            kind: "refund",
            delta_ms: -debit_ms,
            reason: format!("stripe refund {}", p.session_id),
        }),
    }
}

/// The time a payment earns for what was paid: the hours bought when the amount and currency
/// are the ones priced, a pro-rata share when less was paid, nothing in another currency; never
/// more than was bought. The second value says what differed.
pub fn paid_share(
    hours_ms: i64,
    priced_cents: i64,
    priced_currency: &str,
    paid_cents: i64,
    paid_currency: &str,
) -> (i64, Option<String>) {
    if !paid_currency.eq_ignore_ascii_case(priced_currency) {
        let why = format!(
            "paid {paid_cents} {paid_currency}, priced {priced_cents} {priced_currency}: \
             nothing credited"
        );
        return (0, Some(why));
    }
    if priced_cents <= 0 || paid_cents >= priced_cents {
        let why = (paid_cents > priced_cents).then(|| {
            format!("paid {paid_cents} {paid_currency}, more than the {priced_cents} priced")
        });
        return (if paid_cents >= 0 { hours_ms } else { 0 }, why);
    }
    let share =
        (i128::from(hours_ms) * i128::from(paid_cents.max(0)) / i128::from(priced_cents)) as i64;
    let why = format!(
        "paid {paid_cents} of the {priced_cents} {paid_currency} priced: credited {share} of \
         {hours_ms} ms"
    );
    (share, Some(why))
}

/// The share of `credited_ms` that `refunded_cents` of `charged_cents` takes back, rounded
/// down (in the customer's favour); a full refund takes back exactly what was credited.
pub fn refunded_share(credited_ms: i64, charged_cents: i64, refunded_cents: i64) -> i64 {
    if charged_cents <= 0 || refunded_cents <= 0 {
        return 0;
    }
    if refunded_cents >= charged_cents {
        return credited_ms;
    }
    (i128::from(credited_ms) * i128::from(refunded_cents) / i128::from(charged_cents)) as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(status: &str) -> Payment {
        Payment {
            id: 7,
            license_id: 3,
            session_id: "cs_1".into(),
            payment_intent: None,
            package_id: Some("10h".into()),
            hours_ms: 36_000_000,
            amount_cents: 1_000,
            currency: "usd".into(),
            status: status.into(),
            refunded_cents: 0,
            refunded_ms: 0,
            created_at: 1,
            paid_at: None,
            paid_cents: None,
            paid_currency: None,
            credited_ms: None,
            mismatch: None,
        }
    }

    fn paid(cents: i64, currency: &str) -> PaidSession {
        PaidSession {
            session_id: "cs_1".into(),
            payment_intent: Some("pi_1".into()),
            license_id: Some(3),
            hours_ms: Some(36_000_000),
            package_id: Some("10h".into()),
            amount_cents: cents,
            currency: currency.into(),
            priced: Some((1_000, "usd".into())),
        }
    }

    /// Applies a fulfilment's row change the way a backend does.
    fn apply_paid(mut p: Payment, step: &FulfilStep) -> Payment {
        let FulfilStep::Pay { row, .. } = step else {
            return p;
        };
        p.status = row.status.into();
        p.payment_intent = row.payment_intent.clone();
        p.paid_at = Some(row.paid_at);
        p.paid_cents = Some(row.paid_cents);
        p.paid_currency = Some(row.paid_currency.clone());
        p.credited_ms = Some(row.credited_ms);
        p.mismatch = row.mismatch.clone();
        p.refunded_cents = row.refunded_cents;
        p.refunded_ms = row.refunded_ms;
        p
    }

    #[test]
    fn a_pending_payment_needs_hours_and_a_price_not_negative() {
        let ok = NewPayment {
            license_id: 1,
            session_id: "cs".into(),
            package_id: None,
            hours_ms: 1,
            amount_cents: 0,
            currency: "usd".into(),
        };
        assert!(check_pending(&ok).is_ok());
        for bad in [
            NewPayment {
                hours_ms: 0,
                ..ok.clone()
            },
            NewPayment {
                hours_ms: -5,
                ..ok.clone()
            },
            NewPayment {
                amount_cents: -1,
                ..ok.clone()
            },
        ] {
            assert!(matches!(check_pending(&bad), Err(StoreError::Invalid(_))));
        }
    }

    #[test]
    fn an_unrecorded_session_is_ours_only_with_a_license_hours_and_a_price() {
        let p = paid(1_000, "usd");
        let new = unrecorded(&p, true).expect("ours");
        assert_eq!(
            new,
            NewPayment {
                license_id: 3,
                session_id: "cs_1".into(),
                package_id: Some("10h".into()),
                hours_ms: 36_000_000,
                amount_cents: 1_000,
                currency: "usd".into(),
            }
        );
        assert_eq!(unrecorded(&p, false), None, "no such license");
        for not_ours in [
            PaidSession {
                license_id: None,
                ..p.clone()
            },
            PaidSession {
                hours_ms: None,
                ..p.clone()
            },
            PaidSession {
                hours_ms: Some(0),
                ..p.clone()
            },
            PaidSession {
                priced: None,
                ..p.clone()
            },
        ] {
            assert_eq!(unrecorded(&not_ours, true), None, "{not_ours:?}");
        }
    }

    #[test]
    fn a_fulfilment_reads_the_refunds_of_its_charge_only_while_pending() {
        let mut r = row("pending");
        let mut p = paid(1_000, "usd");
        assert_eq!(refunds_to_read(&p, &r), Some("pi_1"));
        r.payment_intent = Some("pi_0".into());
        assert_eq!(
            refunds_to_read(&p, &r),
            Some("pi_1"),
            "Stripe's intent wins"
        );
        p.payment_intent = None;
        assert_eq!(refunds_to_read(&p, &r), Some("pi_0"), "else the row's");
        r.payment_intent = None;
        assert_eq!(refunds_to_read(&p, &r), None);
        for status in ["paid", "partially_refunded", "refunded"] {
            assert_eq!(refunds_to_read(&paid(1_000, "usd"), &row(status)), None);
        }
    }

    #[test]
    fn a_payment_is_credited_once_what_was_paid_for() {
        for status in ["paid", "partially_refunded", "refunded"] {
            let step = fulfil(&paid(1_000, "usd"), &row(status), 0, 5);
            assert_eq!(step, FulfilStep::AlreadyPaid);
            assert_eq!(step.credited_ms(), 0);
        }
        let step = fulfil(&paid(1_000, "USD"), &row("pending"), 0, 5);
        assert_eq!(
            step,
            FulfilStep::Pay {
                row: PaidRow {
                    payment_intent: Some("pi_1".into()),
                    paid_at: 5,
                    paid_cents: 1_000,
                    paid_currency: "USD".into(),
                    credited_ms: 36_000_000,
                    mismatch: None,
                    refunded_cents: 0,
                    refunded_ms: 0,
                    status: "paid",
                },
                credit: Some(BalanceChange {
                    license_id: 3,
                    kind: "purchase",
                    delta_ms: 36_000_000,
                    reason: "stripe cs_1".into(),
                }),
            }
        );
        // the row's intent is kept when Stripe gives none
        let mut r = row("pending");
        r.payment_intent = Some("pi_0".into());
        let p = PaidSession {
            payment_intent: None,
            ..paid(1_000, "usd")
        };
        let FulfilStep::Pay { row: set, .. } = fulfil(&p, &r, 0, 5) else {
            panic!("pending pays");
        };
        assert_eq!(set.payment_intent.as_deref(), Some("pi_0"));
    }

    #[test]
    fn less_paid_earns_its_share_and_another_currency_nothing() {
        let step = fulfil(&paid(250, "usd"), &row("pending"), 0, 5);
        assert_eq!(step.credited_ms(), 9_000_000);
        let FulfilStep::Pay { row: set, .. } = &step else {
            panic!()
        };
        assert_eq!(set.status, "paid");
        assert!(set
            .mismatch
            .as_deref()
            .unwrap()
            .contains("paid 250 of the 1000"));

        let step = fulfil(&paid(1_000, "eur"), &row("pending"), 0, 5);
        let FulfilStep::Pay { row: set, credit } = &step else {
            panic!()
        };
        assert_eq!((set.credited_ms, credit), (0, &None));
        assert_eq!(set.status, "paid", "the row is paid, nothing credited");

        let step = fulfil(&paid(1_500, "usd"), &row("pending"), 0, 5);
        assert_eq!(step.credited_ms(), 36_000_000, "never more than was bought");
    }

    #[test]
    fn a_refund_held_before_the_payment_completes_takes_its_share_at_once() {
        let step = fulfil(&paid(1_000, "usd"), &row("pending"), 400, 5);
        let FulfilStep::Pay { row: set, credit } = &step else {
            panic!()
        };
        assert_eq!(
            (set.refunded_cents, set.refunded_ms, set.status),
            (400, 14_400_000, "partially_refunded")
        );
        let credit = credit.as_ref().unwrap();
        assert_eq!(credit.delta_ms, 21_600_000);
        assert_eq!(credit.reason, "stripe cs_1 (less its refunded share)");

        // refunded in full (or more than was paid) before it completed: nothing to credit
        for held in [1_000, 5_000] {
            let FulfilStep::Pay { row: set, credit } =
                fulfil(&paid(1_000, "usd"), &row("pending"), held, 5)
            else {
                panic!()
            };
            assert_eq!((set.refunded_cents, set.status), (1_000, "refunded"));
            assert_eq!(credit, None);
        }
    }

    #[test]
    fn a_refunds_running_total_only_grows() {
        let r = |cents| Refund {
            payment_intent: "pi_1".into(),
            amount_refunded_cents: cents,
        };
        assert_eq!(refund_total(None, &r(300)), 300);
        assert_eq!(refund_total(None, &r(-3)), 0);
        assert_eq!(
            refund_total(Some(500), &r(300)),
            500,
            "a late smaller total"
        );
        assert_eq!(refund_total(Some(500), &r(700)), 700);
    }

    #[test]
    fn a_refund_without_a_paid_payment_is_held_and_a_replay_takes_nothing() {
        assert_eq!(refund(None, 500), RefundStep::Held);
        let p = apply_paid(
            row("pending"),
            &fulfil(&paid(1_000, "usd"), &row("pending"), 0, 5),
        );
        let step = refund(Some(&p), 250);
        assert_eq!(
            step,
            RefundStep::Take {
                row: RefundedRow {
                    payment_id: 7,
                    refunded_cents: 250,
                    refunded_ms: 9_000_000,
                    status: "partially_refunded",
                },
                debit: Some(BalanceChange {
                    license_id: 3,
                    kind: "refund",
                    delta_ms: -9_000_000,
                    reason: "stripe refund cs_1".into(),
                }),
            }
        );
        let mut after = p.clone();
        after.refunded_cents = 250;
        after.refunded_ms = 9_000_000;
        assert_eq!(refund(Some(&after), 250), RefundStep::Nothing, "a replay");
        assert_eq!(
            refund(Some(&after), 100),
            RefundStep::Nothing,
            "late and smaller"
        );
    }

    #[test]
    fn a_refund_whose_share_rounds_to_what_was_taken_moves_the_row_only() {
        let mut p = row("paid");
        p.hours_ms = 3;
        p.credited_ms = Some(3);
        p.paid_cents = Some(1_000);
        // 1 cent of 1 000 is 0.003 ms: nothing to take, but the total is recorded
        let RefundStep::Take { row: set, debit } = refund(Some(&p), 1) else {
            panic!()
        };
        assert_eq!((set.refunded_cents, set.refunded_ms, debit), (1, 0, None));
    }

    /// Every order of delivering a charge's refund totals, before and after its payment
    /// completes: the customer ends with exactly what was credited less the share of the
    /// largest total, however the deliveries interleave, and never below zero.
    #[test]
    fn refunds_in_any_order_take_the_share_of_the_largest_total_once() {
        let totals = [0, 1, 333, 500, 999, 1_000, 1_200];
        for paid_cents in [1_000, 700] {
            for &a in &totals {
                for &b in &totals {
                    for &c in &totals {
                        for completes_after in 0..=3 {
                            let mut stored = None;
                            let mut payment: Option<Payment> = None;
                            let mut balance = 0i64;
                            let mut pending = Some(row("pending"));
                            for (i, total) in [a, b, c].into_iter().enumerate() {
                                if i == completes_after {
                                    let r = pending.take().unwrap();
                                    let step = fulfil(
                                        &paid(paid_cents, "usd"),
                                        &r,
                                        stored.unwrap_or(0),
                                        5,
                                    );
                                    balance += step.credited_ms();
                                    payment = Some(apply_paid(r, &step));
                                }
                                let t = refund_total(
                                    stored,
                                    &Refund {
                                        payment_intent: "pi_1".into(),
                                        amount_refunded_cents: total,
                                    },
                                );
                                stored = Some(t);
                                if let RefundStep::Take { row: set, debit } =
                                    refund(payment.as_ref(), t)
                                {
                                    let p = payment.as_mut().unwrap();
                                    p.refunded_cents = set.refunded_cents;
                                    p.refunded_ms = set.refunded_ms;
                                    p.status = set.status.into();
                                    balance += debit.map_or(0, |d| d.delta_ms);
                                }
                            }
                            if let Some(r) = pending.take() {
                                let step =
                                    fulfil(&paid(paid_cents, "usd"), &r, stored.unwrap_or(0), 5);
                                balance += step.credited_ms();
                                payment = Some(apply_paid(r, &step));
                            }
                            let credited = 36_000_000 * paid_cents / 1_000;
                            let largest = a.max(b).max(c).min(paid_cents);
                            let expected = credited - refunded_share(credited, paid_cents, largest);
                            assert_eq!(
                                balance, expected,
                                "paid {paid_cents}, totals {a} {b} {c}, completed after \
                                 {completes_after}"
                            );
                            let p = payment.unwrap();
                            assert_eq!(p.refunded_cents, largest);
                            let status = match largest {
                                0 => "paid",
                                l if l == paid_cents => "refunded",
                                _ => "partially_refunded",
                            };
                            assert_eq!(p.status, status);
                        }
                    }
                }
            }
        }
    }
}
