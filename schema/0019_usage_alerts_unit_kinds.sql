-- Usage alerts on a meter's period allowance (`period_units`): their kind is the limit's
-- name, `period_units.<meter>`. SQLite cannot change a CHECK constraint in place, so the
-- table is copied into one with the wider check (same columns, rows and index).
CREATE TABLE usage_alerts_next (
    id                INTEGER PRIMARY KEY,
    license_id        INTEGER NOT NULL REFERENCES licenses (id),
    kind              TEXT    NOT NULL CHECK (kind IN ('period_time', 'period_requests', 'balance')
                                          OR kind LIKE 'period_units.%'),
    threshold_percent INTEGER NOT NULL,
    period_start      INTEGER NOT NULL,
    used              INTEGER NOT NULL, -- milliseconds, requests or units
    allowance         INTEGER NOT NULL,
    created_at        INTEGER NOT NULL,
    attempts          INTEGER NOT NULL DEFAULT 0,
    delivered_at      INTEGER,
    last_error        TEXT,
    UNIQUE (license_id, kind, threshold_percent, period_start)
);
INSERT INTO usage_alerts_next (id, license_id, kind, threshold_percent, period_start, used,
    allowance, created_at, attempts, delivered_at, last_error)
SELECT id, license_id, kind, threshold_percent, period_start, used, allowance, created_at,
    attempts, delivered_at, last_error
FROM usage_alerts;
DROP TABLE usage_alerts;
ALTER TABLE usage_alerts_next RENAME TO usage_alerts;
CREATE INDEX usage_alerts_license_time ON usage_alerts (license_id, created_at);
