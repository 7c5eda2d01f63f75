-- Every Stripe event processed, by event id, written in the same transaction as its effect: a
-- redelivered event finds its id here and does nothing.
CREATE TABLE stripe_events (
    id          TEXT    PRIMARY KEY,
    type        TEXT    NOT NULL,
    result      TEXT    NOT NULL,
    received_at INTEGER NOT NULL
) WITHOUT ROWID;
