-- Calls per license (or guest), UTC day, path, method and status class: the top endpoints
-- split so that "files uploaded" and "files failed" are a route and a status away, and each
-- guest's daily totals. Guests are license_id 0 with their guest id; a license's rows have
-- guest ''. `class` is the status divided by 100 (0: no answer was written). A table of its
-- own beside access_daily (whose key stays), so a build that does not know it keeps working
-- on the same database.
CREATE TABLE endpoint_daily (
    license_id  INTEGER NOT NULL,
    guest       TEXT    NOT NULL,
    day         INTEGER NOT NULL, -- days since 1970-01-01 (UTC)
    path        TEXT    NOT NULL,
    method      TEXT    NOT NULL,
    class       INTEGER NOT NULL,
    calls       INTEGER NOT NULL,
    bytes_in    INTEGER NOT NULL,
    bytes_out   INTEGER NOT NULL,
    PRIMARY KEY (license_id, guest, day, path, method, class)
) WITHOUT ROWID;
CREATE INDEX endpoint_daily_day ON endpoint_daily (day);
