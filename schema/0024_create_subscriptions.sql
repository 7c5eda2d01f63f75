-- Plans sold as Stripe subscriptions (issue 34). One row per Stripe subscription, written by
-- its events (`store::subscriptions` decides what each does): the license it pays for, the plan
-- its price says, its state, the billing period paid, and when the license falls back to `free`
-- (a grace after a failed payment, or the end of what was paid once it is canceled). `event_at`
-- is Stripe's time (Unix ms) of the newest subscription event applied, so an older one
-- delivered late changes nothing.
CREATE TABLE subscriptions (
    id                   TEXT    PRIMARY KEY,
    license_id           INTEGER NOT NULL REFERENCES licenses (id),
    customer_id          TEXT,
    plan                 TEXT    NOT NULL,
    status               TEXT    NOT NULL,
    period_start         INTEGER,
    period_end           INTEGER,
    cancel_at_period_end INTEGER NOT NULL DEFAULT 0,
    grace_until          INTEGER,
    ends_at              INTEGER,
    event_at             INTEGER NOT NULL DEFAULT 0,
    created_at           INTEGER NOT NULL,
    updated_at           INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX subscriptions_license ON subscriptions (license_id, updated_at);
CREATE INDEX subscriptions_ending ON subscriptions (ends_at) WHERE ends_at IS NOT NULL;

-- Each subscription invoice paid: what was paid, for which period, by which payment intent (a
-- refund of that intent is a subscription's, not an hour package's).
CREATE TABLE subscription_invoices (
    id              TEXT    PRIMARY KEY,
    subscription_id TEXT    NOT NULL,
    license_id      INTEGER NOT NULL REFERENCES licenses (id),
    payment_intent  TEXT,
    amount_cents    INTEGER NOT NULL,
    currency        TEXT    NOT NULL,
    period_start    INTEGER NOT NULL,
    period_end      INTEGER NOT NULL,
    paid_at         INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX subscription_invoices_intent ON subscription_invoices (payment_intent);

-- The subscription Checkouts Tollgate made: the success page knows one of its own without
-- asking Stripe about every id it is shown.
-- `url` and `expires_at` (Unix ms): while it is open, subscribing again gives the same one.
CREATE TABLE subscription_checkouts (
    session_id TEXT    PRIMARY KEY,
    license_id INTEGER NOT NULL REFERENCES licenses (id),
    plan       TEXT    NOT NULL,
    url        TEXT    NOT NULL,
    expires_at INTEGER NOT NULL,
    created_at INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX subscription_checkouts_license ON subscription_checkouts (license_id, expires_at);

-- What a plan includes each period, and what it sells for, in the table of the config's plans.
ALTER TABLE plans ADD COLUMN included_ms INTEGER;
ALTER TABLE plans ADD COLUMN price_cents INTEGER;
ALTER TABLE plans ADD COLUMN price_interval TEXT;

-- Where a license's plan periods are counted from: its creation until it subscribes, then the
-- start of the billing period its subscription last paid (NULL: `created_at`).
ALTER TABLE licenses ADD COLUMN period_anchor INTEGER;
