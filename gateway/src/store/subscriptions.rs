//! Plans sold as Stripe subscriptions: what each subscription event changes, decided once for
//! every backend. [`apply`] is a plain function of the event and the rows as the backend read
//! them (the subscription's, locked, and its license's plan and period anchor); the backend
//! writes the [`Step`] it returns in the event's transaction (`store/sqlite/subscriptions.rs`,
//! `store/postgres/subscriptions.rs`). [`end_due`] is the same rule for the time passing: a
//! grace or a paid period that ran out returns the license to the fallback plan.
//!
//! # The rules
//!
//! - Every event upserts the subscription from what it carries (the license and plan are in
//!   the metadata Tollgate gave the Checkout Session and the subscription), so events may come
//!   in any order: an `invoice.paid` before the `checkout.session.completed` that made it
//!   records the subscription itself.
//! - **Plan and state** change only by an event not older than the newest one applied
//!   (`event_at`, Stripe's `created`): a `customer.subscription.updated` delivered late does
//!   not undo a later upgrade. `customer.subscription.deleted` is final whenever it comes.
//! - **The period** only moves forward: an `invoice.paid` for a later billing period than the
//!   one recorded starts it. The license's plan periods are then counted from it: its period
//!   anchor moves to the invoice's start, unless that start is already one of the monthly
//!   boundaries counted from the anchor it has (a renewal on the same day of the month), so
//!   the anchor does not drift through short months, nor before the period already begun (an
//!   invoice whose start, in Stripe's whole seconds, falls before the license's creation). A
//!   redelivery, or an older invoice, moves nothing: the new allowance is given once.
//! - **A failed payment** (or Stripe's `past_due`, `unpaid`, `paused`) starts a grace of
//!   `grace_ms` (once: further failures do not extend it); a payment, or the subscription
//!   becoming active again, ends it. When the grace ends unpaid, the license falls back to
//!   `free` and the subscription is [`LAPSED`]: Stripe's retries may still collect, and a
//!   payment then puts the plan back.
//! - **A cancellation** (`deleted`, a terminal status, or `cancel_at_period_end`) returns the
//!   license to `free` at the end of the period paid (at once when that is past, or for a
//!   trial, which paid nothing).
//! - **Not ours**: a subscription first seen without a license and a plan of ours in its
//!   metadata (Tollgate's own keys) changes nothing.
//! - **A refund** of a subscription's invoice takes nothing back: the plan runs to the end of
//!   the period paid, and the operator cancels the subscription in Stripe to end it sooner.
//!   Prepaid hours are never touched by a subscription.
//!
//! # What a backend must guarantee
//!
//! Each decision must see the subscription's row as every earlier event on it left it: the
//! backend reads the row locked (SQLite's `BEGIN IMMEDIATE`; PostgreSQL inserts it with
//! `ON CONFLICT DO NOTHING` and reads it back `FOR UPDATE`), and locks the license's row
//! before reading its plan and anchor. The event's id is recorded in the same transaction, so
//! each event is applied once.

use crate::periods::Calendar;

/// A subscription's status once it is over: cancelled, and its paid period past.
pub const ENDED: &str = "ended";

/// A subscription's status once its grace ran out unpaid: its license is back on the fallback
/// plan, and Stripe may still collect (its retries): a payment puts the plan back.
pub const LAPSED: &str = "lapsed";

/// One subscription as stored (`subscriptions`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Subscription {
    /// Stripe's id (`sub_…`).
    pub id: String,
    pub license_id: i64,
    /// Stripe's customer (`cus_…`), for the Customer Portal.
    pub customer_id: Option<String>,
    /// The plan its price says.
    pub plan: String,
    /// Stripe's status (`incomplete`, `trialing`, `active`, `past_due`, `canceled`, …), or
    /// [`ENDED`] once its license fell back.
    pub status: String,
    /// The billing period last paid, Unix ms.
    pub period_start: Option<i64>,
    pub period_end: Option<i64>,
    pub cancel_at_period_end: bool,
    /// Until when a failed payment leaves the plan in place.
    pub grace_until: Option<i64>,
    /// When the license returns to the fallback plan (a grace, or the end of what was paid).
    pub ends_at: Option<i64>,
    /// Stripe's time of the newest event applied to its plan and state (Unix ms).
    pub event_at: i64,
    pub created_at: i64,
    pub updated_at: i64,
}

