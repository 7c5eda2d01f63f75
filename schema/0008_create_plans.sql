-- The plans of the config file, written at every start (the file is the source of truth; this
-- table lets SQL and reports see the limits a license was under). A license names its plan in
-- `licenses.plan`; a name missing here is limited as `free`. NULL is unlimited.
CREATE TABLE plans (
    name                TEXT    PRIMARY KEY,
    requests_per_second INTEGER,
    requests_per_minute INTEGER,
    requests_per_hour   INTEGER,
    requests_per_day    INTEGER,
    max_concurrent      INTEGER,
    max_body_bytes      INTEGER,
    period_ms           INTEGER,
    period_requests     INTEGER,
    updated_at          INTEGER NOT NULL
) WITHOUT ROWID;


