-- Licenses: one row per key. The key itself is never stored, only its SHA-256 and a display
-- prefix. Balances are integers in milliseconds; `version` grows with every change so a reader
-- can tell a newer row from an older one.
CREATE TABLE licenses (
    id             INTEGER PRIMARY KEY,
    key_hash       BLOB    NOT NULL UNIQUE,
    key_prefix     TEXT    NOT NULL,
    name           TEXT    NOT NULL,
    email          TEXT,
    company        TEXT,
    plan           TEXT    NOT NULL DEFAULT 'free',
    status         TEXT    NOT NULL DEFAULT 'active' CHECK (status IN ('active', 'revoked')),
    balance_ms     INTEGER NOT NULL DEFAULT 0,
    used_ms        INTEGER NOT NULL DEFAULT 0,
    requests_total INTEGER NOT NULL DEFAULT 0,
    version        INTEGER NOT NULL DEFAULT 1,
    expires_at     INTEGER,
    created_at     INTEGER NOT NULL,
    updated_at     INTEGER NOT NULL,
    last_used_at   INTEGER
);

-- The gateway polls for rows changed by other processes (the CLI) by `updated_at`.
CREATE INDEX licenses_updated_at ON licenses (updated_at);