impl Subscription {
    /// Whether it is still a subscription at Stripe (not over): a lapsed one is paid again in
    /// the portal, not subscribed to anew.
    pub fn live(&self) -> bool {
        self.status != ENDED
    }
}

/// A subscription's Checkout Session made here (`subscription_checkouts`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckoutRow {
    pub session_id: String,
    pub license_id: i64,
    pub plan: String,
    /// Stripe's page, given again while the session is open.
    pub url: String,
    /// When Stripe closes it (Unix ms).
    pub expires_at: i64,
}

/// Which event it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    /// `checkout.session.completed` in `mode=subscription`.
    Checkout,
    /// `invoice.paid`: the first invoice, a renewal, a proration.
    InvoicePaid,
    /// `invoice.payment_failed`.
    PaymentFailed,
    /// `customer.subscription.created` or `.updated`.
    Updated,
    /// `customer.subscription.deleted`.
    Deleted,
}

/// A paid invoice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invoice {
    pub id: String,
    pub payment_intent: Option<String>,
    pub amount_cents: i64,
    pub currency: String,
}

/// What a subscription event says, read from Stripe's object (`admin/src/stripe.rs`), its
/// price already resolved to a plan with the config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubscriptionEvent {
    pub kind: EventKind,
    pub subscription_id: String,
    pub customer_id: Option<String>,
    /// The license, from the metadata Tollgate wrote.
    pub license_id: Option<i64>,
    /// The plan its price says (or, when the price is none of ours, the metadata's).
    pub plan: Option<String>,
    /// The subscription's status, where the object carries it.
    pub status: Option<String>,
    /// The billing period the object speaks of, Unix ms.
    pub period: Option<(i64, i64)>,
    pub cancel_at_period_end: Option<bool>,
    pub invoice: Option<Invoice>,
    /// The Checkout Session that made it (`checkout.session.completed`): closed now, so
    /// subscribing again is no longer given it.
    pub checkout_session: Option<String>,
    /// Stripe's `created` of the event, Unix ms.
    pub at: i64,
}

/// The license as the event found it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LicenseTerms {
    pub plan: String,
    pub period_anchor: i64,
}

/// What the config gives the rule.
#[derive(Clone, Debug)]
pub struct Rules<'a> {
    /// How long a failed payment leaves the plan in place (`payments.grace_days`).
    pub grace_ms: i64,
    /// The plan a license returns to (`free`).
    pub fallback: &'a str,
    pub calendar: &'a Calendar,
}

/// An invoice row to record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InvoiceRow {
    pub invoice: Invoice,
    pub subscription_id: String,
    pub license_id: i64,
    pub period: (i64, i64),
}

/// What an event (or the time passing) changes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    /// The subscription as it is to be stored.
    pub row: Subscription,
    /// The license's new plan, when it changes.
    pub plan: Option<String>,
    /// The license's new period anchor, when it moves.
    pub anchor: Option<i64>,
    pub invoice: Option<InvoiceRow>,
    /// A Checkout Session of it that completed: no longer open.
    pub close_checkout: Option<String>,
    /// What happened, for the event's row and the metrics.
    pub label: &'static str,
}

impl Step {
    /// Whether the license changes.
    pub fn changes_license(&self) -> bool {
        self.plan.is_some() || self.anchor.is_some()
    }
}

/// Stripe's statuses after which nothing revives a subscription, and ours once its paid
/// period is over.
fn terminal(status: &str) -> bool {
    matches!(status, "canceled" | "incomplete_expired" | ENDED)
}

/// Stripe's statuses of a subscription whose payment is late.
fn late(status: &str) -> bool {
    matches!(status, "past_due" | "unpaid" | "paused")
}

