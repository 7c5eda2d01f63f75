-- Usage alerts: a threshold of a plan period's allowance or of the prepaid balance, crossed.
-- One row per license, kind, threshold and period (for balance alerts the "period" starts at
-- the last top-up), so a threshold alerts once per period however often it is crossed.
CREATE TABLE usage_alerts (
    id                INTEGER PRIMARY KEY,
    license_id        INTEGER NOT NULL REFERENCES licenses (id),
    kind              TEXT    NOT NULL CHECK (kind IN ('period_time', 'period_requests', 'balance')),
    threshold_percent INTEGER NOT NULL,
    period_start      INTEGER NOT NULL,
    used              INTEGER NOT NULL, -- milliseconds, or requests for period_requests
    allowance         INTEGER NOT NULL,
    created_at        INTEGER NOT NULL,
    -- webhook delivery (when [alerts] webhook_url is set)
    attempts          INTEGER NOT NULL DEFAULT 0,
    delivered_at      INTEGER,
    last_error        TEXT,
    UNIQUE (license_id, kind, threshold_percent, period_start)
);

CREATE INDEX usage_alerts_license_time ON usage_alerts (license_id, created_at);
