-- Requests refused without a known license (no key, or a key nobody has), counted per minute,
-- reason and client address. Their access-log rows are a sample bounded by
-- storage.unauthenticated_log_rows_per_s, so a flood of made-up keys cannot fill the disk;
-- these counts hold every one of them. `client_ip` is '' when unknown, or when one flush saw
-- more distinct addresses than it keeps apart.
CREATE TABLE refused_minutes (
    minute    INTEGER NOT NULL,
    reason    TEXT    NOT NULL,
    client_ip TEXT    NOT NULL DEFAULT '',
    requests  INTEGER NOT NULL,
    PRIMARY KEY (minute, reason, client_ip)
) WITHOUT ROWID;
