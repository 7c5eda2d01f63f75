-- Every change to a balance, with the balance before and after: `delta_ms` is negative for
-- usage and debits, positive for credits. For each license, balance_ms = SUM(delta_ms).
CREATE TABLE usage_history (
    id                INTEGER PRIMARY KEY,
    license_id        INTEGER NOT NULL REFERENCES licenses (id),
    kind              TEXT    NOT NULL CHECK (kind IN ('usage', 'credit', 'debit', 'purchase', 'refund')),
    delta_ms          INTEGER NOT NULL,
    balance_before_ms INTEGER NOT NULL,
    balance_after_ms  INTEGER NOT NULL,
    requests          INTEGER NOT NULL DEFAULT 0,
    reason            TEXT,
    created_at        INTEGER NOT NULL
);

CREATE INDEX usage_history_license_time ON usage_history (license_id, created_at);
