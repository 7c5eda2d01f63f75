-- One row per request that reached the gateway, denied ones included (`outcome` says why).
-- An append-only log indexed by time only: a (license_id, ts) index made every flush touch a
-- leaf page per active license and cut the flusher from ~570k to ~100k rows/s. Per-license
-- questions are answered from rollups the flusher maintains, not by searching this table.
CREATE TABLE access_logs (
    id          INTEGER PRIMARY KEY,
    ts          INTEGER NOT NULL,
    license_id  INTEGER,
    session_id  TEXT,
    method      TEXT    NOT NULL,
    path        TEXT    NOT NULL,
    status      INTEGER NOT NULL,
    outcome     TEXT    NOT NULL,
    duration_us INTEGER NOT NULL,
    bytes_in    INTEGER NOT NULL,
    bytes_out   INTEGER NOT NULL,
    client_ip   TEXT,
    user_agent  TEXT
);

CREATE INDEX access_logs_ts ON access_logs (ts);
