-- One row per Stripe Checkout Session: written `pending` when the session is created, turned
-- `paid` exactly once by fulfilment (`UPDATE ... WHERE status = 'pending'`, in the same
-- transaction as the credit). Refunds record the refunded amount and the hours taken back, so a
-- second refund event for the same charge debits only the difference.
CREATE TABLE payment_history (
    id                INTEGER PRIMARY KEY,
    license_id        INTEGER NOT NULL REFERENCES licenses (id),
    stripe_session_id TEXT    NOT NULL UNIQUE,
    payment_intent    TEXT,
    package_id        TEXT,
    hours_ms          INTEGER NOT NULL CHECK (hours_ms > 0),
    amount_cents      INTEGER NOT NULL CHECK (amount_cents >= 0),
    currency          TEXT    NOT NULL,
    status            TEXT    NOT NULL DEFAULT 'pending'
                      CHECK (status IN ('pending', 'paid', 'partially_refunded', 'refunded')),
    refunded_cents    INTEGER NOT NULL DEFAULT 0,
    refunded_ms       INTEGER NOT NULL DEFAULT 0,
    created_at        INTEGER NOT NULL,
    paid_at           INTEGER,
    updated_at        INTEGER NOT NULL
);

CREATE INDEX payment_history_license_time ON payment_history (license_id, created_at);
CREATE INDEX payment_history_payment_intent ON payment_history (payment_intent);
