-- Calls per license (or guest), UTC day, path, method and status class: the top endpoints
-- split so that "files uploaded" and "files failed" are a route and a status away, and each
-- guest's daily totals. Guests are license_id 0 with their guest id; a license's rows have
-- guest ''. `class` is the status divided by 100 (0: no answer was written). A table of its
-- own beside access_daily (whose key stays), so nodes of the previous build keep flushing on
-- the same database during an upgrade.
CREATE TABLE endpoint_daily (
    license_id  bigint   NOT NULL,
    guest       text     NOT NULL,
    day         bigint   NOT NULL,
    path        text     NOT NULL,
    method      text     NOT NULL,
    class       smallint NOT NULL,
    calls       bigint   NOT NULL,
    bytes_in    bigint   NOT NULL,
    bytes_out   bigint   NOT NULL,
    PRIMARY KEY (license_id, guest, day, path, method, class)
);
CREATE INDEX endpoint_daily_day ON endpoint_daily (day);