/// What `ev` changes, given the subscription's row (none yet) and its license's terms (none:
/// no such license). None when the event is not ours: no license named, none by that id, or
/// a subscription first seen without a plan of ours.
pub fn apply(
    ev: &SubscriptionEvent,
    row: Option<&Subscription>,
    license: Option<&LicenseTerms>,
    rules: &Rules<'_>,
    now: i64,
) -> Option<Step> {
    let license = license?;
    let mut sub = match row {
        Some(r) => r.clone(),
        None => Subscription {
            id: ev.subscription_id.clone(),
            license_id: ev.license_id?,
            customer_id: None,
            plan: ev.plan.clone()?,
            status: "incomplete".into(),
            period_start: None,
            period_end: None,
            cancel_at_period_end: false,
            grace_until: None,
            ends_at: None,
            event_at: 0,
            created_at: now,
            updated_at: now,
        },
    };
    sub.updated_at = now;
    if sub.customer_id.is_none() {
        sub.customer_id = ev.customer_id.clone();
    }
    let mut plan = None;
    let mut anchor = None;
    let mut invoice = None;
    let current = ev.at >= sub.event_at;
    let label = match ev.kind {
        EventKind::Checkout => "subscription_recorded",
        EventKind::InvoicePaid => {
            if let (Some(inv), Some(period)) = (&ev.invoice, ev.period) {
                invoice = Some(InvoiceRow {
                    invoice: inv.clone(),
                    subscription_id: sub.id.clone(),
                    license_id: sub.license_id,
                    period,
                });
            }
            if terminal(&sub.status) {
                "subscription_stale"
            } else {
                let renewed = match ev.period {
                    Some((start, end)) if sub.period_start.is_none_or(|s| start > s) => {
                        sub.period_start = Some(start);
                        sub.period_end = Some(end);
                        // the plan's periods start again from it, when it is later than the
                        // period counting now (never an earlier one: a period the store has
                        // begun counting is not taken back; a renewal on the anniversary the
                        // calendar keeps already is no new start)
                        let (counting, _) = rules.calendar.period(license.period_anchor, now);
                        if start > counting {
                            anchor = Some(start);
                        }
                        true
                    }
                    _ => false,
                };
                let revived = sub.status == LAPSED;
                if current {
                    sub.event_at = ev.at;
                    sub.grace_until = None;
                    sub.ends_at = sub.cancel_at_period_end.then(|| paid_until(&sub, now));
                    let trial = sub.status == "trialing"
                        && ev.invoice.as_ref().is_none_or(|i| i.amount_cents == 0);
                    if !trial {
                        sub.status = "active".into();
                    }
                    if let Some(p) = &ev.plan {
                        sub.plan = p.clone();
                    }
                    plan = Some(sub.plan.clone());
                }
                match (revived && current, renewed) {
                    (true, _) => "subscription_revived",
                    (false, true) => "subscription_renewed",
                    (false, false) => "subscription_paid",
                }
            }
        }
        EventKind::PaymentFailed => {
            if terminal(&sub.status) || !current {
                "subscription_stale"
            } else {
                sub.event_at = ev.at;
                if sub.status != LAPSED {
                    sub.status = "past_due".into();
                    start_grace(&mut sub, rules, now);
                }
                "grace_started"
            }
        }
        EventKind::Updated => {
            if terminal(&sub.status) || !current {
                "subscription_stale"
            } else {
                sub.event_at = ev.at;
                let lapsed = sub.status == LAPSED;
                match ev.status.as_deref() {
                    // a lapsed subscription stays so until it is paid again
                    Some(s) if lapsed && late(s) => {}
                    Some(s) => sub.status = s.to_string(),
                    None => {}
                }
                if let Some(c) = ev.cancel_at_period_end {
                    sub.cancel_at_period_end = c;
                }
                // the period is what an invoice paid, so an update (which Stripe sends as a
                // renewal begins, before its invoice is paid) leaves it
                match sub.status.as_str() {
                    "active" | "trialing" => {
                        sub.grace_until = None;
                        // cancelled at the period's end: it ends then even if the deletion
                        // is never delivered
                        sub.ends_at = sub.cancel_at_period_end.then(|| paid_until(&sub, now));
                        if let Some(p) = &ev.plan {
                            sub.plan = p.clone();
                        }
                        plan = Some(sub.plan.clone());
                        if lapsed {
                            "subscription_revived"
                        } else {
                            "subscription_updated"
                        }
                    }
                    s if late(s) => {
                        start_grace(&mut sub, rules, now);
                        "grace_started"
                    }
                    s if terminal(s) => {
                        sub.ends_at = Some(paid_until(&sub, now));
                        "subscription_ending"
                    }
                    _ => "subscription_updated",
                }
            }
        }
        EventKind::Deleted => {
            if sub.status == ENDED {
                "subscription_stale"
            } else {
                sub.event_at = sub.event_at.max(ev.at);
                // a trial cancelled ends at once: nothing was paid for
                let end = if sub.status == "trialing" {
                    now
                } else {
                    // what was paid ends with the period paid
                    if let Some((start, end)) = ev.period {
                        if sub.period_start == Some(start) {
                            sub.period_end = Some(end);
                        }
                    }
                    paid_until(&sub, now)
                };
                sub.status = "canceled".into();
                sub.ends_at = Some(sub.ends_at.map_or(end, |e| e.min(end)));
                "subscription_ending"
            }
        }
    };
    let mut step = Step {
        row: sub,
        plan: plan.filter(|p| *p != license.plan),
        anchor: anchor.filter(|a| *a != license.period_anchor),
        invoice,
        close_checkout: ev.checkout_session.clone(),
        label,
    };
    if let Some(ended) = end_due(&step.row, license, rules, now) {
        step.row = ended.row;
        step.plan = ended.plan;
        step.label = ended.label;
    }
    Some(step)
}

