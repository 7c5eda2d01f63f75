//! The arithmetic of payments and refunds, the same for every backend: what a payment earns for
//! what was paid, and what a refund takes back. Integers only; rounding is always in the
//! customer's favour.

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
/// What a refund's running total does to a paid payment (the same on every backend).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RefundStep {
    /// The charge's refunded cents from now on (the total, within what was charged).
    pub refunded_cents: i64,
    /// The time refunded from now on: the refunded share of what was credited.
    pub refunded_ms: i64,
    /// What to debit now: the new share less what earlier refunds took (may be 0).
    pub debit_ms: i64,
    pub status: &'static str,
}

/// The step a refund total of `total_cents` takes on `p`, or none when it refunds nothing new
/// (a replay, or a smaller total delivered late).
pub fn refund_step(p: &crate::store::Payment, total_cents: i64) -> Option<RefundStep> {
    let charged = p.charged_cents();
    let refunded_cents = total_cents.clamp(0, charged);
    if refunded_cents <= p.refunded_cents {
        return None;
    }
    let refunded_ms = refunded_share(p.credited(), charged, refunded_cents);
    Some(RefundStep {
        refunded_cents,
        refunded_ms,
        debit_ms: refunded_ms - p.refunded_ms,
        status: if refunded_cents == charged {
            "refunded"
        } else {
            "partially_refunded"
        },
    })
}
