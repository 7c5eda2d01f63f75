-- A per-license, per-day, per-path rollup of access_logs, kept by the flusher in the same
-- transaction as the log rows. Per-license questions (calls, success rate, top endpoints) read
-- this instead of searching the append-only log, which stays indexed by time only.
CREATE TABLE access_daily (
    license_id  INTEGER NOT NULL,
    day         INTEGER NOT NULL, -- days since 1970-01-01 (UTC)
    path        TEXT    NOT NULL,
    calls       INTEGER NOT NULL,
    ok          INTEGER NOT NULL, -- answered with a status below 400
    duration_us INTEGER NOT NULL,
    bytes_in    INTEGER NOT NULL,
    bytes_out   INTEGER NOT NULL,
    PRIMARY KEY (license_id, day, path)
) WITHOUT ROWID;