/// A payment is late: the grace starts, once (a further failure does not extend it).
fn start_grace(sub: &mut Subscription, rules: &Rules<'_>, now: i64) {
    let until = *sub
        .grace_until
        .get_or_insert(now.saturating_add(rules.grace_ms));
    sub.ends_at = Some(sub.ends_at.map_or(until, |e| e.min(until)));
}

/// The end of what was paid: the period's end, or now when none is known or it is past.
fn paid_until(sub: &Subscription, now: i64) -> i64 {
    sub.period_end.map_or(now, |e| e.max(now))
}

/// A subscription whose grace or paid period ran out by `now`: it ends, and its license
/// returns to the fallback plan (when it is still on the subscription's plan: a plan the
/// operator set by hand since is theirs). None when nothing is due.
pub fn end_due(
    sub: &Subscription,
    license: &LicenseTerms,
    rules: &Rules<'_>,
    now: i64,
) -> Option<Step> {
    if sub.status == ENDED || sub.status == LAPSED || sub.ends_at.is_none_or(|e| e > now) {
        return None;
    }
    let mut row = sub.clone();
    // cancelled: over; else the grace ran out unpaid, and a payment may still revive it
    row.status = if terminal(&sub.status) { ENDED } else { LAPSED }.into();
    row.grace_until = None;
    row.updated_at = now;
    let plan = (license.plan == sub.plan && license.plan != rules.fallback)
        .then(|| rules.fallback.to_string());
    Some(Step {
        row,
        plan,
        anchor: None,
        invoice: None,
        close_checkout: None,
        label: "subscription_ended",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY: i64 = 86_400_000;
    /// 2026-03-01T00:00:00Z
    const MAR1: i64 = 1_772_323_200_000;

    fn rules(c: &Calendar) -> Rules<'_> {
        Rules {
            grace_ms: 3 * DAY,
            fallback: "free",
            calendar: c,
        }
    }

    fn ev(kind: EventKind, at: i64) -> SubscriptionEvent {
        SubscriptionEvent {
            kind,
            subscription_id: "sub_1".into(),
            customer_id: Some("cus_1".into()),
            license_id: Some(7),
            plan: Some("pro".into()),
            status: None,
            period: None,
            cancel_at_period_end: None,
            invoice: None,
            checkout_session: None,
            at,
        }
    }

    fn paid(at: i64, start: i64, end: i64) -> SubscriptionEvent {
        SubscriptionEvent {
            period: Some((start, end)),
            invoice: Some(Invoice {
                id: format!("in_{start}"),
                payment_intent: Some(format!("pi_{start}")),
                amount_cents: 2_000,
                currency: "usd".into(),
            }),
            ..ev(EventKind::InvoicePaid, at)
        }
    }

    fn terms(plan: &str, anchor: i64) -> LicenseTerms {
        LicenseTerms {
            plan: plan.into(),
            period_anchor: anchor,
        }
    }

    /// Applies a step to the license as a backend does.
    fn after(l: &LicenseTerms, s: &Step) -> LicenseTerms {
        LicenseTerms {
            plan: s.plan.clone().unwrap_or_else(|| l.plan.clone()),
            period_anchor: s.anchor.unwrap_or(l.period_anchor),
        }
    }

    #[test]
    fn the_first_invoice_puts_the_license_on_the_plan_from_the_invoices_period() {
        let c = Calendar::utc();
        let l = terms("free", MAR1 - 10 * DAY);
        let start = MAR1 + 3_600_000;
        let s = apply(
            &paid(start, start, start + 31 * DAY),
            None,
            Some(&l),
            &rules(&c),
            start,
        )
        .unwrap();
        assert_eq!(s.label, "subscription_renewed");
        assert_eq!(s.plan.as_deref(), Some("pro"));
        assert_eq!(s.anchor, Some(start));
        assert_eq!((s.row.status.as_str(), s.row.license_id), ("active", 7));
        assert_eq!(
            s.invoice.as_ref().unwrap().period,
            (start, start + 31 * DAY)
        );
        // a redelivery (or the same invoice's other events) moves nothing
        let l = after(&l, &s);
        let again = apply(
            &paid(start, start, start + 31 * DAY),
            Some(&s.row),
            Some(&l),
            &rules(&c),
            start + 5,
        )
        .unwrap();
        assert_eq!(
            (again.plan, again.anchor, again.label),
            (None, None, "subscription_paid")
        );
        // the renewal a month on is a boundary from the anchor: the anchor stays, the calendar
        // starts the period
        let next = start + 31 * DAY;
        let renewal = apply(
            &paid(next, next, next + 30 * DAY),
            Some(&s.row),
            Some(&l),
            &rules(&c),
            next,
        )
        .unwrap();
        assert_eq!(
            (renewal.anchor, renewal.label),
            (None, "subscription_renewed")
        );
        assert_eq!(renewal.row.period_start, Some(next));
    }

    #[test]
    fn events_not_ours_change_nothing() {
        let c = Calendar::utc();
        let mut e = paid(MAR1, MAR1, MAR1 + DAY);
        assert_eq!(
            apply(&e, None, None, &rules(&c), MAR1),
            None,
            "no such license"
        );
        e.license_id = None;
        assert_eq!(
            apply(&e, None, Some(&terms("free", 0)), &rules(&c), MAR1),
            None
        );
        // a license named, but no plan of ours: another product's subscription
        let foreign = SubscriptionEvent {
            plan: None,
            ..paid(MAR1, MAR1, MAR1 + DAY)
        };
        assert_eq!(
            apply(&foreign, None, Some(&terms("free", 0)), &rules(&c), MAR1),
            None
        );
    }

    #[test]
    fn a_late_update_does_not_undo_a_later_change_and_the_period_only_moves_on() {
        let c = Calendar::utc();
        let l = terms("free", 0);
        let first = apply(
            &paid(MAR1, MAR1, MAR1 + 31 * DAY),
            None,
            Some(&l),
            &rules(&c),
            MAR1,
        )
        .unwrap();
        let l = after(&l, &first);
        // upgraded at t+10 days
        let up = SubscriptionEvent {
            plan: Some("enterprise".into()),
            status: Some("active".into()),
            period: Some((MAR1, MAR1 + 31 * DAY)),
            ..ev(EventKind::Updated, MAR1 + 10 * DAY)
        };
        let s = apply(&up, Some(&first.row), Some(&l), &rules(&c), MAR1 + 10 * DAY).unwrap();
        assert_eq!(
            (s.plan.as_deref(), s.anchor),
            (Some("enterprise"), None),
            "same period"
        );
        let l = after(&l, &s);
        // an update from before it, delivered now
        let old = SubscriptionEvent {
            plan: Some("pro".into()),
            ..up.clone()
        };
        let old = SubscriptionEvent {
            at: MAR1 + DAY,
            ..old
        };
        let stale = apply(&old, Some(&s.row), Some(&l), &rules(&c), MAR1 + 11 * DAY).unwrap();
        assert_eq!((stale.plan, stale.label), (None, "subscription_stale"));
        // the first invoice delivered again late: the period does not go back
        let late = apply(
            &paid(MAR1, MAR1, MAR1 + 31 * DAY),
            Some(&s.row),
            Some(&l),
            &rules(&c),
            MAR1 + 12 * DAY,
        )
        .unwrap();
        assert_eq!((late.plan, late.anchor), (None, None));
        assert_eq!(late.row.plan, "enterprise");
    }

    #[test]
    fn a_failed_payment_leaves_a_grace_then_the_license_falls_back() {
        let c = Calendar::utc();
        let l = terms("free", 0);
        let first = apply(
            &paid(MAR1, MAR1, MAR1 + 31 * DAY),
            None,
            Some(&l),
            &rules(&c),
            MAR1,
        )
        .unwrap();
        let l = after(&l, &first);
        let t = MAR1 + 31 * DAY;
        let failed = apply(
            &ev(EventKind::PaymentFailed, t),
            Some(&first.row),
            Some(&l),
            &rules(&c),
            t,
        )
        .unwrap();
        assert_eq!(failed.label, "grace_started");
        assert_eq!(failed.row.grace_until, Some(t + 3 * DAY));
        assert_eq!(failed.plan, None, "the plan stays through the grace");
        // a second failure does not extend it
        let again = apply(
            &ev(EventKind::PaymentFailed, t + DAY),
            Some(&failed.row),
            Some(&l),
            &rules(&c),
            t + DAY,
        )
        .unwrap();
        assert_eq!(again.row.ends_at, Some(t + 3 * DAY));
        assert_eq!(end_due(&again.row, &l, &rules(&c), t + 3 * DAY - 1), None);
        let ended = end_due(&again.row, &l, &rules(&c), t + 3 * DAY).unwrap();
        assert_eq!(
            (ended.plan.as_deref(), ended.row.status.as_str()),
            (Some("free"), LAPSED)
        );
        assert_eq!(
            end_due(&ended.row, &l, &rules(&c), t + 4 * DAY),
            None,
            "once"
        );
        // Stripe's retries collect a week later: the plan is back, the period the invoice's
        let lapsed_l = after(&l, &ended);
        let late = t + 7 * DAY;
        let back = apply(
            &paid(late, t, t + 30 * DAY),
            Some(&ended.row),
            Some(&lapsed_l),
            &rules(&c),
            late,
        )
        .unwrap();
        assert_eq!(back.label, "subscription_revived");
        assert_eq!(
            (back.plan.as_deref(), back.row.status.as_str()),
            (Some("pro"), "active")
        );
        assert_eq!((back.row.grace_until, back.row.ends_at), (None, None));
        // a later failure while lapsed changes nothing of the grace
        let failed = apply(
            &ev(EventKind::PaymentFailed, late),
            Some(&ended.row),
            Some(&lapsed_l),
            &rules(&c),
            late,
        )
        .unwrap();
        assert_eq!((failed.plan, failed.row.status.as_str()), (None, LAPSED));
        // paid within the grace instead: the grace ends
        let saved = apply(
            &paid(t + DAY, t, t + 30 * DAY),
            Some(&again.row),
            Some(&l),
            &rules(&c),
            t + 2 * DAY,
        )
        .unwrap();
        assert_eq!((saved.row.grace_until, saved.row.ends_at), (None, None));
        assert_eq!(saved.row.status, "active");
        assert_eq!(end_due(&saved.row, &l, &rules(&c), t + 10 * DAY), None);
    }

    #[test]
    fn a_cancellation_ends_at_the_end_of_what_was_paid() {
        let c = Calendar::utc();
        let l = terms("free", 0);
        let first = apply(
            &paid(MAR1, MAR1, MAR1 + 31 * DAY),
            None,
            Some(&l),
            &rules(&c),
            MAR1,
        )
        .unwrap();
        let l = after(&l, &first);
        let gone = apply(
            &ev(EventKind::Deleted, MAR1 + DAY),
            Some(&first.row),
            Some(&l),
            &rules(&c),
            MAR1 + DAY,
        )
        .unwrap();
        assert_eq!(
            (gone.label, gone.plan.clone()),
            ("subscription_ending", None)
        );
        assert_eq!(gone.row.ends_at, Some(MAR1 + 31 * DAY));
        // an invoice or update delivered after it changes nothing
        for late in [
            paid(MAR1 + 2 * DAY, MAR1 + 31 * DAY, MAR1 + 61 * DAY),
            ev(EventKind::Updated, MAR1 + 2 * DAY),
        ] {
            let s = apply(&late, Some(&gone.row), Some(&l), &rules(&c), MAR1 + 2 * DAY).unwrap();
            assert_eq!(
                (s.plan, s.anchor, s.label),
                (None, None, "subscription_stale")
            );
        }
        // deleted after its period: ends at once
        let now = MAR1 + 40 * DAY;
        let late = apply(
            &ev(EventKind::Deleted, now),
            Some(&first.row),
            Some(&l),
            &rules(&c),
            now,
        )
        .unwrap();
        assert_eq!(
            (late.label, late.plan.as_deref()),
            ("subscription_ended", Some("free"))
        );
        // a plan the operator set by hand since is left alone
        let by_hand = terms("enterprise", l.period_anchor);
        let s = end_due(&gone.row, &by_hand, &rules(&c), MAR1 + 31 * DAY).unwrap();
        assert_eq!(s.plan, None);
    }

    #[test]
    fn past_due_from_an_update_starts_the_grace_and_a_cancel_at_the_periods_end_ends_then() {
        let c = Calendar::utc();
        let l = terms("free", 0);
        let first = apply(
            &paid(MAR1, MAR1, MAR1 + 31 * DAY),
            None,
            Some(&l),
            &rules(&c),
            MAR1,
        )
        .unwrap();
        let l = after(&l, &first);
        let t = MAR1 + 31 * DAY;
        let late = SubscriptionEvent {
            status: Some("past_due".into()),
            ..ev(EventKind::Updated, t)
        };
        let s = apply(&late, Some(&first.row), Some(&l), &rules(&c), t).unwrap();
        assert_eq!(
            (s.label, s.row.ends_at),
            ("grace_started", Some(t + 3 * DAY))
        );
        // cancelled at the period's end in the portal: it ends then, deletion or not
        let cancel = SubscriptionEvent {
            status: Some("active".into()),
            cancel_at_period_end: Some(true),
            ..ev(EventKind::Updated, MAR1 + DAY)
        };
        let s = apply(&cancel, Some(&first.row), Some(&l), &rules(&c), MAR1 + DAY).unwrap();
        assert_eq!(s.row.ends_at, Some(MAR1 + 31 * DAY));
        let s = end_due(&s.row, &l, &rules(&c), MAR1 + 31 * DAY).unwrap();
        assert_eq!(s.plan.as_deref(), Some("free"));
        // a trial cancelled ends at once
        let trial = SubscriptionEvent {
            status: Some("trialing".into()),
            ..ev(EventKind::Updated, MAR1)
        };
        let free = terms("free", 0);
        let t0 = apply(&trial, None, Some(&free), &rules(&c), MAR1).unwrap();
        let on_trial = after(&free, &t0);
        let gone = apply(
            &ev(EventKind::Deleted, MAR1 + DAY),
            Some(&t0.row),
            Some(&on_trial),
            &rules(&c),
            MAR1 + DAY,
        )
        .unwrap();
        assert_eq!(
            (gone.label, gone.row.status.as_str()),
            ("subscription_ended", ENDED)
        );
        assert_eq!(gone.plan.as_deref(), Some("free"));
    }

    #[test]
    fn any_order_of_a_renewal_and_its_update_gives_the_new_period_once() {
        let c = Calendar::utc();
        let start = MAR1 + 5 * 3_600_000;
        let l0 = terms("free", MAR1 - 20 * DAY);
        let first = apply(
            &paid(start, start, start + 31 * DAY),
            None,
            Some(&l0),
            &rules(&c),
            start,
        )
        .unwrap();
        let l1 = after(&l0, &first);
        // a renewal on another day (the billing anchor was reset): it moves the anchor
        let next = start + 20 * DAY;
        let events = [
            paid(next, next, next + 31 * DAY),
            SubscriptionEvent {
                status: Some("active".into()),
                period: Some((next, next + 31 * DAY)),
                ..ev(EventKind::Updated, next)
            },
        ];
        for order in [[0, 1, 0], [1, 0, 0], [0, 0, 1]] {
            let (mut row, mut l, mut moves) = (first.row.clone(), l1.clone(), 0);
            for i in order {
                let s = apply(&events[i], Some(&row), Some(&l), &rules(&c), next + 1).unwrap();
                moves += usize::from(s.anchor.is_some());
                l = after(&l, &s);
                row = s.row;
            }
            assert_eq!(moves, 1, "{order:?}");
            assert_eq!((l.plan.as_str(), l.period_anchor), ("pro", next));
        }
    }
}
