-- One row per request that reached the gateway, denied ones included (`outcome` says why).
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

CREATE INDEX access_logs_license_time ON access_logs (license_id, ts);
CREATE INDEX access_logs_ts ON access_logs (ts);
