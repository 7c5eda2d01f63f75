-- A key's own expiry and limits, checked beside its license's plan: a key past `expires_at`
-- is refused while its siblings work on; `requests_per_second` and `max_concurrent` bound the
-- key alone; `max_seconds_per_day` caps the request time the key may use in a UTC day. NULL
-- is no limit of the key's own (the plan's still hold).
ALTER TABLE license_keys ADD COLUMN expires_at INTEGER;
ALTER TABLE license_keys ADD COLUMN requests_per_second INTEGER;
ALTER TABLE license_keys ADD COLUMN max_concurrent INTEGER;
ALTER TABLE license_keys ADD COLUMN max_seconds_per_day INTEGER;

-- A per-key, per-day rollup of access_logs, kept by the flusher in the same transaction as the
-- log rows: which key spent what (the console, /api/licenses/{id}/stats), a key's request time
-- today (its daily cap, read when the key is loaded) and its last use (`last_at`, the newest
-- row's time: one write per key a flush, which the rollup costs anyway).
CREATE TABLE key_daily (
    key_id      INTEGER NOT NULL,
    day         INTEGER NOT NULL, -- days since 1970-01-01 (UTC)
    license_id  INTEGER NOT NULL,
    calls       INTEGER NOT NULL,
    ok          INTEGER NOT NULL, -- answered with a status below 400
    duration_us INTEGER NOT NULL,
    last_at     INTEGER NOT NULL, -- Unix ms of the day's newest row
    PRIMARY KEY (key_id, day)
) WITHOUT ROWID;
CREATE INDEX key_daily_license ON key_daily (license_id, day);
