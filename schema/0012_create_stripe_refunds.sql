-- Refunds as Stripe reports them: each charge's running total refunded, by payment intent. Kept
-- whether or not the payment is known yet: Stripe does not order events, and a refund delivered
-- before its checkout's completion is applied by the fulfilment that comes after it.
CREATE TABLE stripe_refunds (
    payment_intent        TEXT    PRIMARY KEY,
    amount_refunded_cents INTEGER NOT NULL CHECK (amount_refunded_cents >= 0),
    received_at           INTEGER NOT NULL,
    updated_at            INTEGER NOT NULL
) WITHOUT ROWID;
